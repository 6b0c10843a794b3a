"""README stays true: every setting is documented (README or the docs/ pages it links to), the
two commands are there, its links to docs/ pages resolve, and docs/engine.md's hyperparameter table
matches `TrainConfig` field for field, default for default. (Size and every other link:
test_docs_links.py.)"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from app.core.config import Settings
from foundation.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
ENGINE_PAGE = ROOT / "docs" / "engine.md"
TABLE_ROW = re.compile(r"^\| `(\w+)` \| ([^|]+?) \|", re.MULTILINE)
LITERALS: dict[str, Any] = {"None": None, "True": True, "False": False}
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def _relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def _linked_docs_pages() -> list[str]:
    return [t for t in _relative_links(README) if t.startswith("docs/") and t.endswith(".md")]


# What a reader finds from README: README itself and the docs/ pages it links to.
DOCUMENTED = "\n".join(
    [README, *((ROOT / t).read_text() for t in _linked_docs_pages() if (ROOT / t).is_file())]
)


def test_every_setting_is_documented() -> None:
    missing = [
        name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in DOCUMENTED
    ]
    assert missing == []


def test_the_settings_page_is_linked_from_the_readme() -> None:
    assert "docs/configuration.md" in _relative_links(README)


def test_the_two_commands_are_documented() -> None:
    assert "make run" in README and "make test" in README


def test_every_docs_page_the_readme_links_to_exists() -> None:
    linked = _linked_docs_pages()
    assert linked
    assert [t for t in linked if not (ROOT / t).is_file()] == []


def _hyperparameter_table() -> dict[str, str]:
    """Field name → default cell of the table under docs/engine.md's `## Hyperparameters`."""
    section = ENGINE_PAGE.read_text().split("\n## Hyperparameters", 1)[1].split("\n## ", 1)[0]
    return dict(TABLE_ROW.findall(section))


def _documented_value(cell: str) -> Any:
    """A default as the table writes it: `name` (a string), several `names` (a tuple), a number."""
    names = re.findall(r"`([^`]*)`", cell)
    if names:
        return names[0] if len(names) == 1 else tuple(names)
    if cell in LITERALS:
        return LITERALS[cell]
    return int(cell) if re.fullmatch(r"-?\d+", cell) else float(cell)


def test_the_hyperparameter_table_lists_every_train_config_field_in_order() -> None:
    assert list(_hyperparameter_table()) == [f.name for f in dataclasses.fields(TrainConfig)]


def test_the_hyperparameter_table_shows_each_default() -> None:
    documented = {name: _documented_value(cell) for name, cell in _hyperparameter_table().items()}
    defaults = dataclasses.asdict(TrainConfig())
    wrong = {k: (v, defaults.get(k)) for k, v in documented.items() if v != defaults.get(k)}
    assert wrong == {}
