"""The database layer shared by every plugin that persists.

One SQLAlchemy 2 async engine. SQLite (the default) gets WAL, ``busy_timeout`` and
``synchronous=NORMAL`` on every connection, and :meth:`Database.check` reads them back so a
start-up never assumes they took. PostgreSQL is the same code with a ``postgresql+asyncpg`` URL.
The schema is owned by Alembic migrations (``gateway db upgrade``); each plugin that stores data
has its own migration branch in ``gateway/migrations/versions``.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from sqlalchemy import MetaData, event, inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

log = logging.getLogger("gateway.db")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base for every table the gateway stores."""

    metadata = MetaData(naming_convention=NAMING)


def in_daemon_thread(fn: Any, *args: Any) -> "asyncio.Future[Any]":
    """``fn(*args)`` on a daemon thread of its own: a call that never returns (a read from a stalled
    network mount) is abandoned by the caller's timeout and does not hold the process's exit (the
    default executor's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=f"gateway:{getattr(fn, '__qualname__', 'call')}", daemon=True).start()
    return fut


def _readonly_reconnects(context: Any) -> None:
    """A connection that refuses writes as read-only stays so: SQLite opens a file it may not write
    read-only (made writable later, only new connections can write); a PostgreSQL session keeps
    the ``default_transaction_read_only`` it began with (set while the disk was full, or reset
    since), and one to a primary demoted to a standby by a failover stays on the standby. A write
    refused as read-only drops the pool's connections, so the next attempt (the writers retry)
    opens new ones, which see the database as it is now."""
    e = context.original_exception
    if "attempt to write a readonly database" in str(e) or READ_ONLY_SQLSTATE in (
            getattr(e, "sqlstate", None), getattr(getattr(e, "__cause__", None), "sqlstate", None)):
        context.is_disconnect = True


#: PostgreSQL's read_only_sql_transaction ("cannot execute INSERT in a read-only transaction")
READ_ONLY_SQLSTATE = "25006"


class DatabaseError(Exception):
    pass


class DatabaseUnreachable(DatabaseError):
    """The database could not be connected to (refused, unanswered, wrong password ...)."""


#: Seconds a PostgreSQL connection may take to be made (asyncpg's own default is 60: a server that
#: accepts the TCP connection and never answers held a start-up for over a minute).
CONNECT_TIMEOUT = 15.0
#: Connections long reads may hold at once on SQLite (see ``Database.long_read``).
LONG_READS = 4
#: Bytes a SQLite write-ahead log is truncated to after a checkpoint (journal_size_limit).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
#: Tries, a second apart, at emptying the write-ahead log after an erasure (see empty_log_soon).
EMPTY_LOG_TRIES = 60

#: The gateway's own revision ids: a plugin's branch name and a number (``key_auth_0002``). An
#: ``alembic_version`` row in another form (Alembic's default hex ids) is another application's.
OWN_REVISION = re.compile(r"[a-z][a-z0-9_]*_[0-9]{4,}")


#: asyncpg's numeric connection options a URL may set (``?command_timeout=30``): the dialect hands
#: URL values to the driver as strings, which it cannot compare with numbers.
ASYNCPG_NUMBERS: dict[str, type] = {"timeout": float, "command_timeout": float, "statement_cache_size": int,
                                    "max_cached_statement_lifetime": float, "max_cacheable_statement_size": int}


def engine_options(url: str) -> dict[str, Any]:
    """Options every engine on ``url`` gets (the gateway's and the migrations'): a bounded
    connect time on PostgreSQL, CONNECT_TIMEOUT unless the URL sets asyncpg's ``timeout``, and
    the other numeric asyncpg options the URL sets, as numbers."""
    from sqlalchemy.engine import make_url

    if not url.startswith("postgresql+asyncpg"):
        return {}
    args: dict[str, Any] = {"timeout": CONNECT_TIMEOUT}
    query = make_url(url).query
    for name, kind in ASYNCPG_NUMBERS.items():
        with contextlib.suppress(KeyError, TypeError, ValueError):
            args[name] = kind(query[name])  # type: ignore[arg-type]
    return {"connect_args": args}


def shown_url(url: str) -> str:
    """``url`` as it may be shown: no password, no secret query parameter."""
    from sqlalchemy.engine import make_url

    from .redact import mask_params

    try:
        return mask_params(make_url(url).render_as_string(hide_password=True))
    except Exception:
        return "(the configured database)"


def unreachable(url: str, e: BaseException) -> DatabaseUnreachable:
    """The one-line error for a database that could not be connected to (an empty message, such
    as a timeout's, shows the type)."""
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return DatabaseUnreachable(f"database {shown_url(url)} unreachable: {type(e).__name__}"
                               + (f": {msg}" if msg else ""))


def newer_revisions(applied: set[str], known: set[str], url: str) -> set[str]:
    """The revisions in ``applied`` this version does not know: a newer gateway's (empty: none).
    Raises DatabaseError when some are not the gateway's at all (another application keeps its
    Alembic revisions in the same ``alembic_version`` table): taking them for a newer gateway's
    would start without creating any table."""
    unknown = applied - known
    foreign = sorted(r for r in unknown if not OWN_REVISION.fullmatch(r))
    if foreign:
        raise DatabaseError(f"the database's alembic_version holds revisions of another application "
                            f"({', '.join(foreign)}) in {shown_url(url)}: give the gateway its own database "
                            "or schema")
    return unknown


#: The rights each of the gateway's tables needs at run time (a table not there is not checked:
#: its migration is pending, which start-up reports, or its plugin is not used). The sequences
#: behind their serial columns (``conversation_messages_id_seq`` ...) need USAGE as well: start-up
#: finds them through ``pg_depend``, so a table that gains one needs no entry of its own.
TABLE_PRIVILEGES: dict[str, tuple[str, ...]] = {
    "alembic_version": ("SELECT",),
    "audit_events": ("SELECT", "INSERT", "DELETE"),
    "api_keys": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "api_key_usage_daily": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "conversations": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "conversation_messages": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "conversation_turns": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "rate_limit_quota_usage": ("SELECT", "INSERT", "UPDATE", "DELETE"),
}


#: What an operator reads in SQLite's error names (Python's sqlite3 gives them since 3.11) when a
#: file refuses writes: its own message ("disk I/O error") does not say where to look.
_SQLITE_HINTS = (
    ("SQLITE_READONLY", "the database file (or its folder, for the journal files) is read-only for this process"),
    ("SQLITE_FULL", "the disk is full"),
    ("SQLITE_IOERR_SHMSIZE", "the shared-memory file (-shm) next to the database cannot be made: the disk is "
                             "full, or read-only"),
    ("SQLITE_IOERR", "the disk refused a read or write: full, over a file size limit (ulimit -f), read-only "
                     "(a file system remounted so after errors), or failing"),
    ("SQLITE_CANTOPEN", "the file cannot be opened (missing folder, permissions, too many open files)"),
    ("SQLITE_CORRUPT", "the database file is damaged"),
    ("SQLITE_NOTADB", "the file is not an SQLite database"),
    ("SQLITE_PERM", "the operating system denied access"),
)


def store_error(e: BaseException) -> tuple[str, bool]:
    """A short text saying why the database failed, safe to log and to show on /readyz (never a
    driver message that could quote a connection URL), and whether it is SQLite refusing the file
    itself (a fix of the file or disk is needed; a retry alone will not do)."""
    orig = getattr(e, "orig", None) or e
    name = getattr(orig, "sqlite_errorname", None)
    if isinstance(name, str) and type(orig).__module__ == "sqlite3":
        for prefix, hint in _SQLITE_HINTS:
            if name.startswith(prefix):
                # (cannot open: also too many open files for a moment, which a retry can outlast)
                return f"{name}: {hint}", prefix != "SQLITE_CANTOPEN"
        return f"{name}: {str(orig)[:120]}", False
    # PostgreSQL (asyncpg, under SQLAlchemy's adapter whose class is a bare "Error"): the driver's
    # exception class and the SQLSTATE say why (ReadOnlySQLTransactionError, 25006) without quoting
    cause = orig.__cause__
    state = getattr(orig, "sqlstate", None) or getattr(cause, "sqlstate", None)
    if isinstance(state, str) and state.isalnum() and len(state) == 5:
        named = cause if cause is not None and getattr(cause, "sqlstate", None) == state else orig
        return f"{type(named).__name__} (SQLSTATE {state})", False
    if isinstance(orig, OSError) and isinstance(orig.errno, int) and orig.errno in errno.errorcode:
        # a file a sink writes (the audit's jsonl): ENOSPC, EROFS or EACCES says where to look
        return f"{type(orig).__name__} ({errno.errorcode[orig.errno]}: {os.strerror(orig.errno)})", False
    return type(orig).__name__, False


def _shm_in_use(path: str) -> bool:
    """Does a process have this SQLite -shm file open? Every connection in WAL mode holds a shared
    lock on its byte 128 (SQLite's "dead man switch"), so an exclusive one cannot be had then."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False  # (none, or not ours to open: no connection of this process uses it either)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
    except OSError:
        return True
    finally:
        os.close(fd)  # (the lock with it)
    return False


def sqlite_hint(e: BaseException) -> str:
    """`` (SQLITE_FULL: the disk is full)`` for an SQLite error that names its cause, else ``""``:
    appended to a start-up or CLI failure, whose own text ("disk I/O error") says nothing of it."""
    orig = getattr(e, "orig", None) or e
    if type(orig).__module__ == "sqlite3" and isinstance(getattr(orig, "sqlite_errorname", None), str):
        return f" ({store_error(e)[0]})"
    return ""


class DatabaseFileGone(DatabaseError, OSError):
    """The SQLite file the gateway opened is no longer at its path."""


class Database:
    def __init__(self, url: str, *, busy_timeout_ms: int = 5000, pool_size: int = 10, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.busy_timeout_ms = busy_timeout_ms
        options = engine_options(url)
        #: seconds a PostgreSQL server may take to connect, and (at start-up) to answer the checks
        self.connect_timeout: float = options.get("connect_args", {}).get("timeout", CONNECT_TIMEOUT)
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": not self.is_sqlite, **options}
        if not self.is_sqlite:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        #: the SQLite file (absolute), and the (device, inode) it had when first opened
        self.file: str | None = None
        self._file_id: tuple[int, int] | None = None
        self._file_gone_logged = False
        self._file_replaced_logged = False
        self._ping_failing_since: float | None = None
        self._ping_task: asyncio.Task[bool] | None = None
        self._ping_started = 0.0
        self._watch: asyncio.Task[None] | None = None
        self._emptying: asyncio.Task[bool] | None = None
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", self._sqlite_pragmas)
            name = self.engine.url.database
            if name and name != ":memory:" and not name.startswith("file:"):
                self.file = os.path.abspath(name)
                event.listen(self.engine.sync_engine, "do_connect", self._before_connect)
                event.listen(self.engine.sync_engine, "checkout", self._on_checkout)
        event.listen(self.engine.sync_engine, "handle_error", _readonly_reconnects)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        #: Connections that long reads (a conversation's history) may hold at once, of the pool's
        #: (SQLite: 4 of 5 + 10 overflow; PostgreSQL: pool_size of twice that): the others stay free for the
        #: short lookups every request makes (its key, its quota). Under load, reads of histories
        #: took every connection, and key lookups timed out behind them (503 for valid keys).
        self._long_reads = asyncio.Semaphore(LONG_READS if self.is_sqlite else pool_size)

    @contextlib.asynccontextmanager
    async def long_read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for a read that may take a while, one of a bounded number."""
        async with self._long_reads:
            async with self.engine.connect() as conn:
                yield conn

    # A SQLite file deleted or replaced under a running gateway: connections already open would go
    # on writing into the deleted file (every row lost at exit, with /readyz saying ready), or
    # into the old one. Each checkout compares the path with the file opened at start: gone (or
    # another file there) fails, the same file moved back is used again.
    def _before_connect(self, *_: Any) -> None:
        if self._file_id is None:
            create_private(self.file or "")
        else:
            now = self._file_stat()
            if now is None:
                self._gone()  # do not create an empty database in its place
            if now != self._file_id:
                self._replaced()

    def _file_stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.file or "")
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _on_checkout(self, _dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        now = self._file_stat()
        if now is None:
            self._gone()
        if now != self._file_id:
            # Another file at the path (a backup put back, a copy moved over it). Opened next to
            # the write-ahead log (-wal) the running connections keep at the same path, it would be
            # read with that log applied: a corrupted database. Refused until a restart.
            self._replaced()
        if self._file_gone_logged:
            log.warning("the SQLite file %s is back; writes resume", self.file)
            self._file_gone_logged = False

    def _replaced(self) -> None:
        if not self._file_replaced_logged:
            log.error("the SQLite file %s was replaced by another file while the gateway ran: it is not used "
                      "(opened next to this process's write-ahead log it would be corrupted); writes fail and "
                      "are counted, and /readyz says not ready. To use it (a restored backup): restart the "
                      "gateway (as it stops it sets %s-wal and %s-shm, the old file's, aside; see "
                      "docs/configuration.md, The SQLite file)", self.file, self.file, self.file)
            self._file_replaced_logged = True
        raise DatabaseFileGone(f"the SQLite file {self.file} was replaced while the gateway ran")

    def _gone(self) -> None:
        if not self._file_gone_logged:
            log.error("the SQLite file %s is gone (deleted or moved): writes fail and are counted, and "
                      "/readyz says not ready, until it is back", self.file)
            self._file_gone_logged = True
        raise DatabaseFileGone(f"the SQLite file {self.file} is gone")

    def _sqlite_pragmas(self, dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        # A WAL grown large once (a burst of writes while a long read held it) is cut back to this
        # at the next checkpoint; otherwise the file keeps its largest size for good.
        cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        # Deleted rows are overwritten with zeros, not left readable in the file's free space (an
        # erased conversation's text; SQLite's own default is off, some builds turn it on).
        cur.execute("PRAGMA secure_delete=ON")
        cur.close()
        if self.file is not None and self._file_id is None:
            self._file_id = self._file_stat()  # the file this process uses for good

    def empty_log_soon(self) -> None:
        """After an erasure, on SQLite: copy the write-ahead log into the file and empty it, so the
        deleted rows leave no copy in the ``-wal`` file (where the pages that held them stay until
        the log wraps round, on a quiet gateway for good). In the background, never holding back
        the delete that asked for it or any other writer: each try gives way at once to a reader
        holding an older snapshot (a backup, an export, a sqlite3 shell) or a writer, and is
        repeated every second for a minute (``close()`` makes a last one)."""
        if not self.is_sqlite or (self._emptying is not None and not self._emptying.done()):
            return
        self._emptying = asyncio.get_running_loop().create_task(self._empty_log())

    async def _empty_log(self, tries: int = EMPTY_LOG_TRIES) -> bool:
        why = ""
        for _ in range(tries):
            why = await self._checkpoint()
            if not why:
                return True
            await asyncio.sleep(1.0)
        self._not_emptied(f"{why}, for a minute")
        return False

    def _not_emptied(self, why: str) -> None:
        log.warning("the SQLite write-ahead log could not be emptied after a delete (%s): the deleted rows' text "
                    "stays on disk (in %s-wal, or in the database file's pages the log would replace) until a "
                    "checkpoint (PRAGMA wal_checkpoint(TRUNCATE) when nothing reads the file, or the last "
                    "connection closing)", why, self.file)

    async def _checkpoint(self) -> str:
        """One try at emptying the log, waiting for no lock (busy_timeout 0 on its connection): ""
        when done, else why not."""
        try:
            async with self.engine.connect() as conn:
                await conn.exec_driver_sql("PRAGMA busy_timeout=0")
                try:
                    row = (await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")).first()
                finally:
                    await conn.exec_driver_sql(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:200]}"
        return "" if row is not None and not row[0] else "a read or a write held the file"

    def session(self) -> AsyncSession:
        return self.sessionmaker()

    @contextlib.asynccontextmanager
    async def connect(self) -> Any:
        """A connection for start-up and CLI checks. On PostgreSQL a failure to connect is a
        DatabaseUnreachable naming the database (not a bare ``TimeoutError`` or "Connect call
        failed" that does not say what could not be reached)."""
        conn = self.engine.connect()
        try:
            if self.is_sqlite:
                await conn.start()
            else:  # (the driver's timeout covers the connection; the dialect's first queries follow it)
                async with asyncio.timeout(self.connect_timeout):
                    await conn.start()
        except DatabaseError:
            raise
        except Exception as e:
            if self.is_sqlite:
                raise
            err = unreachable(self.url, e)
            if "prepared statement" in str(e):  # (SQLSTATE 42P05 / 26000 on the first statement)
                err = DatabaseUnreachable(f"{err} (a connection pooler in transaction mode, such as PgBouncer's "
                                          "pool_mode=transaction? The gateway needs session pooling: "
                                          "see docs/configuration.md)")
            raise err from None
        try:
            yield conn
        finally:
            await conn.close()

    async def check(self) -> dict[str, Any]:
        """Connect and, for SQLite, read the pragmas back and check the file can be written; for
        PostgreSQL, check the role may use the gateway's tables. Raises if not."""
        async with self.connect() as conn:
            if not self.is_sqlite:
                # Connected is not answered: a pooler (PgBouncer) accepts the connection at once and
                # may queue the first query for minutes when it has no free server connection.
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        await conn.execute(text("SELECT 1"))
                        await self._check_privileges(conn)
                except TimeoutError:
                    raise DatabaseUnreachable(
                        f"database {shown_url(self.url)} accepted the connection but did not answer a query "
                        f"within {self.connect_timeout:g}s (a connection pooler with no free server "
                        "connection?)") from None
                return {}
            await conn.execute(text("SELECT 1"))
            got = {
                "journal_mode": (await conn.execute(text("PRAGMA journal_mode"))).scalar(),
                "busy_timeout": (await conn.execute(text("PRAGMA busy_timeout"))).scalar(),
                "synchronous": (await conn.execute(text("PRAGMA synchronous"))).scalar(),
            }
            await self._check_writable(conn)
        want = {"journal_mode": "wal", "busy_timeout": self.busy_timeout_ms, "synchronous": 1}
        if str(got["journal_mode"]).lower() != "wal" or got["busy_timeout"] != want["busy_timeout"] \
                or got["synchronous"] != 1:
            raise DatabaseError(f"SQLite pragmas not applied: got {got}, want {want}")
        return got

    async def _check_privileges(self, conn: Any) -> None:
        """PostgreSQL: the rights the gateway needs on each of its tables there, and USAGE on the
        sequences their serial columns draw ids from, in one query. A role that may only connect
        (the schema migrated by its owner, no grants to the gateway's role) would otherwise start
        "ready" and fail every request that reads a key or writes a record; one granted the tables
        but not their sequences would fail every conversation write ("permission denied for
        sequence"), which the writer retries for ever, storing nothing.

        Only sequences a serial column owns (``pg_depend`` deptype 'a') are checked: PostgreSQL
        does not check privileges on an identity column's sequence (deptype 'i'), so requiring a
        grant there would refuse a role that works. UPDATE lets ``nextval`` run as USAGE does."""
        pairs = [(t, p) for t, privs in TABLE_PRIVILEGES.items() for p in privs]
        rows = (await conn.execute(text(
            "WITH w(tbl, priv) AS (SELECT * FROM unnest(CAST(:tables AS text[]), CAST(:privs AS text[]))), "
            "t AS (SELECT DISTINCT c.oid, c.relname, w.priv FROM w "
            "JOIN pg_class c ON c.oid = to_regclass(quote_ident(w.tbl))) "
            "SELECT relname, priv, 0 AS kind FROM t WHERE NOT has_table_privilege(oid, priv) "
            "UNION ALL "
            "SELECT DISTINCT s.relname, 'USAGE', 1 FROM pg_depend d "
            "JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
            "WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass "
            "AND d.deptype = 'a' AND d.refobjid IN (SELECT oid FROM t) "
            # (in a CASE: the planner may test a row before the relkind filter, and an index is no sequence)
            "AND CASE WHEN s.relkind = 'S' THEN NOT has_sequence_privilege(s.oid, 'USAGE, UPDATE') END "
            "ORDER BY 3, 1, 2"),
            {"tables": [t for t, _ in pairs], "privs": [p for _, p in pairs]})).all()
        if rows:
            missing: dict[str, list[str]] = {}
            for name, priv, _kind in rows:
                missing.setdefault(name, []).append(priv)
            user = (await conn.execute(text("SELECT current_user"))).scalar()
            raise DatabaseError(f"the database role {user} lacks privileges on the gateway's tables and their "
                                "sequences: " + "; ".join(f"{t}: {', '.join(p)}" for t, p in missing.items())
                                + " (GRANT them to this role, or run the gateway as the role that owns the tables)")

    async def _check_writable(self, conn: Any) -> None:
        """A write that is rolled back: SQLite opens a file it may not write read-only, and such a
        connection refuses it (the pragmas above read back fine)."""
        try:
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
            await conn.exec_driver_sql("CREATE TABLE gateway_write_probe (x INTEGER)")
        except Exception as e:
            if "readonly" in str(e):
                raise DatabaseError(f"the SQLite file {self.file or self.url} cannot be written (a read-only "
                                    "file or directory, or another user's file)") from None
            if "locked" in str(e):  # another process writes for longer than busy_timeout: not ours to fail
                log.warning("the SQLite file %s is locked by another process; starting without checking "
                            "that it can be written", self.file or self.url)
                return
            raise
        finally:
            with contextlib.suppress(Exception):
                await conn.exec_driver_sql("ROLLBACK")

    async def ping(self, timeout: float = 2.0) -> bool:
        """Does the database answer a read (within ``timeout``)?"""
        try:
            async with asyncio.timeout(timeout):
                async with self.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def answers(self, wait: float = 0.5) -> bool:
        """/readyz's database check: does it answer a read? Waits at most ``wait`` seconds (a
        database that hangs keeps the probe answering in time; the read goes on in the background,
        one at a time however many probes come). After a failure the database is read again every
        second until it answers, so ``failing_for`` counts one outage, from the start of its first
        failed read, and is 0 again as soon as the database is back, probed or not."""
        task = self._ping_task
        if task is None or task.done():
            self._ping_started = time.monotonic()
            task = self._ping_task = asyncio.create_task(self._ping_until_back(), name="db:ping")
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            return False

    async def _ping_until_back(self) -> bool:
        started = self._ping_started
        if await self.ping():
            self._ping_failing_since = None
            return True
        if self._ping_failing_since is None:
            self._ping_failing_since = started
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_until_back(), name="db:watch")
        return False

    async def _watch_until_back(self) -> None:
        while self._ping_failing_since is not None:
            await asyncio.sleep(1.0)
            if await self.ping():
                self._ping_failing_since = None

    def failing_for(self) -> float:
        """Seconds the database has not answered: since the start of the first read that failed
        (or has not answered yet), 0 once one answers."""
        since = self._ping_failing_since
        task = self._ping_task
        if since is None and task is not None and not task.done():
            since = self._ping_started
        return 0.0 if since is None else time.monotonic() - since

    async def pending_migrations(self) -> list[str]:
        """The migration heads this database has not reached (empty: the schema is current, or
        newer than this version of the gateway knows: another instance upgraded it first)."""
        heads, known = await asyncio.to_thread(revisions_sync, self.url)
        applied = await self.applied_revisions()
        if newer_revisions(applied, known, self.url):
            log.warning("the database schema has migrations this version does not know (a newer gateway "
                        "upgraded it); starting anyway")
            return []
        return sorted(set(heads) - applied)

    async def applied_revisions(self) -> set[str]:
        """The migration revisions recorded in the database (none for an empty one)."""
        async with self.connect() as conn:
            has = await conn.run_sync(lambda c: inspect(c).has_table("alembic_version"))
            return set() if not has else {r[0] for r in await conn.execute(text("SELECT version_num FROM alembic_version"))}

    async def upgrade(self) -> list[str]:
        """Apply every migration branch up to its head; returns the heads now applied. A schema a
        newer gateway already migrated further is left as it is (this version cannot read its
        revisions, and an older schema is all it needs: migrations only add)."""
        heads, known = await asyncio.to_thread(revisions_sync, self.url)
        applied = await self.applied_revisions()
        if newer_revisions(applied, known, self.url):
            log.warning("the database schema has migrations this version does not know (%s: a newer gateway "
                        "upgraded it); not migrating", ", ".join(sorted(applied - known)))
            return sorted(applied)
        if set(heads) <= applied:
            return sorted(heads)  # nothing to do: no lock to take (another gateway may hold it)
        # The wait for the lock on a daemon thread: a stop while another process holds it must not
        # hold the process's exit. The migration itself on the default executor, which the exit
        # waits for (it runs in one transaction, see migrations/env.py, so even a cut one leaves
        # the database as it was; finishing it is still quicker for the next start).
        if not self.is_sqlite:
            # PostgreSQL runs each migration in a transaction (a cut one rolls back): all of it on a
            # daemon thread, so a stop while another instance holds the advisory lock goes ahead.
            return await in_daemon_thread(upgrade_sync, self.url)
        lock = await in_daemon_thread(migration_lock, self.url)
        return await asyncio.to_thread(_upgrade_holding, self.url, lock)

    async def close(self, timeout: float = 5.0) -> None:
        for t in (self._ping_task, self._watch):
            if t is not None and not t.done():
                t.cancel()
        try:
            async with asyncio.timeout(timeout):  # a hung server must not hold the exit
                t = self._emptying
                if t is not None and not t.done():
                    # Its try under way ends first (its connection back in the pool before the pool
                    # is disposed of), then the last one (a CLI's delete: before it exits).
                    t.cancel()
                    await asyncio.wait({t})
                    why = await self._checkpoint()
                    if why:
                        self._not_emptied(why)
                await self.engine.dispose()
        except TimeoutError:
            log.warning("database connections not closed cleanly within %.0fs", timeout)
        if self.file is not None and self._file_id is not None and self._file_stat() not in (None, self._file_id):
            # (a file gone is left as it is: moved back, it is used again with its log)
            self._set_aside_log()

    def _set_aside_log(self) -> None:
        """The file was replaced while this process ran (a backup moved over it): the -wal and -shm
        files at its path are the old file's, and whatever opened the new one next to them (the
        next start, a CLI command) would apply that log to it: a corrupted database. They are
        renamed aside, so a restart is all a restored backup needs."""
        if _shm_in_use(f"{self.file}-shm"):
            # Another process has them open (a second gateway on the file, restarted on the new
            # file already, or a CLI command): they are its live log, not this process's old one.
            log.warning("the SQLite file %s was replaced while the gateway ran; its -wal and -shm files are in "
                        "use by another process, so they are left as they are", self.file)
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("-wal", "-shm"):
            path = f"{self.file}{suffix}"
            aside = f"{path}.replaced-{stamp}"
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.error("the SQLite file %s was replaced while the gateway ran, and %s, which belongs to the "
                          "file that was there before, could not be set aside (%s): delete it before the next "
                          "start, or the new file is corrupted", self.file, path, e.strerror or e)
                continue
            log.warning("the SQLite file %s was replaced while the gateway ran: %s, which belongs to the file "
                        "that was there before (its writes since the last checkpoint), is set aside as %s; the "
                        "new file is used at the next start", self.file, path, aside)


#: Rows per multi-row INSERT on SQLite. SQLite keeps every statement text it compiled (the driver
#: caches 128 per connection, about 1.5 KB per row of a multi-row INSERT): a statement per batch
#: size made the cache, and the process, grow by tens of MB per connection over hours. Batches are
#: cut into statements of these sizes only, a few texts per table.
ROW_CHUNKS = (256, 64, 16, 4, 1)


def row_chunks(n: int, most: int = ROW_CHUNKS[0]) -> Iterator[tuple[int, int]]:
    """(first row, rows) of each INSERT for ``n`` rows, rows from ROW_CHUNKS, at most ``most``."""
    i = 0
    while i < n:
        k = next(c for c in ROW_CHUNKS if c <= n - i and c <= most or c == 1)
        yield i, k
        i += k


def sqlite_place_problem(url: str) -> str | None:
    """Why a SQLite file that does not exist yet cannot be made where ``url`` says (its folder is
    missing, or this user cannot write it), naming the path; None if it exists or can be made. (SQLite
    itself only says "unable to open database file".)"""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    path = os.path.abspath(name)
    if os.path.exists(path):
        return None
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        return f"the SQLite file {path} cannot be made: its folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the SQLite file {path} cannot be made: this user cannot write its folder {folder}"
    return None


def create_private(path: str) -> bool:
    """Make a new file readable and writable by its owner only (0600, whatever the umask): the
    database holds key hashes and conversations, the audit trail and exports hold who asked what.
    SQLite gives its -wal and -shm files the database file's mode. False if the file exists (its
    mode is kept) or cannot be made here (what opens it next says why)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    # (the versions are in the script location's own ``versions``: no ``version_locations``, a
    # list that Alembic splits on spaces and commas, which an install path may hold)
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["url"] = url
    return cfg


# Alembic keeps its migration context in module globals: two runs at once in one process (each
# Database.upgrade() runs in its own thread) would use each other's connections and hang or fail.
_ALEMBIC = threading.Lock()


def upgrade_sync(url: str, locked: bool = False) -> list[str]:
    """Apply every migration branch up to its head (``locked``: the caller holds the SQLite
    migration lock already, see :func:`migration_lock`)."""
    from alembic import command
    from alembic.script import ScriptDirectory

    cfg = alembic_config(url)
    with _ALEMBIC, (contextlib.nullcontext() if locked else _sqlite_file_lock(url)):
        command.upgrade(cfg, "heads")
    return sorted(ScriptDirectory.from_config(cfg).get_heads())


def _upgrade_holding(url: str, lock: Any) -> list[str]:
    """Migrate, then release the lock taken for it (here, so a cancelled caller cannot release it
    while the migration still runs)."""
    try:
        return upgrade_sync(url, locked=True)
    finally:
        if lock is not None:
            lock.close()


#: Seconds a migration waits for another process's migration lock before giving up.
MIGRATION_LOCK_WAIT = 120.0


def migration_lock(url: str) -> Any:
    """Take the SQLite migration lock: an exclusive flock on a lock file next to the database
    (``<file>.lock``), which several gateways started at once on one new file need (each would
    create the tables: "table ... already exists"). Returns the open lock file (close it to
    release), or None where there is none to take (PostgreSQL takes an advisory lock in
    migrations/env.py; an in-memory database; a directory that cannot be written). Never a lock on
    the database file itself: SQLite's locks are POSIX record locks, which the process loses on
    *every* descriptor of the file when any one of them is closed, so opening and closing the
    database file here would silently drop the locks of the connections this process has open (and
    corrupt what they see). Waits up to MIGRATION_LOCK_WAIT, saying what it waits for."""
    from sqlalchemy.engine import make_url

    name = make_url(url).database if url.startswith("sqlite") else None
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    import fcntl

    lock = name + ".lock"
    try:
        f = open(lock, "ab")
    except OSError as e:  # a directory that cannot be written: nothing can be migrated in it either
        log.warning("migrating without the lock file %s (%s): start one gateway at a time on a new database",
                    lock, e.strerror or type(e).__name__)
        return None
    deadline = time.monotonic() + MIGRATION_LOCK_WAIT
    waited = False
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f  # (closing the file releases the lock)
        except BlockingIOError:
            if not waited:
                log.warning("waiting for the migration lock %s (another gateway or `gateway db upgrade` "
                            "holds it)", lock)
                waited = True
            if time.monotonic() > deadline:
                f.close()
                raise DatabaseError(f"the migration lock {lock} was held by another process for "
                                    f"{MIGRATION_LOCK_WAIT:g}s; is a migration stuck?") from None
            time.sleep(0.1)


@contextlib.contextmanager
def _sqlite_file_lock(url: str) -> Iterator[None]:
    f = migration_lock(url)
    try:
        yield
    finally:
        if f is not None:
            f.close()


def revisions_sync(url: str) -> tuple[list[str], set[str]]:
    """(the migration heads, every revision) this version of the gateway has."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(url))
    return sorted(script.get_heads()), {r.revision for r in script.walk_revisions()}


def current_sync(url: str) -> list[str]:
    from alembic import command

    cfg = alembic_config(url)
    out: list[str] = []
    cfg.print_stdout = lambda msg, *a: out.append(msg % a if a else msg)  # type: ignore[method-assign]
    with _ALEMBIC:
        command.current(cfg)
    return out
