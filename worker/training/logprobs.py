"""Masked sequence log-probabilities: sum of log p(token | prefix) over response tokens only.

The vocabulary projection (lm_head) and the softmax are applied only at the positions that predict
a response token: the backbone's final hidden states are gathered there first. Prompt and padding
positions never get logits.

Training forwards a pair in the packed layout (worker.training.data.pack: the prompt once, each
response attending to it); reference scoring and generation-free evaluation use padded rows
sorted by length. Both give the same log-probs (tests/unit/training/test_packing.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from foundation.model import CausalLM, autocast
from worker.training.data import Batch, EncodedPair, PackedBatch, collate, pack
from worker.training.loss import BaseAnchor

T = TypeVar("T")


def backbone_and_head(model: CausalLM) -> tuple[CausalLM, CausalLM]:
    """The decoder stack and the output projection of a causal LM, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = inner.base_model  # transformers: the decoder (e.g. LlamaModel), LoRA layers injected
    head = inner.get_output_embeddings()
    if backbone is inner or head is None:
        raise TypeError(f"{type(inner).__name__} is not a causal LM with an output projection")
    return backbone, head


def sequence_logprobs(model: CausalLM, batch: Batch) -> torch.Tensor:
    """Σ_t log p(y_t | x, y_<t) over response tokens, per row.

    batch.input_ids [N, T], batch.attention_mask [N, T], batch.response_mask [N, T] (True on
    response tokens) → [N] float32. Position t's hidden state predicts token t+1, so the scored
    positions are response_mask[:, 1:]; only those K positions reach lm_head ([K, H] → [K, V]).
    """
    token_logps, rows = _token_logprobs(model, batch)
    totals = torch.zeros(batch.input_ids.shape[0], dtype=torch.float32, device=token_logps.device)
    return totals.index_add(0, rows, token_logps)


def _token_logprobs(model: CausalLM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t | x, y_<t) of every response token in row order [K], and each one's row [K]."""
    backbone, head = backbone_and_head(model)
    device = batch.input_ids.device
    with autocast(device):
        hidden = backbone(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state  # [N, T, H]
        scored = batch.response_mask[:, 1:]  # [N, T-1]
        states = hidden[:, :-1][scored]  # [K, H]
        targets = batch.input_ids[:, 1:][scored]  # [K]
        token_logps = head_logprobs(head, states, targets)  # [K]
    rows = torch.arange(scored.shape[0], device=device).unsqueeze(1).expand_as(scored)[scored]
    return token_logps, rows


def packed_logprobs(model: CausalLM, batch: PackedBatch) -> torch.Tensor:
    """Σ_t log p(y_t | x, y_<t) per sequence of a packed batch → [num_sequences] float32.

    One forward of the [R, W] grid under its 4-D mask and restarting position ids; only the K
    predicting positions reach lm_head.
    """
    backbone, head = backbone_and_head(model)
    device = batch.input_ids.device
    with autocast(device):
        hidden = backbone(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=_attention_mask(model, batch.attention_mask),
            use_cache=False,
        ).last_hidden_state  # [R, W, H]
        states = hidden.reshape(-1, hidden.shape[-1])[batch.predictors]  # [K, H]
        token_logps = head_logprobs(head, states, batch.targets)  # [K]
    totals = torch.zeros(batch.num_sequences, dtype=torch.float32, device=device)
    return totals.index_add(0, batch.sequences, token_logps)


# Above this many logits ([K, V] elements: 2^26 is 256 MiB in fp32) the head runs in chunks whose
# logits are recomputed in the backward pass instead of kept: with a 128k vocabulary, 8k scored
# positions would otherwise hold 4 GiB of logits (and as much again for their gradient).
HEAD_CHUNK_ELEMENTS = 1 << 26


def head_logprobs(
    head: torch.nn.Module,
    states: torch.Tensor,
    targets: torch.Tensor,
    max_elements: int = HEAD_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """log p(target | state) per scored position: lm_head, fp32 log-softmax, gather → [K].

    Chunked (and checkpointed while training) when K × V exceeds `max_elements`; the values and
    gradients are the same either way.
    """
    weight = getattr(head, "weight", None)
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 1
    chunk = max(1, max_elements // max(1, vocab))
    if states.shape[0] <= chunk:
        return _head_chunk(head, states, targets)
    parts = []
    for start in range(0, states.shape[0], chunk):
        piece = (head, states[start : start + chunk], targets[start : start + chunk])
        if torch.is_grad_enabled():
            parts.append(checkpoint(_head_chunk, *piece, use_reentrant=False))
        else:
            parts.append(_head_chunk(*piece))
    return torch.cat(parts)


def _head_chunk(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−cross-entropy of one chunk's logits (computed in fp32)."""
    logits = head(states).float()  # [k, V]
    return -F.cross_entropy(logits, targets, reduction="none")


def _attention_mask(model: CausalLM, allowed: torch.Tensor) -> torch.Tensor:
    """The 4-D mask as the model's attention wants it: boolean for SDPA (and flex's fallback),
    additive float (0 / dtype min) for eager attention. transformers passes a 4-D mask through
    as it is."""
    if getattr(model.config, "_attn_implementation", "sdpa") != "eager":
        return allowed
    dtype = next(model.parameters()).dtype
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)


def score_sequences(
    model: CausalLM,
    rows: list[tuple[list[int], list[int]]],
    pad_token_id: int,
    batch_size: int,
) -> list[float]:
    """Sequence log-probs of (prompt ids, response ids) rows, without gradients, in input order."""
    scores = [0.0] * len(rows)
    with torch.no_grad():
        for chunk, batch in _length_sorted_batches(model, rows, pad_token_id, batch_size):
            for i, value in zip(chunk, sequence_logprobs(model, batch).tolist(), strict=True):
                scores[i] = value
    return scores


def score_tokens(
    model: CausalLM,
    rows: list[tuple[list[int], list[int]]],
    pad_token_id: int,
    batch_size: int,
) -> list[list[float]]:
    """Per-token log-probs of each row's response ids, without gradients, in input order."""
    scores: list[list[float]] = [[] for _ in rows]
    with torch.no_grad():
        for chunk, batch in _length_sorted_batches(model, rows, pad_token_id, batch_size):
            token_logps, row_of = _token_logprobs(model, batch)
            for value, row in zip(token_logps.tolist(), row_of.tolist(), strict=True):
                scores[chunk[row]].append(value)
    return scores


def _length_sorted_batches(
    model: CausalLM,
    rows: list[tuple[list[int], list[int]]],
    pad_token_id: int,
    batch_size: int,
) -> Iterator[tuple[list[int], Batch]]:
    """(row indices, their collated batch on the model's device), shortest rows first.

    Rows of similar length share a batch, so little of each batch is padding.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, collate([rows[i] for i in chunk], pad_token_id).to(device)


class PairLogratios(NamedTuple):
    """h = log πθ − log πref per pair, and what the forward cost."""

    chosen: torch.Tensor  # [B]
    rejected: torch.Tensor  # [B]
    base: torch.Tensor | None  # [B], when scored
    tokens: int  # real tokens forwarded
    positions: int  # positions forwarded, padding included


def pair_logratios(
    model: CausalLM,
    pairs: list[EncodedPair],
    pad_token_id: int,
    with_base: bool,
    *,
    packed: bool = True,
) -> PairLogratios:
    """h for chosen, rejected (and base) of each pair, from ONE forward.

    Packed (the default): one segment per pair, `[prompt | chosen | rejected | base]`. Padded:
    B chosen rows, B rejected rows and (with_base) B base rows right-padded together, [2B or 3B, T],
    each repeating the prompt (kept to compare layouts: bench.training).
    """
    kinds = 3 if with_base else 2
    responses = [[p.chosen, p.rejected] + ([_require(p.base, "base")] if with_base else [])
                 for p in pairs]  # fmt: skip
    device = next(model.parameters()).device
    if packed:
        grid = pack([(p.prompt, r) for p, r in zip(pairs, responses, strict=True)], pad_token_id)
        grid = grid.to(device)
        policy = packed_logprobs(model, grid).view(kinds, len(pairs))
        tokens, positions = grid.num_tokens, grid.num_positions
    else:
        rows = [
            (p.prompt, r[k]) for k in range(kinds) for p, r in zip(pairs, responses, strict=True)
        ]
        batch = collate(rows, pad_token_id).to(device)
        policy = sequence_logprobs(model, batch).view(kinds, len(pairs))  # [kinds, B]
        tokens, positions = batch.num_tokens, int(batch.input_ids.numel())
    refs = torch.tensor([_require(p.ref_logps, "ref_logps") for p in pairs], device=device)
    h = policy - refs.T[:kinds]  # refs [B, 3] → [3, B]
    return PairLogratios(h[0], h[1], h[2] if with_base else None, tokens, positions)


def base_anchor(pairs: list[EncodedPair], h_base: torch.Tensor) -> BaseAnchor:
    """The loss's view of the base answers: h_b [B] with their token counts and ref log-probs."""
    lengths = [len(_require(p.base, "base")) for p in pairs]
    refs = [_require(p.ref_logps, "ref_logps")[2] for p in pairs]
    device = h_base.device
    return BaseAnchor(
        h_base,
        torch.tensor(lengths, dtype=torch.float32, device=device),
        torch.tensor(refs, dtype=torch.float32, device=device),
    )


def _require(value: T | None, name: str) -> T:
    """The value, or a clear error when an encoded pair lacks it."""
    if value is None:
        raise ValueError(f"encoded pair has no {name}")
    return value
