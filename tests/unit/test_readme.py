"""README stays true: every setting is documented, and the two commands are there."""

from __future__ import annotations

from pathlib import Path

from app.core.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in README]
    assert missing == []


def test_the_two_commands_are_documented() -> None:
    assert "make run" in README and "make test" in README
