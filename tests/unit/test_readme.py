"""README stays true and short: every setting is documented (README or the docs/ pages it links to),
the two commands are there, README is under 20,000 bytes and its links to docs/ resolve."""

from __future__ import annotations

import re
from pathlib import Path

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
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


def test_the_readme_is_short() -> None:
    assert README_PATH.stat().st_size < 20000


def test_every_docs_page_the_readme_links_to_exists() -> None:
    linked = _linked_docs_pages()
    assert linked
    assert [t for t in linked if not (ROOT / t).is_file()] == []


def test_relative_links_in_the_readme_and_docs_resolve() -> None:
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in [README_PATH, *DOCS]
        for target in _relative_links(page.read_text())
        if not (page.parent / target).exists()
    ]
    assert broken == []
