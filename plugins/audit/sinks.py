"""Where audit events go: the database (hash-chained), a JSON-lines file, stdout.

Each sink is fed by its own background ``BatchWriter`` (bounded queue, batches, retries, flush on
shutdown, dropped records counted in ``gateway_writer_dropped_total{writer="audit:<sink>"}``).
JSON-lines output is ``json.dumps`` with ``ensure_ascii``: every control character, quote and
non-ASCII character in a string is escaped, so one event is always exactly one line.
"""
from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from gateway.db import Database, in_daemon_thread

from . import store
from .chain import ChainKeys
from .events import as_event, iso, jsonl

__all__ = ["DatabaseSink", "JsonlSink", "Sink", "StdoutSink", "head_log", "jsonl", "log_head"]

#: The ``audit head`` lines: logged whatever logging.level says (a head kept out of the database's
#: reach is what lets verify --head catch a truncated trail; see Audit.startup).
head_log = logging.getLogger("gateway.audit.head")


def _lines(batch: Sequence[Any]) -> str:
    return "".join([jsonl(as_event(e)) + "\n" for e in batch])


class Sink:
    kind = ""
    #: Does a failing or stalled write of this sink make the instance not ready (/readyz)?
    readiness = True
    #: The BatchWriter that feeds it (set when the writer is made)
    writer: Any = None

    @property
    def key(self) -> str:
        return self.kind

    async def write(self, batch: Sequence[Any]) -> None:
        raise NotImplementedError


class DatabaseSink(Sink):
    kind = "database"

    def __init__(self, db: Database, chain: ChainKeys | None = None, introduce: str = "never",
                 log_heads: bool = False) -> None:
        self.db = db
        self.chain = chain if chain is not None else ChainKeys()
        self.introduce = introduce  # (store._append: where a first chain key may be written)
        self.log_heads = log_heads  # (a gateway's; not a CLI command's)
        self._dropped_seen = 0  # the writer's drop count when the last batch went in
        self._written_at: str | None = None

    async def write(self, batch: Sequence[Any]) -> None:
        dropped = self.writer.dropped if self.writer is not None else 0
        if dropped > self._dropped_seen:
            # Records this writer gave up on since its last batch (the database down or full for
            # longer than retry_for, the queue full, a record it refused): the trail says so where
            # they belong, not only a metric and the log. (Gaps of a process that stopped are not.)
            batch = [{"time": iso(), "type": "audit.dropped", "actor": "system",
                      "dropped": dropped - self._dropped_seen, "after": self._written_at,
                      "detail": "events not written by this gateway (see gateway_writer_dropped_total and its log)"},
                     *batch]
        head = await store.append(self.db, batch, self.chain.keys, self.chain, self.introduce)  # (the keys in force now: a reload may change them)
        self._dropped_seen = dropped
        self._written_at = iso()
        if head is not None and self.log_heads:
            self.chain.head = head
            now = time.monotonic()
            if now >= self.chain.next_head_log:
                self.chain.next_head_log = now + HEAD_LOG_INTERVAL
                log_head(self.chain)


#: Seconds between two ``audit head`` log lines (with the first write after it).
HEAD_LOG_INTERVAL = 300.0


def log_head(chain: ChainKeys) -> None:
    """Say the newest row this process wrote (seq and hash), if not said already: logs kept apart
    from the database then hold heads that ``gateway audit verify --head SEQ:HASH`` compares with
    the trail, which catches what the chain alone cannot (its newest rows removed)."""
    head = chain.head
    if head is None or head == chain.head_logged:
        return
    chain.head_logged = head
    head_log.info("audit head: seq=%d hash=%s (later, `gateway audit verify --head %d:%s` checks that the trail "
             "still holds it)", head[0], head[1], head[0], head[1])


class JsonlSink(Sink):
    kind = "jsonl"

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    @property
    def key(self) -> str:
        return f"jsonl:{os.path.realpath(self.path)}"  # (one writer per file, however it is spelled)

    def check(self) -> None:
        """Can the file be appended to? Raises OSError (at start-up, so a reload is refused) if not."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))

    def _write(self, data: str) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)  # (a new file: its owner only)
        except FileNotFoundError:  # its folder was removed while the gateway ran: made again, as at start
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _append(fd, data.encode("ascii"))
        finally:
            os.close(fd)

    async def write(self, batch: Sequence[Any]) -> None:
        # A daemon thread of its own: a write that never returns (a stalled network mount) does
        # not hold the process's exit.
        await in_daemon_thread(self._write, _lines(batch))


def _append(fd: int, raw: bytes) -> None:
    """Write a batch's lines to ``fd``. On a regular file: after a crash mid-write (or a full disk)
    the file may end in a torn line, so the batch then starts on a new line and no record is glued
    onto the fragment; a write that fails part-way is cut back off (unless another process wrote
    meanwhile), so the writer's retry of the whole batch neither extends a fragment nor repeats
    records. A pipe takes the bytes as they come."""
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    start = os.fstat(fd).st_size if regular else 0
    if regular and start:
        try:
            last = os.pread(fd, 1, start - 1)
        except OSError:  # (a descriptor opened for writing only, as a shell's redirect: not checked)
            last = b"\n"
        if last != b"\n":
            raw = b"\n" + raw
    view, written = memoryview(raw), 0
    try:
        while written < len(raw):
            written += os.write(fd, view[written:])
    except OSError:
        if regular and written and os.fstat(fd).st_size == start + written:
            os.ftruncate(fd, start)
            with contextlib.suppress(OSError):  # (a descriptor not opened to append writes at its offset)
                os.lseek(fd, start, os.SEEK_SET)
        raise


#: One write to stdout at a time, whichever writer (a reload's new one while the old one is stuck)
_STDOUT = threading.Lock()


class StdoutSink(Sink):
    kind = "stdout"
    #: A log shipper reading stdout slowly is no reason to take the instance out of a load balancer.
    readiness = False

    @staticmethod
    def _write(data: str) -> None:
        with _STDOUT:
            try:
                fd = sys.stdout.fileno()
            except (AttributeError, OSError, ValueError):  # (replaced by something without a descriptor)
                sys.stdout.write(data)
                sys.stdout.flush()
                return
            with contextlib.suppress(Exception):
                sys.stdout.flush()  # (what others printed first: the lines stay whole and in order)
            _append(fd, data.encode("ascii"))

    async def write(self, batch: Sequence[Any]) -> None:
        # On a daemon thread of its own: a reader that stops reading (a full pipe) blocks this
        # writer only, never the event loop nor the process's exit; the bounded queue then fills
        # and drops are counted. The lock keeps a second write from starting beside a stuck one.
        await in_daemon_thread(self._write, _lines(batch))
