"""The counter store: a `limits` storage and strategy, with a short deadline on every network call.

Policy (rules, headers, refusals) lives in the plugin; this module only knows how to talk to the
counters. The storage object is a process-wide shared resource keyed by its URI, so plugin instances
and config reloads share it (a reload does not reset in-memory counters). A call that fails or does
not answer within ``storage_timeout`` raises :class:`StoreDown`; after a failure the store is not
tried again for ``storage_retry`` seconds, so a dead or frozen Redis costs one timeout, not one per
request. ``storage_timeout`` is the plugin's own deadline, not the Redis client's socket timeouts
(those are a fixed ceiling above it), so a reload that changes it applies at once to the shared
client. In-process memory cannot hang or fail like a network store: it uses the library's
synchronous storage and strategies, called directly on the event loop (no coroutine, no deadline),
and its expiry sweep runs on the loop too (:func:`throttle_sweep`).
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import time
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import limits.strategies as sync_strategies
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.strategies import (FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter,
                                   SlidingWindowCounterRateLimiter)
from limits.errors import StorageError
from limits.storage import storage_from_string
from prometheus_client import Counter

from gateway.cli import mask_secret_params

from gateway.config.model import split_uri, uri_ambiguous
from gateway.logs import ThrottledLog

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
    """The URI without a password (user:password@ and ?password= alike), for logs and metric labels.

    Everything up to the last ``@`` before the query is masked, so a password written with a raw
    ``/`` or ``@`` instead of percent-encoded is never shown in part (the config refuses the
    ambiguous forms: ``uri_ambiguous``); an ``@`` in a query value, or in a Unix socket's
    path, is left alone."""
    if uri_ambiguous(uri):  # (refused by the config; masked whole up to its last '@' all the same)
        scheme, _, rest = uri.partition("://")
        _, host, tail = split_uri("x://" + rest.rpartition("@")[2])
        return f"{scheme}://***@{host}{mask_secret_params(tail)}"
    scheme, head, tail = split_uri(uri)
    at = head.rfind("@")
    if at >= 0 and not head.startswith("/"):
        head = "***@" + head[at + 1:]
    return scheme + head + mask_secret_params(tail)


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


#: The Redis client's own connect / read timeouts: above the largest ``storage_timeout`` (10 s, see
#: the config), so the plugin's deadline, which follows every reload, always decides. A client
#: built with one config's timeout would keep it for the life of the process (it is shared).
CLIENT_TIMEOUT = 11.0

#: The check at start (and at a reload to a new store) may take this long at least: its first
#: connection and the loading of the strategy's scripts are slower than one counter call, and
#: nothing is waiting on it (no request is served by that config yet). Held to the request
#: deadline, a busy machine could miss it and refuse every request for ``storage_retry``.
CHECK_TIMEOUT = 5.0


def build_storage(uri: str, timeout: float = CLIENT_TIMEOUT) -> Any:
    if is_memory(uri):
        return throttle_sweep(storage_from_string(uri.removeprefix("async+")))
    uri = async_uri(uri)
    from coredis.retry import NoRetryPolicy

    # No client-side retries (a retried hit whose first attempt reached Redis would count twice):
    # the plugin's own deadline decides.
    opts: dict[str, Any] = {"connect_timeout": timeout, "stream_timeout": timeout}
    if "+sentinel" in uri or "+cluster" in uri:
        # These pass the URL's user and password on as they are written: decoded here (RFC 3986
        # percent-encoding, as for a plain redis:// URL below).
        opts.update(url_auth(uri))
    if "+sentinel" in uri:
        # (the sentinels' own login too: before 5.8 the library gave them the URL's credentials
        # as written, percent-encoding and all)
        storage = storage_from_string(uri, wrap_exceptions=True, sentinel_kwargs=url_auth(uri) or None, **opts)
        # Sentinel takes connection options only; the clients it hands out get the policy here.
        for client in (getattr(storage.bridge, "storage", None), getattr(storage.bridge, "storage_replica", None)):
            if client is not None and hasattr(client, "retry_policy"):
                client.retry_policy = NoRetryPolicy()
        return storage
    if "+cluster" not in uri:
        # coredis reads the URL's user, password, host and path percent-decoded only when asked
        # (a password "p@ss:w/rd" is written p%40ss%3Aw%2Frd).
        opts["decode_components"] = True
    return storage_from_string(uri, wrap_exceptions=True, retry_policy=NoRetryPolicy(), **opts)


def url_auth(uri: str) -> dict[str, str]:
    """The URL's user name and password, percent-decoded (none: {})."""
    from urllib.parse import unquote, urlsplit

    u = urlsplit(uri)
    out = {}
    if u.username:
        out["username"] = unquote(u.username)
    if u.password:
        out["password"] = unquote(u.password)
    return out


class Health:
    """Shared per storage: when the store last failed (all instances back off together), whether
    the connection needs warming up (first use, or after a failure), and how many failures there
    have been (a caller that waited for the warm-up lock sees whether the probe ahead of it failed)."""

    __slots__ = ("down_until", "cold", "lock", "failures", "failing_since")

    def __init__(self) -> None:
        self.down_until = 0.0
        self.cold = True
        self.lock = asyncio.Lock()
        self.failures = 0
        #: when the outage under way began (monotonic); None while the store answers
        self.failing_since: float | None = None


WARMUP_ITEM = RateLimitItemPerSecond(1_000_000_000)

#: Token charges dropped and per-key data errors are logged at most once per this many seconds
#: per store (with the count of the others): an outage or a bad key must not log a line per request.
LOG_EVERY = 10.0
STORE_LOG = ThrottledLog(log, interval=LOG_EVERY, level=logging.WARNING)


def data_error(e: BaseException) -> bool:
    """A Redis error reply about the data under one key (a key of the wrong type, a value that is
    no number): that counter cannot be used, the store as a whole is fine. Errors about the server
    (read-only replica, loading, out of memory, auth, a busy script, cluster state) are not."""
    from coredis.exceptions import ResponseError, WrongTypeError

    if isinstance(e, StorageError):
        e = e.storage_error
    if isinstance(e, WrongTypeError):
        return True
    if type(e) is not ResponseError:  # (its subclasses are the server-state errors listed above)
        return False
    msg = str(e)
    return msg.startswith("WRONGTYPE") or "WRONGTYPE Operation against a key" in msg or \
        msg.startswith("ERR value is not an integer") or msg.startswith("ERR value is not a valid float")


class CounterStore:
    def __init__(self, services: Any, uri: str, strategy: str, timeout: float, retry: float) -> None:
        self.uri = uri
        self.label = redacted(uri)
        self.last_error = ""  # why the last call failed (a timeout, Redis refusing the login ...)
        self.timeout = timeout
        self.retry = retry
        # The client's own timeouts are a fixed ceiling (see CLIENT_TIMEOUT): the client is shared
        # by every instance and reload, and ``timeout`` (this config's) is applied by call().
        self.storage = services.resource(f"rate_limit:storage:{async_uri(uri)}",
                                         lambda: build_storage(uri, CLIENT_TIMEOUT), _close_storage)
        self.health: Health = services.resource(f"rate_limit:health:{async_uri(uri)}", Health)
        self.memory = is_memory(uri)
        #: memory: the library's synchronous strategy (see the module docstring); else its async one
        self.limiter: Any = (SYNC_STRATEGIES if self.memory else STRATEGIES)[strategy](self.storage)
        self.fixed = strategy == "fixed"
        self.sliding = strategy == "sliding"
        #: Counter identifiers put first on a network store, so that each strategy has keys of its
        #: own: the fixed window keeps a string under a key, the moving window a list, and a store
        #: shared across a strategy change (a reload, instances of a fleet rolling it out) would
        #: otherwise answer WRONGTYPE for every counter the other strategy left. (The sliding
        #: window's keys are its own already: ``{key}``, ``{key}/-1``; in memory each strategy
        #: keeps its own table.)
        self.tag: tuple[str, ...] = () if self.memory or self.sliding else (f"strategy:{strategy}",)
        self.errors = services.metric("rate_limit_store_errors", lambda reg: Counter(
            "gateway_ratelimit_store_errors_total", "Rate-limit counter store calls that failed or timed out, "
            "and token charges dropped (kind=charge_dropped)", ["storage", "kind"], registry=reg))

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
        except StoreDown:
            raise
        except TimeoutError:
            self._failed("timeout", None)
            raise StoreDown("timeout") from None
        except Exception as e:
            if data_error(e):
                # Foreign data under this request's counter: this request gets on_store_error,
                # everyone else goes on using the store.
                self.errors.labels(self.label, "key_error").inc()
                STORE_LOG.event(f"key:{self.label}", 1, f"rate-limit store {_pct(self.label)}: %d call(s) failed on a "
                           f"counter key holding foreign data ({_pct(_short(e))}); each such caller got "
                           "on_store_error, the store stays in use")
                raise StoreDown("key_error") from None
            self._failed("error", e)
            raise StoreDown(type(e).__name__) from None

    async def _warm(self) -> None:
        """One request at a time runs the strategy's scripts once before the others go ahead: on a
        fresh (or restarted) Redis the scripts are not loaded yet, and many concurrent first calls
        racing to load them can lose their connection. A caller that waited for the lock while the
        one ahead of it failed gives up at once (the store has just been marked down): only one
        probes, and a dead store costs one timeout, not one per waiting request."""
        seen = self.health.failures
        async with self.health.lock:
            if self.health.failures != seen:
                raise StoreDown("store marked down after a recent failure")
            if self.health.cold:
                await self.limiter.hit(WARMUP_ITEM, *self.tag, "gateway-warmup")
                await self.limiter.get_window_stats(WARMUP_ITEM, *self.tag, "gateway-warmup")
                self.health.cold = False
                if self.health.failing_since is not None:
                    # (the outage's end, said once: its start was logged, and on-call reads both)
                    log.warning("rate-limit store %s answers again, after %.1f s of failures", self.label,
                                time.monotonic() - self.health.failing_since)
                    self.health.failing_since = None

    async def check(self) -> bool:
        """Connect and warm up (bounded by ``max(storage_timeout, CHECK_TIMEOUT)``); False if the
        store is not reachable (``last_error`` says why)."""
        if self.memory:
            return True
        try:
            await self.call(_noop, deadline=time.monotonic() + max(self.timeout, CHECK_TIMEOUT))
            return True
        except StoreDown:
            return False

    async def eviction(self) -> str | None:
        """What Redis does when it is full, if it may evict the counters: ``"maxmemory-policy
        allkeys-lru, maxmemory 10485760"`` (None: it does not evict, or it would not say: CONFIG
        refused)."""
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        if client is None or not hasattr(client, "config_get"):
            return None
        try:
            async with asyncio.timeout(self.timeout):
                got = await client.config_get(["maxmemory-policy", "maxmemory"])
        except Exception:  # (a managed Redis may not offer CONFIG, an ACL may forbid it)
            return None
        conf = {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
                for k, v in dict(got).items()}
        policy, size = conf.get("maxmemory-policy", "noeviction"), conf.get("maxmemory", "0")
        if policy == "noeviction" or size in ("0", ""):
            return None
        return f"maxmemory-policy {policy}, maxmemory {size}"

    def _failed(self, kind: str, e: BaseException | None) -> None:
        """Count the failure; mark the store down. Logged when it marks the store down: the calls
        that were in flight together with it fail with it, and say nothing more (they are counted)."""
        self.errors.labels(self.label, kind).inc()
        now = time.monotonic()
        was_down = self.health.down_until > now
        self.health.cold = True
        self.health.failures += 1
        self.health.down_until = now + self.retry
        if self.health.failing_since is None:
            self.health.failing_since = now
        self.last_error = "timed out" if kind == "timeout" else (
            f"{type(e).__name__}: {_short(e)}" if e is not None else "failed")
        if not was_down:
            log.warning("rate-limit store %s %s%s", self.label, "timed out" if kind == "timeout" else "failed",
                        f": {type(e).__name__}: {_short(e)}" if e is not None else "")

    def dropped(self, charges: int, why: str) -> None:
        """Token charges that could not be applied (the store failed, or was marked down): those
        tokens are not counted. Counted (``kind="charge_dropped"``) and logged, at most a line per
        ``LOG_EVERY`` seconds."""
        if charges <= 0:
            return
        self.errors.labels(self.label, "charge_dropped").inc(charges)
        STORE_LOG.event(f"charge:{self.label}", charges, f"rate-limit store {_pct(self.label)}: %d token charge(s) "
                   f"dropped ({_pct(why)}): those tokens were not counted")

    # -- operations ------------------------------------------------------------------------------
    async def hit(self, item: RateLimitItem, ids: tuple[str, ...], cost: int = 1,
                  deadline: float | None = None) -> bool:
        if self.memory:
            return bool(self.limiter.hit(item, *ids, cost=cost))
        ids = self.tag + ids
        return await self.call(lambda: self.limiter.hit(item, *ids, cost=cost), deadline)

    async def stats(self, item: RateLimitItem, ids: tuple[str, ...], deadline: float | None = None) -> tuple[float, int]:
        if self.memory:
            ws = self.limiter.get_window_stats(item, *ids)
        else:
            ids = self.tag + ids
            ws = await self.call(lambda: self.limiter.get_window_stats(item, *ids), deadline)
            if self.sliding and ws[1] < item.amount and ws[0] <= time.time():
                # The library's reset is the sooner of the previous window's next unit to free and
                # the current window's time to live modulo the window. Redis gives a new window
                # twice the window to live: read in the millisecond it began, with nothing counted
                # in the previous one, that says "now". Such a window ends a window from now.
                key, expiry = item.key_for(*ids), item.get_expiry()
                w = await self.call(lambda: self.storage.get_sliding_window(key, expiry), deadline)
                if not w[0] and w[2]:
                    return time.time() + expiry, ws[1]
        return ws[0], ws[1]

    async def wait_for(self, item: RateLimitItem, ids: tuple[str, ...], need: int,
                       deadline: float | None = None) -> float | None:
        """Seconds until ``need`` more units fit a sliding-window counter, if nothing else is counted
        meanwhile (None for the other strategies: their reset time is when room frees). The
        window statistics' reset time is when the first unit frees, which for a request needing
        many (tokens) is too soon: a client retrying then would be refused again."""
        if not self.sliding:
            return None
        key, expiry = item.key_for(*self.tag, *ids), item.get_expiry()
        if self.memory:
            w = self.storage.get_sliding_window(key, expiry)
        else:
            w = await self.call(lambda: self.storage.get_sliding_window(key, expiry), deadline)
        return sliding_wait(item.amount, expiry, need, w[0], w[2], max(0.0, w[3] - expiry))

    # Quota usage on a network store: a plain counter per (subject, period), shared by every
    # instance (the database keeps the durable record; see quota.py).
    async def usage(self, key: str, deadline: float | None = None) -> int:
        return int(await self.call(lambda: self.storage.get(key), deadline))

    async def add_usage(self, key: str, expiry: int, amount: int, deadline: float | None = None) -> None:
        await self.call(lambda: self.storage.incr(key, expiry, amount), deadline)

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


def _pct(text: str) -> str:
    """``text`` for a %-format template (a ThrottledLog line)."""
    return text.replace("%", "%%")


def _short(e: BaseException) -> str:
    """An error's text for a log line: one line, bounded (a Redis error can quote a key or script)."""
    return " ".join(str(e).split())[:200]


async def _close_storage(storage: Any) -> None:
    timer = getattr(storage, "timer", None)  # memory: the pending sweep (a threading.Timer)
    if timer is not None:
        timer.cancel()
