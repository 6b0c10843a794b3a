"""Settings validation and key handling."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.config import Settings
from app.core.errors import Forbidden, InvalidRequest
from app.core.security import Principal, generate_api_key, hash_key, keys_equal, validate_user_id


def test_placeholder_and_short_operator_keys_are_refused() -> None:
    for bad in ["changeme", "secret", "short"]:
        with pytest.raises(ValidationError):
            Settings(_env_file=None, operator_key=bad)


def test_defaults_are_embedded(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path.resolve()}/bapo.sqlite3"
    assert settings.broker_url.startswith("sqla+sqlite:///")
    assert settings.adapters_path == tmp_path / "adapters"
    assert settings.auto_migrate is True
    pg = Settings(
        _env_file=None,
        data_dir=tmp_path,
        database_url="postgresql+psycopg://x@h/db",
    )
    assert pg.auto_migrate is False


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_BATCH_PAIRS", "7")
    monkeypatch.setenv("INFERENCE_BACKEND", "vllm")
    settings = Settings(_env_file=None)
    assert settings.max_batch_pairs == 7 and settings.inference_backend == "vllm"
    monkeypatch.setenv("MAX_BATCH_PAIRS", "zero")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


def test_keys_are_random_and_hashed() -> None:
    a, b = generate_api_key(), generate_api_key()
    assert a != b and len(hash_key(a)) == 64 and hash_key(a) != a
    assert keys_equal(a, a) and not keys_equal(a, b)


def test_user_id_rules() -> None:
    assert validate_user_id("a.B_c-9") == "a.B_c-9"
    for bad in ["", ".", "..", "...", "a/b", "a b", "x" * 65]:
        with pytest.raises(InvalidRequest):
            validate_user_id(bad)


def test_principal_authorization() -> None:
    Principal(is_operator=True).authorize_user("anyone")
    Principal(is_operator=False, user_id="alice").authorize_user("alice")
    with pytest.raises(Forbidden):
        Principal(is_operator=False, user_id="alice").authorize_user("bob")
    with pytest.raises(Forbidden):
        Principal(is_operator=False, user_id="alice").require_operator()
