"""Masked sequence log-probabilities: sum of log p(token | prefix) over response tokens only.

The vocabulary projection (lm_head) and the softmax are applied only at the positions that predict
a response token: the backbone's final hidden states are gathered there first. Prompt and padding
positions never get logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import torch
import torch.nn.functional as F

from foundation.model import CausalLM, autocast
from worker.training.data import Batch, EncodedPair, collate
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
        logits = head(states).float()  # [K, V]
    targets = batch.input_ids[:, 1:][scored]  # [K]
    token_logps = -F.cross_entropy(logits, targets, reduction="none")  # [K]
    rows = torch.arange(scored.shape[0], device=device).unsqueeze(1).expand_as(scored)[scored]
    return token_logps, rows


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


def pair_logratios(
    model: CausalLM, pairs: list[EncodedPair], pad_token_id: int, with_base: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """h = log πθ − log πref for chosen, rejected (and base) of each pair, from ONE forward.

    The batch stacks B chosen rows, B rejected rows and (with_base) B base rows: [2B or 3B, T].
    Returns h_chosen [B], h_rejected [B], h_base [B] or None, and the number of tokens forwarded.
    """
    kinds = 3 if with_base else 2
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    if with_base:
        rows += [(p.prompt, _require(p.base, "base")) for p in pairs]
    device = next(model.parameters()).device
    batch = collate(rows, pad_token_id).to(device)
    policy = sequence_logprobs(model, batch).view(kinds, len(pairs))  # [kinds, B]
    refs = torch.tensor([_require(p.ref_logps, "ref_logps") for p in pairs], device=device)
    h = policy - refs.T[:kinds]  # refs [B, 3] → [3, B]
    return h[0], h[1], (h[2] if with_base else None), batch.num_tokens


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
