"""tracing: spans, their structure, trace context in and out, GenAI attributes, exporters, failure.

Everything real: the gateway on a loopback socket, the demo backend upstream, the OpenAI SDK as the
client, and an OTLP/HTTP receiver (an aiohttp app decoding the protobuf export requests).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from openai import AsyncOpenAI
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                        ExportTraceServiceResponse)
from opentelemetry.trace import SpanKind

from .helpers import free_port

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
PROMPT = "tell me about the purple elephant sonata"
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": PROMPT}]}


def tracing(**config: Any) -> dict[str, Any]:
    config.setdefault("exporter", {"type": "memory"})
    return {"name": "tracing", "config": config}


def hexid(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def by_name(spans: Any) -> dict[str, Any]:
    return {s.name: s for s in spans}


async def post(url: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.post(url, json=body, headers=headers or {}) as r:
            return r.status, await r.read()


# -- an OTLP/HTTP receiver on loopback ------------------------------------------------------------------
class Receiver:
    def __init__(self) -> None:
        self.spans: list[Any] = []          # (resource attrs, span) pairs
        self.headers: list[CIMultiDict[str]] = []
        self.got = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        self.headers.append(CIMultiDict(request.headers))
        for rs in req.resource_spans:
            res = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    self.spans.append((res, sp))
        self.got.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/v1/traces", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def wait_for(self, pred: Any, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.got.clear()
                await self.got.wait()


@pytest.fixture
async def receiver() -> Any:
    r = await Receiver().start()
    yield r
    assert r.runner is not None
    await r.runner.cleanup()


def otlp_attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
        else:
            out[kv.key] = getattr(v, kind) if kind else None
    return out


# -- tests -----------------------------------------------------------------------------------------------
async def test_span_tree_and_trace_context(make_gateway, upstream):
    """Server span continues the caller's trace; plugin, upstream-call and GenAI spans are its children;
    the upstream receives a traceparent of the same trace whose parent is the client span."""
    g = await make_gateway([{"name": "headers", "config": {"request": {"X-Team": "a"}, "response": {"X-B": "1"}}},
                            tracing()])
    status, _ = await post(g.url + "/v1/chat/completions", CHAT, {"traceparent": TRACEPARENT})
    assert status == 200
    spans = g.plugin("tracing").memory_exporter.get_finished_spans()
    s = by_name(spans)
    assert set(s) == {"POST /v1/chat/completions", "POST", "headers.on_request", "headers.on_response",
                      "chat demo-chat"}
    server = s["POST /v1/chat/completions"]
    assert server.kind == SpanKind.SERVER
    assert {hexid(x.context.trace_id, 32) for x in spans} == {TRACE_ID}
    assert hexid(server.parent.span_id, 16) == CALLER_SPAN and server.parent.is_remote
    for name in ("POST", "headers.on_request", "headers.on_response", "chat demo-chat"):
        assert s[name].parent.span_id == server.context.span_id, name
    client = s["POST"]
    assert client.kind == SpanKind.CLIENT and client.attributes["http.status_code"] == 200
    assert s["chat demo-chat"].kind == SpanKind.CLIENT
    # Timings: children inside the server span, in the order they ran.
    for name in ("headers.on_request", "POST", "chat demo-chat", "headers.on_response"):
        assert server.start_time <= s[name].start_time <= s[name].end_time <= server.end_time, name
    assert s["headers.on_request"].end_time <= client.start_time
    assert server.attributes["gateway.outcome"] == "ok"
    assert server.attributes["http.route"] == "/v1/chat/completions"
    # The upstream saw the same trace, parented to the client span.
    sent = upstream.requests[-1]["headers"]["traceparent"]
    assert sent == f"00-{TRACE_ID}-{hexid(client.context.span_id, 16)}-01"


async def test_new_trace_without_traceparent_and_refused_request(make_gateway, upstream):
    g = await make_gateway([tracing(), {"name": "key_auth", "config": {}}])
    api_key = (await g.plugin("key_auth").demo_setup())["api_key"]
    auth = {"Authorization": f"Bearer {api_key}"}
    status, _ = await post(g.url + "/v1/embeddings", {"model": "demo-embed", "input": "abc def"}, auth)
    assert status == 200
    spans = by_name(g.plugin("tracing").memory_exporter.get_finished_spans())
    server = spans["POST /v1/embeddings"]
    assert server.parent is None
    e = spans["embeddings demo-embed"]
    assert e.attributes["gen_ai.operation.name"] == "embeddings"
    assert e.attributes["gen_ai.usage.input_tokens"] == 2
    tp = upstream.requests[-1]["headers"]["traceparent"]
    assert tp.split("-")[1] == hexid(server.context.trace_id, 32)
    # A refused request never reaches the upstream: server span and the refusing plugin's span only.
    g.plugin("tracing").memory_exporter.clear()
    n = len(upstream.requests)
    status, _ = await post(g.url + "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-wrong"})
    assert status == 401 and len(upstream.requests) == n
    spans = by_name(g.plugin("tracing").memory_exporter.get_finished_spans())
    # (the key is checked from the request head, before the body is read: on_headers)
    assert set(spans) == {"POST /v1/chat/completions", "key_auth.on_headers", "key_auth.on_response"} or \
        set(spans) == {"POST /v1/chat/completions", "key_auth.on_headers"}
    a = spans["POST /v1/chat/completions"].attributes
    assert a["http.status_code"] == 401
    assert a["gateway.source"] == "gateway" and a["gateway.outcome"] == "refused"
    assert a["gateway.refusal.plugin"] == "key_auth"
    assert "sk-wrong" not in json.dumps(dict(a), default=str)


async def test_genai_attributes_with_sdk_plain_and_streamed(make_gateway, upstream):
    """Real usage from the demo backend, through the OpenAI SDK, with key_auth in front: key id and owner
    on the spans, the key itself and the prompt text nowhere (record_content is off by default)."""
    g = await make_gateway([{"name": "key_auth", "config": {}}, tracing()])
    api_key = (await g.plugin("key_auth").demo_setup())["api_key"]
    exp = g.plugin("tracing").memory_exporter
    client = AsyncOpenAI(base_url=g.url + "/v1", api_key=api_key, max_retries=0, timeout=10)
    try:
        r = await client.chat.completions.create(model="demo-chat", messages=CHAT["messages"], max_tokens=50,
                                                 temperature=0.5)
        plain = by_name(exp.get_finished_spans())
        a = plain["chat demo-chat"].attributes
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == "demo-chat"
        assert a["gen_ai.response.model"] == r.model
        assert a["gen_ai.response.id"] == r.id
        assert a["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens
        assert a["gen_ai.usage.output_tokens"] == r.usage.completion_tokens
        assert list(a["gen_ai.response.finish_reasons"]) == [r.choices[0].finish_reason]
        assert a["gen_ai.request.max_tokens"] == 50 and a["gen_ai.request.temperature"] == 0.5
        server = plain["POST /v1/chat/completions"]
        for sp in (server, plain["chat demo-chat"]):
            assert sp.attributes["gateway.owner"] == "demo"
            assert sp.attributes["gateway.key_id"] == api_key.split("_")[1]  # the id part, not the secret
        assert "key_auth.on_request" in plain

        exp.clear()
        chunks = 0
        stream = await client.chat.completions.create(model="demo-chat", messages=CHAT["messages"], stream=True)
        async for ch in stream:
            assert ch.usage is None  # the client did not ask for usage; the gateway did, and hid it
            if ch.choices and ch.choices[0].delta.content:
                chunks += 1
        streamed = by_name(exp.get_finished_spans())
        a = streamed["chat demo-chat"].attributes
        assert a["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens
        assert a["gen_ai.usage.output_tokens"] == chunks > 0  # demo: one completion token per chunk
        assert list(a["gen_ai.response.finish_reasons"]) == ["stop"]
        assert streamed["POST /v1/chat/completions"].attributes["gateway.streamed"] is True
        assert a["gateway.time_to_first_token_ms"] >= 0
        # The GenAI span covers the whole stream, the HTTP client span only until the response head.
        assert streamed["chat demo-chat"].end_time >= streamed["POST"].end_time
    finally:
        await client.close()
    everything = json.dumps([dict(s.attributes) for s in plain.values()] +
                            [dict(s.attributes) for s in streamed.values()], default=str)
    assert PROMPT not in everything and "purple" not in everything
    assert api_key not in everything and api_key.split("_")[-1] not in everything
    assert "gen_ai.input.messages" not in everything


async def test_record_content_opt_in(make_gateway, upstream):
    g = await make_gateway([tracing(record_content=True, max_content_chars=20)])
    status, body = await post(g.url + "/v1/chat/completions", CHAT)
    assert status == 200
    a = by_name(g.plugin("tracing").memory_exporter.get_finished_spans())["chat demo-chat"].attributes
    inp = json.loads(a["gen_ai.input.messages"])
    assert inp == [{"role": "user", "parts": [{"type": "text", "content": PROMPT[:20] + "…"}]}]
    out = json.loads(a["gen_ai.output.messages"])
    assert out[0]["role"] == "assistant" and out[0]["finish_reason"] == "stop"
    assert out[0]["parts"][0]["content"] == json.loads(body)["choices"][0]["message"]["content"][:20] + "…"


async def test_record_content_covers_the_responses_api(make_gateway):
    """/v1/responses through the openai SDK: its `input` items (a message with parts, a function
    call and its output) are the span's input messages, `instructions` its system instructions,
    the answer its output message."""
    from .test_observe import backend

    async def responses(request: web.Request) -> web.Response:
        return web.json_response({"id": "resp_1", "object": "response", "created_at": 0, "model": "m-1",
                                  "status": "completed", "output": [{
                                      "type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                                      "content": [{"type": "output_text", "text": "It is sunny.", "annotations": []}]}],
                                  "usage": {"input_tokens": 30, "output_tokens": 4, "total_tokens": 34}})

    async with backend(responses, "/v1/responses") as url:
        g = await make_gateway([tracing(record_content=True)], upstream={"url": url})
        client = AsyncOpenAI(base_url=g.url + "/v1", api_key="unused", max_retries=0)
        got = await client.responses.create(model="m", instructions="Be brief.", input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"},
                                         {"type": "input_image", "image_url": "https://example.com/p.png"}]},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
        await client.close()
        assert got.output_text == "It is sunny."
        a = by_name(g.plugin("tracing").memory_exporter.get_finished_spans())["chat m"].attributes
    assert json.loads(a["gen_ai.system_instructions"]) == [{"type": "text", "content": "Be brief."}]
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}, {"type": "input_image"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "call_1", "name": "weather",
                                         "arguments": '{"city": "Paris"}'}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "sunny"}]}]
    out = json.loads(a["gen_ai.output.messages"])
    assert out[0]["parts"] == [{"type": "text", "content": "It is sunny."}] and out[0]["finish_reason"] == "stop"


async def test_no_secret_in_captured_headers(make_gateway, upstream, monkeypatch):
    """Even when the OTel header-capture variables ask for every header, credentials stay out."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    g = await make_gateway([tracing()])
    secret = "sk-live-do-not-trace-0123456789"
    status, _ = await post(g.url + "/v1/chat/completions", CHAT,
                           {"Authorization": f"Bearer {secret}", "X-Api-Key": secret, "X-Visible": "yes"})
    assert status == 200
    spans = g.plugin("tracing").memory_exporter.get_finished_spans()
    server = by_name(spans)["POST /v1/chat/completions"]
    assert list(server.attributes["http.request.header.x_visible"]) == ["yes"]
    assert server.attributes["http.request.header.authorization"] == "[REDACTED]"
    assert secret not in json.dumps([dict(s.attributes) for s in spans], default=str)


async def test_sampling_ratio_is_parent_based(make_gateway, upstream):
    g = await make_gateway([tracing(sampling_ratio=0.0)])
    exp = g.plugin("tracing").memory_exporter
    assert (await post(g.url + "/v1/chat/completions", CHAT))[0] == 200
    assert exp.get_finished_spans() == ()
    # Not recorded, but the context still goes upstream (sampled flag off).
    assert int(upstream.requests[-1]["headers"]["traceparent"].split("-")[3], 16) & 1 == 0
    # A caller that sampled its trace is followed.
    assert (await post(g.url + "/v1/chat/completions", CHAT, {"traceparent": TRACEPARENT}))[0] == 200
    assert {hexid(s.context.trace_id, 32) for s in exp.get_finished_spans()} == {TRACE_ID}
    # Usage is asked for only where a span will carry it: an unsampled stream goes upstream as sent.
    stream = {**CHAT, "stream": True}
    assert (await post(g.url + "/v1/chat/completions", stream))[0] == 200
    assert "stream_options" not in upstream.requests[-1]["body"]
    assert (await post(g.url + "/v1/chat/completions", stream, {"traceparent": TRACEPARENT}))[0] == 200
    assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    with_usage = [s for s in exp.get_finished_spans() if s.attributes.get("gen_ai.usage.output_tokens")]
    assert len(with_usage) == 2  # the sampled plain request's and the sampled stream's


async def test_route_without_tracing_passes_context_through(make_gateway, upstream):
    g = await make_gateway([tracing()], routes=[{"path_prefix": "/v1/embeddings",
                                                 "plugins": {"tracing": {"enabled": False}}}])
    assert (await post(g.url + "/v1/embeddings", {"model": "e", "input": "x"}, {"traceparent": TRACEPARENT}))[0] == 200
    assert g.plugin("tracing").memory_exporter.get_finished_spans() == ()
    assert upstream.requests[-1]["headers"]["traceparent"] == TRACEPARENT


async def test_two_gateways_in_one_process_keep_their_spans(make_gateway, upstream):
    a = await make_gateway([tracing(service_name="gw-a")], name="a.yaml")
    b = await make_gateway([tracing(service_name="gw-b")], name="b.yaml")
    await asyncio.gather(*[post(a.url + "/v1/chat/completions", CHAT) for _ in range(3)],
                         *[post(b.url + "/v1/embeddings", {"model": "e", "input": "x"}) for _ in range(2)])
    sa = a.plugin("tracing").memory_exporter.get_finished_spans()
    sb = b.plugin("tracing").memory_exporter.get_finished_spans()
    assert [s.name for s in sa].count("POST /v1/chat/completions") == 3 and len(sa) == 9
    assert [s.name for s in sb].count("POST /v1/embeddings") == 2 and len(sb) == 6
    assert {s.resource.attributes["service.name"] for s in sa} == {"gw-a"}
    assert {s.resource.attributes["service.name"] for s in sb} == {"gw-b"}


async def test_reload_keeps_tracing(make_gateway, upstream):
    g = await make_gateway([tracing()])
    exp = g.plugin("tracing").memory_exporter
    ok, detail = await g.gw.reload(actor="test")
    assert ok, detail
    assert g.plugin("tracing").memory_exporter is exp  # same settings: the exporter is kept
    assert (await post(g.url + "/v1/chat/completions", CHAT, {"traceparent": TRACEPARENT}))[0] == 200
    names = {s.name for s in exp.get_finished_spans()}
    assert {"POST /v1/chat/completions", "POST", "chat demo-chat"} <= names
    # the middleware mounted at start is not mounted again: one server span per request
    assert [s.kind for s in exp.get_finished_spans()].count(SpanKind.SERVER) == 1


async def test_tracing_added_by_reload_needs_no_restart(make_gateway, upstream, tmp_path):
    """A gateway started without tracing gets it by a reload: server spans, the client span and the
    context propagated upstream, also on a keep-alive connection opened before the reload. A later
    reload with other settings does not mount the middleware twice (one server span per request)."""
    from pathlib import Path

    from .helpers import base_config, write_config
    g = await make_gateway([])
    async with aiohttp.ClientSession() as s:  # one connection, kept alive across both reloads
        async def call() -> None:
            async with s.post(g.url + "/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}) as r:
                assert r.status == 200
                await r.read()

        await call()
        assert upstream.requests[-1]["headers"]["traceparent"] == TRACEPARENT  # passed on untouched
        write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, [tracing()]))
        ok, detail = await g.gw.reload(actor="test")
        assert ok, detail
        exp = g.plugin("tracing").memory_exporter
        await call()
        assert (await post(g.url + "/v1/chat/completions", CHAT, {"traceparent": TRACEPARENT}))[0] == 200
        spans = exp.get_finished_spans()
        servers = [x for x in spans if x.kind == SpanKind.SERVER]
        clients = [x for x in spans if x.kind == SpanKind.CLIENT and x.name == "POST"]  # the upstream call
        assert len(servers) == 2 and len(clients) == 2
        for sv in servers:
            assert hexid(sv.context.trace_id, 32) == TRACE_ID and hexid(sv.parent.span_id, 16) == CALLER_SPAN
        assert {c.parent.span_id for c in clients} == {sv.context.span_id for sv in servers}
        sent = upstream.requests[-1]["headers"]["traceparent"].split("-")
        assert sent[1] == TRACE_ID and sent[2] in {hexid(c.context.span_id, 16) for c in clients}

        write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, [tracing(service_name="other")]))
        ok, detail = await g.gw.reload(actor="test")
        assert ok, detail
        exp2 = g.plugin("tracing").memory_exporter
        assert exp2 is not exp  # other settings: another provider
        await call()
        spans2 = exp2.get_finished_spans()
        assert [x.kind for x in spans2].count(SpanKind.SERVER) == 1
        assert [(x.kind, x.name) for x in spans2].count((SpanKind.CLIENT, "POST")) == 1
        assert {x.resource.attributes["service.name"] for x in spans2} == {"other"}


async def test_rejected_reload_does_not_use_up_the_tracing_hooks(make_gateway, upstream, tmp_path, monkeypatch):
    """A reload bringing tracing in that is rejected after tracing handed out its middleware mounts
    nothing, and a later good reload still mounts it."""
    from pathlib import Path

    from gateway.plugins.headers import Headers

    from .helpers import base_config, write_config
    g = await make_gateway([{"name": "headers"}])
    write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, [tracing(), {"name": "headers"}]))

    def broken(self: Any) -> list[Any]:
        raise RuntimeError("a plugin failing to hand out its TraceConfigs")

    monkeypatch.setattr(Headers, "trace_configs", broken)
    ok, detail = await g.gw.reload(actor="test")
    assert not ok and "failing to hand out" in detail
    assert "tracing" not in {p.name for p in g.gw.runtime.instances}
    monkeypatch.undo()
    ok, detail = await g.gw.reload(actor="test")
    assert ok, detail
    assert (await post(g.url + "/v1/chat/completions", CHAT, {"traceparent": TRACEPARENT}))[0] == 200
    spans = g.plugin("tracing").memory_exporter.get_finished_spans()
    assert [x.kind for x in spans].count(SpanKind.SERVER) == 1
    assert [(x.kind, x.name) for x in spans].count((SpanKind.CLIENT, "POST")) == 1


async def test_otlp_http_export_to_a_real_receiver(make_gateway, upstream, receiver, monkeypatch):
    # headers in the YAML replace the environment's (those may be another collector's credentials)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-env-collector-key=ENVSECRET")
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-B": "1"}}},
                            tracing(exporter={"type": "otlp_http", "endpoint": receiver.url, "timeout": 5,
                                              "headers": {"X-Collector-Token": "t0k"}},
                                    service_name="gateway-test", batch={"schedule_delay_ms": 50})])
    status, _ = await post(g.url + "/v1/chat/completions", {**CHAT, "stream": True}, {"traceparent": TRACEPARENT})
    assert status == 200
    await receiver.wait_for(lambda: len(receiver.spans) >= 5)
    spans = {sp.name: (res, sp) for res, sp in receiver.spans}
    assert set(spans) == {"POST /v1/chat/completions", "POST", "headers.on_request", "headers.on_response",
                          "chat demo-chat"}
    res, server = spans["POST /v1/chat/completions"]
    assert res["service.name"] == "gateway-test"
    assert server.trace_id.hex() == TRACE_ID and server.parent_span_id.hex() == CALLER_SPAN
    assert server.kind == server.SPAN_KIND_SERVER
    for name in ("POST", "headers.on_response", "chat demo-chat"):
        sp = spans[name][1]
        assert sp.trace_id.hex() == TRACE_ID and sp.parent_span_id == server.span_id, name
    a = otlp_attrs(spans["chat demo-chat"][1])
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.usage.input_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] > 0 and a["gen_ai.response.finish_reasons"] == ["stop"]
    assert receiver.headers[0]["X-Collector-Token"] == "t0k"
    assert "x-env-collector-key" not in receiver.headers[0]
    assert receiver.headers[0]["Content-Type"] == "application/x-protobuf"
    # Shutdown flushes what is still queued.
    before = len(receiver.spans)
    assert (await post(g.url + "/v1/embeddings", {"model": "e", "input": "x"}))[0] == 200
    async with asyncio.timeout(15):
        await g.stop()
    assert len(receiver.spans) >= before + 3


async def test_collector_down_requests_unaffected(make_gateway, upstream):
    """A collector that refuses connections: every request still succeeds and completes; spans beyond
    the bounded queue are dropped; shutdown gives up on the flush after its timeout."""
    dead = f"http://127.0.0.1:{free_port()}"
    g = await make_gateway([tracing(exporter={"type": "otlp_http", "endpoint": dead, "timeout": 2},
                                    batch={"max_queue_size": 32, "max_export_batch_size": 8,
                                           "schedule_delay_ms": 20, "shutdown_timeout": 1})],
                           # (on a busy machine the first connections to the upstream, in this same
                           # process, took over the 2 s the other tests allow: 504s that are not the point)
                           upstream={"url": upstream.url, "timeouts": {"connect": 10, "first_byte": 20, "idle": 20}})
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> int:
        async with sem:
            body = {**CHAT, "stream": i % 2 == 0}
            return (await post(g.url + "/v1/chat/completions", body, {"traceparent": TRACEPARENT}, timeout=20))[0]

    async with asyncio.timeout(60):
        statuses = await asyncio.gather(*[one(i) for i in range(200)])
    assert statuses == [200] * 200
    # The context was still propagated for every request.
    assert all(r["headers"]["traceparent"].split("-")[1] == TRACE_ID for r in list(upstream.requests)[-50:])
    async with asyncio.timeout(15):
        await g.stop()


async def test_exporter_none_is_off_and_config_is_validated(make_gateway, upstream):
    g = await make_gateway([tracing(exporter={"type": "none"})])
    assert (await post(g.url + "/v1/chat/completions", CHAT, {"traceparent": TRACEPARENT}))[0] == 200
    assert upstream.requests[-1]["headers"]["traceparent"] == TRACEPARENT
    assert g.plugin("tracing").entry is None
    assert g.plugin("tracing").middlewares() == [] and g.plugin("tracing").trace_configs() == []

    from gateway.config import ConfigError, load_config_text

    from .helpers import base_config
    import yaml

    for bad in ({"exporter": {"type": "zipkin"}}, {"sampling_ratio": 2}, {"exporter": {"nope": 1}}):
        with pytest.raises(ConfigError):
            load_config_text(yaml.safe_dump(base_config(upstream.url, __import__("pathlib").Path("/tmp"),
                                                        [{"name": "tracing", "config": bad}])))


async def test_genai_on_the_server_span_when_asked(make_gateway, upstream):
    g = await make_gateway([tracing(genai_span=False)])
    assert (await post(g.url + "/v1/chat/completions", CHAT))[0] == 200
    spans = by_name(g.plugin("tracing").memory_exporter.get_finished_spans())
    assert set(spans) == {"POST /v1/chat/completions", "POST"}
    a = spans["POST /v1/chat/completions"].attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.usage.output_tokens"] > 0


async def test_sampling_decision_is_consistent(make_gateway, upstream):
    """Ratio sampling: about that share of new traces is recorded (decided once per trace), and the
    upstream is told the same decision, for the same trace id, that the gateway acted on."""
    g = await make_gateway([tracing(sampling_ratio=0.5, plugin_spans=False)])
    sem = asyncio.Semaphore(10)

    async def one(i: int) -> None:
        async with sem:
            assert (await post(g.url + "/v1/embeddings", {"model": "e", "input": f"x{i}"}))[0] == 200

    await asyncio.gather(*[one(i) for i in range(120)])
    recorded = {hexid(s.context.trace_id, 32) for s in g.plugin("tracing").memory_exporter.get_finished_spans()
                if s.kind == SpanKind.SERVER}
    sent = [r["headers"]["traceparent"].split("-") for r in list(upstream.requests)[-120:]]
    assert len({tid for _, tid, _, _ in sent}) == 120
    assert {tid for _, tid, _, flags in sent if int(flags, 16) & 1} == recorded
    assert 35 <= len(recorded) <= 85, len(recorded)  # ratio 0.5 of 120 (a double decision would give ~30)


async def test_client_abort_and_upstream_failure_are_recorded(make_gateway, upstream):
    g = await make_gateway([tracing()])
    exp = g.plugin("tracing").memory_exporter
    # The client goes away mid-stream.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        r = await s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"X-Demo-Delay": "0.2", "X-Demo-Words": "40"})
        assert r.status == 200
        await r.content.readany()
        r.close()
    async with asyncio.timeout(10):
        while not any(sp.kind == SpanKind.SERVER for sp in exp.get_finished_spans()):
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    spans = by_name(exp.get_finished_spans())
    assert spans["POST /v1/chat/completions"].attributes["gateway.outcome"] == "client_disconnected"
    genai = spans["chat demo-chat"]
    assert genai.status.is_ok is False and genai.attributes["error.type"] == "client_disconnected"
    # The upstream drops the connection mid-stream.
    exp.clear()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"X-Demo-Die-After": "2"}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):  # the client sees the cut
                await r.read()
    async with asyncio.timeout(10):
        while not any(sp.kind == SpanKind.SERVER for sp in exp.get_finished_spans()):
            await asyncio.sleep(0.05)
    spans = by_name(exp.get_finished_spans())
    assert spans["POST /v1/chat/completions"].attributes["gateway.outcome"] == "upstream_disconnected"
    assert spans["chat demo-chat"].attributes["error.type"] == "upstream_disconnected"


async def test_otel_environment_variables_fill_what_the_yaml_leaves_out(make_gateway, upstream, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)  # the exporter appends /v1/traces
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-from-env=yes")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gw-from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    g = await make_gateway([tracing(exporter={"type": "otlp_http"}, batch={"schedule_delay_ms": 50})])
    assert (await post(g.url + "/v1/chat/completions", CHAT))[0] == 200
    await receiver.wait_for(lambda: any(sp.kind == sp.SPAN_KIND_SERVER for _, sp in receiver.spans))
    res = receiver.spans[0][0]
    assert res["service.name"] == "gw-from-env" and res["deployment.environment"] == "test"
    assert receiver.headers[0]["x-from-env"] == "yes"


async def test_sigterm_flushes_queued_spans(tmp_path, upstream, receiver):
    """A real `gateway serve` process: spans still queued at SIGTERM reach the collector."""
    from .helpers import GatewayProcess, base_config, write_config

    port = free_port()
    cfg = base_config(upstream.url, tmp_path, [tracing(exporter={"type": "otlp_http", "endpoint": receiver.url},
                                                       batch={"schedule_delay_ms": 600000})],
                      server={"port": port}, admin={"enabled": False})
    p = GatewayProcess(write_config(tmp_path / "gw.yaml", cfg), port, None).start()
    try:
        await p.wait_ready()
        receiver.spans.clear()
        for _ in range(3):
            assert (await post(p.url + "/v1/chat/completions", CHAT, {"traceparent": TRACEPARENT}))[0] == 200
        assert not receiver.spans  # nothing exported yet: the schedule is 10 minutes
        p.signal(__import__("signal").SIGTERM)
        await asyncio.get_running_loop().run_in_executor(None, p.wait, 30)
        assert sum(1 for _, sp in receiver.spans if sp.kind == sp.SPAN_KIND_SERVER and
                   sp.trace_id.hex() == TRACE_ID) == 3, p.log()[-2000:]
    finally:
        p.stop()


async def test_otlp_grpc_export_to_a_real_receiver(make_gateway, upstream):
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc

    got: list[Any] = []
    metadata: list[dict[str, str]] = []

    class Service(pb_grpc.TraceServiceServicer):
        async def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the gRPC method name)
            metadata.append(dict(context.invocation_metadata()))
            got.extend(sp for rs in request.resource_spans for ss in rs.scope_spans for sp in ss.spans)
            return ExportTraceServiceResponse()

    server = grpc.aio.server()
    pb_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        g = await make_gateway([tracing(exporter={"type": "otlp_grpc", "endpoint": f"http://127.0.0.1:{port}",
                                                  "headers": {"x-tenant": "t1"}, "timeout": 5},
                                        batch={"schedule_delay_ms": 50})])
        assert (await post(g.url + "/v1/chat/completions", CHAT, {"traceparent": TRACEPARENT}))[0] == 200
        async with asyncio.timeout(10):
            while len(got) < 3:
                await asyncio.sleep(0.05)
        assert {sp.name for sp in got} == {"POST /v1/chat/completions", "POST", "chat demo-chat"}
        assert {sp.trace_id.hex() for sp in got} == {TRACE_ID}
        assert metadata[0]["x-tenant"] == "t1"
        async with asyncio.timeout(15):
            await g.stop()
    finally:
        await server.stop(None)


async def test_per_route_override_mounts_tracing_once_and_credentials_stay_out(make_gateway, upstream, monkeypatch):
    """A per-route tracing override is a second instance of the plugin: the middleware and the client
    instrumentation are still mounted once. Header capture switched on by the environment never
    records a credential, request or response; a gateway key in the query string keeps only its id;
    a client's made-up path does not become a span name."""

    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", ".*")
    monkeypatch.delenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", raising=False)
    g = await make_gateway([tracing(), {"name": "headers", "config": {"response": {
        "Set-Cookie": "session=COOKIESECRET", "X-Api-Key": "RESPKEYSECRET"}}}],
        routes=[{"path_prefix": "/v1/chat/completions", "plugins": {"tracing": {"config": {"record_content": True}}}}])
    key = "gw_AbCdEfGhIjKl_" + "s" * 24 + "ZZZZZZ"
    status, _ = await post(g.url + f"/v1/chat/completions?k={key}&api_key=QSECRET", CHAT,
                           {"Authorization": "Bearer REQSECRET", "traceparent": TRACEPARENT})
    assert status == 200
    assert (await post(g.url + "/v1/abc123/chat/completions", CHAT))[0] in (200, 404)
    spans = g.plugin("tracing").memory_exporter.get_finished_spans()
    first = [s for s in spans if s.context.trace_id == int(TRACE_ID, 16)]
    assert [s.kind for s in first].count(SpanKind.SERVER) == 1
    assert [(s.kind, s.name) for s in first].count((SpanKind.CLIENT, "POST")) == 1
    dump = json.dumps([dict(s.attributes) for s in spans] + [[dict(e.attributes) for e in s.events] for s in spans],
                      default=str)
    for secret in ("REQSECRET", "COOKIESECRET", "RESPKEYSECRET", "QSECRET", "s" * 24):
        assert secret not in dump, secret
    assert "gw_AbCdEfGhIjKl_REDACTED" in dump
    assert not any(s.name == "POST /v1/abc123/chat/completions" for s in spans)
