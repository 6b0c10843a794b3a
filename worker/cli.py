"""The `bapo` command line: train and evaluate adapters without the service.

Subcommands register themselves in build_parser(); each handler validates all input before it
loads a model, and reports bad input as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.core.errors import AppError
from foundation.adapter_store import AdapterStore
from foundation.model import DEFAULT_SERVED_MODEL_NAME, ModelNotFoundError, prepare_base_model
from foundation.pairs import PairError
from foundation.train_config import ANCHOR_FORMS, METHODS, ConfigError, TrainConfig
from worker.ops_cli import add_operator_commands
from worker.training.artifacts import AdapterExistsError, check_out_dir
from worker.training.cache import CacheFileError, JsonFileCache
from worker.training.data import load_pairs_jsonl

EXIT_BAD_INPUT = 2
INPUT_ERRORS = (PairError, ConfigError, AdapterExistsError, CacheFileError, ModelNotFoundError)


class UsageError(ValueError):
    """Bad command-line input, reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage dump) with exit status 2."""

    def error(self, message: str) -> Any:
        """Print `prog: error: message` and exit 2."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def default_data_dir() -> Path:
    """DATA_DIR from the environment, else ./data."""
    return Path(os.environ.get("DATA_DIR") or "data")


def build_parser() -> argparse.ArgumentParser:
    """The `bapo` parser; add a subcommand with a `_add_<name>(subparsers)` function."""
    parser = _Parser(prog="bapo", description="BAPO personalization engine")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_prepare_model(subparsers)
    add_operator_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on bad arguments
        return int(exc.code or 0)
    try:
        return int(args.handler(args))
    except (UsageError, *INPUT_ERRORS) as exc:
        print(f"bapo {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except AppError as exc:  # operator commands: unknown user, existing user, bad export...
        print(f"bapo {args.command}: error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT if exc.status_code in (400, 422) else 1


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --data-dir, shared by the subcommands that load the base model."""
    parser.add_argument(
        "--model", default="bundled", help="HF model folder, or 'bundled' (default)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="model cache folder (default: $DATA_DIR or ./data)",
    )


def _model_path(args: argparse.Namespace) -> Path:
    """The prepared base model folder for --model/--data-dir."""
    return prepare_base_model(args.data_dir or default_data_dir(), args.model)


def _quiet_transformers() -> None:
    """No progress bars from transformers in CLI output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# --- train ------------------------------------------------------------------------------------

# (flag, TrainConfig field, type, help); every default comes from TrainConfig.
_TRAIN_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--method", "method", str, "bapo, or dpo (anchor weight 0)"),
    ("--anchor-weight", "anchor_weight", float, "λ, the base-anchor weight"),
    ("--anchor-form", "anchor_form", str, "anchor term: " + ", ".join(ANCHOR_FORMS)),
    ("--anchor-tolerance", "anchor_tolerance", float, "δ in nats (anchor form hinge_tolerance)"),
    ("--beta", "beta", float, "β, the DPO temperature"),
    ("--lr", "learning_rate", float, "AdamW peak learning rate"),
    ("--rank", "lora_rank", int, "LoRA rank (vLLM allows 1,8,16,32,64,128,256,320,512)"),
    ("--lora-alpha", "lora_alpha", int, "LoRA alpha"),
    ("--batch-size", "batch_size", int, "pairs per micro-batch"),
    ("--grad-accum", "grad_accum_steps", int, "micro-batches per optimizer step"),
    ("--seed", "seed", int, "seed for LoRA init, shuffling, held-out split"),
    ("--max-prompt-tokens", "max_prompt_tokens", int, "prompt tokens kept (oldest cut)"),
    ("--max-response-tokens", "max_response_tokens", int, "response tokens kept (end cut)"),
    ("--base-max-new-tokens", "base_max_new_tokens", int, "length of generated base answers"),
]
_CHOICES = {"method": METHODS, "anchor_form": ANCHOR_FORMS}


def _add_train(subparsers: Any) -> None:
    """`bapo train`: pairs jsonl → adapter folder + metrics.json."""
    defaults = TrainConfig()
    p = subparsers.add_parser("train", help="train a LoRA adapter on preference pairs")
    p.add_argument("--pairs", type=Path, required=True, help='jsonl: {"prompt"|"messages", ...}')
    p.add_argument("--out", type=Path, required=True, help="adapter folder to create")
    for flag, name, kind, text in _TRAIN_OPTIONS:
        p.add_argument(
            flag, dest=name, type=kind, choices=_CHOICES.get(name),
            help=f"{text} (default: {getattr(defaults, name)})",
        )  # fmt: skip
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help=f"passes over the pairs ({defaults.epochs})")
    length.add_argument("--max-steps", type=int, help="optimizer steps (instead of --epochs)")
    p.add_argument("--config", type=Path, help="JSON object of TrainConfig fields (flags win)")
    p.add_argument("--cache", type=Path, help="JSON file caching base responses and ref log-probs")
    p.add_argument(
        "--served-model-name",
        default=DEFAULT_SERVED_MODEL_NAME,
        help=f"base_model_name_or_path in the adapter (default: {DEFAULT_SERVED_MODEL_NAME})",
    )
    _add_model_options(p)
    p.set_defaults(handler=_run_train)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config (if any) overridden by explicit flags, parsed like a job's."""
    values: dict[str, Any] = _read_json_object(args.config) if args.config else {}
    names = [name for _, name, _, _ in _TRAIN_OPTIONS] + ["epochs", "max_steps"]
    for name in names:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return TrainConfig.parse(values)


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or UsageError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object")
    return data


def _run_train(args: argparse.Namespace) -> int:
    """Validate everything, then prepare the model, train and save."""
    pairs = load_pairs_jsonl(args.pairs)
    config = _train_config(args)
    check_out_dir(args.out)
    cache = JsonFileCache(args.cache) if args.cache else None
    _quiet_transformers()
    from worker.training.trainer import train

    result = train(
        _model_path(args), pairs, config, out_dir=args.out, base_cache=cache, ref_cache=cache,
        on_step=_print_step, on_phase=lambda name: print(f"[{name}]", file=sys.stderr),
        served_model_name=args.served_model_name,
    )  # fmt: skip
    summary = result.to_json()
    summary.pop("history")
    print(json.dumps(summary, indent=2))
    return 0


def _print_step(metrics: dict[str, Any]) -> None:
    """One compact progress line per optimizer step, on stderr."""
    shown = ("loss", "dpo_loss", "anchor_loss", "reward_accuracy", "reward_margin")
    values = " ".join(f"{k}={metrics[k]:.4f}" for k in shown if k in metrics)
    print(f"step {metrics['step']} lr={metrics['lr']:.2e} {values}", file=sys.stderr)


# --- eval -------------------------------------------------------------------------------------


def _add_eval(subparsers: Any) -> None:
    """`bapo eval`: multiple-choice accuracy of the base model and an adapter."""
    p = subparsers.add_parser("eval", help="multiple-choice accuracy: base vs adapter")
    p.add_argument("--adapter", required=True, help="adapter folder, or 'none' for the base only")
    p.add_argument(
        "--mc", type=Path, help="ARC jsonl / MMLU csv / TruthfulQA json (default: shipped)"
    )
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    _add_model_options(p)
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    """Validate the adapter and MC file, then score base (and adapter)."""
    from worker.training.evaluate import MCFormatError, evaluate_adapter, general_mc_path, load_mc

    adapter = None if args.adapter == "none" else Path(args.adapter)
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"not an adapter folder (no adapter_config.json): {adapter}")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    mc_file = args.mc or general_mc_path()
    try:
        questions = load_mc(mc_file)
    except MCFormatError as exc:
        raise UsageError(str(exc)) from exc
    _quiet_transformers()
    result = {"mc_file": str(mc_file), "adapter_dir": str(adapter) if adapter else None}
    result.update(
        evaluate_adapter(_model_path(args), adapter, questions, args.limit, args.batch_size)
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        _write_atomically(args.out, text + "\n")
    return 0


def _write_atomically(path: Path, text: str) -> None:
    """Write a file via a temp sibling + rename, so it is complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


# --- prepare-model ------------------------------------------------------------------------------


def _add_prepare_model(subparsers: Any) -> None:
    """`bapo prepare-model`: convert the bundled model once and print its folder."""
    p = subparsers.add_parser("prepare-model", help="convert the bundled model, print its folder")
    _add_model_options(p)
    p.add_argument(
        "--adapter-dir",
        type=Path,
        default=None,
        help="also create this adapter store's @by-name folder (vLLM's LoRA resolver reads it)",
    )
    p.set_defaults(handler=_run_prepare_model)


def _run_prepare_model(args: argparse.Namespace) -> int:
    """Print the prepared model folder (and create the adapter store's name folder if asked)."""
    _quiet_transformers()
    if args.adapter_dir is not None:
        AdapterStore(args.adapter_dir).names_folder.mkdir(parents=True, exist_ok=True)
    print(_model_path(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
