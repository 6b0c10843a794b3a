"""Before publishing: is the trained adapter one the configured inference server will load?

vLLM refuses an adapter when it is loaded, and from then on every generate of that user is a 503,
if its rank (or any `rank_pattern` entry) is above `--max-lora-rank`, if it has
`modules_to_save`, DoRA or bias weights, or if it carries weights for modules vLLM does not apply
LoRA to (the model's linear projections). The API refuses such hyperparameters; this check is the
backstop for a job accepted under other settings (a limit lowered since, a worker configured for a
smaller server) and for whatever the engine writes. Reads adapter_config.json and the safetensors
header only: no torch, no weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from app.core.config import Settings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LORA_WEIGHT_RE = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


class AdapterNotServable(ValueError):
    """The inference server would refuse the adapter: the job fails (never retried)."""


def check_servable(settings: Settings, adapter_dir: Path) -> None:
    """Raise AdapterNotServable, naming every reason, unless the server can load this adapter."""
    problems = config_problems(settings, _read_config(adapter_dir / CONFIG_FILE))
    problems += weight_problems(settings, safetensors_header(adapter_dir / WEIGHTS_FILE))
    if problems:
        reasons = "; ".join(dict.fromkeys(problems))  # in order, without repeats
        raise AdapterNotServable(f"the inference server would refuse this adapter: {reasons}")


def config_problems(settings: Settings, config: dict[str, Any]) -> list[str]:
    """What vLLM's adapter-config validation would refuse."""
    problems = []
    ranks = [int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())]
    problems += _rank_problems(settings, max(ranks))
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (only LoRA weights serve)")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported by vLLM")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("bias weights are not supported by vLLM")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        problems += _module_problems(settings, targets)
    return problems


def weight_problems(settings: Settings, header: dict[str, Any]) -> list[str]:
    """What vLLM's weight loading would refuse: non-LoRA tensors, foreign modules, ranks."""
    problems, modules, ranks = [], [], [0]
    for key, info in header.items():
        if key == "__metadata__":
            continue
        match = LORA_WEIGHT_RE.fullmatch(key)
        if match is None:
            problems.append(f"tensor {key!r} is not a LoRA A/B weight")
            continue
        modules.append(match["module"].rsplit(".", 1)[-1])
        shape = info.get("shape") or [0, 0]
        ranks.append(int(shape[0] if match["part"] == "A" else shape[-1]))
    return problems + _rank_problems(settings, max(ranks)) + _module_problems(settings, modules)


def _rank_problems(settings: Settings, rank: int) -> list[str]:
    limit = settings.vllm_max_lora_rank
    if rank <= limit:
        return []
    return [f"LoRA rank {rank} is above the server's maximum {limit} (VLLM_MAX_LORA_RANK)"]


def _module_problems(settings: Settings, modules: list[str]) -> list[str]:
    foreign = sorted(set(modules) - set(settings.vllm_lora_modules))
    if not foreign:
        return []
    names = ", ".join(foreign)
    return [f"LoRA on {names}, not among the server's LoRA modules (VLLM_LORA_MODULES)"]


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterNotServable(f"unreadable {path.name}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterNotServable(f"{path.name} is not a JSON object")
    return config


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets}."""
    try:
        with path.open("rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size <= MAX_HEADER_BYTES:
                raise ValueError(f"header size {size}")
            header = json.loads(file.read(size))
    except (OSError, ValueError) as exc:
        raise AdapterNotServable(f"unreadable {path.name}: {exc}") from exc
    if not isinstance(header, dict):
        raise AdapterNotServable(f"{path.name} has no tensor table")
    return header
