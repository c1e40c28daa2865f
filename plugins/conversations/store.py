"""The conversation store: tables and every query. Only this module knows SQL.

Three tables (migration branch ``conversations``):

``conversations``          one row per conversation: owner, creating key, fork parent, counters.
``conversation_messages``  one row per message; ``(conversation_id, position)`` is unique and positions
                           are gap-free (the writer assigns them under a row lock on the conversation).
``conversation_turns``     one row per proxied request: usage exactly as the upstream reported it.

Message content is stored as JSON text (``ensure_ascii=False``) so a string, a multi-part list, or
``null`` comes back exactly as it went in; tool calls and any other message keys likewise.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import datetime as dt
import json
import time
import sqlite3
from operator import itemgetter
from typing import Any, AsyncIterator, Callable, Sequence

import sqlalchemy as sa
from sqlalchemy import bindparam, func, select

from gateway.db import Base, row_chunks
from gateway.fastjson import dumps, utf8_safe

UTC = dt.timezone.utc
KNOWN_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
_KNOWN = frozenset(KNOWN_KEYS)


def utcnow() -> dt.datetime:
    """Naive UTC (stored the same way on SQLite and PostgreSQL)."""
    return dt.datetime.now(UTC).replace(tzinfo=None)


def iso(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(UTC).replace(tzinfo=None)
    return t.isoformat(timespec="microseconds") + "Z"


_BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: Told the number of conversations each committed part of a deletion removed.
Deleted = Callable[[int], None]


class ConversationRow(Base):
    __tablename__ = "conversations"
    id = sa.Column(sa.String(64), primary_key=True)
    owner = sa.Column(sa.String(200), nullable=False)
    key_id = sa.Column(sa.String(64), nullable=True)
    parent_id = sa.Column(sa.String(64), nullable=True)
    fork_position = sa.Column(sa.Integer, nullable=True)
    created_at = sa.Column(sa.DateTime, nullable=False)
    updated_at = sa.Column(sa.DateTime, nullable=False)
    message_count = sa.Column(sa.Integer, nullable=False, default=0)
    turn_count = sa.Column(sa.Integer, nullable=False, default=0)
    prompt_tokens = sa.Column(sa.BigInteger, nullable=False, default=0)
    completion_tokens = sa.Column(sa.BigInteger, nullable=False, default=0)
    last_model = sa.Column(sa.String(200), nullable=True)
    #: the client's own name for the conversation (``external_ids``), its forks included
    external_id = sa.Column(sa.String(200), nullable=True)
    __table_args__ = (
        sa.Index("ix_conversations_owner_updated", "owner", "updated_at"),
        sa.Index("ix_conversations_owner_external", "owner", "external_id"),
        sa.Index("ix_conversations_key_id", "key_id"),
        sa.Index("ix_conversations_updated_at", "updated_at"),
    )


class MessageRow(Base):
    __tablename__ = "conversation_messages"
    id = sa.Column(_BigInt, primary_key=True, autoincrement=True)
    conversation_id = sa.Column(sa.String(64), sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                                nullable=False)
    position = sa.Column(sa.Integer, nullable=False)
    role = sa.Column(sa.String(32), nullable=False)
    name = sa.Column(sa.String(200), nullable=True)
    content = sa.Column(sa.Text, nullable=False)          # JSON text
    tool_calls = sa.Column(sa.Text, nullable=True)        # JSON text
    tool_call_id = sa.Column(sa.String(200), nullable=True)
    extra = sa.Column(sa.Text, nullable=True)             # JSON text: any other message keys
    digest = sa.Column(sa.String(32), nullable=False)     # of the canonical form (prefix matching)
    tokens = sa.Column(sa.Integer, nullable=True)
    tokens_derived = sa.Column(sa.Boolean, nullable=False, default=False)
    model = sa.Column(sa.String(200), nullable=True)
    request_id = sa.Column(sa.String(128), nullable=True)
    key_id = sa.Column(sa.String(64), nullable=True)
    owner = sa.Column(sa.String(200), nullable=False)
    status = sa.Column(sa.String(32), nullable=True)      # assistant: complete | client_disconnected | ...
    finish_reason = sa.Column(sa.String(64), nullable=True)
    latency_ms = sa.Column(sa.Float, nullable=True)
    ttft_ms = sa.Column(sa.Float, nullable=True)
    created_at = sa.Column(sa.DateTime, nullable=False)
    __table_args__ = (
        sa.UniqueConstraint("conversation_id", "position", name="uq_conversation_messages_position"),
    )


class TurnRow(Base):
    __tablename__ = "conversation_turns"
    id = sa.Column(_BigInt, primary_key=True, autoincrement=True)
    conversation_id = sa.Column(sa.String(64), sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                                nullable=False)
    request_id = sa.Column(sa.String(128), nullable=True)
    key_id = sa.Column(sa.String(64), nullable=True)
    owner = sa.Column(sa.String(200), nullable=False)
    model = sa.Column(sa.String(200), nullable=True)
    status = sa.Column(sa.String(32), nullable=False)
    http_status = sa.Column(sa.Integer, nullable=True)
    memory = sa.Column(sa.Boolean, nullable=False, default=False)
    stream = sa.Column(sa.Boolean, nullable=False, default=False)
    first_position = sa.Column(sa.Integer, nullable=True)
    messages_stored = sa.Column(sa.Integer, nullable=False, default=0)
    prompt_tokens = sa.Column(sa.Integer, nullable=True)
    completion_tokens = sa.Column(sa.Integer, nullable=True)
    total_tokens = sa.Column(sa.Integer, nullable=True)
    usage = sa.Column(sa.Text, nullable=True)             # JSON text, exactly as reported
    latency_ms = sa.Column(sa.Float, nullable=True)
    ttft_ms = sa.Column(sa.Float, nullable=True)
    created_at = sa.Column(sa.DateTime, nullable=False)
    __table_args__ = (sa.Index("ix_conversation_turns_conversation_request", "conversation_id", "request_id"),)


C = ConversationRow.__table__
M = MessageRow.__table__
T = TurnRow.__table__


#: Messages deleted per transaction by a delete or purge (about; a longer conversation goes whole):
#: on SQLite the writers wait for the lock meanwhile (their busy timeout is 5 s).
DELETE_ROWS = 10_000
#: Seconds a SQLite delete or purge leaves between two transactions, for the writers to take the lock.
DELETE_PAUSE = 0.05

# -- records the writer persists ----------------------------------------------------------------
#: How long (seconds) turns that continue a write-time fork are sent after it.
LATE_FORK_MEMORY = 300.0


class TurnRecord:
    """Everything one request adds to a conversation; built in ``on_complete``, written in a batch."""

    __slots__ = ("conversation_id", "owner", "key_id", "create", "parent_id", "fork_position", "base",
                 "messages", "turn", "created_at", "done", "failed_at", "attempted_at", "prev_digest",
                 "unseen", "raced_here", "external_id")

    def __init__(self, conversation_id: str, owner: str, key_id: str | None, create: bool, parent_id: str | None,
                 fork_position: int | None, base: int, messages: list[dict[str, Any]], turn: dict[str, Any],
                 created_at: dt.datetime) -> None:
        self.conversation_id = conversation_id
        self.owner = owner
        self.key_id = key_id
        self.create = create
        self.parent_id = parent_id
        self.fork_position = fork_position
        self.base = base              # the position the first message expects (the view's count)
        self.messages = messages      # message rows (without conversation_id/position)
        self.turn = turn
        self.created_at = created_at
        self.done = False
        self.failed_at: float | None = None
        self.attempted_at: float | None = None
        self.prev_digest: str | None = None  # the digest of the message at base-1, as the request saw it
        self.unseen = False  # memory: appended after a turn another request stored meanwhile (see write)
        self.raced_here = False  # another request of this instance appended while this one ran (two tabs)
        self.external_id: str | None = None  # a conversation it creates is the client's one of this name


def message_row(msg: dict[str, Any], digest: str, **meta: Any) -> dict[str, Any]:
    row = new_row(msg, digest, None, False, None, None, None, None, None)
    row.update(meta)
    return row


def _claim(cid: str, position: int, produced: dict[str, Any]) -> dict[str, Any]:
    """This record's answer is stored already, by a request (on another instance, or earlier in
    this batch) that carried it as client history before this record was written: that row is to
    get the answer's own metadata (its request, status, timings and, when the upstream reported
    one, its token count), which a row from history does not have. Applied in the same
    transaction, after its inserts, to a row still without a status; the rows themselves are not
    touched (a batch that fails is retried, or halved, with them as they were)."""
    fields = {k: produced[k] for k in _PRODUCED}
    if fields["tokens"] is None:  # no count reported: the one derived for the history row stays
        del fields["tokens"], fields["tokens_derived"]
    return {"b_cid": cid, "b_pos": position, **fields}


#: The columns an answer carries and a message from the client's history does not.
_PRODUCED = ("request_id", "status", "finish_reason", "tokens", "tokens_derived", "latency_ms", "ttft_ms", "model")


def new_row(msg: dict[str, Any], digest: str, tokens: int | None, tokens_derived: bool, created_at: Any,
            model: str | None, request_id: str | None, key_id: str | None, owner: str | None,
            status: str | None = None, finish_reason: str | None = None, latency_ms: float | None = None,
            ttft_ms: float | None = None) -> dict[str, Any]:
    """A message row without conversation_id/position (the writer adds those). Every row carries
    every key: an executemany compiles the statement from the first row.

    Lossless: a role, name or tool_call_id its column cannot hold as it is (not a string, longer
    than the column, a NUL, a lone surrogate) gets a fitted copy in the column and its exact value
    in ``extra`` (JSON text, which escapes anything), which ``row_message`` puts back."""
    role = msg.get("role")
    if len(msg) == 2 and "content" in msg and type(role) is str and _fits(role, 32):  # the common plain message
        return {"role": role, "name": None, "content": dumps(msg.get("content")), "tool_calls": None,
                "tool_call_id": None, "extra": None, "digest": digest, "tokens": tokens,
                "tokens_derived": tokens_derived, "model": fit(model, 200), "request_id": request_id,
                "key_id": key_id, "owner": owner, "status": status, "finish_reason": fit(finish_reason, 64),
                "latency_ms": latency_ms, "ttft_ms": ttft_ms, "created_at": created_at}
    extra = {k: v for k, v in msg.items() if k not in _KNOWN}
    tc = msg.get("tool_calls")
    cols: dict[str, str | None] = {}
    for k, width in _FITTED:
        v = msg.get(k)
        if v is None:
            cols[k] = None
            continue
        c = cols[k] = fit(v if type(v) is str else str(v), width)
        if c != v or not c:
            extra[k] = v  # the exact value, which the column cannot hold (or "": the role column's "user")
    return {
        "role": cols["role"] or "user",
        "name": cols["name"],
        "content": dumps(msg.get("content")),
        "tool_calls": dumps(tc) if tc is not None else None,
        "tool_call_id": cols["tool_call_id"],
        "extra": dumps(extra) if extra else None,
        "digest": digest, "tokens": tokens, "tokens_derived": tokens_derived,
        "model": fit(model, 200),
        "request_id": request_id, "key_id": key_id, "owner": owner, "status": status,
        "finish_reason": fit(finish_reason, 64), "latency_ms": latency_ms, "ttft_ms": ttft_ms,
        "created_at": created_at,
    }


#: Message fields kept in columns of their own, and the columns' widths.
_FITTED = (("role", 32), ("name", 200), ("tool_call_id", 200))


def _fits(s: str, width: int) -> bool:
    return 0 < len(s) <= width and s.isascii() and "\x00" not in s


def fit(s: str | None, width: int) -> str | None:
    """``s`` as a column of ``width`` characters holds it on every database: at most ``width``
    characters, no NUL (PostgreSQL text takes none; SQLite would keep it, so both drop it), no lone
    surrogate (UTF-8 has none: '?'). Unchanged (the same object) when it already fits."""
    if s is None or (len(s) <= width and s.isascii() and "\x00" not in s):
        return s
    if "\x00" in s:
        s = s.replace("\x00", "")
    return utf8_safe(s[:width])


def row_message(r: Any) -> dict[str, Any]:
    """The OpenAI message dict back from a stored row (lossless)."""
    m: dict[str, Any] = {"role": r.role, "content": json.loads(r.content)}
    if r.name is not None:
        m["name"] = r.name
    if r.tool_calls is not None:
        m["tool_calls"] = json.loads(r.tool_calls)
    if r.tool_call_id is not None:
        m["tool_call_id"] = r.tool_call_id
    if r.extra:
        m.update(json.loads(r.extra))
    return m


#: Fields the APIs add to a message (the envelope), whatever keys the client's message had.
_ENVELOPE = ("object", "conversation_id", "position")


def message_out(r: Any, conversation_id: str | None = None) -> dict[str, Any]:
    """A stored message as the APIs, exports and the CLI show it: the message as the client sent
    it, in an envelope of the gateway's fields. The gateway's fields win over message keys of the
    same name (a client may send ``"position": 0`` or a made-up ``conversation_id`` in a message:
    readers page by ``position``, and must see the real one). The stored message keeps its keys
    (memory and prefix matching see it as sent)."""
    out = {"object": "conversation.message", "conversation_id": conversation_id or r.conversation_id,
           "position": r.position, **row_message(r),
           "tokens": r.tokens, "tokens_derived": bool(r.tokens_derived), "model": r.model,
           "request_id": r.request_id, "key_id": r.key_id, "owner": r.owner, "created_at": iso(r.created_at)}
    if r.extra:  # (only then can a message key have replaced one of the envelope's; set again, in place)
        out["object"] = "conversation.message"
        out["conversation_id"] = conversation_id or r.conversation_id
        out["position"] = r.position
    if r.role == "assistant":
        out.update(status=r.status, finish_reason=r.finish_reason, latency_ms=r.latency_ms, ttft_ms=r.ttft_ms)
    return out


def conversation_out(r: Any) -> dict[str, Any]:
    return {"id": r.id, "object": "conversation", "owner": r.owner, "key_id": r.key_id,
            "parent_id": r.parent_id, "fork_position": r.fork_position, "created_at": iso(r.created_at),
            "updated_at": iso(r.updated_at), "message_count": r.message_count, "turn_count": r.turn_count,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "model": r.last_model,
            "external_id": r.external_id}


#: Stored text (bytes, about) a page of ``messages`` holds at most: the caller and admin reads
#: answer a page in one JSON response. A page always has at least one message.
PAGE_BYTES = 8 * 2**20
#: Stored text (about) one database read of an export or of a page fetches at a time.
READ_BYTES = 4 * 2**20


def _row_bytes(r: Any) -> int:
    """A message row's stored JSON text, in characters: what it weighs in a page or an export
    line, about (known without parsing it)."""
    return len(r.content) + len(r.tool_calls or "") + len(r.extra or "") + 200


def _batch(size: int, count: int, most: int) -> int:
    """How many rows to read next: about ``READ_BYTES`` at the average size of the last read,
    at least 1, at most ``most``. Reads start small (a first read of hundreds of messages of
    megabytes each would take gigabytes) and grow as the messages turn out small."""
    per = max(1, size // max(1, count))
    return max(1, min(most, READ_BYTES // per, 2 * count if count else most))


def encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(dumps(list(parts)).encode()).decode().rstrip("=")


def decode_cursor(s: str) -> list[Any]:
    try:
        v = json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
    except (ValueError, TypeError, RecursionError):
        raise ValueError("invalid cursor") from None
    if not isinstance(v, list):
        raise ValueError("invalid cursor")
    return v


def _lower(s: Any) -> Any:
    """SQLite's ``gw_lower``: Unicode lower case, as PostgreSQL's ``lower`` (SQLite's folds ASCII only)."""
    return s.lower() if isinstance(s, str) else s


def text_ok(s: str) -> bool:
    """Whether every database can hold and compare ``s``: PostgreSQL text takes no NUL, and UTF-8
    (both databases) no lone surrogate. A filter or cursor part that fails this can match nothing
    stored; it is the caller's mistake (400), not the store's (503)."""
    return "\x00" not in s and not any("\ud800" <= ch <= "\udfff" for ch in s)


def parse_time(s: str) -> dt.datetime:
    """ISO 8601 (``Z`` or offset allowed) to naive UTC. A time UTC cannot hold
    (``9999-12-31T23:59:59-05:00``) is a ValueError like any other bad time: the callers' 400 /
    exit 2, not an OverflowError's 500."""
    try:
        t = dt.datetime.fromisoformat(s.strip().replace("Z", "+00:00"))
        if t.tzinfo is not None:
            t = t.astimezone(UTC).replace(tzinfo=None)
    except (OverflowError, OSError):
        raise ValueError(f"time out of range: {s!r}") from None
    return t


_SQLITE_TS = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores DateTime on SQLite
_MAX_PARAMS = 999 if sqlite3.sqlite_version_info < (3, 32, 0) else 32000  # SQLITE_MAX_VARIABLE_NUMBER


class ConversationStore:
    def __init__(self, db: Any) -> None:
        self.db = db
        self.is_sqlite = db.is_sqlite
        self._sql: dict[tuple[str, tuple[str, ...]], tuple[str, list[int], list[int]]] = {}
        #: forks made at write time: original id -> (fork id, the position the next turn of that
        #: history expects, the digest of its last message, when)
        self._late: dict[str, tuple[str, int, str, float]] = {}

    async def _insert(self, conn: Any, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """executemany; on SQLite straight to the driver (the same values SQLAlchemy would bind,
        without its per-row processing: this is the writer's hot loop)."""
        if not self.is_sqlite:
            await conn.execute(table.insert(), rows)
            return
        cols = tuple(rows[0])
        key = (table.name, cols)
        prep = self._sql.get(key)
        if prep is None:
            names = ", ".join(f'"{c}"' for c in cols)
            dts = [i for i, c in enumerate(cols) if isinstance(table.c[c].type, sa.DateTime)]
            bools = [i for i, c in enumerate(cols) if isinstance(table.c[c].type, sa.Boolean)]
            prep = self._sql[key] = (f'INSERT INTO "{table.name}" ({names}) VALUES ', dts, bools)
        head, dts, bools = prep
        params: list[Any] = []
        get = itemgetter(*cols)
        stamps: dict[dt.datetime, str] = {}  # the rows of one request share their timestamps
        for r in rows:
            t = list(get(r))
            for i in dts:
                v = t[i]
                if v is not None:
                    s = stamps.get(v)
                    if s is None:
                        s = stamps[v] = v.isoformat(" ", "microseconds")  # == strftime(_SQLITE_TS), faster
                    t[i] = s
            for i in bools:
                if t[i] is not None:
                    t[i] = 1 if t[i] else 0
            params += t
        # Many rows per statement: one sqlite3_step instead of one per row, which keeps the
        # driver thread from taking the GIL back and forth with the event loop for every row.
        one = "(" + ", ".join("?" * len(cols)) + ")"
        per = max(1, _MAX_PARAMS // len(cols))
        n = len(cols)
        # Straight to the aiosqlite connection, inside SQLAlchemy's transaction: one hand-off to the
        # driver thread per statement (SQLAlchemy's cursor adapter takes three: cursor, execute,
        # close). Under load each hand-off waits for the busy event loop and for the GIL, which is
        # what bounds the writer's throughput.
        driver = (await conn.get_raw_connection()).driver_connection
        for i, k in row_chunks(len(rows), per):
            chunk = params[i * n:(i + k) * n]
            await driver.execute_fetchall(head + ", ".join([one] * k), chunk)
            # (the driver's thread keeps its last statement's arguments until its next statement:
            # emptied, a turn of 300,000 messages is not held in memory by an idle connection)
            chunk.clear()
        params.clear()

    # -- the writer ------------------------------------------------------------------------------
    async def write(self, batch: Sequence[TurnRecord]) -> tuple[set[str], set[str], list[str]]:
        """Persist a batch in one transaction with a handful of statements (one executemany per
        table). Returns (conversation ids that were missing, i.e. deleted meanwhile; conversation
        ids whose stored count differed from what the request saw; forks made at write time).
        A memory turn appended after a turn it did not see has ``unseen`` set."""
        missing: set[str] = set()
        moved: set[str] = set()
        late: list[str] = []  # forks made here, at write time
        now = utcnow()
        # A turn that continues a turn this process forked away at write time follows it into the
        # fork (the request saw the forked history, not the stored one).
        chain = {cid: f for cid, f in self._late.items() if f[3] > time.monotonic() - LATE_FORK_MEMORY}
        for rec in batch:
            rec.unseen = False  # (decided again on every attempt)
            if not rec.create:
                self._follow(rec, chain)
        async with self.db.engine.begin() as conn:
            ids = sorted({r.conversation_id for r in batch if not r.create})
            counts: dict[str, int] = {}
            owners: dict[str, str] = {}
            if ids:
                q = select(C.c.id, C.c.owner, C.c.message_count).where(C.c.id.in_(ids)).order_by(C.c.id)
                if not self.is_sqlite:
                    q = q.with_for_update()  # several instances may append to one conversation
                for row in (await conn.execute(q)).all():
                    counts[row.id], owners[row.id] = row.message_count, row.owner
            created: dict[str, dict[str, Any]] = {}
            forks: list[tuple[str, str, int]] = []  # (parent, child, shared prefix length)
            msg_rows: list[dict[str, Any]] = []
            claims: list[dict[str, Any]] = []  # answers stored first as history: see _claim
            turn_rows: list[dict[str, Any]] = []
            touched: dict[str, dict[str, Any]] = {}
            for rec in batch:
                if not rec.create:
                    self._follow(rec, chain)  # a fork made earlier in this batch
                cid = rec.conversation_id
                if rec.create and cid not in counts:
                    created[cid] = {"id": cid, "owner": rec.owner, "key_id": rec.key_id, "parent_id": rec.parent_id,
                                    "fork_position": rec.fork_position, "created_at": rec.created_at,
                                    "updated_at": now, "message_count": 0, "turn_count": 0, "prompt_tokens": 0,
                                    "completion_tokens": 0, "last_model": None, "external_id": rec.external_id}
                    owners[cid] = rec.owner
                    counts[cid] = 0
                    if rec.parent_id is not None and rec.fork_position:
                        forks.append((rec.parent_id, cid, rec.fork_position))
                        counts[cid] = rec.fork_position  # the shared prefix is copied below
                elif cid not in counts:
                    missing.add(cid)
                    continue
                elif owners[cid] != rec.owner:
                    missing.add(cid)  # never append to someone else's conversation
                    continue
                pos = counts[cid]
                msgs = rec.messages
                if pos != rec.base:
                    moved.add(cid)
                    if pos > rec.base and msgs:  # (also a conversation this batch creates)
                        # (two tabs on one instance: the instance knew of the other turn, and the
                        # turn that ended second is a fork, as without memory; see on_complete)
                        memory = bool(rec.turn.get("memory")) and not rec.create and not rec.raced_here
                        claimed = len(claims)
                        msgs, at = await self._skip_stored(conn, cid, rec.base, pos, msgs, msg_rows, claims,
                                                           memory)
                        if at is not None and memory:
                            # Memory: the client sent only its new messages, and the stored history
                            # is the gateway's own; another instance stored a turn (its write was
                            # still queued there when this request read the history). Nothing
                            # the client holds differs: this turn goes after the stored ones, in the
                            # conversation the client was told (a fork would be one it never hears
                            # of). Its answer was made without that turn in its context.
                            del claims[claimed:]
                            msgs = rec.messages
                            rec.unseen = True
                        elif at is not None:
                            # What this request saw differs from what another one stored meanwhile
                            # (a regenerated answer, an edit): never interleave the two histories.
                            # This turn becomes a fork of the stored one at the first difference.
                            original = cid
                            cid = self._late_fork(rec, cid, at, created, forks)
                            counts[cid] = pos = at
                            owners[cid] = rec.owner
                            late.append(cid)
                            chain[original] = (cid, rec.base + len(rec.messages), rec.messages[-1]["digest"],
                                               time.monotonic())
                for m in msgs:  # the record's own dicts: set again on every attempt, so a retry is the same
                    m["conversation_id"] = cid
                    m["position"] = pos
                    msg_rows.append(m)
                    pos += 1
                counts[cid] = pos
                t = rec.turn
                t["conversation_id"] = cid
                t["first_position"] = pos - len(msgs) if msgs else None
                t["messages_stored"] = len(msgs)
                turn_rows.append(t)
                u = created.get(cid)
                if u is None:
                    u = touched.setdefault(cid, {"b_id": cid, "turn_count": 0, "prompt_tokens": 0,
                                                 "completion_tokens": 0, "last_model": None})
                u["turn_count"] += 1
                u["prompt_tokens"] += t.get("prompt_tokens") or 0
                u["completion_tokens"] += t.get("completion_tokens") or 0
                u["last_model"] = t.get("model") or u["last_model"]
                u["updated_at"] = t.get("created_at") or now  # last activity: when the request finished
            if created:
                for cid, row in created.items():
                    row["message_count"] = counts[cid]
                await self._insert(conn, C, list(created.values()))
            if msg_rows:
                await self._insert(conn, M, msg_rows)
            for c in claims:  # after the inserts (the row claimed may be one of this batch's), before
                # the forks copy their shared prefix (a fork made now copies the claimed row)
                fields = {k: v for k, v in c.items() if not k.startswith("b_")}
                await conn.execute(M.update().where(M.c.conversation_id == c["b_cid"], M.c.position == c["b_pos"],
                                                    M.c.status.is_(None)).values(**fields))
            for parent, child, upto in forks:
                await self._copy_prefix(conn, parent, child, upto)
                copied = (await conn.execute(select(func.count()).select_from(M).where(
                    M.c.conversation_id == child, M.c.position < upto))).scalar()
                if copied != upto:
                    # The parent was deleted (or purged) meanwhile: a fork of what is gone is not
                    # made either (it would lack its first messages, and an erasure must not come
                    # back through it). Skipped and counted like an append to a deleted one.
                    await conn.execute(M.delete().where(M.c.conversation_id == child))
                    await conn.execute(C.delete().where(C.c.id == child))
                    turn_rows = [t for t in turn_rows if t["conversation_id"] != child]
                    touched.pop(child, None)
                    missing.add(child)
            if turn_rows:
                await self._insert(conn, T, turn_rows)
            if touched:
                params = [{**u, "count": counts[cid]} for cid, u in touched.items()]
                await conn.execute(
                    C.update().where(C.c.id == bindparam("b_id")).values(
                        message_count=bindparam("count"), updated_at=bindparam("updated_at"),
                        turn_count=C.c.turn_count + bindparam("turn_count"),
                        prompt_tokens=C.c.prompt_tokens + bindparam("prompt_tokens"),
                        completion_tokens=C.c.completion_tokens + bindparam("completion_tokens"),
                        last_model=func.coalesce(bindparam("last_model", type_=sa.String), C.c.last_model)),
                    params)
        self._late = chain  # committed: the forks made (and followed) stay known for a while
        return missing, moved, late

    @staticmethod
    def _follow(rec: TurnRecord, chain: dict[str, tuple[str, int, str, float]]) -> None:
        f = chain.get(rec.conversation_id)
        if f is None or not rec.messages or rec.base != f[1] or rec.prev_digest != f[2]:
            return
        original = rec.conversation_id
        rec.conversation_id = f[0]
        chain[original] = (f[0], rec.base + len(rec.messages), rec.messages[-1]["digest"], time.monotonic())

    @staticmethod
    def _late_fork(rec: TurnRecord, parent: str, at: int, created: dict[str, dict[str, Any]],
                   forks: list[tuple[str, str, int]]) -> str:
        from . import new_id  # the package imports this module

        cid = new_id()
        created[cid] = {"id": cid, "owner": rec.owner, "key_id": rec.key_id, "parent_id": parent,
                        "fork_position": at, "created_at": rec.created_at, "updated_at": utcnow(),
                        "message_count": 0, "turn_count": 0, "prompt_tokens": 0, "completion_tokens": 0,
                        "last_model": None, "external_id": rec.external_id}
        forks.append((parent, cid, at))
        return cid

    async def _copy_prefix(self, conn: Any, parent: str, child: str, upto: int) -> None:
        cols = [c for c in M.c if c.name not in ("id", "conversation_id")]
        sel = select(sa.literal(child, sa.String(64)).label("conversation_id"), *cols).where(
            M.c.conversation_id == parent, M.c.position < upto).order_by(M.c.position)
        await conn.execute(M.insert().from_select(["conversation_id"] + [c.name for c in cols], sel))

    async def _skip_stored(self, conn: Any, cid: str, base: int, pos: int, msgs: list[dict[str, Any]],
                           queued: list[dict[str, Any]], claims: list[dict[str, Any]], memory: bool = False
                           ) -> tuple[list[dict[str, Any]], int | None]:
        """Another request appended since this one looked. Our leading messages already stored
        there (same digests) are dropped; if all that was stored since matches, the rest is
        appended (None). If ours differ from what was stored, the position of the first difference
        is returned with the messages from there: those must not go after the stored ones.

        ``memory``: our answer never matches an answer another request produced (both have a
        status): with memory on, the same short question ("yes") gets the same answer from a
        deterministic model on two instances, and those are two turns, not one resent."""
        rows = (await conn.execute(select(M.c.digest, M.c.status).where(
            M.c.conversation_id == cid, M.c.position >= base).order_by(M.c.position))).all()
        stored = [(r.digest, r.status) for r in rows]
        stored += [(m["digest"], m["status"]) for m in queued if m["conversation_id"] == cid and m["position"] >= base]
        i = 0
        while i < len(msgs) and i < len(stored) and msgs[i]["digest"] == stored[i][0] and not (
                memory and msgs[i]["status"] is not None and stored[i][1] is not None):
            if msgs[i]["status"] is not None:
                claims.append(_claim(cid, base + i, msgs[i]))
            i += 1
        if i < len(msgs) and i < len(stored):
            return msgs[i:], base + i
        return msgs[i:], None

    # -- reads for the request path ---------------------------------------------------------------
    async def load_view(self, cid: str) -> tuple[Any, list[Any]] | None:
        """A conversation's owner row and its messages (position, digest, tokens, role, status,
        whether it has tool calls; in order). None if there is no such conversation."""
        has_calls = sa.and_(M.c.tool_calls.is_not(None), M.c.tool_calls.not_in(["[]", "null"]))
        async with self.db.long_read() as conn:
            row = (await conn.execute(select(C.c.owner, C.c.key_id).where(C.c.id == cid))).first()
            if row is None:
                return None
            msgs = (await conn.execute(select(
                M.c.position, M.c.digest, M.c.tokens, M.c.role, M.c.status, has_calls.label("calls")
            ).where(M.c.conversation_id == cid).order_by(M.c.position))).all()
        return row, list(msgs)

    async def load_reasoning(self, cid: str, below: int) -> list[Any]:
        """The answers (below position ``below``) whose turn's usage reports reasoning tokens: their
        position, stored tokens, and the turn's usage and completion tokens."""
        async with self.db.long_read() as conn:
            return list((await conn.execute(select(M.c.position, M.c.tokens, T.c.usage, T.c.completion_tokens).join(
                T, sa.and_(T.c.conversation_id == M.c.conversation_id, T.c.request_id == M.c.request_id)).where(
                M.c.conversation_id == cid, M.c.position < below, M.c.status.is_not(None),
                T.c.usage.like("%reasoning_tokens%")))).all())

    async def named(self, owner: str, external_id: str, limit: int) -> list[tuple[str, str | None]]:
        """The owner's conversations of this client name (forks included), most recently active
        first, each with the digest of its first message (None: none stored)."""
        first = sa.and_(M.c.conversation_id == C.c.id, M.c.position == 0)
        async with self.db.engine.connect() as conn:
            return [(r[0], r[1]) for r in await conn.execute(
                select(C.c.id, M.c.digest).select_from(C.outerjoin(M, first))
                .where(C.c.owner == owner, C.c.external_id == external_id)
                .order_by(C.c.updated_at.desc()).limit(limit))]

    async def message_count(self, cid: str) -> int | None:
        async with self.db.engine.connect() as conn:  # (one row by key: not a long read)
            return (await conn.execute(select(C.c.message_count).where(C.c.id == cid))).scalar()

    async def load_messages(self, cid: str, start: int, also: tuple[int, int] = (0, 0)
                            ) -> list[tuple[int, dict[str, Any], int | None]]:
        """Messages at positions >= start and at positions [also), oldest first."""
        a, b = also
        cond = M.c.position >= start
        if a < b and a < start:
            cond = sa.or_(cond, sa.and_(M.c.position >= a, M.c.position < b))
        async with self.db.long_read() as conn:
            rows = (await conn.execute(select(M).where(M.c.conversation_id == cid, cond).order_by(M.c.position))).all()
        return [(r.position, row_message(r), r.tokens) for r in rows]

    # -- reads for the APIs ----------------------------------------------------------------------
    async def get(self, cid: str) -> dict[str, Any] | None:
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(select(C).where(C.c.id == cid))).first()
        return conversation_out(row) if row is not None else None

    async def list(self, *, owner: str | None = None, key_id: str | None = None, since: dt.datetime | None = None,
                   until: dt.datetime | None = None, q: str | None = None, limit: int = 50,
                   cursor: str | None = None, stored_only: bool = False,
                   external_id: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Newest activity first; ``cursor`` continues after the last item of the previous page.
        ``stored_only``: only conversations holding a message (not one a failed first turn left);
        ``external_id``: only those of a client's own id (a chat, its forks and side requests)."""
        stmt = select(C)
        if owner is not None:
            stmt = stmt.where(C.c.owner == owner)
        if external_id is not None:
            stmt = stmt.where(C.c.external_id == external_id)
        if stored_only:
            stmt = stmt.where(C.c.message_count > 0)
        if key_id is not None:
            stmt = stmt.where(C.c.key_id == key_id)
        if since is not None:
            stmt = stmt.where(C.c.updated_at >= since)
        if until is not None:
            stmt = stmt.where(C.c.updated_at < until)
        if q:
            if self.is_sqlite:
                # SQLite's lower() and LIKE fold ASCII letters only ("KÖLN" would not find "Köln"):
                # Python's str.lower, registered on the connection the search runs on (below)
                stmt = stmt.where(sa.exists().where(M.c.conversation_id == C.c.id, func.instr(
                    func.gw_lower(M.c.content), bindparam("q_lower", q.lower(), type_=sa.String)) > 0))
            else:
                stmt = stmt.where(sa.exists().where(M.c.conversation_id == C.c.id,
                                                    M.c.content.icontains(q, autoescape=True)))
        if cursor:
            try:
                ts, last = decode_cursor(cursor)
                t = parse_time(ts)
                if not isinstance(last, str) or not text_ok(last):
                    raise TypeError
            except (ValueError, TypeError, AttributeError, OverflowError):
                raise ValueError("invalid cursor") from None
            stmt = stmt.where(sa.or_(C.c.updated_at < t, sa.and_(C.c.updated_at == t, C.c.id < last)))
        stmt = stmt.order_by(C.c.updated_at.desc(), C.c.id.desc()).limit(limit + 1)
        async with self.db.engine.connect() as conn:
            if q and self.is_sqlite:
                driver = (await conn.get_raw_connection()).driver_connection
                await driver.create_function("gw_lower", 1, _lower, deterministic=True)
            rows = (await conn.execute(stmt)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = encode_cursor(iso(rows[-1].updated_at), rows[-1].id) if more and rows else None
        return [conversation_out(r) for r in rows], nxt

    async def messages(self, cid: str, *, after: int = -1, limit: int = 100,
                       max_bytes: int | None = PAGE_BYTES) -> tuple[list[dict[str, Any]], bool]:
        """The messages after position ``after``, oldest first, and whether more follow: at most
        ``limit`` of them and, past the first, at most ``max_bytes`` of stored text (None: no
        bound). A page of a conversation of big messages is neither read nor answered whole (a
        thousand messages of megabytes each would be built into one response); the reader goes
        on from ``next_after`` as for a page cut by ``limit``. Read in small batches that grow
        with the messages' size (see ``_batch``), on one connection."""
        out: list[Any] = []
        size = 0
        more = False
        n = min(limit + 1, 8)
        async with self.db.engine.connect() as conn:
            while not more:
                rows = (await conn.execute(select(M).where(M.c.conversation_id == cid, M.c.position > after)
                                           .order_by(M.c.position).limit(n))).all()
                got = 0
                for r in rows:
                    b = _row_bytes(r)
                    if len(out) >= limit or (max_bytes is not None and out and size + b > max_bytes):
                        more = True
                        break
                    out.append(r)
                    size += b
                    got += b
                    after = r.position
                if len(rows) < n:
                    break
                n = _batch(got, len(rows), limit + 1 - len(out))
        return [message_out(r) for r in out], more

    async def turns(self, cid: str, first: int | None = None, last: int | None = None) -> list[dict[str, Any]]:
        """The conversation's turns; with ``first``, those whose messages begin at positions
        ``first`` to ``last`` (a page of messages; ``last`` None: to the end, and turns that stored
        no message too)."""
        q = select(T).where(T.c.conversation_id == cid)
        if first is not None:
            cond = T.c.first_position >= first
            if last is not None:
                cond = sa.and_(cond, T.c.first_position <= last)
            else:
                cond = sa.or_(cond, T.c.first_position.is_(None))
            q = q.where(cond)
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(q.order_by(T.c.id))).all()
        out = []
        for r in rows:
            d = {c.name: getattr(r, c.name) for c in T.c if c.name not in ("id", "usage", "created_at")}
            d["usage"] = json.loads(r.usage) if r.usage else None
            d["created_at"] = iso(r.created_at)
            out.append(d)
        return out

    async def export(self, *, cid: str | None = None, owner: str | None = None,
                     chunk: int = 500) -> AsyncIterator[dict[str, Any]]:
        """Every message of one conversation (``cid``) or of an owner's, one dict each: by
        conversation id, then position (what ``ORDER BY conversation_id, position`` gives).

        Read by key, a page at a time (at most ``chunk`` messages and about ``READ_BYTES``
        of stored text), each page on a connection taken for that read only and returned to the
        pool before the page is handed out: a reader that stalls (an export nobody reads) holds
        no connection, and the set is never in memory whole. The pages are separate reads, not
        one snapshot: a conversation deleted while the export runs is left out from where the
        export is (whole if not reached yet); messages appended meanwhile are included if the
        export has not passed their conversation yet."""
        ids: collections.deque[str] = collections.deque([cid] if cid is not None else ())
        more_ids = cid is None
        last_id: str | None = None   # keyset over the owner's conversation ids
        cur: str | None = None       # the conversation being read, and the last position read of it
        pos = -1
        n = min(chunk, 8)
        while True:
            rows: list[Any] = []
            async with self.db.engine.connect() as conn:
                reads = 0
                while len(rows) < n and reads < 100:  # (many tiny or empty conversations: a bounded hold too)
                    reads += 1
                    if cur is None:
                        if not ids and more_ids:
                            q = select(C.c.id).where(C.c.owner == owner)
                            if last_id is not None:
                                q = q.where(C.c.id > last_id)
                            part = [r.id for r in await conn.execute(q.order_by(C.c.id).limit(1000))]
                            more_ids = len(part) == 1000
                            last_id = part[-1] if part else last_id
                            ids.extend(part)
                        if not ids:
                            break
                        cur, pos = ids.popleft(), -1
                    want = n - len(rows)
                    got = (await conn.execute(select(M).where(M.c.conversation_id == cur, M.c.position > pos)
                                              .order_by(M.c.position).limit(want))).all()
                    rows += got
                    if len(got) < want:
                        cur = None  # that conversation is done
                    else:
                        pos = got[-1].position
            if not rows:
                if cur is None and not ids and not more_ids:
                    return
                continue  # (only empty conversations in that read)
            for r in rows:
                yield message_out(r)
            n = _batch(sum(_row_bytes(r) for r in rows), len(rows), chunk)

    # -- deletes ---------------------------------------------------------------------------------
    async def _delete_where(self, cond: Any, chunk: int = 500, each: Deleted | None = None) -> list[str]:
        """Delete the matching conversations with their messages and turns, per transaction up to
        ``chunk`` conversations and about ``DELETE_ROWS`` messages (at least one conversation, whatever
        its length): a purge of millions neither holds the database's write lock for long nor
        loads every id at once. On SQLite the writers get a moment between two transactions to
        take the lock. (Interrupted, it has deleted whole conversations; run again, it deletes the
        rest.) ``each(n)`` is called after each transaction commits with the number it deleted
        (once with 0 when nothing matched): the caller records each part as it is gone, so a
        purge cut short by a crash leaves a record of what it did delete."""
        ids: list[str] = []
        told = False
        while True:
            gone: list[str] = []
            async with self.db.engine.begin() as conn:
                found = (await conn.execute(select(C.c.id, C.c.message_count).where(cond).limit(chunk))).all()
                part, n, rows = [], 0, DELETE_ROWS
                for r in found:
                    if part and n + r.message_count > rows:
                        break
                    part.append(r.id)
                    n += r.message_count
                if part:
                    await conn.execute(M.delete().where(M.c.conversation_id.in_(part)))
                    await conn.execute(T.delete().where(T.c.conversation_id.in_(part)))
                    # What this transaction deleted, not what it found: a delete or purge running
                    # at the same time (another instance, the retention task) may delete some
                    # first, and each conversation is reported (and audited) as deleted once.
                    gone = [r.id for r in await conn.execute(C.delete().where(C.c.id.in_(part)).returning(C.c.id))]
            if each is not None and (gone or not told):
                each(len(gone))
                told = True
            ids += gone
            if len(found) < chunk and len(part) == len(found):
                if ids:
                    self.db.empty_log_soon()
                return ids
            if self.db.is_sqlite:
                await asyncio.sleep(DELETE_PAUSE)

    async def delete(self, cid: str, owner: str | None = None) -> bool:
        cond = C.c.id == cid
        if owner is not None:
            cond = sa.and_(cond, C.c.owner == owner)
        return bool(await self._delete_where(cond))

    async def delete_owner(self, owner: str, each: Deleted | None = None) -> list[str]:
        return await self._delete_where(C.c.owner == owner, each=each)

    async def purge(self, older_than: dt.datetime, keep: Sequence[str] = (), each: Deleted | None = None) -> list[str]:
        """Delete conversations with no activity since ``older_than`` (messages and turns too),
        except those in ``keep`` (active: a turn in flight)."""
        cond = C.c.updated_at < older_than
        if keep:
            cond = sa.and_(cond, C.c.id.not_in(list(keep)[:5000]))
        return await self._delete_where(cond, each=each)

    async def counts(self) -> dict[str, int]:
        async with self.db.engine.connect() as conn:
            out = {}
            for name, t in (("conversations", C), ("messages", M), ("turns", T)):
                out[name] = int((await conn.execute(select(func.count()).select_from(t))).scalar() or 0)
        return out
