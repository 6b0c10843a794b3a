"""Which adapter versions garbage collection removes."""

from __future__ import annotations

from app.services.operations import versions_to_collect


def test_keeps_active_and_previous() -> None:
    assert versions_to_collect([1, 2, 3, 4, 5], 3) == [1, 4, 5]
    assert versions_to_collect([1, 2, 3], 1) == [2, 3]
    assert versions_to_collect([4], 4) == []


def test_without_an_active_version_keeps_the_two_newest() -> None:
    assert versions_to_collect([1, 2, 3, 4], None) == [1, 2]
    assert versions_to_collect([2, 7], None) == []
    assert versions_to_collect([1, 2, 3], 9) == [1]
