"""`python -m bench.forgetting.compare BEFORE.json AFTER.json`: do two runs of one plan and seed
learn the same thing? (An engine change that must not change what is learned, e.g. the packed
layout, is checked by recording the quick run before and after it.)

Per run key present in both: the final training loss, held-out preference accuracy, persona
movement, pooled knowledge Δ, fluency NLL and the training seconds, side by side; then, per
measure, the largest difference against that measure's own standard error, so "the same within
noise" is a number.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

# measure → (where it is in a run record, where its standard error is, or None)
MEASURES: dict[str, tuple[tuple[Any, ...], tuple[Any, ...] | None]] = {
    "final loss": (("train", "history", -1, "loss"), None),
    "preference accuracy": (
        ("preference", "preference_accuracy"),
        ("preference", "preference_accuracy_stderr"),
    ),
    "persona movement": (("persona", "movement"), ("persona", "movement_stderr")),
    "knowledge Δ": (("knowledge", "pooled", "delta"), ("knowledge", "pooled", "delta_stderr")),
    "fluency NLL": (("fluency", "mean_nll"), None),
    "anchor log-ratio": (
        ("preference", "anchor_logratio"),
        ("preference", "anchor_logratio_stderr"),
    ),
}


def _get(record: Any, path: tuple[Any, ...] | None) -> float | None:
    """The value at `path` (None when absent)."""
    if path is None:
        return None
    for step in path:
        try:
            record = record[step]
        except (KeyError, IndexError, TypeError):
            return None
    return float(record) if isinstance(record, int | float) else None


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per run key: each measure before and after; per measure: max |Δ| and max |Δ| / stderr."""
    old = {run["key"]: run for run in before["runs"]}
    new = {run["key"]: run for run in after["runs"]}
    keys = [key for key in old if key in new]
    rows: dict[str, dict[str, Any]] = {}
    worst: dict[str, dict[str, float]] = {}
    for key in keys:
        row: dict[str, Any] = {"train_s": (old[key]["train_wall_s"], new[key]["train_wall_s"])}
        for name, (path, err_path) in MEASURES.items():
            a, b = _get(old[key], path), _get(new[key], path)
            if a is None or b is None:
                continue
            row[name] = (a, b)
            errors = [e for e in (_get(old[key], err_path), _get(new[key], err_path)) if e]
            stat = worst.setdefault(name, {"max_abs_diff": 0.0, "max_diff_in_stderr": 0.0})
            stat["max_abs_diff"] = max(stat["max_abs_diff"], abs(b - a))
            if errors:
                scale = math.sqrt(sum(e * e for e in errors) / len(errors))
                stat["max_diff_in_stderr"] = max(stat["max_diff_in_stderr"], abs(b - a) / scale)
        rows[key] = row
    return {"runs": rows, "worst": worst, "only_before": sorted(set(old) - set(new)),
            "only_after": sorted(set(new) - set(old))}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """The comparison as Markdown tables."""
    lines = ["| run | measure | before | after |", "|---|---|---|---|"]
    for key, row in result["runs"].items():
        for name, (a, b) in row.items():
            lines.append(f"| {key} | {name} | {a:.4g} | {b:.4g} |")
    lines += ["", "| measure | max abs difference | max difference / stderr |", "|---|---|---|"]
    for name, stat in result["worst"].items():
        lines.append(f"| {name} | {stat['max_abs_diff']:.4g} | {stat['max_diff_in_stderr']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the comparison of two result files."""
    parser = argparse.ArgumentParser(prog="python -m bench.forgetting.compare", description=__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    result = compare(
        *(json.loads(p.read_text(encoding="utf-8")) for p in (args.before, args.after))
    )
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
