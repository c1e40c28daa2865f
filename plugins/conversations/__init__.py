"""``conversations``: durable, ordered chat history with per-message tokens, and memory for stateless
backends.

Every ``POST .../chat/completions`` belongs to a conversation, named by the ``X-Conversation-ID``
request header (or a new one, returned in that response header). Only messages the conversation
does not have yet are stored (prefix matching by canonical JSON); a history that diverges from the
stored one starts a fork. The assistant answer is what the client actually received (the core's
``ctx.completion``), partial answers included. Writes go through the core's background writer.

With memory on, the stored history is prepended to what the client sent before forwarding. The
caller API (own conversations, on the public listener) lives under ``api_prefix``; the admin API
and the ``gateway conversations`` CLI manage everything. See docs/conversations.md.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import string
import time
from typing import Any, Literal

from pydantic import Field, field_validator

from gateway.context import RequestContext
from gateway.errors import error_body
from gateway.plugin import Plugin, PluginConfig, Reply

from .state import _GENERATED, _ID_OK, Shared, View, body_size
from .store import TurnRecord, dumps, fit, new_row, utcnow

log = logging.getLogger("gateway.conversations")

__all__ = ["Conversations", "ConversationsConfig"]

# digits in ASCII order, so ids made later sort after ids made earlier (byte-wise, as SQLite compares)
_B62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
ANONYMOUS = "anonymous"


# os.urandom bytes mapped to base62 characters: a byte below 248 (= 4 * 62) becomes _B62[b % 62],
# a byte from 248 up is discarded, so every character is exactly uniform (5.95 bits each).
_TO_B62 = bytes(ord(_B62[b % 62]) for b in range(256))
_DISCARD = bytes(range(248, 256))
_chars = ""
_second = -1
_prefix = ""


def new_id() -> str:
    """``conv_`` + 22 base62 characters: 6 for the creation second, then 16 from the OS CSPRNG
    (about 95 bits, so ids cannot be guessed). The time prefix makes ids made later sort later:
    the database inserts a new conversation's rows next to the newest ones instead of at random
    places in its indexes (a random id touches a different index page per row, which costs a
    page write per row once the tables outgrow the cache). Random characters are drawn from
    ``os.urandom`` 4 KiB at a time (one system call per ~250 ids)."""
    global _chars, _second, _prefix
    if len(_chars) < 16:
        _chars = os.urandom(4096).translate(_TO_B62, _DISCARD).decode("ascii")
    r, _chars = _chars[:16], _chars[16:]
    t = int(time.time())
    if t != _second:
        _second, n = t, t
        out = []
        for _ in range(6):
            n, d = divmod(n, 62)
            out.append(_B62[d])
        _prefix = "conv_" + "".join(reversed(out))
    return _prefix + r


def _forget_drawn() -> None:
    global _chars
    _chars = ""  # never share drawn characters with a forked child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_drawn)


_canon = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode
_qstr = json.encoder.encode_basestring  # what _canon writes for a str (ensure_ascii=False)


#: A reasoning model's thinking, stored with its answer (a non-streamed answer carries it in the
#: message) but not part of the message: clients send the answer back without it (as the backends
#: that produce it ask), and memory does not replay it (those backends refuse it in a request).
REASONING_KEYS = frozenset({"reasoning_content", "reasoning"})


def without_reasoning(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in REASONING_KEYS} if REASONING_KEYS.intersection(m) else m


def canonical(m: Any) -> str:
    """The form used to decide whether two messages are the same: keys sorted, empty values
    (``None``, ``""`` content or refusal, ``[]``, ``{}``) and reasoning dropped, tool calls reduced
    to id/type/name/arguments, audio to its id (the stored answer has the transcript and data the
    client got; OpenAI asks clients to send back ``{"id": ...}`` only)."""
    if type(m) is dict and len(m) == 2:
        # the common plain text message, written out directly (the same text the encoder makes)
        c = m.get("content")
        r = m.get("role")
        if type(c) is str and type(r) is str and c:
            return '{"content":' + _qstr(c) + ',"role":' + _qstr(r) + "}"
    if not isinstance(m, dict):
        return _canon(m)
    out: dict[str, Any] = {}
    for k, v in m.items():
        if v is None or v == [] or v == {} or (k in ("content", "refusal") and v == "") or k in REASONING_KEYS:
            continue
        if k == "audio" and type(v) is dict and v.get("id") is not None:
            v = {"id": v["id"]}
        if k == "tool_calls" and isinstance(v, list):
            v = [{"id": tc.get("id"), "type": tc.get("type") or "function",
                  "function": {"name": _fn(tc).get("name"), "arguments": _fn(tc).get("arguments")}}
                 if isinstance(tc, dict) else tc for tc in v]
        out[k] = v
    return _canon(out)


def replayable(history: list[tuple[dict[str, Any], int | None]], new: list[dict[str, Any]]
               ) -> tuple[list[tuple[dict[str, Any], int | None]], bool]:
    """The stored history as memory sends it upstream (and whether anything was changed), stored
    messages being what clients received, not always what a backend accepts back:

    * reasoning is left out, and audio reduced to ``{"id": ...}`` (as OpenAI asks; the base64
      data is not sent again; audio without an id is left out);
    * a tool call that no tool result answers right after it (one cut off mid-stream, or never
      run) is left out: backends reject an assistant's call without its result; so is a stored
      tool result whose call was left out;
    * an assistant message left with no content, refusal, audio or tool calls is not sent (a bare
      ``{"role": "assistant", "content": null}`` is rejected too).

    A changed message's token count becomes unknown (it was counted as stored)."""
    out: list[tuple[dict[str, Any], int | None]] = []
    changed = False
    seq = [m for m, _ in history] + list(new)
    calls: set[Any] = set()  # the ids of the tool calls kept in the last assistant message
    for i, (m, t) in enumerate(history):
        role = m.get("role")
        if role == "tool":
            if m.get("tool_call_id") not in calls:
                changed = True
                continue
            out.append((m, t))
            continue
        calls = set()
        if role != "assistant":
            out.append((without_reasoning(m), t))
            continue
        r = dict(without_reasoning(m))
        a = r.get("audio")
        if a is not None:
            if isinstance(a, dict) and a.get("id") is not None:
                r["audio"] = {"id": a["id"]}
            else:
                del r["audio"]
        tcs = r.get("tool_calls")
        if isinstance(tcs, list) and tcs:
            answered = set()
            for nxt in seq[i + 1:]:
                if not isinstance(nxt, dict) or nxt.get("role") != "tool":
                    break
                answered.add(nxt.get("tool_call_id"))
            kept = [tc for tc in tcs if isinstance(tc, dict) and tc.get("id") in answered]
            calls = {tc.get("id") for tc in kept}
            if kept:
                r["tool_calls"] = kept
            else:
                del r["tool_calls"]
        if not (r.get("content") or r.get("refusal") or r.get("audio") or r.get("tool_calls")):
            changed = True
            continue
        if r != without_reasoning(m):
            changed, t = True, None
        out.append((r, t))
    return out, changed


def _fn(tc: dict[str, Any]) -> dict[str, Any]:
    """A tool call's ``function`` (a client may send any JSON there)."""
    f = tc.get("function")
    return f if isinstance(f, dict) else {}


def digest(m: Any) -> str:
    # surrogatepass: a lone surrogate (a JSON escape a client may send) still hashes, deterministically
    return hashlib.blake2b(canonical(m).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def text_len(m: dict[str, Any]) -> int:
    """Characters of a message that the model reads: text content, text parts, tool-call name and
    arguments, plus the role (so an empty message still weighs something)."""
    c = m.get("content")
    n = len(str(m.get("role") or ""))
    if isinstance(c, str):
        n += len(c)
    elif isinstance(c, list):
        for p in c:
            if isinstance(p, dict):
                n += len(str(p.get("text") or ""))
    tcs = m.get("tool_calls")
    for tc in tcs if isinstance(tcs, list) else ():
        if isinstance(tc, dict):
            fn = _fn(tc)
            n += len(str(fn.get("name") or "")) + len(str(fn.get("arguments") or ""))
    return max(1, n)


def estimate_tokens(m: dict[str, Any]) -> int:
    return max(1, text_len(m) // 4)


def split_tokens(total: int, weights: list[int]) -> list[int]:
    """Distribute ``total`` over ``weights`` proportionally; the parts add up to ``total`` exactly."""
    s = sum(weights) or 1
    raw = [total * w / s for w in weights]
    parts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)[:total - sum(parts)]:
        parts[i] += 1
    return parts


class MemoryConfig(PluginConfig):
    enabled: bool = Field(False, description="Prepend the stored history to what the client sends "
                                             "(X-Conversation-Memory: on|off overrides per request).")
    max_messages: int | None = Field(50, ge=1, description="Most messages forwarded (history + new, "
                                                            "the system message included); null: no limit.")
    max_tokens: int | None = Field(None, ge=1, description="Most prompt tokens forwarded (stored counts; "
                                                           "estimated for new messages); null: no limit.")
    max_bytes: int | None = Field(None, ge=1, description="Most bytes of the forwarded request body: the oldest "
                                                          "history goes first (null: server.max_body_size). "
                                                          "New messages over it alone are forwarded as sent.")


class ConversationsConfig(PluginConfig):
    api_prefix: str = Field("/gateway/conversations",
                            description="Path prefix of the caller API on the public listener (never forwarded).")
    caller_api: bool = Field(True, description="Serve the caller API (list/read/delete own conversations).")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="Memory for stateless backends.")
    retention_days: float | None = Field(None, gt=0, le=36500, description="Delete conversations with no activity for "
                                                                 "this many days (background, hourly); null: keep.")
    retention_interval: float = Field(3600.0, gt=0, description="Seconds between retention runs.")
    queue_size: int = Field(10000, ge=1, description="Records the background writer may hold.")
    batch_size: int = Field(200, ge=1, description="Records written per database transaction.")
    flush_interval: float = Field(0.2, gt=0, description="Seconds the writer waits to fill a batch.")
    on_queue_full: Literal["wait", "drop"] = Field("wait", description="Queue full: wait up to queue_full_wait "
                                                                       "seconds then drop, or drop at once. "
                                                                       "Drops are counted.")
    queue_full_wait: float = Field(0.5, ge=0, description="Seconds to wait for room with on_queue_full: wait.")
    retry_for: float = Field(30.0, ge=0, description="Seconds a failing batch is retried before it is "
                                                     "counted as dropped.")
    cache_conversations: int = Field(10000, ge=1, description="Recent conversations kept in memory.")
    cache_messages: int = Field(64, ge=1, description="Newest messages kept in memory per cached conversation.")
    cache_bytes: int = Field(256 * 1024 * 1024, ge=0, description="Message bodies kept in memory for memory, "
                                                                   "all conversations together (bytes of their "
                                                                   "text, roughly); past it the least recently "
                                                                   "used are read from the database again.")
    cache_ttl: float | None = Field(5.0, ge=0, description="Seconds before a cached conversation is checked "
                                                           "against the database (catches appends by other "
                                                           "instances); 0: every request; null: never.")
    page_size: int = Field(50, ge=1, le=1000, description="Default page size of the caller and admin APIs "
                                                          "(lists, and a conversation's messages).")

    @field_validator("api_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.rstrip("/")
        if not v.startswith("/") or len(v) < 2:
            raise ValueError("must start with '/' and not be '/'")
        if v == "/v1" or v.startswith("/v1/"):
            raise ValueError("must not be under /v1 (the upstream's API)")
        return v


class Plan:
    __slots__ = ("view", "create", "parent_id", "fork_position", "base", "new", "new_digests", "forwarded",
                 "known", "memory", "owner", "key_id", "created_at")

    def __init__(self, view: View, create: bool, parent_id: str | None, fork_position: int | None, base: int,
                 new: list[dict[str, Any]], new_digests: list[str], forwarded: list[dict[str, Any]],
                 known: int | None, memory: bool, owner: str, key_id: str | None, created_at: Any) -> None:
        self.view, self.create, self.parent_id, self.fork_position, self.base = \
            view, create, parent_id, fork_position, base
        self.new, self.new_digests, self.forwarded, self.known = new, new_digests, forwarded, known
        self.memory, self.owner, self.key_id, self.created_at = memory, owner, key_id, created_at


#: The plugin's request headers: read here, never sent to the upstream.
_OUR_HEADERS = ("X-Conversation-ID", "X-Conversation-Memory")


def _not_found() -> Reply:
    return Reply(404, error_body("No conversation with this id exists for this caller.", "invalid_request_error",
                                 "conversation_not_found", "X-Conversation-ID"))


class Conversations(Plugin):
    name = "conversations"
    Config = ConversationsConfig
    observes_response = True
    uses_database = True

    def __init__(self, config: ConversationsConfig, services: Any) -> None:
        super().__init__(config, services)
        self.shared: Shared | None = None

    def public_prefixes(self) -> tuple[str, ...]:
        return (self.config.api_prefix,) if self.config.caller_api else ()

    async def startup(self) -> None:
        self.shared = Shared.get(self.services, self.config)
        self.shared.acquire(self)

    def activated(self) -> None:
        if self.shared is not None:
            self.shared.adopt(self.config)

    async def shutdown(self) -> None:
        if self.shared is not None:
            await self.shared.release(self)

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is written (tests, admin reads)."""
        assert self.shared is not None
        await self.shared.flush(timeout)

    # -- request ---------------------------------------------------------------------------------
    async def on_request(self, ctx: RequestContext) -> Reply | None:
        cfg = self.config
        path = ctx.path
        if cfg.caller_api and (path == cfg.api_prefix or path.startswith(cfg.api_prefix + "/")):
            from .api import caller_api
            return await caller_api(self, ctx)
        headers = ctx.request.headers
        for h in _OUR_HEADERS:
            if h in headers:
                ctx.upstream_headers[h] = None  # ours, never forwarded (on any path)
        if ctx.method != "POST" or not path.endswith("/chat/completions"):
            return None
        j = ctx.json
        msgs = j.get("messages") if isinstance(j, dict) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            return None  # not a chat request the upstream will accept; nothing to record
        memory = cfg.memory.enabled
        mh = headers.get("X-Conversation-Memory")
        if mh is not None:
            v = mh.strip().lower()
            if v in ("on", "true", "1", "yes"):
                memory = True
            elif v in ("off", "false", "0", "no"):
                memory = False
            else:
                ctx.refusal = {"plugin": self.name, "type": "invalid", "reason": "invalid_memory_header"}
                return Reply(400, error_body("X-Conversation-Memory must be 'on' or 'off' (or true/false, 1/0, "
                                             "yes/no).", "invalid_request_error",
                                             "invalid_header", "X-Conversation-Memory"))
        owner = ctx.owner or ANONYMOUS
        key_id = ctx.key_id
        shared = self.shared
        assert shared is not None
        try:
            digests = [digest(m) for m in msgs]
        except RecursionError:  # nested deeper than the gateway reads
            ctx.refusal = {"plugin": self.name, "type": "invalid", "reason": "too_deep"}
            return Reply(400, error_body("The messages are nested too deeply to be recorded.",
                                         "invalid_request_error", "invalid_value", "messages"))
        cid = headers.get("X-Conversation-ID")
        parent_id = fork_position = None
        if cid:
            cid = cid.strip()
            try:
                v = await shared.view(cid, cfg.cache_ttl) if _ID_OK(cid) else None
                if (v is None or v.owner != owner) and _GENERATED(cid):
                    # Made by another instance a moment ago? Its write may still be queued there.
                    # (Also waited for another owner's id: the time taken tells nothing about it.)
                    await asyncio.sleep(min(1.0, 2 * cfg.flush_interval + 0.1))
                    if v is None:
                        v = await shared.view(cid, cfg.cache_ttl)
            except Exception as e:
                log.warning("conversation store unavailable (request %s): %s", ctx.request_id, type(e).__name__)
                ctx.refusal = {"plugin": self.name, "type": "unavailable", "reason": "store_unavailable"}
                return Reply(503, error_body("The conversation store is unavailable; try again shortly.",
                                             "server_error", "conversation_store_unavailable", None),
                             {"Retry-After": "1"})
            if v is None or v.owner != owner:
                ctx.refusal = {"plugin": self.name, "type": "not_found", "reason": "conversation_not_found"}
                return _not_found()
            n = v.count
            k = 0
            while k < n and k < len(digests) and v.digests[k] == digests[k]:
                k += 1
            create = False
            if memory and k < n:
                # Memory: the client sends its new messages only. What matches the stored start is
                # a resent system prompt (dropped: the stored one is kept), or a coincidence (a
                # question asked again): no fork either way.
                s = 0
                while s < k and isinstance(msgs[s], dict) and msgs[s].get("role") in ("system", "developer"):
                    s += 1
                base, new, new_digests, start = v.count, msgs[s:], digests[s:], s
            else:
                if k < n:
                    parent_id, fork_position = v.id, k
                    v = shared.remember(v.fork(new_id(), k))
                    create = True
                base, new, new_digests, start = k, msgs[k:], digests[k:], k
        else:
            v = shared.remember(View(new_id(), owner, key_id))
            create, k, base, new, new_digests, start = True, 0, 0, msgs, digests, 0
        v.busy += 1
        forwarded = msgs
        known: int | None = None
        if memory and v.count:
            mem = cfg.memory
            try:
                stored = await shared.history(v, mem.max_messages)
            except Exception as e:
                v.busy -= 1
                log.warning("conversation history unavailable (request %s): %s", ctx.request_id, type(e).__name__)
                ctx.refusal = {"plugin": self.name, "type": "unavailable", "reason": "store_unavailable"}
                return Reply(503, error_body("The conversation store is unavailable; try again shortly.",
                                             "server_error", "conversation_store_unavailable", None),
                             {"Retry-After": "1"})
            # The forwarded body stays within a byte budget too (the server's max body size unless
            # memory.max_bytes says otherwise): room for the history is the budget less what the
            # client sent, plus the messages it resent that the stored ones replace. Measured
            # roughly (body_size: text lengths); the body made is checked, and if text that JSON
            # or UTF-8 makes longer took it over, fewer old messages are sent.
            budget = mem.max_bytes if mem.max_bytes is not None else ctx.settings.max_body
            room = budget - len(ctx.body) + sum(body_size(m) for m in msgs[:start])
            cap: int | None = None
            exact = None
            for attempt in range(4):
                history, taken = self._history(v, stored, new, room, cap)
                history, changed = replayable(history, new)
                replay = [m for m, _ in history]
                forwarded = replay + new
                if exact is not None or changed or len(history) != start or len(forwarded) != len(msgs):
                    # the history, then the client's messages from the first new one (``new``) on
                    if exact is None:
                        exact = ctx.json_exact  # re-serialised: the client's own numbers, exactly
                    ctx.set_json({**exact, "messages": replay + exact["messages"][start:]})
                over = len(ctx.body) - budget
                if over <= 0 or not taken:
                    break  # (the new messages alone over it: forwarded as they were accepted)
                room -= over
                cap = taken - 1 if attempt < 2 else 0
            toks = [t for _, t in history]
            known = None if any(t is None for t in toks) else sum(toks)  # type: ignore[misc]
        elif k:
            toks = v.tokens[:k]
            known = None if any(t is None for t in toks) else sum(toks)  # type: ignore[misc]
        elif not k:
            known = 0
        ctx.state[self.name] = Plan(view=v, create=create, parent_id=parent_id, fork_position=fork_position,
                                    base=base, new=new, new_digests=new_digests, forwarded=forwarded, known=known,
                                    memory=memory, owner=owner, key_id=key_id, created_at=utcnow())
        ctx.conversation_id = v.id
        ctx.response_headers["X-Conversation-ID"] = v.id
        if parent_id is not None:
            ctx.response_headers["X-Conversation-Parent-ID"] = parent_id
        return None

    def _history(self, v: View, stored: tuple[dict[str, Any] | None, int, list[tuple[dict[str, Any], int | None]]],
                 new: list[dict[str, Any]], room: float = float("inf"), cap: int | None = None
                 ) -> tuple[list[tuple[dict[str, Any], int | None]], int]:
        """The stored history to prepend (``stored``: what ``Shared.history`` read), trimmed oldest
        first to max_messages / max_tokens / ``room`` bytes (body_size) and at most ``cap`` of the
        messages that may go; a leading system (or developer) message is always kept, and the
        client's new messages are never cut. Also how many messages could still go."""
        mem = self.config.memory
        first, start, rest = stored
        pinned: list[tuple[dict[str, Any], int | None]] = []
        if first is not None and first.get("role") in ("system", "developer"):
            pinned = [(first, v.tokens[0] if v.tokens else None)]
            if start == 0:
                rest = rest[1:]
        # New tool results need the assistant message that called them (and any results stored after
        # it) whatever the budget: a tool result without its call is rejected upstream.
        must: list[tuple[dict[str, Any], int | None]] = []
        if new and isinstance(new[0], dict) and new[0].get("role") == "tool":
            for j in range(len(rest) - 1, -1, -1):
                m = rest[j][0]
                if m.get("role") == "assistant" and m.get("tool_calls"):
                    must, rest = rest[j:], rest[:j]
                    break
        n_budget = float("inf") if mem.max_messages is None else \
            mem.max_messages - len(new) - len(pinned) - len(must)
        t_budget = float("inf")
        if mem.max_tokens is not None:
            t_budget = mem.max_tokens - sum(estimate_tokens(m) for m in new) \
                - sum(t if t is not None else estimate_tokens(m) for m, t in pinned + must)
        if cap is not None:
            n_budget = min(n_budget, cap)
        b_budget = room - sum(body_size(m) for m, _ in pinned + must)
        taken: list[tuple[dict[str, Any], int | None]] = []
        for m, t in reversed(rest):
            if len(taken) >= n_budget:
                break
            cost = t if t is not None else estimate_tokens(m)
            if cost > t_budget:
                break
            size = body_size(m)
            if size > b_budget:
                break
            t_budget -= cost
            b_budget -= size
            taken.append((m, t))
        taken.reverse()
        while taken and taken[0][0].get("role") == "tool":
            taken.pop(0)  # a tool result without the assistant call that asked for it is rejected upstream
        return pinned + taken + must, len(taken)

    # -- completion ------------------------------------------------------------------------------
    async def on_complete(self, ctx: RequestContext) -> None:
        plan: Plan | None = ctx.state.pop(self.name, None)
        if plan is None:
            return
        v: View = plan.view
        v.busy -= 1
        comp = ctx.completion
        produced = ctx.source == "upstream" and 200 <= ctx.status < 300
        if ctx.outcome == "ok":
            # incomplete: the stream ended without a finish, or an event too large to read (over
            # 1 MiB) was relayed, so the stored text lacks part of what the client got
            status = ("complete" if comp is None or (comp.done and not comp.unread) else "incomplete") \
                if produced else "upstream_error"
        else:
            status = ctx.outcome
        usage = comp.usage if comp is not None else None
        prompt_tokens = comp.prompt_tokens if comp is not None else None
        completion_tokens = comp.completion_tokens if comp is not None else None
        model = (comp.model if comp is not None else None) or ctx.model
        model = fit(model, 200)
        latency = ctx.elapsed_ms(ctx.t_start)
        ttft = None
        if comp is not None and comp.t_first_token is not None:
            ttft = ctx.elapsed_ms(ctx.t_start, comp.t_first_token)
        elif ctx.t_first_byte is not None and produced:
            ttft = ctx.elapsed_ms(ctx.t_start, ctx.t_first_byte)
        now = utcnow()
        rid, key_id, owner = ctx.request_id, plan.key_id, plan.owner
        rows: list[dict[str, Any]] = []
        msgs: list[dict[str, Any]] = []
        digests: list[str] = []
        tokens: list[int | None] = []
        if produced:
            new_tokens = self._derive(plan, prompt_tokens)
            created = plan.created_at
            msgs.extend(plan.new)
            digests.extend(plan.new_digests)
            tokens.extend(new_tokens)
            rows = [new_row(m, d, t, t is not None, created, model, rid, key_id, owner)
                    for m, d, t in zip(plan.new, plan.new_digests, new_tokens)]
            asst = comp.assistant_message() if comp is not None else None
            if asst is not None and (status == "complete" or asst.get("content") or asst.get("tool_calls")
                                     or asst.get("refusal") or asst.get("audio")):
                t, derived = completion_tokens, comp is not None and comp.usage_stale
                if t is None and comp is not None and comp.deltas:
                    t, derived = comp.deltas0 if comp.choices > 1 else comp.deltas, True
                elif t is not None and comp is not None and comp.choices > 1:
                    # n > 1: the usage counts every choice; choice 0 (the one stored) gets its
                    # share: by its deltas in a stream, an even split otherwise (derived)
                    derived = True
                    t = round(t * comp.deltas0 / comp.deltas) if comp.deltas and comp.kind == "sse" \
                        else round(t / comp.choices)
                d = digest(asst)
                rows.append(new_row(asst, d, t, derived, now, model, rid, key_id, owner, status,
                                    comp.finish_reason if comp else None, latency, ttft))
                msgs.append(asst)
                digests.append(d)
                tokens.append(t)
        turn = {"model": model, "request_id": rid, "key_id": key_id, "owner": owner, "status": status, "http_status": ctx.status or None, "memory": plan.memory,
                "stream": ctx.stream_requested, "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": comp.total_tokens if comp is not None else None,
                "usage": dumps(usage) if usage is not None else None, "latency_ms": latency, "ttft_ms": ttft,
                "created_at": now}
        rec = TurnRecord(v.id, plan.owner, plan.key_id, plan.create, plan.parent_id, plan.fork_position,
                         plan.base, rows, turn, plan.created_at)
        if 0 < plan.base <= v.count:
            rec.prev_digest = v.digests[plan.base - 1]
        shared = self.shared
        assert shared is not None
        if v.deleted:
            # deleted (caller or admin API) while this turn ran: nothing is written, not even the
            # conversation this turn started
            shared.skipped.labels("deleted").inc()
            return
        if rows:
            if plan.base == v.count:
                # message bodies are cached only where memory may need them; otherwise digests suffice
                keep = self.config.cache_messages if plan.memory or self.config.memory.enabled else 0
                v.append(msgs, digests, tokens, keep)
            else:
                # Another request on this conversation (a second tab) appended since this one
                # looked: appending here too would give the cache both histories one after the
                # other. The writer decides (this turn continues the stored history or becomes a
                # fork of it: with memory too, this instance having seen the other turn end
                # first); the next request waits for it and reads the database again.
                v.stale = True
                rec.raced_here = True
        v.records.append(rec)
        if shared.views.get(v.id) is not v:
            cur = shared.views.get(v.id)
            if cur is not None:
                cur.stale = True
        def dropped() -> None:  # (also when this request's handler was cancelled meanwhile)
            if rec in v.records:
                v.records.remove(rec)
            v.stale = True

        await shared.writer.put(rec, on_drop=dropped)

    def _derive(self, plan: Plan, prompt_tokens: int | None) -> list[int | None]:
        """Token counts for the new input messages, from the upstream's prompt_tokens: what the prompt
        cost minus what the already-stored messages in it are known to cost, split over the new
        messages by character length. If that does not add up (unknown or larger stored counts),
        the new messages' share of the whole prompt by character length."""
        new = plan.new
        if prompt_tokens is None or not new:
            return [None] * len(new)
        if plan.known is not None and prompt_tokens - plan.known >= len(new):
            total = prompt_tokens - plan.known
            if len(new) == 1:
                return [total]
            weights = [text_len(m) for m in new]
        else:
            weights = [text_len(m) for m in new]
            all_chars = sum(text_len(m) for m in plan.forwarded) or 1
            total = round(prompt_tokens * sum(weights) / all_chars)
        return list(split_tokens(max(0, total), weights))

    # -- class-level extension points ---------------------------------------------------------------
    @classmethod
    def admin_routes(cls, services: Any) -> list[Any]:
        from .api import admin_routes
        return admin_routes(services)

    @classmethod
    def openapi_paths(cls) -> dict[str, Any]:
        from .api import openapi_paths
        return openapi_paths()

    @classmethod
    def add_cli(cls, subparsers: Any) -> None:
        from .cli import add_cli
        add_cli(subparsers)
