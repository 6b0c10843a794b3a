"""Masked sequence log-probs against a naive full-vocabulary computation, with and without LoRA."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker.training.data import collate, encode_prompt, encode_response
from worker.training.logprobs import score_sequences, score_tokens, sequence_logprobs

pytestmark = pytest.mark.slow


def _naive(model: Any, batch: Any) -> list[float]:
    """Full forward, full log_softmax, sum over response positions one token at a time."""
    logps = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logps = logps.log_softmax(-1)
    totals = []
    for row in range(batch.input_ids.shape[0]):
        total = 0.0
        for t in range(1, batch.input_ids.shape[1]):
            if batch.response_mask[row, t]:
                total += logps[row, t - 1, batch.input_ids[row, t]].item()
        totals.append(total)
    return totals


@pytest.fixture(scope="module")
def batch(tokenizer: Any) -> Any:
    """Two rows of different lengths (so one is padded)."""
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt = encode_prompt(tokenizer, messages, 128)
    rows = [
        (prompt, encode_response(tokenizer, messages, "It is 4.", 32)),
        (prompt, encode_response(tokenizer, messages, "I think the answer is five.", 32)),
    ]
    return collate(rows, tokenizer.pad_token_id)


def test_matches_naive_per_token_sum(base_model: Any, batch: Any) -> None:
    with torch.no_grad():
        ours = sequence_logprobs(base_model, batch).tolist()
        expected = _naive(base_model, batch)
    assert ours == pytest.approx(expected, abs=1e-3)
    assert all(value < 0 for value in ours)


def test_matches_naive_with_a_lora_adapter_and_disables_to_base(
    base_model: Any, batch: Any
) -> None:
    from peft import LoraConfig, get_peft_model

    with torch.no_grad():
        plain = sequence_logprobs(base_model, batch).tolist()
    torch.manual_seed(0)
    lora = LoraConfig(r=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base_model, lora).eval()
    try:
        with torch.no_grad():
            adapted = sequence_logprobs(model, batch).tolist()
            assert adapted == pytest.approx(_naive(model, batch), abs=1e-3)
            with model.disable_adapter():
                base = sequence_logprobs(model, batch).tolist()
        assert base == pytest.approx(plain, abs=1e-4)
        assert adapted != pytest.approx(base, abs=1e-2)
    finally:
        model.unload()  # give the module-scoped base model back unchanged


def test_score_sequences_keeps_input_order(base_model: Any, batch: Any) -> None:
    rows = []
    for i in range(2):
        ids = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        start = int(batch.response_mask[i].nonzero()[0])
        rows.append((ids[:start], ids[start:]))
    with torch.no_grad():
        expected = sequence_logprobs(base_model, batch).tolist()
    scores = score_sequences(base_model, rows[::-1], pad_token_id=2, batch_size=1)
    assert scores == pytest.approx(expected[::-1], abs=1e-3)
    per_token = score_tokens(base_model, rows[::-1], pad_token_id=2, batch_size=2)
    assert [len(t) for t in per_token] == [len(r[1]) for r in rows[::-1]]
    assert [sum(t) for t in per_token] == pytest.approx(expected[::-1], abs=1e-3)
