"""Per-user rate limits on the expensive routes (generate, train): an in-process token bucket.

Each user key gets one bucket per route group; a bucket holds `limit` tokens and refills at
`limit / period` per second, so a burst of `limit` requests passes and then one per refill.
An empty bucket answers 429 `rate_limited` with `Retry-After` (whole seconds until a token).

The operator key is exempt: it is the deployment's own trusted caller (scheduler, CLI, a backend
acting for many users), and limiting it would throttle every user behind it at once.
Buckets are keyed by the hash of the caller's key (a user has exactly one key), so a user deleted
and re-created under the same id starts with a full bucket. The state is per process: with N API
replicas a user gets up to N times the limit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from app.api.deps import PrincipalDep
from app.core.errors import RateLimited
from app.core.security import hash_key
from app.schemas.common import ErrorResponse

MAX_BUCKETS = 100_000  # forget the idlest buckets beyond this many (memory bound)
_CREATE_LOCK = threading.Lock()
RATE_LIMITED_DOC: dict[int | str, dict[str, object]] = {
    429: {"model": ErrorResponse, "description": "Rate limited; retry after `Retry-After` s"}
}


@dataclass
class Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """Thread-safe token buckets: `limit` requests per `period_s` seconds per key."""

    def __init__(self, limit: int, period_s: float, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.rate = limit / period_s
        self.clock = clock
        self.buckets: dict[str, Bucket] = {}
        self.lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 if allowed, else the seconds until one is available."""
        now = self.clock()
        with self.lock:
            bucket = self.buckets.pop(key, None) or Bucket(float(self.limit), now)
            bucket.tokens = min(self.limit, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            self.buckets[key] = bucket  # re-inserted last: dict order is least recently used first
            if len(self.buckets) > MAX_BUCKETS:
                self.buckets.pop(next(iter(self.buckets)))
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / self.rate


def _buckets(request: Request, group: str, limit: int, period_s: float) -> TokenBuckets:
    state = request.app.state
    with _CREATE_LOCK:  # the first requests may race to create the app's buckets
        if not hasattr(state, "rate_limits"):
            state.rate_limits = {}
        buckets: TokenBuckets | None = state.rate_limits.get(group)
        if buckets is None or buckets.limit != limit:
            buckets = state.rate_limits[group] = TokenBuckets(limit, period_s)
        return buckets


def rate_limit(group: str) -> Callable[[Request, PrincipalDep], None]:
    """A dependency limiting user keys on the `group` routes ("generate" or "train")."""

    def check(request: Request, principal: PrincipalDep) -> None:
        settings = request.app.state.settings
        limit, period_s = {
            "generate": (settings.rate_limit_generate_per_min, 60.0),
            "train": (settings.rate_limit_train_per_hour, 3600.0),
        }[group]
        if limit <= 0 or principal.is_operator:
            return
        credentials = request.headers.get("authorization", "")
        wait = _buckets(request, group, limit, period_s).take(hash_key(credentials))
        if wait > 0:
            raise RateLimited(
                f"Too many {group} requests: at most {limit} per {int(period_s)} s for this key; "
                f"retry in {math.ceil(wait)} s",
                headers={"Retry-After": str(math.ceil(wait))},
            )

    return check
