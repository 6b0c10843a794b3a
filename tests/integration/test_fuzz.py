"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis + hypothesis).

Every operation gets valid and invalid generated requests, sent with a real key to a live server:
no 5xx, status codes, content types and bodies as documented, every 4xx in the one error shape.
Generate, chat and train are left out here (each would run the model or queue a job on a
broker); `test_hostile_input.py` covers their refusals with targeted cases.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support import Api, LiveServer, make_settings

EXCLUDED = {
    ("POST", "/users/{user_id}/generate"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/users/{user_id}/train"),
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 12
PAIR = {"prompt": "p", "chosen": "good", "rejected": "bad"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A SQLite server with no rate limits, and a user with a few pairs to hit."""
    data_dir = tmp_path_factory.mktemp("fuzz")
    server = LiveServer(
        make_settings(data_dir, rate_limit_generate_per_min=0, rate_limit_train_per_hour=0)
    ).start()
    yield server
    server.stop()


def _operations(server: LiveServer) -> list[Any]:
    schema = schemathesis.openapi.from_dict(server.app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    return [op for op in operations if (op.method.upper(), op.path) not in EXCLUDED]


def _check_error_shape(response: Any) -> None:
    if 400 <= response.status_code < 600:
        body = response.json()
        assert set(body) == {"error"}, body
        assert {"type", "message", "code"} <= set(body["error"]), body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def _fuzz(operation: Any, base_url: str, auth: dict[str, str], user_id: str | None) -> int:
    """Run up to MAX_EXAMPLES valid and invalid cases against one operation; how many ran."""
    statuses: list[int] = []
    names = {p.name for p in operation.path_parameters}
    pinned = {"user_id": user_id} if user_id and "user_id" in names else None
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=pinned)

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            response = case.call(base_url=base_url, headers=auth, timeout=30)
            case.validate_response(response, checks=CHECKS)
            _check_error_shape(response)
            statuses.append(response.status_code)

        try:
            run()
        except Unsatisfiable:
            # Nothing to make invalid (no parameters, no body): only the valid pass applies.
            assert mode is GenerationMode.NEGATIVE, operation.path
    return len(statuses)


def test_fuzz_every_operation_with_the_operator_key(fuzz_server: LiveServer) -> None:
    api = Api(fuzz_server.url)
    try:
        operations = _operations(fuzz_server)
        assert len(operations) >= 15
        ran = sum(_fuzz(op, fuzz_server.url, api.operator, user_id=None) for op in operations)
        print(f"fuzz (operator key): {ran} cases over {len(operations)} operations")
        assert ran >= 10 * len(operations)
    finally:
        api.close()


def test_fuzz_every_operation_with_a_user_key(fuzz_server: LiveServer) -> None:
    api = Api(fuzz_server.url)
    try:
        user_id, auth = api.create_user("fuzz_user")
        for _ in range(3):
            assert api.http.post(f"/users/{user_id}/feedback", json=PAIR, headers=auth).is_success
        operations = [
            op
            for op in _operations(fuzz_server)
            # deleting the user would revoke the key under test; the operator pass covers it
            if (op.method.upper(), op.path) != ("DELETE", "/users/{user_id}")
        ]
        ran = sum(_fuzz(op, fuzz_server.url, auth, user_id=user_id) for op in operations)
        print(f"fuzz (user key): {ran} cases over {len(operations)} operations")
        assert ran >= 10 * len(operations)
    finally:
        api.close()
