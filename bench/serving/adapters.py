"""Rank-8 PEFT adapters for the serving benchmark, and publishing them as users' versions.

The adapters are real PEFT LoRA adapters on all linear layers with random (small) B matrices: they
cost exactly what trained ones cost to serve. Publishing does what the training worker does: copy
the folder to ADAPTER_DIR/<user>/v<N> and `register_adapter` it (which also links it under
ADAPTER_DIR/@by-name/<name> for vLLM's resolver), in one transaction.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from foundation.train_config import DEFAULT_TARGET_MODULES

SERVED_NAME = "smollm2-135m-instruct"
RANK = 8


def build_adapters(
    model_dir: Path, out_dir: Path, seeds: list[int], scale: float = 0.2
) -> list[Path]:
    """One rank-8 adapter per seed (random B scaled by `scale`), saved with PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    folders = []
    for seed in seeds:
        torch.manual_seed(seed)
        config = LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=list(DEFAULT_TARGET_MODULES),
            init_lora_weights=False, task_type="CAUSAL_LM",
        )  # fmt: skip
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
        model.peft_config["default"].base_model_name_or_path = SERVED_NAME
        folder = out_dir / f"seed{seed}"
        model.save_pretrained(str(folder))
        folders.append(folder)
        base = model.unload()
    return folders


def publish(
    database_url: str,
    adapter_root: Path,
    user_id: str,
    folder: Path,
    *,
    active: bool,
    resolver_base: str | None = None,
) -> tuple[int, str, Path]:
    """Copy `folder` in as the user's next version and register it; (version, name, path).

    `resolver_base`: the model the vLLM servers were started with (their `--model`), which the
    version's `@by-name` link names, so their filesystem LoRA resolver loads it by name."""
    from sqlalchemy import create_engine

    from app.core.db import make_sessionmaker, transaction
    from app.services import adapters as adapter_service
    from foundation.adapter_store import AdapterStore

    engine = create_engine(database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            version = adapter_service.next_version(session, user_id)
            target = AdapterStore(adapter_root).version_folder(user_id, version)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(folder, target)
            adapter = adapter_service.register_adapter(
                session, user_id, target, job_id=None, method="bapo",
                metrics={"bench": True}, gate_passed=active, gate_reason=None,
                resolver_base=resolver_base,
            )  # fmt: skip
            return adapter.version, adapter.name, Path(adapter.path)
    finally:
        engine.dispose()
