"""LoRA training with the BAPO (or DPO) loss: anchors → reference log-probs → steps → save."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from foundation.model import (
    DEFAULT_SERVED_MODEL_NAME,
    CausalLM,
    default_device,
    load_model,
    load_tokenizer,
    model_identity,
)
from foundation.pairs import Pair, PairError, prompt_hash
from foundation.train_config import TrainConfig
from worker.training.anchors import Anchors, CacheStats, PhaseCallback, compute_anchors
from worker.training.artifacts import check_out_dir, save_adapter
from worker.training.cache import KeyValueCache
from worker.training.data import EncodedPair, encode_pair
from worker.training.evaluate import (
    MCQuestion,
    knowledge_retention,
    pair_metrics,
    retention_metrics,
)
from worker.training.logprobs import base_anchor, pair_logratios
from worker.training.loss import bapo_loss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

StepCallback = Callable[[dict[str, Any]], None]
CancelCheck = Callable[[], bool]


class TrainingCancelled(Exception):
    """should_cancel() returned True between two steps; nothing was saved."""


class StaleReferenceError(RuntimeError):
    """At the first step (LoRA still zero) the policy disagrees with the cached reference."""


# At step 1 the LoRA update is zero, so the policy IS the reference: every h must be ≈ 0. fp32
# rounding gives ~1e-5 nats per token and bf16 ~1e-2; a cache of another model gives ≳ 0.3.
FRESH_REFERENCE_NATS_PER_TOKEN = 0.05


@dataclass
class TrainResult:
    """What a run produced: final metrics, step history, the adapter folder, counts, timings."""

    adapter_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    num_pairs: int
    num_train_pairs: int
    num_heldout_pairs: int
    steps: int
    tokens_trained: int  # real tokens forwarded in training (a pair's prompt once when packed)
    positions_forwarded: int  # the same with padding: what the model computed
    train_time_s: float
    wall_time_s: float
    tokens_per_s: float
    cache_stats: CacheStats
    model_identity: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (what metrics.json holds)."""
        data = dataclasses.asdict(self)
        data["adapter_dir"] = str(self.adapter_dir)
        return data


@dataclass
class _Hooks:
    """The caller's callbacks, each optional."""

    on_step: StepCallback | None = None
    on_phase: PhaseCallback | None = None
    should_cancel: CancelCheck | None = None

    def phase(self, name: str) -> None:
        """Check for cancellation, then report the phase."""
        self.check_cancel()
        if self.on_phase:
            self.on_phase(name)

    def check_cancel(self) -> None:
        """Raise TrainingCancelled when the caller asks to stop."""
        if self.should_cancel and self.should_cancel():
            raise TrainingCancelled("training cancelled")


def train(
    model_path: Path,
    pairs: list[Pair],
    config: TrainConfig,
    *,
    out_dir: Path,
    base_cache: KeyValueCache | None = None,
    ref_cache: KeyValueCache | None = None,
    on_step: StepCallback | None = None,
    on_phase: PhaseCallback | None = None,
    should_cancel: CancelCheck | None = None,
    mc_questions: list[MCQuestion] | None = None,
    device: torch.device | None = None,
    served_model_name: str = DEFAULT_SERVED_MODEL_NAME,
) -> TrainResult:
    """Train a LoRA adapter on `pairs` and save it (with metrics.json) atomically to `out_dir`.

    With `mc_questions`, the evaluating phase also measures knowledge retention (mc_* metrics).
    `served_model_name` is the base model's name on the inference server, written into the
    adapter (a property of the deployment, not a hyperparameter).
    """
    started = time.perf_counter()
    config.validate()
    if not pairs:
        raise PairError("no pairs to train on")
    check_out_dir(out_dir)
    hooks = _Hooks(on_step, on_phase, should_cancel)
    hooks.phase("loading")
    run = _prepare(model_path, pairs, config, base_cache, ref_cache, hooks, device)
    hooks.phase("training")
    train_set = [run.encoded[i] for i in run.train_idx]
    history, tokens, train_time = _train_loop(run.policy, train_set, config, run.pad, hooks)
    hooks.phase("evaluating")
    metrics = _final_metrics(run, config, mc_questions)
    result = TrainResult(
        adapter_dir=Path(out_dir),
        metrics=metrics,
        history=history,
        num_pairs=len(pairs),
        num_train_pairs=len(run.train_idx),
        num_heldout_pairs=len(run.heldout_idx),
        steps=len(history),
        tokens_trained=tokens,
        positions_forwarded=sum(int(record["positions"]) for record in history),
        train_time_s=train_time,
        wall_time_s=time.perf_counter() - started,
        tokens_per_s=tokens / train_time if train_time > 0 else 0.0,
        cache_stats=run.cache_stats,
        model_identity=run.identity,
        config=config.to_dict(),
    )
    hooks.phase("saving")
    save_adapter(run.policy, out_dir, result.to_json(), served_model_name)
    return result


@dataclass
class _Run:
    """Everything training needs once anchors are computed and the LoRA adapter is attached."""

    policy: CausalLM
    tokenizer: PreTrainedTokenizerBase
    encoded: list[EncodedPair]
    train_idx: list[int]
    heldout_idx: list[int]
    identity: str
    cache_stats: CacheStats

    @property
    def pad(self) -> int:
        """The tokenizer's padding id."""
        return int(self.tokenizer.pad_token_id)


def _prepare(
    model_path: Path,
    pairs: list[Pair],
    config: TrainConfig,
    base_cache: KeyValueCache | None,
    ref_cache: KeyValueCache | None,
    hooks: _Hooks,
    device: torch.device | None,
) -> _Run:
    """Load the model, fill anchors from/into the caches (as reference), encode, attach LoRA."""
    _seed_everything(config.seed)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, device or default_device())
    identity = model_identity(model_path, next(model.parameters()).device)
    anchors = compute_anchors(
        model, tokenizer, pairs, config, identity,
        base_cache=base_cache, ref_cache=ref_cache, on_phase=hooks.phase,
    )  # fmt: skip
    encoded = _encode_with_anchors(tokenizer, pairs, anchors, config)
    prompts = [prompt_hash(pair.messages) for pair in pairs]
    train_idx, heldout_idx = split_heldout(len(pairs), config, prompts)
    _seed_everything(config.seed)  # again: LoRA init must not depend on what the caches held
    policy = wrap_lora(model, config)
    return _Run(policy, tokenizer, encoded, train_idx, heldout_idx, identity, anchors.stats)


def _seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)


def _encode_with_anchors(
    tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], anchors: Anchors, config: TrainConfig
) -> list[EncodedPair]:
    """Token ids of every pair with its base response and reference log-probs attached."""
    encoded = []
    for i, pair in enumerate(pairs):
        item = encode_pair(
            tokenizer, pair, config.max_prompt_tokens, config.max_response_tokens,
            base_ids=anchors.base_ids(i),
        )  # fmt: skip
        item.ref_logps = anchors.ref_logps(i)
        encoded.append(item)
    return encoded


def split_heldout(
    num_pairs: int, config: TrainConfig, groups: list[str] | None = None
) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) index split; no held-out slice below min_pairs_for_heldout.

    With `groups` (e.g. prompt keys), pairs of one group land on the same side, so a held-out
    pair never shares its prompt with a training pair; about `heldout_fraction` of the pairs
    are held out, at least one group, never all of them.
    """
    if num_pairs < config.min_pairs_for_heldout or config.heldout_fraction == 0:
        return list(range(num_pairs)), []
    keys = groups if groups is not None else [str(i) for i in range(num_pairs)]
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        return list(range(num_pairs)), []
    random.Random(config.seed).shuffle(distinct)
    target = max(1, round(config.heldout_fraction * num_pairs))
    held: set[str] = set()
    size = 0
    for key in distinct[:-1]:  # keep at least one group for training
        if size >= target:
            break
        held.add(key)
        size += keys.count(key)
    train = [i for i, key in enumerate(keys) if key not in held]
    return train, [i for i, key in enumerate(keys) if key in held]


def wrap_lora(model: CausalLM, config: TrainConfig) -> CausalLM:
    """A fresh PEFT LoRA adapter on the model (vLLM-compatible: no DoRA, no modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        use_dora=False,
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, lora)
    if config.gradient_checkpointing:  # activations recomputed in backward: memory for time
        wrapped.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return wrapped


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup, then decay."""
    warmup = int(config.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.lr_schedule == "linear":
        return 1.0 - progress
    return 1.0


def total_steps(num_train_pairs: int, config: TrainConfig) -> int:
    """Optimizer steps of the run: max_steps, or epochs × ceil(batches per epoch / accumulation)."""
    if config.max_steps is not None:
        return config.max_steps
    batches = math.ceil(num_train_pairs / config.batch_size)
    return config.epochs * math.ceil(batches / config.grad_accum_steps)


def _micro_batches(num_pairs: int, config: TrainConfig) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, pair indices) micro-batches; each epoch is a seeded shuffle."""
    rng = random.Random(config.seed)
    epoch = 0
    while True:
        order = list(range(num_pairs))
        rng.shuffle(order)
        for start in range(0, num_pairs, config.batch_size):
            yield epoch, order[start : start + config.batch_size]
        epoch += 1


def _train_loop(
    policy: CausalLM,
    train_set: list[EncodedPair],
    config: TrainConfig,
    pad_token_id: int,
    hooks: _Hooks,
) -> tuple[list[dict[str, Any]], int, float]:
    """Run the optimizer steps; return (per-step history, tokens forwarded, seconds)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = total_steps(len(train_set), config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, config))
    stream = _micro_batches(len(train_set), config)
    batches_per_epoch = math.ceil(len(train_set) / config.batch_size)
    history: list[dict[str, Any]] = []
    tokens, started, consumed = 0, time.perf_counter(), 0
    policy.train()
    for step in range(1, steps + 1):
        hooks.check_cancel()
        micro = [next(stream) for _ in range(config.grad_accum_steps)]
        consumed += len(micro)
        lr = optimizer.param_groups[0]["lr"]
        indices = [batch for _, batch in micro]
        metrics, step_tokens, step_positions = _accumulate(
            policy, train_set, indices, config, pad_token_id, check_reference=step == 1
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += step_tokens
        record = {"step": step, "epoch": consumed / batches_per_epoch, "lr": lr,
                  "grad_norm": float(grad_norm), "tokens": step_tokens,
                  "positions": step_positions, **metrics}  # fmt: skip
        history.append(record)
        if hooks.on_step:
            hooks.on_step(record)
    policy.eval()
    return history, tokens, time.perf_counter() - started


def _accumulate(
    policy: CausalLM,
    train_set: list[EncodedPair],
    micro_batches: list[list[int]],
    config: TrainConfig,
    pad_token_id: int,
    check_reference: bool = False,
) -> tuple[dict[str, float], int, int]:
    """Forward + backward each micro-batch, weighted by its share of the step's pairs.

    Returns the step's metrics, real tokens forwarded and positions forwarded (with padding)."""
    total_pairs = sum(len(indices) for indices in micro_batches)
    with_base = config.effective_anchor_weight > 0
    sums: dict[str, float] = {}
    tokens = positions = 0
    for indices in micro_batches:
        batch = [train_set[i] for i in indices]
        h_w, h_l, h_b, n_tokens, n_positions = pair_logratios(
            policy, batch, pad_token_id, with_base, packed=config.packing
        )
        if check_reference:
            check_fresh_reference(batch, h_w, h_l, h_b)
        result = bapo_loss(
            h_w, h_l, None if h_b is None else base_anchor(batch, h_b), beta=config.beta,
            anchor_weight=config.effective_anchor_weight, anchor_form=config.anchor_form,
            anchor_tolerance=config.anchor_tolerance,
        )  # fmt: skip
        weight = len(indices) / total_pairs
        (result.loss * weight).backward()
        for name, value in result.metrics.items():
            sums[name] = sums.get(name, 0.0) + weight * float(value)
        tokens += n_tokens
        positions += n_positions
    return sums, tokens, positions


def check_fresh_reference(
    batch: list[EncodedPair],
    h_chosen: torch.Tensor,
    h_rejected: torch.Tensor,
    h_base: torch.Tensor | None,
) -> None:
    """Raise StaleReferenceError when some |h| / tokens exceeds the bound at the first step.

    A free check of the caches: base answers and reference log-probs keyed to the wrong model,
    dtype or encoding show up here instead of silently training on poisoned numbers.
    """
    columns = [(h_chosen, "chosen"), (h_rejected, "rejected")]
    if h_base is not None:
        columns.append((h_base, "base"))
    for values, kind in columns:
        lengths = [len(getattr(p, kind) or [1]) for p in batch]
        for value, length in zip(values.detach().tolist(), lengths, strict=True):
            if abs(value) / length > FRESH_REFERENCE_NATS_PER_TOKEN:
                raise StaleReferenceError(
                    f"cached reference log-probs do not match the base model ({kind} response: "
                    f"|h| = {abs(value):.3f} nats over {length} tokens at step 1, where it must be "
                    "≈ 0); the engine cache was written by another model, dtype or encoding — "
                    "clear the base_responses/reference_logprobs caches for this model"
                )


def _final_metrics(
    run: _Run, config: TrainConfig, mc_questions: list[MCQuestion] | None
) -> dict[str, float]:
    """Preference and anchor metrics on the train and held-out pairs (+ MC retention if asked)."""
    train = pair_metrics(run.policy, [run.encoded[i] for i in run.train_idx], config, run.pad)
    metrics = {f"train_{k}": v for k, v in train.items()}
    if run.heldout_idx:
        heldout_set = [run.encoded[i] for i in run.heldout_idx]
        heldout = pair_metrics(run.policy, heldout_set, config, run.pad)
        metrics.update({f"heldout_{k}": v for k, v in heldout.items()})
        metrics["heldout_preference_accuracy"] = heldout["reward_accuracy"]
    if mc_questions:
        batch = config.score_batch_size
        retention = knowledge_retention(run.policy, run.tokenizer, mc_questions, None, batch)
        metrics.update(retention_metrics(retention))
    return metrics
