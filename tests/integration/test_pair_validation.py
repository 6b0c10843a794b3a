"""One pair validator behind every way a pair comes in: `POST /users/<id>/feedback` (real HTTP),
`bapo import-user` (against Postgres) and `bapo train` (the real command) refuse the same bad
pairs with the same message, and store nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.services.operations import EXPORT_FORMAT, EXPORT_VERSION
from tests.support import Api, assert_error
from tests.worker_support import operator_env, run_bapo

BAD_PAIRS: dict[str, dict[str, Any]] = {
    "blank prompt": {"prompt": " \n\t", "chosen": "Yes.", "rejected": "No."},
    "blank chosen": {"prompt": "Hi?", "chosen": "   ", "rejected": "No."},
    "NUL byte": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "a\0"},
        ],
        "chosen": "Yes.",
        "rejected": "No.",
    },
    "chosen == rejected after strip": {"prompt": "Hi?", "chosen": "Same.", "rejected": " Same.\n"},
    "over-length": {"prompt": "Hi?", "chosen": "Yes.", "rejected": "n" * 8001},
    "last turn not the user's": {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "chosen": "Yes.",
        "rejected": "No.",
    },
}


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The operator CLI's settings: a fresh migrated Postgres database (default input limits)."""
    with operator_env(tmp_path_factory.mktemp("cli")) as env:
        yield env


def _api_message(api: Api, body: dict[str, Any]) -> str:
    """The message of the API's 422 for this feedback body (which stores nothing)."""
    user_id, headers = api.create_user()
    response = api.http.post(f"/users/{user_id}/feedback", json=body, headers=headers)
    message = str(assert_error(response, 422)["message"])
    listed = api.http.get(f"/users/{user_id}/feedback", headers=headers).json()
    assert listed["data"] == []
    return message


def _import_error(env: dict[str, str], tmp_path: Path, pair: dict[str, Any]) -> str:
    """`bapo import-user`'s stderr for an export holding this pair; no user is created."""
    document = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "user": {"id": "imp"}}
    path = tmp_path / "export.json"
    path.write_text(json.dumps({**document, "pairs": [pair]}))
    done = run_bapo(env, "import-user", "--file", str(path), ok=False)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert "imp" not in [row["id"] for row in run_bapo(env, "list-users", "--json")]
    return str(done.stderr)


def _train_error(env: dict[str, str], tmp_path: Path, pair: dict[str, Any]) -> tuple[Path, str]:
    """(pairs file, `bapo train`'s stderr) for a pairs file holding this pair; nothing written."""
    path, out = tmp_path / "pairs.jsonl", tmp_path / "adapter"
    path.write_text(json.dumps(pair) + "\n")
    done = run_bapo(env, "train", "--pairs", str(path), "--out", str(out), ok=False)
    assert done.returncode == 2 and done.stdout == "" and not out.exists(), done.stderr
    return path, str(done.stderr)


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_every_way_in_refuses_a_bad_pair_with_one_message(
    api: Api, cli_env: dict[str, str], tmp_path: Path, case: str
) -> None:
    pair = BAD_PAIRS[case]
    alone = _api_message(api, pair)  # e.g. "prompt: must not be empty"
    in_batch = _api_message(api, {"pairs": [pair]})
    assert in_batch == f"pairs.0.{alone}"
    assert _import_error(cli_env, tmp_path, pair) == f"bapo import-user: error: {in_batch}\n"
    pairs_file, stderr = _train_error(cli_env, tmp_path, pair)
    assert stderr == f"bapo train: error: {pairs_file}:1: {alone}\n"


def test_a_good_pair_passes_every_way_in(api: Api, cli_env: dict[str, str], tmp_path: Path) -> None:
    """The counterpart: the API and import-user take the pair once what was wrong is fixed
    (`bapo train` trains on good pairs in tests/unit/training/test_cli.py)."""
    pair = {**BAD_PAIRS["chosen == rejected after strip"], "rejected": "Different."}
    user_id, headers = api.create_user()
    response = api.http.post(f"/users/{user_id}/feedback", json=pair, headers=headers)
    assert response.status_code == 201, response.text
    path = tmp_path / "export.json"
    document = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "user": {"id": "good"}}
    path.write_text(json.dumps({**document, "pairs": [pair]}))
    imported = run_bapo(
        cli_env, "import-user", "--file", str(path), "--id", f"good-{uuid.uuid4().hex[:8]}"
    )
    assert imported["pairs"] == 1
