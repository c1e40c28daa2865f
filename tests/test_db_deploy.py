"""Deploying on a database that is not the ideal one: a migration cut part-way (SQLite), another
application's Alembic revisions in the same database, a PostgreSQL role without grants, a database
that refuses or never answers, a migration lock held by another session, a schema a newer gateway
migrated, and database URLs the drivers cannot use."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url

import gateway.db as gdb
from gateway.db import Database, DatabaseError, DatabaseUnreachable, alembic_config, upgrade_sync

from .helpers import ADMIN_TOKEN, base_config, write_config

#: The password of the roles the privilege tests create (a server may ask for one on 127.0.0.1).
ROLE_PW = "gw-role-pw-0123456789"


def heads() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite://")).get_heads())


def gateway_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def config(tmp_path: Path, url: str, plugins: str = "") -> Path:
    return write_config(tmp_path / "gateway.yaml", f"admin: {{enabled: false}}\nserver: {{host: 127.0.0.1, port: 0}}\n"
                                                   f"upstream: {{url: http://127.0.0.1:9}}\n"
                                                   f"database:\n  url: '{url}'\n{plugins}")


def sqlite_state(path: Path) -> tuple[set[str], set[str]]:
    """(tables, recorded revisions) of a SQLite file."""
    c = sqlite3.connect(path)
    try:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        versions = {r[0] for r in c.execute("SELECT version_num FROM alembic_version")} \
            if "alembic_version" in tables else set()
        return tables, versions
    finally:
        c.close()


# -- 1. a migration cut part-way on SQLite ------------------------------------------------------------
def test_a_failed_sqlite_migration_leaves_the_database_as_it_was(tmp_path: Path, monkeypatch: Any) -> None:
    """A migration step that fails (a full disk) part-way: nothing of the run stays (no table made
    without its revision recorded), so the next upgrade succeeds and builds the whole schema."""
    from alembic.operations import Operations

    path = tmp_path / "cut.db"
    url = f"sqlite+aiosqlite:///{path}"
    real = Operations.create_index
    calls = {"n": 0}

    def failing(self: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Operations, "create_index", failing)
    with pytest.raises(OSError):
        upgrade_sync(url)
    assert calls["n"] == 3
    tables, versions = sqlite_state(path)
    assert versions == set() and tables <= {"alembic_version"}  # as before the run: empty
    monkeypatch.setattr(Operations, "create_index", real)
    assert set(upgrade_sync(url)) == heads()
    tables, versions = sqlite_state(path)
    assert versions == heads()
    assert {"api_keys", "audit_events", "conversations", "rate_limit_quota_usage"} <= tables


CUT = """
import os, sys
from alembic.operations import Operations
real, n = Operations.create_index, [0]
def cut(self, *a, **k):
    n[0] += 1
    if n[0] == 3:
        os._exit(9)  # killed part-way (a deploy tool's timeout, the OOM killer)
    return real(self, *a, **k)
Operations.create_index = cut
from gateway.db import upgrade_sync
upgrade_sync(sys.argv[1])
"""


def test_a_killed_sqlite_migration_can_be_run_again(tmp_path: Path) -> None:
    path = tmp_path / "killed.db"
    url = f"sqlite+aiosqlite:///{path}"
    r = subprocess.run([sys.executable, "-c", CUT, url], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 9, r.stderr
    r = gateway_cli("db", "upgrade", "-c", str(config(tmp_path, url)), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sqlite_state(path)[1] == heads()


def test_an_install_path_with_spaces_and_commas_migrates(tmp_path: Path) -> None:
    """The package installed under a path holding a space and a comma: every migration is found
    and applied (a ``version_locations`` option would be split there, and nothing applied)."""
    import shutil

    root = Path(__file__).resolve().parent.parent
    home = tmp_path / "gateway install, v2"
    for part in ("gateway", "plugins", "config"):
        shutil.copytree(root / part, home / part, ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "spaced.db"
    env = {**os.environ, "PYTHONPATH": str(home), "PYTHONWARNINGS": "error::DeprecationWarning:alembic"}
    r = subprocess.run([sys.executable, "-c", "import gateway; print(gateway.__file__)"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path, env=env)
    assert r.stdout.strip() == str(home / "gateway" / "__init__.py"), (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, "-m", "gateway", "db", "upgrade", "-c",
                        str(config(tmp_path, f"sqlite+aiosqlite:///{path}"))],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    tables, versions = sqlite_state(path)
    assert versions == heads() and {"api_keys", "audit_events", "conversation_messages"} <= tables, (tables, versions)


async def test_new_files_are_their_owners_only_and_a_backup_too(make_gateway: Any, upstream: Any,
                                                                  tmp_path: Path) -> None:
    """Under the usual umask 022, the SQLite file (key hashes, conversations), its -wal and -shm
    files and the audit JSONL are made 0600; so is a backup, also from a folder whose name holds a
    '#' (which ended the path of the URI the backup opened: an empty copy, reported written)."""
    import aiohttp

    data = tmp_path / "data #1"
    data.mkdir()
    db, jl = data / "gw.db", data / "audit.jsonl"
    old = os.umask(0o022)
    try:
        g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {"sinks": [
            {"type": "jsonl", "path": str(jl)}]}}], database={"url": f"sqlite+aiosqlite:///{db}"})
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "alice"},
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                assert r.status == 201
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in data.iterdir() if not p.name.endswith(".lock")}
        await g.stop()
        assert set(modes) == {"gw.db", "gw.db-wal", "gw.db-shm", "audit.jsonl"}, modes
        assert set(modes.values()) == {"0o600"}, modes
        out = tmp_path / "backups #2" / "copy.db"
        out.parent.mkdir()
        cfg = write_config(tmp_path / "b.yaml", base_config(upstream.url, tmp_path, [{"name": "key_auth"}],
                                                            database={"url": f"sqlite+aiosqlite:///{db}"}))
        r = gateway_cli("db", "backup", "-c", str(cfg), str(out), cwd=tmp_path)
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    tables, versions = sqlite_state(out)
    assert "api_keys" in tables and versions == heads(), (tables, versions)
    c = sqlite3.connect(out)
    try:
        assert c.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1
    finally:
        c.close()
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.db"]
    r = gateway_cli("db", "backup", "-c", str(cfg), str(out), cwd=tmp_path)  # never over a file
    assert r.returncode == 2 and "exists" in r.stderr


def test_a_database_or_audit_file_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    """A missing folder: every command says which file and why (SQLite only says "unable to open
    database file"); '~', which nothing expands, is refused by the config check."""
    missing = tmp_path / "no such folder" / "gw.db"
    cfg = config(tmp_path, f"sqlite+aiosqlite:///{missing}", "plugins: [{name: key_auth}]\n")
    want = f"the SQLite file {missing} cannot be made: its folder {missing.parent} does not exist"
    for cmd in (["db", "upgrade"], ["keys", "create", "--owner", "a"], ["serve"]):
        r = gateway_cli(*cmd, "-c", str(cfg), cwd=tmp_path)
        assert r.returncode == 1 and want in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)
    assert not missing.parent.exists()
    for url, plugins in (("sqlite+aiosqlite:///~/gw.db", ""),
                         (f"sqlite+aiosqlite:///{tmp_path}/ok.db",
                          "plugins: [{name: audit, config: {sinks: [{type: jsonl, path: ~/a.jsonl}]}}]\n")):
        r = gateway_cli("check", "-c", str(config(tmp_path, url, plugins)), cwd=tmp_path)
        assert r.returncode == 2 and "'~' is not expanded" in r.stderr, r.stderr
    assert not (tmp_path / "~").exists()


# -- 2. another application's alembic_version ---------------------------------------------------------
def test_another_applications_revisions_are_a_clear_error(tmp_path: Path, capsys: Any) -> None:
    """An alembic_version row in Alembic's default id form is not a newer gateway's: serve and
    `gateway db upgrade` refuse with one line (instead of starting with no tables)."""
    path = tmp_path / "shared.db"
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
    c.execute("INSERT INTO alembic_version VALUES ('3f2a9c1b7d4e')")
    c.commit()
    c.close()
    cfg = config(tmp_path, f"sqlite+aiosqlite:///{path}", "plugins:\n  - name: audit\n")
    from gateway.cli import main

    r = gateway_cli("serve", "-c", str(cfg), cwd=tmp_path)
    errors = [(r.returncode, r.stderr)]
    for args in (["db", "upgrade"], ["db", "current"], ["keys", "list"]):
        errors.append((main([*args, "-c", str(cfg)]), capsys.readouterr().err))
    for rc, err in errors:
        assert rc == 1, err
        assert "alembic_version holds revisions of another application (3f2a9c1b7d4e)" in err, err
        assert "its own database or schema" in err and "Traceback" not in err
    assert "audit_events" not in sqlite_state(path)[0]


async def test_a_newer_gateways_revision_is_still_accepted(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(upgrade_sync, url)
    c = sqlite3.connect(path)
    c.execute("UPDATE alembic_version SET version_num = 'key_auth_9999' WHERE version_num LIKE 'key_auth_%'")
    c.commit()
    c.close()
    db = Database(url)
    try:
        assert await db.pending_migrations() == []
        assert "key_auth_9999" in await db.upgrade()
    finally:
        await db.close()


# -- 6. `gateway db upgrade` on a schema a newer gateway migrated --------------------------------------
def test_db_upgrade_on_a_newer_schema_has_nothing_to_do(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade_sync(url)
    c = sqlite3.connect(path)
    c.execute("UPDATE alembic_version SET version_num = 'key_auth_9999' WHERE version_num LIKE 'key_auth_%'")
    c.commit()
    c.close()
    r = gateway_cli("db", "upgrade", "-c", str(config(tmp_path, url)), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "already migrated further by a newer gateway (key_auth_9999): nothing to do" in r.stdout
    assert "Can't locate revision" not in r.stdout + r.stderr
    assert "key_auth_9999" in sqlite_state(path)[1]


# -- 4. a database that refuses or never answers ------------------------------------------------------
@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose connections are accepted (by the kernel's backlog) and never answered."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_a_database_that_never_answers_is_named_in_the_error(silent_port: int, monkeypatch: Any) -> None:
    monkeypatch.setattr(gdb, "CONNECT_TIMEOUT", 0.5)
    db = Database(f"postgresql+asyncpg://gw:s3cretpw@127.0.0.1:{silent_port}/gw")
    try:
        with pytest.raises(DatabaseUnreachable) as e:
            await db.check()
    finally:
        await db.close()
    assert str(e.value) == f"database postgresql+asyncpg://gw:***@127.0.0.1:{silent_port}/gw unreachable: TimeoutError"


async def test_the_url_may_set_the_connect_timeout(silent_port: int) -> None:
    """asyncpg's ``?timeout=`` in the URL (which the driver would get as a string) sets the limit."""
    db = Database(f"postgresql+asyncpg://gw@127.0.0.1:{silent_port}/gw?timeout=0.3")
    try:
        with pytest.raises(DatabaseUnreachable, match=r"gw\?timeout=0.3 unreachable: TimeoutError$"):
            await db.ping(timeout=30) or await db.check()
    finally:
        await db.close()


def test_cli_says_which_database_never_answered(tmp_path: Path, silent_port: int, monkeypatch: Any,
                                                capsys: Any) -> None:
    from gateway.cli import main

    monkeypatch.setattr(gdb, "CONNECT_TIMEOUT", 0.5)
    cfg = config(tmp_path, f"postgresql+asyncpg://gw:s3cretpw@127.0.0.1:{silent_port}/gw")
    assert main(["db", "current", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"gateway db: error: database postgresql+asyncpg://gw:***@127.0.0.1:{silent_port}/gw "
                           "unreachable: TimeoutError")


def test_serve_and_cli_say_the_database_refused(tmp_path: Path, capsys: Any) -> None:
    from gateway.cli import main

    port = closed_port()
    cfg = config(tmp_path, f"postgresql+asyncpg://gw:s3cretpw@127.0.0.1:{port}/gw", "plugins:\n  - name: audit\n")
    want = f"database postgresql+asyncpg://gw:***@127.0.0.1:{port}/gw unreachable: ConnectionRefusedError"
    r = gateway_cli("serve", "-c", str(cfg), cwd=tmp_path)
    said = [(r.returncode, r.stdout + r.stderr)]
    for args in (["db", "upgrade"], ["keys", "list"]):
        rc = main([*args, "-c", str(cfg)])
        out = capsys.readouterr()
        said.append((rc, out.out + out.err))
    for rc, text_ in said:
        assert rc == 1, text_
        assert want in text_, text_
        assert "s3cretpw" not in text_ and "Traceback" not in text_


SILENT_BACKEND = """
import sys
from gateway.cli import main
from gateway.plugin import Plugin, registry

class SilentBackend(Plugin):
    name = "t_silent_backend"

    async def startup(self):
        raise TimeoutError()  # (its message is empty)

registry.register(SilentBackend)
sys.exit(main(["serve", "-c", sys.argv[1]]))
"""


def test_a_start_up_error_without_a_message_shows_its_type(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "gateway.yaml", "admin: {enabled: false}\nserver: {host: 127.0.0.1, port: 0}\n"
                                                   "upstream: {url: http://127.0.0.1:9}\nlogging: {format: text}\n"
                                                   "plugins:\n  - name: t_silent_backend\n")
    r = subprocess.run([sys.executable, "-c", SILENT_BACKEND, str(cfg)], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 1, r.stderr
    assert "start-up failed: plugin t_silent_backend: TimeoutError" in r.stderr, r.stderr


# -- 3. a PostgreSQL role without grants on the gateway's tables ---------------------------------------
async def pg_execute(url: str, *sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        for q in sql:
            await conn.execute(q)
    finally:
        await conn.close()


async def test_postgresql_start_checks_the_roles_privileges(pg_url: str) -> None:
    owner = Database(pg_url)
    try:
        await owner.upgrade()
    finally:
        await owner.close()
    role = "gw_app_" + make_url(pg_url).database[-8:]
    await pg_execute(pg_url, f'CREATE ROLE "{role}" LOGIN PASSWORD \'{ROLE_PW}\'', f'GRANT CONNECT ON DATABASE "{make_url(pg_url).database}" '
                                                            f'TO "{role}"',
                     f'GRANT SELECT ON alembic_version, api_keys TO "{role}"',
                     f'GRANT INSERT, UPDATE, DELETE ON api_keys TO "{role}"')
    app_url = make_url(pg_url).set(username=role, password=ROLE_PW).render_as_string(hide_password=False)
    app = Database(app_url)
    try:
        with pytest.raises(DatabaseError) as e:
            await app.check()
        msg = str(e.value)
        assert f"the database role {role} lacks privileges" in msg
        assert "audit_events: DELETE, INSERT, SELECT" in msg and "api_key_usage_daily: " in msg
        assert "api_keys:" not in msg and "alembic_version" not in msg  # granted
        await pg_execute(pg_url, f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"',
                         f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        assert await app.check() == {}
    finally:
        await app.close()


# -- 5. the PostgreSQL migration lock held by another session ------------------------------------------
LOCK_ID = 0x6761746577  # (migrations/env.py's)


async def test_postgresql_migration_lock_wait_is_said_and_bounded(pg_url: str, monkeypatch: Any,
                                                                  caplog: Any) -> None:
    import asyncpg

    monkeypatch.setattr(gdb, "MIGRATION_LOCK_WAIT", 0.5)
    holder = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    db = Database(pg_url)
    try:
        await holder.execute(f"SELECT pg_advisory_lock({LOCK_ID})")
        with caplog.at_level(logging.WARNING, logger="gateway.db"):
            with pytest.raises(DatabaseError, match="the migration lock .* was held by another session for 0.5s"):
                async with asyncio.timeout(60):  # (a wait without end fails the test instead of hanging it)
                    await db.upgrade()
        assert "waiting for the migration lock" in caplog.text
        await holder.execute(f"SELECT pg_advisory_unlock({LOCK_ID})")
        assert set(await db.upgrade()) == heads()
        async with db.engine.connect() as c:
            assert {r[0] for r in await c.execute(text("SELECT version_num FROM alembic_version"))} == heads()
    finally:
        await holder.close()
        await db.close()


# -- 7. database URLs the drivers cannot use ------------------------------------------------------------
@pytest.mark.parametrize("url,want", [
    ("sqlite+aiosqlite:///:memory:", "in-memory SQLite databases are not supported (use a file"),
    ("sqlite+aiosqlite://", "in-memory SQLite databases are not supported (use a file"),
    ("sqlite+aiosqlite:///file::memory:?cache=shared&uri=true", "in-memory SQLite databases are not supported"),
    ("postgresql+asyncpg://gw@127.0.0.1/gw?sslmode=require", "the asyncpg driver takes ssl= instead"),
    # a raw '?' in the file's path: the database went to another file, with a warning on stderr only
    ("sqlite+aiosqlite:////var/lib/q?x/gw.db", "'x/gw.db' is no SQLite URL option: a '?' in the file's path"),
])
def test_database_urls_the_drivers_cannot_use(tmp_path: Path, url: str, want: str) -> None:
    from gateway.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(config(tmp_path, url), env={"GATEWAY_ADMIN_TOKEN": "x" * 32})
    assert want in str(e.value) and "database.url" in str(e.value), str(e.value)


@pytest.mark.parametrize("password", ["p@SECRET#w/rd", "SECRET/pw", "SECRET?pw"])
def test_a_password_not_percent_encoded_is_refused_unshown(tmp_path: Path, password: str) -> None:
    """A generated password pasted into the URL as it is: SQLAlchemy would take part of it for
    the host (shown in its "unreachable" error, and looked up in DNS). Refused by every command
    that reads the config, the URL not shown; the encoded form is accepted."""
    from urllib.parse import quote

    url = f"postgresql+asyncpg://app:{password}@127.0.0.1:5432/gw"
    for cmd in (["check"], ["db", "upgrade"], ["keys", "list"]):
        r = gateway_cli(*cmd, "-c", str(config(tmp_path, url)), cwd=tmp_path)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "percent-encode the user name and password" in r.stderr and "database.url" in r.stderr, r.stderr
        assert "SECRET" not in r.stdout + r.stderr
    r = gateway_cli("check", "-c", str(config(tmp_path, url.replace(password, quote(password, safe="")))),
                    cwd=tmp_path)
    assert r.returncode == 0, r.stderr


async def test_postgresql_start_checks_the_sequences_of_serial_columns(pg_url: str, make_gateway: Any) -> None:
    """A role granted every table privilege the docs list but not USAGE on the sequences the
    conversations tables draw their ids from is refused at start, the sequences named: it would
    start "ready" and every conversation write would fail ("permission denied for sequence"),
    retried for ever, nothing stored. With the grant the docs give, it starts and stores a turn."""
    import aiohttp
    import asyncpg

    owner = Database(pg_url)
    try:
        await owner.upgrade()
    finally:
        await owner.close()
    dbname = make_url(pg_url).database
    role = "gw_seq_" + dbname[-8:]
    await pg_execute(pg_url, f'CREATE ROLE "{role}" LOGIN PASSWORD \'{ROLE_PW}\'', f'GRANT CONNECT ON DATABASE "{dbname}" TO "{role}"',
                     f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"')
    app_url = make_url(pg_url).set(username=role, password=ROLE_PW).render_as_string(hide_password=False)
    plugins = [{"name": "conversations", "config": {}}]
    with pytest.raises(DatabaseError) as e:
        await make_gateway(plugins, database={"url": app_url})
    msg = str(e.value)
    assert f"the database role {role} lacks privileges" in msg
    assert "conversation_messages_id_seq: USAGE" in msg and "conversation_turns_id_seq: USAGE" in msg, msg
    assert "conversations:" not in msg and "audit_events" not in msg  # the tables themselves are granted
    await pg_execute(pg_url, f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
    g = await make_gateway(plugins, database={"url": app_url})
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", timeout=aiohttp.ClientTimeout(total=20),
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
            cid = r.headers["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    conn = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    try:
        assert await conn.fetchval("SELECT count(*) FROM conversation_turns WHERE conversation_id = $1", cid) == 1
        assert await conn.fetchval("SELECT count(*) FROM conversation_messages WHERE conversation_id = $1", cid) == 2
    finally:
        await conn.close()


# -- 9. from one SQLite file to PostgreSQL ----------------------------------------------------------------
async def test_db_copy_moves_a_sqlite_deployment_to_postgresql(make_gateway: Any, upstream: Any, tmp_path: Path,
                                                               pg_url: str) -> None:
    """A team outgrowing its SQLite file: `gateway db copy --to <postgresql URL>` copies keys, usage,
    quota, conversations and the audit trail; a gateway on the copy takes the same key, continues
    the conversation (new rows past the copied ids), and the trail verifies. A target holding rows,
    or the database itself, is refused."""
    import aiohttp

    plugins = [{"name": "key_auth"}, {"name": "rate_limit", "config": {"quotas": {"daily_tokens": 100000}}},
               {"name": "conversations"}, {"name": "audit"}]
    g = await make_gateway(plugins)
    chat = {"model": "demo-chat", "messages": [{"role": "user", "content": "first"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", json={"owner": "alice"},
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            key = (await r.json())["key"]
        auth = {"Authorization": f"Bearer {key}"}
        async with s.post(g.url + "/v1/chat/completions", json=chat, headers=auth) as r:
            assert r.status == 200
            cid, answer = r.headers["X-Conversation-ID"], (await r.json())["choices"][0]["message"]
    await g.stop()
    src_cfg = tmp_path / "gateway.yaml"
    r = gateway_cli("db", "copy", "-c", str(src_cfg), "--to", pg_url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "api_keys: 1 row(s)" in r.stdout and "conversation_messages: 2 row(s)" in r.stdout, r.stdout
    password = make_url(pg_url).password
    assert not password or f":{password}@" not in r.stdout + r.stderr
    pg = await make_gateway(plugins, database={"url": pg_url, "auto_migrate": True}, name="pg.yaml")
    async with aiohttp.ClientSession() as s:
        turn = {"model": "demo-chat", "messages": [*chat["messages"], answer, {"role": "user", "content": "second"}]}
        async with s.post(pg.url + "/v1/chat/completions", json=turn,
                          headers={**auth, "X-Conversation-ID": cid}) as r:
            assert r.status == 200, await r.text()
        await pg.plugin("conversations").flush()
        async with s.get(f"{pg.url}/gateway/conversations/{cid}", headers=auth) as r:
            msgs = (await r.json())["messages"]
    assert [m["content"] for m in msgs][:3] == ["first", answer["content"], "second"] and len(msgs) == 4
    await pg.stop()
    pg_cfg = tmp_path / "pg.yaml"
    r = gateway_cli("audit", "verify", "-c", str(pg_cfg), cwd=tmp_path)
    assert r.returncode == 0 and "audit chain intact" in r.stdout, r.stdout + r.stderr
    r = gateway_cli("db", "copy", "-c", str(src_cfg), "--to", pg_url, cwd=tmp_path)  # not into rows
    assert r.returncode == 1 and "holds rows already" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = gateway_cli("db", "copy", "-c", str(src_cfg), "--to", "postgresql+asyncpg://u:p@ss#w@h/db", cwd=tmp_path)
    assert r.returncode == 2 and "percent-encode" in r.stderr and "ss#w" not in r.stderr, r.stderr


async def test_db_copy_refuses_a_newer_source_and_an_interrupt_leaves_nothing(make_gateway: Any, tmp_path: Path,
                                                                            pg_url: str) -> None:
    """A source a newer gateway migrated is refused (copied by this version, what the newer one
    added would be left behind). A copy cut by SIGTERM while it writes exits 143 at once, with
    nothing committed, and a second run fills the target; a time kept with its zone (quota usage)
    comes out unchanged when the copy runs in another time zone."""
    import signal

    g = await make_gateway([{"name": "key_auth"}, {"name": "rate_limit", "config": {"quotas": {"daily_tokens": 99}}},
                            {"name": "conversations"}])
    await g.stop()
    db_file, cfg = tmp_path / "gateway.db", tmp_path / "gateway.yaml"
    c = sqlite3.connect(db_file)
    try:
        c.execute("INSERT INTO conversations (id, owner, created_at, updated_at, message_count, turn_count, "
                  "prompt_tokens, completion_tokens) VALUES ('conv_big', 'alice', '2026-11-27 09:00:00', "
                  "'2026-11-27 09:00:00', 200000, 0, 0, 0)")
        c.execute("WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 199999) "
                  "INSERT INTO conversation_messages (conversation_id, position, role, content, digest, tokens_derived, "
                  "owner, created_at) SELECT 'conv_big', i, 'user', '\"m' || i || '\"', 'd' || i, 0, 'alice', "
                  "'2026-11-27 09:00:00.000000' FROM n")
        c.execute("INSERT INTO rate_limit_quota_usage VALUES ('key:k', 'd:2026-11-27', 5, '2026-11-27 09:46:19.000000')")
        c.commit()
    finally:
        c.close()
    p = subprocess.Popen([sys.executable, "-m", "gateway", "db", "copy", "-c", str(cfg), "--to", pg_url], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    seen = ""
    while "conversations:" not in seen:  # (then it is writing the 200,000 messages)
        line = p.stdout.readline()
        assert line, seen
        seen += line
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 143
    assert "interrupted; nothing was committed to the target" in p.stdout.read()
    r = subprocess.run([sys.executable, "-m", "gateway", "db", "copy", "-c", str(cfg), "--to", pg_url], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "TZ": "America/New_York"})
    assert r.returncode == 0 and "conversation_messages: 200000 row(s)" in r.stdout, r.stdout + r.stderr
    import asyncpg

    conn = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    try:
        at = await conn.fetchval("SELECT updated_at AT TIME ZONE 'UTC' FROM rate_limit_quota_usage")
    finally:
        await conn.close()
    assert str(at) == "2026-11-27 09:46:19", at
    c = sqlite3.connect(db_file)
    try:
        c.execute("UPDATE alembic_version SET version_num = 'key_auth_0099' WHERE version_num LIKE 'key_auth_%'")
        c.commit()
    finally:
        c.close()
    r = gateway_cli("db", "copy", "-c", str(cfg), "--to", f"sqlite+aiosqlite:///{tmp_path / 'other.db'}", cwd=tmp_path)
    assert r.returncode == 1 and "migrated by a newer gateway (key_auth_0099)" in r.stderr, r.stderr


async def test_postgresql_upgrade_does_not_deadlock_with_an_older_gateways_writes(pg_url: str) -> None:
    """A rolling upgrade: an older gateway keeps writing (a conversation's row, then its turn)
    while `db upgrade` runs conversations_0003 (an index on conversation_turns) and then _0004
    (a column on conversations). In one transaction for the whole run, the upgrade held
    conversation_turns while it waited for conversations, and the writer the other way round:
    PostgreSQL's deadlock detector failed one of them. One transaction per migration: both go on."""
    import asyncpg
    from alembic import command

    await asyncio.to_thread(command.upgrade, alembic_config(pg_url), "conversations_0002")
    writer = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    watcher = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    db = Database(pg_url)
    try:
        tx = writer.transaction()
        await tx.start()
        await writer.execute("LOCK TABLE conversations IN ROW EXCLUSIVE MODE")  # (an UPDATE of a row)
        upgrade = asyncio.create_task(db.upgrade())

        async def waits_for_conversations() -> bool:
            return bool(await watcher.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'conversations'::regclass"))

        async with asyncio.timeout(60):
            while not await waits_for_conversations():
                assert not upgrade.done(), upgrade.result()
                await asyncio.sleep(0.05)
        await writer.execute("SET lock_timeout = '20s'")
        await writer.execute("LOCK TABLE conversation_turns IN ROW EXCLUSIVE MODE")  # (its turn's INSERT)
        await tx.commit()
        async with asyncio.timeout(60):
            assert set(await upgrade) == heads()
    finally:
        await writer.close()
        await watcher.close()
        await db.close()
