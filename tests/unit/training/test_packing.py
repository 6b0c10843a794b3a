"""The packed layout (one segment per pair, the prompt once) against the padded one (a row per
sequence): the same per-sequence log-probs, loss and gradients on the bundled model, in fp32."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker.training.data import EncodedPair, encode_prompt, encode_response, pack
from worker.training.logprobs import base_anchor, pair_logratios
from worker.training.loss import bapo_loss

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # nats, per sequence (fp32)


@pytest.fixture(scope="module")
def pairs(tokenizer: Any) -> list[EncodedPair]:
    """Ragged pairs: short and long prompts (one truncated from the left), one-token responses."""

    def pair(question: str, answers: tuple[str, str, str], max_prompt: int = 512) -> EncodedPair:
        messages = [{"role": "user", "content": question}]
        prompt = encode_prompt(tokenizer, messages, max_prompt)
        chosen, rejected, base = (encode_response(tokenizer, messages, a, 48) for a in answers)
        return EncodedPair(prompt, chosen, rejected, base, (0.0, 0.0, 0.0))

    long_question = "Tell me about a dragon who loves tea and hates coffee. " * 6
    items = [
        pair("What is 2 + 2?", ("It is 4.", "Five.", "The answer is four: two and two make four.")),
        pair(long_question, ("Once upon a time, a dragon.", "No.", "Dragons drink tea."), 24),
        pair("Hi", ("H", "Hello there, my friend! How are you today?", "Hey.")),
        pair("Name a colour.", ("Blue.", "Seven.", "Red")),
    ]
    items[2].chosen = items[2].chosen[:1]  # a one-token response
    items[3].base = items[3].base[:1] if items[3].base else None
    assert len(items[1].prompt) == 24  # cut from the left
    return items


@pytest.mark.parametrize("with_base", [False, True], ids=["dpo", "bapo"])
def test_packed_log_probs_equal_padded(
    base_model: Any, tokenizer: Any, pairs: list[EncodedPair], with_base: bool
) -> None:
    with torch.no_grad():
        packed = pair_logratios(base_model, pairs, tokenizer.pad_token_id, with_base)
        padded = pair_logratios(base_model, pairs, tokenizer.pad_token_id, with_base, packed=False)
    columns = 3 if with_base else 2
    for a, b in zip(packed[:columns], padded[:columns], strict=True):
        assert a is not None and b is not None
        assert torch.allclose(a, b, atol=TOLERANCE, rtol=0), (a - b).abs().max()
        assert bool((a < 0).all())  # real log-probs (refs are 0 here), not a degenerate zero
    assert (packed.base is None) == (not with_base)
    # the prompt is forwarded once instead of once per response
    prompts = sum(len(p.prompt) for p in pairs)
    assert padded.tokens - packed.tokens == (columns - 1) * prompts
    assert packed.positions < padded.positions


def test_a_training_step_has_the_same_loss_and_gradients(
    base_model: Any, tokenizer: Any, pairs: list[EncodedPair]
) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False, lora_dropout=0.0)  # fmt: skip
    model = get_peft_model(base_model, lora)
    try:
        losses, grads = [], []
        for packed in (True, False):
            model.zero_grad(set_to_none=True)
            h_w, h_l, h_b, _, _ = pair_logratios(
                model, pairs, tokenizer.pad_token_id, True, packed=packed
            )
            assert h_b is not None
            result = bapo_loss(h_w, h_l, base_anchor(pairs, h_b), beta=0.1, anchor_weight=1.0,
                               anchor_form="hinge", anchor_tolerance=0.0)  # fmt: skip
            result.loss.backward()
            losses.append(float(result.loss.detach()))
            grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            )
        assert losses[0] == pytest.approx(losses[1], abs=TOLERANCE)
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for name, grad in grads[0].items():
            other = grads[1][name]
            scale = float(other.abs().max())
            assert scale > 0, name  # a gradient that is there
            assert float((grad - other).abs().max()) <= TOLERANCE * max(1.0, scale), name
    finally:
        model.unload()  # the module's base model, without the adapter, for the other tests


def test_pack_lays_out_segments_and_masks() -> None:
    groups = [([1, 2, 3], [[4, 5], [6]]), ([7], [[8], [9, 10, 11]]), ([12, 13], [[14], [15]])]
    batch = pack(groups, pad_token_id=0)
    lengths = [6, 5, 4]  # first fit into rows of width 6: [0], [1], [2] does not fit beside 1
    assert batch.input_ids.shape == (3, 6)
    assert batch.num_tokens == sum(lengths) and batch.num_positions == 18
    assert batch.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3]  # restarts after the prompt
    mask = batch.attention_mask[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True]  # sees prompt + itself
    assert mask[4].tolist() == [True, True, True, True, True, False]
    assert not mask[2, 3]  # causal
    # every scored token: its target and the sequence it belongs to (response-major numbering)
    assert batch.targets.tolist()[:3] == [4, 5, 6]
    assert batch.predictors.tolist()[:3] == [2, 3, 2]  # 6 is predicted by the prompt's end
    assert batch.sequences.tolist() == [0, 0, 3, 1, 4, 4, 4, 2, 5]
    pad_rows = batch.attention_mask[2, 0, 4:]  # padding attends to itself only (no empty row)
    assert pad_rows.sum(dim=1).tolist() == [1, 1]


def test_pack_refuses_empty_responses_and_uneven_groups() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        pack([([1], [[2], []])], 0)
    with pytest.raises(ValueError, match="same number"):
        pack([([1], [[2], [3]]), ([1], [[2]])], 0)


def test_the_chunked_head_gives_the_same_values_and_gradients(base_model: Any) -> None:
    from worker.training.logprobs import backbone_and_head, head_logprobs

    _, head = backbone_and_head(base_model)
    torch.manual_seed(0)
    states = torch.randn(37, head.weight.shape[1], requires_grad=True)
    targets = torch.randint(0, head.weight.shape[0], (37,))
    whole = head_logprobs(head, states, targets)
    (grad_whole,) = torch.autograd.grad(whole.sum(), states)
    vocab = head.weight.shape[0]
    chunked = head_logprobs(head, states, targets, max_elements=8 * vocab)  # 5 chunks of ≤ 8
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), states)
    assert torch.allclose(whole, chunked, atol=1e-5, rtol=0)
    assert torch.allclose(grad_whole, grad_chunked, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(
    model_dir: Any, tokenizer: Any, pairs: list[EncodedPair]
) -> None:
    from dataclasses import replace

    from foundation.model import load_model
    from foundation.train_config import TrainConfig
    from worker.training.trainer import wrap_lora

    config = TrainConfig(lora_rank=8, lora_dropout=0.0, target_modules=("q_proj", "down_proj"))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = wrap_lora(
            load_model(model_dir), replace(config, gradient_checkpointing=checkpointed)
        )
        with torch.no_grad():  # move LoRA off zero so its gradients are not trivial
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02)
        assert model.get_base_model().is_gradient_checkpointing == checkpointed
        model.train()
        h_w, h_l, _, _, _ = pair_logratios(model, pairs, tokenizer.pad_token_id, False)
        loss = bapo_loss(h_w, h_l, None, beta=0.1, anchor_weight=0.0, anchor_form="hinge",
                         anchor_tolerance=0.0).loss  # fmt: skip
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], atol=1e-6, rtol=1e-4), name
