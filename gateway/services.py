"""What the core hands every plugin: settings, the database, metrics, events, shared resources."""
from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from prometheus_client import CollectorRegistry

from .writer import BatchWriter, WriterMetrics

#: Seconds a write under way may wait for its answer before /readyz counts the writer as failing
#: (a busy SQLite file makes a write wait up to its busy timeout, 5 s, which is no failure).
STALLED_READY = 10.0

if TYPE_CHECKING:
    from gateway.config.model import GatewayConfig

    from .db import Database

log = logging.getLogger("gateway")

Listener = Callable[[str, dict[str, Any]], None]


class Events:
    """A tiny in-process bus for gateway events that are not requests: admin actions
    (``key.created``, ``conversation.deleted`` ...) and ``config.reloaded``. The audit plugin
    subscribes; anything may emit. Listeners must not block (enqueue and return)."""

    def __init__(self, stamp: dict[str, Any] | None = None) -> None:
        self._listeners: list[Listener] = []
        self._settlers: dict[Listener, Callable[[float], Awaitable[bool]]] = {}
        #: fields every event carries (a CLI command's: who ran it), under the emitter's own
        self.stamp = dict(stamp or {})

    def subscribe(self, fn: Listener, settle: Callable[[float], Awaitable[bool]] | None = None) -> Callable[[], None]:
        """Listen to events. ``settle(timeout)``, if given, waits until the events this listener
        took so far are stored (True), or the timeout passes (False)."""
        self._listeners.append(fn)
        if settle is not None:
            self._settlers[fn] = settle

        def unsubscribe() -> None:
            if fn in self._listeners:
                self._listeners.remove(fn)
            self._settlers.pop(fn, None)
        return unsubscribe

    async def settle(self, timeout: float) -> bool:
        """Wait until every event emitted so far is stored by the listeners that store them (the
        audit trail): an admin action is answered once its record is written. False on timeout."""
        settlers = list(self._settlers.values())
        if not settlers:
            return True
        return all(await asyncio.gather(*(s(timeout) for s in settlers)))

    def emit(self, type_: str, **fields: Any) -> None:
        if self.stamp:
            fields = {**self.stamp, **fields}
        for fn in list(self._listeners):
            try:
                fn(type_, fields)
            except Exception:
                log.exception("event listener failed for %s", type_)


class Services:
    def __init__(self, settings: "GatewayConfig", db: "Database | None", registry: CollectorRegistry | None = None,
                 events: Events | None = None, *, owns_db: bool = False) -> None:
        self.settings = settings
        self._db = db
        self.metrics = registry or CollectorRegistry()
        self.events = events or Events()
        self._writer_metrics: WriterMetrics | None = None
        self._resources: dict[str, Any] = {}
        self._writers: "weakref.WeakSet[BatchWriter[Any]]" = weakref.WeakSet()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._lock = asyncio.Lock()
        self.gateway: Any = None  # the running Gateway, when there is one (admin routes use it)
        self._owns_db = owns_db    # CLI commands: close() also disposes the engine
        #: after close(): the records each writer finally did not write (a CLI command's audit
        #: events: the command says so in its exit code)
        self.unwritten: dict[str, int] = {}

    @property
    def db(self) -> "Database":
        if self._db is None:
            raise RuntimeError("no database configured")
        return self._db

    def writer(self, name: str, write: Callable[[Sequence[Any]], Awaitable[None]], **kw: Any) -> BatchWriter[Any]:
        """A background batch writer whose depth/dropped counters appear on /metrics."""
        if self._writer_metrics is None:
            self._writer_metrics = WriterMetrics(self.metrics)
        w: BatchWriter[Any] = BatchWriter(name, write, self._writer_metrics, **kw)
        self._writers.add(w)
        return w

    def writers(self) -> list[BatchWriter[Any]]:
        """The background writers made here and still in use."""
        return list(self._writers)

    def failing_writers(self, longer_than: float) -> tuple[list[str], list[str]]:
        """Names of the writers failing now (writes failed, the last time less than 5 s ago: a
        writer retries at most 2 s apart, and one that gave up and has had nothing to write since
        is not failing for ever), and of those that have failed for more than ``longer_than``
        seconds, or whose write under way has waited that long, at least STALLED_READY."""
        now, over = [], []
        for w in self.writers():
            if not w.readiness:
                continue
            failing, stalled = w.failing_for(5.0), w.stalled_for()
            if failing > 0.0 or stalled > STALLED_READY:
                now.append(w.name)
            if failing > longer_than or stalled > max(longer_than, STALLED_READY):
                over.append(w.name)
        return sorted(now), sorted(over)

    def resource(self, key: str, factory: Callable[[], Any], close: Callable[[Any], Awaitable[None]] | None = None) -> Any:
        """A process-wide object shared by plugin instances and kept across config reloads
        (e.g. in-memory rate-limit counters, a key cache). Built on first use, closed at exit."""
        if key not in self._resources:
            obj = factory()
            self._resources[key] = obj
            if close is not None:
                self._closers.append(lambda: close(obj))
        return self._resources[key]

    def metric(self, key: str, factory: Callable[[CollectorRegistry], Any]) -> Any:
        """A metric registered once per registry (plugin instances and reloads share it)."""
        return self.resource("metric:" + key, lambda: factory(self.metrics))

    async def close(self) -> None:
        """Close every shared resource at once (writers flush in parallel, so a slow or hung
        database costs one retry budget, not one per writer)."""
        async def close_one(c: Callable[[], Awaitable[None]]) -> None:
            try:
                await c()
            except Exception:
                log.exception("closing a shared resource failed")

        writers = self.writers()
        await asyncio.gather(*(close_one(c) for c in reversed(self._closers)))
        for w in writers:
            if w.dropped:
                self.unwritten[w.name] = self.unwritten.get(w.name, 0) + w.dropped
        self._closers.clear()
        self._resources.clear()
        if self._owns_db and self._db is not None:
            await self._db.close()
