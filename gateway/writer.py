"""A background batch writer: the one way plugins persist records off the request path.

``put()`` is called on the request path and never waits on the database: it enqueues into a
bounded queue. A single task drains the queue in batches, calls ``write(batch)``, retries with
backoff while the store is down, and on shutdown flushes what is left. When the queue is full the
policy decides: ``wait`` (up to ``full_wait`` seconds, then drop) or ``drop``. Every record that is
finally not written is counted (``gateway_writer_dropped_total{writer, reason}``) and logged.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Generic, Literal, Sequence, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from .db import store_error
from .logs import ThrottledLog
from .tasks import cancel_and_wait
log = logging.getLogger("gateway.writer")
T = TypeVar("T")
#: Seconds a single write may be under way before the writer says so (a database that does not
#: answer: a lock held, a pool or a pooler with no free connection); /readyz counts it as failing.
STALL_WARN = 10.0
#: Seconds between two log lines of one writer's failed writes being retried (counted in between).
RETRY_LOG_EVERY = 10.0
#: Seconds a writer closing gets for its final flush even when the shared shutdown deadline has
#: passed (records a plugin handed over last, e.g. a usage tally, are not dropped unattempted).
FINAL_FLOOR = 1.0
#: Every reason a record is dropped for (``_drop``): each writer's series start at 0 with it, so an
#: ``increase(gateway_writer_dropped_total[5m]) > 0`` alert fires on the first drop too.
DROP_REASONS = ("queue_full", "write_failed", "rejected", "shutdown", "closed", "cancelled")


class WriterMetrics:
    """Shared per-registry metric families (one set of label values per writer)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.depth = Gauge("gateway_writer_queue_depth", "Records a background writer holds, not yet written: "
                           "queued, and the batch it is writing (or retrying)",
                           ["writer"], registry=registry)
        self.written = Counter("gateway_writer_written_total", "Records written by a background writer",
                               ["writer"], registry=registry)
        self.dropped = Counter("gateway_writer_dropped_total",
                               "Records a background writer could not write (never silent)",
                               ["writer", "reason"], registry=registry)
        self.retries = Counter("gateway_writer_retries_total", "Failed batch writes that were retried",
                               ["writer"], registry=registry)


def _dropped(on_drop: Callable[[], None] | None) -> bool:
    if on_drop is not None:
        try:
            on_drop()
        except Exception:
            log.exception("a dropped record's callback failed")
    return False


class BatchWriter(Generic[T]):
    def __init__(self, name: str, write: Callable[[Sequence[T]], Awaitable[None]], metrics: WriterMetrics, *,
                 max_queue: int = 10000, batch_size: int = 500, flush_interval: float = 0.2,
                 on_full: Literal["wait", "drop"] = "wait", full_wait: float = 0.5,
                 retry_for: float = 30.0, shutdown_retry_for: float = 5.0, readiness: bool = True,
                 weight: Callable[[T], int] | None = None, max_weight: int | None = None) -> None:
        self.name = name
        #: A second bound on what is queued, besides the count: the records' summed ``weight``
        #: (e.g. a turn's message rows, which can be one or 300,000), at most ``max_weight``. A
        #: record that would pass it is treated as finding the queue full (one heavier than the bound
        #: alone fits once the queue holds at most half of it).
        self._weigh = weight
        self.max_weight = max_weight
        self.weight = 0
        self._weights: dict[int, int] = {}  # id(record queued) -> its weight
        #: Does this writer failing or stalling make the instance not ready (/readyz)?
        self.readiness = readiness
        self._write = write
        self._q: asyncio.Queue[T] = asyncio.Queue(maxsize=max_queue)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.on_full = on_full
        self.full_wait = full_wait
        self.retry_for = retry_for
        self.shutdown_retry_for = shutdown_retry_for
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._close_by: float | None = None  # monotonic time by which a closing writer gives up
        self._attempt_timer: asyncio.Timeout | None = None  # the write attempt under way
        self._m = metrics
        self._depth = metrics.depth.labels(name)
        self._writing = 0  # records in the batch being written (or retried): not in the queue any more
        self._depth.set_function(lambda: self.depth)
        self._written = metrics.written.labels(name)
        for reason in DROP_REASONS:
            metrics.dropped.labels(name, reason)
        metrics.retries.labels(name)
        self.written = 0
        self.dropped = 0
        #: monotonic time the writes began to fail (the store down, its disk full); None when the
        #: last write went through. /readyz reports a writer failing for a while (see failing_for).
        self.failing_since: float | None = None
        self.last_failure = 0.0
        #: Why the last write failed (a short text safe to show: see gateway.db.store_error).
        self.last_error: str | None = None
        self._attempt_started: float | None = None  # monotonic start of the write under way
        self._log = ThrottledLog(log)  # an outage drops a record per request: one line per 10 s
        self._retry_said = 0.0     # when a failed write's retry was last logged (monotonic)
        self._retries_unsaid = 0   # retries since, not logged
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake = asyncio.Event()  # a full batch is waiting, or close() was called
        #: Records accepted so far, and of those (in order) the ones written or given up on: a
        #: caller can wait until the records it handed over are settled (``settled_through``).
        self.accepted = 0
        self.settled = 0
        self._progress = asyncio.Event()

    def configure(self, *, max_queue: int, batch_size: int, flush_interval: float,
                  on_full: Literal["wait", "drop"], full_wait: float, retry_for: float,
                  max_weight: int | None = None) -> None:
        """New settings from a config reload, for the records still queued too. A smaller queue
        keeps what it holds (it only refuses new records until it is below the new bound)."""
        self._q._maxsize = max_queue  # type: ignore[attr-defined]  # asyncio.Queue keeps no setter
        if self._weigh is not None:
            self.max_weight = max_weight
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.on_full = on_full
        self.full_wait = full_wait
        self.retry_for = retry_for
        self._wake.set()  # a batch gathering under the old flush_interval goes now

    def failing_for(self, recent: float = 10.0) -> float:
        """Seconds the writes have been failing, if the last failure is recent (0 otherwise): a
        writer that gave up and has had nothing to write since is not reported failing for ever."""
        now = time.monotonic()
        if self._closing or self.failing_since is None or now - self.last_failure > recent:
            return 0.0
        return now - self.failing_since

    def stalled_for(self) -> float:
        """Seconds the write under way has been waiting (0: none is): a hung database fails nothing."""
        started = self._attempt_started
        return 0.0 if self._closing or started is None else time.monotonic() - started

    def _stalled(self, records: int) -> None:
        log.warning("writer %s: a write of %d record(s) has been under way for %.0fs: where it writes is not "
                    "taking it (a database: a lock held, no free connection in the pool or a pooler; a file "
                    "or pipe: a stalled disk or a reader that stopped reading); the records wait in the "
                    "queue meanwhile", self.name, records, STALL_WARN)

    def kick(self) -> None:
        """Write what is queued now, without waiting for the batch to fill (a caller that gathers
        records itself and hands them over every interval)."""
        self._wake.set()

    @property
    def max_queue(self) -> int:
        return self._q.maxsize

    # -- request path -----------------------------------------------------------------------------
    def _room(self, w: int) -> bool:
        """Does a record of weight ``w`` fit beside what is queued? One heavier than the bound by
        itself fits once what is queued is at most half the bound (waiting for an empty queue,
        it would never fit under steady traffic)."""
        m = self.max_weight
        return m is None or not self._weights or self.weight + w <= m or (w > m and self.weight <= m // 2)

    def _weighed(self, item: T, w: int) -> None:
        if self._weigh is not None:
            self._weights[id(item)] = w
            self.weight += w

    def put_nowait(self, item: T) -> bool:
        """Enqueue without waiting; a full queue counts the record as dropped."""
        w = self._weigh(item) if self._weigh is not None else 0
        try:
            if not self._room(w):
                raise asyncio.QueueFull
            self._q.put_nowait(item)
            self._weighed(item, w)
            self.accepted += 1
            self._idle.clear()
            if self._q.qsize() >= self._full():
                self._wake.set()
            return True
        except asyncio.QueueFull:
            self._drop(1, "queue_full")
            return False

    async def put(self, item: T, on_drop: Callable[[], None] | None = None) -> bool:
        """Enqueue; with ``on_full: wait`` waits up to ``full_wait`` seconds for room. False (and
        ``on_drop()``) when the item is dropped instead (counted)."""
        if self._closing:
            self._drop(1, "closed")
            return _dropped(on_drop)
        w = self._weigh(item) if self._weigh is not None else 0
        try:
            if not self._room(w):
                raise asyncio.QueueFull
            self._q.put_nowait(item)
            self._weighed(item, w)
            self.accepted += 1
            self._idle.clear()
            if self._q.qsize() >= self._full():
                self._wake.set()
            return True
        except asyncio.QueueFull:
            if self.on_full == "drop":
                self._drop(1, "queue_full")
                return _dropped(on_drop)
        # Shielded: a caller cancelled meanwhile (its client left while the record was handed
        # over) does not take the record with it; it is queued, or dropped and counted, all the
        # same, and ``on_drop`` still tells the record's owner (the caller may be gone).
        return await asyncio.shield(self._put_waiting(item, w, on_drop))

    async def _put_waiting(self, item: T, w: int, on_drop: Callable[[], None] | None) -> bool:
        try:
            async with asyncio.timeout(self.full_wait):
                while not self._room(w):  # (the batches written settle their records' weight)
                    self._progress.clear()
                    await self._progress.wait()
                await self._q.put(item)
            self._weighed(item, w)
            self.accepted += 1
            self._idle.clear()
            if self._q.qsize() >= self._full():
                self._wake.set()
            return True
        except TimeoutError:
            self._drop(1, "queue_full")
            return _dropped(on_drop)

    @property
    def depth(self) -> int:
        """Records held, not yet written: queued, and the batch being written."""
        return self._q.qsize() + self._writing

    def _full(self) -> int:
        """Records that make a batch worth writing at once: batch_size, or the whole queue when it
        holds fewer (a queue of 10 under a batch of 500 would otherwise wait flush_interval full)."""
        m = self._q.maxsize
        return min(self.batch_size, m) if m > 0 else self.batch_size

    # -- background -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"writer:{self.name}")

    async def _run(self) -> None:
        while True:
            first = await self._q.get()
            batch = [first]
            self._writing = 1
            if self._q.qsize() + 1 < self._full() and not self._closing and self._close_by is None:
                # Let the batch gather for flush_interval without waking up for every record;
                # a full batch or close() ends the wait early (and once stopping, none is made).
                self._wake.clear()
                try:
                    async with asyncio.timeout(self.flush_interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._q.get_nowait())
                except asyncio.QueueEmpty:
                    break
            self._writing = len(batch)  # (out of the queue, not written yet)
            try:
                await self._write_with_retry(batch, self.shutdown_retry_for if self._closing else self.retry_for)
            finally:
                self._writing = 0
            self.settled += len(batch)
            if self._weights:
                for x in batch:
                    self.weight -= self._weights.pop(id(x), 0)
            self._progress.set()
            if self._q.empty():
                self._idle.set()
            # Let go of the batch before waiting for the next record: held by these names, its
            # records (a conversation turn can be hundreds of MB of rows) stayed alive until then.
            del first, batch

    async def _write_with_retry(self, batch: list[T], budget: float) -> None:
        await self._attempt(batch, time.monotonic() + budget)

    async def _attempt(self, batch: list[T], give_up: float) -> None:
        delay = 0.05
        attempts, began = 0, time.monotonic()
        while True:
            if self._close_by is not None:  # closing: the shutdown budget applies to this batch too
                give_up = min(give_up, self._close_by)
                if time.monotonic() >= self._close_by:  # spent already: not begun (counted, logged)
                    self._drop(len(batch), "shutdown")
                    return
            # An attempt has no deadline while the gateway runs (a database that hangs holds the
            # writer, and the queue's policy applies meanwhile); once closing, it ends with the
            # shutdown budget (close() cuts one already under way).
            timer = asyncio.timeout(None if self._close_by is None else max(0.0, self._close_by - time.monotonic()))
            try:
                async with timer:
                    self._attempt_timer = timer
                    self._attempt_started = time.monotonic()
                    stall = asyncio.get_running_loop().call_later(STALL_WARN, self._stalled, len(batch))
                    try:
                        await self._write(batch)
                    finally:
                        self._attempt_timer = None
                        self._attempt_started = None
                        stall.cancel()
                self.written += len(batch)
                self._written.inc(len(batch))
                if self.failing_since is not None:
                    # (the end of what the retry lines began: on-call reads when it was over)
                    more = self._retries_unsaid
                    log.warning("writer %s: writes go through again, after %.1f s of failures%s",
                                self.name, time.monotonic() - self.failing_since,
                                f" ({more} more failed write(s) retried since the last retry line)" if more else "")
                    self._retry_said, self._retries_unsaid = 0.0, 0
                self.failing_since = None
                return
            except asyncio.CancelledError:
                self._drop(len(batch), "cancelled")
                raise
            except Exception as e:
                if isinstance(e, TimeoutError) and timer.expired():
                    # The shutdown budget ran out mid-write. Whether it committed is unknown, and a
                    # retry could store it twice: it is not retried, and counted as not written.
                    log.error("writer %s: shutdown budget spent during a write of %d records",
                              self.name, len(batch))
                    self._drop(len(batch), "shutdown")
                    return
                if rejected(e):
                    # The store refuses a record (a constraint, a value it cannot hold): that record
                    # must not take the rest of its batch with it. Halve, in order, until it is
                    # alone; it alone is dropped (counted), at once: retrying will not change it.
                    if len(batch) > 1:
                        log.warning("writer %s: batch of %d rejected (%s: %s); writing it in halves",
                                    self.name, len(batch), type(e).__name__, _short(e))
                        mid = len(batch) // 2
                        await self._attempt(batch[:mid], give_up)
                        await self._attempt(batch[mid:], give_up)
                        return
                    log.error("writer %s: dropping a record the store rejects: %s: %s",
                              self.name, type(e).__name__, _short(e))
                    self._drop(1, "rejected")
                    return
                self.last_failure = time.monotonic()
                self.last_error = store_error(e)[0]
                attempts += 1
                if self.failing_since is None:
                    self.failing_since = self.last_failure
                if time.monotonic() + delay > give_up:
                    # (one attempt can take all of retry_for: SQLite waits busy_timeout for a lock)
                    log.error("writer %s: giving up on %d records after %d attempt(s) in %.1f s: %s: %s%s",
                              self.name, len(batch), attempts, time.monotonic() - began, type(e).__name__,
                              _short(e), _sqlite_why(e))
                    self._drop(len(batch), "write_failed")
                    return
                self._m.retries.labels(self.name).inc()
                # One line per RETRY_LOG_EVERY seconds while writes keep failing (a retry every two
                # seconds per writer would be thousands of lines in an hour's outage), with the
                # count of those in between; the line that writes go through again ends it.
                self._retries_unsaid += 1
                now = time.monotonic()
                if now - self._retry_said >= RETRY_LOG_EVERY:
                    more = self._retries_unsaid - 1
                    log.warning("writer %s: write of %d records failed, retrying in %.2fs: %s: %s%s%s",
                                self.name, len(batch), delay, type(e).__name__, _short(e), _sqlite_why(e),
                                f" ({more} more failed write(s) retried since the last such line)" if more else "")
                    self._retry_said, self._retries_unsaid = now, 0
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def settled_through(self, n: int, timeout: float) -> bool:
        """Wait until the first ``n`` records accepted are written (or given up on, counted), with
        no wait for a batch to fill; False if that takes longer than ``timeout``. Records accepted
        after the call are not waited for, so a busy queue does not hold the caller."""
        if self.settled >= n:
            return True
        if self._task is None:
            self.start()
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                while self.settled < n:
                    self._progress.clear()
                    await self._progress.wait()
                    self._wake.set()  # (the next batch holding some of them: no flush_interval wait)
        except TimeoutError:
            return False
        return True

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued so far is written (or given up on)."""
        if self._task is None:
            self.start()
        async with asyncio.timeout(timeout):
            while not self._q.empty() or not self._idle.is_set():
                await self._idle.wait()
                await asyncio.sleep(0)

    def close_by(self, deadline: float) -> None:
        """The process is stopping: write what is queued now (no wait for a batch to fill), each
        write given up at ``deadline`` (monotonic) at the latest, the one under way included.
        The gateway sets one deadline on all its writers before the plugins shut down, so their
        final flushes run at once under one budget, not one ``shutdown_retry_for`` each in turn.
        Records are still taken meanwhile (a plugin's shutdown hands over what it gathered);
        ``close()`` later waits for them within the same deadline."""
        self._set_close_by(deadline)
        self._wake.set()

    def _set_close_by(self, deadline: float) -> None:
        if self._close_by is not None and self._close_by <= deadline:
            return
        self._close_by = deadline
        t = self._attempt_timer
        if t is not None:
            # a write under way (perhaps hung) gets the shutdown budget, and no more
            when = asyncio.get_running_loop().time() + max(0.0, deadline - time.monotonic())
            if t.when() is None or t.when() > when:  # type: ignore[operator]
                t.reschedule(when)

    async def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued (retrying for a short while: ``shutdown_retry_for``, or until the
        deadline ``close_by()`` set if that comes first), then stop. Leftovers are counted."""
        self._closing = True
        now = time.monotonic()
        self._set_close_by(now + self.shutdown_retry_for)
        floor = now + min(FINAL_FLOOR, self.shutdown_retry_for)
        if self._close_by is not None and self._close_by < floor:
            # The shared deadline (close_by()) ran out while plugins were still shutting down:
            # records handed over since still get a moment, the database being up.
            self._close_by = floor
        self._wake.set()
        try:
            await self.flush(timeout)
        except TimeoutError:
            pass
        await cancel_and_wait(self._task)
        self._task = None
        left = self._q.qsize()
        if left:
            while not self._q.empty():
                self._q.get_nowait()
            self._drop(left, "shutdown")
        self._log.flush()

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        self._m.dropped.labels(self.name, reason).inc(n)
        name = self.name.replace("%", "%%")
        self._log.event(reason, n, f"writer {name}: %d record(s) not written ({reason})")


def rejected(e: BaseException) -> bool:
    """Is this the store refusing some record (retrying the same records will fail the same way),
    rather than being unavailable or broken (retry all of it later)? Constraint violations, values
    the database cannot hold, and values the driver cannot even send are; everything else (no
    connection, a lock, a missing table, a deadlock) is retried whole. Errors come wrapped by
    SQLAlchemy, or straight from the driver (a store that calls it directly)."""
    from sqlalchemy import exc as sa_exc

    if isinstance(e, (sa_exc.IntegrityError, sa_exc.DataError)):
        return True
    if isinstance(e, sa_exc.DBAPIError):
        cause: BaseException | None = e.orig
        # asyncpg reports a value it could not encode (an int beyond its column's range) as a
        # client-side DataError, which arrives wrapped in an InterfaceError.
        # PostgreSQL's SQLSTATE classes 22 (data exception, e.g. a NUL in a text) and 23 (integrity
        # constraint) name the record, whatever class the driver gives the error.
        for x in (cause, getattr(cause, "__cause__", None), e.__cause__):
            if x is not None and (isinstance(x, (ValueError, TypeError, OverflowError, UnicodeError))
                                  or any(c.__name__ == "DataError" for c in type(x).__mro__)
                                  or str(getattr(x, "sqlstate", "") or "")[:2] in ("22", "23")):
                return True
        return _sqlite_refuses(cause)
    return isinstance(e, (ValueError, TypeError, OverflowError, UnicodeError)) or _sqlite_refuses(e)


def _sqlite_refuses(e: BaseException | None) -> bool:
    """sqlite3's own errors for a record: a constraint, or a value it has no type for ("type 'list'
    is not supported", "Error binding parameter")."""
    if e is None or type(e).__module__ != "sqlite3":
        return False
    name = type(e).__name__
    if name == "IntegrityError":
        return True
    if name in ("ProgrammingError", "InterfaceError"):
        text = str(e)
        return "not supported" in text or "binding parameter" in text
    return False


def _sqlite_why(e: BaseException) -> str:
    """SQLite's error name and what it means, after its own message ("disk I/O error" says
    neither that the disk is full nor that a file size limit was hit)."""
    detail = store_error(e)[0]
    return f" ({detail})" if detail.startswith("SQLITE_") else ""


def _short(e: BaseException) -> str:
    s = str(e).splitlines()[0] if str(e) else ""
    return s[:200]
