"""`python -m bench.training [--quick] [--device cuda --gpu-config NAME]`: our trainer vs TRL.

CPU (default): the bundled SmolLM2-135M-Instruct, synthetic chat pairs (or `--pairs hh-rlhf`).
CUDA: a random-initialised model from a config (`--gpu-config smollm2-135m|llama-1b`), bf16
autocast, with MFU. Results: bench/results/training.json + .md (CUDA: training.gpu.json + .md).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR, goals_json, machine_info, utc_now, write_results
from bench.training import benchmark, report
from bench.training.benchmark import PLANS, Plan, Setup
from bench.training.gpu import (
    GPU_CONFIGS,
    build_random_model,
    parameter_count,
    peak_flops,
    word_vocab_size,
)
from bench.training.pairs import hh_pairs, synthetic_pairs, word_pairs
from foundation.pairs import Pair


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="one round of 8 pairs, 4 variants (≈5 min)"
    )
    parser.add_argument("--plan", choices=sorted(PLANS), help="explicit plan (overrides --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--gpu-config",
        choices=sorted(GPU_CONFIGS),
        help="train a random-initialised model of this config (default on CUDA: smollm2-135m)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s (MFU)")
    parser.add_argument("--pairs", choices=("synthetic", "hh-rlhf"), default="synthetic")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--num-pairs", type=int, help="pairs of the first training")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per run on the CPU (1: on a busy 2-core machine, 1 thread trained 4× "
        "faster than 2 fighting over the cores)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bapo-bench-training"))
    parser.add_argument("--model-data-dir", type=Path, default=REPO_ROOT / "data")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def choose_plan(args: argparse.Namespace) -> Plan:
    """The plan from the flags."""
    name = args.plan or {
        ("cpu", False): "full", ("cpu", True): "quick",
        ("cuda", False): "gpu", ("cuda", True): "gpu-quick",
    }[(args.device, args.quick)]  # fmt: skip
    plan = PLANS[name]
    if args.num_pairs:
        plan = replace(plan, num_pairs=args.num_pairs)
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    return plan


def without_trl(plan: Plan) -> Plan:
    """The plan without TRL's variants (for a machine where trl or datasets is missing)."""
    ours = tuple(v for v in plan.variants if not v.startswith("trl"))
    return replace(plan, variants=ours, live_ref_rounds=0)


def model_and_pairs(
    args: argparse.Namespace, plan: Plan, work_dir: Path
) -> tuple[Path, list[Pair], str, str]:
    """(model folder, first + extra pairs, model description, pairs description)."""
    count = plan.num_pairs + plan.extra_pairs
    config_name = args.gpu_config or ("smollm2-135m" if args.device == "cuda" else None)
    if config_name:
        model_dir = build_random_model(config_name, work_dir / f"model-{config_name}", args.seed)
        vocab = word_vocab_size(GPU_CONFIGS[config_name]["vocab_size"])
        prompt_words, response_words = plan.word_pairs if plan.word_pairs[0] else (48, 96)
        pairs = word_pairs(count, vocab, prompt_words, response_words, args.seed)
        source = f"random words, {prompt_words}-word prompts, {response_words}-word responses"
        return model_dir, pairs, f"random-initialised {config_name} config", source
    from foundation.model import prepare_base_model

    model_dir = prepare_base_model(args.model_data_dir)
    if args.pairs == "hh-rlhf":
        return model_dir, hh_pairs(args.data_dir, count, args.seed), model_dir.name, "HH-RLHF"
    return model_dir, synthetic_pairs(count, args.seed), model_dir.name, "synthetic chat pairs"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, write the results, return the payload."""
    plan = choose_plan(args)
    notes = []
    if not all(importlib.util.find_spec(name) for name in ("trl", "datasets")):
        plan = without_trl(plan)
        notes.append("trl/datasets not installed here: TRL variants skipped.")
    machine = machine_info(with_gpu=args.device == "cuda")
    log = benchmark.timed(print)
    work_dir = args.work_dir.resolve()
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    model_dir, pairs, model_text, pairs_text = model_and_pairs(args, plan, work_dir)
    setup = Setup(model_dir, args.device, args.threads, work_dir)
    first, more = pairs[: plan.num_pairs], pairs
    log(f"{plan.mode}: {len(first)} pairs (+{plan.extra_pairs}), {plan.rounds} round(s), "
        f"{model_text} on {args.device}")  # fmt: skip
    runs, retrain = benchmark.run_rounds(plan, setup, first, more, log)
    benchmark.check_same_tokens(runs)
    summary = benchmark.summarize(runs, retrain)
    if args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        peak, peak_source = peak_flops(name, args.peak_tflops)
        params = parameter_count(model_dir)
        report.add_mfu(summary, params, peak)
        notes.append(f"MFU: N = {params:,} parameters, peak {peak or 0:.3g} FLOP/s ({peak_source})")
    else:
        notes.append("GPU variant (`--device cuda`) not run here: this machine has no CUDA device.")
    config = {**plan_config_defaults(), **plan.config}
    payload = {
        "benchmark": "training",
        "timestamp": utc_now(),
        "machine": machine,
        "plan": plan.__dict__,
        "config": config,
        "setup": {
            "device": args.device, "threads": args.threads, "model": model_text,
            "model_dir": str(model_dir), "pairs_source": pairs_text, "num_pairs": len(first),
            "extra_pairs": len(more) - len(first), "command": " ".join(sys.argv),
        },
        "ratios": benchmark.ratios(summary, args.device),
        "summary": summary,
        "goals": goals_json(report.goals(summary, config, args.device)),
        "runs": runs,
        "retrain_run": retrain,
        "notes": notes,
    }  # fmt: skip
    default_name = "training.gpu.json" if args.device == "cuda" else "training.json"
    out = args.out or RESULTS_DIR / default_name
    json_path, md_path = write_results(out, payload, report.markdown(payload))
    log(f"wrote {json_path} and {md_path}")
    return payload


def plan_config_defaults() -> dict[str, Any]:
    """The engine's TrainConfig defaults (what the plan does not override)."""
    from foundation.train_config import TrainConfig

    return TrainConfig().to_dict()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
    payload = run(args)
    print(report.markdown(payload).split("## Variants")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
