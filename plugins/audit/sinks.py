"""Where audit events go: the database (hash-chained), a JSON-lines file, stdout.

Each sink is fed by its own background ``BatchWriter`` (bounded queue, batches, retries, flush on
shutdown, dropped records counted in ``gateway_writer_dropped_total{writer="audit:<sink>"}``).
JSON-lines output is ``json.dumps`` with ``ensure_ascii``: every control character, quote and
non-ASCII character in a string is escaped, so one event is always exactly one line.
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from gateway.db import Database

from . import store
from .events import as_event, jsonl

__all__ = ["DatabaseSink", "JsonlSink", "Sink", "StdoutSink", "jsonl"]


def _lines(batch: Sequence[Any]) -> str:
    return "".join([jsonl(as_event(e)) + "\n" for e in batch])


class Sink:
    kind = ""

    @property
    def key(self) -> str:
        return self.kind

    async def write(self, batch: Sequence[Any]) -> None:
        raise NotImplementedError


class DatabaseSink(Sink):
    kind = "database"

    def __init__(self, db: Database) -> None:
        self.db = db

    async def write(self, batch: Sequence[Any]) -> None:
        await store.append(self.db, batch)


class JsonlSink(Sink):
    kind = "jsonl"

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    @property
    def key(self) -> str:
        return f"jsonl:{self.path}"

    def check(self) -> None:
        """Can the file be appended to? Raises OSError (at start-up, so a reload is refused) if not."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="ascii"):
            pass

    def _write(self, data: str) -> None:
        """Append the batch's lines. After a crash mid-write (or a full disk) the file may end in a
        torn line: the batch then starts on a new line, so no record is glued onto the fragment. A
        write that fails part-way is cut back off (unless another process appended meanwhile), so
        the writer's retry of the whole batch neither extends a fragment nor repeats records."""
        raw = data.encode("ascii")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            if start and os.pread(fd, 1, start - 1) != b"\n":
                raw = b"\n" + raw
            view, written = memoryview(raw), 0
            try:
                while written < len(raw):
                    written += os.write(fd, view[written:])
            except OSError:
                if written and os.fstat(fd).st_size == start + written:
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)

    async def write(self, batch: Sequence[Any]) -> None:
        await asyncio.to_thread(self._write, _lines(batch))


class StdoutSink(Sink):
    kind = "stdout"

    @staticmethod
    def _write(data: str) -> None:
        sys.stdout.write(data)
        sys.stdout.flush()

    async def write(self, batch: Sequence[Any]) -> None:
        # On a thread, as the file sink: a reader that stops reading (a full pipe) blocks this
        # writer only, never the event loop; the bounded queue then fills and drops are counted.
        await asyncio.to_thread(self._write, _lines(batch))
