"""The training benchmark's plan and run: interleaved rounds of child processes, then a summary.

Each round runs every variant once (machines are noisy: ratios are taken within a round, then the
median over rounds), in an ABBA order: each compared pair of variants runs back to back (our DPO
packed / padded, our DPO / TRL, TRL / our BAPO, our BAPO packed / padded), and every other round
reverses the order, so a slow drift of the machine's load favours no variant.

Our variants keep their caches (base responses, reference log-probs) in a folder per variant: the
first round starts empty (a first training), later rounds find them filled (a retrain of the same
pairs). After the first round, an incremental retrain reuses the BAPO run's caches with 10% more
pairs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, median, ratio
from bench.training.variants import RunSpec
from foundation.pairs import Pair

Log = Callable[[str], None]
GOAL_DPO_VS_TRL = 2.0  # our DPO / TRL DPO (precomputed reference), pair tokens per CPU-second
GOAL_BAPO_VS_TRL = 1.2  # our BAPO / TRL DPO, the same
GOAL_PEAK_MEMORY_VS_TRL = 1.0  # our BAPO's peak memory / TRL DPO's, at most
PREPARE_PHASES = ("base_responses", "reference_logprobs")


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run (`full`, `quick`, `smoke`, or the GPU ones)."""

    mode: str
    num_pairs: int
    rounds: int
    variants: tuple[str, ...] = ("ours_dpo", "trl_dpo", "ours_bapo")
    live_ref_rounds: int = 0  # how many rounds also run trl_dpo_live_ref
    retrain: bool = True
    retrain_fraction: float = 0.1
    config: dict[str, Any] = field(default_factory=dict)
    word_pairs: tuple[int, int] = (0, 0)  # (prompt words, response words) for random models
    child_timeout_s: float = 1800.0

    @property
    def extra_pairs(self) -> int:
        """New pairs of the incremental retrain (at least one)."""
        return max(1, math.ceil(self.num_pairs * self.retrain_fraction))


# Shared hyperparameters: the engine's defaults, except dropout 0 (TRL disables dropout) and no
# held-out slice (every variant trains on every pair); one epoch per run.
COMMON_CONFIG: dict[str, Any] = {"epochs": 1, "lora_dropout": 0.0, "heldout_fraction": 0.0}
# Compared pairs run back to back (round_variants): packed/padded, ours/TRL, TRL/ours, packed/padded
ALL_VARIANTS = ("ours_dpo", "ours_dpo_padded", "trl_dpo", "ours_bapo", "ours_bapo_padded")
PLANS: dict[str, Plan] = {
    # 3 rounds × (4 of ours × 15–40 s + TRL 35 s) + the live-reference run + the retrain: about
    # 10 min on the 2-core dev box with one thread (2026-12-01: 597 s)
    "full": Plan(
        "full", num_pairs=8, rounds=3, variants=ALL_VARIANTS, live_ref_rounds=1,
        config=COMMON_CONFIG,
    ),
    "quick": Plan(
        "quick", num_pairs=8, rounds=1,
        variants=("ours_dpo", "trl_dpo", "ours_bapo", "ours_bapo_padded"), config=COMMON_CONFIG,
    ),
    "smoke": Plan(
        "smoke", num_pairs=4, rounds=1, variants=ALL_VARIANTS, retrain_fraction=0.25,
        config={**COMMON_CONFIG, "batch_size": 2, "base_max_new_tokens": 4},
        word_pairs=(6, 8), child_timeout_s=300,
    ),
    "gpu": Plan(
        "gpu", num_pairs=128, rounds=3, variants=ALL_VARIANTS, live_ref_rounds=3,
        config={**COMMON_CONFIG, "batch_size": 16, "base_batch_size": 32, "score_batch_size": 32},
        word_pairs=(128, 256), child_timeout_s=1200,
    ),
    "gpu-quick": Plan(
        "gpu-quick", num_pairs=64, rounds=1,
        config={**COMMON_CONFIG, "batch_size": 16, "base_batch_size": 32, "score_batch_size": 32},
        word_pairs=(128, 256), child_timeout_s=900,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """Where a run happens: model folder, device, threads, work folder."""

    model_dir: Path
    device: str
    threads: int
    work_dir: Path


def pair_dict(pair: Pair) -> dict[str, Any]:
    """A pair as pair_from_dict reads it."""
    return {"messages": pair.messages, "chosen": pair.chosen, "rejected": pair.rejected}


def round_variants(plan: Plan, round_index: int) -> list[str]:
    """The variants of one round (0-based), in this round's order: reversed every other round."""
    variants = list(plan.variants)
    if round_index < plan.live_ref_rounds:
        variants.append("trl_dpo_live_ref")
    return variants[::-1] if round_index % 2 else variants


def child_env(setup: Setup, hf_cache: Path) -> dict[str, str]:
    """The child's environment: offline, thread counts pinned, a private datasets cache."""
    threads = str(setup.threads)
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(hf_cache),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
    }


def run_child(spec: RunSpec, setup: Setup, timeout_s: float) -> dict[str, Any]:
    """Run one spec in a fresh process; its log goes to the work folder."""
    folder = Path(spec.out_dir).parent
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = folder / "spec.json", folder / "result.json"
    spec_path.write_text(json.dumps(asdict(spec)), encoding="utf-8")
    log_path = folder / "child.log"
    command = [sys.executable, "-m", "bench.training.child", str(spec_path), str(result_path)]
    with open(log_path, "wb") as log:
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=child_env(setup, folder / "hf-datasets"),
            stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{spec.variant} run failed (exit {done.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
    shutil.rmtree(Path(spec.out_dir), ignore_errors=True)  # the adapter is not needed
    return result


def run_rounds(
    plan: Plan, setup: Setup, first: list[Pair], more: list[Pair], log: Log
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every round's runs (with `round` set), and the incremental retrain's run (or None)."""
    runs: list[dict[str, Any]] = []
    retrain: dict[str, Any] | None = None
    base = RunSpec(
        variant="", model_dir=str(setup.model_dir), pairs=[pair_dict(p) for p in first],
        config=plan.config, out_dir="", device=setup.device, threads=setup.threads,
    )  # fmt: skip
    for index in range(plan.rounds):
        for variant in round_variants(plan, index):
            spec = replace(
                base, variant=variant, label=f"round {index + 1}",
                out_dir=str(setup.work_dir / f"r{index + 1}-{variant}" / "out"),
                cache_dir=str(setup.work_dir / f"caches-{variant}"),
            )  # fmt: skip
            result = {**run_child(spec, setup, plan.child_timeout_s), "round": index + 1}
            runs.append(result)
            log(f"round {index + 1} {variant}: {result['pair_tokens_per_s']:.1f} pair tokens/s, "
                f"loop {result['train_loop_s']:.1f} s (CPU {result['train_loop_cpu_s']:.1f} s), "
                f"wall {result['wall_s']:.1f} s")  # fmt: skip
        if index == 0 and plan.retrain:
            spec = replace(
                base, variant="ours_bapo_retrain", label="retrain +new pairs",
                pairs=[pair_dict(p) for p in more],
                cache_dir=str(setup.work_dir / "caches-ours_bapo"),
                out_dir=str(setup.work_dir / "retrain" / "out"),
            )  # fmt: skip
            retrain = run_child(spec, setup, plan.child_timeout_s)
            log(f"retrain with {len(more) - len(first)} new pairs: wall {retrain['wall_s']:.1f} s")
    return runs, retrain


# --- summary --------------------------------------------------------------------------------------


def variant_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over one variant's runs."""

    def med(key: str) -> float:
        return median([float(r[key]) for r in runs if r.get(key) is not None])

    first = [r for r in runs if r["round"] == 1]
    later = [r for r in runs if r["round"] > 1]
    return {
        "runs": len(runs),
        "forwarded_positions": runs[0]["forwarded_positions"],
        "positions_per_pair": med("positions_per_pair"),
        "padding_fraction": med("padding_fraction"),
        "pair_tokens_per_s": med("pair_tokens_per_s"),
        "pair_tokens_per_cpu_s": med("pair_tokens_per_cpu_s"),
        "forwarded_tokens_per_s": med("forwarded_tokens_per_s"),
        "train_loop_s_per_epoch": med("train_loop_s_per_epoch"),
        "wall_first_s": median([r["wall_s"] for r in first]),
        "wall_later_s": median([r["wall_s"] for r in later]),
        "prepare_first_s": median([prepare_seconds(r) for r in first]),
        "prepare_later_s": median([prepare_seconds(r) for r in later]),
        "peak_rss_mib": med("peak_rss_mib"),
        "rss_at_train_start_mib": med("rss_at_train_start_mib"),
        "cuda_peak_mib": med("cuda_peak_mib"),
        "epoch_pair_tokens": runs[0]["epoch_pair_tokens"],
        "forwarded_tokens": runs[0]["forwarded_tokens"],
        "mean_tokens": runs[0].get("mean_tokens", {}),
        "steps": runs[0]["steps"],
    }


def prepare_seconds(run: dict[str, Any]) -> float:
    """Seconds spent before training on base responses and reference log-probs (TRL: tokenising
    and precomputing reference log-probs)."""
    phases = run["phases_s"]
    if "tokenize_and_reference_logprobs" in phases:
        return float(phases["tokenize_and_reference_logprobs"])
    return float(sum(phases.get(name, 0.0) for name in PREPARE_PHASES))


def round_ratios(
    runs: list[dict[str, Any]], numerator: str, denominator: str, key: str
) -> list[float]:
    """Per round: numerator's `key` / denominator's `key` (rounds having both, with values)."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["variant"]] = run
    return [
        ratio(float(pair[numerator][key]), float(pair[denominator][key]))
        for pair in by_round.values()
        if numerator in pair and denominator in pair
        and pair[numerator].get(key) is not None and pair[denominator].get(key) is not None
    ]  # fmt: skip


# (ours, what it is compared with): against TRL, and packed against our own padded layout
COMPARED = (
    *((ours, trl) for ours in ("ours_dpo", "ours_bapo") for trl in ("trl_dpo", "trl_dpo_live_ref")),
    ("ours_bapo", "ours_bapo_padded"),
    ("ours_dpo", "ours_dpo_padded"),
)


def comparisons(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per compared pair of variants (COMPARED, when both ran): throughput ratios per round and
    their median; end-to-end speed-ups of the first round (our caches empty) and of later rounds
    (our caches filled); peak memory ratios (ours / the other) per round and their median."""
    out: dict[str, dict[str, Any]] = {}
    for ours, other in COMPARED:
        speed = round_ratios(runs, ours, other, "pair_tokens_per_s")
        if not speed:
            continue
        cpu_speed = round_ratios(runs, ours, other, "pair_tokens_per_cpu_s")
        wall = round_ratios(runs, other, ours, "wall_s")
        rss = round_ratios(runs, ours, other, "peak_rss_mib")
        cuda = round_ratios(runs, ours, other, "cuda_peak_mib")
        out[f"{ours}_vs_{other}"] = {
            "throughput_ratio": median(speed),
            "throughput_ratio_per_round": speed,
            "cpu_throughput_ratio": median(cpu_speed),
            "cpu_throughput_ratio_per_round": cpu_speed,
            "wall_speedup_first": wall[0],
            "wall_speedup_later": median(wall[1:]),
            "peak_rss_ratio": median(rss),
            "peak_rss_ratio_per_round": rss,
            "cuda_peak_ratio": median(cuda),
        }
    return out


def ratios(summary: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """The headline ratios (the results' top-level "ratios"), medians over rounds of ratios taken
    within a round. On the CPU: throughput by the training loop's CPU time, memory by the child's
    peak RSS; on CUDA: throughput by the wall clock, memory by the peak CUDA allocation."""
    comps, variants = summary["comparisons"], summary["variants"]
    speed = "cpu_throughput_ratio" if device == "cpu" else "throughput_ratio"
    memory = "peak_rss_ratio" if device == "cpu" else "cuda_peak_ratio"

    def get(name: str, key: str) -> float:
        value = comps.get(name, {}).get(key)
        return math.nan if value is None else float(value)

    return {
        "bapo_vs_trl_dpo": get("ours_bapo_vs_trl_dpo", speed),
        "dpo_vs_trl_dpo": get("ours_dpo_vs_trl_dpo", speed),
        "bapo_vs_trl_dpo_live_ref": get("ours_bapo_vs_trl_dpo_live_ref", speed),
        "dpo_vs_trl_dpo_live_ref": get("ours_dpo_vs_trl_dpo_live_ref", speed),
        "peak_memory_vs_trl_dpo": get("ours_bapo_vs_trl_dpo", memory),
        "peak_memory_dpo_vs_trl_dpo": get("ours_dpo_vs_trl_dpo", memory),
        "padding_fraction": {name: v["padding_fraction"] for name, v in variants.items()},
        "positions_per_pair": {name: v["positions_per_pair"] for name, v in variants.items()},
        "packed_vs_padded": {
            "bapo": get("ours_bapo_vs_ours_bapo_padded", speed),
            "dpo": get("ours_dpo_vs_ours_dpo_padded", speed),
        },
    }


def incremental_summary(first: dict[str, Any], retrain: dict[str, Any]) -> dict[str, Any]:
    """The retrain with more pairs against the first training (same caches)."""
    new_pairs = retrain["num_pairs"] - first["num_pairs"]
    prep_first, prep_retrain = prepare_seconds(first), prepare_seconds(retrain)
    return {
        "first_pairs": first["num_pairs"],
        "new_pairs": new_pairs,
        "new_fraction": new_pairs / first["num_pairs"],
        "prepare_first_s": prep_first,
        "prepare_retrain_s": prep_retrain,
        "prepare_ratio": ratio(prep_retrain, prep_first),
        "wall_first_s": first["wall_s"],
        "wall_retrain_s": retrain["wall_s"],
        "wall_ratio": ratio(retrain["wall_s"], first["wall_s"]),
        "phases_first_s": first["phases_s"],
        "phases_retrain_s": retrain["phases_s"],
        "cache_stats_first": first["cache_stats"],
        "cache_stats_retrain": retrain["cache_stats"],
    }


def summarize(runs: list[dict[str, Any]], retrain: dict[str, Any] | None) -> dict[str, Any]:
    """Per-variant medians, the ratios, and the incremental retrain."""
    names = sorted({r["variant"] for r in runs}, key=[*PLAN_ORDER].index)
    summary: dict[str, Any] = {
        "variants": {v: variant_summary([r for r in runs if r["variant"] == v]) for v in names},
        "comparisons": comparisons(runs),
        "incremental": None,
    }
    firsts = [r for r in runs if r["variant"] == "ours_bapo" and r["round"] == 1]
    if retrain is not None and firsts:
        summary["incremental"] = incremental_summary(firsts[0], retrain)
    return summary


PLAN_ORDER = (
    "ours_dpo", "ours_dpo_padded", "ours_bapo", "ours_bapo_padded", "trl_dpo", "trl_dpo_live_ref",
)  # fmt: skip


def check_same_tokens(runs: list[dict[str, Any]]) -> None:
    """Every variant must have counted the same pair tokens (same pairs, same encoding)."""
    counts = {r["epoch_pair_tokens"] for r in runs}
    if len(counts) != 1:
        raise RuntimeError(f"variants counted different pair tokens per epoch: {sorted(counts)}")


def timed(log: Log) -> Callable[[str], None]:
    """A logger prefixing the seconds since it was made."""
    started = time.perf_counter()

    def write(message: str) -> None:
        log(f"[{time.perf_counter() - started:6.0f}s] {message}")

    return write
