"""``audit``: an audit trail of every request and every admin action, tamper-evident.

::

    - name: audit
      config:
        sinks: [database, {type: jsonl, path: audit.jsonl}]
        retention_days: 90

One event per request that reached the chain (proxied, refused, failed or aborted), typed
``request``, ``auth_failure`` or ``rate_limited``; plus the admin and system events emitted on the
services event bus (``key.created``, ``config.reloaded``, ``audit.purged`` ...). Events are queued
on the request path and written in batches off it. Request and response bodies and headers are
never recorded. See docs/audit.md.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from gateway.clock import deletions_allowed
from gateway.context import RequestContext
from gateway.plugin import Plugin, PluginConfig
from gateway.tasks import cancel_and_wait

from . import store
from .chain import ChainKeys, chain_keys
from .events import bus_event, capture, request_event
from .sinks import DatabaseSink, JsonlSink, Sink, StdoutSink, head_log, log_head

log = logging.getLogger("gateway.audit")
#: Seconds a start or reload waits to learn whether the trail is signed; then it goes on (each batch
#: the writer appends checks it again, under the append lock).
SIGNED_CHECK_TIMEOUT = 5.0


class SinkSpec(PluginConfig):
    type: Literal["database", "jsonl", "stdout"] = Field(description="database, jsonl or stdout.")
    path: str | None = Field(None, description="File for the jsonl sink (appended to).")

    @field_validator("path")
    @classmethod
    def _no_tilde(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("~"):  # (it made a folder named '~' where the gateway ran)
            raise ValueError("'~' is not expanded here: write the full path (/home/...)")
        return v


class AuditConfig(PluginConfig):
    sinks: list[Union[Literal["database", "stdout"], SinkSpec]] = Field(
        default_factory=lambda: ["database"],
        description="Where events go; several at once: database, stdout, {type: jsonl, path: ...}.")
    retention_days: float | None = Field(
        None, ge=0, le=36500,  # (past a century the cut-off date is out of a datetime's range)
        description="Delete database events older than this many days (none/0: keep forever).")
    purge_interval: float = Field(3600.0, gt=0, description="Seconds between retention purges.")
    queue_size: int = Field(10000, ge=1, description="Events each sink's writer may hold in memory.")
    batch_size: int = Field(500, ge=1, description="Events written per batch.")
    flush_interval: float = Field(0.2, gt=0, description="Longest wait before a partial batch is written.")
    on_full: Literal["wait", "drop"] = Field(
        "wait", description="Queue full: wait (up to full_wait) or drop at once; drops are counted and logged.")
    full_wait: float = Field(0.5, ge=0, description="Seconds to wait for room with on_full: wait.")
    retry_for: float = Field(30.0, gt=0, description="Seconds a failing batch is retried before it is dropped.")
    events: bool = Field(True, description="Record admin/system events from the event bus.")
    chain_key: str = Field("", repr=False, description=(
        "Secret that signs the database's hash chain (HMAC-SHA-256), e.g. ${GATEWAY_AUDIT_CHAIN_KEY:-}: "
        "whoever can write the table but lacks it cannot re-chain rows after an edit. At least 32 "
        "bytes; empty: plain SHA-256. The same on every route (not overridable per route)."))
    previous_chain_keys: list[str] = Field(default_factory=list, repr=False, description=(
        "Keys that signed older rows, newest first, after a rotation: verify accepts them; new rows are "
        "signed with chain_key."))

    @field_validator("chain_key", mode="before")
    @classmethod
    def _no_key(cls, v: Any) -> Any:
        return "" if v is None else v  # "${GATEWAY_AUDIT_CHAIN_KEY:-}" with the variable unset

    @field_validator("chain_key", "previous_chain_keys")
    @classmethod
    def _key_length(cls, v: Any) -> Any:
        for k in ([v] if isinstance(v, str) else v):
            if (k or isinstance(v, list)) and len(k.encode("utf-8")) < MIN_KEY_BYTES:
                # (the message never holds the key itself)
                raise ValueError(f"a chain key needs at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)")
        return v

    @field_validator("sinks", mode="before")
    @classmethod
    def _sinks(cls, v: Any) -> Any:
        if isinstance(v, (str, dict)):
            v = [v]
        if isinstance(v, list):
            if not v:
                raise ValueError("at least one sink (to record nothing, take audit out of the plugins list)")
            for i, s in enumerate(v):
                if isinstance(s, str) and s not in ("database", "stdout"):
                    hint = ("the jsonl sink needs a path: {type: jsonl, path: audit.jsonl}" if s.lower() == "jsonl"
                            else f"sink {i}: {s[:40]!r} is none of database, stdout, {{type: jsonl, path: ...}}")
                    raise ValueError(hint)
        return v

    @model_validator(mode="after")
    def _check(self) -> "AuditConfig":
        seen = set()
        for s in self.sinks:
            spec = s if isinstance(s, SinkSpec) else SinkSpec(type=s)
            if spec.type == "jsonl" and not spec.path:
                raise ValueError("the jsonl sink needs a path")
            # (one file however its path is spelled: ./a.jsonl, a/../a.jsonl, a symlink to it)
            key = (spec.type, os.path.realpath(spec.path) if spec.path else None)
            if key in seen:
                raise ValueError(f"sink {spec.type} listed twice")
            seen.add(key)
        if self.previous_chain_keys and not self.chain_key:
            raise ValueError("previous_chain_keys needs a chain_key (the key new rows are signed with)")
        if len({self.chain_key, *self.previous_chain_keys}) != 1 + len(self.previous_chain_keys):
            raise ValueError("a chain key is listed twice (chain_key and previous_chain_keys)")
        return self

    def specs(self) -> list[SinkSpec]:
        return [s if isinstance(s, SinkSpec) else SinkSpec(type=s) for s in self.sinks]


#: Background tasks kept referenced until done.
_KEEP: set[asyncio.Task[None]] = set()
#: Shortest chain key, bytes (256 bits as 64 hex digits is what `openssl rand -hex 32` gives).
MIN_KEY_BYTES = 32
#: Seconds after start before the first retention purge.
FIRST_PURGE_DELAY = 60.0
#: Seconds before a retention purge that failed (the database down, busy) is tried again.
PURGE_RETRY = 60.0


class Audit(Plugin):
    name = "audit"
    Config = AuditConfig
    observes_response = True
    uses_database: ClassVar[bool] = True
    #: Process-wide settings a route's override cannot change: one chain and one key, the sinks'
    #: shared writers (configured by whichever instance was activated last), and the retention
    #: and bus events only the base instance handles (a route's own would be silently ignored).
    route_fixed: ClassVar[tuple[str, ...]] = (
        "chain_key", "previous_chain_keys", "queue_size", "batch_size", "flush_interval", "on_full", "full_wait",
        "retry_for", "retention_days", "purge_interval", "events")

    def __init__(self, config: AuditConfig, services: Any, cli: bool = False) -> None:
        super().__init__(config, services)
        self.cli = cli
        #: Will this instance write records? (a CLI command that only reads does not)
        self.records = True
        self.sinks: list[tuple[Sink, Any]] = []
        self._writers: list[Any] = []
        self._settings: dict[str, Any] = {}
        self._unsubscribe: Any = None
        self._purger: asyncio.Task[None] | None = None
        self._wait = config.on_full == "wait"
        # The keys in force, shared by every instance, the database writer and the admin API; a
        # reload's config replaces them when it is activated (see activated()).
        self.chain = chain_keys(services)
        self._keys = ChainKeys.of(config).keys

    # -- lifecycle -------------------------------------------------------------------------------
    def _sink(self, spec: SinkSpec) -> Sink:
        if spec.type == "database":
            # (a first key comes with a gateway, or with a CLI command on the database it created:
            # not with a command run on a trail someone may have emptied or replaced)
            return DatabaseSink(self.services.db, self.chain, "always" if not self.cli else (
                "new" if getattr(self.services, "new_database", False) else "refuse"), log_heads=not self.cli)
        if spec.type == "jsonl":
            assert spec.path
            return JsonlSink(spec.path)
        return StdoutSink()

    async def startup(self) -> None:
        cfg = self.config
        settings = self._settings = dict(
            max_queue=cfg.queue_size, batch_size=cfg.batch_size, flush_interval=cfg.flush_interval,
            on_full=cfg.on_full, full_wait=cfg.full_wait, retry_for=cfg.retry_for)
        for spec in cfg.specs():
            if self.cli and spec.type == "stdout":
                continue  # a CLI command's stdout is its output
            if self.cli and not self.records and spec.type == "jsonl":
                # (a command that only reads writes nothing there: one run while that file cannot be
                # written, the disk read-only, say, must not fail, nor make its folder or the file)
                continue
            sink = self._sink(spec)
            check = getattr(sink, "check", None)
            if check is not None:
                try:
                    check()
                except OSError as e:
                    where = f" ({os.path.abspath(spec.path)})" if spec.path else ""
                    raise RuntimeError(f"audit sink {spec.type}{where} cannot be written: {e.strerror or e}") from None

            def factory(sink: Sink = sink) -> Any:
                w = self.services.writer(f"audit:{sink.key}", sink.write, readiness=sink.readiness, **settings)
                sink.writer = w  # (the database sink says in the trail what its writer could not write)
                w.start()
                return w

            # Shared across plugin instances and config reloads: one queue (and one chain writer) per
            # sink. The instance activated last (a reload's new config) brings its writer settings.
            writer = self.services.resource(f"audit:sink:{sink.key}", factory, close=lambda w: w.close())
            self.sinks.append((sink, writer))
        self._writers = [w for _, w in self.sinks]
        if not self._keys and self.records and any(s.kind == "database" for s, _ in self.sinks):
            # A start (or reload, or CLI command that records an action) without the key the trail
            # is signed with: refused rather than breaking the chain with unsigned rows. (The
            # database's being down is the writer's to wait out: it checks each batch too.)
            try:
                async with asyncio.timeout(SIGNED_CHECK_TIMEOUT):  # (a hung database must not hold a reload)
                    signed = await store.signed_trail(self.services.db)
            except Exception as e:
                log.warning("audit: could not check whether the chain is signed: %s", type(e).__name__)
                signed = False
            if signed:
                raise RuntimeError(str(store.ChainSigned()))
        if self.cli:  # (a CLI command's events, key.created and the like, are signed too; no reload there)
            self.chain.keys = self._keys
            if self._keys and self.records and any(s.kind == "database" for s, _ in self.sinks) \
                    and not getattr(self.services, "new_database", False) \
                    and not await store.signed_trail(self.services.db):
                raise RuntimeError(str(store.NotSignedYet()))  # (before the command acts, not at its event)
        if cfg.events:
            self._unsubscribe = self.services.events.subscribe(self._on_event, self._settle)
        if not self.cli and any(s.kind == "database" for s, _ in self.sinks):
            head_log.setLevel(logging.INFO)  # (at logging.level WARNING too: see sinks.log_head)
        if cfg.retention_days and not self.cli and any(s.kind == "database" for s, _ in self.sinks):
            self._purger = asyncio.create_task(self._purge_loop(), name="audit:retention")

    def activated(self) -> None:
        for w in self._writers:
            w.configure(**self._settings)
        # (the database writer signs with them from its next batch; its first batch with a new
        # key starts with the audit.chain_key event: store._append)
        self.chain.keys = self._keys
        if self._keys and not self.cli and any(s.kind == "database" for s, _ in self.sinks):
            # Written now (if the newest row is not signed with this key), not with the first
            # request: verify wants the newest row signed.
            t = asyncio.create_task(self._introduce_key(self._keys), name="audit:chain-key")
            _KEEP.add(t)
            t.add_done_callback(_KEEP.discard)

    async def _introduce_key(self, keys: tuple[bytes, ...]) -> None:
        try:
            await store.append(self.services.db, [], keys, self.chain, introduce="always")
        except Exception as e:  # (the writer's next batch does it; its failures are counted there)
            log.info("audit: the chain key event waits for the next batch: %s", type(e).__name__)

    async def shutdown(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await cancel_and_wait(self._purger)
        self._purger = None
        if not self._active():
            return  # replaced by a reload: the shared writers keep running for the new instance
        # The gateway is stopping: every sink flushes at once, retrying briefly; what is left
        # is counted and logged by the writer.
        await asyncio.gather(*(w.close() for _, w in self.sinks))
        if not self.cli:
            log_head(self.chain)  # the head it leaves behind

    def _active(self) -> bool:
        """The instance that records bus events and purges: the running runtime's base instance
        (not a per-route override, not a runtime that is being replaced by a reload, not one
        ``enabled: false`` on every route)."""
        gw = self.services.gateway
        if gw is None:
            return True
        rt = gw.runtime
        return rt.by_name.get(self.name) is self and self.name in rt.in_use

    # -- recording -------------------------------------------------------------------------------
    async def record(self, event: dict[str, Any], skip: str | None = None) -> None:
        for sink, w in self.sinks:
            if sink.kind == skip:
                continue
            if self._wait:
                await w.put(event)
            else:
                w.put_nowait(event)

    def _record_nowait(self, event: dict[str, Any], skip: str | None = None) -> None:
        for sink, w in self.sinks:
            if sink.kind != skip:
                w.put_nowait(event)

    async def on_complete(self, ctx: RequestContext) -> None:
        # Only the raw values are captured here; the sink writers build the record off the request path.
        item = capture(ctx)
        if self._wait:
            for w in self._writers:
                await w.put(item)
        else:
            for w in self._writers:
                w.put_nowait(item)

    def _on_event(self, type_: str, fields: dict[str, Any]) -> None:
        if self._active() or (type_ == "config.reloaded" and self._removed_by_reload()):
            self._record_nowait(bus_event(type_, fields))

    async def _settle(self, timeout: float) -> bool:
        """Wait until the events handed to the sinks so far are written (admin actions are
        answered once their record is stored: a crash right after cannot lose it)."""
        if not self._active():
            return True
        marks = [(w, w.accepted) for w in self._writers]
        return all(await asyncio.gather(*(w.settled_through(n, timeout) for w, n in marks)))

    def _removed_by_reload(self) -> bool:
        """The reload being recorded took audit out (or turned it off): the instance it replaced
        records that reload, so turning the audit trail off leaves a trace in it."""
        gw = self.services.gateway
        old = getattr(gw, "replaced", None)
        if old is None or old.by_name.get(self.name) is not self or self.name not in old.in_use:
            return False
        new = gw.runtime.by_name.get(self.name)
        return new is None or self.name not in gw.runtime.in_use

    # -- retention -------------------------------------------------------------------------------
    async def purge_once(self, actor: str = "retention") -> dict[str, Any] | None:
        days = self.config.retention_days
        if not days:
            return None
        # Each chunk's audit.purged event goes to the other sinks as it commits (the database sink
        # stored it with the chunk), so they have them all even if the purge is cut short.
        ev = await store.purge(self.services.db, store.iso(time.time() - days * 86400), actor=actor,
                               on_event=lambda e: self._record_nowait(e, skip="database"),
                               chain=self.chain)
        if ev is not None:
            log.info("audit retention purged %d event(s) older than %s", ev["total"], ev["before"])
        return ev

    async def _purge_loop(self) -> None:
        # Not at once: a clock that is wrong at boot (stepped right by NTP a little later) would
        # purge what it takes to be old. Soon, though: a gateway restarted often still purges.
        await asyncio.sleep(min(self.config.purge_interval, FIRST_PURGE_DELAY))
        while True:
            wait = self.config.purge_interval
            if self._active() and deletions_allowed("audit retention"):
                try:
                    await self.purge_once()
                except asyncio.CancelledError:
                    raise
                except store.PurgeRefused as e:  # rows that do not verify: not something a retry mends
                    log.error("audit retention purge failed: %s: %s", type(e).__name__, str(e)[:200])
                except Exception as e:  # a database outage or a lock: tried again soon, not an interval later
                    wait = min(wait, PURGE_RETRY)
                    log.error("audit retention purge failed: %s: %s; trying again in %.0fs", type(e).__name__,
                              str(e)[:200], wait)
            await asyncio.sleep(wait)

    # -- admin API and CLI -------------------------------------------------------------------------
    @classmethod
    async def cli_attach(cls, config: AuditConfig, services: Any, records: bool = True) -> "Audit":
        """Record the events a CLI command emits (``actor: cli``); flushed by ``services.close()``.
        ``records``: the command records an action (a key created, a conversation exported); one
        that only reads runs without the chain key."""
        inst = cls(config, services, cli=True)
        inst.records = records
        await inst.startup()
        return inst

    @classmethod
    def admin_routes(cls, services: Any) -> list[Any]:
        from .api import routes

        return routes(services)

    @classmethod
    def openapi_paths(cls) -> dict[str, Any]:
        from .api import OPENAPI

        return OPENAPI

    @classmethod
    def add_cli(cls, subparsers: Any) -> None:
        from .cli import add_cli

        add_cli(subparsers)


__all__ = ["Audit", "AuditConfig", "request_event"]
