"""Spans as tracing backends read them: the stable HTTP conventions (OTEL_SEMCONV_STABILITY_OPT_IN),
resource attributes from the environment, and a response the client walked away from."""
from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp

from gateway.plugins.key_auth.keys import format_key, new_key_id, new_secret

from .helpers import GatewayProcess, base_config, free_port, until, write_config
from .test_tracing import CHAT, by_name, otlp_attrs, receiver, tracing  # noqa: F401  (receiver is a fixture)


async def test_stable_http_conventions_carry_no_key_and_the_environment_s_version(
        tmp_path: Any, upstream: Any, receiver: Any) -> None:  # noqa: F811
    """With OTEL_SEMCONV_STABILITY_OPT_IN=http the server span has url.path and url.query: a gateway
    key a client put in the path keeps its id only there too. A service.version set in
    OTEL_RESOURCE_ATTRIBUTES (a deployment's build id) is the one exported."""
    key = format_key(new_key_id(), new_secret())
    secret = key.rsplit("_", 1)[1]
    port = free_port()
    cfg = base_config(upstream.url, tmp_path, [tracing(exporter={"type": "otlp_http", "endpoint": receiver.url},
                                                       batch={"schedule_delay_ms": 50})],
                      server={"port": port}, admin={"enabled": False})
    p = GatewayProcess(write_config(tmp_path / "gw.yaml", cfg), port, None,
                       env={"OTEL_SEMCONV_STABILITY_OPT_IN": "http",
                            "OTEL_RESOURCE_ATTRIBUTES": "service.version=9.9.9-build7"}).start()
    try:
        await p.wait_ready()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{p.url}/v1/{key}/chat/completions?api_key={key}", json=CHAT) as r:
                await r.read()
        await receiver.wait_for(lambda: any(sp.kind == sp.SPAN_KIND_SERVER and otlp_attrs(sp).get("http.request.method")
                                            == "POST" for _, sp in receiver.spans))
    finally:
        p.signal(signal.SIGTERM)
        await asyncio.get_running_loop().run_in_executor(None, p.wait, 30)
    res, server = next((r, sp) for r, sp in receiver.spans if sp.kind == sp.SPAN_KIND_SERVER
                       and otlp_attrs(sp).get("http.request.method") == "POST")
    attrs = otlp_attrs(server)
    assert "url.path" in attrs and key[:15] in attrs["url.path"], attrs  # the id stays
    for _, sp in receiver.spans:
        assert secret not in repr(otlp_attrs(sp)), otlp_attrs(sp)
    assert res["service.version"] == "9.9.9-build7"


async def test_a_stream_the_client_left_records_its_status_and_the_cut(make_gateway: Any) -> None:
    g = await make_gateway([tracing(genai_span=False, plugin_spans=False)])
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"X-Demo-Delay": "0.2", "X-Demo-Words": "20"}) as r:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")  # the head and a first event, then away
    exp = g.plugin("tracing").memory_exporter
    await until(lambda: any(sp.kind.name == "SERVER" for sp in exp.get_finished_spans()),
                what="the gateway to notice (its next write) and end the request")
    spans = by_name(exp.get_finished_spans())
    assert "POST /v1/chat/completions" in spans, {n: dict(sp.attributes) for n, sp in spans.items()}
    server = spans["POST /v1/chat/completions"]
    a = server.attributes
    assert (a.get("http.status_code") or a.get("http.response.status_code")) == 200, dict(a)
    assert a["error.type"] == "client_disconnected" and a["gateway.outcome"] == "client_disconnected"
    assert server.status.status_code.name == "ERROR"
    assert a["client.address"] == "127.0.0.1"


def test_a_responses_api_answer_s_status_is_named_as_a_finish_reason() -> None:
    """The conventions' finish reasons are stop / length / content_filter / error: a Responses API
    answer's status ("completed", or why it is incomplete) is mapped to them on the GenAI span."""
    import types

    from gateway.observe import Completion
    from gateway.plugins.tracing import genai

    def reasons(path: str, got: list[str]) -> Any:
        c = Completion()
        c.finish_reasons = got
        ctx = types.SimpleNamespace(path=path, lpath=path.lower(), json={"model": "m"}, body=b'{"model": "m"}', model="m",
                                    conversation_id=None, completion=c, method="POST")
        return genai.attributes("chat", ctx, "openai", False, 0).get("gen_ai.response.finish_reasons")

    assert reasons("/v1/responses", ["completed"]) == ["stop"]
    assert reasons("/v1/responses", ["max_output_tokens"]) == ["length"]
    assert reasons("/v1/responses", ["content_filter"]) == ["content_filter"]
    assert reasons("/v1/chat/completions", ["stop", "length"]) == ["stop", "length"]
