"""Training hyperparameters: one frozen dataclass with documented defaults, and its one parser.

`TrainConfig.parse()` is the only way a dict of hyperparameters (a job's request, TRAIN_DEFAULTS,
a stored job, `bapo train --config`) becomes a config: unknown keys, wrong JSON types and
out-of-range values raise a `ConfigError` that names the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

Method = Literal["bapo", "dpo"]
AnchorForm = Literal["hinge", "hinge_per_token", "hinge_tolerance", "replay", "sigmoid"]
Schedule = Literal["cosine", "linear", "constant"]

METHODS: tuple[str, ...] = ("bapo", "dpo")
# The anchor term's forms (worker/training/loss.py has each equation).
ANCHOR_FORMS: tuple[str, ...] = ("hinge", "hinge_per_token", "hinge_tolerance", "replay", "sigmoid")
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")
# vLLM only accepts these LoRA ranks (vllm/config/lora.py).
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class ConfigError(ValueError):
    """A hyperparameter is unknown, of the wrong type or out of range; `field` names it."""

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.field = name


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a training run; defaults suit a small LoRA on a few hundred pairs.

    The BAPO defaults (anchor form, λ, δ, learning rate, epochs, base-answer length) are the
    setting `bench.forgetting` chose on validation users by its fixed rule
    (bench/results/forgetting.json → selection.default: 32 steps of 4 pairs over 64 training
    pairs = 2 epochs); tests/unit/test_forgetting_bench.py checks that they still agree.
    """

    method: Method = "bapo"
    beta: float = 0.1
    anchor_weight: float = 1.0
    anchor_form: AnchorForm = "hinge_tolerance"
    anchor_tolerance: float = 32.0  # δ in nats, for anchor_form "hinge_tolerance"
    learning_rate: float = 5e-4
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum_steps: int = 1
    lr_schedule: Schedule = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)
    seed: int = 0
    max_prompt_tokens: int = 512
    max_response_tokens: int = 256
    heldout_fraction: float = 0.1
    min_pairs_for_heldout: int = 10
    base_max_new_tokens: int = 64
    base_do_sample: bool = False
    base_batch_size: int = 8
    score_batch_size: int = 8
    packing: bool = True  # the prompt forwarded once per pair (False: one padded row per sequence)
    gradient_checkpointing: bool = False  # recompute activations in backward (GPU memory)

    @property
    def effective_anchor_weight(self) -> float:
        """λ actually used: 0 for the DPO baseline."""
        return 0.0 if self.method == "dpo" else self.anchor_weight

    def validate(self) -> TrainConfig:
        """Raise ConfigError on the first out-of-range value; return self for chaining."""
        for name, message in _problems(self):
            raise ConfigError(message, name)
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (target_modules as a list)."""
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> TrainConfig:
        """A validated config from a (partial) dict of JSON values; ConfigError names the field.

        Strict JSON types (a string is not a number, a float not an int), so what the API
        accepts is exactly what the worker will run with.
        """
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown hyperparameter(s): {', '.join(unknown)}", unknown[0])
        try:
            config = _adapter().validate_json(json.dumps(dict(data)), strict=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = ".".join(str(part) for part in error["loc"])
            raise ConfigError(f"{name}: {error['msg']}", name) from exc
        except (TypeError, ValueError) as exc:  # json.dumps: not JSON values at all
            raise ConfigError(f"hyperparameters must be JSON values ({exc})") from exc
        return config.validate()


@functools.cache
def _adapter() -> TypeAdapter[TrainConfig]:
    """pydantic's validator of TrainConfig (built once: building it is slow)."""
    return TypeAdapter(TrainConfig)


def _problems(c: TrainConfig) -> list[tuple[str, str]]:
    """(field, message) of every out-of-range value, in field order."""
    checks: list[tuple[bool, str]] = [
        (c.method in METHODS, f"method must be one of {METHODS}, got {c.method!r}"),
        (c.anchor_form in ANCHOR_FORMS, f"anchor_form must be one of {ANCHOR_FORMS}"),
        (c.lr_schedule in SCHEDULES, f"lr_schedule must be one of {SCHEDULES}"),
        (c.beta > 0, "beta must be > 0"),
        (c.anchor_weight >= 0, "anchor_weight must be >= 0"),
        (c.anchor_tolerance >= 0, "anchor_tolerance must be >= 0"),
        (c.learning_rate > 0, "learning_rate must be > 0"),
        (c.epochs >= 1, "epochs must be >= 1"),
        (c.max_steps is None or c.max_steps >= 1, "max_steps must be >= 1 when given"),
        (c.batch_size >= 1, "batch_size must be >= 1"),
        (c.grad_accum_steps >= 1, "grad_accum_steps must be >= 1"),
        (0 <= c.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        (c.weight_decay >= 0, "weight_decay must be >= 0"),
        (c.max_grad_norm > 0, "max_grad_norm must be > 0"),
        (c.lora_rank in VLLM_LORA_RANKS, f"lora_rank must be one of {VLLM_LORA_RANKS} (vLLM)"),
        (c.lora_alpha > 0, "lora_alpha must be > 0"),
        (0 <= c.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
        (len(c.target_modules) > 0, "target_modules must not be empty"),
        (c.max_prompt_tokens >= 8, "max_prompt_tokens must be >= 8"),
        (c.max_response_tokens >= 1, "max_response_tokens must be >= 1"),
        (0 <= c.heldout_fraction < 1, "heldout_fraction must be in [0, 1)"),
        (c.min_pairs_for_heldout >= 2, "min_pairs_for_heldout must be >= 2"),
        (c.base_max_new_tokens >= 1, "base_max_new_tokens must be >= 1"),
        (c.base_batch_size >= 1, "base_batch_size must be >= 1"),
        (c.score_batch_size >= 1, "score_batch_size must be >= 1"),
    ]
    # Each message starts with the name of its field.
    return [(message.split(" ", 1)[0], message) for ok, message in checks if not ok]
