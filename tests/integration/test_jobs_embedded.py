"""The embedded path (`make run` = `python -m app.embedded`): SQLite database, SQLite broker
(kombu's SQLAlchemy transport), a real worker and beat as child processes; a job runs to success.

The retention gate is set impossible here, so the same run also shows that an adapter that fails
the gate is stored but not activated, and the job says why.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Api, free_port, make_settings
from tests.worker_support import (
    REPO_ROOT,
    TINY_TRAINING,
    get_job,
    hidden_entries,
    model_dir,
    post_pairs,
    settings_env,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.slow
IMPOSSIBLE_DRIFT = 1e6  # the mean log-ratio on base answers must be at least 1e6 nats: never


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Path, Path]]:
    """`python -m app.embedded` on a fresh data folder; yields (client, data dir, its log)."""
    data_dir = tmp_path_factory.mktemp("embedded")
    port = free_port()
    settings = make_settings(
        data_dir,
        port=port,
        base_model=str(model_dir()),
        train_defaults=TINY_TRAINING,
        gate_mc_limit=2,
        gate_prompt_limit=2,
        gate_max_anchor_drift=IMPOSSIBLE_DRIFT,
    )
    env = settings_env(settings)
    for name in ("DATABASE_URL", "BROKER_URL", "ADAPTER_DIR", "AUTO_MIGRATE"):
        env.pop(name)  # the embedded defaults, derived from DATA_DIR
    log_path = data_dir / "embedded.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.embedded"],
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api = Api(f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: _healthy(api) or process.poll() is not None, 90, "the embedded API")
        assert process.poll() is None, log_path.read_text()
        yield api, data_dir, log_path
        children = [int(p) for p in re.findall(r"started \w+ \(pid (\d+)\)", log_path.read_text())]
        assert len(children) == 3
        process.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        for pid in children:
            assert not _alive(pid), f"child {pid} still runs"
    finally:
        api.close()
        if process.poll() is None:
            process.kill()


def _healthy(api: Api) -> bool:
    try:
        return api.http.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


def test_embedded_job_succeeds_and_an_adapter_failing_the_gate_is_kept_inactive(
    embedded: tuple[Api, Path, Path],
) -> None:
    api, data_dir, _log = embedded
    assert api.http.get("/readyz").json()["checks"]["broker"]["ok"] is True
    user_id, headers = api.create_user("embedded")
    post_pairs(api.http, user_id, headers)
    response = api.http.post(f"/users/{user_id}/train", json={}, headers=headers)
    assert response.status_code == 202, response.text
    job = wait_status(
        api.http, user_id, response.json()["id"], headers, {"succeeded", "failed", "cancelled"}, 300
    )
    assert job["status"] == "succeeded", job["error"]
    assert job["adapter_version"] == 1 and job["gate"]["passed"] is False
    assert "GATE_MAX_ANCHOR_DRIFT" in job["gate"]["reason"]
    listing = api.http.get(f"/users/{user_id}/adapters", headers=headers).json()
    assert listing["active_version"] is None
    (adapter,) = listing["data"]
    assert (adapter["version"], adapter["active"], adapter["gate_passed"]) == (1, False, False)
    assert adapter["available"] is True and "base-anchor" in adapter["gate_reason"]
    assert adapter["gate"]["mc_questions"] == 2 and adapter["gate"]["gate_prompts"] == 2
    assert (data_dir / "adapters" / user_id / "v1" / "adapter_config.json").is_file()
    assert hidden_entries(data_dir / "adapters", user_id) == []
    user = api.http.get(f"/users/{user_id}", headers=headers).json()
    assert user["active_adapter_version"] is None
    assert get_job(api.http, user_id, job["id"], headers)["metrics"]["retention"]["delta"] <= 1
    assert (data_dir / "broker.sqlite3").is_file() and (data_dir / "bapo.sqlite3").is_file()
