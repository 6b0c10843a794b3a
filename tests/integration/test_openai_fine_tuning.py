"""OpenAI's fine-tuning jobs API (`/v1/fine_tuning/jobs`) through the official `openai` client.

Without a worker (Postgres and SQLite, jobs stay queued): create, list with its cursor, retrieve,
cancel, events, checkpoints, and every refusal as the SDK's typed exception after one request
(none retried), changing nothing. With real Celery workers on Postgres + Redis: a tiny DPO job
created through the SDK trains, its version answers `chat.completions` on the local backend, and
the same job reads the same through `/users/{id}/train/jobs`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.fine_tuning import FineTuningJob

from tests.integration.openai_client_checks import RequestLog
from tests.support import Api
from tests.worker_support import JOB_TIMEOUT_S, Stack, job_stack, post_pairs, wait_for

DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}}
ENDED = {"succeeded", "failed", "cancelled"}


@dataclass
class Caller:
    """One API key as the SDK sees it, counting its requests."""

    base_url: str
    key: str
    requests: RequestLog = field(default_factory=RequestLog)

    def client(self) -> openai.OpenAI:
        """The official client on our /v1, with the SDK's default retries (2)."""
        http = openai.DefaultHttpxClient(event_hooks={"request": [self.requests]})
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.key, http_client=http)


def caller(api: Api, headers: dict[str, str]) -> Caller:
    return Caller(str(api.http.base_url).rstrip("/"), headers["Authorization"].split(" ", 1)[1])


def create(client: openai.OpenAI, user_id: str, **fields: Any) -> FineTuningJob:
    """jobs.create on the user's stored pairs (the SDK requires `training_file`: omit it)."""
    return client.fine_tuning.jobs.create(
        model=f"user:{user_id}", training_file=openai.omit, **fields
    )


def stored_jobs(api: Api, user_id: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = api.http.get(f"/users/{user_id}/train/jobs", headers=headers)
    assert response.status_code == 200, response.text
    jobs: list[dict[str, Any]] = response.json()["data"]
    return jobs


# --- without a worker -----------------------------------------------------------------------------


def test_create_retrieve_list_cancel(api: Api) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    me = caller(api, headers)
    client = me.client()
    bapo = {"type": "bapo", "bapo": {"hyperparameters": {"anchor_weight": 0.5, "batch_size": 2}}}
    job = create(client, user_id, method=bapo, seed=7, metadata={"team": "search"})
    assert (job.object, job.status, job.model) == ("fine_tuning.job", "queued", f"user:{user_id}")
    assert job.id.startswith("job_") and job.fine_tuned_model is None and job.error is None
    assert job.seed == 7 and job.metadata == {"team": "search"} and job.result_files == []
    assert job.organization_id == user_id and job.finished_at is None
    assert isinstance(job.created_at, int) and job.trained_tokens is None
    assert job.method is not None and job.method.type == "bapo"
    options = job.method.model_extra["bapo"]["hyperparameters"]
    assert options["anchor_weight"] == 0.5 and options["batch_size"] == 2
    assert options["learning_rate_multiplier"] == 1.0 and options["beta"] == 0.1
    assert job.hyperparameters.batch_size == 2

    same = api.http.get(f"/users/{user_id}/train/jobs/{job.id}", headers=headers).json()
    assert same["status"] == "queued" and same["method"] == "bapo"
    assert same["hyperparameters"]["anchor_weight"] == 0.5 and same["hyperparameters"]["seed"] == 7
    assert client.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()

    events = client.fine_tuning.jobs.list_events(job.id)
    assert [(e.object, e.level, e.type) for e in events.data] == [
        ("fine_tuning.job.event", "info", "message")
    ]
    assert events.data[0].message == "job created (4 pairs)" and events.has_more is False
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert client.fine_tuning.jobs.list_events(job.id).data[0].message == "cancelled while queued"
    assert stored_jobs(api, user_id, headers)[0]["status"] == "cancelled"


def test_list_filters_by_metadata_as_openai_documents(api: Api) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    client = caller(api, headers).client()
    tagged = {}
    for meta in ({"team": "search", "run": "a"}, {"team": "search", "run": "b"}, {"team": "ads"}):
        tagged[meta.get("run", "ads")] = create(client, user_id, metadata=meta).id
        client.fine_tuning.jobs.cancel(tagged[meta.get("run", "ads")])
    plain = create(client, user_id).id
    client.fine_tuning.jobs.cancel(plain)

    def listed(**query: Any) -> list[str]:
        return [j.id for j in client.fine_tuning.jobs.list(**query)]

    assert listed(metadata={"team": "search"}) == [tagged["b"], tagged["a"]]
    assert listed(metadata={"team": "search", "run": "a"}) == [tagged["a"]]
    assert listed(metadata={"team": "nobody"}) == []
    assert listed(metadata={}) == [plain, tagged["ads"], tagged["b"], tagged["a"]]
    page = client.fine_tuning.jobs.list(metadata={"team": "search"}, limit=1)
    assert [j.id for j in page.data] == [tagged["b"]] and page.has_more is True
    assert listed(extra_query={"metadata": "null"}) == [plain]  # jobs without metadata
    for query in ({"metadata": "x"}, {"metadata": "null", "metadata[team]": "ads"}):
        response = api.http.get("/v1/fine_tuning/jobs", params=query, headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "metadata"


def test_list_pages_with_after_newest_first(api: Api) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    client = caller(api, headers).client()
    ids = []
    for _ in range(3):
        ids.append(create(client, user_id).id)
        client.fine_tuning.jobs.cancel(ids[-1])
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == ids[:0:-1] and first.has_more is True
    assert first.object == "list"
    rest = client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in rest.data] == [ids[0]] and rest.has_more is False
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == ids[::-1]  # auto-paging

    _, other_headers = api.create_user()
    assert list(caller(api, other_headers).client().fine_tuning.jobs.list()) == []
    operator = Caller(caller(api, headers).base_url, api.operator["Authorization"].split()[1])
    assert {j.id for j in operator.client().fine_tuning.jobs.list()} == set(ids)


def test_second_job_is_a_conflict_not_retried(api: Api) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    me = caller(api, headers)
    client = me.client()
    job = create(client, user_id)
    before = len(me.requests.sent)
    with pytest.raises(openai.ConflictError) as caught:
        create(client, user_id, method=DPO)
    assert len(me.requests.sent) == before + 1
    assert caught.value.code == "job_already_active" and job.id in caught.value.message
    assert [j["id"] for j in stored_jobs(api, user_id, headers)] == [job.id]


BAD_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}}},
        "invalid_hyperparameters",
        "method.dpo.hyperparameters.n_epochs",
    ),
    (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": "2"}}}},
        "invalid_hyperparameters",
        "method.dpo.hyperparameters.n_epochs",
    ),
    (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}},
        "invalid_hyperparameters",
        "method.dpo.hyperparameters.beta",
    ),
    (
        {"method": {"type": "bapo", "bapo": {"hyperparameters": {"batch_size": 100000}}}},
        "invalid_hyperparameters",
        "method.bapo.hyperparameters.batch_size",
    ),
    (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"learning_rate_multiplier": 0}}}},
        "invalid_hyperparameters",
        "method.dpo.hyperparameters.learning_rate_multiplier",
    ),
    (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"anchor_weight": 1.0}}}},
        "unsupported_hyperparameter",
        "method.dpo.hyperparameters.anchor_weight",
    ),
    (
        {"method": {"type": "bapo", "bapo": {"hyperparameters": {"lora_rank": 8}}}},
        "unsupported_hyperparameter",
        "method.bapo.hyperparameters.lora_rank",
    ),
    ({"method": {"type": "supervised", "supervised": {}}}, "unsupported_method", "method.type"),
    ({"method": {"type": "dpo", "bapo": {}}}, "invalid_method", "method.bapo"),
    ({"seed": 2**40}, None, "seed"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, None, "metadata"),
    ({"suffix": "mine"}, "unsupported_parameter", "suffix"),
    ({"validation_file": "file-abc"}, "unsupported_parameter", "validation_file"),
    ({"hyperparameters": {"n_epochs": 2}}, "unsupported_parameter", "hyperparameters"),
]


@pytest.mark.parametrize(("change", "code", "param"), BAD_REQUESTS)
def test_bad_requests_are_400_not_retried_and_change_nothing(
    api: Api, change: dict[str, Any], code: str | None, param: str
) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers)
    me = caller(api, headers)
    with pytest.raises(openai.BadRequestError) as caught:
        me.client().fine_tuning.jobs.create(
            model=f"user:{user_id}", **{"training_file": openai.omit, **change}
        )
    assert len(me.requests.sent) == 1
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert code is None or caught.value.code == code
    assert error["message"].startswith(param), error
    assert stored_jobs(api, user_id, headers) == []


def pairs_file(count: int = 4) -> bytes:
    """A JSONL file of OpenAI's DPO lines."""
    lines = [
        {
            "input": {"messages": [{"role": "user", "content": f"Pick a fruit, {i}."}]},
            "preferred_output": [{"role": "assistant", "content": f"Arr, fruit {i}, matey!"}],
            "non_preferred_output": [{"role": "assistant", "content": f"The fruit is {i}."}],
        }
        for i in range(count)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def test_training_file_is_imported_once_then_trained_on(api: Api) -> None:
    user_id, headers = api.create_user()
    client = caller(api, headers).client()
    upload = client.files.create(file=("pairs.jsonl", pairs_file()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=f"user:{user_id}", training_file=upload.id)
    assert job.training_file == upload.id and job.status == "queued"
    stored = stored_jobs(api, user_id, headers)
    assert [(j["id"], j["pair_count"]) for j in stored] == [(job.id, 4)]
    client.fine_tuning.jobs.cancel(job.id)

    again = client.fine_tuning.jobs.create(model=f"user:{user_id}", training_file=upload.id)
    assert again.id != job.id and again.training_file == upload.id
    assert stored_jobs(api, user_id, headers)[0]["pair_count"] == 4  # imported once
    feedback = api.http.get(f"/users/{user_id}/feedback", headers=headers).json()["data"]
    assert len(feedback) == 4
    client.fine_tuning.jobs.cancel(again.id)

    active = create(client, user_id)  # a refusal after the import leaves nothing of it
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.create(
            model=f"user:{user_id}",
            training_file=client.files.create(
                file=("more.jsonl", pairs_file(6)), purpose="fine-tune"
            ).id,
        )
    assert len(api.http.get(f"/users/{user_id}/feedback", headers=headers).json()["data"]) == 4
    assert stored_jobs(api, user_id, headers)[0]["id"] == active.id


def test_training_file_unknown_or_someone_elses(api: Api) -> None:
    alice, alice_headers = api.create_user()
    bob, bob_headers = api.create_user()
    alice_client = caller(api, alice_headers).client()
    upload = alice_client.files.create(file=("pairs.jsonl", pairs_file()), purpose="fine-tune")
    bob_client = caller(api, bob_headers).client()
    with pytest.raises(openai.NotFoundError):
        bob_client.fine_tuning.jobs.create(model=f"user:{bob}", training_file="file-" + "0" * 24)
    with pytest.raises(openai.PermissionDeniedError):
        bob_client.fine_tuning.jobs.create(model=f"user:{bob}", training_file=upload.id)
    with pytest.raises(openai.BadRequestError) as caught:  # checked before anything is imported
        alice_client.fine_tuning.jobs.create(
            model=f"user:{alice}",
            training_file=upload.id,
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}},
        )
    assert caught.value.body["param"] == "method.dpo.hyperparameters.beta"
    for user_id, headers in ((alice, alice_headers), (bob, bob_headers)):
        assert stored_jobs(api, user_id, headers) == []
        assert api.http.get(f"/users/{user_id}/feedback", headers=headers).json()["data"] == []


def test_model_not_a_version_and_too_few_pairs(api: Api) -> None:
    user_id, headers = api.create_user()
    post_pairs(api.http, user_id, headers, count=3)
    client = caller(api, headers).client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model=f"user:{user_id}:v1", training_file=openai.omit)
    assert caught.value.code == "invalid_model"
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, user_id)
    assert caught.value.code == "not_enough_pairs" and "has 3" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file="file-x")
    assert stored_jobs(api, user_id, headers) == []


def test_typed_errors_each_after_one_request(api: Api) -> None:
    alice, alice_headers = api.create_user()
    bob, bob_headers = api.create_user()
    post_pairs(api.http, alice, alice_headers)
    job = create(caller(api, alice_headers).client(), alice)
    bob_caller = caller(api, bob_headers)
    client = bob_caller.client()
    stranger = Caller(bob_caller.base_url, "bapo_not-a-key")
    cases: list[tuple[type[openai.APIStatusError], Any]] = [
        (openai.NotFoundError, lambda: client.fine_tuning.jobs.retrieve("job_nope")),
        (openai.NotFoundError, lambda: client.fine_tuning.jobs.list_events("job_nope")),
        (openai.PermissionDeniedError, lambda: client.fine_tuning.jobs.retrieve(job.id)),
        (openai.PermissionDeniedError, lambda: client.fine_tuning.jobs.cancel(job.id)),
        (openai.PermissionDeniedError, lambda: client.fine_tuning.jobs.list_events(job.id)),
        (openai.PermissionDeniedError, lambda: client.fine_tuning.jobs.checkpoints.list(job.id)),
        (openai.PermissionDeniedError, lambda: create(client, alice)),
        (openai.AuthenticationError, lambda: stranger.client().fine_tuning.jobs.list()),
        (openai.BadRequestError, lambda: client.fine_tuning.jobs.list(after="job_nope")),
    ]
    for error_type, call in cases:
        before = len(bob_caller.requests.sent) + len(stranger.requests.sent)
        with pytest.raises(error_type):
            call()
        assert len(bob_caller.requests.sent) + len(stranger.requests.sent) == before + 1
    alice_jobs = stored_jobs(api, alice, alice_headers)
    assert [(j["id"], j["status"]) for j in alice_jobs] == [(job.id, "queued")]
    assert stored_jobs(api, bob, bob_headers) == []


# --- with real workers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole service on Postgres + Redis, with real worker processes and tiny trainings."""
    with job_stack(tmp_path_factory.mktemp("openai-ft-stack")) as stack:
        yield stack


@pytest.mark.slow
def test_a_job_created_with_the_sdk_trains_and_its_model_answers(stack: Stack) -> None:
    user_id, headers = stack.api.create_user("ft")
    post_pairs(stack.api.http, user_id, headers)
    me = caller(stack.api, headers)
    client = me.client()
    method = {
        "type": "dpo",
        "dpo": {"hyperparameters": {"beta": 0.2, "learning_rate_multiplier": 2}},
    }
    job = create(client, user_id, method=method, metadata={"run": "sdk"})
    assert job.status == "queued"
    first_events = client.fine_tuning.jobs.list_events(job.id).data
    assert "job created (4 pairs)" in [e.message for e in first_events]

    done = wait_for(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ENDED and j,
        JOB_TIMEOUT_S,
        f"job {job.id} to end",
        interval=1.0,
    )
    log = client.fine_tuning.jobs.list_events  # what the job went through, on a failure
    assert done.status == "succeeded", (done.error, [e.message for e in log(job.id, limit=50)])
    assert done.fine_tuned_model == f"user:{user_id}:v1" and done.error is None
    assert isinstance(done.trained_tokens, int) and done.trained_tokens > 0
    assert done.finished_at is not None and done.finished_at >= done.created_at
    assert done.metadata == {"run": "sdk"} and done.estimated_finish is None

    ours = stack.api.http.get(f"/users/{user_id}/train/jobs/{job.id}", headers=headers).json()
    assert ours["status"] == "succeeded" and ours["adapter_version"] == 1
    assert ours["method"] == "dpo" and ours["hyperparameters"]["beta"] == 0.2
    assert ours["hyperparameters"]["learning_rate"] == pytest.approx(2 * 5e-4)
    assert done.trained_tokens == ours["metrics"]["tokens_trained"]

    events = client.fine_tuning.jobs.list_events(job.id, limit=100)
    ids = [int(e.id) for e in events.data]
    assert ids == sorted(ids, reverse=True)  # newest first, as OpenAI lists them
    steps = [e for e in events.data if e.type == "metrics"]
    assert [e.data["step"] for e in steps] == [2, 1]
    assert all(isinstance(e.data["train_loss"], float) for e in steps)
    assert events.data[0].message == "job succeeded"

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [(c.fine_tuned_model_checkpoint, c.step_number) for c in checkpoints] == [
        (done.fine_tuned_model, 2)
    ]
    assert checkpoints[0].fine_tuning_job_id == job.id and checkpoints[0].metrics.step == 2

    answer = client.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": "Name a colour, 1."}],
        max_tokens=8,
        temperature=0,
    )
    assert answer.model == done.fine_tuned_model and answer.choices[0].message.content

    before = len(me.requests.sent)
    with pytest.raises(openai.ConflictError) as caught:
        client.fine_tuning.jobs.cancel(job.id)
    assert caught.value.code == "job_finished" and len(me.requests.sent) == before + 1


@pytest.mark.slow
def test_the_readme_loop_runs_as_written(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """README's openai-client script (upload pairs, fine-tune, chat), executed unchanged."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- openai-loop:begin")[1].split("<!-- openai-loop:end -->")[0]
    code = block.split("```python\n", 1)[1].rsplit("```", 1)[0]
    user_id, headers = stack.api.create_user("readme")
    key = headers["Authorization"].removeprefix("Bearer ")
    exec(compile(code, "README.md", "exec"), {"BASE": stack.api.http.base_url, "KEY": key,
                                               "USER": user_id})  # fmt: skip
    status, model, answer = capsys.readouterr().out.strip().split(" ", 2)
    assert (status, model) == ("succeeded", f"user:{user_id}:v1") and answer
