"""The operator's upper bounds on a job's hyperparameters (TRAIN_MAX_*, VLLM_MAX_LORA_RANK,
VLLM_LORA_MODULES): what one user key may ask a GPU for, and what the inference server can load.

Checked by the API before a job is stored (422 naming the field and the bound) and at start-up on
TRAIN_DEFAULTS; the worker checks the adapter it actually trained before publishing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.core.config import Settings
    from foundation.train_config import TrainConfig


def limit_violations(settings: Settings, config: TrainConfig) -> list[tuple[str, str]]:
    """(field, what is wrong) for every hyperparameter above its bound (empty: within them)."""
    caps = [
        ("epochs", config.epochs, settings.train_max_epochs, "TRAIN_MAX_EPOCHS"),
        ("max_steps", config.max_steps or 0, settings.train_max_steps, "TRAIN_MAX_STEPS"),
        ("batch_size", config.batch_size, settings.train_max_batch_size, "TRAIN_MAX_BATCH_SIZE"),
        (
            "grad_accum_steps",
            config.grad_accum_steps,
            settings.train_max_grad_accum_steps,
            "TRAIN_MAX_GRAD_ACCUM_STEPS",
        ),
        ("lora_rank", config.lora_rank, settings.vllm_max_lora_rank, "VLLM_MAX_LORA_RANK"),
        (
            "max_prompt_tokens",
            config.max_prompt_tokens,
            settings.train_max_prompt_tokens,
            "TRAIN_MAX_PROMPT_TOKENS",
        ),
        (
            "max_response_tokens",
            config.max_response_tokens,
            settings.train_max_response_tokens,
            "TRAIN_MAX_RESPONSE_TOKENS",
        ),
        (
            "base_max_new_tokens",
            config.base_max_new_tokens,
            settings.train_max_response_tokens,
            "TRAIN_MAX_RESPONSE_TOKENS",
        ),
        (
            "base_batch_size",
            config.base_batch_size,
            settings.train_max_batch_size,
            "TRAIN_MAX_BATCH_SIZE",
        ),
        (
            "score_batch_size",
            config.score_batch_size,
            settings.train_max_batch_size,
            "TRAIN_MAX_BATCH_SIZE",
        ),
    ]
    found = [
        (name, f"{value} is above this server's limit of {bound} ({setting})")
        for name, value, bound, setting in caps
        if value > bound
    ]
    foreign = [m for m in config.target_modules if m not in settings.vllm_lora_modules]
    if foreign:
        allowed = ", ".join(settings.vllm_lora_modules)
        found.append(
            (
                "target_modules",
                f"{', '.join(foreign)} not among the modules the inference server applies LoRA "
                f"to (VLLM_LORA_MODULES: {allowed})",
            )
        )
    return found
