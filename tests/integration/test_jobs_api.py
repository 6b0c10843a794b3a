"""The training-job API on a live server (Postgres and SQLite), without a worker: jobs stay queued.

The server's broker is the embedded SQLite one in its data folder, so enqueueing is real too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.api.state import app_state
from tests.support import Api, LiveServer, assert_error, make_settings
from tests.worker_support import REPO_ROOT, model_dir, post_pairs


def _train(api: Api, user_id: str, headers: dict[str, str], body: Any = None) -> httpx.Response:
    return api.http.post(f"/users/{user_id}/train", json=body or {}, headers=headers)


def test_train_needs_enough_pairs(api: Api) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers, count=3)
    error = assert_error(_train(api, user_id, headers), 422, "not_enough_pairs")
    assert "at least 4" in error["message"] and "has 3" in error["message"]
    assert api.http.get(f"/users/{user_id}/train/jobs", headers=headers).json()["data"] == []


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"method": "ppo"}, "validation_error", "method"),
        ({"epochs": 1}, "validation_error", "epochs"),
        ({"hyperparameters": {"bogus": 1}}, "invalid_hyperparameters", "hyperparameters.bogus"),
        ({"hyperparameters": {"beta": -1}}, "invalid_hyperparameters", "hyperparameters.beta"),
        (
            {"hyperparameters": {"lora_rank": 7}},
            "invalid_hyperparameters",
            "hyperparameters.lora_rank",
        ),
        ({"hyperparameters": {"epochs": "2"}}, "invalid_hyperparameters", "hyperparameters.epochs"),
        (
            {"hyperparameters": {"max_steps": True}},
            "invalid_hyperparameters",
            "hyperparameters.max_steps",
        ),
        (
            {"hyperparameters": {"served_model_name": "x"}},
            "invalid_hyperparameters",
            "hyperparameters.served_model_name",
        ),
        (
            {"method": "dpo", "hyperparameters": {"method": "bapo"}},
            "invalid_hyperparameters",
            "hyperparameters.method",
        ),
    ],
)
def test_bad_training_requests_are_refused_and_change_nothing(
    api: Api, body: dict[str, Any], code: str, param: str
) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    error = assert_error(_train(api, user_id, headers, body), 422, code)
    assert error["param"] == param
    assert api.http.get(f"/users/{user_id}/train/jobs", headers=headers).json()["data"] == []


def test_train_queues_one_job_and_a_second_trigger_returns_it(api: Api) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    body = {"method": "dpo", "hyperparameters": {"epochs": 1, "lora_rank": 8}}
    first = _train(api, user_id, headers, body)
    assert first.status_code == 202, first.text
    job = first.json()
    assert first.headers["location"] == f"/users/{user_id}/train/jobs/{job['id']}"
    assert (job["object"], job["status"], job["trigger"], job["method"]) == (
        "training_job",
        "queued",
        "api",
        "dpo",
    )
    assert job["pair_count"] == 4 and job["progress"] == 0 and job["attempts"] == 0
    assert job["hyperparameters"]["epochs"] == 1 and job["hyperparameters"]["beta"] == 0.1
    second = _train(api, user_id, headers, {"method": "bapo"})
    assert second.status_code == 200 and second.json()["id"] == job["id"]
    listed = api.http.get(f"/users/{user_id}/train/jobs", headers=headers).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]] and listed["has_more"] is False
    got = api.http.get(f"/users/{user_id}/train/jobs/{job['id']}", headers=headers).json()
    assert got == job
    events = api.http.get(f"/users/{user_id}/train/jobs/{job['id']}/events", headers=headers)
    assert [e["data"]["status"] for e in events.json()["data"]] == ["queued"]


def test_cancel_a_queued_job_then_train_again(api: Api) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    job_id = _train(api, user_id, headers).json()["id"]
    url = f"/users/{user_id}/train/jobs/{job_id}/cancel"
    cancelled = api.http.post(url, headers=headers)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
    assert api.http.post(url, headers=headers).json()["status"] == "cancelled"  # idempotent
    again = _train(api, user_id, headers)
    assert again.status_code == 202 and again.json()["id"] != job_id


def test_cancel_a_finished_job_conflicts(api: Api, live_server: LiveServer) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    job_id = _train(api, user_id, headers).json()["id"]
    with app_state(live_server.app).engine.begin() as conn:
        conn.execute(
            text("UPDATE training_jobs SET status = 'succeeded' WHERE id = :id"), {"id": job_id}
        )
    response = api.http.post(f"/users/{user_id}/train/jobs/{job_id}/cancel", headers=headers)
    assert_error(response, 409, "job_finished")


def test_jobs_are_private_and_unknown_ones_are_404(api: Api) -> None:
    user_id, headers = api.create_user()
    other_id, other_headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    job_id = _train(api, user_id, headers).json()["id"]
    assert_error(
        api.http.get(f"/users/{user_id}/train/jobs/{job_id}", headers=other_headers),
        403,
        "wrong_user",
    )
    assert_error(api.http.post(f"/users/{user_id}/train", headers=other_headers), 403)
    operator = api.operator
    assert_error(
        api.http.get(f"/users/{other_id}/train/jobs/{job_id}", headers=operator),
        404,
        "job_not_found",
    )
    assert_error(
        api.http.post(f"/users/{user_id}/train/jobs/job_nope/cancel", headers=headers),
        404,
        "job_not_found",
    )
    assert_error(api.http.post("/users/nobody/train", headers=operator), 404, "user_not_found")
    assert_error(api.http.get(f"/users/{user_id}/train/jobs/{job_id}"), 401)


def test_jobs_and_events_are_paged(api: Api) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    ids = []
    for _ in range(3):
        ids.append(_train(api, user_id, headers).json()["id"])
        api.http.post(f"/users/{user_id}/train/jobs/{ids[-1]}/cancel", headers=headers)
    page = api.http.get(f"/users/{user_id}/train/jobs", params={"limit": 2}, headers=headers).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    rest = api.http.get(
        f"/users/{user_id}/train/jobs",
        params={"limit": 2, "cursor": page["next_cursor"]},
        headers=headers,
    ).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False
    bad = api.http.get(f"/users/{user_id}/train/jobs", params={"cursor": "job_x"}, headers=headers)
    assert_error(bad, 400, "invalid_cursor")
    url = f"/users/{user_id}/train/jobs/{ids[0]}/events"
    first = api.http.get(url, params={"limit": 1}, headers=headers).json()
    assert first["has_more"] is True and first["data"][0]["data"]["status"] == "queued"
    second = api.http.get(url, params={"after": first["next_cursor"]}, headers=headers).json()
    assert second["data"][0]["data"]["status"] == "cancelled" and second["has_more"] is False
    only = api.http.get(url, params={"kind": "step"}, headers=headers).json()
    assert only["data"] == []


def test_readyz_reports_an_unreachable_broker(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, broker_url="redis://127.0.0.1:1/0", base_model=str(model_dir())
    )
    server = LiveServer(settings).start()
    try:
        response = httpx.get(f"{server.url}/readyz", timeout=30)
    finally:
        server.stop()
    assert response.status_code == 503
    broker = response.json()["checks"]["broker"]
    assert broker["ok"] is False and "unreachable" in broker["detail"]


def test_the_api_never_imports_torch(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from tests.support import make_settings\n"
        "from app.main import create_app\n"
        "import app.api.routes.train, app.queue, app.services.jobs, app.services.schedule\n"
        f"create_app(make_settings(__import__('pathlib').Path({str(tmp_path)!r})))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
