"""The counter store: a `limits` storage and strategy, with a short deadline on every network call.

Policy (rules, headers, refusals) lives in the plugin; this module only knows how to talk to the
counters. The storage object is a process-wide shared resource keyed by its URI, so plugin instances
and config reloads share it (a reload does not reset in-memory counters). A call that fails or does
not answer within ``storage_timeout`` raises :class:`StoreDown`; after a failure the store is not
tried again for ``storage_retry`` seconds, so a dead or frozen Redis costs one timeout, not one per
request. In-process memory cannot hang or fail like a network store: it uses the library's
synchronous storage and strategies, called directly on the event loop (no coroutine, no deadline),
and its expiry sweep runs on the loop too (:func:`throttle_sweep`).
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import re
import time
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import limits.strategies as sync_strategies
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.strategies import (FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter,
                                   SlidingWindowCounterRateLimiter)
from limits.storage import storage_from_string
from prometheus_client import Counter

from gateway.cli import mask_secret_params

log = logging.getLogger("gateway.rate_limit")
T = TypeVar("T")

STRATEGIES: dict[str, type[RateLimiter]] = {
    "sliding": SlidingWindowCounterRateLimiter,
    "fixed": FixedWindowRateLimiter,
    "moving": MovingWindowRateLimiter,
}

SYNC_STRATEGIES: dict[str, type[sync_strategies.RateLimiter]] = {
    "sliding": sync_strategies.SlidingWindowCounterRateLimiter,
    "fixed": sync_strategies.FixedWindowRateLimiter,
    "moving": sync_strategies.MovingWindowRateLimiter,
}


class StoreDown(Exception):
    """The counter store failed or did not answer in time."""


def async_uri(uri: str) -> str:
    """memory:// -> async+memory://, redis://... -> async+redis://... (already async+ stays)."""
    return uri if uri.startswith("async+") else "async+" + uri


def redacted(uri: str) -> str:
    """The URI without a password (user:password@ and ?password= alike), for logs and metric labels."""
    scheme, sep, rest = uri.partition("://")
    m = re.match(r"([^/?#]*)(.*)", rest, re.DOTALL)
    netloc, tail = (m.group(1), m.group(2)) if m else (rest, "")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return scheme + sep + netloc + mask_secret_params(tail)


SWEEP_EVERY = 1.0
SWEEP_SLICE = 5000  # keys looked at per event-loop turn


def _expire_slices(storage: Any) -> Iterator[None]:
    """The library's in-memory expiry sweep (`MemoryStorage.__expire_events`), a slice of keys per
    step: expired moving-window entries are trimmed, expired counters dropped, with the same tests
    the library makes. Between steps the event loop serves requests, so a million keys cost many
    short steps rather than one long stall. Empty entry lists are dropped too (the library keeps
    them, which keeps every key ever seen)."""
    events, expirations, locks, counts = storage.events, storage.expirations, storage.locks, storage.storage
    keys = list(events)
    for i in range(0, len(keys), SWEEP_SLICE):
        now = time.time()
        for key in keys[i:i + SWEEP_SLICE]:
            ev = events.get(key)
            if ev:
                oldest = bisect.bisect_left(ev, -now, key=_neg_expiry)
                if oldest < len(ev):
                    ev = events[key] = ev[:oldest]
            if not ev:
                events.pop(key, None)
                if key not in counts:
                    locks.pop(key, None)
        yield
    keys = list(expirations)
    for i in range(0, len(keys), SWEEP_SLICE):
        now = time.time()
        for key in keys[i:i + SWEEP_SLICE]:
            t = expirations.get(key)
            if t is not None and t <= now:
                counts.pop(key, None)
                expirations.pop(key, None)
                locks.pop(key, None)
        yield


def _neg_expiry(entry: Any) -> float:
    return -entry.expiry


def throttle_sweep(storage: Any) -> Any:
    """Run `limits`' in-memory expiry sweep on the event loop, at most once per ``SWEEP_EVERY`` seconds.

    The library starts a sweep on a timer thread whenever none is pending, after every increment,
    and the sweep walks every key: under steady traffic that is a new thread and an O(keys) walk
    every few milliseconds, racing the event loop's own reads and writes of the same dicts.
    Expired counters are already dropped when they are read, so sweeping once a second only bounds
    memory; running it on the loop thread, ``SWEEP_SLICE`` keys per loop turn, means it never
    interleaves with a hit and never stalls requests. The counts stay the library's own. (If the
    library's private hooks or fields are renamed, its own behaviour is kept.)"""
    original = getattr(storage, "_MemoryStorage__schedule_expiry", None)
    if original is None or not all(hasattr(storage, a) for a in ("events", "expirations", "locks", "storage")):
        return storage
    last = [0.0]
    running = [False]

    def step(loop: asyncio.AbstractEventLoop, slices: Iterator[None]) -> None:
        try:
            next(slices)
        except StopIteration:
            running[0] = False
            return
        except Exception as e:  # the next sweep tries again; counts are unaffected
            running[0] = False
            log.warning("rate-limit memory sweep failed: %s", type(e).__name__)
            return
        loop.call_soon(step, loop, slices)

    def throttled() -> None:
        now = time.monotonic()
        if running[0] or now - last[0] < SWEEP_EVERY:
            return
        last[0] = now
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop (a CLI command): the library's own timer
            original()
            return
        running[0] = True
        loop.call_soon(step, loop, _expire_slices(storage))

    storage._MemoryStorage__schedule_expiry = throttled
    return storage


def is_memory(uri: str) -> bool:
    return uri.removeprefix("async+").startswith("memory")


def build_storage(uri: str, timeout: float) -> Any:
    if is_memory(uri):
        return throttle_sweep(storage_from_string(uri.removeprefix("async+")))
    uri = async_uri(uri)
    from coredis.retry import NoRetryPolicy

    # Short socket timeouts and no client-side retries (a retried hit whose first attempt reached
    # Redis would count twice): the plugin's own deadline decides.
    opts: dict[str, Any] = {"connect_timeout": timeout, "stream_timeout": timeout}
    if "+sentinel" in uri:
        storage = storage_from_string(uri, wrap_exceptions=True, **opts)
        # Sentinel takes connection options only; the clients it hands out get the policy here.
        for client in (getattr(storage.bridge, "storage", None), getattr(storage.bridge, "storage_replica", None)):
            if client is not None and hasattr(client, "retry_policy"):
                client.retry_policy = NoRetryPolicy()
        return storage
    return storage_from_string(uri, wrap_exceptions=True, retry_policy=NoRetryPolicy(), **opts)


class Health:
    """Shared per storage: when the store last failed (all instances back off together), and whether
    the connection needs warming up (first use, or after a failure)."""

    __slots__ = ("down_until", "cold", "lock")

    def __init__(self) -> None:
        self.down_until = 0.0
        self.cold = True
        self.lock = asyncio.Lock()


WARMUP_ITEM = RateLimitItemPerSecond(1_000_000_000)


class CounterStore:
    def __init__(self, services: Any, uri: str, strategy: str, timeout: float, retry: float) -> None:
        self.uri = uri
        self.label = redacted(uri)
        self.timeout = timeout
        self.retry = retry
        self.storage = services.resource(f"rate_limit:storage:{async_uri(uri)}",
                                         lambda: build_storage(uri, timeout), _close_storage)
        self.health: Health = services.resource(f"rate_limit:health:{async_uri(uri)}", Health)
        self.memory = is_memory(uri)
        #: memory: the library's synchronous strategy (see the module docstring); else its async one
        self.limiter: Any = (SYNC_STRATEGIES if self.memory else STRATEGIES)[strategy](self.storage)
        self.fixed = strategy == "fixed"
        self.sliding = strategy == "sliding"
        self.errors = services.metric("rate_limit_store_errors", lambda reg: Counter(
            "gateway_ratelimit_store_errors_total", "Rate-limit counter store calls that failed or timed out",
            ["storage", "kind"], registry=reg))

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
                if self.health.cold:
                    await self._warm()
                return await fn()
        except TimeoutError:
            self._failed("timeout", None)
            raise StoreDown("timeout") from None
        except Exception as e:
            self._failed("error", e)
            raise StoreDown(type(e).__name__) from None

    async def _warm(self) -> None:
        """One request at a time runs the strategy's scripts once before the others go ahead: on a
        fresh (or restarted) Redis the scripts are not loaded yet, and many concurrent first calls
        racing to load them can lose their connection."""
        async with self.health.lock:
            if self.health.cold:
                await self.limiter.hit(WARMUP_ITEM, "gateway-warmup")
                await self.limiter.get_window_stats(WARMUP_ITEM, "gateway-warmup")
                self.health.cold = False

    async def check(self) -> bool:
        """Connect and warm up (bounded by the timeout); False if the store is not reachable."""
        if self.memory:
            return True
        try:
            await self.call(_noop)
            return True
        except StoreDown:
            return False

    def _failed(self, kind: str, e: BaseException | None) -> None:
        self.errors.labels(self.label, kind).inc()
        self.health.cold = True
        self.health.down_until = time.monotonic() + self.retry
        log.warning("rate-limit store %s %s%s", self.label, "timed out" if kind == "timeout" else "failed",
                    f": {type(e).__name__}: {str(e)[:200]}" if e is not None else "")

    # -- operations ------------------------------------------------------------------------------
    async def hit(self, item: RateLimitItem, ids: tuple[str, ...], cost: int = 1,
                  deadline: float | None = None) -> bool:
        if self.memory:
            return bool(self.limiter.hit(item, *ids, cost=cost))
        return await self.call(lambda: self.limiter.hit(item, *ids, cost=cost), deadline)

    async def stats(self, item: RateLimitItem, ids: tuple[str, ...], deadline: float | None = None) -> tuple[float, int]:
        if self.memory:
            ws = self.limiter.get_window_stats(item, *ids)
        else:
            ws = await self.call(lambda: self.limiter.get_window_stats(item, *ids), deadline)
        return ws[0], ws[1]

    async def wait_for(self, item: RateLimitItem, ids: tuple[str, ...], need: int,
                       deadline: float | None = None) -> float | None:
        """Seconds until ``need`` more units fit a sliding-window counter, if nothing else is counted
        meanwhile (None for the other strategies: their reset time is when room frees). The
        window statistics' reset time is when the first unit frees, which for a request needing
        many (tokens) is too soon: a client retrying then would be refused again."""
        if not self.sliding:
            return None
        key, expiry = item.key_for(*ids), item.get_expiry()
        if self.memory:
            w = self.storage.get_sliding_window(key, expiry)
        else:
            w = await self.call(lambda: self.storage.get_sliding_window(key, expiry), deadline)
        return sliding_wait(item.amount, expiry, need, w[0], w[2], max(0.0, w[3] - expiry))

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


def sliding_wait(limit: int, expiry: float, need: int, prev: int, cur: int, left: float) -> float:
    """The sliding-window counter's arithmetic (as the `limits` library weighs it): the previous
    window's count fades out over the current window, of which ``left`` seconds remain; a hit of
    ``need`` fits when the weighted count plus ``need`` is at most ``limit``. Past the current
    window's end its count is the one that fades. Seconds until then, with no other hits."""
    room = limit - need  # it fits when floor(weighted) <= room, i.e. weighted < room + 1
    if room < 0:
        return float("inf")
    if cur <= room:
        if prev <= 0 or prev * left / expiry + cur < room + 1:
            return 0.0
        return max(0.0, left - (room + 1 - cur) * expiry / prev)
    return left + max(0.0, expiry - (room + 1) * expiry / cur)


async def _noop() -> None:
    return None


async def _close_storage(storage: Any) -> None:
    timer = getattr(storage, "timer", None)  # memory: the pending sweep (a threading.Timer)
    if timer is not None:
        timer.cancel()
