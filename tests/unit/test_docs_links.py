"""The documentation's links work: every relative link in README.md, docs/*.md and bench/README.md
names an existing file (and, for `#anchor` links into markdown, an existing heading by GitHub's slug
rules); README stays under 20 KB and its contents list reaches every page in docs/."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose(text: str) -> str:
    """The markdown without fenced code blocks (links and headings there are not rendered)."""
    return FENCE.sub("", text)


def relative_links(text: str) -> list[str]:
    """Targets of the markdown links and images that are neither absolute URLs nor mail."""
    prose = INLINE_CODE.sub("", _prose(text))
    return [t for t in LINK.findall(prose) if not SCHEME.match(t)]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lower case, punctuation dropped, - for space."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a markdown page: heading slugs (repeats get -1, -2, ...) and HTML anchors."""
    prose = _prose(page.read_text())
    seen: Counter[str] = Counter()
    found = set(HTML_ANCHOR.findall(prose))
    for heading in HEADING.findall(prose):
        slug = github_slug(heading)
        found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return found


def link_problem(page: Path, target: str) -> str | None:
    """Why a relative link from `page` does not resolve, or None when it does."""
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
        return "no such file"
    if anchor and file.suffix == ".md" and anchor not in anchors(file):
        return f"no heading #{anchor} in {file.relative_to(ROOT)}"
    return None


def contents_list() -> list[str]:
    """The link targets of README's `## Contents` section."""
    match = re.search(r"^## Contents\n(.*?)(?=^## )", README.read_text(), re.MULTILINE | re.DOTALL)
    assert match, "README.md has no `## Contents` section"
    return relative_links(match.group(1))


def test_the_slug_rules_are_githubs() -> None:
    assert github_slug("Deploy with docker compose") == "deploy-with-docker-compose"
    assert github_slug("The BAPO engine and the `bapo` CLI") == "the-bapo-engine-and-the-bapo-cli"
    assert github_slug("Hyperparameters (`TrainConfig`, every field)") == (
        "hyperparameters-trainconfig-every-field"
    )
    assert github_slug("Truncation policy (`worker/training/data.py`)") == (
        "truncation-policy-workertrainingdatapy"
    )
    assert github_slug("GPU sharing — one card") == "gpu-sharing--one-card"


def test_the_link_finder_skips_code_and_urls() -> None:
    text = "[a](x.md) [b](https://e.org) `[c](y.md)` ![i](p.png)\n```\n[d](z.md)\n```\n[e](#top)"
    assert relative_links(text) == ["x.md", "p.png", "#top"]


def test_every_relative_link_resolves() -> None:
    broken = [
        f"{page.relative_to(ROOT)}: {target} ({problem})"
        for page in PAGES
        for target in relative_links(page.read_text())
        if (problem := link_problem(page, target)) is not None
    ]
    assert broken == []


def test_the_readme_is_under_20_kb() -> None:
    assert README.stat().st_size < 20_000


def test_every_docs_page_is_in_the_readme_contents_list() -> None:
    listed = {(ROOT / t.partition("#")[0]).resolve() for t in contents_list()}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert [p.name for p in pages if p.resolve() not in listed] == []


def test_every_other_file_in_docs_is_linked_from_a_docs_page_or_the_readme() -> None:
    linked = {
        (page.parent / t.partition("#")[0]).resolve()
        for page in PAGES
        for t in relative_links(page.read_text())
    }
    files = [f for f in (ROOT / "docs").rglob("*") if f.is_file() and f.suffix != ".md"]
    assert [str(f.relative_to(ROOT)) for f in files if f.resolve() not in linked] == []
