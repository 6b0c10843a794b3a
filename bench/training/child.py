"""`python -m bench.training.child SPEC.json RESULT.json`: one measured run in a fresh process.

A process per run keeps the variants apart: peak RSS (ru_maxrss) is per process, and no library
state (threads, seeds, allocator caches) leaks from one variant into the next.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.training.variants import RunSpec, run


def main(argv: list[str] | None = None) -> int:
    """Read the spec, run it, write the result."""
    spec_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    spec = RunSpec(**json.loads(Path(spec_path).read_text(encoding="utf-8")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    result = run(spec)
    Path(result_path).write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
