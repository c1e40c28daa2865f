"""``key_auth``: every request must carry a gateway API key.

The key is read from ``Authorization: Bearer`` (what the OpenAI SDKs send) or from the configured
headers (``X-API-Key``, ``api-key``), never from the query string, and is stripped before the request
goes upstream. A valid key sets ``ctx.identity`` for the plugins after this one; usage is rolled up
per key per day in the background. See docs/key_auth.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fnmatch
import hashlib
import math
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from prometheus_client import Counter
from pydantic import Field, field_validator

from gateway.db import store_error
from gateway.logs import ThrottledLog
from gateway.plugin import Plugin, PluginConfig, Reply

from .keys import (ID_LEN, KEY_ID, KEY_LEN, PREFIX, hash_secret, loose_key_id, parse_key, pepper_fingerprint,
                   secrets_match)
from .store import LIMIT_FIELDS, KeyStore, UsageRecord, created_fields, key_fields, normalise_scopes

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.services import Services

log = logging.getLogger("gateway.plugins.key_auth")

IDENTITY_FIELDS = Literal["key_id", "owner", "name", "team"]
_DUMMY_HASH = "0" * 64
#: ``ctx.state`` entry of an admitted key limited to some models (checked in on_request, with the body)
_MODELS = "key_auth.models"
_IMPORTED = "key_auth.imported"  # the SHA-256 of an imported token the request came with


def _mask_imported_model(ctx: "RequestContext", digest: str) -> None:
    """An imported token a client also put in the body's ``model`` (arguments swapped), masked
    before anything records or forwards it, as a gateway key there is (the proxy does those)."""
    j = ctx.json
    m = j.get("model") if isinstance(j, dict) else None
    if isinstance(m, str) and 8 <= len(m) <= 1024 and \
            hashlib.sha256(m.encode("utf-8", "surrogatepass")).hexdigest() == digest:
        data = dict(ctx.json_exact)
        data["model"] = "REDACTED"
        ctx.set_json(data)
#: Control characters cannot go into an HTTP header value (CR/LF would end it): replaced by a space.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Seconds a cached key record must be old before a secret it does not match makes it read again
#: (a rotation through another instance; a wrong secret costs at most one lookup per key this often).
RECHECK_AFTER = 1.0


class UsageWriterConfig(PluginConfig):
    max_queue: int = Field(10000, ge=1, description="Usage records buffered before new ones are dropped (counted).")
    batch_size: int = Field(500, ge=1, description="Records aggregated into one upsert.")
    flush_interval: float = Field(0.5, gt=0, description="Seconds a batch waits to fill up before it is written.")


class KeyAuthConfig(PluginConfig):
    headers: list[str] = Field(
        default_factory=lambda: ["Authorization", "X-API-Key", "api-key"],
        description="Request headers read for the key, in order. 'Authorization' is read as 'Bearer <key>'; "
                    "the others hold the bare key. The query string is never read. All are removed before "
                    "the request is forwarded.")
    pepper: str = Field("", repr=False,
                        description="Server-side secret mixed into the stored key hashes (HMAC-SHA-256), e.g. "
                                    "${GATEWAY_KEY_PEPPER:-}. Empty: plain SHA-256. Changing it invalidates "
                                    "every existing key.")
    cache_ttl: float = Field(5.0, ge=0, le=300,
                             description="Seconds a key lookup is cached in memory. A revoke through this "
                                         "instance applies at once; through another instance or the CLI "
                                         "within watch_interval, and at the latest within this time.")
    watch_interval: float = Field(1.0, ge=0, le=60,
                                  description="Seconds between checks of the database for keys another "
                                              "instance or the CLI changed (revoked, rotated, updated); a "
                                              "changed key is dropped from the cache. 0: off (cache_ttl "
                                              "alone bounds how long a change takes).")
    cache_size: int = Field(100000, ge=1, description="Most key ids kept in the validation cache.")
    store_timeout: float = Field(2.0, gt=0, description="Seconds a key lookup may take before the request "
                                                        "is refused with 503 (fail closed).")
    stale_if_error: float = Field(30.0, ge=0, le=3600,
                                  description="Seconds past cache_ttl a cached key lookup is still used while "
                                              "the key store cannot be reached (a database outage or restart): "
                                              "keys checked that recently keep working, anything else gets "
                                              "503. 0: only lookups younger than cache_ttl are used.")
    rotation_grace: float = Field(86400.0, ge=0, le=90 * 86400,
                                  description="Default seconds the previous secret keeps working after a rotation "
                                              "(at most 90 days, as a rotation's own grace).")
    forward_identity_headers: dict[str, IDENTITY_FIELDS] = Field(
        default_factory=dict,
        description="Headers sent upstream with the caller's identity, e.g. {X-Gateway-Key-Id: key_id, "
                    "X-Gateway-Owner: owner}. Default: none.")
    deny_keys: list[str] = Field(
        default_factory=list,
        description="Key ids refused as revoked, whatever the database says: for a leaked key when the "
                    "database cannot store its revocation (a full disk, an outage), applied by a reload on "
                    "every instance. Ids only (the 12 characters after 'gw_'), never keys.")
    imported_keys: bool = Field(False, description="Accept keys issued elsewhere and imported (gateway keys "
                                                   "create --import-sha256 / --import-key): a token that is "
                                                   "not a gateway key is looked up by its SHA-256.")
    track_usage: bool = Field(True, description="Roll usage up per key per day.")
    usage_writer: UsageWriterConfig = Field(default_factory=UsageWriterConfig,
                                            description="Background writer for usage rollups.")
    last_used_interval: float = Field(60.0, ge=0, description="last_used_at is written at most this often "
                                                              "per key (seconds).")

    @field_validator("deny_keys")
    @classmethod
    def _deny_keys(cls, v: list[str]) -> list[str]:
        for k in v:
            if not KEY_ID.match(k):
                if parse_key(k) is not None or k.startswith("gw_"):
                    raise ValueError("deny_keys takes key ids (the 12 characters after 'gw_'), not keys: a key's "
                                     "secret does not belong in the config")
                # (a long value may be a key pasted without its prefix: not shown)
                shown = f": {k!r}" if len(k) <= 16 else f" ({len(k)} characters, not shown)"
                raise ValueError(f"not a key id{shown}; an id is the 12 letters and digits after 'gw_'")
        return v

    @field_validator("pepper", mode="before")
    @classmethod
    def _pepper(cls, v: Any) -> Any:
        return "" if v is None else v  # "${GATEWAY_KEY_PEPPER:-}" with the variable unset

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one header is needed")
        return v

    @field_validator("headers", "forward_identity_headers")
    @classmethod
    def _names(cls, v: Any) -> Any:
        from gateway.config.loader import header_problem

        seen: dict[str, str] = {}
        for name in v:
            bad = header_problem(name, "")
            if bad:
                raise ValueError(f"{name!r}: {bad}")
            other = seen.setdefault(name.lower(), name)
            if other != name:  # HTTP header names are case-insensitive: one of them would be lost
                raise ValueError(f"{other!r} and {name!r} are the same header (names are case-insensitive); keep one")
        return v


class _Entry:
    """A cached key record: what validation needs, and the identity handed to later plugins."""

    __slots__ = ("hash", "prev_hash", "prev_until", "expires", "revoked", "paths", "path_roots", "models",
                 "identity", "verified", "updated", "import_until")

    def __init__(self, row: Any) -> None:
        #: Keyed BLAKE2b digests of full keys already checked against this record -> True if it was
        #: the previous (rotated-out) secret. In memory only, with a per-process random key, and gone
        #: with the entry: a repeat request skips the checksum and the HMAC, nothing else.
        self.verified: dict[bytes, bool] = {}
        self.hash: str = row.secret_hash
        self.prev_hash: str | None = row.prev_secret_hash
        self.prev_until = row.prev_valid_until.timestamp() if row.prev_valid_until else None
        self.expires = row.expires_at.timestamp() if row.expires_at else None
        self.revoked = row.revoked_at is not None
        self.updated: Any = row.updated_at  # the version of the record (see KeyWatch.poll)
        #: Until when the imported key (the token issued elsewhere) works: for ever until the key is
        #: first rotated, then for that rotation's grace (later rotations do not bring it back), as a
        #: rotated-out secret; 0: not imported.
        self.import_until = 0.0 if row.import_hash is None else \
            row.import_valid_until.timestamp() if row.import_valid_until is not None else \
            math.inf if row.rotated_at is None else 0.0
        scopes = normalise_scopes(row.scopes)
        # Path scopes cover the path equal to a prefix and those below it, on segment boundaries
        # (/v1/models: not /v1/modelsX), as routes do; "/v1/chat/" and "/v1/chat" alike; without
        # regard to case, as routes too (/v1/Chat/completions is the chat endpoint to many backends).
        lower = [p.lower() for p in scopes["paths"]]
        self.paths = tuple(p if p.endswith("/") else p + "/" for p in lower)
        self.path_roots = frozenset(p.rstrip("/") or "/" for p in lower)
        self.models = tuple(scopes["models"])
        self.identity: dict[str, Any] = {
            "key_id": row.id, "owner": row.owner, "name": row.name, "team": row.team, "scopes": scopes,
            "metadata": row.meta or {},
            "limits": {f: getattr(row, f) for f in LIMIT_FIELDS},
        }


_ID_START, _ID_END = len(PREFIX), len(PREFIX) + ID_LEN
_FAST_KEY = os.urandom(32)  # never leaves the process


def _fast(raw: str, key: bytes) -> bytes:
    return hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), key=key, digest_size=32).digest()


class KeyCache:
    """key id -> (entry or None for unknown, time fetched). Shared by every key_auth instance and the
    admin routes of this process, so an admin change here invalidates at once."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[_Entry | None, float]] = {}
        self.inflight: dict[str, asyncio.Task[_Entry | None]] = {}
        self.gen = 0  # bumped by every invalidation, so a lookup that raced it is not cached
        #: The last lookup failed: a cached record within stale_if_error is used at once, without
        #: waiting for the store to fail again; one lookup per key id at a time probes it in the
        #: background, not before ``retry_at`` (monotonic time).
        self.failing = False
        self.retry_at = 0.0
        #: Keys revoked through this process's admin API whose revocation the database refused (a
        #: full disk, a lock, an outage): refused here all the same, until the process ends.
        self.revoked_here: set[str] = set()
        #: imported keys: SHA-256 of a token -> (key id; time looked up); the tokens found not to be
        #: imported, apart (see KeyAuth._imported); the lookups under way
        self.imports: dict[str, tuple[str | None, float]] = {}
        self.not_imported: dict[str, tuple[str | None, float]] = {}
        self.inflight_imports: dict[str, asyncio.Future[str | None]] = {}

    def lookup_failed(self, e: BaseException) -> "StoreUnavailable":
        """A lookup (by key id, or an imported token's digest) failed: the store is marked failing
        (cached records decide within stale_if_error) and it is said, throttled."""
        kind = type(e).__name__
        self.failing, self.retry_at = True, time.monotonic() + STORE_RETRY
        _LOOKUP_LOG.event(kind, 1, f"key store lookups failed ({kind}): %d lookup(s); their requests were "
                                   "refused with 503, or checked against the cached record (stale_if_error)")
        return StoreUnavailable()

    def invalidate(self, key_id: str | None = None) -> None:
        self.gen += 1
        self.not_imported.clear()  # (a key just imported, here or elsewhere, is not "unknown" any more)
        if key_id is None:
            self.imports.clear()
        if key_id is None:
            self.entries.clear()
            self.inflight.clear()
        else:
            self.entries.pop(key_id, None)
            self.inflight.pop(key_id, None)

    def done(self, key_id: str, task: "asyncio.Task[_Entry | None]") -> None:
        if self.inflight.get(key_id) is task:
            del self.inflight[key_id]
        if not task.cancelled():
            task.exception()  # retrieved here, so an outage with no waiter left is not reported twice


class StoreUnavailable(Exception):
    pass


_LOOKUP_LOG = ThrottledLog(log)  # an outage fails a lookup per request: one line per 10 s
#: Seconds after a failed lookup before the key store is tried again for a cached record (stale_if_error).
STORE_RETRY = 1.0


def _retrieve(task: "asyncio.Future[Any]") -> None:
    """Collect the outcome of a lookup nobody waits for any more (no 'never retrieved' warning)."""
    if not task.cancelled():
        task.exception()


class KeyWatch:
    """Drops cached keys that another process changed, so a revoke made through another instance or
    the CLI applies here within ``watch_interval`` seconds rather than ``cache_ttl``.

    Every interval it reads the ids and ``updated_at`` of the keys changed lately (an indexed range
    read) and invalidates those whose stamp it has not seen yet. The window reaches back
    ``_SKEW`` seconds further than needed, so a writer whose clock is somewhat behind is still seen;
    after polls that failed (a database down or slow), back to the last poll that worked, so a
    change made meanwhile is never missed and the cache is kept (stale_if_error relies on it)."""

    _SKEW = 30.0
    _MAX = 10000  # more changed keys than this in one window: the whole cache is dropped

    def __init__(self, services: "Services", cache: KeyCache, store: KeyStore) -> None:
        self.services, self.cache, self.store = services, cache, store
        self.seen: dict[str, dt.datetime] = {}
        self.task: asyncio.Task[None] | None = None
        self.failing = False
        self.last_ok = dt.datetime.now(dt.UTC)  # when the last poll that worked began

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="key_auth.watch")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def _run(self) -> None:
        while True:
            cfg = current_config(self.services)
            if cfg.watch_interval <= 0 or cfg.cache_ttl <= 0:  # off, or nothing cached to drop
                self.seen.clear()
                await asyncio.sleep(1.0)
                continue
            await asyncio.sleep(cfg.watch_interval)
            try:
                await self.poll(cfg)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the database is down: cache_ttl still bounds every entry
                if not self.failing:
                    log.warning("key_auth: checking for changed keys failed (%s); cached keys expire "
                                "after cache_ttl (plus stale_if_error while lookups fail) until it works "
                                "again", type(e).__name__)
                self.failing = True

    async def poll(self, cfg: KeyAuthConfig) -> None:
        began = dt.datetime.now(dt.UTC)
        since = min(began - dt.timedelta(seconds=cfg.cache_ttl + cfg.watch_interval + self._SKEW),
                    self.last_ok - dt.timedelta(seconds=self._SKEW))
        async with asyncio.timeout(cfg.store_timeout):
            rows = await self.store.changed_since(since, self._MAX + 1)
        if self.failing:
            log.warning("key_auth: checking for changed keys works again")  # (at the level of the failure)
            self.failing = False
        self.last_ok = began
        if len(rows) > self._MAX:
            self.cache.invalidate()
            self.seen = {}
            return
        seen = {}
        for key_id, stamp in rows:
            seen[key_id] = stamp
            if self.seen.get(key_id) != stamp:
                # (a record cached since it changed is this version already: kept, so it can still
                # serve through an outage under stale_if_error; a key just created, or changed by
                # this process, is no longer dropped on the watch's first sight of it)
                cached = self.cache.entries.get(key_id)
                if cached is None or cached[0] is None or cached[0].updated != stamp:
                    self.cache.invalidate(key_id)
        self.seen = seen


def key_cache(services: "Services") -> KeyCache:
    return services.resource("key_auth.cache", KeyCache)


def key_store(services: "Services") -> KeyStore:
    return services.resource("key_auth.store", lambda: KeyStore(services.db))


class UsageTally:
    """Usage counted on the request path and handed to one background writer per process.

    Shared by every key_auth instance and kept across config reloads: a request that outlives a
    reload (a long stream) is counted when it ends, by the same tally. The request path only adds to
    a dict; a task hands it over to the writer every ``flush_interval``; closing (at exit) hands over
    and flushes what is left."""

    def __init__(self, services: "Services", store: KeyStore, cfg: KeyAuthConfig) -> None:
        self.store = store
        self.cfg = cfg  # the settings of the instance activated last
        w = cfg.usage_writer
        self.writer = services.writer("key_auth.usage", self._write, max_queue=w.max_queue,
                                      batch_size=w.batch_size, flush_interval=w.flush_interval, on_full="drop")
        # (key id, UTC day) -> [requests, prompt tokens, completion tokens] since the last hand-over
        self.pending: dict[tuple[str, dt.date], list[int]] = {}
        self.last_seen: dict[str, float] = {}     # key id -> wall time of its latest request
        self.touched: dict[str, float] = {}       # key id -> monotonic time last_used_at was written
        self.written: dict[str, float] = {}       # key id -> the last_seen time last written as last_used_at
        self.closing = False  # (the last batches: every key's last_used_at is written, whatever the interval)
        self.writer.start()
        self.task = asyncio.create_task(self._loop(), name="key_auth.usage")

    def configure(self, cfg: KeyAuthConfig) -> None:
        self.cfg = cfg
        w, cur = cfg.usage_writer, self.writer
        cur.configure(max_queue=w.max_queue, batch_size=w.batch_size, flush_interval=w.flush_interval,
                      on_full="drop", full_wait=cur.full_wait, retry_for=cur.retry_for)

    def add(self, key_id: str, prompt: int, completion: int, arrived: float | None = None) -> None:
        """One request of the key; ``arrived`` (wall time) decides its UTC day, as for the quota
        and the audit event: a stream running across midnight counts for the day it began."""
        now = time.time()
        k = (key_id, _utc_day(now if arrived is None else arrived))
        a = self.pending.get(k)
        if a is None:
            a = self.pending[k] = [0, 0, 0]
        a[0] += 1
        a[1] += prompt
        a[2] += completion
        self.last_seen[key_id] = now

    def hand_over(self) -> None:
        """Move the usage gathered so far into the writer's queue (one record per key and day)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        for (key_id, day), (n, p, c) in pending.items():
            self.writer.put_nowait(UsageRecord(key_id, day, n, p, c))
        self.writer.kick()  # gathered for flush_interval here already: written now, not after another

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.usage_writer.flush_interval)
            self.hand_over()

    async def flush(self, timeout: float = 10.0) -> None:
        self.hand_over()
        await self.writer.flush(timeout)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        # At a stop, each key's latest use is written, however recently its last_used_at was (it
        # would stay at the first use of the interval until the key is used again): the last
        # batches touch every key in them, and a key with no usage left to write gets a record of
        # nothing, so that its touch too is written within the stop's budget for the writers.
        self.closing = True
        handed = {k for k, _ in self.pending}
        self.hand_over()
        for k, t in self.last_seen.items():
            if k not in handed and self.written.get(k, 0.0) < t:
                self.writer.put_nowait(UsageRecord(k, _utc_day(t), 0, 0, 0))
        await self.writer.close()

    async def _write(self, batch: list[UsageRecord]) -> None:
        mono = time.monotonic()
        keys = {r.key_id for r in batch}
        every = 0.0 if self.closing else self.cfg.last_used_interval
        touch = [(k, self.last_seen[k]) for k in keys
                 if k in self.last_seen and mono - self.touched.get(k, -1e18) >= every
                 and self.written.get(k, 0.0) < self.last_seen[k]]
        await self.store.record_usage(batch, [(k, dt.datetime.fromtimestamp(t, dt.timezone.utc)) for k, t in touch])
        for k, t in touch:
            self.touched[k] = mono
            self.written[k] = t
        if len(self.touched) > 100000:
            self.touched.clear()
        if len(self.last_seen) > 100000:
            self.last_seen.clear()
            self.written.clear()


#: Request fields besides "model" that name a model a backend reads (Ollama's create and copy).
_OTHER_MODEL_FIELDS = frozenset({"from", "source", "destination", "modelfile"})


class KeyAuth(Plugin):
    name = "key_auth"
    Config = KeyAuthConfig
    uses_database: ClassVar[bool] = True

    def __init__(self, config: KeyAuthConfig, services: "Services") -> None:
        super().__init__(config, services)
        self.cache = key_cache(services)
        self.store = key_store(services)
        self._denied = frozenset(config.deny_keys)
        self._bearer_only = [h.lower() == "authorization" for h in config.headers]
        others = [h for h, b in zip(config.headers, self._bearer_only) if not b]
        ways = (["as 'Authorization: Bearer <key>'"] if any(self._bearer_only) else []) + (
            [f"in the {' or '.join(others)} header"] if others else [])
        self._missing = "Missing API key: send it " + " or ".join(ways) + "."
        # Per pepper: an instance with another pepper (a reload changed it) never trusts what this
        # one verified.
        self._fast_key = hashlib.blake2b(config.pepper.encode(), key=_FAST_KEY, digest_size=32).digest()
        if not config.track_usage:
            self.unused_hooks = frozenset({"on_complete"})  # it only tallies usage
        self.tally: UsageTally | None = None  # set at startup when track_usage is on
        self.stale = services.metric("key_auth_stale", lambda reg: Counter(
            "gateway_auth_stale_lookups_total", "Requests whose key was checked against a cached record older "
            "than cache_ttl because the key store could not be reached (stale_if_error)", registry=reg))

    # -- lifecycle --------------------------------------------------------------------------------------
    async def startup(self) -> None:
        await self._record_pepper()
        if self.config.watch_interval > 0:
            self.services.resource("key_auth.watch", lambda: KeyWatch(self.services, self.cache, self.store),
                                   lambda w: w.close()).start()
        if self.config.track_usage:
            self.tally = self.services.resource("key_auth.usage", lambda: UsageTally(
                self.services, self.store, self.config), lambda t: t.close())

    async def _record_pepper(self) -> None:
        """Record the pepper's fingerprint, so that the CLI refuses to make keys with another (a shell
        without the pepper's variable made keys this gateway refused); say so when it changed."""
        mine = pepper_fingerprint(self.config.pepper)
        try:
            async with asyncio.timeout(5):
                old = await self.store.set_setting("pepper", mine)
        except Exception as e:  # (the key store down at start: requests say so; this is only a check)
            log.warning("key_auth: the pepper's fingerprint could not be recorded (%s); `gateway keys` commands "
                        "cannot check theirs against it until the next start", store_error(e))
            return
        if old is not None and old != mine:
            log.warning("key_auth.pepper is not the one the gateway last started with: keys made or rotated "
                        "with the other one are refused (`gateway keys` now makes keys with this one only)")

    #: Process-wide: the stored hashes' pepper, the key cache and its watch, the usage writer.
    route_fixed: ClassVar[tuple[str, ...]] = ("pepper", "cache_size", "watch_interval", "usage_writer",
                                              "last_used_interval", "deny_keys")

    def guarded_headers(self) -> tuple[str, ...]:
        # The client's key never reaches the upstream (a header the upstream config sets itself,
        # e.g. 'api-key' for an upstream that authenticates with it, is set from the config), nor
        # does a client's own copy of an identity header; on routes with key_auth off too.
        return (*self.config.headers, *self.config.forward_identity_headers)

    def activated(self) -> None:
        if self.tally is not None:
            self.tally.configure(self.config)  # writer settings from a reload apply now

    # -- the request path -------------------------------------------------------------------------------
    def _extract(self, ctx: "RequestContext") -> str | None:
        headers = ctx.request.headers
        for h, bearer in zip(self.config.headers, self._bearer_only):
            v = headers.get(h)
            if not v:
                continue
            v = v.strip()
            if v[:7].lower() == "bearer ":
                v = v[7:].strip()
            elif bearer:
                continue
            if v:
                return v
        return None

    def _refuse(self, ctx: "RequestContext", status: int, reason: str, key_id: str | None, message: str,
                code: str, type_: str = "invalid_request_error", entry: _Entry | None = None) -> Reply:
        ctx.refusal = {"plugin": self.name, "type": "auth", "reason": reason, "key_id": key_id}
        if entry is not None:
            # (its secret matched: the refusal names the key's owner too, so the audit trail and
            # `gateway audit top --by owner` count it where it belongs)
            ctx.refusal["owner"] = entry.identity.get("owner")
            ctx.refusal["team"] = entry.identity.get("team")
        # (a key store that is down: retried soon, as the conversation store's 503 says)
        headers = {"WWW-Authenticate": 'Bearer realm="gateway"'} if status == 401 else \
            {"Retry-After": "1"} if status == 503 else None
        return Reply.error(status, message, type_, code, headers)

    async def on_headers(self, ctx: "RequestContext") -> Reply | None:
        """The key itself, before the body is read: a client with no valid key never gets its
        body taken in (nor a ``100 Continue``). The model scope needs the body: ``on_request``."""
        raw = self._extract(ctx)
        if raw is None:
            other = any(ctx.request.headers.get(h, "").strip() for h, bearer in zip(self.config.headers, self._bearer_only)
                        if bearer)
            return self._refuse(ctx, 401, "missing", None,
                                "No API key: the Authorization header must be 'Bearer <key>' (another scheme, or "
                                "none, was sent)." if other else
                                self._missing, "missing_api_key")
        # A key this entry has already verified: the same checks below, minus checksum and HMAC.
        # Only for a value of a key's length, and the digest is computed whatever the cache holds.
        # (The response time can still show whether a key id's record is cached: ids are not secret.)
        fast = None
        if len(raw) == KEY_LEN:
            fast = _fast(raw, self._fast_key)
            hit = self.cache.entries.get(raw[_ID_START:_ID_END])
            if hit is not None and hit[0] is not None and time.monotonic() - hit[1] < self.config.cache_ttl:
                entry = hit[0]
                prev = entry.verified.get(fast)
                if prev is not None and (not prev or (entry.prev_until is not None
                                                      and time.time() < entry.prev_until)):
                    return self._admit(ctx, raw[_ID_START:_ID_END], entry, time.time())
        parsed = parse_key(raw)
        if parsed is None and self.config.imported_keys and not raw.startswith(PREFIX):
            return await self._imported(ctx, raw)
        if parsed is None:
            return self._refuse(ctx, 401, "malformed", loose_key_id(raw),
                                "Malformed API key: it is not a gateway key or it was mistyped (checksum "
                                "mismatch).", "invalid_api_key")
        key_id, secret = parsed
        try:
            entry = await self._entry(key_id)
        except StoreUnavailable:
            return self._refuse(ctx, 503, "store_unavailable", key_id,
                                "The API key could not be checked because the key store is unavailable; "
                                "try again shortly.", "key_store_unavailable", "server_error")
        digest = hash_secret(self.config.pepper, secret)
        now = time.time()
        if entry is None:
            secrets_match(digest, _DUMMY_HASH)  # same work as for a known id
            ok = False
        else:
            ok = secrets_match(digest, entry.hash) or (
                entry.prev_until is not None and now < entry.prev_until and secrets_match(digest, entry.prev_hash))
        if not ok and entry is not None:
            cache = self.cache
            hit = cache.entries.get(key_id)
            if hit is not None and hit[0] is entry and time.monotonic() - hit[1] >= RECHECK_AFTER and not (
                    cache.failing and time.monotonic() < cache.retry_at):
                # The secret may have been rotated through another instance since this record was
                # read (its watcher tells this one within watch_interval): read it again, at most
                # once per RECHECK_AFTER per key, before refusing what may be the new secret. The
                # record stays cached meanwhile (a wrong secret cannot take it away from the
                # callers with the right one while the store fails), and an invalidation that
                # races the read wins (the lookup does not cache what it read).
                try:
                    fresh = await asyncio.shield(cache.inflight.get(key_id) or self._lookup(key_id))
                except StoreUnavailable:
                    fresh = None
                if fresh is not None:
                    entry, now = fresh, time.time()
                    ok = secrets_match(digest, entry.hash) or (
                        entry.prev_until is not None and now < entry.prev_until
                        and secrets_match(digest, entry.prev_hash))
        if not ok:
            # Unknown key id and wrong secret look the same: nothing confirms that an id exists.
            return self._refuse(ctx, 401, "invalid", key_id, "Invalid API key.", "invalid_api_key")
        assert entry is not None
        if fast is not None and len(entry.verified) < 8:
            entry.verified[fast] = not secrets_match(digest, entry.hash)
        return self._admit(ctx, key_id, entry, now)

    async def on_request(self, ctx: "RequestContext") -> Reply | None:
        if self.name not in ctx.state:  # (on_headers did not run: a plugin ahead of this one reads the body first)
            reply = await self.on_headers(ctx)
            if reply is not None:
                return reply
        if _IMPORTED in ctx.state:
            _mask_imported_model(ctx, ctx.state[_IMPORTED])
        models = ctx.state.get(_MODELS)
        if models is None:
            return None
        lpath = ctx.lpath
        if lpath.endswith(_MODEL_LISTS):
            # The list shows the models this key may use, no others (a UI offers what is listed).
            if ctx.method == "GET":
                ctx.json_filter = lambda j: only_models(j, models)
        elif "/models/" in lpath:
            # GET (or DELETE) /v1/models/{model}: the model is the rest of the path (org/name ids too)
            named = ctx.path[lpath.index("/models/") + 8:].rstrip("/")
            if not model_allowed(named, models):
                return self._refuse(ctx, 403, "scope_model", ctx.state[self.name],
                                    f"This API key is not allowed to use the model {named!r}.",
                                    "key_scope_denied", "permission_error")
        model = ctx.model
        j = ctx.json
        if isinstance(j, dict) and any(k != "model" and k.lower() == "model" for k in j):
            # "Model" beside "model": Python backends take "model", Go's encoding/json (Ollama) the
            # last key that matches without regard to case, which may be one the scope never saw
            return self._refuse(ctx, 403, "scope_model", ctx.state[self.name],
                                "This API key is limited to some models, and this request names a model under "
                                "more than one spelling of \"model\" (backends differ in which they use).",
                                "key_scope_denied", "permission_error")
        if isinstance(j, dict) and _OTHER_MODEL_FIELDS.intersection(j):
            # Ollama's /api/create ("from": the model copied, or a "modelfile" naming it with FROM)
            # and /api/copy ("source", "destination"): a model of another name than "model"
            for k in sorted(_OTHER_MODEL_FIELDS.intersection(j)):
                v = j[k]
                if k == "modelfile" or not isinstance(v, str) or not model_allowed(v, models):
                    return self._refuse(ctx, 403, "scope_model", ctx.state[self.name],
                                        f"This API key is limited to some models, and this request's {k!r} "
                                        + ("names a model the gateway cannot check (use \"from\")." if k == "modelfile"
                                           else "names a model it is not allowed to use."),
                                        "key_scope_denied", "permission_error")
        if model is not None and "." in model and any(x in (".", "..") for x in model.replace("\\", "/").split("/")):
            # "demo-x/../secret-model" matches the pattern demo-*, and an upstream that reads model
            # names as paths (a models folder, org/name ids) would serve secret-model
            return self._refuse(ctx, 403, "scope_model", ctx.state[self.name],
                                "This API key is limited to some models, and this model name has '.' or '..' "
                                "path segments.", "key_scope_denied", "permission_error")
        if model is not None and not model_allowed(model, models):
            return self._refuse(ctx, 403, "scope_model", ctx.state[self.name],
                                f"This API key is not allowed to use the model {model!r}.",
                                "key_scope_denied", "permission_error")
        if model is None and _needs_a_model(ctx):
            # no model named (the backend would use its default one), a model that is not a
            # string, or a body the gateway cannot read it from (not JSON): a key limited to
            # some models cannot be checked, so it is refused
            return self._refuse(ctx, 403, "scope_model", ctx.state[self.name],
                                "This API key is limited to some models, and this request names none that "
                                "could be checked (send a JSON body with \"model\" as a string).",
                                "key_scope_denied", "permission_error")
        return None

    async def _imported(self, ctx: "RequestContext", raw: str) -> Reply | None:
        """A token issued elsewhere: the key imported with its SHA-256, if any, then the same checks
        as a gateway key's. The lookup of a digest is cached for cache_ttl (tokens not imported in a
        table of their own, so a flood of them cannot push out the imported ones), one at a time
        per digest, and while the key store fails a lookup younger than cache_ttl + stale_if_error
        still decides."""
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()
        cache, cfg = self.cache, self.config
        hit = cache.imports.get(digest) or cache.not_imported.get(digest)
        age = time.monotonic() - hit[1] if hit is not None else math.inf
        try:
            if age < cfg.cache_ttl or (cache.failing and time.monotonic() < cache.retry_at
                                       and age < cfg.cache_ttl + cfg.stale_if_error):
                key_id = hit[0] if hit is not None else None
            else:
                task = cache.inflight_imports.get(digest)
                if task is None:
                    task = cache.inflight_imports[digest] = asyncio.ensure_future(self._import_lookup(digest))
                    task.add_done_callback(lambda t: cache.inflight_imports.pop(digest, None))
                try:
                    key_id = await asyncio.shield(task)
                except StoreUnavailable:
                    if hit is None or age >= cfg.cache_ttl + cfg.stale_if_error:
                        raise
                    key_id = hit[0]
            entry = await self._entry(key_id) if key_id is not None else None
        except StoreUnavailable:
            return self._refuse(ctx, 503, "store_unavailable", None,
                                "The API key could not be checked because the key store is unavailable; "
                                "try again shortly.", "key_store_unavailable", "server_error")
        now = time.time()
        if key_id is None or entry is None or now >= entry.import_until:
            return self._refuse(ctx, 401, "invalid", key_id, "Invalid API key.", "invalid_api_key")
        ctx.state[_IMPORTED] = digest  # (the token, as a model, is masked in on_request)
        return self._admit(ctx, key_id, entry, now)

    async def _import_lookup(self, digest: str) -> str | None:
        cache, cfg = self.cache, self.config
        try:
            async with asyncio.timeout(cfg.store_timeout):
                key_id = await self.store.imported_id(digest)
        except Exception as e:
            raise self.cache.lookup_failed(e) from None
        cache.failing = False
        if cfg.cache_ttl > 0:
            table = cache.imports if key_id is not None else cache.not_imported
            cache.imports.pop(digest, None)
            cache.not_imported.pop(digest, None)
            if len(table) >= cfg.cache_size:
                table.pop(next(iter(table)))
            table[digest] = (key_id, time.monotonic())
        return key_id

    def _admit(self, ctx: "RequestContext", key_id: str, entry: _Entry, now: float) -> Reply | None:
        """Checks that do not depend on the secret: revoked, expired, path scope; then the identity
        (the model scope is on_request's: it needs the body)."""
        if entry.revoked or key_id in self._denied or key_id in self.cache.revoked_here:
            return self._refuse(ctx, 401, "revoked", key_id, "This API key has been revoked.", "revoked_api_key",
                                entry=entry)
        if entry.expires is not None and now >= entry.expires:
            return self._refuse(ctx, 401, "expired", key_id, "This API key has expired.", "expired_api_key",
                                entry=entry)
        if entry.paths and not ctx.lpath.startswith(entry.paths) and ctx.lpath not in entry.path_roots:
            return self._refuse(ctx, 403, "scope_path", key_id, f"This API key is not allowed to call {ctx.path}.",
                                "key_scope_denied", "permission_error", entry=entry)
        if entry.models:
            ctx.state[_MODELS] = entry.models
        ident = entry.identity
        ctx.identity = dict(ident)
        for h, field in self.config.forward_identity_headers.items():
            v = ident.get(field)
            ctx.upstream_headers[h] = _CONTROL.sub(" ", str(v)) if v is not None else None
        ctx.state[self.name] = key_id
        if self.tally is not None and ctx.method == "POST":
            ctx.want_usage()  # token usage only comes with POST (chat, completions, embeddings ...)
        return None

    async def _entry(self, key_id: str) -> _Entry | None:
        cache = self.cache
        hit = cache.entries.get(key_id)
        stale_ok = False
        if hit is not None:
            now = time.monotonic()
            age = now - hit[1]
            if age < self.config.cache_ttl:
                return hit[0]
            stale_ok = age < self.config.cache_ttl + self.config.stale_if_error
            if stale_ok and cache.failing:
                # The store failed a moment ago: the record decides now, and the store is probed
                # in the background (no request waits for a store that does not answer).
                if key_id not in cache.inflight and now >= cache.retry_at:
                    self._lookup(key_id)
                self.stale.inc()
                return hit[0]
        task = cache.inflight.get(key_id) or self._lookup(key_id)
        try:
            return await asyncio.shield(task)
        except StoreUnavailable:
            # A record read within cache_ttl + stale_if_error still decides (revoked, expired and
            # scopes included), unless it was dropped meanwhile; a key not seen that recently: 503.
            if stale_ok and cache.entries.get(key_id) is hit:
                self.stale.inc()
                return hit[0]
            raise

    def _lookup(self, key_id: str) -> "asyncio.Task[_Entry | None]":
        """One lookup per key id at a time, in its own task: a client that goes away does not cancel
        the lookup the other waiting requests share."""
        cache = self.cache
        task = asyncio.create_task(self._fetch(key_id, cache.gen))
        cache.inflight[key_id] = task
        task.add_done_callback(lambda t: cache.done(key_id, t))
        return task

    async def _fetch(self, key_id: str, gen: int) -> _Entry | None:
        # The lookup runs in its own task, and the request stops waiting at store_timeout: cancelling
        # a database session can itself take as long again (its connection reset against a server
        # that does not answer), and that clean-up goes on in the background.
        lookup = asyncio.ensure_future(self.store.get_row(key_id))
        try:
            done, _ = await asyncio.wait({lookup}, timeout=self.config.store_timeout)
            if not done:
                lookup.cancel()
                lookup.add_done_callback(_retrieve)
                raise TimeoutError
            row = lookup.result()
        except Exception as e:
            raise self.cache.lookup_failed(e) from None
        entry = _Entry(row) if row is not None else None
        cache = self.cache
        cache.failing = False
        if self.config.cache_ttl > 0 and cache.gen == gen:  # no admin change raced this lookup
            if len(cache.entries) >= self.config.cache_size:
                cache.entries.pop(next(iter(cache.entries)))
            cache.entries[key_id] = (entry, time.monotonic())
        return entry

    # -- usage ------------------------------------------------------------------------------------------
    async def on_complete(self, ctx: "RequestContext") -> None:
        key_id = ctx.state.get(self.name)
        if key_id is None or self.tally is None or ctx.t_upstream is None:
            return
        c = ctx.completion
        prompt = completion = 0
        if c is None:  # cut before the response head, the upstream reading the prompt: its estimate
            prompt = ctx.cut_estimate or 0
        else:
            prompt = c.input_tokens or 0  # (a stream without a usage report: the prompt estimate)
            relayed = c.relayed_tokens  # a stream without a usage report: what was generated
            completion = relayed if relayed is not None else c.completion_tokens or 0
        self.tally.add(key_id, prompt, completion, time.time() - (time.perf_counter() - ctx.t_start))

    async def flush_usage(self, timeout: float = 10.0) -> None:
        """Write everything counted so far (tests, shutdown)."""
        if self.tally is not None:
            await self.tally.flush(timeout)

    # -- demo, admin, CLI ---------------------------------------------------------------------------------
    async def demo_setup(self) -> dict[str, str]:
        """A fresh demo key; the one an earlier ``gateway demo`` run made on this database is revoked
        (one demo key valid at a time). Both are audited (actor ``demo``)."""
        events = self.services.events
        for old in await self.store.list(owner="demo", status="active", limit=10_000):
            if old["name"] == "demo":
                await self.store.revoke(old["id"])
                self.cache.invalidate(old["id"])
                events.emit("key.revoked", actor="demo", **key_fields(old))
        rec, key = await self.store.create(pepper=self.config.pepper, owner="demo", name="demo")
        events.emit("key.created", actor="demo", **created_fields(rec))
        return {"api_key": key}

    @classmethod
    def admin_routes(cls, services: "Services") -> list[Any]:
        from .admin import routes

        return routes(services)

    @classmethod
    def openapi_paths(cls) -> dict[str, Any]:
        from .admin import openapi_paths

        return openapi_paths()

    @classmethod
    def add_cli(cls, subparsers: Any) -> None:
        from .cli import add_cli

        add_cli(subparsers)


#: Paths that list models: the OpenAI API's (``/v1/models``) and Ollama's own (``/api/tags``,
#: ``/api/ps``).
_MODEL_LISTS = ("/models", "/models/", "/api/tags", "/api/ps")


def model_allowed(name: str, patterns: tuple[str, ...]) -> bool:
    """Does a scope's pattern match the model? Ollama's ``name:latest`` is ``name`` (it lists
    ``llama3.2`` as ``llama3.2:latest``, and answers for either), and Gemini's ``models/name`` is
    ``name`` (its model list names ``models/gemini-2.0-flash``, and it answers for either)."""
    if any(fnmatch.fnmatchcase(name, p) for p in patterns):
        return True
    if name.startswith("models/"):
        return model_allowed(name[7:], patterns)
    if any(p.startswith("models/") and fnmatch.fnmatchcase("models/" + name, p) for p in patterns):
        return True
    return name.endswith(":latest") and any(fnmatch.fnmatchcase(name[:-7], p) for p in patterns)


def only_models(j: Any, patterns: tuple[str, ...]) -> Any:
    """A model list with only the models matching ``patterns``: the OpenAI shape (``data``: objects
    with an ``id``), Ollama's (``models``: objects with a ``model`` or ``name``), or a bare list of
    either. An entry without a name it can check goes too. Anything else is returned unchanged (it
    lists no models)."""
    def allowed(e: Any, field: tuple[str, ...]) -> bool:
        if not isinstance(e, dict):
            return False
        name = next((e[f] for f in field if isinstance(e.get(f), str)), None)
        return name is not None and model_allowed(name, patterns)

    if isinstance(j, list):
        return [e for e in j if allowed(e, ("id", "model", "name"))]
    if isinstance(j, dict):
        out = dict(j)
        if isinstance(j.get("data"), list):
            out["data"] = [e for e in j["data"] if allowed(e, ("id",))]
        if isinstance(j.get("models"), list):
            out["models"] = [e for e in j["models"] if allowed(e, ("model", "name"))]
        return out
    return j


def _needs_a_model(ctx: "RequestContext") -> bool:
    """Must a key limited to some models refuse this request, whose model the gateway could not
    read as a string? Yes for a POST whose JSON body names none (the backend would answer with its
    default model), a JSON body whose "model" is not a string, and a body that is not JSON at all;
    no for a request without a body (``GET /v1/models``)."""
    if not ctx.body:
        return False
    j = ctx.json
    if isinstance(j, dict):
        return "model" in j or ctx.method == "POST"
    return True


_day_cache: tuple[int, dt.date] = (-1, dt.date.min)


def _utc_day(ts: float) -> dt.date:
    global _day_cache
    n = int(ts // 86400)
    if n != _day_cache[0]:
        _day_cache = (n, dt.date(1970, 1, 1) + dt.timedelta(days=n))
    return _day_cache[1]


def current_config(services: "Services") -> KeyAuthConfig:
    """The running key_auth config (follows reloads), or the one in the settings, or the defaults."""
    gw = services.gateway
    if gw is not None:
        inst = gw.runtime.by_name.get(KeyAuth.name)
        if inst is not None:
            return inst.config
    return config_from_settings(services.settings)


def config_from_settings(settings: Any) -> KeyAuthConfig:
    for spec in settings.plugins:
        if spec.name == KeyAuth.name and spec.validated is not None:
            return spec.validated
    return KeyAuthConfig()


def limits_not_applied(settings: Any) -> str | None:
    """Why the per-key limits stored on a key are applied by nothing under ``settings``, or None when
    a rate_limit plugin applies them (with ``key_overrides: true``, for the whole gateway or on one
    route at least). key_auth only stores them: set where nothing reads them, a key made with
    ``--rpm 1`` would be unlimited, and nothing would say so."""
    spec = next((p for p in settings.plugins if p.name == "rate_limit"), None)
    if spec is None:
        return "it has no rate_limit plugin"
    applied = [spec.validated] if spec.enabled else []
    for route in settings.routes:
        ov = route.plugins.get("rate_limit")
        if ov is not None and (spec.enabled if ov.enabled is None else ov.enabled):
            applied.append(ov.validated or spec.validated)  # (a route's own config only when it sets one)
    if not applied:
        return "its rate_limit plugin is disabled (enabled: false) on every route"
    # (a config not validated here is taken as applying them: a warning that may be wrong is worse)
    if not any(getattr(v, "key_overrides", True) for v in applied):
        return "its rate_limit plugin has key_overrides: false"
    return None


__all__ = ["KeyAuth", "KeyAuthConfig", "KeyCache", "current_config", "config_from_settings", "limits_not_applied"]
