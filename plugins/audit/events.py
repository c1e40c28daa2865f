"""Audit events: what is captured on the request path, and how it becomes a record.

The request path does as little as possible: :func:`capture` copies the handful of raw values the
record needs out of the request context into a tuple (no dict, no formatting, no JSON). The sink
writers turn captured tuples into records (:func:`build`) off the request path, in batches.
Admin and system events from the event bus are small dicts and are cleaned when they arrive.
"""
from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime, timezone
from typing import Any

from gateway.context import RequestContext, caller_key_id
from gateway.observe import usage_tokens
from gateway.redact import mask_gateway_keys

try:
    from opentelemetry.trace import get_current_span as _current_span
except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
    _current_span = None

#: Refusal / event fields that must never reach the trail, whatever a plugin put there: a field whose
#: name has one of these words (``api_key``, ``admin_token``, ``secret`` ...; not ``tokens``, ``key_id``).
_SECRET_WORDS = frozenset({"secret", "secrets", "token", "password", "passwd", "authorization", "apikey",
                           "credential", "credentials", "cookie", "pepper", "key", "bearer"})
_WORDS = re.compile(r"[a-z0-9]+")

#: The fields of a request event, in the order they are recorded (and hashed).
REQUEST_FIELDS = (
    "time", "type", "request_id", "trace_id", "key_id", "owner", "team", "client_ip", "method", "path", "route",
    "model", "response_model", "status", "answered_by", "source", "outcome", "error", "latency_ms",
    "upstream_ms", "upstream_headers_ms", "overhead_ms", "ttfb_ms", "tokens_in", "tokens_out", "streamed",
    "bytes_in", "bytes_out", "conversation_id",
)

_perf = time.perf_counter
_time = time.time


# -- time ---------------------------------------------------------------------------------------------
_iso_cache: tuple[int, str] = (-1 << 62, "")


def iso(ts: float | None = None) -> str:
    """Fixed-width UTC timestamp (``2026-01-31T12:00:00.123456Z``); sorts as text the same way as in
    time. The date and time of day are formatted once per second."""
    global _iso_cache
    if ts is None:
        ts = _time()
    sec = math.floor(ts)
    us = round((ts - sec) * 1e6)
    if us >= 1000000:
        sec += 1
        us -= 1000000
    cached_sec, prefix = _iso_cache
    if sec != cached_sec:
        prefix = datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _iso_cache = (sec, prefix)
    return f"{prefix}.{us:06d}Z"


def _ms(a: float | None, b: float | None) -> float | None:
    """Milliseconds from a to b (perf_counter seconds), to the microsecond."""
    if a is None or b is None:
        return None
    return int((b - a) * 1e6 + 0.5) / 1000


# -- request events -----------------------------------------------------------------------------------
def capture(ctx: RequestContext) -> tuple[Any, ...]:
    """The raw values a request event is built from; runs on the request path (in ``on_complete``)."""
    t_start = ctx.t_start
    ident = ctx.identity
    c = ctx.completion
    refusal = ctx.refusal
    return (
        _time() - (_perf() - t_start),  # wall-clock time the request arrived
        t_start, ctx.t_end or _perf(), ctx.t_upstream, ctx.t_headers, ctx.t_first_byte,
        _current_span().get_span_context() if _current_span is not None else None,
        ctx.request_id,
        ident.get("key_id") if ident else None,
        ident.get("owner") if ident else None,
        ident.get("team") if ident else None,  # (as it was then: a key's team can change later)
        ctx.client_ip, ctx.method, ctx.path, ctx.route, ctx.model,
        c.model if c is not None else None,
        c.usage if c is not None else None,
        # output tokens estimated from the deltas relayed: a stream without a usage report (or
        # without a valid output count in it), or one whose report came before some of its output
        # (the larger of the two counts)
        _estimated(c) if c is not None else 0 if ctx.cut_estimate is not None else None,
        ctx.status, ctx.source, ctx.outcome, ctx.error, ctx.streamed, ctx.bytes_in, ctx.bytes_out,
        ctx.conversation_id,
        None if refusal is None else clean(refusal),  # secrets never leave the request path
        refusal is not None,
        c.prompt_estimate if c is not None else ctx.cut_estimate,
        ctx.upstream_request_id,
    )


#: Characters of a model name kept in an event. The name comes from the client's body (and the
#: upstream's answer): a 9 MB one would otherwise be an 18 MB row, kept for the retention period.
MODEL_CHARS = 256


def _model(v: Any) -> Any:
    if type(v) is str:
        if len(v) > MODEL_CHARS:
            v = f"{v[:MODEL_CHARS]}... ({len(v)} characters)"
        return _no_nul(v)
    return v


def _no_nul(v: str) -> str:
    """A client's text with each NUL character recorded as U+FFFD: PostgreSQL's JSON cannot hold a
    NUL, and one record holding it made every JSON query over its time range fail there."""
    return v.replace("\x00", "\ufffd") if "\x00" in v else v


def request_values(item: tuple[Any, ...]) -> tuple[list[Any], dict[str, Any] | None]:
    """A captured tuple -> the request event's values in REQUEST_FIELDS order, and the cleaned refusal."""
    (started, t_start, end, t_up, t_head, t_fb, span, request_id, key_id, owner, team, client_ip, method, path,
     route, model, response_model, usage, relayed, status, source, outcome, error, streamed, bytes_in, bytes_out,
     conversation_id, refusal, refused, prompt_estimate, _) = item
    rtype = refusal.get("type") if refusal else None
    etype = "auth_failure" if rtype == "auth" else "rate_limited" if rtype == "rate_limit" else "request"
    key_id = caller_key_id(key_id, refusal) or key_id
    if owner is None and refusal:  # (a key refused after its secret matched: revoked, expired, out of scope)
        owner = refusal.get("owner") if type(refusal.get("owner")) is str else None
        team = refusal.get("team") if type(refusal.get("team")) is str else None
    if outcome == "client_disconnected":
        answered_by = "client_abort"
    elif rtype == "served" and outcome != "refused":  # a plugin's own API answered (2xx)
        answered_by = "gateway"
    elif refused or outcome == "refused":
        answered_by = "gateway_refusal"
    elif source == "upstream":
        answered_by = "upstream"
    else:
        answered_by = "error"
    trace_id = format(span.trace_id, "032x") if span is not None and span.is_valid else None
    total_us = int((end - t_start) * 1e6 + 0.5)
    total = total_us / 1000
    if t_up is None:
        upstream = upstream_headers = None
        overhead = total
    else:
        upstream_us = int((end - t_up) * 1e6 + 0.5)
        upstream = upstream_us / 1000
        upstream_headers = _ms(t_up, t_head)
        overhead = (total_us - upstream_us) / 1000  # (of the rounded figures: the two add up exactly)
    if usage:
        tokens_in, tokens_out = usage_tokens(usage)
        if relayed is not None:  # a report that came before some of the stream's output
            tokens_out = relayed
        if tokens_in is None:  # (a report without a valid prompt count, the stream then cut)
            tokens_in = prompt_estimate
    elif relayed is not None:
        tokens_in, tokens_out = prompt_estimate, relayed  # estimated: see build()
    else:
        tokens_in = tokens_out = None
    return [
        iso(started), etype, request_id, trace_id, key_id, owner, team, client_ip, method,
        _no_nul(mask_gateway_keys(path)),  # (a key a client put in the path: its id stays, its secret does not)
        route,
        _model(model), _model(response_model), status, answered_by, source, outcome, error, total,
        upstream, upstream_headers, overhead, _ms(t_start, t_fb), tokens_in, tokens_out, streamed,
        bytes_in, bytes_out, conversation_id,
    ], refusal


def _estimated(c: Any) -> int | None:
    r = c.relayed_tokens
    return r if r is not None else c.completion_tokens if c.usage_stale else None


def build(item: tuple[Any, ...]) -> dict[str, Any]:
    """A captured tuple -> the request event (a dict in REQUEST_FIELDS order, then
    ``tokens_estimated`` when the stream ended without a usage report, ``upstream_request_id`` when
    the upstream sent an id of its own, then refusal details)."""
    values, refusal = request_values(item)
    ev = dict(zip(REQUEST_FIELDS, values))
    if item[18] is not None:  # (the relayed deltas) no usage reported: tokens_out is the stream's deltas
        ev["tokens_estimated"] = True
    if item[-1] is not None:
        ev["upstream_request_id"] = item[-1]
    if refusal:
        ev["refusal"] = refusal
        etype = values[1]
        if etype == "auth_failure":
            ev["reason"] = refusal.get("reason")
        elif etype == "rate_limited":
            ev["reason"] = refusal.get("reason")  # rate_limit_exceeded, insufficient_quota, store_unavailable
            ev["limit"] = refusal.get("limit") or refusal.get("reason")
    return ev


def request_event(ctx: RequestContext) -> dict[str, Any]:
    """The request event for ``ctx`` (what a sink records for it)."""
    return build(capture(ctx))


def as_event(item: Any) -> dict[str, Any]:
    """A queued item (a captured request tuple, or an event dict) -> the event dict."""
    return item if isinstance(item, dict) else build(item)


# -- cleaning -----------------------------------------------------------------------------------------
def clean(fields: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """Scalars and small nested dicts/lists only; keys that look secret are dropped."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        k = str(k)
        if _secret_name(k):
            continue
        if type(v) is str:
            out[k] = _no_nul(v)
        elif v is None or isinstance(v, (bool, int, float)):
            out[k] = v
        elif isinstance(v, dict) and depth < 2:
            out[k] = clean(v, depth + 1)
        elif isinstance(v, (list, tuple, set, frozenset)) and depth < 2:
            out[k] = [_no_nul(x) if type(x) is str else x if x is None or isinstance(x, (bool, int, float))
                      else _no_nul(str(x)) for x in list(v)[:100]]
        else:
            out[k] = _no_nul(str(v))
    return out


def _secret_name(k: str) -> bool:
    words = _WORDS.findall(k.lower())
    if words and words[-1] == "id":  # key_id, token_id: identifiers, not secrets
        return False
    return any(w in _SECRET_WORDS for w in words)


def bus_event(type_: str, fields: dict[str, Any]) -> dict[str, Any]:
    ev = clean(fields)
    ev.pop("type", None)
    ev.pop("seq", None)
    t = ev.pop("time", None)
    return {"time": t if isinstance(t, str) and len(t) == 27 else iso(), "type": type_, **ev,
            "actor": ev.get("actor") or "system"}


#: JSON for the JSON-lines and stdout sinks: every non-ASCII and control character escaped.
jsonl = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str).encode
try:
    # One C encoder reused for every line (json.dumps makes one per call); events are acyclic.
    from json.encoder import c_make_encoder as _c_make_encoder, encode_basestring_ascii as _ascii

    _c_jsonl = _c_make_encoder(None, str, _ascii, None, ":", ",", False, False, True)

    def jsonl(event: dict[str, Any]) -> str:  # noqa: F811
        return "".join(_c_jsonl(event, 0))
except (ImportError, TypeError):  # pragma: no cover - Python without the C accelerator
    pass
