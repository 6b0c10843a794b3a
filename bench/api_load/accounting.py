"""What wrk reported (parsed from the Lua scripts' output) and the row accounting afterwards.

Lost rows: keys acknowledged with a 201 that have no stored pair. Duplicated rows: pairs beyond the
first for one key (a retry must replay, never store again). Unacknowledged rows: stored pairs whose
201 the client never saw (requests cut off when wrk stopped, or timed out) — not an error: a retry
with the same key would replay them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class WrkRun:
    """One wrk run's figures and, for feedback runs, the keys it saw acknowledged."""

    requests: int = 0
    duration_s: float = 0.0
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0
    latency_s: dict[str, float] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    acked: set[str] = field(default_factory=set)
    retries: int = 0
    replays: int = 0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """Figures (the acknowledged keys counted, not listed)."""
        return {
            "requests": self.requests, "duration_s": self.duration_s,
            "requests_per_s": self.requests_per_s, "socket_errors": self.socket_errors,
            "non_2xx": self.non_2xx, "latency_s": self.latency_s,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "acknowledged_keys": len(self.acked), "retries": self.retries,
            "replays": self.replays,
        }  # fmt: skip


def parse_wrk_output(text: str) -> WrkRun:
    """Parse the `name value...` lines the Lua scripts' done() writes."""
    run = WrkRun()
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        values = rest.split()
        if name == "acked":
            run.acked.add(rest.strip())
        elif name == "status":
            run.statuses[int(values[0])] += int(values[1])
        elif name in ("retries", "replays"):
            setattr(run, name, getattr(run, name) + int(values[0]))
        elif name == "requests":
            run.requests = int(values[0])
        elif name == "duration_us":
            run.duration_s = int(values[0]) / 1e6
        elif name == "socket_errors":
            labels = ("connect", "read", "write", "timeout")
            run.socket_errors = dict(zip(labels, map(int, values), strict=True))
        elif name == "non_2xx_3xx":
            run.non_2xx = int(values[0])
        elif name.startswith("latency_") and name.endswith("_us"):
            run.latency_s[name[len("latency_") : -len("_us")]] = float(values[0]) / 1e6
    return run


def read_wrk_output(path: Path) -> WrkRun:
    """Parse a wrk output file."""
    return parse_wrk_output(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class RowAccount:
    """Acknowledged keys against the rows stored per key."""

    acknowledged_keys: int
    stored_keys: int
    stored_rows: int
    lost: int
    duplicated: int
    unacknowledged_rows: int

    @property
    def ok(self) -> bool:
        """No acknowledged pair lost, no pair stored twice."""
        return self.lost == 0 and self.duplicated == 0


def account_rows(acked: set[str], rows_per_key: dict[str, int]) -> RowAccount:
    """Compare the keys the client saw acknowledged with the stored rows per key."""
    stored = {key for key, count in rows_per_key.items() if count > 0}
    return RowAccount(
        acknowledged_keys=len(acked),
        stored_keys=len(stored),
        stored_rows=sum(rows_per_key.values()),
        lost=len(acked - stored),
        duplicated=sum(count - 1 for count in rows_per_key.values() if count > 1),
        unacknowledged_rows=sum(rows_per_key[key] for key in stored - acked),
    )


ROWS_PER_KEY_SQL = (
    "SELECT metadata->>'bench_key' AS key, count(*) FROM preference_pairs "
    "WHERE metadata->>'bench_key' IS NOT NULL GROUP BY 1"
)


def rows_per_key(database_url: str) -> dict[str, int]:
    """Stored pairs per bench key, from the database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return {str(key): int(count) for key, count in conn.execute(text(ROWS_PER_KEY_SQL))}
    finally:
        engine.dispose()
