"""Admin API: ``GET /audit`` (filtered, paginated) and ``GET /audit/verify``."""
from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from gateway.context import parse_address
from gateway.errors import json_error

from ..key_auth.keys import NOT_A_KEY_ID, key_id_of
from . import store
from .chain import chain_keys, parse_head

MAX_LIMIT = 1000
#: Recorded heads one verify compares at most.
MAX_HEADS = 100
_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UINT = re.compile(r"[0-9]+")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
FILTERS = ("since", "until", "type", "key_id", "owner", "ip", "status")
#: Admin reads of the trail (pages, verify walks) running at once; more wait their turn. They use
#: the connection pool the request path uses (key lookups, usage writes): a dashboard firing many
#: slow reads must not take every connection.
MAX_CONCURRENT_READS = 2


def parse_time(v: str) -> str:
    """ISO 8601 (``2026-01-31``, ``2026-01-31T12:00:00Z``, with offset), a Unix time, or a
    relative age (``15m``, ``24h``, ``7d``: that long ago) -> the stored timestamp format."""
    v = v.strip()
    m = _REL.match(v)
    if m:
        return store.iso(time.time() - float(m.group(1)) * _UNIT[m.group(2)])
    try:
        return store.iso(float(v))
    except ValueError:
        pass
    s = v[:-1] + "+00:00" if v.endswith(("Z", "z")) else v
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return store.iso(dt.timestamp())


def ip_filter(v: str) -> str:
    """An ``ip`` filter as the trail stores addresses: ``2001:DB8:0::1`` is ``2001:db8::1``, an
    IPv4-mapped address or one with a port is the IPv4 address. Raises ValueError for what is no
    address (a filter that can never match would read as "no such events")."""
    ip = parse_address(v.strip())
    if ip is None:
        raise ValueError("ip: expected one IP address (203.0.113.7 or 2001:db8::1)")
    return str(ip)


def parse_filters(get: Any) -> dict[str, Any]:
    """Validate filter values (raises ValueError with a message naming the bad one)."""
    f: dict[str, Any] = {}
    for k in FILTERS:
        v = get(k)
        if v in (None, ""):
            continue
        if k in ("since", "until"):
            try:
                f[k] = parse_time(v)
            except (ValueError, OverflowError, OSError):  # out-of-range times too
                raise ValueError(f"{k}: expected ISO 8601 time, Unix seconds or an age like 24h") from None
        elif k == "status":
            store.status_filter(v)  # raises "status: expected ..."
            f[k] = str(v).strip().lower()
        elif k == "ip":
            f[k] = ip_filter(str(v))
        elif k == "key_id":
            # A whole key pasted (hunting a leaked one) means its id; anything else that is no
            # key id could never match, and an empty answer would read as "never used".
            kid = key_id_of(str(v))
            if kid is None:
                raise ValueError(f"key_id: {NOT_A_KEY_ID}")
            f[k] = kid
        else:
            f[k] = str(v)
    return f


def routes(services: Any) -> list[Any]:
    reads = asyncio.Semaphore(MAX_CONCURRENT_READS)

    async def list_events(request: web.Request) -> web.Response:
        q = request.query
        try:
            f = parse_filters(q.get)
            raw = q.get("limit", "100")
            if not _UINT.fullmatch(raw):  # ASCII digits (int() also takes "²", " 5", "1_0")
                if raw[:1] == "-" and _UINT.fullmatch(raw[1:]):
                    raise ValueError(f"limit: expected 1..{MAX_LIMIT}")
                raise ValueError("limit: expected an integer")
            limit = int(raw) if len(raw) <= 9 else MAX_LIMIT + 1
            if not 1 <= limit <= MAX_LIMIT:
                raise ValueError(f"limit: expected 1..{MAX_LIMIT}")
            raw = q.get("cursor")
            if raw and not (_UINT.fullmatch(raw) and len(raw) <= 18):  # an event seq: fits a BIGINT
                raise ValueError("cursor: expected next_cursor from the previous page")
            cursor = int(raw) if raw else None
            order = q.get("order", "desc")
            if order not in ("asc", "desc"):
                raise ValueError("order: expected asc or desc")
        except ValueError as e:
            msg = str(e)  # each check above names its parameter ("cursor: expected ...")
            param = msg.split(":", 1)[0]
            return json_error(400, msg, "invalid_request_error", "invalid_value", param=param)
        async with reads:
            data, nxt = await store.query(services.db, f, limit=limit, cursor=cursor, order=order)
        return web.json_response({"object": "list", "data": data,
                                  "next_cursor": str(nxt) if nxt is not None else None})

    async def verify(request: web.Request) -> web.Response:
        try:
            heads = [parse_head(h) for h in request.query.getall("head", [])]
            if len(heads) > MAX_HEADS:
                raise ValueError(f"at most {MAX_HEADS} recorded heads at once")
        except ValueError as e:
            return json_error(400, f"head: {e}", "invalid_request_error", "invalid_value", param="head")
        async with reads:
            try:
                res = await store.verify(services.db, chain_keys(services).keys, heads)
            except store.KeyNeeded as e:
                return json_error(409, str(e), "invalid_request_error", "chain_key_required")
        return web.json_response({**res.as_dict(), "message": res.message()})

    return [web.get("/audit", list_events), web.get("/audit/verify", verify)]


_ERR = {"description": "Error (OpenAI error shape)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _param(name: str, desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": desc,
            "schema": schema or {"type": "string"}}


# -- OpenAPI response schemas -----------------------------------------------------------------------------
# What the handlers above answer, field for field (events.build for request events, events.bus_event
# and store.purge for the others, store._out, chain.VerifyResult): a client generated from the document
# gets typed responses. tests/test_openapi_schemas.py checks real responses against them.
_S, _I, _N, _B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
_SN, _IN, _NN = {"type": ["string", "null"]}, {"type": ["integer", "null"]}, {"type": ["number", "null"]}
_ENVELOPE: dict[str, Any] = {
    "seq": {"type": "integer", "description": "Position in the chain: 1, 2, 3 ... with no gaps."},
    "time": {"type": "string", "format": "date-time", "description": "UTC, fixed width (sorts as text)."},
    "hash": {"type": "string", "description": "SHA-256 (hex) of the previous row's hash and this record."},
}
#: One request that reached the chain (events.REQUEST_FIELDS, then the optional fields of build()).
REQUEST_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        **_ENVELOPE,
        "type": {"type": "string", "enum": ["request", "auth_failure", "rate_limited"]},
        "request_id": _S, "trace_id": _SN, "key_id": _SN, "owner": _SN,
        "team": {"type": ["string", "null"], "description": "The key's team when the request was made."},
        "client_ip": _SN, "method": _S,
        "path": {"type": "string", "description": "A gateway key in the path is masked."},
        "route": _S, "model": _SN, "response_model": _SN, "status": {"type": "integer", "description": "HTTP status"},
        "answered_by": {"type": "string",
                        "enum": ["client_abort", "gateway", "gateway_refusal", "upstream", "error"]},
        "source": {"type": "string", "enum": ["upstream", "gateway"]},
        "outcome": {"type": "string", "description": "ok, refused, error, client_disconnected, gateway_shutdown, "
                                                     "upstream_error, upstream_timeout, upstream_disconnected"},
        "error": {"type": ["string", "null"], "description": "Error code when the gateway produced an error."},
        "latency_ms": _N, "upstream_ms": _NN, "upstream_headers_ms": _NN, "overhead_ms": _N, "ttfb_ms": _NN,
        "tokens_in": _IN, "tokens_out": _IN, "streamed": _B, "bytes_in": _I, "bytes_out": _I,
        "conversation_id": _SN,
        "tokens_estimated": {"const": True, "description": "Present when tokens_out counts a stream's deltas "
                                                          "(no usage reported), and tokens_in, unless "
                                                          "reported, is the gateway's prompt estimate."},
        "upstream_request_id": {"type": "string", "description": "The upstream's own X-Request-ID (relayed to "
                                                                  "the client as X-Upstream-Request-ID), when it "
                                                                  "sent one."},
        "refusal": {"type": "object", "description": "Refused requests: the refusing plugin's details."},
        "reason": {"description": "auth_failure / rate_limited: why (from refusal)."},
        "limit": {"description": "rate_limited: the limit hit (from refusal)."},
    },
    "required": ["seq", "hash", "time", "type", "request_id", "trace_id", "key_id", "owner", "client_ip", "method",
                 "path", "route", "model", "response_model", "status", "answered_by", "source", "outcome", "error",
                 "latency_ms", "upstream_ms", "upstream_headers_ms", "overhead_ms", "ttfb_ms", "tokens_in",
                 "tokens_out", "streamed", "bytes_in", "bytes_out", "conversation_id"],
    "additionalProperties": False,
}
#: An admin or system event (key.created, conversation.deleted, config.reloaded, audit.purged ...):
#: its own fields besides these.
ACTION_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {**_ENVELOPE, "type": {"type": "string", "description": "key.created, audit.purged ..."},
                   "actor": {"type": "string", "description": "Who did it (admin, system, owner:...)."}},
    "required": ["seq", "hash", "time", "type", "actor"],
}
EVENT: dict[str, Any] = {"oneOf": [REQUEST_EVENT, ACTION_EVENT]}
EVENT_LIST: dict[str, Any] = {
    "type": "object",
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": EVENT},
                   "next_cursor": {"type": ["string", "null"], "description": "cursor of the next page."}},
    "required": ["object", "data", "next_cursor"], "additionalProperties": False,
}
VERIFY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ok": _B, "rows": {"type": "integer", "description": "Rows verified."},
        "first_seq": _IN, "last_seq": _IN, "head_hash": _SN,
        "anchor": {"type": ["object", "null"], "description": "The last purge's anchor the walk started after.",
                   "properties": {"seq": _I, "hash": _S}, "required": ["seq", "hash"],
                   "additionalProperties": False},
        "broken": {"type": ["object", "null"], "description": "The first broken link (ok: false).",
                   "properties": {"seq": _I, "problem": {"type": "string", "enum": [
                       "inserted", "deleted", "edited", "truncated", "replaced"]},
                                  "detail": _S},
                   "required": ["seq", "problem", "detail"], "additionalProperties": False},
        "signed_from": {"type": ["integer", "null"], "description": "With a chain key configured: the first "
                        "row signed with one (earlier rows predate the key); null without one."},
        "head_signed": {"type": ["string", "null"], "enum": ["current", "previous", "none", None],
                        "description": "With a chain key configured: what signed the newest row (current: "
                        "chain_key; previous: one of previous_chain_keys); null without one."},
        "heads": {"type": "array", "description": "The recorded heads given (head=SEQ:HASH) that were checked: "
                  "found with their hash; anchor: deleted by the latest purge, whose anchor has that hash; "
                  "purged: deleted by retention before that (not comparable).",
                  "items": {"type": "object", "properties": {"seq": _I, "hash": _S, "result": {
                      "type": "string", "enum": ["found", "anchor", "purged"]}},
                      "required": ["seq", "hash", "result"], "additionalProperties": False}},
        "message": _S,
    },
    "required": ["ok", "rows", "first_seq", "last_seq", "head_hash", "anchor", "broken", "signed_from",
                 "head_signed", "heads", "message"],
    "additionalProperties": False,
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


OPENAPI: dict[str, Any] = {
    "/audit": {"get": {
        "summary": "Audit events, newest first (filters combine with AND)",
        "parameters": [
            _param("since", "From this time (inclusive): ISO 8601, Unix seconds, or an age like 24h"),
            _param("until", "Before this time (exclusive), same formats"),
            _param("type", "Event type(s), comma-separated: request, auth_failure, rate_limited, key.created ..."),
            _param("key_id", "API key id"),
            _param("owner", "Key owner"),
            _param("ip", "Client IP"),
            _param("status", "HTTP status (429) or class (4xx)"),
            _param("limit", f"Page size, 1..{MAX_LIMIT} (default 100)", {"type": "integer"}),
            _param("cursor", "next_cursor from the previous page"),
            _param("order", "desc (default, newest first) or asc", {"type": "string", "enum": ["asc", "desc"]}),
        ],
        "responses": {"200": _json(EVENT_LIST, "A page of events"), "400": _ERR, "401": _ERR}}},
    "/audit/verify": {"get": {
        "summary": "Walk the hash chain; reports the first broken link",
        "parameters": [_param("head", "A head recorded earlier, SEQ:HASH (verify's last_seq and head_hash, or the "
                              "gateway's `audit head` log line); repeatable: the trail must still hold that row "
                              "with that hash (problem truncated / replaced if not), unless retention deleted it",
                              {"type": "array", "maxItems": MAX_HEADS,
                               "items": {"type": "string", "pattern": "^[0-9]{1,18}:[0-9a-fA-F]{64}$"}})],
        "responses": {"200": _json(VERIFY, "The walk's result"), "400": _ERR, "401": _ERR, "409": _ERR}}},
}
