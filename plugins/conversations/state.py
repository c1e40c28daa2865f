"""Process-wide conversation state shared by every plugin instance (route overrides, reloads) and
the admin API: one background writer, the cache of recent conversations, the retention task.

The cache holds, per recently used conversation, the digests and token counts of all its messages
(for prefix matching), what memory needs to know of each (``kind``: its role, whether an answer was
cut short; the current system prompt; answers' hidden reasoning tokens) and the last
``cache_messages`` messages themselves (for memory), the bodies of all conversations together
within ``cache_bytes`` (:class:`Bodies`). It is updated in ``on_complete`` before the record is
queued, so it always includes writes that are still pending; a conversation with pending writes is
never evicted. When a write is finally given up on, or another instance appended to the
conversation, the entry is marked stale: the next request waits for this conversation's pending
writes and reloads it from the database.
"""
from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Sequence

from prometheus_client import Counter, Gauge

from gateway.clock import deletions_allowed
from gateway.tasks import cancel_and_wait

from .store import ConversationStore, TurnRecord, utcnow

if TYPE_CHECKING:
    from gateway.services import Services

log = logging.getLogger("gateway.conversations")

#: A conversation id a client may send, and one this gateway (any instance) generates.
_ID_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$").match
_GENERATED = re.compile(r"^conv_[A-Za-z0-9]{22}$").match
RESOURCE = "conversations:shared"
#: Conversations of one client name looked at for a request: of those whose first message is the
#: request's, the most recently used (a chat and its forks; a front-end's side requests under the
#: chat's name begin otherwise). NAMED_READ: how many of the name's are read to find them.
NAMED_KEPT = 8
NAMED_READ = 64
ABANDON_AFTER = 3.0  # a failed record not retried for this long was given up on by the writer
PURGE_RETRY = 60.0  # seconds before a retention run that failed (the database down, busy) is tried again


def body_size(m: Any) -> int:
    """Roughly the bytes a message takes in the cache: its strings' lengths and a little per value
    and container (what the ``cache_bytes`` budget counts). Walked without recursion (a message
    may be nested as deep as JSON allows)."""
    size, todo = 0, [m]
    while todo:
        x = todo.pop()
        if isinstance(x, str):
            size += 16 + len(x)
        elif isinstance(x, dict):
            size += 64
            for k, y in x.items():
                size += len(k) if isinstance(k, str) else 16
                todo.append(y)
        elif isinstance(x, list):
            size += 32
            todo.extend(x)
        else:
            size += 16
    return size


def kind(role: Any, status: str | None = None, calls: bool = False) -> str:
    """What memory needs to know of a stored message, one letter: ``s`` a system or developer
    message, ``u`` a user (or any other) message, ``t`` a tool result, ``f`` a (legacy) function
    result, ``a`` an assistant answer (complete, or sent by a client as history), ``c`` such an
    answer with tool calls, ``x`` an assistant answer cut short (its status not ``complete``: the
    client was told of an error)."""
    if role in ("system", "developer"):
        return "s"
    if role == "tool":
        return "t"
    if role == "function":
        return "f"  # (a result, as ``t``: a trimmed history never starts with one)
    if role == "assistant":
        if status is not None and status != "complete":
            return "x"
        return "c" if calls else "a"
    return "u"


def message_kind(m: dict[str, Any], status: str | None = None) -> str:
    tcs = m.get("tool_calls")
    return kind(m.get("role"), status, isinstance(tcs, list) and bool(tcs))


def last_prompt(kinds: Sequence[str], since: int = 0) -> tuple[int, int]:
    """The positions [a, b) of the newest run of system/developer messages (the current system
    prompt), looked for from position ``since`` on (it runs back before it); (0, 0) if none."""
    i = len(kinds)
    while i > since and kinds[i - 1] != "s":
        i -= 1
    if i <= since:
        return 0, 0
    b = i
    while i > 0 and kinds[i - 1] == "s":
        i -= 1
    return i, b


def answered_to(kinds: Sequence[str], end: int) -> int:
    """The position after the last complete answer before ``end`` (0: none): what follows it up
    to ``end`` is unanswered (a failed turn's question or tool results, cut answers, prompts)."""
    p = end
    while p > 0 and kinds[p - 1] not in ("a", "c"):
        p -= 1
    return p


def superseded(kinds: Sequence[str], digests: Sequence[str]) -> set[int]:
    """Stored positions memory does not replay because a retry replaced them: where a run of cut
    answers (``x``, system messages between them aside) is followed by the end of the unanswered
    messages before it again (the client retried its turn and added a message: that turn stores
    the retried messages again, see ``Conversations._memory_new``), the run and those earlier
    copies. Worked out from kinds and digests alone, so the cache and the database agree."""
    out: set[int] = set()
    kinds = list(kinds)
    n = len(kinds)
    i = 0
    while i < n:
        try:
            i = kinds.index("x", i)
        except ValueError:
            break
        run = []
        j = i
        while j < n and kinds[j] in ("s", "x"):
            if kinds[j] == "x":
                run.append(j)
            j += 1
        # the unanswered messages before the run (after the last complete answer)
        before = [p for p in range(answered_to(kinds, i), i) if kinds[p] not in ("s", "x")]
        after: list[int] = []
        q = j
        while q < n and len(after) < len(before):
            if kinds[q] not in ("s", "x"):
                after.append(q)
            q += 1
        for r in range(min(len(before), len(after)), 0, -1):
            if [digests[q] for q in before[-r:]] == [digests[q] for q in after[:r]]:
                out.update(before[-r:])
                out.update(run)
                break
        i = j
    return out


def reasoning_tokens(usage: Any) -> int:
    """Hidden reasoning tokens in a usage object (or its JSON text): counted in completion_tokens,
    never sent back to the model."""
    if isinstance(usage, str):
        try:
            usage = json.loads(usage)
        except ValueError:
            return 0
    d = usage.get("completion_tokens_details") if isinstance(usage, dict) else None
    r = d.get("reasoning_tokens") if isinstance(d, dict) else None
    return r if type(r) is int and r > 0 else 0


def reasoning_share(reasoning: int, completion: int, tokens: int) -> int:
    """The reasoning in an answer's stored count ``tokens`` (all of completion_tokens, or choice 0's share)."""
    if completion <= 0:
        return 0
    return min(tokens, round(reasoning * tokens / completion))


class Bodies:
    """The message bodies every cached conversation holds, against a byte budget (``cache_bytes``).

    A conversation's digests and token counts stay cached (prefix matching needs them, and they are
    small); past the budget, the bodies of the conversations that grew or were refreshed least
    recently are let go (:meth:`View.drop_bodies`). Memory then reads those from the database,
    as it does for a conversation not cached at all. Views report their size as it changes; the
    cache (:class:`_Views`) adds and removes them as they enter and leave it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.lru: collections.OrderedDict[View, None] = collections.OrderedDict()

    def add(self, v: "View") -> None:
        v.bodies = self
        self.total += v.nbytes
        if v.nbytes:
            self.lru[v] = None
            self.enforce()

    def remove(self, v: "View") -> None:
        v.bodies = None
        self.total -= v.nbytes
        self.lru.pop(v, None)

    def resized(self, v: "View", delta: int) -> None:
        self.total += delta
        if v.nbytes:
            self.lru[v] = None
            self.lru.move_to_end(v)
        else:
            self.lru.pop(v, None)
        if delta > 0:
            self.enforce()

    def enforce(self) -> None:
        while self.total > self.limit and self.lru:
            next(iter(self.lru)).drop_bodies()  # (reports its new size 0: it leaves the LRU)


class View:
    """What this process knows about one conversation (stored + pending)."""

    __slots__ = ("id", "owner", "key_id", "digests", "tokens", "kinds", "prompt", "reasoning", "reasoning_known",
                 "tail", "tail_start", "pinned", "records", "busy", "stale", "checked", "parent", "nbytes", "bodies",
                 "deleted", "external_id")

    def __init__(self, cid: str, owner: str, key_id: str | None, digests: list[str] | None = None,
                 tokens: list[int | None] | None = None, kinds: list[str] | None = None,
                 reasoning: dict[int, int] | None = None) -> None:
        self.id = cid
        self.owner = owner
        self.key_id = key_id
        self.digests: list[str] = digests or []
        self.tokens: list[int | None] = tokens or []
        #: per message, what memory needs to know of it (see ``kind``)
        self.kinds: list[str] = kinds if kinds is not None else ["u"] * len(self.digests)
        self.prompt = last_prompt(self.kinds)     # positions of the current system prompt
        #: assistant answers' hidden reasoning tokens (in their stored count, never replayed), by
        #: position; known for what this process stored, read for the rest when memory first needs it
        self.reasoning: dict[int, int] = reasoning or {}
        self.reasoning_known = not self.digests
        self.tail: list[dict[str, Any]] = []     # messages at positions [tail_start, count)
        self.tail_start = len(self.digests)
        #: the messages of the current system prompt (positions ``prompt``), when known: memory
        #: pins them, however far back they are
        self.pinned: list[dict[str, Any]] | None = None
        self.records: list[TurnRecord] = []       # queued, not yet written
        self.busy = 0                             # requests in flight on this conversation
        self.stale = False
        self.checked = time.monotonic()
        self.parent: str | None = None            # forked from (the fork copies its prefix when written)
        self.nbytes = 0                           # body_size of tail (and first, when not in it)
        self.bodies: Bodies | None = None         # the budget it counts against, while cached
        self.deleted = False                      # deleted through an API: turns still running write nothing
        self.external_id: str | None = None       # the client's name, for one this process makes (until stored)

    def _resized(self) -> None:
        """Count the bodies held again (after they changed)."""
        self._set_size(sum(body_size(m) for m in self.tail) + self._pinned_size())

    def _pinned_size(self) -> int:
        """The size of the pinned prompt's bodies held outside the tail."""
        if self.pinned is None or self.prompt[0] >= self.tail_start:
            return 0
        return sum(body_size(m) for m in self.pinned)

    def _set_size(self, n: int) -> None:
        """The bodies now take ``n``: tell the cache's budget."""
        delta, self.nbytes = n - self.nbytes, n
        if delta and self.bodies is not None:
            self.bodies.resized(self, delta)

    def set_tail(self, pinned: list[dict[str, Any]] | None, tail: list[dict[str, Any]]) -> None:
        """Messages read from the database: the current system prompt's and the newest ones."""
        self.pinned = pinned
        self.tail = tail
        self.tail_start = self.count - len(tail)
        self._resized()

    def drop_bodies(self) -> None:
        """Let go of the message bodies (the cache's byte budget is spent); digests stay."""
        self.tail = []
        self.tail_start = self.count
        self.pinned = None
        self._resized()

    @property
    def count(self) -> int:
        return len(self.digests)

    def append(self, msgs: list[dict[str, Any]], digests: list[str], tokens: list[int | None], keep: int,
               statuses: Sequence[str | None] | None = None, reasoning: dict[int, int] | None = None) -> None:
        """``statuses``: the assistant answers' (None for input messages); ``reasoning``: hidden
        reasoning tokens in an answer's count, by index in ``msgs``."""
        base = self.count
        self.digests.extend(digests)
        self.tokens.extend(tokens)
        kinds = [message_kind(m, statuses[i] if statuses else None) for i, m in enumerate(msgs)]
        self.kinds.extend(kinds)
        if "s" in kinds:  # a (new) system prompt: its bodies are kept for memory to pin
            a, b = self.prompt = last_prompt(self.kinds, base)
            before = self.tail[a - self.tail_start:] if self.tail_start <= a else None  # (a run begun earlier)
            self.pinned = (msgs[a - base:b - base] if a >= base else
                           before + msgs[:b - base] if before is not None and keep > 0 else None)
        for i, r in (reasoning or {}).items():
            self.reasoning[base + i] = r
        if keep <= 0:  # no memory in use: keep no message bodies (the database has them)
            self.tail.clear()
            self.tail_start = self.count
            self.pinned = None
            self._set_size(0)
            return
        self.tail.extend(msgs)
        if len(self.tail) > keep:
            cut = len(self.tail) - keep
            del self.tail[:cut]
            self.tail_start += cut
        self._resized()

    def fork(self, cid: str, at: int) -> "View":
        v = View(cid, self.owner, self.key_id, self.digests[:at], self.tokens[:at], self.kinds[:at],
                 {p: r for p, r in self.reasoning.items() if p < at})
        v.reasoning_known = self.reasoning_known
        if self.tail_start <= at:
            v.tail = self.tail[:at - self.tail_start]
            v.tail_start = self.tail_start
        v.pinned = self.pinned if v.prompt == self.prompt else None
        v.parent = self.id
        v._resized()
        return v

    def pending(self) -> list[TurnRecord]:
        now = time.monotonic()
        keep = []
        for r in self.records:
            if r.done:
                continue
            if r.failed_at is not None and r.attempted_at is not None and r.attempted_at <= r.failed_at \
                    and now - r.failed_at > ABANDON_AFTER:
                self.stale = True  # the writer gave up on it: the database is the truth again
                continue
            keep.append(r)
        self.records = keep
        return keep


class _Views(collections.OrderedDict[str, View]):
    """The cache's conversations by id, which enter and leave the bodies' byte budget with them."""

    def __init__(self, bodies: Bodies) -> None:
        super().__init__()
        self.bodies = bodies

    def __setitem__(self, cid: str, v: View) -> None:
        old = super().get(cid)
        if old is v:
            return
        super().__setitem__(cid, v)
        if old is not None:
            self.bodies.remove(old)
        self.bodies.add(v)

    def __delitem__(self, cid: str) -> None:
        v = self[cid]
        super().__delitem__(cid)
        self.bodies.remove(v)

    def pop(self, cid: str, *default: Any) -> Any:  # type: ignore[override]
        if cid in self:
            v = super().pop(cid)
            self.bodies.remove(v)
            return v
        if default:
            return default[0]
        raise KeyError(cid)

    def popitem(self, last: bool = True) -> tuple[str, View]:
        cid, v = super().popitem(last)
        self.bodies.remove(v)
        return cid, v

    def clear(self) -> None:
        for v in self.values():
            self.bodies.remove(v)
        super().clear()


class Shared:
    def __init__(self, services: "Services", cfg: Any) -> None:
        self.services = services
        self.cfg = cfg
        self.store = ConversationStore(services.db)
        self.bodies = Bodies(cfg.cache_bytes)
        self.views: _Views = _Views(self.bodies)
        #: (owner, client name) -> what is known of its conversations (see ``named``)
        self.names: collections.OrderedDict[tuple[str, str], Name] = collections.OrderedDict()
        self.writer = self._new_writer(cfg)
        self.users: dict[int, Any] = {}
        self.closed = False
        self._written = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # the instances (so the retention settings) changed
        self.skipped = services.metric("conversations_skipped", lambda reg: Counter(
            "gateway_conversations_skipped_total",
            "Conversation turns not stored as sent, by reason: deleted (the conversation was deleted "
            "meanwhile: not stored), forked_late (differed from what another request stored meanwhile: "
            "stored as a fork)",
            ["reason"], registry=reg))
        services.metric("conversations_cache", lambda reg: Gauge(
            "gateway_conversations_cached", "Conversations held in the in-memory cache",
            registry=reg)).set_function(lambda: len(self.views))
        services.metric("conversations_cache_bytes", lambda reg: Gauge(
            "gateway_conversations_cache_bytes", "Bytes of message bodies (roughly) the conversation cache holds "
            "for memory (at most cache_bytes)", registry=reg)).set_function(lambda: self.bodies.total)

    @staticmethod
    def _writer_settings(cfg: Any) -> dict[str, Any]:
        return dict(max_queue=cfg.queue_size, batch_size=cfg.batch_size, flush_interval=cfg.flush_interval,
                    on_full=cfg.on_queue_full, full_wait=cfg.queue_full_wait, retry_for=cfg.retry_for,
                    max_weight=cfg.queue_messages)

    def _new_writer(self, cfg: Any) -> Any:
        # (bounded in message rows too: one turn can hold 300,000 of them, ~1 KB of memory each)
        return self.services.writer("conversations", self._write, weight=_rows, **self._writer_settings(cfg))

    @classmethod
    def get(cls, services: "Services", cfg: Any = None) -> "Shared":
        if cfg is None:
            from . import ConversationsConfig
            cfg = ConversationsConfig()
        return services.resource(RESOURCE, lambda: cls(services, cfg), close=lambda s: s.close())

    # -- lifecycle -------------------------------------------------------------------------------
    def acquire(self, inst: Any) -> None:
        if not self.users and self.closed:
            # every instance had gone (a reload without the plugin); this one brings it back
            self.cfg = inst.config
            self.writer = self._new_writer(inst.config)
            self.bodies.limit = inst.config.cache_bytes
            self.closed = False
        self.users[id(inst)] = inst.config
        self._wake.set()
        self.writer.start()
        if self._task is None:
            self._task = asyncio.create_task(self._maintenance(), name="conversations:retention")

    def adopt(self, cfg: Any) -> None:
        """Writer and cache settings of the instance activated last (a reload's new config)."""
        self.cfg = cfg
        self.writer.configure(**self._writer_settings(cfg))
        self.bodies.limit = cfg.cache_bytes
        self.bodies.enforce()
        self._wake.set()

    async def release(self, inst: Any) -> None:
        self.users.pop(id(inst), None)
        self._wake.set()
        if not self.users:
            await self.close()

    async def close(self) -> None:
        # Marked closed and the writer and task taken before the first await: an instance of a
        # reload acquiring meanwhile then starts a new writer instead of joining this closing one.
        task, self._task = self._task, None
        if self.closed:
            await cancel_and_wait(task)
            return
        self.closed = True
        writer = self.writer
        await cancel_and_wait(task)
        await writer.close(timeout=max(10.0, self.cfg.flush_interval + 5))

    def retention_days(self) -> float | None:
        """The longest retention any live instance asks for (none if any keeps forever)."""
        vals = [c.retention_days for c in self.users.values()]
        if not vals or any(v is None for v in vals):
            return None
        return max(vals)

    def retention_interval(self) -> float:
        return min((c.retention_interval for c in self.users.values()), default=3600.0)

    async def _maintenance(self) -> None:
        # The first purge a few seconds after start, then every retention_interval: a gateway
        # restarted more often than the interval (deploys, a crash loop) still applies retention.
        start = time.monotonic()
        await self._wait(lambda: start + min(5.0, self.retention_interval()))
        while True:
            days = self.retention_days()
            ok = await self._purge_once(days)
            done = time.monotonic()
            # (a purge that failed, the database down or busy, is tried again soon)
            await self._wait(lambda: done + (self.retention_interval() if ok else
                                             min(self.retention_interval(), PURGE_RETRY)))

    async def _wait(self, until: Any) -> None:
        """Sleep until ``until()`` (monotonic), computed again whenever the instances change: a
        reload that shortens retention_interval (or turns retention on) applies now, not after
        the old interval ran out."""
        while (left := until() - time.monotonic()) > 0:
            self._wake.clear()
            try:
                async with asyncio.timeout(left):
                    await self._wake.wait()
            except TimeoutError:
                return

    async def _purge_once(self, days: float | None) -> bool:
        """One retention run; False if it failed."""
        if days is None or not deletions_allowed("conversation retention"):
            return True
        active = self.active()
        def recorded(n: int) -> None:  # each committed part, as it is gone (a purge cut short too)
            if n:
                self.services.events.emit("conversations.purged", actor="retention", older_than_days=days, deleted=n)

        try:
            ids = await self.store.purge(utcnow() - dt.timedelta(days=days), keep=active, each=recorded)
        except Exception as e:
            log.warning("conversation retention purge failed: %s; trying again in %.0fs", type(e).__name__,
                        min(self.retention_interval(), PURGE_RETRY))
            return False
        for cid in ids:
            self.views.pop(cid, None)
        if ids:
            log.info("conversation retention: deleted %d conversation(s) older than %s day(s)", len(ids), days)
        return True

    def active(self) -> set[str]:
        """The conversations with a turn in flight or queued in this process: active whatever their
        stored last activity says (a long stream), so a purge (retention's or the admin API's)
        keeps them. A fork's parent too: the fork copies its prefix from it when written."""
        active: set[str] = set()
        for cid, v in self.views.items():
            if v.busy > 0 or v.pending():
                active.add(cid)
                if v.parent is not None:
                    active.add(v.parent)
                active.update(r.parent_id for r in v.records if r.parent_id is not None)
        return active

    # -- the writer ------------------------------------------------------------------------------
    async def _write(self, batch: Sequence[TurnRecord]) -> None:
        now = time.monotonic()
        for r in batch:
            r.attempted_at = now
        try:
            missing, moved, late = await self.store.write(batch)
        except Exception:
            t = time.monotonic()
            for r in batch:
                r.failed_at = t
            raise
        views = self.views
        for r in batch:
            r.done = True
            # Its rows are stored: let go of them at once (a turn can be hundreds of MB of rows,
            # and a record still referenced from a cycle would keep them until a full collection)
            r.messages = []
            # Written: the cache entry lets go of it (and of its message bodies) now, not only when
            # its conversation is next used; a one-off conversation never is.
            v = views.get(r.conversation_id)
            if v is not None and v.records:
                v.pending()
        for cid in missing:
            self.views.pop(cid, None)
            self.skipped.labels("deleted").inc()
            log.warning("conversation %s no longer exists (deleted meanwhile); its pending messages were not "
                        "stored", cid)
        for cid in moved:
            v = self.views.get(cid)
            if v is not None:
                v.stale = True
        for cid in late:
            self.skipped.labels("forked_late").inc()
            log.info("a turn differed from what another request stored meanwhile; stored as fork %s", cid)
        for r in batch:
            if r.unseen:
                log.info("a memory turn on conversation %s was answered without a turn another request stored "
                         "meanwhile; appended after it", r.conversation_id)
        ev, self._written = self._written, asyncio.Event()
        ev.set()

    async def settle(self, v: View, timeout: float = 10.0) -> None:
        """Wait until this conversation's queued writes are in the database (or given up on)."""
        deadline = time.monotonic() + timeout
        while v.pending():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("conversation writes still pending")
            ev = self._written
            try:
                await asyncio.wait_for(ev.wait(), min(left, 0.5))
            except TimeoutError:
                pass

    async def settle_owner(self, owner: str, timeout: float = 5.0) -> None:
        for v in [v for v in self.views.values() if v.owner == owner and v.pending()]:
            await self.settle(v, timeout)

    async def flush(self, timeout: float = 10.0) -> None:
        await self.writer.flush(timeout)

    # -- the cache -------------------------------------------------------------------------------
    def remember(self, v: View) -> View:
        old = self.views.get(v.id)
        if old is not None and not old.stale:
            self.views.move_to_end(v.id)
            return old
        self.views[v.id] = v
        limit = self.cfg.cache_conversations
        checks = 0
        while len(self.views) > limit and checks < 8:
            # least recently used first; an entry in use (request in flight, writes queued) is moved
            # to the back instead, so the cache may briefly exceed its size but never scans it all
            checks += 1
            cid, x = next(iter(self.views.items()))
            if x.busy or (x.records and x.pending()):
                self.views.move_to_end(cid)
            else:
                del self.views[cid]
        return v

    async def view(self, cid: str, ttl: float | None) -> View | None:
        """The conversation's view: from the cache, else the database. None if it does not exist."""
        v = self.views.get(cid)
        if v is not None:
            self.views.move_to_end(cid)
            pend = v.pending()
            if v.stale:
                await self.settle(v)
                return await self._load(cid)
            if ttl is not None and not pend and time.monotonic() - v.checked > ttl:
                n = await self.store.message_count(cid)
                if n is None:
                    self.views.pop(cid, None)
                    return None
                if n != v.count:
                    return await self._load(cid)
                v.checked = time.monotonic()
            return v
        return await self._load(cid)

    async def _load(self, cid: str) -> View | None:
        d = await self._read_view(cid)
        if d is None:
            self.views.pop(cid, None)
            return None
        v = View(cid, d["owner"], d["key_id"], d["digests"], d["tokens"], d["kinds"], d["reasoning"])
        self.views.pop(cid, None)
        return self.remember(v)

    async def _read_view(self, cid: str) -> dict[str, Any] | None:
        """What ``ConversationStore.load_view`` read, with what memory needs to know of each message
        (its role, whether an answer has tool calls or was cut short: ``kind``)."""
        got = await self.store.load_view(cid)
        if got is None:
            return None
        row, msgs = got
        return {"owner": row.owner, "key_id": row.key_id, "digests": [m.digest for m in msgs],
                "tokens": [m.tokens for m in msgs], "kinds": [kind(m.role, m.status, bool(m.calls)) for m in msgs],
                "reasoning": None}

    async def know_reasoning(self, v: View) -> None:
        """Read the hidden reasoning tokens of the answers this process did not store (a view read
        from the database), from their turns' usage: once, when memory first needs them."""
        if v.reasoning_known:
            return
        n = v.count
        for r in await self.store.load_reasoning(v.id, n):
            rt = reasoning_tokens(r.usage)
            if rt and r.tokens and r.completion_tokens and r.position not in v.reasoning:
                v.reasoning[r.position] = reasoning_share(rt, r.completion_tokens, r.tokens)
        v.reasoning_known = True

    async def history(self, v: View, start: int, prompt: tuple[int, int] = (0, 0)
                      ) -> tuple[list[tuple[dict[str, Any], int | None]], list[tuple[dict[str, Any], int | None]]]:
        """The messages at positions ``prompt`` = [a, b) (the system prompt memory pins) and at
        positions >= start, each with its token count."""
        n = v.count
        a, b = prompt
        if v.tail_start <= start:
            ts = v.tail_start
            rest = list(zip(v.tail[start - ts:], v.tokens[start:]))
            head: list[tuple[dict[str, Any], int | None]] | None = None
            if a >= b:
                head = []
            elif ts <= a:
                head = list(zip(v.tail[a - ts:b - ts], v.tokens[a:b]))
            elif v.pinned is not None and len(v.pinned) == b - a:
                head = list(zip(v.pinned, v.tokens[a:b]))
            if head is not None:
                return head, rest
        await self.settle(v)
        got = await self.store.load_messages(v.id, start, prompt)
        rest = [(m, t) for p, m, t in got if p >= start]
        head = [(m, t) for p, m, t in got if a <= p < b]
        if len(rest) == n - start:  # nothing appended meanwhile: refresh the cached tail (and prompt)
            keep = max(self.cfg.cache_messages, len(rest))
            pinned = [m for m, _ in head] if a < b and prompt == v.prompt else v.pinned
            v.set_tail(pinned, [m for m, _ in rest][-keep:])
        return head, rest

    def forget(self, cid: str) -> None:
        self.views.pop(cid, None)

    def forget_owner(self, owner: str) -> None:
        for cid in [c for c, v in self.views.items() if v.owner == owner]:
            self.views.pop(cid, None)
        for k in [k for k in self.names if k[0] == owner]:
            del self.names[k]

    async def named(self, owner: str, external_id: str, ttl: float | None) -> "Name":
        """The conversations of a client's name (``external_ids``), most recently used first, each
        with its first message's digest. Read from the database when not cached or older than
        ``ttl`` (another instance may have made one); those this process made and may not have
        written yet are kept in front."""
        key = (owner, external_id)
        got = self.names.get(key)
        now = time.monotonic()
        if got is not None and (ttl is None or now - got.checked <= ttl):
            self.names.move_to_end(key)
            return got
        stored = await self.store.named(owner, external_id, NAMED_READ)
        mine = got.ids if got is not None else []
        seen = {c for c, _ in mine}
        name = Name(now, (mine + [x for x in stored if x[0] not in seen])[:NAMED_READ],
                    got.full if got is not None else False)
        self.names[key] = name
        self.names.move_to_end(key)
        while len(self.names) > self.cfg.cache_conversations:
            self.names.popitem(last=False)
        return name

    def name_used(self, owner: str, external_id: str, cid: str, first: str | None, full: bool | None) -> None:
        """``cid`` (new, or chosen; ``first``: its first message's digest) is the name's most
        recently used conversation; ``full``: whether the request resent the stored history (None:
        unknown, as it was)."""
        got = self.names.get((owner, external_id))
        ids = [(cid, first)] + [x for x in (got.ids if got is not None else []) if x[0] != cid]
        was = got.full if got is not None else False
        self.names[(owner, external_id)] = Name(got.checked if got is not None else 0.0, ids[:NAMED_READ],
                                                was if full is None else full)


class Name:
    """What this process knows of a client's name: its conversations (id, first message's digest),
    most recently used first; when they were last read from the database; whether the client's
    last turn under it resent the stored history (a client that keeps its own)."""

    __slots__ = ("checked", "ids", "full")

    def __init__(self, checked: float, ids: list[tuple[str, str | None]], full: bool) -> None:
        self.checked, self.ids, self.full = checked, ids, full


def _rows(rec: Any) -> int:
    """A queued turn's weight: its message rows, and the turn's own."""
    return len(rec.messages) + 1
