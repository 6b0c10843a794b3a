"""Preference pairs → token ids: chat template, truncation policy, collation with a response mask.

Truncation policy (applied the same way to training, reference scoring and evaluation):

* The prompt (the templated chat up to and including the assistant header) keeps its most recent
  part: whole earliest turns are dropped first (a leading system message is kept), and if the last
  user turn alone is still longer than `max_prompt_tokens`, the token ids are cut from the left.
* A response is cut from the right to `max_response_tokens` (its end-of-turn tokens go first).
  A response always keeps at least one token, so no pair is ever silently dropped.

Two layouts reach the model. `collate` right-pads one (prompt, response) row per sequence: a pair's
prompt is forwarded once per response. `pack` writes a pair as ONE segment
`[prompt | response 1 | response 2 | ...]` in which each response attends to the prompt and to
itself only, with position ids restarting after the prompt, so every response sees exactly what
it sees in its own padded row; segments are first-fit packed into rows no wider than the longest
segment, and a 4-D mask keeps them apart.
"""

from __future__ import annotations

import dataclasses
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
class PackedBatch:
    """Pairs packed as segments (module doc): what the model forwards and where each score is.

    Scored position k predicts token `targets[k]` from the hidden state at flat index
    `predictors[k]` of the [rows, width] grid and belongs to sequence `sequences[k]` (numbered
    response-major: response r of pair i is sequence r · num_pairs + i, as `collate`'s rows are
    ordered in pair_logratios).
    """

    input_ids: torch.Tensor  # [R, W] long
    position_ids: torch.Tensor  # [R, W] long
    attention_mask: torch.Tensor  # [R, 1, W, W] bool, True = may attend
    predictors: torch.Tensor  # [K] long, flat index into R·W
    targets: torch.Tensor  # [K] long
    sequences: torch.Tensor  # [K] long
    num_sequences: int
    num_tokens: int  # real (non-padding) positions forwarded

    def to(self, device: torch.device) -> PackedBatch:
        """The same batch on `device`."""
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            predictors=self.predictors.to(device),
            targets=self.targets.to(device),
            sequences=self.sequences.to(device),
        )

    @property
    def num_positions(self) -> int:
        """Positions forwarded, padding included."""
        return int(self.input_ids.numel())


def pack(groups: list[tuple[list[int], list[list[int]]]], pad_token_id: int) -> PackedBatch:
    """Pack (prompt ids, [response ids, ...]) groups, each group one segment (module doc).

    Every group must have the same number of responses, each at least one token long.
    """
    import torch

    kinds = len(groups[0][1])
    if any(len(responses) != kinds for _, responses in groups):
        raise ValueError("every group needs the same number of responses")
    if any(not response for _, responses in groups for response in responses):
        raise ValueError("a response needs at least one token")
    lengths = [len(prompt) + sum(map(len, responses)) for prompt, responses in groups]
    rows = _first_fit(lengths)
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    # segment id per position (padding gets its own id per position: it attends to itself only)
    # and part id (0 = the prompt, r + 1 = response r): j is visible from i when both share the
    # segment, j <= i, and j is in the prompt or in i's own part.
    segment = -1 - torch.arange(len(rows) * width).view(len(rows), width)
    part = torch.zeros((len(rows), width), dtype=torch.long)
    predictors, targets, sequences = [], [], []
    for r, members in enumerate(rows):
        offset = 0
        for g in members:
            prompt, responses = groups[g]
            start = offset
            ids[r, offset : offset + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            positions[r, offset : offset + len(prompt)] = torch.arange(len(prompt))
            offset += len(prompt)
            for k, response in enumerate(responses):
                n = len(response)
                ids[r, offset : offset + n] = torch.tensor(response, dtype=torch.long)
                positions[r, offset : offset + n] = torch.arange(len(prompt), len(prompt) + n)
                part[r, offset : offset + n] = k + 1
                # the first token is predicted by the prompt's last position, the rest by the
                # previous token of the same response
                flat = r * width + offset
                predictors.append([r * width + start + len(prompt) - 1])
                predictors.append(list(range(flat, flat + n - 1)))
                targets.append(response)
                sequences.append([k * len(groups) + g] * n)
                offset += n
            segment[r, start:offset] = g
    index = torch.arange(width)
    causal = index.view(1, width, 1) >= index.view(1, 1, width)  # [1, W(i), W(j)]
    same_segment = segment.unsqueeze(2) == segment.unsqueeze(1)
    visible_part = (part.unsqueeze(1) == 0) | (part.unsqueeze(2) == part.unsqueeze(1))
    mask = (causal & same_segment & visible_part).unsqueeze(1)
    return PackedBatch(
        input_ids=ids,
        position_ids=positions,
        attention_mask=mask,
        predictors=torch.tensor([i for chunk in predictors for i in chunk], dtype=torch.long),
        targets=torch.tensor([t for chunk in targets for t in chunk], dtype=torch.long),
        sequences=torch.tensor([s for chunk in sequences for s in chunk], dtype=torch.long),
        num_sequences=kinds * len(groups),
        num_tokens=sum(lengths),
    )


def _first_fit(lengths: list[int]) -> list[list[int]]:
    """Group indices into rows no longer than the longest one (first fit, longest first)."""
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


@dataclass
class EncodedPair:
    """Token ids of a pair (truncated prompt and responses) and, once known, its ref log-probs."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    base: list[int] | None = None
    ref_logps: tuple[float, ...] | None = None  # log πref of (chosen, rejected[, base])


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
