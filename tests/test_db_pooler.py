"""A PostgreSQL endpoint that accepts connections and never answers a query (what a connection
pooler such as PgBouncer does when it has no free server connection): start-up and the CLI fail
within the connect timeout, with the database named, instead of waiting without a word."""
from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.db import Database, DatabaseUnreachable


class SilentPooler:
    """Speaks the PostgreSQL start-up (no TLS, trust authentication), then reads and never answers."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.queries = 0

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                n = struct.unpack("!I", await reader.readexactly(4))[0]
                body = await reader.readexactly(n - 4)
                if n == 8 and struct.unpack("!I", body)[0] == 80877103:  # SSLRequest: no
                    writer.write(b"N")
                    continue
                break
            out = b"R" + struct.pack("!II", 8, 0)  # AuthenticationOk
            for k, v in (("server_version", "15.4"), ("client_encoding", "UTF8"), ("server_encoding", "UTF8"),
                         ("DateStyle", "ISO, MDY"), ("integer_datetimes", "on"), ("standard_conforming_strings", "on")):
                p = k.encode() + b"\0" + v.encode() + b"\0"
                out += b"S" + struct.pack("!I", len(p) + 4) + p
            out += b"K" + struct.pack("!III", 12, 1, 2) + b"Z" + struct.pack("!I", 5) + b"I"
            writer.write(out)
            while await reader.read(65536):  # the queries: queued forever
                self.queries += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> "SilentPooler":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_pooler_that_never_answers_fails_the_check_in_time() -> None:
    async with SilentPooler() as p:
        db = Database(f"postgresql+asyncpg://gw:secret@127.0.0.1:{p.port}/gw?timeout=1")
        try:
            with pytest.raises(DatabaseUnreachable) as e:
                async with asyncio.timeout(20):  # (a bound for the test; the check gives up after 1 s)
                    await db.check()
        finally:
            await db.engine.dispose()
    assert p.queries > 0  # it got as far as asking
    msg = str(e.value)
    assert f"127.0.0.1:{p.port}/gw" in msg and "secret" not in msg, msg


async def test_the_cli_names_the_silent_database(tmp_path: Path) -> None:
    async with SilentPooler() as p:
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(f"upstream: {{url: 'http://127.0.0.1:9'}}\n"
                       f"database: {{url: 'postgresql+asyncpg://gw:secret@127.0.0.1:{p.port}/gw?timeout=1'}}\n"
                       "plugins: [{name: audit}]\n")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "db", "current", "-c", str(cfg),
                                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode != 0, text
    assert f"127.0.0.1:{p.port}/gw" in text and "Traceback" not in text and "secret" not in text, text


async def test_numeric_asyncpg_options_in_the_url_reach_the_driver_as_numbers(pg_url: str) -> None:
    """``?statement_cache_size=0`` (what poolers need of asyncpg) and ``?command_timeout=`` (a bound
    on every query) came to the driver as strings, which it cannot compare with numbers."""
    sep = "&" if "?" in pg_url else "?"
    db = Database(pg_url + f"{sep}statement_cache_size=0&command_timeout=0.5")
    try:
        await db.check()
        async with db.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw._stmt_cache.get_max_size() == 0
            with pytest.raises(Exception) as e:  # the query outlives the command timeout
                await conn.exec_driver_sql("SELECT pg_sleep(3)")
            assert "timeout" in type(e.value).__name__.lower() or "timeout" in str(e.value).lower(), e.value
    finally:
        await db.engine.dispose()
