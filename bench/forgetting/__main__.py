"""`python -m bench.forgetting [--quick]`: BAPO vs DPO personalization and forgetting."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.forgetting.benchmark import run_benchmark, write_report
from bench.forgetting.datasets import DATA_DIR_ENV, default_data_dir
from bench.forgetting.plan import PLANS
from foundation.model import prepare_base_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.forgetting", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the ≈15-minute version")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"evaluation data (default: ${DATA_DIR_ENV} or ../shared/data)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result JSON; the .md table and .png plot go next to it (default: "
        "bench/results/forgetting.json, forgetting-quick.json with --quick)",
    )
    parser.add_argument(
        "--data-seed", type=int, default=0, help="fixes the users' slices and the MC subsets"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="ignore the runs already recorded in --out (default: resume and skip them)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp/bapo-bench-forgetting"),
        help="adapters (deleted after scoring) and the engine's caches",
    )
    parser.add_argument(
        "--model-data-dir",
        type=Path,
        default=REPO_ROOT / "data",
        help="where the bundled model is converted once (the service's data dir)",
    )
    parser.add_argument("--keep-adapters", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's; use 1 when other jobs share the cores — "
        "two threads waiting on each other behind other processes ran ~10x slower here)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the runs, forked after the base measurements; each computes on "
        "one thread (one worker per core)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only re-render the .md and .png from an existing --out JSON (also mid-run)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON, Markdown and PNG."""
    args = parse_args(argv)
    if args.out is None:
        name = "forgetting-quick.json" if args.quick else "forgetting.json"
        args.out = REPO_ROOT / "bench/results" / name
    import matplotlib  # noqa: F401  (fail now, not after hours of training)

    if args.report_only:  # README's block follows the full run's result only
        full = args.out.resolve() == (REPO_ROOT / "bench/results/forgetting.json").resolve()
        write_report(args.out.resolve(), readme=REPO_ROOT / "README.md" if full else None)
        return 0
    data_dir = (args.data_dir or default_data_dir(REPO_ROOT)).resolve()
    if not data_dir.is_dir():
        print(
            f"no evaluation data at {data_dir} (set --data-dir or ${DATA_DIR_ENV})", file=sys.stderr
        )
        return 2
    plan = PLANS["quick" if args.quick else "full"]()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f}s] {message}", flush=True)

    model_path = prepare_base_model(args.model_data_dir)
    log(f"{plan.mode} mode, data seed {args.data_seed}, data {data_dir}, model {model_path}")
    run_benchmark(
        plan,
        data_seed=args.data_seed,
        data_dir=data_dir,
        model_path=model_path,
        work_dir=args.work_dir,
        out_path=args.out.resolve(),
        log=log,
        keep_adapters=args.keep_adapters,
        resume=not args.fresh,
        workers=args.workers,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
