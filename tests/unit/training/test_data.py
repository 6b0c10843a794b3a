"""Pairs, chat-template tokenization, truncation policy and collation (tokenizer only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from foundation.pairs import Pair, PairError
from worker.training.data import (
    collate,
    encode_pair,
    encode_prompt,
    encode_response,
    load_pairs_jsonl,
)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{good}\n\n{good}\n{{not json\n")
    with pytest.raises(PairError, match=r"pairs.jsonl:4: invalid JSON"):
        load_pairs_jsonl(path)
    path.write_text(f"{good}\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(PairError, match=r"pairs.jsonl:2: 'rejected'"):
        load_pairs_jsonl(path)
    path.write_text("\n \n")
    with pytest.raises(PairError, match="no pairs"):
        load_pairs_jsonl(path)
    path.write_text(f"{good}\n{good}\n")
    assert len(load_pairs_jsonl(path)) == 2


def test_prompt_plus_response_is_the_templated_conversation(gguf_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = encode_prompt(gguf_tokenizer, messages, 512)
    response = encode_response(gguf_tokenizer, messages, "Paris, of course.", 64)
    full = gguf_tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "Paris, of course."}], tokenize=False
    )
    assert prompt + response == _ids(gguf_tokenizer, full)
    assert response[-2] == gguf_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_long_history_drops_oldest_turns_and_keeps_system(gguf_tokenizer: Any) -> None:
    system = {"role": "system", "content": "SYSTEM-RULES"}
    old = [
        {"role": "user", "content": "old question " * 30},
        {"role": "assistant", "content": "old answer " * 30},
    ]
    recent = [{"role": "user", "content": "The latest question?"}]
    limit = len(encode_prompt(gguf_tokenizer, [system, *recent], 10_000)) + 5
    ids = encode_prompt(gguf_tokenizer, [system, *old, *recent], limit)
    text = gguf_tokenizer.decode(ids)
    assert len(ids) <= limit
    assert "SYSTEM-RULES" in text and "The latest question?" in text and "old" not in text
    assert text.endswith("<|im_start|>assistant\n")


def test_overlong_single_turn_keeps_its_end(gguf_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "word " * 200 + "FINAL-BIT"}]
    ids = encode_prompt(gguf_tokenizer, messages, 16)
    assert len(ids) == 16
    full = encode_prompt(gguf_tokenizer, messages, 10_000)
    assert ids == full[-16:]
    assert "FINAL-BIT" in gguf_tokenizer.decode(ids)


def test_responses_are_cut_on_the_right_but_never_emptied(gguf_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    text = "Once upon a time " * 20
    full = encode_response(gguf_tokenizer, messages, text, 10_000)
    assert encode_response(gguf_tokenizer, messages, text, 8) == full[:8]
    assert len(encode_response(gguf_tokenizer, messages, "x", 1)) == 1
    pair = Pair(messages, text, "No.")
    encoded = encode_pair(gguf_tokenizer, pair, 64, 8, base_response="")
    assert len(encoded.chosen) == 8 and len(encoded.rejected) >= 1
    assert encoded.base is not None and len(encoded.base) >= 1  # empty answer: end-of-turn stays


def test_collate_pads_right_and_masks_only_response_tokens() -> None:
    batch = collate([([1, 2, 3], [4, 5]), ([6], [7])], pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.response_mask.tolist() == [
        [False, False, False, True, True],
        [False, True, False, False, False],
    ]
    assert batch.num_tokens == 7
