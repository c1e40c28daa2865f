"""The ``audit_events`` table: chained appends, retention purge, queries and the verify walk.

Appends are serialised across every gateway instance sharing the database: on PostgreSQL with
``pg_advisory_xact_lock`` inside the write transaction, on SQLite with ``BEGIN IMMEDIATE`` (the
database's single write lock). The chain head is read inside the same transaction, so two
instances can never both chain onto the same row.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import re
import sqlite3
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence

from sqlalchemy import BigInteger, Column, Index, Integer, bindparam, Numeric, String, Table, Text, case, delete, func, select, text
from sqlalchemy import cast as sa_cast
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.db import Base, Database, row_chunks
from gateway.logs import ThrottledLog

from .chain import (GENESIS, INDEXED, KEY_EVENT, ChainKeys, VerifyResult, _col_value, check_heads, key_id, record_body,
                    record_text, signer, utf8_safe, verify_rows)
from .events import build, iso

__all__ = ["append", "events", "head", "iso", "iter_rows", "purge", "query", "snapshot", "top", "verify"]

LOCK_ID = 0x6175646974  # "audit"
#: Chain problems the writer meets (said at most once per 10 s, with a count)
ERRORS = ThrottledLog(logging.getLogger("gateway.audit"))

events = Table(
    "audit_events", Base.metadata,
    # SQLite: INTEGER, so seq is the rowid (audit_0002). As BIGINT the table had a hidden rowid of its
    # own: every secondary index carried that, and a filtered page ordered by seq sorted every match.
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=False),
    Column("time", String(32), nullable=False, index=True),
    Column("type", String(64), nullable=False),
    Column("request_id", String(128)),
    Column("key_id", String(128), index=True),
    Column("owner", String(256), index=True),
    Column("client_ip", String(64)),
    Column("status", Integer),
    Column("data", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # (the newest event of a type, read by every write, is one probe of it: audit_0003)
    Index("ix_audit_events_type_seq", "type", "seq"),
)


@asynccontextmanager
async def _sqlite_transaction(conn: AsyncConnection, begin: str, commit: bool) -> AsyncIterator[AsyncConnection]:
    """A SQLite transaction begun by hand (the driver begins one lazily, at the first write):
    ``BEGIN IMMEDIATE`` takes the write lock up front, ``BEGIN`` holds one read snapshot across
    queries. Ends with COMMIT (``commit``) or ROLLBACK; rolled back on any error."""
    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
    await conn.exec_driver_sql(begin)
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(Exception):
            await conn.exec_driver_sql("ROLLBACK")
        raise
    await conn.exec_driver_sql("COMMIT" if commit else "ROLLBACK")


@asynccontextmanager
async def locked(db: Database) -> AsyncIterator[AsyncConnection]:
    """A write transaction holding the audit append lock."""
    async with db.engine.connect() as conn:
        if db.is_sqlite:
            async with _sqlite_transaction(conn, "BEGIN IMMEDIATE", commit=True) as c:
                yield c
        else:
            async with conn.begin():
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_ID})
                yield conn


@asynccontextmanager
async def snapshot(db: Database) -> AsyncIterator[AsyncConnection]:
    """A read transaction: every query on it sees the trail as it was at its first read, so a
    purge (or appends) committed meanwhile cannot show up as a gap in what is read page by page.
    SQLite: one deferred transaction (WAL readers keep their snapshot); PostgreSQL: REPEATABLE READ."""
    async with db.engine.connect() as conn:
        if db.is_sqlite:
            async with _sqlite_transaction(conn, "BEGIN", commit=False) as c:
                yield c
        else:
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                yield conn


async def _head(conn: AsyncConnection) -> tuple[int, str]:
    row = (await conn.execute(select(events.c.seq, events.c.hash).order_by(events.c.seq.desc()).limit(1))).first()
    if row is None:
        return 0, GENESIS
    return int(row.seq), row.hash


async def _head_rank(conn: AsyncConnection, keys: tuple[bytes, ...]) -> int | None:
    """chain.signer of the newest row; -1 without one."""
    row = (await conn.execute(select(events.c.prev_hash, events.c.hash, events.c.data)
                              .order_by(events.c.seq.desc()).limit(1))).first()
    return -1 if row is None else signer(row.prev_hash, row.data, row.hash, keys)


def key_event(mine: str, previous: str) -> dict[str, Any]:
    """The ``audit.chain_key`` event a key's first row is: a first key (``previous``: none) or a
    new one (``previous``: the id of the key that signed before). The first signed row after
    unsigned ones is always this event (verify checks it)."""
    return {"time": iso(), "type": KEY_EVENT, "actor": "system", "chain_key_id": mine,
            "previous_chain_key_id": previous}


async def _key_info(conn: AsyncConnection) -> tuple[str, str] | None:
    """(key id, the previous key's id) of the newest event that names the key signing the trail:
    an ``audit.chain_key`` event, or a signed purge's ``audit.purged`` (which carries its key's id:
    retention deletes old key events like any row). None: the trail was never signed."""
    best: tuple[int, tuple[str, str]] | None = None
    for t in (KEY_EVENT, "audit.purged"):
        # The newest of each type by MAX(seq) on the (type, seq) index: one index probe, whatever
        # the planner's statistics say and in PostgreSQL's generic plan of the prepared statement
        # (an IN (...) ORDER BY seq DESC LIMIT n scanned the table; so did this on an index of
        # type alone, in the generic plan, on a trail without the type).
        # The type is written into the statement, not bound: PostgreSQL plans a prepared statement
        # once for any value after five runs, and for "any type" its statistics (a trail of
        # requests) can make a backward scan of the whole primary key look cheapest.
        seq = (await conn.execute(select(func.max(events.c.seq)).where(
            events.c.type == bindparam("type", t, literal_execute=True)))).scalar()
        if seq is None or (best is not None and best[0] > seq):
            continue
        data = (await conn.execute(select(events.c.data).where(events.c.seq == seq))).scalar()
        try:
            d = json.loads(data or "")
        except ValueError:
            continue
        kid = d.get("chain_key_id") if isinstance(d, dict) else None
        if isinstance(kid, str):
            prev = d.get("previous_chain_key_id")
            best = (int(seq), (kid, prev if isinstance(prev, str) else "none"))
    return best[1] if best is not None else None


COLUMNS = ("seq", *INDEXED, "data", "prev_hash", "hash")


def _cut(v: Any, n: int) -> Any:
    """How a string field is stored in its indexed column (see chain._col_value)."""
    if v is None:
        return None
    return v if type(v) is str and len(v) <= n and v.isascii() else utf8_safe(str(v)[:n])


def prepare(item: Any) -> tuple[tuple[Any, ...], str]:
    """A queued item -> its indexed column values (INDEXED order) and its record body.

    Done before the append lock is taken: under the lock only ``seq`` and the hashes remain."""
    if isinstance(item, dict):
        return tuple(_col_value(c, item.get(c)) for c in INDEXED), record_body(item, sort=True)
    ev = build(item)
    status = ev["status"]
    cols = (ev["time"], ev["type"], _cut(ev["request_id"], 128), _cut(ev["key_id"], 128), _cut(ev["owner"], 256),
            _cut(ev["client_ip"], 64), status if type(status) is int else None)
    return cols, record_body(ev)


@functools.lru_cache(maxsize=64)
def _insert_text(style: str, rows: int) -> str:
    marks = [f"${i}" if style == "numeric_dollar" else ("?" if style == "qmark" else "%s")
             for i in range(1, len(COLUMNS) + 1)]
    one = f"({', '.join(marks)})"
    return f"INSERT INTO audit_events ({', '.join(COLUMNS)}) VALUES {', '.join([one] * rows)}"


def _insert_sql(conn: AsyncConnection, rows: int = 1) -> str:
    # Plain driver SQL with positional parameters: the hot path skips SQLAlchemy's per-row
    # parameter processing (the table definition above stays the source of truth for columns).
    return _insert_text(conn.dialect.paramstyle, rows)


#: SQLite: rows per INSERT statement (within SQLITE_MAX_VARIABLE_NUMBER).
_SQLITE_ROWS = (999 if sqlite3.sqlite_version_info < (3, 32, 0) else 32000) // len(COLUMNS)


async def _append(conn: AsyncConnection, prepared: Sequence[tuple[tuple[Any, ...], str]],
                  head: tuple[int, str] | None = None, keys: tuple[bytes, ...] = (),
                  head_rank: int | None = -2, chain: ChainKeys | None = None,
                  key_info: Any = "read", introduce: str = "never") -> tuple[int, str] | None:
    """Chain ``prepared`` rows after ``head`` (read here if not given), signed with ``keys[0]``,
    first a key event (in the database only) when this key is new to the trail. Under the append
    lock: instances starting with a key at once write one such event between them. (A purge
    gives ``head_rank`` and ``key_info`` as they were before it deleted rows.)

    - The trail was never signed (no key named by an event) and its newest row is unsigned (or
      there is none): a first key, where ``introduce`` allows it: a gateway (``always``), a CLI
      command on the database it has just created (``new``). A CLI command on a trail not yet
      signed (``new``, ``refuse``) raises NotSignedYet instead: a gateway with the key signs it
      first. (A command run on a trail someone emptied or replaced must not vouch for it.)
    - The newest row is unsigned but the trail was signed (or this process saw it signed, ``chain``):
      unsigned rows were put on it, or its signed rows deleted; no key event is written to pass
      that off as a first key (verify reports it), an error is logged.
    - The key named last is another one and does not name this one as its previous: a new key
      (a rotation). An instance still on the previous key while the others roll over (the key
      named last names it as previous) writes none: one event per rotation."""
    key = keys[0] if keys else None
    if key is not None:
        rank = await _head_rank(conn, keys) if head_rank == -2 else head_rank
        info = await _key_info(conn) if key_info == "read" else key_info
        mine = key_id(key)
        if rank in (-1, len(keys)):
            if info is None and not (chain is not None and chain.seen_signed) and introduce != "never":
                if not (introduce == "always" or (introduce == "new" and rank == -1)):
                    raise NotSignedYet()
                prepared = [prepare(key_event(mine, "none")), *prepared]
            else:
                ERRORS.event("replaced", 1, "audit: the newest row of the chain is not signed with a chain key here "
                                            "(unsigned rows were added, or the signed rows deleted, or the trail "
                                            "was emptied); run `gateway audit verify` (%d time(s))")
        elif info is None or mine not in info:
            prepared = [prepare(key_event(mine, info[0] if info is not None else "unknown")), *prepared]
        if chain is not None:
            chain.seen_signed = True
    seq, prev = head if head is not None else await _head(conn)
    sha256, digest = hashlib.sha256, hmac.digest
    rows = []
    for cols, body in prepared:
        seq += 1
        data = record_text(seq, body)
        msg = (prev + data).encode()
        h = digest(key, msg, "sha256").hex() if key else sha256(msg).hexdigest()  # chain.row_hash
        rows.append((seq, *cols, data, prev, h))
        prev = h
    if not rows:
        return None
    if conn.dialect.name != "sqlite":
        await conn.exec_driver_sql(_insert_sql(conn), rows)  # asyncpg pipelines an executemany
        return seq, prev
    # SQLite: many rows per statement, one sqlite3_step for all of them. An executemany steps once
    # per row, and the driver thread takes the GIL back from the event loop between rows.
    for i, k in row_chunks(len(rows), _SQLITE_ROWS):
        part = rows[i:i + k]
        await conn.exec_driver_sql(_insert_sql(conn, k), tuple(v for r in part for v in r))
    return seq, prev


class NotSignedYet(Exception):
    """A CLI command with a chain key on a trail no gateway has signed yet."""

    def __init__(self) -> None:
        super().__init__("the audit trail is not signed with the chain key yet: start the gateway with "
                         "audit.chain_key first (it writes the trail's first signed event), then run this command")


class ChainSigned(Exception):
    """A writer without a chain key found a signed trail (unsigned rows after signed ones would
    break it)."""

    def __init__(self) -> None:
        super().__init__("the audit trail is signed with a chain key (an event names its key) and this "
                         "gateway has none: set audit.chain_key (e.g. the GATEWAY_AUDIT_CHAIN_KEY variable) to the "
                         "key the other instances use; unsigned rows after signed ones would break the chain")


async def _signed(conn: AsyncConnection) -> bool:
    return await _key_info(conn) is not None


async def signed_trail(db: Database) -> bool:
    """Is the trail signed (an event names its key: an ``audit.chain_key`` or a signed purge's)?"""
    async with db.engine.connect() as conn:
        return await _signed(conn)


async def append(db: Database, batch: Sequence[Any], keys: tuple[bytes, ...] = (),
                 chain: ChainKeys | None = None, introduce: str = "never") -> tuple[int, str] | None:
    """Chain and insert a batch of queued items (captured request tuples or event dicts), signed
    with ``keys[0]`` (the chain key; none: plain SHA-256). Without a key, on a trail that another
    instance signs, raises ChainSigned (the writer retries, then counts what it drops). Returns the
    (seq, hash) of the newest row written (None: none was)."""
    prepared = [prepare(x) for x in batch]
    async with locked(db) as conn:
        if not keys and await _signed(conn):
            raise ChainSigned()
        return await _append(conn, prepared, keys=keys, chain=chain, introduce=introduce)


#: Rows a purge deletes per transaction: the write lock (SQLite's, or the append lock) is held
#: for one chunk at a time, not for the whole purge.
PURGE_CHUNK = 5000
#: Least pause between two chunks, seconds. SQLite's busy handler is no queue: a writer waiting for
#: the lock sleeps (up to 100 ms at a time) and retries, and would miss a lock released and taken
#: back at once. The pause is at least as long as the chunk took, so writers get half the time.
PURGE_PAUSE = 0.1


class KeyNeeded(Exception):
    """verify without a chain key on a signed trail: it cannot be checked (not: it is broken)."""

    def __init__(self) -> None:
        super().__init__("the audit trail is signed with a chain key and none is configured: set audit.chain_key "
                         "(e.g. the GATEWAY_AUDIT_CHAIN_KEY variable) to verify it")


class PurgeRefused(Exception):
    """The rows a purge would delete do not verify: deleting them would erase the evidence."""


async def _anchor(conn: AsyncConnection) -> tuple[dict[str, Any] | None, bool]:
    """The anchor of the latest ``audit.purged`` event (the walk of the trail starts after it),
    and whether the last row it deleted was signed (unsigned rows cannot follow that one)."""
    # (the type written into the statement, as in _key_info: a generic plan of "any type" scanned
    # the primary key back to the newest purge, holding the append lock meanwhile)
    last = (await conn.execute(select(events.c.data).where(
        events.c.type == bindparam("type", "audit.purged", literal_execute=True))
        .order_by(events.c.seq.desc()).limit(1))).scalar()
    if not last:
        return None, False
    try:
        d = json.loads(last)
    except ValueError:
        return None, False
    anchor = d.get("anchor")
    if not isinstance(anchor, dict):
        return None, False
    return anchor, anchor.get("signed") is True


async def purge(db: Database, before: str, actor: str = "retention",
                on_event: Callable[[dict[str, Any]], Any] | None = None,
                chain: ChainKeys | None = None) -> dict[str, Any] | None:
    """Delete the events older than ``before`` (ISO time) in chunks of PURGE_CHUNK rows, each in its
    own transaction that also appends an ``audit.purged`` event with that chunk's anchor: the chain
    verifies after every chunk (and if the process stops between two). ``on_event`` is called
    with each such event once it is committed. Returns the last one, with ``total`` (rows
    deleted by the whole purge) added, or None if nothing was old enough. ``chain``: the process's
    chain keys, read as each chunk is purged (a reload may change them meanwhile); the chunk's
    event is signed with the first. The rows of a chunk are verified first (their links from the trail's
    start or the last anchor, their hashes, and the time column against the record the purge
    selects them by): a chunk that does not verify is not deleted (PurgeRefused), or the purge
    would erase the evidence of an edit, and sign the result."""
    last_old: int | None = None
    ev: dict[str, Any] | None = None
    total = 0
    while True:
        started = time.monotonic()
        async with locked(db) as conn:
            if last_old is None:
                # The leading run of old events only. An event's time is when its request arrived, its
                # seq when it was written: a long stream's event comes after newer ones, and purging up
                # to it would take those with it. It goes at a later purge, when all before it are old
                # too. (Found once: what is before it stays old, and appends only come after it.)
                first_new = (await conn.execute(select(func.min(events.c.seq))
                                                .where(events.c.time >= before))).scalar()
                if first_new is not None:
                    # The purge stops at it: a time column moved forward (it disagrees with the
                    # record) would stop retention for good, and silently.
                    row = (await conn.execute(select(events.c.time, events.c.data)
                                              .where(events.c.seq == first_new))).first()
                    try:
                        said = json.loads(row.data).get("time")
                    except (ValueError, AttributeError):
                        said = None
                    if row.time != _col_value("time", said):
                        raise PurgeRefused(f"the time column of seq {first_new} differs from its record; nothing "
                                           "was deleted: run `gateway audit verify`")
                q = select(func.max(events.c.seq))
                last_old = (await conn.execute(q if first_new is None else q.where(events.c.seq < first_new))).scalar()
                if last_old is None:
                    return None
            first = (await conn.execute(select(func.min(events.c.seq)))).scalar()
            if first is None or first > last_old:
                break  # all gone (another instance purged them meanwhile)
            upto = min(int(first) + PURGE_CHUNK - 1, int(last_old))
            in_force = chain.keys if chain is not None else ()
            if not in_force and await _signed(conn):
                raise ChainSigned()
            chunk_rows = (await conn.execute(select(*[events.c[n] for n in ("seq", "prev_hash", "hash", "data",
                                                                             *INDEXED)])
                                             .where(events.c.seq <= upto).order_by(events.c.seq.asc()))).all()
            anchor_, signed_before = await _anchor(conn)
            checked = await verify_rows(_aiter(chunk_rows), anchor_, in_force, whole=False,
                                        signed_before=signed_before)
            if not checked.ok:
                assert checked.broken is not None
                raise PurgeRefused(f"the rows to purge do not verify (seq {checked.broken['seq']}, "
                                   f"{checked.broken['problem']}: {checked.broken['detail']}); nothing was deleted: "
                                   "run `gateway audit verify`")
            anchor = chunk_rows[-1]
            anchor_signed = bool(in_force) and signer(anchor.prev_hash, anchor.data, anchor.hash,
                                                      in_force) not in (None, len(in_force))
            top = await _head(conn)  # read before the delete: the purge event continues the chain
            top_rank = await _head_rank(conn, in_force) if in_force else -1
            top_info = await _key_info(conn)
            res = await conn.execute(delete(events).where(events.c.seq <= upto))
            chunk = {"time": iso(), "type": "audit.purged", "actor": actor, "before": before,
                     "deleted": int(res.rowcount or 0), "first_deleted_seq": int(first),
                     "anchor": {"seq": int(anchor.seq), "hash": anchor.hash, "signed": anchor_signed}}
            if in_force:  # (the key events it may delete: the trail stays known as signed, and by which key)
                chunk["chain_key_id"] = key_id(in_force[0])
            await _append(conn, [prepare(chunk)], head=top, keys=in_force, head_rank=top_rank, chain=chain,
                          key_info=top_info)
        ev = chunk
        total += chunk["deleted"]
        if on_event is not None:
            on_event(chunk)
        if upto >= last_old:
            break
        await asyncio.sleep(max(PURGE_PAUSE, time.monotonic() - started))
    return None if ev is None else {**ev, "total": total}


_STATUS = re.compile(r"[0-9]{3}|[1-5]xx")


def status_filter(v: Any) -> tuple[int, int]:
    """A status filter (``429`` or a class, ``4xx``) -> the status range it selects, [lo, hi).
    ASCII digits only (``str.isdigit`` also takes ``²``, which ``int`` refuses). Raises ValueError
    naming the parameter; the API and the CLI validate with this, the query runs with it."""
    s = str(v).strip().lower()
    if not _STATUS.fullmatch(s):
        raise ValueError("status: expected a status code (429) or a class (4xx)")
    if s.endswith("xx"):
        lo = (ord(s[0]) - 48) * 100
        return lo, lo + 100
    return int(s), int(s) + 1


def _filters(q: Any, f: dict[str, Any]) -> Any:
    c = events.c
    if f.get("since"):
        q = q.where(c.time >= f["since"])
    if f.get("until"):
        q = q.where(c.time < f["until"])
    if f.get("type"):
        types = [t for t in str(f["type"]).split(",") if t]
        q = q.where(c.type.in_(types))
    for k in ("key_id", "owner"):
        if f.get(k):
            q = q.where(getattr(c, k) == f[k])
    if f.get("ip"):
        q = q.where(c.client_ip == f["ip"])
    st = f.get("status")
    if st:
        lo, hi = status_filter(st)
        q = q.where(c.status == lo) if hi == lo + 1 else q.where(c.status >= lo, c.status < hi)
    return q


def _out(r: Any) -> dict[str, Any]:
    d = json.loads(r.data)
    d["hash"] = r.hash
    return d


async def query(db: Database, f: dict[str, Any], limit: int = 100, cursor: int | None = None,
                order: str = "desc") -> tuple[list[dict[str, Any]], int | None]:
    """Events matching the filters; ``cursor`` is the seq to continue from (exclusive)."""
    c = events.c
    q = _filters(select(c.seq, c.data, c.hash), f)
    if order == "asc":
        if cursor is not None:
            q = q.where(c.seq > cursor)
        q = q.order_by(c.seq.asc())
    else:
        if cursor is not None:
            q = q.where(c.seq < cursor)
        q = q.order_by(c.seq.desc())
    q = q.limit(limit + 1)
    async with db.engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [_out(r) for r in rows], (int(rows[-1].seq) if more and rows else None)


#: What ``top`` groups by: its name on the command line -> the column (None: the record's field of
#: that name, a string; events without it are left out).
TOP_BY: dict[str, str | None] = {"key": "key_id", "owner": "owner", "ip": "client_ip", "team": None, "model": None}
#: The groups ``top`` counts distinct keys in (the others: distinct client addresses).
TOP_KEYS = ("ip", "team", "model")
#: How ``top`` may order its groups.
TOP_SORT = ("events", "tokens", "refused", "errors")


async def top(db: Database, f: dict[str, Any], by: str, sort: str = "events", limit: int = 20) -> list[dict[str, Any]]:
    """The events matching ``f`` grouped by key id, owner, client address, team or model (``by``):
    how many, how many were requests, refusals (authentication, rate limits) and 5xx answers, the
    tokens in and out of the requests, how many distinct client addresses (keys, for ip, team and
    model) and the last event's time; the ``limit`` groups with the most ``sort``. One query over
    the time range (its index): who is busy during an incident, or a month's use per team and model,
    without exporting the trail. Token counts that are not whole numbers count as none."""
    c = events.c
    column = TOP_BY[by]
    col = c[column] if column is not None else _record_text(db, by)
    other = c.key_id if by in TOP_KEYS else c.client_ip
    if db.is_sqlite:
        tok_in, tok_out = (case((func.json_type(c.data, f"$.{k}") == "integer", func.json_extract(c.data, f"$.{k}")),
                                else_=None) for k in ("tokens_in", "tokens_out"))
    else:
        # The record is JSON text, read as jsonb; jsonb refuses the escape of a NUL character
        # (\u0000, which a client can put in a path or a model name): such a record's tokens are
        # not read, rather than the whole query failing (in a CASE, tried in order, row by row).
        nul = func.strpos(c.data, "\\u0000") > 0

        def tokens_of(k: str) -> Any:
            v = sa_cast(c.data, JSONB)[k]
            return case((nul, None), (func.jsonb_typeof(v) == "number", v.astext.cast(Numeric).cast(BigInteger)),
                        else_=None)

        tok_in, tok_out = tokens_of("tokens_in"), tokens_of("tokens_out")
    tokens = func.coalesce(func.sum(tok_in), 0) + func.coalesce(func.sum(tok_out), 0)
    refused = func.sum(case((c.type.in_(("auth_failure", "rate_limited")), 1), else_=0))
    errors = func.sum(case((c.status >= 500, 1), else_=0))
    n = func.count()
    types = None
    if db.is_sqlite and (f.get("since") or f.get("until")):
        # SQLite's planner takes the type index (which nearly every row matches) or the grouped
        # column's over the time range: the cost would grow with the trail, not the window. Both
        # are used as expressions (no index), so the time index is the one used.
        f = dict(f)
        types = [t for t in str(f.pop("type", None) or "").split(",") if t]
        if column is not None:
            col = col + ""
    q = _filters(select(col.label("value"), n.label("events"),
                        func.sum(case((c.type == "request", 1), else_=0)).label("requests"),
                        refused.label("refused"), errors.label("errors"),
                        func.coalesce(func.sum(tok_in), 0).label("tokens_in"),
                        func.coalesce(func.sum(tok_out), 0).label("tokens_out"),
                        func.count(func.distinct(other)).label("distinct"),
                        func.max(c.time).label("last")).where(col.is_not(None)), f)
    if types:
        q = q.where((c.type + "").in_(types))
    order = {"events": n, "tokens": tokens, "refused": refused, "errors": errors}[sort]
    q = q.group_by(col).order_by(order.desc(), n.desc(), col).limit(limit)
    async with db.engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    return [{by: r.value, "events": int(r.events), "requests": int(r.requests or 0), "refused": int(r.refused or 0),
             "errors_5xx": int(r.errors or 0), "tokens_in": int(r.tokens_in or 0), "tokens_out": int(r.tokens_out or 0),
             ("keys" if by in TOP_KEYS else "ips"): int(r.distinct), "last": r.last} for r in rows]


def _record_text(db: Database, field: str) -> Any:
    """The record's ``field`` when it is a string, else NULL (as an SQL expression)."""
    c = events.c
    if db.is_sqlite:
        return case((func.json_type(c.data, f"$.{field}") == "text", func.json_extract(c.data, f"$.{field}")),
                    else_=None)
    v = sa_cast(c.data, JSONB)[field]
    # (a record holding a NUL's escape cannot be read as jsonb: see top's tokens)
    return case((func.strpos(c.data, "\\u0000") > 0, None), (func.jsonb_typeof(v) == "string", v.astext),
                else_=None)


async def iter_rows(db: Database, after: int = 0, page: int = 1000, f: dict[str, Any] | None = None,
                    conn: AsyncConnection | None = None) -> AsyncIterator[Any]:
    """Every row in seq order, paged so a long trail never sits in memory (on ``conn``, a
    :func:`snapshot`, when the pages must agree with each other; else each on a new connection)."""
    cols = [events.c[n] for n in ("seq", "prev_hash", "hash", "data", *INDEXED)]
    while True:
        q = select(*cols).where(events.c.seq > after)
        if f:
            q = _filters(q, f)
        q = q.order_by(events.c.seq.asc()).limit(page)
        if conn is not None:
            rows = (await conn.execute(q)).all()
        else:
            async with db.engine.connect() as c:
                rows = (await c.execute(q)).all()
        for r in rows:
            yield r
        if len(rows) < page:
            return
        after = int(rows[-1].seq)


async def head(db: Database) -> tuple[int, str]:
    async with db.engine.connect() as conn:
        return await _head(conn)


async def _aiter(rows: Sequence[Any]) -> AsyncIterator[Any]:
    for r in rows:
        yield r


async def verify(db: Database, keys: tuple[bytes, ...] = (), heads: Sequence[tuple[int, str]] = ()) -> VerifyResult:
    """Walk the trail; then compare ``heads`` recorded earlier (seq, hash) with it (chain.check_heads)."""
    # One snapshot for the anchor and every page: a purge running meanwhile is either wholly
    # before it or wholly after it (read apart, it showed as a deleted range).
    async with snapshot(db) as conn:
        if not keys and await _signed(conn):
            raise KeyNeeded()
        anchor, signed_before = await _anchor(conn)
        res = await verify_rows(iter_rows(db, conn=conn), anchor, keys, signed_before=signed_before)
        if not res.ok or not heads:
            return res
        seqs = sorted({seq for seq, _ in heads})
        stored = {int(r.seq): r.hash for r in await conn.execute(
            select(events.c.seq, events.c.hash).where(events.c.seq.in_(seqs)))}
        return check_heads(res, list(heads), stored)
