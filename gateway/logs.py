"""Logging: one JSON object per line (or plain text), with extra fields under ``fields``.
Nothing secret is ever passed to a logger; messages are escaped by ``json.dumps``."""
from __future__ import annotations

import asyncio
import atexit
import json
import logging
import logging.handlers
import os
import queue
import re
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


class TextFormatter(logging.Formatter):
    """``logging.format: text``: the line, then the record's fields as ``key=value`` (a JSON
    value when it is not a plain word: the addresses of ``gateway listening``, its plugins)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            parts = []
            for k, v in fields.items():
                text = v if isinstance(v, str) and v and _WORD.fullmatch(v) else json.dumps(v, default=str)
                parts.append(f"{k}={text}")
            head, sep, tail = line.partition("\n")  # (after the message, before a traceback)
            line = f"{head} {' '.join(parts)}{sep}{tail}"
        return line


_WORD = re.compile(r"[\w.:/@+-]+")


#: Log records waiting for the writer thread; past that, records are dropped and counted.
LOG_QUEUE = 10000


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread: the event loop never writes to stderr itself, so a
    stderr nobody reads (a pipe whose reader stalled, a log collector behind) cannot stop it. With
    the queue full a record is dropped and counted; the count is logged once there is room."""

    def __init__(self, q: "queue.Queue[logging.LogRecord]") -> None:
        super().__init__(q)
        self.dropped = 0

    # (prepare(), the library's: the record is formatted here, with this handler's formatter, the
    # format in force when it was logged; the writer thread writes the text)

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                note = logging.LogRecord("gateway", logging.WARNING, __file__, 0,
                                         "%d log line(s) dropped: stderr was not being read", (self.dropped,), None)
                self.queue.put_nowait(self.prepare(note))
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Listener(logging.handlers.QueueListener):
    def stop_within(self, timeout: float) -> None:
        """Write what is queued, waiting at most ``timeout`` (a stderr nobody reads must not hold
        the process's exit: the writer thread is a daemon)."""
        thread = getattr(self, "_thread", None)
        if thread is None:
            return
        try:
            self.enqueue_sentinel()
        except queue.Full:
            return
        thread.join(timeout)
        self._thread = None


class _StderrWriter(logging.Handler):
    """The writer thread's handler: the formatted line straight to file descriptor 2. Without the
    handler lock and without a buffer: a write blocked on a stderr nobody reads holds nothing the
    exit needs (``logging.shutdown`` takes every handler's lock and flushes it)."""

    def handle(self, record: logging.LogRecord) -> bool:  # (one thread calls it: no lock)
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        data = memoryview((record.getMessage() + "\n").encode("utf-8", "backslashreplace"))
        try:
            while data:
                data = data[os.write(2, data):]
        except OSError:  # stderr closed: nowhere to say it
            pass

    def flush(self) -> None:
        pass


_out: _StderrWriter | None = None
_listener: _Listener | None = None


def _stop_listener() -> None:
    if _listener is not None:
        _listener.stop_within(2.0)


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Logs to stderr through a writer thread (see _QueueHandler). Called again on a reload: the
    level and format change, the thread and its queue stay."""
    global _out, _listener
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    if _listener is None or _out is None:
        _out = _StderrWriter()  # (the records come formatted: see _QueueHandler)
        q: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE)
        _listener = _Listener(q, _out)
        _listener.start()
        atexit.register(_stop_listener)
    handler = _QueueHandler(_listener.queue)  # type: ignore[arg-type]
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # At DEBUG these log every statement's parameters (stored content), or every request line with
    # its query (urllib3, under the OTLP/HTTP exporter: a key in the endpoint's query); never let
    # them through.
    for noisy in ("aiosqlite", "asyncpg", "sqlalchemy.engine", "sqlalchemy.pool", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # migrations log one line per plugin setup
    # coredis says "Retry attempt 1 due to error: No matching script" at INFO whenever a fresh or
    # restarted Redis first runs a limits script (which is then loaded: nothing counted twice)
    logging.getLogger("coredis.retry").setLevel(logging.WARNING)


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
