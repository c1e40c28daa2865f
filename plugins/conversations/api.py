"""The caller API (public listener, own conversations only) and the admin API (admin listener)."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from gateway.admin import admin_identity
from gateway.context import ANONYMOUS
from gateway.errors import error_body, json_error
from gateway.plugin import Reply

from ..key_auth.keys import NOT_A_KEY_ID, key_id_of
from .state import _GENERATED, _ID_OK, Shared
from .store import dumps, parse_time, text_ok, utcnow

if TYPE_CHECKING:
    from gateway.context import RequestContext

    from . import Conversations

log = logging.getLogger("gateway.conversations")
MAX_LIMIT = 1000
MAX_DAYS = 36500  # older_than_days: a century
#: Admin exports running at once; more wait their turn. Each reads through the connection pool the
#: request path uses (key lookups, the writers): many exports must not keep the database busy for it.
MAX_CONCURRENT_EXPORTS = 2
#: An export is written to the client in pieces of about this many bytes, with a turn for the
#: event loop's other tasks between them (one piece of tens of megabytes stalled every request).
FLUSH_BYTES = 2**20


class BadParam(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _param(q: Any, name: str) -> str | None:
    """A query parameter; an empty one (``?after=``) or ``null`` (a client's template filled with
    a null ``next_after``) is none."""
    v = q.get(name)
    return None if v in ("", "null") else v


def _limit(q: Any, default: int) -> int:
    try:
        n = int(_param(q, "limit") or default)
    except ValueError:
        raise BadParam("limit", "limit must be an integer.") from None
    if not 1 <= n <= MAX_LIMIT:
        raise BadParam("limit", f"limit must be 1..{MAX_LIMIT}.")
    return n


def _after(q: Any) -> int:
    try:
        n = int(_param(q, "after") or -1)
    except ValueError:
        raise BadParam("after", "after must be a message position (integer).") from None
    if not -1 <= n < 2**31:
        raise BadParam("after", "after must be a message position (-1 .. 2147483647).")
    return n


def _time(q: Any, name: str) -> dt.datetime | None:
    v = q.get(name)
    if not v:
        return None
    try:
        return parse_time(v)
    except ValueError:
        raise BadParam(name, f"{name} must be an ISO 8601 time, e.g. 2026-01-31T00:00:00Z.") from None


def _text(q: Any, name: str) -> str | None:
    """A text filter (owner, key_id, q ...), refused (400) when the database cannot hold it (a NUL,
    a lone surrogate): checked before a query, and before a streamed response sends its status."""
    v = q.get(name)
    if v is not None and not text_ok(v):
        raise BadParam(name, f"{name} contains a character that cannot be stored or searched for (e.g. NUL).")
    return v


def _key_id(q: Any) -> str | None:
    """The ``key_id`` filter: a key id, or a whole key (pasted when hunting a leaked one: its id is
    taken). Anything else is refused: it could never match, and an empty list would read as "this
    key started nothing". The value is not echoed (it may be a secret)."""
    v = q.get("key_id")
    if v is None or v == "":
        return None
    kid = key_id_of(v)
    if kid is None:
        raise BadParam("key_id", f"key_id: {NOT_A_KEY_ID}.")
    return kid


def _err_reply(status: int, message: str, code: str, param: str | None = None,
               type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, error_body(message, type_, code, param), headers or {})


# -- caller API ---------------------------------------------------------------------------------------
async def caller_api(plugin: "Conversations", ctx: "RequestContext") -> Reply:
    """``GET {prefix}`` list, ``GET {prefix}/{id}`` read, ``DELETE {prefix}/{id}`` delete, for the
    caller's own owner. Served by the gateway; never forwarded upstream."""
    cfg = plugin.config
    shared = plugin.shared
    assert shared is not None
    store = shared.store
    owner = ctx.owner or ANONYMOUS
    rest = ctx.path[len(cfg.api_prefix):].strip("/")
    q = ctx.request.query
    ctx.refusal = {"plugin": plugin.name, "type": "served", "reason": "conversations_api"}
    try:
        if rest == "":
            if ctx.method != "GET":
                return _err_reply(405, "Use GET to list conversations.", "method_not_allowed",
                                  headers={"Allow": "GET"})  # (RFC 9110: a 405 names what is allowed)
            await shared.settle_owner(owner)
            # (a first turn that failed before any answer, often retried by the client as new
            # conversations, leaves an empty one: readable by its id, not listed here)
            data, nxt = await store.list(owner=owner, limit=_limit(q, cfg.page_size), cursor=_param(q, "cursor"),
                                         stored_only=True, external_id=_text(q, "external_id"))
            return Reply.json(200, {"object": "list", "data": data, "has_more": nxt is not None,
                                    "next_cursor": nxt})
        if "/" in rest or not _ID_OK(rest):
            return _err_reply(404, "No conversation with this id exists for this caller.", "conversation_not_found")
        cid = rest
        if ctx.method == "GET":
            after, limit = _after(q), _limit(q, cfg.page_size)
            v = shared.views.get(cid)
            mine = v is not None and v.owner == owner and not v.deleted
            if mine:
                await shared.settle(v, 5.0)
            conv = await store.get(cid)
            starting = conv is None and mine and v.busy > 0  # type: ignore[union-attr]
            if (conv is None or conv["owner"] != owner) and not starting and _GENERATED(cid):
                # Made by another instance a moment ago? Its write may still be queued there. (Also
                # waited for another owner's id, cached here or not, so the time taken tells
                # nothing about what exists.)
                await asyncio.sleep(min(1.0, 2 * cfg.flush_interval + 0.1))
                if conv is None:
                    conv = await store.get(cid)
            if conv is None and starting:
                # The caller's own conversation, its first turn still running (the id came in
                # that turn's response headers): it exists, with nothing stored yet.
                return Reply.json(200, {**_starting(v), "messages": [], "has_more": False,  # type: ignore[arg-type]
                                        "next_after": None})
            if conv is None or conv["owner"] != owner:
                return _err_reply(404, "No conversation with this id exists for this caller.",
                                  "conversation_not_found")
            msgs, more = await store.messages(cid, after=after, limit=limit)
            return Reply.json(200, {**conv, "messages": msgs, "has_more": more,
                                    "next_after": msgs[-1]["position"] if more and msgs else None})
        if ctx.method == "DELETE":
            v = shared.views.get(cid)
            running = False
            if v is not None and v.owner == owner and not v.deleted:
                running = v.busy > 0
                ok = await _delete_cached(shared, v, lambda: store.delete(cid, owner=owner))
            else:
                ok = await store.delete(cid, owner=owner)
            if not ok and not running:
                return _err_reply(404, "No conversation with this id exists for this caller.",
                                  "conversation_not_found")
            shared.forget(cid)
            plugin.services.events.emit("conversation.deleted", actor=f"owner:{owner}", conversation_id=cid,
                                        owner=owner, key_id=ctx.key_id)
            return Reply.json(200, {"id": cid, "object": "conversation.deleted", "deleted": True})
        return _err_reply(405, "Use GET or DELETE on a conversation.", "method_not_allowed",
                          headers={"Allow": "GET, DELETE"})
    except BadParam as e:
        return _err_reply(400, str(e), "invalid_value", e.param)
    except ValueError as e:
        return _err_reply(400, str(e), "invalid_value", "cursor")
    except Exception as e:
        log.warning("conversation API failed (request %s): %s", ctx.request_id, type(e).__name__)
        return _err_reply(503, "The conversation store is unavailable; try again shortly.",
                          "conversation_store_unavailable", type_="server_error")


def _starting(v: Any) -> dict[str, Any]:
    """A conversation whose first turn is still running, as ``conversation_out`` shows a stored one:
    nothing stored yet (no times, no counts), ``in_progress: true``."""
    return {"id": v.id, "object": "conversation", "owner": v.owner, "key_id": v.key_id, "parent_id": v.parent,
            "fork_position": v.count if v.parent is not None else None, "created_at": None, "updated_at": None,
            "message_count": 0, "turn_count": 0, "prompt_tokens": 0, "completion_tokens": 0, "model": None,
            "external_id": v.external_id, "in_progress": True}


async def _delete_cached(shared: Shared, v: Any, delete: Callable[[], Awaitable[bool]]) -> bool:
    """Delete a conversation this process has cached: its turns still running write nothing once
    they end (``View.deleted``: not even a conversation their first turn would create), what is
    queued is written first, then the database's rows go. If that fails, the cache entry is read
    from the database again at its next use (a turn that ended meanwhile was not kept)."""
    v.deleted = True
    try:
        await shared.settle(v, 5.0)
        return await delete()
    except BaseException:
        v.deleted = False
        v.stale = True
        raise


# -- admin API ----------------------------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bad(e: BadParam) -> web.Response:
    return web.Response(status=400, body=error_body(str(e), "invalid_request_error", "invalid_value", e.param),
                        content_type="application/json")


def _not_found() -> web.Response:
    return json_error(404, "No such conversation.", "invalid_request_error", "conversation_not_found")


def admin_routes(services: Any) -> list[Any]:
    def shared() -> Shared:
        return Shared.get(services)

    exports = asyncio.Semaphore(MAX_CONCURRENT_EXPORTS)

    async def fresh(s: Shared) -> None:
        if s.users and not s.closed:  # a running plugin: make its queued writes visible first
            try:
                await s.flush(5.0)
            except TimeoutError:
                pass

    def guarded(fn: Handler) -> Handler:
        async def h(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request)
            except BadParam as e:
                return _bad(e)
        return h

    async def list_(request: web.Request) -> web.Response:
        s = shared()
        await fresh(s)
        q = request.query
        try:
            data, nxt = await s.store.list(owner=_text(q, "owner"), key_id=_key_id(q), since=_time(q, "since"),
                                           until=_time(q, "until"), q=_text(q, "q") or None,
                                           limit=_limit(q, s.cfg.page_size), cursor=_param(q, "cursor"),
                                           external_id=_text(q, "external_id"))
        except BadParam:
            raise
        except ValueError:
            raise BadParam("cursor", "cursor is not valid.") from None
        return web.json_response({"object": "list", "data": data, "has_more": nxt is not None, "next_cursor": nxt})

    async def show(request: web.Request) -> web.Response:
        s = shared()
        await fresh(s)
        cid = request.match_info["cid"]
        conv = await s.store.get(cid)
        if conv is None:
            return _not_found()
        q = request.query
        msgs, more = await s.store.messages(cid, after=_after(q), limit=_limit(q, s.cfg.page_size))
        out = {**conv, "messages": msgs, "has_more": more, "next_after": msgs[-1]["position"] if more and msgs else None}
        if q.get("turns") in ("1", "true", "yes"):
            # the turns that stored this page's messages (the last page: and those that stored none)
            out["turns"] = await s.store.turns(cid, msgs[0]["position"] if msgs else _after(q) + 1,
                                               msgs[-1]["position"] if more else None)
        return web.json_response(out, dumps=dumps)

    async def stream_jsonl(request: web.Request, name: str, **where: Any) -> tuple[web.StreamResponse, int, bool]:
        s = shared()
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": "application/x-ndjson; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{name}.jsonl"'})
        n = 0  # messages written to the response (not just read)
        complete = False
        async with exports:
            if request.transport is None or request.transport.is_closing():
                log.info("conversation export: client went away while waiting its turn")
                return resp, n, complete
            buf: list[str] = []
            size = 0
            try:
                await resp.prepare(request)
                async for m in s.store.export(**where):
                    line = dumps(m)
                    buf.append(line)
                    size += len(line) + 1
                    if size >= FLUSH_BYTES:
                        await resp.write(("\n".join(buf) + "\n").encode())
                        n += len(buf)
                        buf.clear()
                        size = 0
                        await asyncio.sleep(0)  # (a write the socket takes at once does not wait)
                if buf:
                    await resp.write(("\n".join(buf) + "\n").encode())
                    n += len(buf)
                await resp.write_eof()
                complete = True
            except (ConnectionResetError, OSError):
                log.info("conversation export: client went away after %d message(s)", n)
            except Exception as e:  # headers are sent: all we can do is cut the stream short
                log.error("conversation export failed after %d message(s): %s", n, type(e).__name__)
                if request.transport is not None:
                    request.transport.close()
        return resp, n, complete

    async def export_one(request: web.Request) -> web.StreamResponse:
        s = shared()
        await fresh(s)
        cid = request.match_info["cid"]
        if not text_ok(cid) or await s.store.get(cid) is None:
            return _not_found()
        resp, n, complete = await stream_jsonl(request, cid, cid=cid)
        services.events.emit("conversation.exported", actor=admin_identity(request), conversation_id=cid, messages=n,
                             complete=complete)
        return resp

    async def export_owner(request: web.Request) -> web.StreamResponse:
        owner = _text(request.query, "owner")  # checked before the 200 is sent
        if not owner:
            raise BadParam("owner", "owner is required (export of one owner's conversations).")
        await fresh(shared())
        resp, n, complete = await stream_jsonl(request, "conversations", owner=owner)
        services.events.emit("conversation.exported", actor=admin_identity(request), owner=owner, messages=n,
                             complete=complete)
        return resp

    async def delete_one(request: web.Request) -> web.Response:
        s = shared()
        cid = request.match_info["cid"]
        v = s.views.get(cid) if not s.closed else None
        running = v is not None and not v.deleted and v.busy > 0
        await fresh(s)
        conv = await s.store.get(cid)
        if v is not None and not v.deleted:
            ok = await _delete_cached(s, v, lambda: s.store.delete(cid))
        else:
            ok = conv is not None and await s.store.delete(cid)
        if not ok and not running:  # (a new conversation whose first turn is still running: deleted)
            return _not_found()
        s.forget(cid)
        services.events.emit("conversation.deleted", actor=admin_identity(request), conversation_id=cid,
                             owner=conv["owner"] if conv is not None else v.owner)  # type: ignore[union-attr]
        return web.json_response({"id": cid, "object": "conversation.deleted", "deleted": True})

    async def delete_owner(request: web.Request) -> web.Response:
        owner = request.query.get("owner")
        if not owner:
            raise BadParam("owner", "owner is required (this deletes every conversation of that owner).")
        s = shared()
        # The owner's first turns still running here (a new conversation, nothing stored yet)
        # write nothing once they end: their conversation would come back after the erasure.
        # (Appends to the stored ones are skipped by the writer once they are gone; forks of them
        # too.)
        views = [] if s.closed else [v for v in s.views.values()
                                     if v.owner == owner and not v.deleted and v.busy > 0 and v.count == 0]
        running = {v.id for v in views}
        for v in views:
            v.deleted = True
        actor = admin_identity(request)
        try:
            await fresh(s)
            ids = await s.store.delete_owner(owner, each=lambda n: services.events.emit(
                "conversation.deleted", actor=actor, owner=owner, deleted=n))  # (per committed part)
        except BaseException:
            for v in views:
                v.deleted, v.stale = False, True
            raise
        s.forget_owner(owner)
        return web.json_response({"object": "conversation.deleted", "owner": owner,
                                  "deleted": len(running.union(ids))})

    async def purge(request: web.Request) -> web.Response:
        try:
            days = float(request.query.get("older_than_days", ""))
        except ValueError:
            raise BadParam("older_than_days", "older_than_days must be a number of days (> 0).") from None
        if not 0 < days <= MAX_DAYS:
            raise BadParam("older_than_days", f"older_than_days must be a number of days (> 0, at most {MAX_DAYS}).")
        s = shared()
        await fresh(s)
        actor = admin_identity(request)
        # as retention does: a conversation with a turn running (or queued) here is active, whatever
        # its stored last activity says
        ids = await s.store.purge(utcnow() - dt.timedelta(days=days), keep=s.active(),
                                  each=lambda n: services.events.emit(
                                      "conversations.purged", actor=actor, older_than_days=days,
                                      deleted=n))  # (per committed part)
        for cid in ids:
            s.forget(cid)
        return web.json_response({"object": "conversations.purged", "older_than_days": days, "deleted": len(ids)})

    async def no_head(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, ["GET"])

    return [
        web.get("/conversations", guarded(list_)),
        web.delete("/conversations", guarded(delete_owner)),
        # No HEAD on the exports: aiohttp would run the whole export, and record it, for a HEAD. An
        # explicit 405 (a bare allow_head=False would let HEAD fall through to /conversations/{cid}).
        web.get("/conversations/export", guarded(export_owner), allow_head=False),
        web.head("/conversations/export", no_head),
        web.post("/conversations/purge", guarded(purge)),
        web.get("/conversations/{cid}", guarded(show)),
        web.get("/conversations/{cid}/export", guarded(export_one), allow_head=False),
        web.head("/conversations/{cid}/export", no_head),
        web.delete("/conversations/{cid}", guarded(delete_one)),
    ]


def _p(name: str, where: str, desc: str, required: bool = False, type_: str = "string") -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "description": desc, "schema": {"type": type_}}


# -- OpenAPI response schemas -----------------------------------------------------------------------------
# What the admin handlers above answer, field for field (store.conversation_out, store.message_out,
# store.turns): a client generated from the document gets typed responses. tests/test_openapi_schemas.py
# checks real responses against them.
def _obj(props: dict[str, Any], required: list[str] | None = None, closed: bool = True) -> dict[str, Any]:
    """An object schema; ``closed``: the gateway builds it, no other keys (required: every one)."""
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": list(props) if required is None else required}
    if closed:
        out["additionalProperties"] = False
    return out


def _json(schema: dict[str, Any], description: str, media: str = "application/json") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}}


_STR, _INT, _NUM, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
_STR_N, _INT_N, _NUM_N = {"type": ["string", "null"]}, {"type": ["integer", "null"]}, {"type": ["number", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_CONVERSATION_FIELDS: dict[str, Any] = {
    "id": _STR, "object": {"const": "conversation"}, "owner": _STR, "key_id": _STR_N,
    "parent_id": {"type": ["string", "null"], "description": "The conversation this one was forked from."},
    "fork_position": {"type": ["integer", "null"], "description": "Messages taken from the parent."},
    "created_at": _TIME, "updated_at": {**_TIME, "description": "Last activity."},
    "message_count": _INT, "turn_count": _INT, "prompt_tokens": _INT, "completion_tokens": _INT,
    "model": {"type": ["string", "null"], "description": "Model of the last turn."},
    "external_id": {"type": ["string", "null"], "description": "The client's own id for the conversation "
                                                               "(external_ids), forks included."},
}
CONVERSATION = _obj(_CONVERSATION_FIELDS)
#: A stored message: the message as the client sent it (or the assistant's answer) in an envelope of
#: the gateway's fields. Open: any other key of the client's message is kept as it was sent.
MESSAGE = _obj({
    "object": {"const": "conversation.message"}, "conversation_id": _STR,
    "position": {"type": "integer", "description": "0, 1, 2 ... within the conversation."},
    "role": _STR,
    "content": {"type": ["string", "array", "null"], "description": "As sent (text, content parts) or answered."},
    "name": _STR, "tool_calls": {"type": "array"}, "tool_call_id": _STR,
    "tokens": _INT_N, "tokens_derived": {"type": "boolean", "description": "tokens is derived, not reported."},
    "model": _STR_N, "request_id": _STR_N, "key_id": _STR_N, "owner": _STR, "created_at": _TIME,
    # assistant messages only
    "status": {"type": ["string", "null"], "description": "Assistant messages: complete, incomplete, "
                                                          "client_disconnected ... (null: from the client's history)."},
    "finish_reason": _STR_N, "latency_ms": _NUM_N, "ttft_ms": _NUM_N,
}, ["object", "conversation_id", "position", "role", "content", "tokens", "tokens_derived", "model", "request_id",
    "key_id", "owner", "created_at"], closed=False)
TURN = _obj({
    "conversation_id": _STR, "request_id": _STR_N, "key_id": _STR_N, "owner": _STR, "model": _STR_N,
    "status": {"type": "string", "description": "complete, incomplete, upstream_error, client_disconnected ..."},
    "http_status": _INT_N, "memory": _BOOL, "stream": _BOOL, "first_position": _INT_N, "messages_stored": _INT,
    "prompt_tokens": _INT_N, "completion_tokens": _INT_N, "total_tokens": _INT_N,
    "latency_ms": _NUM_N, "ttft_ms": _NUM_N,
    "usage": {"type": ["object", "null"], "description": "The usage the upstream reported, as reported."},
    "created_at": _TIME,
})
CONVERSATION_LIST = _obj({"object": {"const": "list"}, "data": {"type": "array", "items": CONVERSATION},
                          "has_more": _BOOL, "next_cursor": {"type": ["string", "null"],
                                                             "description": "cursor of the next page."}})
CONVERSATION_DETAIL = _obj({
    **_CONVERSATION_FIELDS, "messages": {"type": "array", "items": MESSAGE}, "has_more": _BOOL,
    "next_after": {"type": ["integer", "null"], "description": "after of the next page."},
    "turns": {"type": "array", "items": TURN, "description": "With turns=true only."},
}, [*_CONVERSATION_FIELDS, "messages", "has_more", "next_after"])
DELETED_ONE = _obj({"id": _STR, "object": {"const": "conversation.deleted"}, "deleted": {"const": True}})
DELETED_OWNER = _obj({"object": {"const": "conversation.deleted"}, "owner": _STR,
                      "deleted": {"type": "integer", "description": "Conversations deleted."}})
PURGED = _obj({"object": {"const": "conversations.purged"}, "older_than_days": _NUM,
               "deleted": {"type": "integer", "description": "Conversations deleted."}})
_NDJSON = "application/x-ndjson"
_E = {"description": "Error (OpenAI error shape)",
      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_CID = _p("cid", "path", "Conversation id", True)
_PAGE = [_p("limit", "query", "Page size (1..1000)", type_="integer"),
         _p("after", "query", "Return messages after this position", type_="integer")]


def openapi_paths() -> dict[str, Any]:
    return {
        "/conversations": {
            "get": {"summary": "List/search conversations, newest activity first", "parameters": [
                _p("owner", "query", "Only this owner"), _p("key_id", "query", "Only conversations started by this key"),
                _p("since", "query", "Last activity at or after (ISO 8601)"),
                _p("until", "query", "Last activity before (ISO 8601)"),
                _p("q", "query", "Text search in message content (case-insensitive)"),
                _p("external_id", "query", "Only conversations of this client's own id (external_ids)"),
                _p("limit", "query", "Page size (1..1000, default 50)", type_="integer"),
                _p("cursor", "query", "next_cursor of the previous page")],
                "responses": {"200": _json(CONVERSATION_LIST, "A page of conversations"), "400": _E, "401": _E}},
            "delete": {"summary": "Delete every conversation of an owner (right to erasure)",
                       "parameters": [_p("owner", "query", "Owner whose conversations are deleted", True)],
                       "responses": {"200": _json(DELETED_OWNER, "Deleted"), "400": _E, "401": _E}},
        },
        "/conversations/export": {"get": {
            "summary": "Export an owner's conversations as JSONL (streamed, one line per message)",
            "parameters": [_p("owner", "query", "Owner", True)],
            "responses": {"200": _json(MESSAGE, "JSON lines; the schema is one line's", _NDJSON),
                          "400": _E, "401": _E}}},
        "/conversations/purge": {"post": {
            "summary": "Delete conversations with no activity for N days",
            "parameters": [_p("older_than_days", "query", "Days", True, "number")],
            "responses": {"200": _json(PURGED, "Purged"), "400": _E, "401": _E}}},
        "/conversations/{cid}": {
            "get": {"summary": "One conversation with its messages (paginated by position)",
                    "parameters": [_CID, *_PAGE, _p("turns", "query", "Include per-request usage rows (true)")],
                    "responses": {"200": _json(CONVERSATION_DETAIL, "The conversation and a page of its messages"),
                                  "404": _E, "401": _E}},
            "delete": {"summary": "Delete one conversation", "parameters": [_CID],
                       "responses": {"200": _json(DELETED_ONE, "Deleted"), "404": _E, "401": _E}},
        },
        "/conversations/{cid}/export": {"get": {
            "summary": "Export one conversation as JSONL (streamed, one line per message)", "parameters": [_CID],
            "responses": {"200": _json(MESSAGE, "JSON lines; the schema is one line's", _NDJSON),
                          "404": _E, "401": _E}}},
    }
