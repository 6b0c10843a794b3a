"""Imports run one way (ARCHITECTURE.md, "Rules that must always hold").

`foundation/` is the leaf both sides use and imports neither; `app/` never imports `worker/`; the
training engine (`worker/training/`) never imports `app/` (the job runner and the CLIs in `worker/`
may). Every import is checked, at any depth (inside functions, under TYPE_CHECKING).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIPPED = {".venv", ".venv-vllm", ".git", "data", "node_modules", "test-artifacts"}
# (files under this folder, may not import these packages)
RULES = [
    ("app", ("worker",)),
    ("worker/training", ("app",)),
    ("foundation", ("app", "worker")),
    ("app/core", ("app.api", "app.services", "app.schemas")),
    ("app/services", ("app.api", "fastapi")),
]


def python_files(root: Path) -> Iterator[Path]:
    """Every .py file under `root`, outside virtualenvs and data."""
    for top in sorted(root.iterdir()):
        if top.name in SKIPPED:
            continue
        found = sorted(top.rglob("*.py")) if top.is_dir() else [top]
        yield from (p for p in found if p.suffix == ".py" and "node_modules" not in p.parts)


def imported_modules(root: Path, path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module) for every import in the file, relative ones resolved."""
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield node.lineno, module
            for alias in node.names:  # `from worker.training import model` imports a module
                yield node.lineno, f"{module}.{alias.name}"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def wrong_way_imports(root: Path = ROOT) -> list[str]:
    """`file:line: imports module (rule)` for every import under `root` that breaks a rule."""
    found: dict[tuple[str, int, str], str] = {}  # the first module per (file, line, rule)
    for path in python_files(root):
        where = path.relative_to(root).as_posix()
        for line, module in imported_modules(root, path):
            for rule in broken_rules(where, module):
                found.setdefault((where, line, rule), f"{where}:{line}: imports {module} ({rule})")
    return list(found.values())


def broken_rules(where: str, module: str) -> Iterator[str]:
    """The rules a file at `where` breaks by importing `module`."""
    for folder, forbidden in RULES:
        if where.startswith(folder + "/") and any(_within(module, p) for p in forbidden):
            yield f"{folder} must not import {' or '.join(forbidden)}"


def test_imports_run_one_way() -> None:
    assert wrong_way_imports() == []


def test_the_checker_sees_each_kind_of_wrong_import(tmp_path: Path) -> None:
    """Nested, relative and `from package import module` imports are all seen, with their line."""
    files = {
        "app/services/x.py": "import os\n\ndef f():\n    from worker.training import trainer\n",
        "worker/training/y.py": "from ...app.core import config\n",
        "worker/runner.py": "from app.core.db import transaction\n",  # allowed: not the engine
        "foundation/z.py": "if True:\n    import worker.tasks\n",
        "app/core/c.py": "from app.api import deps\n",
        "app/services/s.py": "from fastapi import Request\n",
        "bench/b.py": "from worker.training import trainer\n",  # allowed: benchmarks use both
    }
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    assert wrong_way_imports(tmp_path) == [
        "app/core/c.py:1: imports app.api (app/core must not import app.api or app.services or "
        "app.schemas)",
        "app/services/s.py:1: imports fastapi (app/services must not import app.api or fastapi)",
        "app/services/x.py:4: imports worker.training (app must not import worker)",
        "foundation/z.py:2: imports worker.tasks (foundation must not import app or worker)",
        "worker/training/y.py:1: imports app.core (worker/training must not import app)",
    ]
    (tmp_path / "app" / "t2.py").write_text("\n\nfrom worker.training import model\n")
    assert any(
        line.startswith("app/t2.py:3: imports worker") for line in wrong_way_imports(tmp_path)
    )
