"""Rate limits: one bucket per authenticated user, however the key is spelled in the header, and
one limit across API replicas when the deployment has Redis (real uvicorn processes, Postgres and
a private Redis); without Redis (embedded mode) the buckets are per process."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from tests.fault_support import private_redis
from tests.support import (
    Api,
    LiveServer,
    assert_error,
    make_settings,
    postgres_database,
)
from tests.worker_support import api_process, wait_for

LIMIT = 2
NO_GENERATE_LIMIT = {"rate_limit_generate_per_min": 0}


def _train_statuses(
    urls: list[str], user_id: str, headers: list[dict[str, str]], count: int
) -> list[int]:
    """POST /train `count` times (no pairs: 422 when allowed), cycling over servers and headers."""
    statuses = []
    for i in range(count):
        url, auth = urls[i % len(urls)], headers[i % len(headers)]
        response = httpx.post(f"{url}/users/{user_id}/train", headers=auth, timeout=30)
        if response.status_code == 429:
            assert_error(response, 429, "rate_limited")
        else:
            assert_error(response, 422, "not_enough_pairs")
        statuses.append(response.status_code)
    return statuses


def _spellings(key: str) -> list[dict[str, str]]:
    """The same key, written the ways HTTP and the Bearer scheme allow."""
    return [
        {"Authorization": f"Bearer {key}"},
        {"Authorization": f"bearer {key}"},
        {"Authorization": f"Bearer  {key}"},
        {"Authorization": f"BEARER {key}"},
        {"Authorization": f"bEaReR   {key}"},
    ]


def _assert_spellings_share_one_bucket(server: LiveServer) -> None:
    api = Api(server.url)
    try:
        user_id, auth = api.create_user(f"spell-{uuid.uuid4().hex[:8]}")
        variants = _spellings(auth["Authorization"].removeprefix("Bearer "))
        for headers in variants:  # every spelling authenticates as the same user
            whoami = api.http.get("/whoami", headers=headers)
            assert whoami.json() == {"operator": False, "user_id": user_id}, whoami.text
        statuses = _train_statuses([server.url], user_id, variants, len(variants))
        assert statuses == [422] * LIMIT + [429] * (len(variants) - LIMIT)
    finally:
        api.close()


def test_key_spellings_share_one_bucket_in_process(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, rate_limit_train_per_hour=LIMIT, **NO_GENERATE_LIMIT)
    server = LiveServer(settings).start()  # SQLite, SQLite broker: in-process buckets
    try:
        _assert_spellings_share_one_bucket(server)
    finally:
        server.stop()


def test_key_spellings_share_one_bucket_in_redis(tmp_path: Path) -> None:
    with private_redis() as redis_server:
        settings = make_settings(
            tmp_path,
            broker_url=redis_server.url,
            rate_limit_train_per_hour=LIMIT,
            **NO_GENERATE_LIMIT,
        )
        server = LiveServer(settings).start()
        try:
            _assert_spellings_share_one_bucket(server)
        finally:
            server.stop()


def test_two_api_processes_together_allow_only_the_limit(tmp_path: Path) -> None:
    with postgres_database() as database_url, private_redis() as redis_server:
        settings = make_settings(
            tmp_path,
            database_url,
            broker_url=redis_server.url,
            rate_limit_train_per_hour=LIMIT,
            **NO_GENERATE_LIMIT,
        )
        with (
            api_process(settings, tmp_path / "a.log") as first,
            api_process(settings, tmp_path / "b.log") as second,
        ):
            api = Api(first)
            try:
                user_id, auth = api.create_user("replicated")
            finally:
                api.close()
            statuses = _train_statuses([first, second], user_id, [auth], 3 * LIMIT)
            assert statuses == [422] * LIMIT + [429] * (2 * LIMIT), statuses


def test_redis_down_falls_back_to_this_process_buckets(tmp_path: Path) -> None:
    with private_redis() as redis_server:
        settings = make_settings(
            tmp_path,
            broker_url=redis_server.url,
            rate_limit_train_per_hour=LIMIT,
            **NO_GENERATE_LIMIT,
        )
        server = LiveServer(settings).start()
        api = Api(server.url)
        try:
            user_id, auth = api.create_user("outage")
            assert _train_statuses([server.url], user_id, [auth], LIMIT + 1)[-1] == 429
            redis_server.stop()
            # Not refused, not unlimited: this process's own buckets take over (never a 5xx).
            during = _train_statuses([server.url], user_id, [auth], LIMIT + 1)
            assert during == [422] * LIMIT + [429], during
            redis_server.start()  # empty again: the shared buckets start full
            back = [server.url], user_id, [auth]
            wait_for(lambda: _train_statuses(*back, 1) == [422], 20, "shared buckets again")
            after = _train_statuses(*back, LIMIT)
            assert after == [422] * (LIMIT - 1) + [429], after
        finally:
            api.close()
            server.stop()
