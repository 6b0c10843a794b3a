"""Preference pairs → token ids: chat template, truncation policy, collation with a response mask.

Truncation policy (applied the same way to training, reference scoring and evaluation):

* The prompt (the templated chat up to and including the assistant header) keeps its most recent
  part: whole earliest turns are dropped first (a leading system message is kept), and if the last
  user turn alone is still longer than `max_prompt_tokens`, the token ids are cut from the left.
* A response is cut from the right to `max_response_tokens` (its end-of-turn tokens go first).
  A response always keeps at least one token, so no pair is ever silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from foundation.pairs import Messages, Pair, PairError, pair_from_dict

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass
class Batch:
    """Right-padded rows of prompt + response ids; `response_mask` is 1 on response tokens only."""

    input_ids: torch.Tensor  # [N, T] long
    attention_mask: torch.Tensor  # [N, T] long
    response_mask: torch.Tensor  # [N, T] bool

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device`."""
        tensors = (self.input_ids, self.attention_mask, self.response_mask)
        return Batch(*(t.to(device) for t in tensors))

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens in the batch."""
        return int(self.attention_mask.sum())


def load_pairs_jsonl(path: Path) -> list[Pair]:
    """Read one pair per line (blank lines skipped), checked like the API checks them (default
    limits); errors name the line number."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PairError(f"cannot read {path}: {exc}") from exc
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            pairs.append(pair_from_dict(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise PairError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        except PairError as exc:
            raise PairError(f"{path}:{number}: {exc}", exc.code, exc.field) from exc
    if not pairs:
        raise PairError(f"{path}: no pairs")
    return pairs


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, max_prompt_tokens: int
) -> list[int]:
    """Prompt ids (chat template + assistant header), truncated from the left (see module doc)."""
    for start in _turn_starts(messages):
        kept = messages[start:]
        if messages[0]["role"] == "system":
            kept = messages[:1] + kept
        ids = _ids(tokenizer, render_prompt(tokenizer, kept))
        if len(ids) <= max_prompt_tokens:
            return ids
    return ids[-max_prompt_tokens:]


def _turn_starts(messages: Messages) -> list[int]:
    """Indices where a kept suffix of the conversation may start (user turns, oldest first)."""
    first = 1 if messages[0]["role"] == "system" else 0
    starts = [i for i in range(first, len(messages)) if messages[i]["role"] == "user"]
    return starts or [len(messages) - 1]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    """The templated conversation with the assistant header appended."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


def encode_response(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    response: str,
    max_response_tokens: int,
) -> list[int]:
    """Response ids as the template writes an assistant turn (with end of turn), cut at the end."""
    messages = messages[-1:]  # the response's tokens depend only on the turn it answers
    prompt_text = render_prompt(tokenizer, messages)
    full_text = str(
        tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
    )
    if full_text.startswith(prompt_text):
        prompt_ids, full_ids = _ids(tokenizer, prompt_text), _ids(tokenizer, full_text)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            ids = full_ids[len(prompt_ids) :]
        else:  # token boundary merges across prompt/response: tokenize the response part alone
            ids = _ids(tokenizer, full_text[len(prompt_text) :])
    else:  # a template that rewrites history: fall back to response + eos
        ids = _ids(tokenizer, response + (tokenizer.eos_token or ""))
    return (ids or _ids(tokenizer, response))[:max_response_tokens]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of already-templated text (the template carries its own special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def collate(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> Batch:
    """Right-pad (prompt ids, response ids) rows to the longest row (dynamic padding)."""
    import torch

    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        length = len(prompt) + len(response)
        input_ids[i, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, :length] = 1
        response_mask[i, len(prompt) : length] = True
    return Batch(input_ids, attention_mask, response_mask)


@dataclass
class EncodedPair:
    """Token ids of a pair (truncated prompt and responses) and, once known, its ref log-probs."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    base: list[int] | None = None
    ref_logps: tuple[float, float, float] | None = None  # log πref of (chosen, rejected, base)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    pair: Pair,
    max_prompt_tokens: int,
    max_response_tokens: int,
    base_response: str | None = None,
    *,
    base_ids: list[int] | None = None,
) -> EncodedPair:
    """Encode a pair (and optionally its base answer) under the truncation policy.

    The base answer is given as a text (encoded like chosen/rejected) or, as the engine does, as
    the token ids the base model generated (`base_ids`, kept as they are, cut at the end).
    """

    def response(text: str) -> list[int]:
        return encode_response(tokenizer, pair.messages, text, max_response_tokens)

    base = None if base_response is None else response(base_response)
    if base_ids is not None:
        base = base_ids[:max_response_tokens] or base_ids[:1]
    return EncodedPair(
        prompt=encode_prompt(tokenizer, pair.messages, max_prompt_tokens),
        chosen=response(pair.chosen),
        rejected=response(pair.rejected),
        base=base,
    )
