"""The counter store: a `limits` async storage and strategy, with a short deadline on every call.

Policy (rules, headers, refusals) lives in the plugin; this module only knows how to talk to the
counters. The storage object is a process-wide shared resource keyed by its URI, so plugin instances
and config reloads share it (a reload does not reset in-memory counters). A call that fails or does
not answer within ``storage_timeout`` raises :class:`StoreDown`; after a failure the store is not
tried again for ``storage_retry`` seconds, so a dead or frozen Redis costs one timeout, not one per
request.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

from limits import RateLimitItem
from limits.aio.strategies import (FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter,
                                   SlidingWindowCounterRateLimiter)
from limits.storage import storage_from_string
from prometheus_client import Counter

log = logging.getLogger("gateway.rate_limit")
T = TypeVar("T")

STRATEGIES: dict[str, type[RateLimiter]] = {
    "sliding": SlidingWindowCounterRateLimiter,
    "fixed": FixedWindowRateLimiter,
    "moving": MovingWindowRateLimiter,
}


class StoreDown(Exception):
    """The counter store failed or did not answer in time."""


def async_uri(uri: str) -> str:
    """memory:// -> async+memory://, redis://... -> async+redis://... (already async+ stays)."""
    return uri if uri.startswith("async+") else "async+" + uri


def redacted(uri: str) -> str:
    """The URI without a password, for logs and metric labels."""
    scheme, sep, rest = uri.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def build_storage(uri: str, timeout: float) -> Any:
    uri = async_uri(uri)
    if uri.startswith("async+memory"):
        return storage_from_string(uri)
    from coredis.retry import NoRetryPolicy

    # Short socket timeouts and no client-side retries: the plugin's own deadline decides.
    return storage_from_string(uri, wrap_exceptions=True, connect_timeout=timeout, stream_timeout=timeout,
                               retry_policy=NoRetryPolicy())


class Health:
    """Shared per storage: when the store last failed (all instances back off together)."""

    __slots__ = ("down_until",)

    def __init__(self) -> None:
        self.down_until = 0.0


class CounterStore:
    def __init__(self, services: Any, uri: str, strategy: str, timeout: float, retry: float) -> None:
        self.uri = uri
        self.label = redacted(uri)
        self.timeout = timeout
        self.retry = retry
        self.storage = services.resource(f"rate_limit:storage:{async_uri(uri)}",
                                         lambda: build_storage(uri, timeout), _close_storage)
        self.health: Health = services.resource(f"rate_limit:health:{async_uri(uri)}", Health)
        self.limiter: RateLimiter = STRATEGIES[strategy](self.storage)
        self.fixed = strategy == "fixed"
        self.errors = services.metric("rate_limit_store_errors", lambda reg: Counter(
            "gateway_ratelimit_store_errors_total", "Rate-limit counter store calls that failed or timed out",
            ["storage", "kind"], registry=reg))

    @property
    def memory(self) -> bool:
        return async_uri(self.uri).startswith("async+memory")

    async def call(self, fn: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
        """Run one store operation under the deadline (absolute monotonic time, default now+timeout)."""
        now = time.monotonic()
        if self.health.down_until > now:
            raise StoreDown("store marked down after a recent failure")
        left = (deadline if deadline is not None else now + self.timeout) - now
        try:
            if left <= 0:
                raise TimeoutError
            async with asyncio.timeout(left):
                return await fn()
        except TimeoutError:
            self._failed("timeout", None)
            raise StoreDown("timeout") from None
        except Exception as e:
            self._failed("error", e)
            raise StoreDown(type(e).__name__) from None

    def _failed(self, kind: str, e: BaseException | None) -> None:
        self.errors.labels(self.label, kind).inc()
        self.health.down_until = time.monotonic() + self.retry
        log.warning("rate-limit store %s %s%s", self.label, "timed out" if kind == "timeout" else "failed",
                    f": {type(e).__name__}: {str(e)[:200]}" if e is not None else "")

    # -- operations ------------------------------------------------------------------------------
    async def hit(self, item: RateLimitItem, ids: tuple[str, ...], cost: int = 1,
                  deadline: float | None = None) -> bool:
        return await self.call(lambda: self.limiter.hit(item, *ids, cost=cost), deadline)

    async def stats(self, item: RateLimitItem, ids: tuple[str, ...], deadline: float | None = None) -> tuple[float, int]:
        ws = await self.call(lambda: self.limiter.get_window_stats(item, *ids), deadline)
        return float(ws.reset_time), int(ws.remaining)

    async def charge(self, item: RateLimitItem, ids: tuple[str, ...], cost: int,
                     deadline: float | None = None) -> None:
        """Charge ``cost`` after the fact (tokens already used). A fixed window counts all of it; the
        sliding and moving windows cannot go past the limit, so they are filled up to it (the caller is
        then refused until the window moves on)."""
        if cost <= 0:
            return
        if self.fixed:
            await self.hit(item, ids, cost, deadline)
            return
        for _ in range(3):
            _, remaining = await self.stats(item, ids, deadline)
            n = min(cost, remaining)
            if n <= 0:
                return
            if await self.hit(item, ids, n, deadline):
                return


async def _close_storage(storage: Any) -> None:
    timer = getattr(storage, "timer", None)
    if timer is not None and not timer.done():
        timer.cancel()
