"""Spans tell the same story as the other views of a request: failed and cut exchanges are errors on
the span that carries the GenAI attributes (the server span with ``genai_span: false``) and on the
server span whatever status went out, token counts are the audit event's (estimated ones marked),
and a refused key's id is on the trace as it is in the audit trail.

Real gateways on loopback sockets, the demo upstream or a small scripted one, the in-memory exporter,
the audit trail in a real SQLite file."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.plugins.audit import store
from gateway.plugins.key_auth.keys import format_key, new_secret

from .helpers import serve_handler, until

SERVER = "POST /v1/chat/completions"
MSGS = [{"role": "user", "content": "tell me a long story please"}]


def tracing(**config: Any) -> dict[str, Any]:
    return {"name": "tracing", "config": {"exporter": {"type": "memory"}, "plugin_spans": False, **config}}


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> int:
    """POST and read what comes; a response cut short (the point of several tests) is not an error."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.post(url, json=body, headers=headers or {}) as r:
            try:
                await r.read()
            except aiohttp.ClientPayloadError:
                pass
            return r.status


async def spans_of(g: Any, n: int) -> list[dict[str, Any]]:
    """The spans of the first ``n`` requests (one dict name -> span per request, in request order),
    once their server spans have ended."""
    exp = g.plugin("tracing").memory_exporter

    def servers() -> list[Any]:
        return [s for s in exp.get_finished_spans() if s.kind.name == "SERVER"]

    await until(lambda: len(servers()) >= n, what=f"{n} server span(s)")
    spans = exp.get_finished_spans()
    out = []
    for server in sorted(servers(), key=lambda s: s.start_time)[:n]:
        tid = server.context.trace_id
        out.append({s.name: s for s in spans if s.context.trace_id == tid})
    return out


async def audit_events(g: Any, n: int, kind: str = "request") -> list[dict[str, Any]]:
    async def got() -> list[dict[str, Any]] | None:
        data, _ = await store.query(g.services.db, {"type": kind}, limit=1000, order="asc")
        return data if len(data) >= n else None

    return await until(got, what=f"{n} audit event(s)")


def error_of(span: Any) -> tuple[str, Any]:
    return span.status.status_code.name, span.attributes.get("error.type")


# -- 1. genai_span: false: the server span carries the exchange's error -------------------------------------
async def test_without_a_genai_span_the_server_span_carries_the_exchange_s_error(make_gateway: Any) -> None:
    """The GenAI attributes move to the server span, and so do error.type and status ERROR: a stream
    the upstream dropped after 3 chunks, and an upstream 429 relayed (which the HTTP conventions alone
    would leave UNSET on a server span). The dedicated chat span of a second gateway says the same."""
    split = await make_gateway([tracing(genai_span=False)], name="split.yaml")
    whole = await make_gateway([tracing()], name="whole.yaml")
    for g in (split, whole):
        await post(g.url + "/v1/chat/completions", {"model": "demo-chat", "stream": True, "messages": MSGS},
                   {"X-Demo-Die-After": "3"})
        assert await post(g.url + "/v1/chat/completions", {"model": "demo-chat", "messages": MSGS},
                          {"X-Demo-Status": "429"}) == 429
    (cut, limited), (cut_w, limited_w) = await spans_of(split, 2), await spans_of(whole, 2)
    assert set(cut) == {SERVER, "POST"} and cut[SERVER].attributes["gateway.outcome"] == "upstream_disconnected"
    assert error_of(cut[SERVER]) == ("ERROR", "upstream_disconnected") == error_of(cut_w["chat demo-chat"])
    assert cut[SERVER].attributes["gen_ai.request.model"] == "demo-chat"
    assert error_of(limited[SERVER]) == ("ERROR", "429") == error_of(limited_w["chat demo-chat"])
    assert limited[SERVER].attributes["gen_ai.operation.name"] == "chat"


# -- 2. token counts: the audit event's figures ----------------------------------------------------------------
def _chunk(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps({"id": "c-1", "object": "chat.completion.chunk", "model": "m", **obj}).encode() \
        + b"\n\n"


def _delta(text: str) -> bytes:
    return _chunk({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


async def _usage_first(request: web.Request) -> web.StreamResponse:
    """Usage reported on the first chunk (9 in, 0 out), then 4 deltas, then the connection drops."""
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}],
                             "usage": {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}}))
    for i in range(4):
        await resp.write(_delta(f"t{i} "))
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()
    return resp


async def test_span_token_counts_are_the_audit_event_s(make_gateway: Any, tmp_path: Path) -> None:
    """A stream whose usage came first and was then cut (9 in, 4 out estimated), one with no usage
    report at all (3 out estimated, the input the prompt estimate: characters / 4), and a whole one (the upstream's report, not
    estimated): the chat span has the audit event's tokens_in / tokens_out, and
    gateway.tokens_estimated exactly where the audit event has tokens_estimated."""
    runner, url = await serve_handler(_usage_first)
    try:
        scripted = await make_gateway([{"name": "audit"}, tracing()], name="scripted.yaml",
                                      upstream={"url": url})
        await post(scripted.url + "/v1/chat/completions", {"model": "m", "stream": True, "messages": MSGS})
        demo = await make_gateway([{"name": "audit"}, tracing()], name="demo.yaml",
                                  database={"url": f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"})
        await post(demo.url + "/v1/chat/completions", {"model": "demo-chat", "stream": True, "messages": MSGS},
                   {"X-Demo-Die-After": "3"})
        assert await post(demo.url + "/v1/chat/completions",
                          {"model": "demo-chat", "stream": True, "messages": MSGS}) == 200
        cases = [(await audit_events(scripted, 1))[0], *await audit_events(demo, 2)]
        spans = [(await spans_of(scripted, 1))[0]["chat m"]] + [s["chat demo-chat"] for s in await spans_of(demo, 2)]
    finally:
        await runner.cleanup()
    assert [(e["tokens_in"], e["tokens_out"], e.get("tokens_estimated", False)) for e in cases[:2]] == \
        [(9, 4, True), ((len(MSGS[0]["content"]) + 3) // 4, 3, True)]
    assert cases[2]["tokens_out"] > 0 and "tokens_estimated" not in cases[2]
    for ev, sp in zip(cases, spans):
        a = sp.attributes
        assert (a.get("gen_ai.usage.input_tokens"), a.get("gen_ai.usage.output_tokens"),
                a.get("gateway.tokens_estimated", False)) == \
            (ev["tokens_in"], ev["tokens_out"], ev.get("tokens_estimated", False)), (ev, dict(a))


# -- 3. the server span of a failed or cut exchange is an error, whatever the status -------------------------
async def _error_event(request: web.Request) -> web.StreamResponse:
    """A 200 stream with an error event in it (vLLM on an engine failure), then [DONE]."""
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_delta("p"))
    await resp.write(b'data: {"error": {"message": "backend overloaded", "type": "server_error", "code": null}}\n\n')
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def test_server_span_is_an_error_for_every_failed_or_cut_exchange(make_gateway: Any) -> None:
    """A client that leaves before the response head (no status sent), an upstream that drops a 200
    stream, goes silent mid-stream (idle timeout) or reports an error inside it: the server span is
    ERROR with the outcome as error.type. Refusals and a client's bad request (4xx from the gateway)
    stay UNSET, as the HTTP conventions have them for a server span."""
    g = await make_gateway([{"name": "key_auth"}, tracing()], server={"max_body_size": "1KiB"},
                           upstream={"timeouts": {"connect": 2, "first_byte": 10, "idle": 0.3}})
    auth = {"Authorization": "Bearer " + (await g.plugin("key_auth").demo_setup())["api_key"]}
    chat = g.url + "/v1/chat/completions"
    body = {"model": "demo-chat", "stream": True, "messages": MSGS}
    # 1. away before the head: the upstream takes 1 s to answer, the client waits 0.3 s
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
            async with s.post(chat, json=body, headers={**auth, "X-Demo-Head-Delay": "1"}) as r:
                await r.read()
    except asyncio.TimeoutError:
        pass
    await spans_of(g, 1)
    await post(chat, body, {**auth, "X-Demo-Die-After": "3"})  # 2. dropped mid-stream
    await post(chat, body, {**auth, "X-Demo-Delay": "1"})  # 3. silent mid-stream: idle timeout
    await post(chat, body)  # 4. refused: no key
    # 5. a body over server.max_body_size: 413 from the gateway
    assert await post(chat, {**body, "messages": [{"role": "user", "content": "x" * 2048}]}, auth) == 413
    runner, url = await serve_handler(_error_event)
    try:
        g2 = await make_gateway([tracing()], name="g2.yaml", upstream={"url": url})
        assert await post(g2.url + "/v1/chat/completions", {"model": "m", "stream": True, "messages": MSGS}) == 200
        (errored,) = await spans_of(g2, 1)  # 6. an error event in a 200 stream
    finally:
        await runner.cleanup()
    gone, dropped, stalled, refused, bad = await spans_of(g, 5)
    outcomes = [s[SERVER].attributes["gateway.outcome"] for s in (gone, dropped, stalled, refused, bad, errored)]
    assert outcomes == ["client_disconnected", "upstream_disconnected", "upstream_timeout", "refused", "error",
                        "upstream_error"]
    a = gone[SERVER].attributes
    assert "http.status_code" not in a and "http.response.status_code" not in a  # nothing was sent
    for spans, outcome in ((gone, "client_disconnected"), (dropped, "upstream_disconnected"),
                           (stalled, "upstream_timeout"), (errored, "upstream_error")):
        assert error_of(spans[SERVER]) == ("ERROR", outcome), dict(spans[SERVER].attributes)
    for spans, status in ((refused, 401), (bad, 413)):
        assert spans[SERVER].attributes["http.status_code"] == status
        assert error_of(spans[SERVER]) == ("UNSET", None), dict(spans[SERVER].attributes)


# -- 4. a refused key's id is on the trace, as in the audit trail --------------------------------------------
async def test_a_refused_key_s_id_is_on_the_server_span_as_in_the_audit_event(make_gateway: Any) -> None:
    """A revoked key and a valid key id with a wrong secret are refused: the audit event names the key
    id (from the refusal), and so does the server span's gateway.key_id. The secrets appear nowhere."""
    g = await make_gateway([{"name": "key_auth"}, {"name": "audit"}, tracing()])
    kp = g.plugin("key_auth")
    revoked = (await kp.demo_setup())["api_key"]
    live = (await kp.demo_setup())["api_key"]  # (revokes the first)
    wrong = format_key(live.split("_")[1], new_secret())
    for key in (revoked, wrong):
        assert await post(g.url + "/v1/chat/completions", {"model": "demo-chat", "messages": MSGS},
                          {"Authorization": f"Bearer {key}"}) == 401
    events, spans = await audit_events(g, 2, "auth_failure"), await spans_of(g, 2)
    for key, ev, sp in zip((revoked, wrong), events, spans):
        a = sp[SERVER].attributes
        assert ev["key_id"] == key.split("_")[1] == a.get("gateway.key_id"), (ev, dict(a))
        assert a["gateway.outcome"] == "refused" and "gateway.owner" not in a
        secret = key.rsplit("_", 1)[1]
        assert all(secret not in json.dumps(dict(s.attributes), default=str) for s in sp.values())
    assert [e["refusal"]["reason"] for e in events] == ["revoked", "invalid"]
