"""Stacked mixed-adapter LoRA (app.inference.stacked_lora) computes what PEFT's loop computes.

On the bundled model with adapters of different ranks, target modules and scalings, plus a base
row: the logits of one mixed batch equal PEFT's own mixed-batch forward, the patch is gone after
the block, and an adapter variant PEFT must run itself (DoRA) keeps PEFT's forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.inference.stacked_lora import stacked_lora
from tests.worker_support import model_dir

pytestmark = pytest.mark.slow
ROWS = ["r4", "__base__", "r8", "r4", "attn"]


@pytest.fixture(scope="module")
def model() -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    from foundation.model import load_model

    torch.manual_seed(0)
    configs = {
        "r4": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        "r8": LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False),
        "attn": LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False),
    }  # fmt: skip
    names = list(configs)
    peft = get_peft_model(load_model(Path(model_dir())), configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, configs[name])
    return peft.eval()


def _logits(model: Any, names: list[str]) -> Any:
    import torch

    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (1, 7)).expand(len(names), 7)  # one input: rows differ by adapter
    with torch.inference_mode():
        return model(input_ids=ids, adapter_names=names).logits


def test_stacked_rows_give_pefts_logits_and_the_patch_is_undone(model: Any) -> None:
    import torch
    from peft.tuners.lora import Linear

    expected = _logits(model, ROWS)
    with stacked_lora(model, ROWS) as stacked:
        assert stacked is True
        patched = [m for m in model.modules() if "_mixed_batch_forward" in vars(m)]
        assert len(patched) == len([m for m in model.modules() if isinstance(m, Linear)])
        got = _logits(model, ROWS)
    assert not [m for m in model.modules() if "_mixed_batch_forward" in vars(m)]
    # the same sums in another order (fp32, 30 layers, random adapters of scaling up to 4): logits
    # within 1e-3 (measured 2.5e-4), and the same greedy token everywhere
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # the rows differ from each other: the check compares adapters, not the base model 5 times
    assert (expected[0] - expected[1]).abs().max() > 1e-2
    assert (expected[0] - expected[2]).abs().max() > 1e-2
    torch.testing.assert_close(expected[0], expected[3])


def test_a_variant_adapter_keeps_pefts_forward(model: Any) -> None:
    from peft import LoraConfig

    model.add_adapter("dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    try:
        with stacked_lora(model, ["dora", "r4"]) as stacked:
            assert stacked is False
            assert not [m for m in model.modules() if "_mixed_batch_forward" in vars(m)]
        with stacked_lora(model, ["r4", "r8"]) as stacked:  # a batch without it still stacks
            assert stacked is True
    finally:
        model.delete_adapter("dora")
