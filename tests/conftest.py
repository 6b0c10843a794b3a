"""Fixtures: the API on a live server, against real Postgres and against SQLite (embedded path)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Api, LiveServer, make_settings, postgres_database


@pytest.fixture(scope="session", params=["postgres", "sqlite"])
def live_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One live server per database kind for the whole session; tests wipe rows after themselves."""
    data_dir = tmp_path_factory.mktemp(f"data-{request.param}")
    if request.param == "postgres":
        with postgres_database() as url:
            server = LiveServer(make_settings(data_dir, url)).start()
            yield server
            server.stop()
    else:
        server = LiveServer(make_settings(data_dir)).start()  # SQLite file, migrated at start-up
        yield server
        server.stop()


@pytest.fixture
def api(live_server: LiveServer) -> Iterator[Api]:
    """A client for the live server; every row is deleted after the test."""
    client = Api(live_server.url)
    yield client
    client.close()
    live_server.wipe()
