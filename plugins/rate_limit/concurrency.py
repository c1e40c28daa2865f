"""Caps on requests running at once (``concurrency``): a slot is taken when a request is admitted and
given back when it ends (the last byte of its answer, a cancelled stream, an error, a refusal by a
later check). The `limits` library counts events in windows, not requests in progress, so the
slots are kept here:

- ``memory://``: a count per counter for the process (every plugin instance and reload share it,
  as they share the in-memory counters).
- Redis: a sorted set per counter whose members are leases (one per running request, scored by
  when it lapses, on Redis's own clock). A Lua script drops lapsed leases, counts the rest and adds
  one if there is room, atomically, so the cap holds across every instance on that Redis. Each
  process renews its leases every :data:`RENEW_EVERY` seconds (putting back any Redis lost); a
  process that dies leaves leases that lapse within :data:`LEASE` seconds, so a crash does not keep
  slots taken for ever. A lease is taken for :data:`FIRST_LEASE` seconds and extended once the
  process knows it holds it: a take whose answer never came back frees soon.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from .config import ConcurrencyConfig, KEY_PARTS
from .store import CounterStore

log = logging.getLogger("gateway.rate_limit")

#: Seconds a lease on Redis lives without renewal (a crashed process's slots free after this long).
LEASE = 30.0
#: Seconds a lease lives when taken, until the process knows it has it and extends it to LEASE: a
#: take whose answer was lost (a timeout, a client that left while Redis was slow) frees this soon.
FIRST_LEASE = 5.0
#: Seconds between renewals of a process's leases.
RENEW_EVERY = 10.0
#: Redis key prefix of the lease sets (beside the library's ``LIMITS:`` counters).
PREFIX = "GATEWAY:running/"


@dataclass(frozen=True, slots=True)
class Cap:
    """One concurrency cap (what :func:`rules.identifiers` reads: rule, key_by, ip_prefixes ...)."""

    rule: str
    max: int
    key_by: tuple[str, ...]
    ip_prefixes: tuple[int, int] = (32, 64)
    counter: str = ""
    rule_id: str = ""
    user_header: str | None = None

    def __post_init__(self) -> None:
        from .rules import _safe

        object.__setattr__(self, "rule_id", _safe(self.counter or self.rule))

    @property
    def label(self) -> str:
        return f"{self.rule} ({self.max} at once)"


def compile_caps(caps: list[ConcurrencyConfig], ip_prefixes: tuple[int, int],
                 user_header: str | None = None) -> list[Cap]:
    return [Cap(c.name, c.max, () if c.key_by == "global" else tuple(p for p in KEY_PARTS if p in c.key_by),
                ip_prefixes, user_header=user_header) for c in caps]


def key_cap(amount: int, ip_prefixes: tuple[int, int], counter: str = "") -> Cap:
    """A key's own ``max_parallel``: keyed by the key alone; ``counter``: the cap keyed by key alone
    it replaces, if any (its running requests are the key's)."""
    return Cap("key-parallel", amount, ("key",), ip_prefixes, counter)


#: memory://: requests running per counter, for the process.
RUNNING: dict[str, int] = {}

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then
  return {0, n}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return {1, n + 1}
"""

# (without XX: a lease Redis lost, restarted or flushed, is put back while its request runs)
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""


class Leases:
    """The leases this process holds on one Redis (a shared resource per storage URI): taken,
    given back, and renewed in the background while their requests run."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, None]] = {}  # counter key -> its leases held here
        self.store: CounterStore | None = None      # the latest plugin's (its timeout and health)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._loaded = -1  # the store's failure count when the scripts were last loaded
        self._sha: tuple[str, str] = ("", "")
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def _client(store: CounterStore) -> Any:
        return store.storage.bridge.get_connection()

    async def _scripts(self, store: CounterStore) -> tuple[str, str]:
        """The scripts' digests, loaded once by one caller (again after a store failure: a restarted
        Redis has lost them). Many first callers racing to load a script lose their connections."""
        seen = store.health.failures
        if self._loaded != seen:
            async with self._lock:
                if self._loaded != seen:
                    c = self._client(store)
                    sha = (await c.script_load(_ACQUIRE), await c.script_load(_RENEW))
                    self._sha = tuple(x.decode() if isinstance(x, bytes) else x for x in sha)  # type: ignore[assignment]
                    self._loaded = seen
        return self._sha

    async def _eval(self, store: CounterStore, script: int, key: str, args: list[Any]) -> Any:
        """Run one of the scripts (0: take, 1: renew) on ``key``; on NOSCRIPT (Redis restarted or was
        flushed since they were loaded) they are loaded again, once."""
        from coredis.exceptions import NoScriptError

        try:
            return await self._client(store).evalsha((await self._scripts(store))[script], keys=[key], args=args)
        except NoScriptError:
            self._loaded = -1
            return await self._client(store).evalsha((await self._scripts(store))[script], keys=[key], args=args)

    async def acquire(self, store: CounterStore, key: str, cap: int, deadline: float | None) -> tuple[bool, int, str]:
        """(taken, running now, lease id): under the store's deadline and health (a failure is the
        store's: ``on_store_error`` applies)."""
        self.store = store
        lease = secrets.token_hex(8)

        async def run() -> Any:
            return await self._eval(store, 0, key, [cap, FIRST_LEASE, lease])

        ok, n = await store.call(run, deadline)
        if ok:
            self.held.setdefault(key, {})[lease] = None
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._renew_loop())
            t = asyncio.get_running_loop().create_task(self._extend(store, key, lease))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        return bool(ok), int(n), lease

    async def _extend(self, store: CounterStore, key: str, lease: str) -> None:
        """The lease just taken lives LEASE seconds from now (in the background: the request goes on)."""
        try:
            await self._renew(store, key, [lease])
        except Exception:  # (the renewal rounds try again while the request runs)
            pass

    async def _renew(self, store: CounterStore, key: str, leases: list[str]) -> None:
        """Renew (or put back) ``leases``; any given back meanwhile is removed again after (its release
        may have reached Redis before this renewal did)."""
        async with asyncio.timeout(max(store.timeout, 1.0)):
            await self._eval(store, 1, key, [LEASE, *leases])
            mine = self.held.get(key, {})
            gone = [x for x in leases if x not in mine]
            if gone:
                await self._client(store).zrem(key, gone)

    async def release(self, store: CounterStore, key: str, lease: str) -> None:
        """Give a slot back. Tried even while the store is marked down (a slot kept would refuse
        others); if Redis does not take it, the lease lapses within :data:`LEASE` seconds."""
        mine = self.held.get(key)
        if mine is not None:
            mine.pop(lease, None)
            if not mine:
                del self.held[key]
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(store.timeout, 1.0)):
                await self._client(store).zrem(key, [lease])

    async def _renew_loop(self) -> None:
        while self.held:
            await asyncio.sleep(RENEW_EVERY)
            store = self.store
            if store is None:
                continue
            for key, mine in list(self.held.items()):
                if not mine:
                    continue
                try:
                    await self._renew(store, key, list(mine))
                except Exception as e:  # tried again at the next round; after LEASE seconds of
                    # failures these slots free on Redis while their requests still run
                    log.warning("rate_limit: renewing the concurrency leases on %s failed (%s: %s)", store.label,
                                type(e).__name__, e)
                    break

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for t in list(self._tasks):
            t.cancel()


def take_memory(key: str, cap: int) -> tuple[bool, int]:
    n = RUNNING.get(key, 0)
    if n >= cap:
        return False, n
    RUNNING[key] = n + 1
    return True, n + 1


def give_memory(key: str) -> None:
    n = RUNNING.get(key, 0) - 1
    if n > 0:
        RUNNING[key] = n
    else:
        RUNNING.pop(key, None)
