"""Logging: one JSON object per line (or plain text), with extra fields under ``fields``.
Nothing secret is ever passed to a logger; messages are escaped by ``json.dumps``."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # At DEBUG these log every statement's parameters (stored content); never let them through.
    for noisy in ("aiosqlite", "asyncpg", "sqlalchemy.engine", "sqlalchemy.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # migrations log one line per plugin setup


class ThrottledLog:
    """A repeated event logged at most once per ``interval`` seconds per key, without losing count:
    the first occurrence is logged at once, the ones that follow within the interval are summed
    into one line when it ends (and by :meth:`flush` at shutdown). An outage that drops a record
    per request gives one line per interval, not one per request.

    ``template`` is a %-format with one ``%d`` for the count; callers put no secret in it."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, level: int = logging.ERROR) -> None:
        self.logger, self.interval, self.level = logger, interval, level
        self._held: dict[str, list] = {}  # key -> [count held back, template]

    def event(self, key: str, n: int, template: str) -> None:
        held = self._held.get(key)
        if held is not None:
            held[0] += n
            held[1] = template
            return
        self.logger.log(self.level, template, n)
        self._held[key] = [0, template]
        self._later(key)

    def _later(self, key: str) -> None:
        try:
            asyncio.get_running_loop().call_later(self.interval, self._release, key)
        except RuntimeError:  # no event loop (a CLI command): nothing is held back
            self._held.pop(key, None)

    def _release(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held and held[0]:
            self.logger.log(self.level, held[1] + " in the last %ds", held[0], int(self.interval))
            self._held[key] = [0, held[1]]
            self._later(key)

    def flush(self) -> None:
        """Log what is held back now (shutdown)."""
        for key in list(self._held):
            held = self._held.pop(key)
            if held[0]:
                self.logger.log(self.level, held[1] + " since the last line", held[0])
