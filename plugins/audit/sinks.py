"""Where audit events go: the database (hash-chained), a JSON-lines file, stdout.

Each sink is fed by its own background ``BatchWriter`` (bounded queue, batches, retries, flush on
shutdown, dropped records counted in ``gateway_writer_dropped_total{writer="audit:<sink>"}``).
JSON-lines output is ``json.dumps`` with ``ensure_ascii``: every control character, quote and
non-ASCII character in a string is escaped, so one event is always exactly one line.
"""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from gateway.db import Database

from . import store


def jsonl(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=True, separators=(",", ":"), default=str)


class Sink:
    kind = ""

    @property
    def key(self) -> str:
        return self.kind

    async def write(self, batch: Sequence[dict[str, Any]]) -> None:
        raise NotImplementedError


class DatabaseSink(Sink):
    kind = "database"

    def __init__(self, db: Database) -> None:
        self.db = db

    async def write(self, batch: Sequence[dict[str, Any]]) -> None:
        await store.append(self.db, list(batch))


class JsonlSink(Sink):
    kind = "jsonl"

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    @property
    def key(self) -> str:
        return f"jsonl:{self.path}"

    def _write(self, data: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="ascii") as f:
            f.write(data)
            f.flush()

    async def write(self, batch: Sequence[dict[str, Any]]) -> None:
        data = "".join(jsonl(e) + "\n" for e in batch)
        await asyncio.to_thread(self._write, data)


class StdoutSink(Sink):
    kind = "stdout"

    async def write(self, batch: Sequence[dict[str, Any]]) -> None:
        sys.stdout.write("".join(jsonl(e) + "\n" for e in batch))
        sys.stdout.flush()
