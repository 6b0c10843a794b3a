"""The in-process backend (app.inference.local): adapter switch cost and multi-adapter throughput.

Measured on `LocalBackend` itself (what the API calls), in this process, after the vLLM part:

* switch cost: the latency of a short greedy request on the adapter used last ("same"), on another
  adapter already in the backend's LRU ("switch"), on an adapter read from disk ("load"), and on
  the base model; interleaved, medians.
* throughput: concurrent requests all on one adapter, spread over several adapters, and on the base
  model. The backend batches waiting requests that share sampling settings into one `generate`
  with per-row adapters (app.inference.batching), so these run as one batch. For reference, the
  same requests as ONE batched `generate` of a bare PEFT model (`adapter_names=`, PEFT's
  mixed-adapter batch): the backend's batch without its bookkeeping.
* batched vs serialized: the same concurrent greedy requests, one per user and adapter, through a
  backend with `max_batch` = their count and through one with `max_batch=1` (the same code path,
  one row per batch: what the backend did before it batched); interleaved over rounds.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.common import median
from bench.serving.load import PROMPTS


def _request(prompt: str, max_tokens: int) -> Any:
    """A greedy GenerationRequest."""
    from app.inference.base import GenerationRequest

    return GenerationRequest([{"role": "user", "content": prompt}], max_tokens, temperature=0.0)


async def switch_costs(
    model_dir: Path, adapters: list[Path], repeats: int, threads: int, max_tokens: int = 4
) -> dict[str, Any]:
    """Latency of a short request by what the backend must do first (medians over repeats)."""
    from app.inference.base import AdapterRef
    from app.inference.local import LocalBackend

    backend = LocalBackend(lambda: model_dir, max_adapters=4, threads=threads)
    first, second = AdapterRef("bench-a", adapters[0], 1), AdapterRef("bench-b", adapters[1], 1)
    request = _request(PROMPTS[0], max_tokens)

    async def timed(adapter: AdapterRef | None) -> float:
        started = time.perf_counter()
        await backend.generate(request, adapter)
        return time.perf_counter() - started

    for adapter in (first, second, None, first):  # load the model and both adapters
        await timed(adapter)
    samples: dict[str, list[float]] = {"same": [], "switch": [], "load": [], "base": []}
    for k in range(repeats):
        samples["same"].append(await timed(first))  # `first` was the last one used
        samples["switch"].append(await timed(second))
        fresh = AdapterRef(f"bench-fresh-{k}", adapters[2 + k % (len(adapters) - 2)], 1)
        samples["load"].append(await timed(fresh))
        samples["base"].append(await timed(None))
        await timed(first)
    await backend.aclose()
    medians = {name: median(values) for name, values in samples.items()}
    return {
        "max_tokens": max_tokens,
        "repeats": repeats,
        "median_s": medians,
        "switch_overhead_s": medians["switch"] - medians["same"],
        "load_overhead_s": medians["load"] - medians["same"],
    }


async def backend_throughput(
    model_dir: Path, adapters: list[Path], requests: int, max_tokens: int, threads: int
) -> dict[str, dict[str, float]]:
    """Output tokens/s of `requests` concurrent requests: base, one adapter, spread over all."""
    from app.inference.base import AdapterRef
    from app.inference.local import LocalBackend

    refs = [AdapterRef(f"bench-t{i}", path, 1) for i, path in enumerate(adapters)]
    backend = LocalBackend(lambda: model_dir, max_adapters=len(refs), threads=threads)
    one: list[AdapterRef | None] = [refs[0]]
    spread: list[AdapterRef | None] = list(refs)
    mixes: dict[str, list[AdapterRef | None]] = {
        "base": [None],
        "one adapter": one,
        f"{len(refs)} adapters": spread,
    }
    for ref in [*refs, None]:  # warm: model and every adapter loaded
        await backend.generate(_request(PROMPTS[0], 2), ref)
    results = {}
    for mix, targets in mixes.items():
        started = time.perf_counter()
        calls = [
            backend.generate(
                _request(PROMPTS[i % len(PROMPTS)], max_tokens), targets[i % len(targets)]
            )
            for i in range(requests)
        ]
        outputs = await asyncio.gather(*calls)
        elapsed = time.perf_counter() - started
        tokens = sum(o.completion_tokens for o in outputs)
        results[mix] = {"tokens": tokens, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed}
    await backend.aclose()
    return results


async def batched_vs_serialized(
    model_dir: Path, adapters: list[Path], rounds: int, max_tokens: int, threads: int
) -> dict[str, Any]:
    """One concurrent greedy request per adapter, batched vs serialized, per round (see doc)."""
    from app.inference.base import AdapterRef
    from app.inference.local import LocalBackend

    refs = [AdapterRef(f"bench-u{i}", path, 1) for i, path in enumerate(adapters)]
    backends = {
        variant: LocalBackend(lambda: model_dir, max_adapters=len(refs), threads=threads,
                              max_batch=size)
        for variant, size in (("batched", len(refs)), ("serialized", 1))
    }  # fmt: skip
    for backend in backends.values():  # warm: model and every adapter loaded, batches run once
        await _concurrent(backend, refs, 2)
    runs = []
    for round_index in range(1, rounds + 1):
        order = ["batched", "serialized"] if round_index % 2 else ["serialized", "batched"]
        texts = {}
        for variant in order:
            run, texts[variant] = await _concurrent(backends[variant], refs, max_tokens)
            runs.append({"round": round_index, "variant": variant, **run})
        runs[-1]["same_text_as_other_variant"] = texts["batched"] == texts["serialized"]
    for backend in backends.values():
        await backend.aclose()
    return {"users": len(refs), "adapters": len(refs), "max_tokens": max_tokens,
            "rounds": rounds, "threads": threads, "runs": runs}  # fmt: skip


async def _concurrent(
    backend: Any, refs: list[Any], max_tokens: int
) -> tuple[dict[str, float], list[str]]:
    """Request i on adapter i, all at once: output tokens/s and the texts."""
    started = time.perf_counter()
    outputs = await asyncio.gather(*(
        backend.generate(_request(PROMPTS[i % len(PROMPTS)], max_tokens), ref)
        for i, ref in enumerate(refs)
    ))  # fmt: skip
    elapsed = time.perf_counter() - started
    tokens = sum(o.completion_tokens for o in outputs)
    run = {"tokens": tokens, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed}
    return run, [o.text for o in outputs]


def peft_batched_throughput(
    model_dir: Path, adapters: list[Path], requests: int, max_tokens: int, threads: int
) -> dict[str, dict[str, float]]:
    """Reference: the same requests as one left-padded batch, one adapter vs mixed adapters.

    torch's thread count is per calling thread (the backend sets it on its model thread only), so
    it is set here too: the same threads as the backend.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    names = [f"a{i}" for i in range(len(adapters))]
    model: Any = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    model.eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            tokenize=False, add_generation_prompt=True,
        )
        for i in range(requests)
    ]  # fmt: skip
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mixes: dict[str, list[str] | None] = {
        "one adapter (batched)": None,  # set_adapter: PEFT's plain path
        f"{len(names)} adapters (mixed batch)": [names[i % len(names)] for i in range(requests)],
    }
    model.set_adapter(names[0])
    _generate(model, tokenizer, inputs, None, max_tokens)  # warm-up: first calls are slow
    results = {}
    for mix, row_adapters in mixes.items():
        started = time.perf_counter()
        output = _generate(model, tokenizer, inputs, row_adapters, max_tokens)
        elapsed = time.perf_counter() - started
        tokens = _generated_tokens(output[:, inputs["input_ids"].shape[1] :], tokenizer)
        results[mix] = {"tokens": tokens, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed}
    return results


def _generate(
    model: Any, tokenizer: Any, inputs: Any, adapter_names: list[str] | None, max_tokens: int
) -> Any:
    """Greedy generate of the whole batch (per-row adapters when `adapter_names` is given)."""
    import torch

    extra = {"adapter_names": adapter_names} if adapter_names else {}
    with torch.inference_mode():
        return model.generate(
            **inputs, **extra, max_new_tokens=max_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip


def _generated_tokens(new_ids: Any, tokenizer: Any) -> int:
    """Tokens generated per row up to and including the first end-of-sequence token."""
    eos = tokenizer.eos_token_id
    total = 0
    for row in new_ids.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total
