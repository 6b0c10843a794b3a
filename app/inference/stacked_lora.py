"""Mixed-adapter batches in two batched matmuls per LoRA layer, instead of PEFT's loop.

PEFT runs a batch whose rows use different adapters (`adapter_names=`) by looping, in every LoRA
layer, over the distinct adapters: gather that adapter's rows, two matmuls, scatter back. With 8
adapters on all linear layers of a 30-layer model that is 1,680 small operations per decoded
token, and the batch gains little over one request at a time. Here each row's A and B (scaling
folded into B, ranks zero-padded to the largest) are stacked once per batch, [rows, in, r] and
[rows, r, out], and every layer adds `bmm(bmm(x, A), B)`: the same sums (a zero-padded rank adds
zeros; a base row has zero matrices), as the S-LoRA/punica kernels do on GPUs.

Only vanilla LoRA on `nn.Linear` layers in eval mode qualifies; anything else (DoRA and other
variants, LoRA on embeddings or convolutions, dropout while training) keeps PEFT's own forward.
torch and peft are imported inside the functions (the API imports neither unless it serves locally).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class _Unsupported(Exception):
    """A row's adapter is not plain LoRA on this layer: PEFT's own forward must run the batch."""


def stacked_weights(layer: Any, names: list[str]) -> tuple[Any, Any] | None:
    """Per-row (A [rows, in, r], B·scaling [rows, r, out]) of one LoRA layer; None when no row's
    adapter has this layer (the base layer alone is the answer)."""
    import torch

    rows = [name for name in names if name in layer.lora_A]
    if any(name in layer.lora_variant for name in rows):
        raise _Unsupported
    if not rows:
        return None
    rank = max(layer.lora_A[name].weight.shape[0] for name in rows)
    weight = layer.lora_A[rows[0]].weight
    a = torch.zeros(len(names), layer.in_features, rank, dtype=weight.dtype, device=weight.device)
    b = torch.zeros(len(names), rank, layer.out_features, dtype=weight.dtype, device=weight.device)
    for row, name in enumerate(names):
        if name not in layer.lora_A:  # the base model's row, or an adapter without this layer
            continue
        lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight  # [r, in], [out, r]
        r = lora_a.shape[0]
        a[row, :, :r] = lora_a.T
        b[row, :r, :] = lora_b.T * layer.scaling[name]
    return a, b


@contextlib.contextmanager
def stacked_lora(model: Any, names: list[str]) -> Iterator[bool]:
    """Within the block, `model`'s LoRA layers run a batch whose row i uses adapter names[i]
    ("__base__": none) with stacked weights; yields whether they do (False: PEFT's forward)."""
    from peft.tuners.lora import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    try:
        if model.training or any(type(m) is not Linear or m.merged for m in layers):
            raise _Unsupported
        stacks = [(m, stacked_weights(m, names)) for m in layers]
    except _Unsupported:
        yield False
        return
    patched = []
    try:
        for layer, weights in stacks:
            if weights is not None:
                # an instance attribute: found before the class method PEFT defines
                layer._mixed_batch_forward = _bound(layer, *weights)  # type: ignore[method-assign]
                patched.append(layer)
        yield True
    finally:
        for layer in patched:
            del layer._mixed_batch_forward  # PEFT's class method again


def _bound(layer: Any, a: Any, b: Any) -> Any:
    """The layer's mixed-batch forward for this batch, called as PEFT calls its own."""

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        for name in ("adapter_names", "alora_offsets"):  # PEFT's, not the base layer's
            kwargs.pop(name, None)
        result = layer.base_layer(x, *args, **kwargs)
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)  # [rows, tokens, in]
        delta = flat.bmm(a).bmm(b)  # [rows, tokens, out]
        return result + delta.reshape(result.shape).to(result.dtype)

    return forward
