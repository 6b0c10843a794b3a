"""Operator bounds on training hyperparameters, enforced by the API before anything is queued
(live server on Postgres and SQLite; the embedded SQLite broker, so enqueueing is real)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from app.core.config import Settings
from tests.support import Api, LiveServer, assert_error, make_settings
from tests.worker_support import post_pairs

# (hyperparameter, a value above the default bound, the setting naming the bound, the bound)
ABOVE_BOUNDS: list[tuple[str, Any, str, str]] = [
    ("max_steps", 2001, "TRAIN_MAX_STEPS", "2000"),
    ("epochs", 21, "TRAIN_MAX_EPOCHS", "20"),
    ("batch_size", 65, "TRAIN_MAX_BATCH_SIZE", "64"),
    ("base_batch_size", 65, "TRAIN_MAX_BATCH_SIZE", "64"),
    ("score_batch_size", 65, "TRAIN_MAX_BATCH_SIZE", "64"),
    ("grad_accum_steps", 17, "TRAIN_MAX_GRAD_ACCUM_STEPS", "16"),
    ("lora_rank", 128, "VLLM_MAX_LORA_RANK", "64"),
    ("target_modules", ["q_proj", "lm_head"], "VLLM_LORA_MODULES", "q_proj"),
    ("max_prompt_tokens", 2049, "TRAIN_MAX_PROMPT_TOKENS", "2048"),
    ("max_response_tokens", 1025, "TRAIN_MAX_RESPONSE_TOKENS", "1024"),
    ("base_max_new_tokens", 1025, "TRAIN_MAX_RESPONSE_TOKENS", "1024"),
]
AT_BOUNDS = {
    "max_steps": 2000,
    "epochs": 20,
    "batch_size": 64,
    "grad_accum_steps": 16,
    "lora_rank": 64,
    "max_prompt_tokens": 2048,
    "max_response_tokens": 1024,
    "base_max_new_tokens": 1024,
}


def _queued_messages(live_server: LiveServer) -> int:
    """Task messages in the server's embedded (SQLite) broker."""
    engine = create_engine(live_server.settings.broker_url.split("+", 1)[1])
    try:
        if "kombu_message" not in inspect(engine).get_table_names():
            return 0
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM kombu_message")).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.parametrize(("name", "value", "setting", "bound"), ABOVE_BOUNDS)
def test_hyperparameters_above_the_bounds_are_refused_and_nothing_is_queued(
    api: Api, live_server: LiveServer, name: str, value: Any, setting: str, bound: str
) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    before = _queued_messages(live_server)
    body = {"hyperparameters": {name: value}}
    response = api.http.post(f"/users/{user_id}/train", json=body, headers=headers)
    error = assert_error(response, 422, "invalid_hyperparameters")
    assert error["param"] == f"hyperparameters.{name}"
    assert setting in error["message"] and bound in error["message"], error
    assert api.http.get(f"/users/{user_id}/train/jobs", headers=headers).json()["data"] == []
    assert _queued_messages(live_server) == before


def test_hyperparameters_at_the_bounds_are_accepted(api: Api) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    body = {"hyperparameters": AT_BOUNDS}
    response = api.http.post(f"/users/{user_id}/train", json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["hyperparameters"]["lora_rank"] == 64


def test_server_defaults_outside_the_bounds_fail_at_start(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"TRAIN_DEFAULTS.*lora_rank.*VLLM_MAX_LORA_RANK"):
        make_settings(tmp_path, vllm_max_lora_rank=8)  # the engine's default rank is 16
    settings = make_settings(tmp_path, vllm_max_lora_rank=8, train_defaults={"lora_rank": 8})
    assert isinstance(settings, Settings)
