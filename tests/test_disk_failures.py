"""The files under a running gateway: a backup moved over the SQLite file, a JSON-lines folder
removed, a sink file that cannot be written when a command only reads, a writer retrying a batch
(what /metrics says it holds), an SQLite error's cause in a command's message."""
from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from gateway.writer import BatchWriter, WriterMetrics

from .helpers import base_config, start_gateway, until, write_config
from .test_cli_admin_edges import gw

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def count(path: Path, sql: str) -> int:
    c = sqlite3.connect(path)
    try:
        return c.execute(sql).fetchone()[0]
    finally:
        c.close()


async def test_a_backup_moved_over_the_file_is_opened_cleanly_after_a_restart(make_gateway: Any, tmp_path: Path,
                                                                           caplog: Any) -> None:
    """The running gateway refuses it; its stop sets its own -wal and -shm aside (they belong to
    the file that was there), so a plain restart opens the backup as it is, not with the old log
    applied to it (a corrupted database)."""
    path = tmp_path / "live.db"
    g = await make_gateway([{"name": "audit", "config": {"retry_for": 1}}, {"name": "conversations"}],
                           database={"url": f"sqlite+aiosqlite:///{path}"})
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
        await g.plugin("conversations").flush()
        for _, w in g.plugin("audit").sinks:
            await w.flush(10)
        backup = tmp_path / "backup.db"
        c = sqlite3.connect(path)
        c.execute(f"VACUUM INTO '{backup}'")  # as `gateway db backup` makes it
        c.close()
        for _ in range(30):  # more writes, in the -wal only (no checkpoint that small)
            async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
        await g.plugin("conversations").flush()
        for _, w in g.plugin("audit").sinks:
            await w.flush(10)
        assert (tmp_path / "live.db-wal").stat().st_size > 0
        backup.replace(path)  # moved over the live file
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
    await g.stop()
    assert not (tmp_path / "live.db-wal").exists()
    assert sorted(p.name.split(".replaced-")[0] for p in tmp_path.glob("live.db-*.replaced-*")) == \
        ["live.db-shm", "live.db-wal"]
    assert any("is set aside as" in r.getMessage() for r in caplog.records)
    g2 = await start_gateway(tmp_path / "gateway.yaml")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(g2.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
        await g2.plugin("conversations").flush()
    finally:
        await g2.stop()
    assert count(path, "PRAGMA integrity_check") == "ok"
    assert count(path, "SELECT count(*) FROM conversations") == 4  # the backup's 3, and the new one


async def test_the_log_files_another_process_uses_are_not_set_aside(make_gateway: Any, tmp_path: Path,
                                                                   caplog: Any) -> None:
    """Two processes on one file (a second gateway, a CLI command): the one that stops first after
    the file was replaced leaves the -wal and -shm to the other, which still uses them."""
    import subprocess
    import sys

    path = tmp_path / "live.db"
    g = await make_gateway([{"name": "conversations"}], database={"url": f"sqlite+aiosqlite:///{path}"})
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
    await g.plugin("conversations").flush()
    backup = tmp_path / "backup.db"
    c = sqlite3.connect(path)
    c.execute(f"VACUUM INTO '{backup}'")
    c.close()
    other = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT count(*) FROM conversations')"
        ".fetchall(); print('open', flush=True); sys.stdin.read()"), str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "open"
        backup.replace(path)
        await g.stop()
        assert (tmp_path / "live.db-wal").exists() and (tmp_path / "live.db-shm").exists()
        assert not list(tmp_path.glob("*.replaced-*"))
        assert any("in use by another process" in r.getMessage() for r in caplog.records)
    finally:
        other.communicate("", timeout=10)


async def test_a_jsonl_folder_removed_while_serving_is_made_again(make_gateway: Any, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    g = await make_gateway([{"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(logs / "a.jsonl")}],
                                                          "retry_for": 2}}])
    (_, w), = g.plugin("audit").sinks
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        await w.flush(10)
        shutil.rmtree(logs)
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        await w.flush(10)
    assert w.dropped == 0
    assert len((logs / "a.jsonl").read_text().splitlines()) == 1


def test_commands_that_only_read_run_when_the_jsonl_sink_cannot_be_written(tmp_path: Path) -> None:
    """A read-only disk, a folder gone: `audit verify`, `keys list` still work (and make nothing);
    a command that records an action still refuses to run without its records."""
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the sink's folder should be")
    db = tmp_path / "ops.db"
    cfg = write_config(tmp_path / "ops.yaml", base_config(
        "http://127.0.0.1:9", tmp_path, [{"name": "key_auth"}, {"name": "audit", "config": {
            "sinks": ["database", {"type": "jsonl", "path": str(blocker / "audit.jsonl")}]}}],
        admin={"enabled": False}, database={"url": f"sqlite+aiosqlite:///{db}"}))
    r = gw("db", "upgrade", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    r = gw("audit", "verify", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    r = gw("keys", "list", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert blocker.is_file()
    r = gw("keys", "create", "--owner", "o", "-c", str(cfg))
    assert r.returncode == 1 and "audit sink jsonl" in r.stderr
    assert count(db, "SELECT count(*) FROM api_keys") == 0


def test_a_database_error_says_its_cause(tmp_path: Path) -> None:
    db = tmp_path / "ops.db"
    db.write_bytes(b"not a database " * 500)
    cfg = write_config(tmp_path / "ops.yaml", base_config(
        "http://127.0.0.1:9", tmp_path, [{"name": "key_auth"}, {"name": "audit"}],
        admin={"enabled": False}, database={"url": f"sqlite+aiosqlite:///{db}"}))
    for args in (("keys", "list"), ("audit", "verify")):
        r = gw(*args, "-c", str(cfg))
        assert r.returncode in (1, 3) and "SQLITE_NOTADB: the file is not an SQLite database" in r.stderr, r.stderr


async def test_queue_depth_counts_the_batch_being_retried() -> None:
    """What a SIGKILL would lose: the records queued and those of the batch being retried."""
    reg = CollectorRegistry()
    fail = True

    async def write(batch: Any) -> None:
        if fail:
            raise OSError("disk full")

    w: BatchWriter[int] = BatchWriter("t", write, WriterMetrics(reg), flush_interval=0.01, retry_for=30)
    w.start()
    for i in range(10):
        await w.put(i)
    await until(lambda: w._attempt_started is not None or w.failing_since is not None, what="a failing write")
    assert w.depth == 10
    assert reg.get_sample_value("gateway_writer_queue_depth", {"writer": "t"}) == 10
    fail = False
    await w.flush(10)
    assert w.depth == 0 and w.written == 10
    await w.close(5)
    await asyncio.sleep(0)


def test_a_file_error_names_its_errno() -> None:
    """/readyz and the writer's log say why a sink's file failed: ENOSPC, EROFS, EACCES (not just
    "OSError")."""
    import errno

    from gateway.db import store_error

    assert store_error(OSError(errno.ENOSPC, "No space left on device")) == \
        ("OSError (ENOSPC: No space left on device)", False)
    assert store_error(PermissionError(errno.EACCES, "Permission denied"))[0] == \
        "PermissionError (EACCES: Permission denied)"
    assert store_error(OSError(errno.EROFS, "x"))[0].startswith("OSError (EROFS: ")

