"""Per-user rate limits on the expensive routes (generate, train): token buckets.

(The request dependency that applies them, `rate_limit`, is in app/api/deps.py.)

Each user gets one bucket per route group; a bucket holds `limit` tokens and refills at
`limit / period` per second, so a burst of `limit` requests passes and then one per refill.
An empty bucket answers 429 `rate_limited` with `Retry-After` (whole seconds until a token).

Buckets are keyed by the authenticated principal (the user id), resolved after authentication, so
how the key is spelled in the header (`bearer`, extra spaces) never opens a fresh bucket, and a
user deleted and re-created under the same id keeps theirs. The operator key is exempt: it is the
deployment's own trusted caller (scheduler, CLI, a backend acting for many users), and limiting it
would throttle every user behind it at once.

Where the buckets live:
- **Redis** (RATE_LIMIT_REDIS_URL, or BROKER_URL when it is a Redis URL): one bucket per user and
  group for all API replicas, updated atomically by a Lua script on Redis's clock, so N replicas
  together allow the limit, not N times it.
- **In this process** (the embedded mode, no Redis).
If Redis does not answer, requests are limited by this process's own buckets instead (degraded:
with N replicas up to N times the limit) and Redis is tried again after `REDIS_RETRY_S`: neither
refused with a 503 (generate does not need Redis at all, and a train start survives a broker
outage) nor unlimited.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from app.core.config import Settings
from app.core.errors import RateLimited

log = logging.getLogger(__name__)

MAX_BUCKETS = 100_000  # forget the idlest in-process buckets beyond this many (memory bound)
REDIS_TIMEOUT_S = 0.5  # connect/read timeout of one bucket update
REDIS_RETRY_S = 5.0  # after a Redis failure, use this process's buckets for this long
REDIS_KEY_PREFIX = "bapo:ratelimit"
# KEYS[1] = bucket; ARGV = limit, refill rate (tokens/s). Returns the wait in seconds as a string
# ("0" = allowed): Lua numbers would be truncated to integers on the way out.
TOKEN_BUCKET_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local limit = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1]) or limit
local updated = tonumber(state[2]) or now
tokens = math.min(limit, tokens + math.max(0, now - updated) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(limit / rate * 1000) + 1000)
return tostring(wait)
"""


@dataclass
class Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """Thread-safe in-process token buckets: `limit` requests per `period_s` seconds per key."""

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


class RateLimiter:
    """One app's buckets: in Redis when configured (in-process while it is down), else local."""

    def __init__(self, redis_url: str | None) -> None:
        self.local: dict[tuple[str, int, float], TokenBuckets] = {}
        self.lock = threading.Lock()
        self.redis_down_until = 0.0
        self.script: Any = None
        if redis_url:
            client = redis.Redis.from_url(
                redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
            )
            self.script = client.register_script(TOKEN_BUCKET_LUA)

    def take(self, group: str, limit: int, period_s: float, user_id: str) -> float:
        """Take one token of the user's `group` bucket: 0.0 if allowed, else seconds to wait."""
        if self.script is not None and time.monotonic() >= self.redis_down_until:
            key = f"{REDIS_KEY_PREFIX}:{group}:{limit}:{int(period_s)}:{user_id}"
            try:
                return float(self.script(keys=[key], args=[limit, limit / period_s]))
            except redis.RedisError as exc:
                self.redis_down_until = time.monotonic() + REDIS_RETRY_S
                log.warning("rate limits: Redis unavailable (%s); per-process buckets for now", exc)
        return self._local(group, limit, period_s).take(user_id)

    def _local(self, group: str, limit: int, period_s: float) -> TokenBuckets:
        with self.lock:  # the first requests may race to create a group's buckets
            buckets = self.local.get((group, limit, period_s))
            if buckets is None:
                buckets = self.local[(group, limit, period_s)] = TokenBuckets(limit, period_s)
            return buckets


def limiter_redis_url(settings: Settings) -> str | None:
    """The Redis of the shared buckets: RATE_LIMIT_REDIS_URL, else a Redis broker, else none."""
    url = settings.rate_limit_redis_url or settings.broker_url
    return url if url.startswith(("redis://", "rediss://")) else None


def group_limit(settings: Settings, group: str) -> tuple[int, float]:
    """(requests, period in seconds) per user on the `group` routes; 0 requests = no limit."""
    return {
        "generate": (settings.rate_limit_generate_per_min, 60.0),
        "train": (settings.rate_limit_train_per_hour, 3600.0),
    }[group]


def enforce(limiter: RateLimiter, settings: Settings, group: str, user_id: str) -> None:
    """Take one of the user's `group` tokens, or raise RateLimited with the wait."""
    limit, period_s = group_limit(settings, group)
    if limit <= 0:
        return
    wait = limiter.take(group, limit, period_s, user_id)
    if wait > 0:
        raise RateLimited(
            f"Too many {group} requests: at most {limit} per {int(period_s)} s for this user; "
            f"retry in {math.ceil(wait)} s",
            headers={"Retry-After": str(math.ceil(wait))},
        )
