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
import re
import string
import time
from typing import Any, Literal

from pydantic import Field, field_validator

from gateway.context import ANONYMOUS, RequestContext
from gateway.errors import error_body
from gateway.estimate import definitions_chars
from gateway.plugin import Plugin, PluginConfig, Reply

from .state import (_GENERATED, _ID_OK, NAMED_KEPT, Shared, View, answered_to, body_size, reasoning_share, reasoning_tokens,
                    superseded)
from .store import TurnRecord, dumps, fit, new_row, utcnow

log = logging.getLogger("gateway.conversations")

__all__ = ["Conversations", "ConversationsConfig"]

# digits in ASCII order, so ids made later sort after ids made earlier (byte-wise, as SQLite compares)
_B62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


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


#: Fields of an answer that only a response has: not sent back when empty.
_RESPONSE_ONLY = ("tool_calls", "annotations", "refusal", "function_call", "audio")


def without_reasoning(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in REASONING_KEYS} if REASONING_KEYS.intersection(m) else m


def canonical(m: Any) -> str:
    """The form used to decide whether two messages are the same: keys sorted, empty values
    (``None``, ``""`` content or refusal, ``[]``, ``{}``) and reasoning dropped, tool calls reduced
    to id/type/name/arguments, audio to its id (the stored answer has the transcript and data the
    client got; OpenAI asks clients to send back ``{"id": ...}`` only), and an assistant message's
    ``parsed`` dropped (the OpenAI SDKs' ``.parse()`` adds the content decoded: sent back with the
    message, it is not an edit), and so are its ``extra_content`` and ``reasoning_details`` (a
    backend's own data, Gemini's and OpenRouter's signatures, that a client may or may not send
    back)."""
    if type(m) is dict and len(m) == 2:
        # the common plain text message, written out directly (the same text the encoder makes)
        c = m.get("content")
        r = m.get("role")
        if type(c) is str and type(r) is str and c:
            return '{"content":' + _qstr(c) + ',"role":' + _qstr(r) + "}"
    if not isinstance(m, dict):
        return _canon(m)
    out: dict[str, Any] = {}
    answer = m.get("role") == "assistant"
    for k, v in m.items():
        if v is None or v == [] or v == {} or (k in ("content", "refusal") and v == "") or k in REASONING_KEYS:
            continue
        if k in ("parsed", "extra_content", "reasoning_details") and answer:
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
      tool result whose call was left out, and one answered again further on in the same run of
      tool results (the tools run again after a failed turn, stored or new: the newest is sent);
    * an assistant message left with no content, refusal, audio or tool calls is not sent (a bare
      ``{"role": "assistant", "content": null}`` is rejected too);
    * an answer's response-only fields left empty are not sent: ``"tool_calls": []`` (vLLM sends
      it with every plain answer; strict backends reject an empty list), ``"annotations": []``,
      ``"refusal": null``, ``"function_call": null``, ``"audio": null``.

    A changed message's token count becomes unknown (it was counted as stored), unless only empty
    fields went."""
    out: list[tuple[dict[str, Any], int | None]] = []
    changed = False
    seq = [m for m, _ in history] + list(new)
    calls: set[Any] = set()  # the ids of the tool calls kept in the last assistant message
    for i, (m, t) in enumerate(history):
        role = m.get("role")
        if role == "tool":
            tid = m.get("tool_call_id")
            if tid not in calls:
                changed = True
                continue
            j = i + 1
            while j < len(seq) and isinstance(seq[j], dict) and seq[j].get("role") == "tool" \
                    and seq[j].get("tool_call_id") != tid:
                j += 1
            if j < len(seq) and isinstance(seq[j], dict) and seq[j].get("role") == "tool":
                changed = True  # the same call answered again further on (tools run again): the newest goes
                continue
            out.append((m, t))
            continue
        calls = set()
        if role != "assistant":
            out.append((without_reasoning(m), t))
            continue
        r = dict(without_reasoning(m))
        for key in _RESPONSE_ONLY:
            if key in r and r[key] in (None, [], "", {}):
                del r[key]
        cleaned = dict(r)
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
        if r != cleaned:
            changed, t = True, None
        elif r != without_reasoning(m):
            changed = True
        out.append((r, t))
    return out, changed


def _fn(tc: dict[str, Any]) -> dict[str, Any]:
    """A tool call's ``function`` (a client may send any JSON there)."""
    f = tc.get("function")
    return f if isinstance(f, dict) else {}


def digest(m: Any) -> str:
    # surrogatepass: a lone surrogate (a JSON escape a client may send) still hashes, deterministically
    return hashlib.blake2b(canonical(m).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


#: How tool-call arguments are written out again by clients that parse them and send them back
#: (separators, whether non-ASCII is escaped, whether ``<>&`` are): Python's ``json.dumps``
#: (LangChain), compact (OpenAI, ``JSON.stringify``), each with and without ``\uXXXX`` escapes, and
#: Go's ``encoding/json`` (compact, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped).
_ARGUMENT_FORMS = ((", ", ": ", True, False), (",", ":", True, False), (", ", ": ", False, False),
                   (",", ":", False, False), (",", ":", False, True))
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
                             "\u2029": "\\u2029"})

#: Forms are made (each a parse and a write of the arguments, on the event loop) for a message of at
#: most MAX_FORM_CALLS tool calls, and for at most MAX_FORM_CHARS characters of arguments per
#: request: past them a message is compared as sent.
MAX_FORM_CALLS = 128
MAX_FORM_CHARS = 1 << 20


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, unless a key is in it twice (then the text is not taken for JSON: written out
    again it would lose one value, and another text would match the stored one)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key")
    return d


def _argument_forms(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The assistant message ``m`` with its tool calls' arguments written each way of
    ``_ARGUMENT_FORMS`` (the parsed JSON's key order kept; arguments that are not JSON as sent),
    the forms that differ from ``m``."""
    calls = m.get("tool_calls")
    parsed: list[Any] = []
    for tc in calls:  # type: ignore[union-attr]
        a = _fn(tc).get("arguments") if isinstance(tc, dict) else None
        try:
            parsed.append(json.loads(a, object_pairs_hook=_unique_keys) if isinstance(a, str) else _NOT_JSON)
        except (ValueError, RecursionError):
            parsed.append(_NOT_JSON)
    if all(p is _NOT_JSON for p in parsed):
        return []
    out = []
    for item, key, ascii_only, go in _ARGUMENT_FORMS:
        tcs, differs = [], False
        for tc, p in zip(calls, parsed):  # type: ignore[arg-type]
            if p is not _NOT_JSON:
                try:
                    a = json.dumps(p, separators=(item, key), ensure_ascii=ascii_only)
                except (ValueError, RecursionError):
                    a = tc["function"]["arguments"]
                if go:  # (outside strings JSON has none of these characters)
                    a = a.translate(_GO_ESCAPES)
                if a != tc["function"]["arguments"]:
                    tc = {**tc, "function": {**tc["function"], "arguments": a}}
                    differs = True
            tcs.append(tc)
        if differs:
            out.append({**m, "tool_calls": tcs})
    return out


_NOT_JSON = object()

#: The digest of a resent assistant message -> the digests of its other argument forms: each
#: message's forms are made once, not again on every later turn of an agent loop (which resends
#: them all). A pure function of the message; emptied when full.
_FORM_DIGESTS: dict[str, tuple[str, ...]] = {}
FORM_DIGESTS_KEPT = 8192


def _forms(m: dict[str, Any], d0: str, budget: list[int]) -> tuple[str, ...]:
    """The digests of the other forms of the assistant message ``m`` (digest ``d0``), from the memo
    or made now, within the request's ``budget`` of argument characters (spent here)."""
    forms = _FORM_DIGESTS.get(d0)
    if forms is not None:
        return forms
    calls = m["tool_calls"]
    if len(calls) > MAX_FORM_CALLS:
        return ()
    size = sum(len(a) for a in (_fn(tc).get("arguments") if isinstance(tc, dict) else None for tc in calls)
               if isinstance(a, str))
    if size > budget[0]:
        return ()  # (not kept: another request has its own budget)
    budget[0] -= size
    forms = tuple(digest(f) for f in _argument_forms(m))
    if len(_FORM_DIGESTS) >= FORM_DIGESTS_KEPT:
        _FORM_DIGESTS.clear()
    _FORM_DIGESTS[d0] = forms
    return forms


def aligned(msgs: list[Any], digests: list[str], stored: list[str], anywhere: bool = False) -> list[str]:
    """``digests`` (of ``msgs``), where a resent assistant message differs from a stored one only
    in how its tool calls' arguments are written (blanks, ``\\uXXXX`` escapes: a client that parsed
    them and wrote them out again, as LangChain does), with the stored message's digest: the same
    answer, not an edit. By position (prefix matching): message i against stored message i, up to
    the first message that matches it in no form. ``anywhere`` (memory: a client's messages may
    sit at other positions than the stored ones): against any stored message, its own position's
    first."""
    out = digests
    have: set[str] | None = None
    budget = [MAX_FORM_CHARS]
    n = len(stored)
    for i, m in enumerate(msgs):
        d0 = digests[i]
        if not anywhere:
            if i >= n:
                break
            if d0 == stored[i]:
                continue
        tcs = m.get("tool_calls") if type(m) is dict and m.get("role") == "assistant" else None
        if not isinstance(tcs, list) or not tcs:
            if anywhere:
                continue
            break
        if anywhere:
            if have is None:
                have = set(stored)
            if d0 in have:
                continue
        forms = _forms(m, d0, budget)
        if i < n and stored[i] in forms:
            pick: str | None = stored[i]
        elif anywhere:
            pick = next((d for d in forms if d in have), None)  # type: ignore[operator]
        else:
            break
        if pick is not None:
            if out is digests:
                out = list(digests)
            out[i] = pick
    return out


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


#: Estimated prompt tokens of one message's framing (OpenAI counts 3 per message, 4 with a name) and of one
#: image part (OpenAI: 85 at low detail, 765 for a 1024x1024 image at high detail).
MESSAGE_TOKENS = 3
IMAGE_TOKENS = 765


def estimate_tokens(m: dict[str, Any]) -> int:
    """A message's prompt tokens, estimated: its text at 4 characters a token, IMAGE_TOKENS per
    image part, and MESSAGE_TOKENS for the message itself."""
    n = text_len(m) // 4 + MESSAGE_TOKENS
    c = m.get("content")
    if isinstance(c, list):
        n += IMAGE_TOKENS * sum(1 for p in c if isinstance(p, dict) and p.get("type") in ("image_url", "image"))
    return n


def replay_cost(v: View, m: dict[str, Any], t: int | None, p: int) -> int:
    """What a stored message is counted as against max_tokens: its stored count where known (for
    an answer, without the hidden reasoning, which is not sent again: ``t`` here already has it
    left out; plus the message's framing, which completion tokens do not include), else the
    estimate."""
    if t is None:
        return estimate_tokens(m)
    return t + MESSAGE_TOKENS if v.kinds[p] in ("a", "c", "x") else t


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
    max_tokens: int | None = Field(None, ge=1, description="Most prompt tokens forwarded, estimated (stored counts, "
                                                           "answers without hidden reasoning; text, framing and "
                                                           "images for new messages); null: no limit.")
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
    queue_messages: int = Field(200_000, ge=1, description="Message rows the background writer may hold, all "
                                                           "its records together (about 1 KB of memory each); "
                                                           "past it a record finds the queue full.")
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
    external_ids: bool = Field(False, description="Let clients name their conversations with ids of their own "
                                                  "(a chat front-end's chat id), read from external_id_header: "
                                                  "each name is the caller's own, and continues the stored "
                                                  "conversation of that name its messages match best.")
    external_id_header: str = Field("X-Conversation-ID", pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$",
                                    description="The request header holding a client's own conversation id. "
                                                "X-Conversation-ID: a value not in the gateway's id format is "
                                                "the client's own; another header (X-OpenWebUI-Chat-Id): read "
                                                "when X-Conversation-ID is not sent.")

    @field_validator("api_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        from gateway.config.model import prefix_problem

        bad = prefix_problem(v)
        if bad:
            raise ValueError(bad)
        v = v.rstrip("/")
        if len(v) < 2:
            raise ValueError("must not be '/'")
        if v.lower() == "/v1" or v.lower().startswith("/v1/"):
            raise ValueError("must not be under /v1 (the upstream's API)")
        return v


class Plan:
    __slots__ = ("view", "create", "parent_id", "fork_position", "base", "new", "new_digests", "forwarded",
                 "known", "memory", "owner", "key_id", "created_at", "replayed", "external_id")

    def __init__(self, view: View, create: bool, parent_id: str | None, fork_position: int | None, base: int,
                 new: list[dict[str, Any]], new_digests: list[str], forwarded: list[dict[str, Any]],
                 known: int | None, memory: bool, owner: str, key_id: str | None, created_at: Any) -> None:
        self.view, self.create, self.parent_id, self.fork_position, self.base = \
            view, create, parent_id, fork_position, base
        self.new, self.new_digests, self.forwarded, self.known = new, new_digests, forwarded, known
        self.memory, self.owner, self.key_id, self.created_at = memory, owner, key_id, created_at
        #: the body sent upstream is not the client's: memory added stored history to it
        self.replayed = False
        #: the client's name for the conversation (external_ids): a conversation made is given it
        self.external_id: str | None = None


#: A stored message memory may replay: the message, its replay token count, its position.
Stored = tuple[dict[str, Any], int | None, int]

#: Memory on: a request whose messages are wholly a stored conversation's first messages, ending
#: on a question answered since, is a regenerate when it holds at least this many (a question,
#: an answer, the question again: a client sending its new message alone never matches so much).
REGENERATE_MIN = 3

#: The plugin's request headers: read here, never sent to the upstream.
_OUR_HEADERS = ("X-Conversation-ID", "X-Conversation-Memory")
#: What a client's own conversation id may not hold: control characters, line and paragraph separators.
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]").search


def _not_found() -> Reply:
    return Reply(404, error_body("No conversation with this id exists for this caller.", "invalid_request_error",
                                 "conversation_not_found", "X-Conversation-ID"))


#: An id made this recently (seconds) that no instance has stored yet may be another instance's
#: late write (a busy machine, a database slow to take it): it is looked for during LATE_WRITE_WAIT
#: seconds before the 404.
RECENT_ID = 30
LATE_WRITE_WAIT = 3.0
#: Seconds a turn waits for its conversation from the database (a read, and a write of it still
#: under way) before 503 conversation_store_unavailable: a database that does not answer (frozen,
#: a table locked, a network cut with no reset) must not hold every caller for as long.
VIEW_WAIT = 10.0


def id_age(cid: str) -> float | None:
    """Seconds since a generated id was made (its first six characters after ``conv_`` are the
    second it was made, in base 62); None for an id that is not one of ours."""
    if not _GENERATED(cid):
        return None
    n = 0
    for ch in cid[5:11]:
        n = n * 62 + _B62.index(ch)
    return time.time() - n



class Conversations(Plugin):
    name = "conversations"
    Config = ConversationsConfig
    observes_response = True
    uses_database = True
    rewrites_body = True  # memory adds the history (a rate limit ahead admits the turn again on it)
    #: The shared writer's settings and the shared cache's size (Shared.adopt: the instance
    #: activated last would set them for every route).
    route_fixed = ("queue_size", "queue_messages", "batch_size", "flush_interval", "on_queue_full", "queue_full_wait", "retry_for",
                   "cache_conversations", "cache_messages", "cache_bytes")

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
    async def _find(self, cid: str, owner: str, age: float | None, ttl: float | None) -> Any:
        """The conversation's view, None if there is none (or not yet: see RECENT_ID). ``ttl``: how
        old a cached view may be before it is checked against the database."""
        shared, cfg = self.shared, self.config
        assert shared is not None
        v = await shared.view(cid, ttl) if _ID_OK(cid) else None
        if (v is None or v.owner != owner) and _GENERATED(cid):
            # Made by another instance a moment ago? Its write may still be queued there.
            # (Also waited for another owner's id: the time taken tells nothing about it.)
            first = min(1.0, 2 * cfg.flush_interval + 0.1)
            await asyncio.sleep(first)
            if v is None:
                v = await shared.view(cid, ttl)
            if (v is None or v.owner != owner) and age is not None and -5 < age < RECENT_ID:
                # made moments ago: another instance's write of it may be late. Another owner's
                # recent id waits as long (only waits: were it answered sooner, the time would
                # tell that it exists).
                until = time.monotonic() + LATE_WRITE_WAIT - first
                while (v is None or v.owner != owner) and time.monotonic() < until:
                    await asyncio.sleep(0.25)
                    if v is None:
                        v = await shared.view(cid, ttl)
        return v

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
        if ctx.method != "POST" or not ctx.lpath.endswith("/chat/completions"):
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
        external = None
        if cfg.external_ids:
            h = cfg.external_id_header
            if h.lower() == "x-conversation-id":
                # (a value beginning as the gateway's ids do is one of them, mistyped or cut short:
                # unknown, not a name)
                if cid and not cid.strip().startswith("conv_"):
                    external, cid = cid, None
            elif not cid:
                external = headers.get(h)
            if external is not None:
                external = external.strip()
                if not external or len(external) > 200 or _UNSAFE_NAME(external):
                    ctx.refusal = {"plugin": self.name, "type": "invalid", "reason": "invalid_conversation_id"}
                    return Reply(400, error_body(f"{h} must be 1 to 200 characters, without control characters.",
                                                 "invalid_request_error", "invalid_header", h))
                try:
                    async with asyncio.timeout(VIEW_WAIT):
                        cid = await self._named(owner, external, msgs, digests, memory)
                except Exception as e:
                    log.warning("conversation store unavailable (request %s): %s", ctx.request_id,
                                type(e).__name__)
                    ctx.refusal = {"plugin": self.name, "type": "unavailable", "reason": "store_unavailable"}
                    return Reply(503, error_body("The conversation store is unavailable; try again shortly.",
                                                 "server_error", "conversation_store_unavailable", None),
                                 {"Retry-After": "1"})
        parent_id = fork_position = None
        lead_new, resent, lead_n = False, [], 0  # (memory: see _memory_new)
        stored_again: list[int] = []  # resent positions stored again (a retry that adds a message)
        if cid:
            cid = cid.strip()
            age = id_age(cid)  # (as the request came: the reads below may wait)
            try:
                # With memory the stored history goes to the upstream: a conversation deleted
                # elsewhere (the CLI, another instance) must not be sent, however fresh the cache
                # entry (one primary-key read per memory turn).
                async with asyncio.timeout(VIEW_WAIT):
                    v = await self._find(cid, owner, age, 0.0 if memory else cfg.cache_ttl)
            except Exception as e:
                log.warning("conversation store unavailable (request %s): %s", ctx.request_id, type(e).__name__)
                ctx.refusal = {"plugin": self.name, "type": "unavailable", "reason": "store_unavailable"}
                return Reply(503, error_body("The conversation store is unavailable; try again shortly.",
                                             "server_error", "conversation_store_unavailable", None),
                             {"Retry-After": "1"})
            if (v is None or v.owner != owner) and age is not None and -5 < age < RECENT_ID \
                    and shared.writer.failing_for(60.0):
                # Made moments ago, and the database has been refusing this instance's writes: the
                # instance that made it may not have been able to write it yet either.
                ctx.refusal = {"plugin": self.name, "type": "unavailable", "reason": "store_unavailable"}
                return Reply(503, error_body("The conversation store is not taking writes; this conversation may "
                                             "not be stored yet: try again shortly.", "server_error",
                                             "conversation_store_unavailable", None), {"Retry-After": "1"})
            if v is None or v.owner != owner:
                ctx.refusal = {"plugin": self.name, "type": "not_found", "reason": "conversation_not_found"}
                return _not_found()
            n = v.count
            raw = digests  # (what is stored for a new message: the digest of its own text)
            digests = aligned(msgs, digests, v.digests)
            k = 0
            while k < n and k < len(digests) and v.digests[k] == digests[k]:
                k += 1
            create = False
            if memory and REGENERATE_MIN <= k == len(msgs) < answered_to(v.kinds, n) \
                    and msgs[-1].get("role") == "user":
                # A client that keeps its own history, memory on, regenerating an answer: its whole
                # history again, without the stored answer(s) after it. Not new messages to add
                # after the stored history (the model would see the chat twice): the request
                # goes as sent, and its answer is a fork, as without memory.
                memory = False
            if memory and k < n:
                # Memory: the client sends its new messages only (see _memory_new): a resent system
                # prompt, a resent history and a resent unanswered tail (a retry) are not stored
                # again; no fork.
                digests = aligned(msgs, raw, v.digests, anywhere=True)
                s, lead_new, start, resent = self._memory_new(v, msgs, digests)
                lead_n = s if lead_new else 0
                r = start + len(resent)
                base = v.count
                if resent and r < len(msgs) and all(v.kinds[p] != "x" for p in resent) \
                        and "x" in v.kinds[resent[-1]:]:
                    # A retry past a cut answer that adds a message: the retried messages are
                    # stored again, before the new ones (state.superseded then leaves the cut
                    # answer and the first copies out of later turns, as the upstream got them now).
                    r, stored_again = start, resent
                new = msgs[:lead_n] + msgs[r:]
                new_digests = raw[:lead_n] + raw[r:]
            else:
                if k < n:
                    parent_id, fork_position = v.id, k
                    v = shared.remember(v.fork(new_id(), k))
                    create = True
                base, new, new_digests, start = k, msgs[k:], raw[k:], k
            if memory and not new and not (resent or (k == n and self._unanswered(v))):
                # Nothing new and nothing retried (no messages, or only the current system prompt, or
                # a history with nothing after its last answer): nothing to ask the model.
                ctx.refusal = {"plugin": self.name, "type": "invalid", "reason": "nothing_new"}
                return Reply(400, error_body("With memory on, messages must hold at least one message the "
                                             "conversation does not have yet (or the unanswered ones again, "
                                             "to retry).", "invalid_request_error", "invalid_value", "messages"))
        else:
            v = shared.remember(View(new_id(), owner, key_id))
            create, k, base, new, new_digests, start = True, 0, 0, msgs, digests, 0
        v.busy += 1
        forwarded = msgs
        known: int | None = None
        exact: Any = None  # (set once the body is made anew: the history added to it)
        if memory and v.count:
            mem = cfg.memory
            lead = msgs[:lead_n]  # a new system prompt: sent first, as the client sent it
            client = msgs[start:]  # the client's other messages, after the history (a resent tail too)
            try:
                head, cands, must = await self._stored(v, client, lead_new, resent)
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
            budget = mem.max_bytes if mem.max_bytes is not None else ctx.max_body
            room = budget - len(ctx.body) + sum(body_size(m) for m in msgs[lead_n:start])
            cap: int | None = None
            for attempt in range(4):
                kept, taken = self._history(v, head, cands, must, lead + client, room, cap)
                # unchanged: the history is what the client sent before ``start`` (a resent system
                # prompt, or the whole history resent), in that order
                same = not lead_new and [v.digests[p] for _, _, p in kept] == digests[:start]
                history, changed = replayable([(m, t) for m, t, _ in kept], client)
                replay = [m for m, _ in history]
                forwarded = lead + replay + client
                if exact is not None or changed or not same:
                    # the history, then the client's messages from the first new one (``new``) on
                    if exact is None:
                        exact = ctx.json_exact  # re-serialised: the client's own numbers, exactly
                    em = exact["messages"]
                    ctx.set_json({**exact, "messages": em[:lead_n] + replay + em[start:]})
                over = len(ctx.body) - budget
                if over <= 0 or not taken:
                    break  # (the new messages alone over it: forwarded as they were accepted)
                room -= over
                cap = taken - 1 if attempt < 2 else 0
            toks = [t for _, t in history] + [v.tokens[p] for p in resent if p not in stored_again]
            known = None if any(t is None for t in toks) else sum(toks)  # type: ignore[misc]
        elif k:
            toks = v.tokens[:k]
            known = None if any(t is None for t in toks) else sum(toks)  # type: ignore[misc]
        elif not k:
            known = 0
        plan = ctx.state[self.name] = Plan(
            view=v, create=create, parent_id=parent_id, fork_position=fork_position, base=base, new=new,
            new_digests=new_digests, forwarded=forwarded, known=known, memory=memory, owner=owner, key_id=key_id,
            created_at=utcnow())
        plan.replayed = exact is not None
        if external is not None:
            plan.external_id = external
            if create:
                v.external_id = external
            # (a stored conversation continued or forked: did the client resend its history?)
            full = None if create and parent_id is None else k >= 2
            shared.name_used(owner, external, v.id, digests[0] if digests else None, full)
        ctx.conversation_id = v.id
        ctx.response_headers["X-Conversation-ID"] = v.id
        if parent_id is not None:
            ctx.response_headers["X-Conversation-Parent-ID"] = parent_id
        return None

    async def _named(self, owner: str, external: str, msgs: list[Any], digests: list[str], memory: bool
                     ) -> str | None:
        """The conversation a client's name continues: of the owner's conversations of that name
        that begin with the request's first message (the 8 most recently used), the one whose
        stored messages the request's match furthest (of equals, the one holding more, then the
        most recently used). None: none matches (a new chat's first turn; a front-end's side
        request, a title or follow-ups, sent under the chat's id; a chat whose first message was
        edited): a new conversation of that name. With memory on, a client that sends its new
        messages only matches nothing: the name's most recently used conversation, unless the
        client's last turn under the name resent the stored history (a front-end keeping its own:
        what matches nothing is a side request)."""
        shared = self.shared
        assert shared is not None
        ttl = 0.0 if memory else self.config.cache_ttl
        name = await shared.named(owner, external, ttl)
        first = digests[0] if digests else None
        best, best_k, best_n, tried = None, 0, 0, 0
        for c, f in name.ids:
            if f is not None and f != first:
                continue
            tried += 1
            if tried > NAMED_KEPT:
                break
            v = await shared.view(c, ttl)
            if v is None or v.owner != owner:
                continue
            mine = aligned(msgs, digests, v.digests)
            k, n = 0, min(v.count, len(mine))
            while k < n and v.digests[k] == mine[k]:
                k += 1
            if k > best_k or (k == best_k and k and v.count > best_n):
                best, best_k, best_n = c, k, v.count
        if best is not None or not memory or name.full:
            return best
        for c, _ in name.ids:
            v = await shared.view(c, ttl)
            if v is not None and v.owner == owner:
                return c
        return None

    @staticmethod
    def _unanswered(v: View) -> list[int]:
        """The unanswered tail: the stored positions after the last complete answer, cut answers
        and system prompts left out (the question, or the tool results, of a failed turn)."""
        kinds = v.kinds
        return [i for i in range(answered_to(kinds, v.count), v.count) if kinds[i] not in ("s", "x")]

    @staticmethod
    def _resent(v: View, body: list[str], lo: int, hi: int, optional: set[int]) -> tuple[int, list[int]] | None:
        """Whether ``body`` starts with the stored messages at positions [lo, hi), each system
        message, cut answer and ``optional`` one there optional (sent again or not): how many of
        ``body`` that takes and the positions they are; None if it does not. Every way through is
        tried (an optional message the client's next one matches may still be one it left out:
        a cut answer with the text its retry gave again), the one taking most of ``body`` kept."""
        digests, kinds = v.digests, v.kinds
        frontier: dict[int, None] = {0: None}  # how much of body the ways so far have taken
        steps: list[dict[int, tuple[int, bool]]] = []  # per position: taken -> (taken before, matched)
        for i in range(lo, hi):
            nxt: dict[int, tuple[int, bool]] = {}
            skip = kinds[i] in ("s", "x", "t") or i in optional
            for j in frontier:
                if j < len(body) and digests[i] == body[j]:
                    nxt.setdefault(j + 1, (j, True))
                if skip:
                    nxt.setdefault(j, (j, False))
            if not nxt:
                return None
            steps.append(nxt)
            frontier = dict.fromkeys(nxt)
        j = max(frontier)
        end, got = j, []
        for i in range(hi - 1, lo - 1, -1):  # (the way back)
            j, took = steps[i - lo][j]
            if took:
                got.append(i)
        got.reverse()
        return end, got

    @classmethod
    def _memory_new(cls, v: View, msgs: list[dict[str, Any]], digests: list[str]
                    ) -> tuple[int, bool, int, list[int]]:
        """Memory: what of the client's messages is new. Returns how many leading system/developer
        messages it sent, whether they are a new system prompt, where in ``msgs`` its messages
        after the history it resent begin (``start``), and the stored positions it sent again
        from there on (a retry: ``msgs[start:start + len(resent)]``).

        * Its leading system/developer messages equal to the current system prompt (the newest
          stored run of them) are a resent prompt: dropped. Different ones are a new system
          prompt: stored (appended: nothing stored is overwritten) and sent instead of the old.
        * A client that keeps its own history: when its other messages start with the stored
          ones up to the last complete answer (system messages and cut answers there may be in
          it or not: a changed prompt, a partial answer the client never showed), those are a
          resent history: dropped, memory sends its own.
        * A retry: a turn failed (an error, or the answer cut short: the client was told of an
          error) and the client sends its messages again. The stored messages after the last
          complete answer, cut answers left out (the unanswered tail), whose end the client's
          messages (after the system prompt and any resent history) start with, are resent:
          not stored again, and sent once (as the client sent them)."""
        s = 0
        while s < len(msgs) and msgs[s].get("role") in ("system", "developer"):
            s += 1
        a, b = v.prompt
        lead_new = s > 0 and digests[:s] != v.digests[a:b]
        tail = cls._unanswered(v)
        p = answered_to(v.kinds, v.count)
        body = digests[s:]
        start = s
        if p and body:
            optional = superseded(v.kinds, v.digests) if "x" in v.kinds else set()
            # From the start; or, for a client whose history once diverged (an edit, taken as new
            # messages), from where it last began again (the newest stored copy of its first message).
            starts = [0] + [i for i in range(p - 1, 0, -1) if v.digests[i] == body[0]]
            for lo in starts:
                got = cls._resent(v, body, lo, p, optional)
                if got is not None and (lo == 0 or got[0]):
                    start += got[0]
                    body = body[got[0]:]
                    break
        for q in tail:
            got = cls._resent(v, body, q, v.count, set())
            if got is not None and got[0]:
                return s, lead_new, start, got[1]
        return s, lead_new, start, []

    async def _stored(self, v: View, client: list[dict[str, Any]], lead_new: bool, resent: list[int]
                      ) -> tuple[list[Stored], list[Stored], int | None]:
        """The stored messages memory may replay: the system prompt to pin (none when the client
        sent a new one), the others it may send (oldest first: no system message, none the client
        resent, none a retry replaced (``state.superseded``), no answer cut short unless a new
        question followed it, and of cut answers one right after the other only the last), each
        with its replay token count (hidden reasoning left out) and position; and the position of
        the assistant message whose tool calls the client's tool results answer, if they do. Read
        far enough back for max_messages of them, and for that assistant message and the question
        that led to it, however far back."""
        shared = self.shared
        assert shared is not None
        mem = self.config.memory
        n, kinds = v.count, v.kinds
        prompt = (0, 0) if lead_new else v.prompt
        skip = set(resent)
        gone = superseded(kinds, v.digests) if "x" in kinds else set()

        def usable(p: int) -> bool:
            k = kinds[p]
            if k == "s" or p in skip or p in gone:
                return False
            if k != "x":
                return True
            # An answer cut short is left out where a retry answered its question (the client was
            # told of an error, and sent the question or tool results again). It stays where a new
            # question followed it (the client showed it, as after a stop button; leaving it out
            # would give two user messages in a row, which strict chat templates refuse).
            # Of cut answers one after the other (a regenerated answer stopped again), the last.
            q = p + 1
            while q < n and kinds[q] == "s":
                q += 1
            if q < n and kinds[q] == "x":
                return False
            if q < n:
                return kinds[q] == "u"
            return not skip and bool(client) and client[0].get("role") == "user"

        must = asker = None
        if client and client[0].get("role") == "tool":
            # the newest assistant message with tool calls, if only tool results came after it
            p = n - 1
            while p >= 0 and (not usable(p) or kinds[p] == "t"):
                p -= 1
            if p >= 0 and kinds[p] == "c":
                must = q = p
                while q > 0 and not (kinds[q - 1] == "u" and usable(q - 1)):
                    q -= 1
                asker = q - 1 if q > 0 else None
        lo = n
        if mem.max_messages is None:
            lo = 0
        else:
            got = 0
            while lo > 0 and got < mem.max_messages:
                lo -= 1
                got += usable(lo)
        for p in (must, asker):
            if p is not None:
                lo = min(lo, p)
        head, rest = await shared.history(v, lo, prompt)
        await shared.know_reasoning(v)
        rest = rest[:n - lo]  # (what another instance appended since this one looked is not known here)

        def replay_tokens(t: int | None, p: int) -> int | None:
            return t if t is None else max(0, t - v.reasoning.get(p, 0))

        pinned = [(m, replay_tokens(t, p), p) for p, (m, t) in enumerate(head, prompt[0])]
        cands = [(m, replay_tokens(t, p), p) for p, (m, t) in enumerate(rest, lo) if usable(p)]
        return pinned, cands, must

    def _history(self, v: View, pinned: list[Stored], cands: list[Stored], must: int | None,
                 forced: list[dict[str, Any]], room: float = float("inf"), cap: int | None = None
                 ) -> tuple[list[Stored], int]:
        """The stored history to prepend (from ``_stored``), trimmed oldest first to max_messages /
        max_tokens / ``room`` bytes (body_size) and at most ``cap`` of the messages that may go;
        the system prompt (``pinned``) is always kept, and the client's messages (``forced``) are
        never cut. New tool results get the assistant message that called them (and any results
        stored after it) whatever the budget: a tool result without its call is rejected
        upstream. What is kept of the rest starts with a user message (strict chat templates
        want the user first after the system prompt): a cut never leaves an answer or a tool
        result first. Also how many messages could still go."""
        mem = self.config.memory
        j = len(cands)
        if must is not None:
            j = next((i for i, c in enumerate(cands) if c[2] == must), j)
        rest, kept = cands[:j], cands[j:]
        n_budget = float("inf") if mem.max_messages is None else \
            mem.max_messages - len(forced) - len(pinned) - len(kept)
        t_budget = float("inf")
        if mem.max_tokens is not None:
            t_budget = mem.max_tokens - sum(estimate_tokens(m) for m in forced) \
                - sum(replay_cost(v, m, t, p) for m, t, p in pinned + kept)
        if cap is not None:
            n_budget = min(n_budget, cap)
        b_budget = room - sum(body_size(m) for m, _, _ in pinned + kept)
        taken: list[Stored] = []
        for m, t, p in reversed(rest):
            if len(taken) >= n_budget:
                break
            cost = replay_cost(v, m, t, p)
            if cost > t_budget:
                break
            size = body_size(m)
            if size > b_budget:
                break
            t_budget -= cost
            b_budget -= size
            taken.append((m, t, p))
        taken.reverse()
        while taken and v.kinds[taken[0][2]] != "u":
            taken.pop(0)  # (an answer, or a tool call and its results, whose question was trimmed away)
        return pinned + taken + kept, len(taken)

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
        statuses: list[str | None] = []
        reasoning: dict[int, int] = {}
        if produced:
            body = ctx.json
            new_tokens = self._derive(plan, prompt_tokens, definitions_chars(body) if isinstance(body, dict) else 0)
            created = plan.created_at
            msgs.extend(plan.new)
            digests.extend(plan.new_digests)
            tokens.extend(new_tokens)
            statuses.extend([None] * len(plan.new))
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
                rt = reasoning_tokens(usage)
                if rt and t and completion_tokens:
                    # (memory leaves the hidden reasoning out of the answer's replay cost; the
                    # stored count stays what the upstream reported)
                    reasoning[len(msgs)] = reasoning_share(rt, completion_tokens, t)
                msgs.append(asst)
                digests.append(d)
                tokens.append(t)
                statuses.append(status)
        # A stream without a usage report (or a valid output count in it): its deltas, as the audit
        # event, key usage, metrics and the trace count them (its usage stays null)
        relayed = comp.relayed_tokens if comp is not None else None
        if comp is None and ctx.cut_estimate is not None:
            # cut before the response head, the upstream reading the prompt: its estimate, as
            # every other view records it
            prompt_tokens, relayed = ctx.cut_estimate, 0
        turn = {"model": model, "request_id": rid, "key_id": key_id, "owner": owner, "status": status, "http_status": ctx.status or None, "memory": plan.memory,
                "stream": ctx.stream_requested,
                # (nor its prompt's: the gateway's estimate; the messages' own counts stay unknown)
                "prompt_tokens": comp.input_tokens if comp is not None and relayed is not None else prompt_tokens,
                "completion_tokens": completion_tokens if relayed is None else relayed,
                # (a report without a valid output count: its total counts that count)
                "total_tokens": comp.total_tokens if comp is not None and relayed is None else None,
                "usage": dumps(usage) if usage is not None else None, "latency_ms": latency, "ttft_ms": ttft,
                "created_at": now}
        rec = TurnRecord(v.id, plan.owner, plan.key_id, plan.create, plan.parent_id, plan.fork_position,
                         plan.base, rows, turn, plan.created_at)
        rec.external_id = plan.external_id
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
                v.append(msgs, digests, tokens, keep, statuses, reasoning)
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

    def _derive(self, plan: Plan, prompt_tokens: int | None, defs_chars: int = 0) -> list[int | None]:
        """Token counts for the new input messages, from the upstream's prompt_tokens: what the prompt
        cost minus what the already-stored messages in it are known to cost and the tool
        definitions' estimate (``defs_chars`` characters of them: in the prompt, in no message),
        split over the new messages by character length. If that does not add up (unknown or
        larger stored counts), the new messages' share of the whole prompt by character length."""
        new = plan.new
        if prompt_tokens is None or not new:
            return [None] * len(new)
        rest = None if plan.known is None else prompt_tokens - plan.known - (defs_chars + 3) // 4
        if rest is not None and rest >= len(new):
            total = rest
            if len(new) == 1:
                return [total]
            weights = [text_len(m) for m in new]
        else:
            weights = [text_len(m) for m in new]
            all_chars = (sum(text_len(m) for m in plan.forwarded) + defs_chars) or 1
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
