"""Reading a JSONL file of preference pairs as it arrives: line by line, in bounded memory.

Every line is read by the one pair validator (`foundation.pairs.pair_from_dict`), so a line is
refused with the same message as the same pair sent to `POST /users/<id>/feedback`. Blank lines
are skipped. Errors are kept by line number, the first `MAX_REPORTED_ERRORS` of them, and counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from app.core.errors import BadRequest
from foundation.pairs import Pair, PairError, PairLimits, pair_from_dict

MAX_REPORTED_ERRORS = 50


@dataclass(frozen=True)
class LineError:
    """Why one line of a file was refused."""

    line: int
    message: str
    code: str
    param: str | None = None


class LinesRefused(BadRequest):
    """400: a file with bad lines, stored nowhere; `errors` lists the first ones by line."""

    def __init__(self, errors: list[LineError], count: int, param: str) -> None:
        first = errors[0]
        super().__init__(
            f"{count} bad line(s); nothing was stored. Line {first.line}: {first.message}",
            "invalid_lines",
            param=param,
        )
        self.details = {"errors": [asdict(e) for e in errors], "error_count": count}


@dataclass
class JsonlPairs:
    """Fed the bytes of a file chunk by chunk; hands each good pair to `on_pair` as it is read.

    A line longer than `max_line_bytes` is refused without being held (memory stays bounded by
    one line plus one chunk). `sha256` and `size` cover the whole file as it was sent.
    """

    limits: PairLimits
    max_line_bytes: int
    on_pair: Callable[[Pair, int], None] | None = None  # (pair, its line's size in bytes)
    pairs: int = 0
    lines: int = 0
    size: int = 0  # bytes fed so far
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    _hash: Any = field(default_factory=hashlib.sha256)
    _partial: bytearray = field(default_factory=bytearray)
    _too_long: bool = False

    @property
    def sha256(self) -> str:
        """The hex sha256 of every byte fed so far."""
        return str(self._hash.hexdigest())

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the file."""
        self._hash.update(chunk)
        self.size += len(chunk)
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            self._append(piece)
            self._end_line()
        self._append(rest)

    def finish(self, param: str) -> None:
        """The file has ended: read its last line; raise LinesRefused if any line was bad."""
        if self._partial or self._too_long:
            self._end_line()
        if self.error_count:
            raise LinesRefused(self.errors, self.error_count, param)
        if self.pairs == 0:
            raise BadRequest(f"{param}: the file holds no pairs", "empty_file", param=param)

    def _append(self, piece: bytes) -> None:
        if self._too_long:
            return
        if len(self._partial) + len(piece) > self.max_line_bytes:
            self._too_long = True
            self._partial.clear()
            return
        self._partial += piece

    def _end_line(self) -> None:
        self.lines += 1
        raw, too_long = bytes(self._partial), self._too_long
        self._partial.clear()
        self._too_long = False
        if too_long:
            self._refuse(f"longer than {self.max_line_bytes} bytes", "line_too_long")
        elif raw.strip():
            self._read_line(raw)

    def _read_line(self, raw: bytes) -> None:
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._refuse("not UTF-8 text", "invalid_encoding")
            return
        except json.JSONDecodeError as exc:
            self._refuse(f"not valid JSON ({exc.msg} at column {exc.colno})", "invalid_json")
            return
        except RecursionError:
            self._refuse("not valid JSON (nested too deeply)", "invalid_json")
            return
        try:
            pair = pair_from_dict(data, self.limits)
        except PairError as exc:
            self._refuse(str(exc), exc.code, exc.field)
            return
        self.pairs += 1
        if self.on_pair is not None and not self.error_count:
            self.on_pair(pair, len(raw))

    def _refuse(self, message: str, code: str, param: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(LineError(self.lines, message, code, param))
