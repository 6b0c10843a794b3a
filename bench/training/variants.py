"""One training run of one variant, measured (runs inside a child process: bench.training.child).

Variants, all on the same model, LoRA config, pairs, batch size and truncation limits:
  ours_dpo          worker.training.trainer.train with method="dpo" (packed: one segment per pair,
                    [prompt | chosen | rejected], the prompt forwarded once)
  ours_bapo         the same with method="bapo" (a third, base-response sequence per pair:
                    [prompt | chosen | rejected | base])
  ours_*_padded     the same with packing=False: one right-padded row per sequence (2B or 3B rows,
                    each repeating the prompt), the engine's old layout
  trl_dpo           TRL's DPOTrainer, PEFT LoRA (reference = adapter disabled),
                    precompute_ref_log_probs=True: the analog of our cached reference log-probs
  trl_dpo_live_ref  the same with TRL's default for PEFT: a reference forward every step

Throughput is counted the same way for every variant ("pair tokens"): for each trained pair,
len(prompt)+len(chosen) + len(prompt)+len(rejected) tokens, as the engine encodes them (chat
template, truncation limits), summed over the pairs of an epoch, times the epochs, divided by the
training loop's seconds (optimizer steps only: loading, tokenising, reference log-probs, base
responses, evaluation and saving excluded; those are in `wall_s` and `phases_s`). BAPO's base
sequences are extra work of that method and are not counted as throughput.

What the model computed is counted apart: `forwarded_tokens` (real tokens in the training forwards,
a packed pair's prompt once) and `forwarded_positions` (the same with padding); their ratio gives
the padding fraction. Ours: the engine's own counts (TrainResult.tokens_trained and
positions_forwarded); TRL: a forward pre-hook on the policy (see ForwardCounter).

The loop is timed twice: wall clock, and this process's CPU time (`time.process_time`). With one
torch thread, the CPU time is what the loop would take on an idle core; on a shared machine the
wall clock also counts the time other jobs held the core.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import current_rss_mib, peak_rss_mib
from foundation.pairs import Pair, pair_from_dict
from foundation.train_config import TrainConfig
from worker.training.cache import JsonFileCache, KeyValueCache, MemoryCache
from worker.training.data import encode_pair

OURS = {  # variant → method
    "ours_dpo": "dpo",
    "ours_dpo_padded": "dpo",
    "ours_bapo": "bapo",
    "ours_bapo_padded": "bapo",
    "ours_bapo_retrain": "bapo",
}
PADDED = frozenset({"ours_dpo_padded", "ours_bapo_padded"})  # run with packing=False
TRL = {"trl_dpo": True, "trl_dpo_live_ref": False}  # variant → precompute_ref_log_probs
VARIANTS = (*OURS, *TRL)


@dataclass
class RunSpec:
    """What a child process runs (JSON-serialisable)."""

    variant: str
    model_dir: str
    pairs: list[dict[str, Any]]
    config: dict[str, Any]
    out_dir: str
    device: str = "cpu"
    threads: int = 1
    cache_dir: str | None = None  # ours: JSON-file caches here (kept across runs); None = fresh
    label: str = ""


@dataclass
class RunResult:
    """What one run measured."""

    variant: str
    label: str
    num_pairs: int
    epochs: int
    steps: int
    epoch_pair_tokens: int
    pair_tokens: int
    forwarded_tokens: int  # real tokens in the training forwards
    forwarded_positions: int  # the same with padding: what the model computed
    train_loop_s: float
    train_loop_cpu_s: float
    wall_s: float
    phases_s: dict[str, float]
    peak_rss_mib: float
    rss_at_train_start_mib: float
    cuda_peak_mib: float | None
    threads: int
    cache_stats: dict[str, int] = field(default_factory=dict)
    mean_tokens: dict[str, float] = field(default_factory=dict)  # per pair: prompt, chosen, ...

    @property
    def pair_tokens_per_s(self) -> float:
        """Pair tokens per second of training loop."""
        return self.pair_tokens / self.train_loop_s if self.train_loop_s > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict with the derived rates."""
        data = asdict(self)
        data["pair_tokens_per_s"] = self.pair_tokens_per_s
        data["pair_tokens_per_cpu_s"] = (
            self.pair_tokens / self.train_loop_cpu_s if self.train_loop_cpu_s > 0 else math.nan
        )
        data["forwarded_tokens_per_s"] = (
            self.forwarded_tokens / self.train_loop_s if self.train_loop_s > 0 else math.nan
        )
        data["train_loop_s_per_epoch"] = self.train_loop_s / self.epochs
        data["padding_fraction"] = padding_fraction(self.forwarded_tokens, self.forwarded_positions)
        trained = self.num_pairs * self.epochs
        data["positions_per_pair"] = self.forwarded_positions / trained if trained else math.nan
        return data


def padding_fraction(tokens: int, positions: int) -> float:
    """Share of the forwarded positions that were padding: 1 − tokens / positions."""
    return 1.0 - tokens / positions if positions > 0 else math.nan


def epoch_pair_tokens(tokenizer: Any, pairs: list[Pair], config: TrainConfig) -> int:
    """Σ over pairs of (prompt+chosen) + (prompt+rejected) tokens, as the engine encodes them."""
    total = 0
    for pair in pairs:
        item = encode_pair(tokenizer, pair, config.max_prompt_tokens, config.max_response_tokens)
        total += 2 * len(item.prompt) + len(item.chosen) + len(item.rejected)
    return total


def mean_tokens(
    tokenizer: Any, pairs: list[Pair], config: TrainConfig, base: list[list[int]] | None = None
) -> dict[str, float]:
    """Mean encoded length of the prompts, chosen, rejected (and base) responses."""
    items = [
        encode_pair(tokenizer, pair, config.max_prompt_tokens, config.max_response_tokens,
                    base_ids=base[i] if base else None)
        for i, pair in enumerate(pairs)
    ]  # fmt: skip
    means = {
        "prompt": sum(len(x.prompt) for x in items) / len(items),
        "chosen": sum(len(x.chosen) for x in items) / len(items),
        "rejected": sum(len(x.rejected) for x in items) / len(items),
    }
    if base:
        means["base"] = sum(len(x.base or []) for x in items) / len(items)
    return means


def base_ids(
    cache: KeyValueCache, model_dir: Path, pairs: list[Pair], config: TrainConfig
) -> list[list[int]] | None:
    """The base answers' token ids the run trained on, read back from its cache (the engine's
    keys; values are Generation JSON). None when the run generated none (DPO)."""
    from foundation.model import model_identity
    from worker.training.anchors import Generation
    from worker.training.cache import base_response_key

    if config.effective_anchor_weight <= 0:
        return None
    identity = model_identity(model_dir)
    keys = [base_response_key(identity, pair.messages, config) for pair in pairs]
    found = cache.get_many(keys)
    if not all(key in found for key in keys):
        return None
    return [Generation.from_json(found[key]).token_ids for key in keys]


def run(spec: RunSpec) -> RunResult:
    """Run the spec's variant and measure it."""
    import torch

    torch.set_num_threads(spec.threads)
    if spec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if spec.variant in OURS:
        return _run_ours(spec)
    if spec.variant in TRL:
        return _run_trl(spec)
    raise ValueError(f"unknown variant {spec.variant!r}; known: {VARIANTS}")


def _caches(spec: RunSpec) -> tuple[KeyValueCache, KeyValueCache]:
    """Base-response and reference caches: JSON files in cache_dir, or fresh in memory."""
    if spec.cache_dir is None:
        return MemoryCache(), MemoryCache()
    folder = Path(spec.cache_dir)
    return JsonFileCache(folder / "base_responses.json"), JsonFileCache(folder / "reference.json")


def _run_ours(spec: RunSpec) -> RunResult:
    """worker.training.trainer.train, timed per phase."""
    import torch

    from foundation.model import load_tokenizer
    from worker.training.trainer import train

    pairs = [pair_from_dict(p) for p in spec.pairs]
    layout = {"packing": False} if spec.variant in PADDED else {}
    config = TrainConfig.parse({**spec.config, "method": OURS[spec.variant], **layout})
    tokenizer = load_tokenizer(Path(spec.model_dir))
    tokens_per_epoch = epoch_pair_tokens(tokenizer, pairs, config)
    marks: list[tuple[str, float]] = []
    cpu_marks: dict[str, float] = {}
    rss_at_train: list[float] = []

    def on_phase(name: str) -> None:
        marks.append((name, time.perf_counter()))
        cpu_marks[name] = time.process_time()
        if name == "training":
            rss_at_train.append(current_rss_mib())

    base_cache, ref_cache = _caches(spec)
    started = time.perf_counter()
    result = train(
        Path(spec.model_dir), pairs, config, out_dir=Path(spec.out_dir),
        base_cache=base_cache, ref_cache=ref_cache, on_phase=on_phase,
        device=torch.device(spec.device),
    )  # fmt: skip
    ended = time.perf_counter()
    return RunResult(
        variant=spec.variant,
        label=spec.label,
        num_pairs=len(pairs),
        epochs=config.epochs,
        steps=result.steps,
        epoch_pair_tokens=tokens_per_epoch,
        pair_tokens=tokens_per_epoch * config.epochs,
        forwarded_tokens=result.tokens_trained,
        forwarded_positions=result.positions_forwarded,
        train_loop_s=result.train_time_s,
        train_loop_cpu_s=cpu_marks["evaluating"] - cpu_marks["training"],
        wall_s=ended - started,
        phases_s=_durations(marks, ended),
        peak_rss_mib=peak_rss_mib(),
        rss_at_train_start_mib=rss_at_train[0] if rss_at_train else math.nan,
        cuda_peak_mib=_cuda_peak(spec.device),
        threads=torch.get_num_threads(),
        cache_stats=asdict(result.cache_stats),
        mean_tokens=mean_tokens(
            tokenizer, pairs, config, base_ids(base_cache, Path(spec.model_dir), pairs, config)
        ),
    )


def _durations(marks: list[tuple[str, float]], ended: float) -> dict[str, float]:
    """Seconds per phase from the phases' start marks."""
    ends = [t for _, t in marks[1:]] + [ended]
    return {name: end - start for (name, start), end in zip(marks, ends, strict=True)}


def _cuda_peak(device: str) -> float | None:
    """Peak CUDA memory allocated in MiB (None on the CPU)."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def trl_dataset(pairs: list[Pair]) -> Any:
    """The pairs in TRL's conversational preference format."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": p.messages,
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
            }
            for p in pairs
        ]
    )


def trl_args(spec: RunSpec, config: TrainConfig) -> Any:
    """DPOConfig with our hyperparameters; TRL's CPU-hostile defaults turned off (see README)."""
    from trl import DPOConfig

    on_gpu = spec.device == "cuda"
    return DPOConfig(
        output_dir=str(Path(spec.out_dir) / "trainer"),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum_steps,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_schedule,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        beta=config.beta,
        seed=config.seed,
        max_length=config.max_prompt_tokens + config.max_response_tokens,
        precompute_ref_log_probs=TRL[spec.variant],
        precompute_ref_batch_size=config.score_batch_size,
        gradient_checkpointing=False,  # TRL defaults to True; our trainer does not checkpoint
        bf16=on_gpu,  # TRL defaults to True; fp32 on the CPU like ours, bf16 autocast on CUDA
        use_cpu=not on_gpu,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


class ForwardCounter:
    """A forward pre-hook (with kwargs) on TRL's policy that counts what it forwards in training.

    TRL 1.16's DPOTrainer._compute_loss calls `model(**model_kwargs, labels=..., ...)`: keyword
    arguments only, one call per micro-batch, `input_ids` [2B, T] = the B prompt+chosen rows then
    the B prompt+rejected rows (DataCollatorForPreference), right-padded to the longest of the 2B,
    `attention_mask` [2B, T] 1 on real tokens. Counted: forwards with gradients enabled and the
    module in training mode (the policy's loss forwards). Not counted: the reference forwards
    (precomputed in DPOTrainer's constructor, before the hook exists; or, live, every step under
    torch.no_grad) and any evaluation forward. positions = input_ids.numel() (padding included),
    tokens = attention_mask.sum() (the numel without a 2-D mask).
    """

    def __init__(self) -> None:
        self.calls = self.tokens = self.positions = 0

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        if not (torch.is_grad_enabled() and module.training):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.calls += 1
        self.positions += int(ids.numel())
        self.tokens += int(mask.sum()) if mask is not None and mask.dim() == 2 else int(ids.numel())


def _run_trl(spec: RunSpec) -> RunResult:
    """TRL's DPOTrainer with a PEFT LoRA config, timed: init (tokenise, precompute), loop, save."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOTrainer

    from foundation.model import load_tokenizer

    pairs = [pair_from_dict(p) for p in spec.pairs]
    config = TrainConfig.parse({**spec.config, "method": "dpo"})
    tokenizer = load_tokenizer(Path(spec.model_dir))
    tokens_per_epoch = epoch_pair_tokens(tokenizer, pairs, config)
    tokenizer.padding_side = "right"  # TRL's collator pads itself; keep the HF default for it

    class LoopTimer(TrainerCallback):
        """Marks the training loop's start and end, and the RSS when it starts."""

        begin = end = cpu_begin = cpu_end = rss = math.nan
        threads = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin, self.cpu_begin = time.perf_counter(), time.process_time()
            self.rss, self.threads = current_rss_mib(), torch.get_num_threads()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.end, self.cpu_end = time.perf_counter(), time.process_time()

    timer = LoopTimer()
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    loaded = time.perf_counter()
    trainer = DPOTrainer(
        model=model, args=trl_args(spec, config), train_dataset=trl_dataset(pairs),
        processing_class=tokenizer, peft_config=lora, callbacks=[timer],
    )  # fmt: skip
    prepared = time.perf_counter()
    counter = ForwardCounter()
    policy = trainer.model
    assert policy is not None
    hook = policy.register_forward_pre_hook(counter, with_kwargs=True)
    trainer.train()
    trained = time.perf_counter()
    hook.remove()
    if counter.calls == 0:
        raise RuntimeError("the forward hook saw no training forward: has TRL's call changed?")
    trainer.save_model(str(Path(spec.out_dir) / "adapter"))
    ended = time.perf_counter()
    return RunResult(
        variant=spec.variant,
        label=spec.label,
        num_pairs=len(pairs),
        epochs=config.epochs,
        steps=int(trainer.state.global_step),
        epoch_pair_tokens=tokens_per_epoch,
        pair_tokens=tokens_per_epoch * config.epochs,
        forwarded_tokens=counter.tokens,
        forwarded_positions=counter.positions,
        train_loop_s=timer.end - timer.begin,
        train_loop_cpu_s=timer.cpu_end - timer.cpu_begin,
        wall_s=ended - started,
        phases_s={
            "loading": loaded - started,
            "tokenize_and_reference_logprobs": prepared - loaded,
            "training": trained - prepared,
            "saving": ended - trained,
        },
        peak_rss_mib=peak_rss_mib(),
        rss_at_train_start_mib=timer.rss,
        cuda_peak_mib=_cuda_peak(spec.device),
        threads=timer.threads,
        mean_tokens=mean_tokens(tokenizer, pairs, config),
    )
