"""Temporary: bench/forgetting's old path to `foundation.train_config.TrainConfig` (issue #20).

bench/forgetting may not change while its recorded run is in progress, and it still calls
`TrainConfig.from_dict`, the old name of `TrainConfig.parse`. Once its imports read
`foundation.train_config` and it calls `parse`, delete this module. Nothing else may import it
(tests/unit/test_import_direction.py fails if anything does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from foundation.train_config import TrainConfig as _TrainConfig


class TrainConfig(_TrainConfig):
    """Only a namespace for `from_dict`: what it returns is a `foundation` TrainConfig."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _TrainConfig:
        """TrainConfig.parse under its old name."""
        return _TrainConfig.parse(data)


__all__ = ["TrainConfig"]
