"""The one preference-pair type, its validator and the prompt hash (foundation.pairs)."""

from __future__ import annotations

from typing import Any

import pytest

from foundation.pairs import (
    Pair,
    PairError,
    PairFields,
    PairLimits,
    check_pair,
    pair_from_dict,
    prompt_hash,
)


def test_prompt_and_messages_forms() -> None:
    pair = pair_from_dict({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."})
    assert pair == Pair([{"role": "user", "content": "Hi?"}], "Hello!", "Go away.")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert pair_from_dict({"messages": turns, "chosen": "a", "rejected": "b"}).messages == turns
    with_metadata = {"prompt": "p", "chosen": "a", "rejected": "b", "metadata": {"k": 1}}
    assert pair_from_dict(with_metadata).metadata == {"k": 1}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"chosen": "a", "rejected": "b"}, "exactly one of"),
        ({"prompt": "p", "messages": [], "chosen": "a", "rejected": "b"}, "exactly one of"),
        ({"prompt": "p", "rejected": "b"}, "'chosen'"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "chosen: must not be empty"),
        ({"prompt": " \n", "chosen": "a", "rejected": "b"}, "prompt: must not be empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "p", "chosen": "same", "rejected": " same "}, "identical"),
        ({"prompt": "p\x00", "chosen": "a", "rejected": "b"}, "prompt: must not contain NUL"),
        ({"prompt": "p", "chosen": "a" * 8001, "rejected": "b"}, "chosen: longer than 8000"),
        ({"prompt": "\ud800", "chosen": "a", "rejected": "b"}, "prompt: not valid Unicode"),
        (
            {"messages": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "messages: the last message must be a user turn",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}] * 65, "chosen": "a", "rejected": "b"},
            "messages: at most 64 messages",
        ),
        (
            {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "x"}],
             "chosen": "a", "rejected": "b"},
            "messages.0.content: must not be empty",
        ),
        ({"messages": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "role"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "metadata": [1]}, "'metadata'"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "metadata": {"k": "v" * 5000}},
         "metadata: larger than 4096 bytes"),
        ([1, 2], "JSON object"),
    ],
)  # fmt: skip
def test_bad_pairs_are_refused(data: Any, message: str) -> None:
    with pytest.raises(PairError, match=message):
        pair_from_dict(data)


def test_errors_carry_a_code_and_the_field_as_the_input_names_it() -> None:
    pair = Pair([{"role": "user", "content": "q"}], "a", "a")
    fields = PairFields("input.messages", "preferred_output", "non_preferred_output")
    with pytest.raises(PairError) as refused:
        check_pair(pair, PairLimits(), fields.under("pairs.2."))
    assert str(refused.value) == "pairs.2.preferred_output: chosen and rejected are identical"
    assert (refused.value.code, refused.value.field) == (
        "identical_responses",
        "pairs.2.preferred_output",
    )
    with pytest.raises(PairError, match=r"^pairs\.1: a pair must be a JSON object$"):
        pair_from_dict("text", where="pairs.1.")


def test_limits_are_the_callers() -> None:
    pair = Pair([{"role": "user", "content": "q" * 20}], "a", "b")
    assert check_pair(pair, PairLimits()) is pair
    with pytest.raises(PairError, match=r"messages\.0\.content: longer than 10 characters"):
        check_pair(pair, PairLimits(max_text_chars=10))


def test_prompt_hash_is_the_canonical_json_of_the_turns() -> None:
    turns = [{"role": "user", "content": "Hi"}]
    assert prompt_hash(turns) == prompt_hash([{"content": "Hi", "role": "user"}])
    assert prompt_hash(turns) != prompt_hash([{"role": "user", "content": "Hi!"}])
    # the value stored in preference_pairs.prompt_hash since the first migration
    assert prompt_hash(turns) == "557f6d9586f57ae72d24a7d34f47ed219efecbc197894dfead83851aaa02e87f"


OPENAI_LINE = {
    "input": {
        "messages": [{"role": "user", "content": "How cold is it?"}],
        "tools": [],
        "parallel_tool_calls": True,
    },
    "preferred_output": [{"role": "assistant", "content": "About 14°C."}],
    "non_preferred_output": [{"role": "assistant", "content": "Cold."}],
}
SKY = [{"role": "user", "content": "Sky?"}]
BLUE = [{"role": "assistant", "content": "Blue."}]
GREEN = [{"role": "assistant", "content": "Green."}]


def _text(*texts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": t} for t in texts]


def test_openai_preference_lines_developer_turns_and_text_parts() -> None:
    assert pair_from_dict(OPENAI_LINE) == Pair(
        [{"role": "user", "content": "How cold is it?"}], "About 14°C.", "Cold."
    )
    developer = {"role": "developer", "content": "Be brief."}
    turns = [developer, {"role": "user", "content": _text("a", "b")}]
    parts = {**OPENAI_LINE, "input": {"messages": turns}}
    assert pair_from_dict(parts).messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
    ]


def test_trl_conversational_and_implicit_prompt_forms() -> None:
    expected = Pair(SKY, "Blue.", "Green.")
    assert pair_from_dict({"prompt": SKY, "chosen": BLUE, "rejected": GREEN}) == expected
    assert pair_from_dict({"chosen": SKY + BLUE, "rejected": SKY + GREEN}) == expected
    blank = [{"role": "user", "content": " "}]
    with pytest.raises(PairError, match=r"^prompt\.0\.content: must not be empty$"):
        pair_from_dict({"prompt": blank, "chosen": BLUE, "rejected": GREEN})
    sea = [{"role": "user", "content": "Sea?"}]
    with pytest.raises(PairError, match="same turns") as refused:
        pair_from_dict({"chosen": SKY + BLUE, "rejected": sea + GREEN})
    assert refused.value.code == "prompt_mismatch"


USER_Q = {"role": "user", "content": "q"}
TOOL_CALL = {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}
IMAGE = {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}


@pytest.mark.parametrize(
    ("change", "message", "code"),
    [
        ({"input": {"messages": [USER_Q], "tools": [{"type": "function"}]}},
         r"^input\.tools: tool definitions cannot be trained on", "tools_unsupported"),
        ({"preferred_output": [TOOL_CALL]},
         r"^preferred_output\.0: tool calls and tool results cannot be", "tools_unsupported"),
        ({"input": {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c"}]}},
         r"^input\.messages\.0: tool calls", "tools_unsupported"),
        ({"input": {"messages": [IMAGE]}},
         r"^input\.messages\.0\.content\.0: only text parts can be trained on \(got type "
         r"'image_url'\)", "unsupported_content"),
        ({"non_preferred_output": [USER_Q]},
         r"^non_preferred_output\.0\.role: must be 'assistant'", "invalid_role"),
        ({"preferred_output": []}, r"^preferred_output: must be a list of exactly one",
         "invalid_pair"),
    ],
)  # fmt: skip
def test_what_cannot_be_trained_on_is_refused_by_name(
    change: dict[str, Any], message: str, code: str
) -> None:
    with pytest.raises(PairError, match=message) as refused:
        pair_from_dict({**OPENAI_LINE, **change})
    assert refused.value.code == code
