"""Hosted backends whose API is OpenAI-like but not the same shape, behind the shipped plugins:
Azure OpenAI (the deployment in the path, ``api-version`` in the query, the key in ``api-key``,
API Management's ``Ocp-Apim-Subscription-Key``) and Gemini's OpenAI endpoint (``models/`` model
names, thought signatures on tool calls, thought tokens counted in the total alone).

The backend is the test's own, answering as those services do (its shapes are written out below)."""
from __future__ import annotations

import json
from typing import Any

import aiohttp
from aiohttp import web

from .helpers import ADMIN_TOKEN, clear_of_a_minute_boundary, recorded_usage_and_audit, serve_handler, until
from .test_memory_edges import stored, user

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SIG = {"google": {"thought_signature": "c2lnbmF0dXJl"}}


class Hosted:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], Any]] = []
        self.old_versions = {"2024-06-01"}  # refuse stream_options, as older Azure API versions do

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.seen.append((str(request.rel_url), dict(request.headers), body))
        if "Ocp-Apim-Subscription-Key" in request.headers:
            return web.json_response({"statusCode": 401, "message": "Access denied due to invalid subscription key."},
                                     status=401)
        if request.path.endswith("/models"):
            return web.json_response({"object": "list", "data": [
                {"id": "models/gemini-2.0-flash", "object": "model"}, {"id": "models/gemini-pro", "object": "model"}]})
        if request.query.get("api-version") in self.old_versions and "stream_options" in body:
            return web.json_response({"error": {"message": "Unrecognized request argument supplied: stream_options",
                                                "type": "invalid_request_error", "code": None}}, status=400)
        msgs = body["messages"]
        for m in msgs:  # Gemini 3: a replayed function call without its signature is refused
            for tc in m.get("tool_calls") or ():
                if tc.get("extra_content") != SIG:
                    return web.json_response([{"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                               "message": "Function call is missing a thought_signature"}}], status=400)
        call = msgs[-1]["role"] == "user" and "weather" in msgs[-1]["content"]
        usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
        if "think" in msgs[-1].get("content", ""):
            usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 76}
        if not body.get("stream"):
            msg: dict[str, Any] = {"role": "assistant", "content": "ok"}
            return web.json_response({"id": "c", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
                                      "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                                      "usage": usage})
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(request)

        async def ev(d: Any) -> None:
            await r.write(b"data: " + json.dumps(d).encode() + b"\n\n")

        if call:
            await ev({"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                {"index": 0, "id": "function-call-1", "type": "function", "extra_content": SIG,
                 "function": {"name": "get_weather", "arguments": ""}}]}}]})
            await ev({"choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": '{"city":"Paris"}'}}]}, "finish_reason": "tool_calls"}]})
        else:
            await ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "sunny"},
                                   "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await ev({"choices": [], "usage": usage})
        await r.write(b"data: [DONE]\n\n")
        return r


async def _hosted(make_gateway: Any, plugins: list[dict[str, Any]],
                  upstream_headers: dict[str, str] | None = None) -> tuple[Any, Hosted, Any]:
    up = Hosted()
    runner, url = await serve_handler(up.handle)
    g = await make_gateway(plugins, upstream={"url": url, "headers": upstream_headers or {}},
                           server={"paths": ["/v1", "/openai", "/v1beta/openai"]})
    return g, up, runner


async def test_a_streamed_tool_call_keeps_its_thought_signature_for_memory_turns(make_gateway: Any) -> None:
    """Gemini 3 sends a tool call's ``extra_content.google.thought_signature`` in a stream delta
    and refuses the call replayed without it: a streamed tool call was stored without it, so the
    memory turn that sent the tool result got a 400."""
    g, up, runner = await _hosted(make_gateway, [{"name": "conversations", "config": {"memory": {"enabled": True}}}])
    try:
        async with aiohttp.ClientSession() as s:
            url = g.url + "/v1beta/openai/chat/completions"
            async with s.post(url, json={"model": "gemini-3-pro", "stream": True,
                                         "messages": [user("weather in Paris?")]}) as r:
                assert r.status == 200
                cid = r.headers["X-Conversation-ID"]
                await r.read()
            tool = {"role": "tool", "tool_call_id": "function-call-1", "content": "sunny"}
            async with s.post(url, json={"model": "gemini-3-pro", "messages": [tool]},
                              headers={"X-Conversation-ID": cid}) as r:
                assert r.status == 200, await r.text()
        replayed = up.seen[-1][2]["messages"][1]
        assert replayed["tool_calls"][0]["extra_content"] == SIG
        msgs = [m for m, _ in await stored(g, cid)]
        assert msgs[1]["tool_calls"] == [{"id": "function-call-1", "type": "function", "extra_content": SIG,
                                          "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    finally:
        await runner.cleanup()


async def test_on_azure_paths_the_deployment_is_the_model(make_gateway: Any) -> None:
    """Azure serves the deployment the path names, whatever the body's ``model`` says (its clients
    often send none): a rule keyed by model counts per deployment, a key scoped to one deployment
    cannot reach another by naming the first in the body, and the audit event names it."""
    g, up, runner = await _hosted(make_gateway, [
        {"name": "key_auth"},
        {"name": "rate_limit", "config": {"rules": [{"name": "per-deployment", "limit": "3/minute",
                                                      "key_by": ["model"]}]}},
        {"name": "audit"}])
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", headers=ADMIN,
                              json={"owner": "o", "scopes": {"models": ["dep-a"]}}) as r:
                key = (await r.json())["key"]
            h = {"api-key": key}
            q = "/chat/completions?api-version=2024-10-21"
            statuses = []
            for i in range(5):  # a different model in each body: one deployment, one count
                async with s.post(g.url + "/openai/deployments/dep-a" + q, headers=h,
                                  json={"model": f"x{i}", "messages": [user("hi")]}) as r:
                    statuses.append(r.status)
            assert statuses == [200, 200, 200, 429, 429]
            async with s.post(g.url + "/openai/deployments/dep-b" + q, headers=h,
                              json={"model": "dep-a", "messages": [user("hi")]}) as r:
                assert r.status == 403
                assert (await r.json())["error"]["code"] == "key_scope_denied"

            async def events() -> Any:  # (refusals are events of their own types)
                async with s.get(g.admin_url + "/audit", headers=ADMIN) as r:
                    got = [e for e in (await r.json())["data"] if "model" in e]
                return got if len(got) >= 6 else None

            got = await until(events, what="six audit events")
        assert sorted((e["status"], e["model"]) for e in got) == [(200, "dep-a")] * 3 + [(403, "dep-b")] + \
            [(429, "dep-a")] * 2
        assert len(up.seen) == 3
    finally:
        await runner.cleanup()


async def test_a_refused_stream_options_is_learned_per_api_version(make_gateway: Any) -> None:
    """One client on an older Azure API version (which refuses stream_options) turned the usage
    request off for every client's streams, until a reload: their tokens became estimates."""
    g, up, runner = await _hosted(make_gateway, [
        {"name": "rate_limit", "config": {"rules": [{"name": "tpm", "limit": "100000/minute", "counts": "tokens",
                                                      "key_by": ["ip"]}]}}])
    try:
        async with aiohttp.ClientSession() as s:
            for version in ("2024-10-21", "2024-06-01", "2024-10-21", "2024-06-01"):
                async with s.post(g.url + f"/openai/deployments/d/chat/completions?api-version={version}",
                                  json={"messages": [user("hi")], "stream": True}) as r:
                    assert r.status == 200
                    assert b'"usage"' not in await r.read()  # (the client did not ask for it)
        sent = [(u.split("api-version=")[1], "stream_options" in b) for u, _, b in up.seen]
        assert sent == [("2024-10-21", True), ("2024-06-01", True), ("2024-06-01", False),
                        ("2024-10-21", True), ("2024-06-01", False)]
    finally:
        await runner.cleanup()


async def test_an_api_management_key_refused_is_the_gateways_not_the_clients(make_gateway: Any) -> None:
    g, up, runner = await _hosted(make_gateway, [],
                                  upstream_headers={"Ocp-Apim-Subscription-Key": "apim-secret-0123456789"})
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/openai/deployments/d/chat/completions?api-version=2024-10-21",
                              json={"messages": [user("hi")]}) as r:
                assert r.status == 502
                assert (await r.json())["error"]["code"] == "upstream_auth_failed"
    finally:
        await runner.cleanup()


async def test_gemini_model_names_with_and_without_models_prefix_are_one_model(make_gateway: Any) -> None:
    g, up, runner = await _hosted(make_gateway, [
        {"name": "key_auth"},
        {"name": "rate_limit", "config": {"rules": [{"name": "per-model", "limit": "2/minute", "key_by": ["model"]}]}}])
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", headers=ADMIN,
                              json={"owner": "o", "scopes": {"models": ["gemini-2.0-flash"]}}) as r:
                h = {"Authorization": "Bearer " + (await r.json())["key"]}
            async with s.get(g.url + "/v1beta/openai/models", headers=h) as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["models/gemini-2.0-flash"]
            statuses = []
            for model in ("gemini-2.0-flash", "models/gemini-2.0-flash", "models/gemini-2.0-flash"):
                async with s.post(g.url + "/v1beta/openai/chat/completions", headers=h,
                                  json={"model": model, "messages": [user("hi")]}) as r:
                    statuses.append(r.status)
            assert statuses == [200, 200, 429]
    finally:
        await runner.cleanup()


async def test_tokens_counted_in_the_total_alone_are_output_in_every_ledger(make_gateway: Any) -> None:
    """A usage whose total is above prompt + completion (thought tokens counted in the total
    alone): token limits charged the total, while key usage, the audit event and metrics counted
    prompt + completion."""
    await clear_of_a_minute_boundary()  # (the figures compared must not straddle two minutes)
    g, up, runner = await _hosted(make_gateway, [
        {"name": "key_auth"}, {"name": "audit"},
        {"name": "rate_limit", "config": {"rules": [{"name": "tpm", "limit": "1000/minute", "counts": "tokens",
                                                      "key_by": ["key"]}]}}])
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", headers=ADMIN, json={"owner": "o"}) as r:
                created = await r.json()
            h = {"Authorization": "Bearer " + created["key"]}
            async with s.post(g.url + "/v1beta/openai/chat/completions", headers=h,
                              json={"model": "gemini-2.5-pro", "messages": [user("think hard")]}) as r:
                assert r.status == 200
            totals, events = await until(lambda: recorded_usage_and_audit(g, s, created["id"]))
            async with s.post(g.url + "/v1beta/openai/chat/completions", headers=h,
                              json={"model": "gemini-2.5-pro", "messages": [user("again")]}) as r:
                remaining = int(r.headers["x-ratelimit-remaining-tokens"])
        assert (totals["prompt_tokens"], totals["completion_tokens"]) == (11, 65)
        assert (events[0]["tokens_in"], events[0]["tokens_out"]) == (11, 65)
        assert remaining == 1000 - 76
    finally:
        await runner.cleanup()


async def test_api_versions_that_are_no_versions_are_not_learned_one_by_one(make_gateway: Any) -> None:
    """An upstream refusing stream_options, and a client sending a new made-up api-version on each
    stream: each was learned as a version of its own (an unbounded set, a warning and a second
    upstream send per request). A value that is no version is the upstream's: learned once."""
    g, up, runner = await _hosted(make_gateway, [
        {"name": "rate_limit", "config": {"rules": [{"name": "tpm", "limit": "100000/minute", "counts": "tokens",
                                                      "key_by": ["ip"]}]}}])
    up.old_versions = {f"x{i}" for i in range(6)} | {"2024-06-01"}
    try:
        async with aiohttp.ClientSession() as s:
            for v in [f"x{i}" for i in range(6)] + ["2024-06-01", "2024-06-01"]:
                async with s.post(g.url + f"/openai/deployments/d/chat/completions?api-version={v}",
                                  json={"messages": [user("hi")], "stream": True}) as r:
                    assert r.status == 200
                    await r.read()
        with_field = [u.split("=")[1] for u, _, b in up.seen if "stream_options" in b]
        assert with_field == ["x0", "2024-06-01"], with_field
        assert len(g.gw.upstream.usage_refused) == 2
    finally:
        await runner.cleanup()


async def test_past_the_versions_told_apart_a_refusal_is_learned_once(make_gateway: Any,
                                                                      monkeypatch: Any) -> None:
    """Past the api-versions told apart, a version's refusal was recorded under the shared entry
    but looked up under its own: every request with it was sent twice, for good."""
    import gateway.upstream as upstream_module

    monkeypatch.setattr(upstream_module, "MAX_VERSIONS", 2)
    g, up, runner = await _hosted(make_gateway, [
        {"name": "rate_limit", "config": {"rules": [{"name": "tpm", "limit": "100000/minute", "counts": "tokens",
                                                      "key_by": ["ip"]}]}}])
    versions = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]
    up.old_versions = set(versions)
    try:
        async with aiohttp.ClientSession() as s:
            for v in versions * 2:
                async with s.post(g.url + f"/openai/deployments/d/chat/completions?api-version={v}",
                                  json={"messages": [user("hi")], "stream": True}) as r:
                    assert r.status == 200
                    await r.read()
        with_field = [u.split("=")[1] for u, _, b in up.seen if "stream_options" in b]
        assert with_field == ["2024-01-01", "2024-01-02", "2024-01-03"], with_field  # (the third: the shared entry)
    finally:
        await runner.cleanup()


def test_streamed_reasoning_details_without_an_index_are_assembled_by_type() -> None:
    from gateway.observe import ResponseObserver

    def ev(d: Any) -> bytes:
        return b"data: " + json.dumps(d).encode() + b"\n\n"

    o = ResponseObserver(True, False)
    for piece in ([{"type": "reasoning.text", "text": "A"}], [{"type": "reasoning.text", "text": 5}],
                  [{"type": "reasoning.text", "text": "B"}], [{"type": "reasoning.encrypted", "data": "x"}]):
        o.feed(ev({"choices": [{"index": 0, "delta": {"reasoning_details": piece}}]}))
    o.finish()
    # (no index: a piece goes on the last item of its type; a text that is not one is not taken)
    assert o.c.assistant_message() == {"role": "assistant", "content": None, "reasoning_details": [
        {"type": "reasoning.text", "text": "AB"}, {"type": "reasoning.encrypted", "data": "x"}]}


def test_the_deployment_is_read_from_the_path_as_written() -> None:
    from gateway.context import deployment

    assert deployment("/openai/deployments/dep-a/chat/completions") == "dep-a"
    assert deployment("/OpenAI/Deployments/Dep-A/embeddings") == "Dep-A"
    # (a character whose lower case is longer moved the name: 'İ' is two characters in lower case)
    assert deployment("/İİİ/openai/deployments/xdep-a/chat/completions") == "xdep-a"
    assert deployment("/openai/deployments//chat/completions") is None
    assert deployment("/v1/chat/completions") is None


class Other:
    """Groq (usage in x_groq.usage on the last chunk) and OpenRouter (an error beside the choices
    mid-stream; reasoning_details streamed), as their documentation shows them."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(request)

        async def ev(d: Any) -> None:
            await r.write(b"data: " + json.dumps(d).encode() + b"\n\n")

        usage = {"prompt_tokens": 777, "completion_tokens": 55, "total_tokens": 832}
        if request.path.startswith("/groq"):
            await ev({"id": "g", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]})
            await ev({"id": "g", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                      "x_groq": {"id": "req_01", "usage": usage}})
        elif body["messages"][-1].get("content") == "fail":
            await ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello from the"}}]})
            await ev({"error": {"code": 502, "message": "Provider disconnected unexpectedly"},
                      "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]})
        else:
            sig = [{"type": "reasoning.text", "text": "Let me ", "index": 0, "format": "anthropic-claude-v1"}]
            await ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "",
                                                         "reasoning_details": sig}}]})
            await ev({"choices": [{"index": 0, "delta": {"reasoning_details": [
                {"type": "reasoning.text", "text": "think.", "signature": "EqQB-sig", "index": 0}]}}]})
            await ev({"choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                "finish_reason": "tool_calls"}], "usage": usage})
        await r.write(b"data: [DONE]\n\n")
        return r


async def test_groq_and_openrouter_streams_are_read_as_they_report(make_gateway: Any) -> None:
    up = Other()
    runner, url = await serve_handler(up.handle)
    try:
        g = await make_gateway([
            {"name": "audit"},
            {"name": "rate_limit", "config": {"rules": [{"name": "tpm", "limit": "100000/minute", "counts": "tokens",
                                                          "key_by": ["ip"]}]}},
            {"name": "conversations", "config": {"memory": {"enabled": True}}}],
            upstream={"url": url}, server={"paths": ["/v1", "/groq", "/api"]})
        async with aiohttp.ClientSession() as s:
            async def stream(path: str, text: str, cid: str | None = None) -> tuple[str, bytes]:
                async with s.post(g.url + path, json={"model": "m", "stream": True, "messages": [user(text)]},
                                  headers={"X-Conversation-ID": cid} if cid else {}) as r:
                    return r.headers["X-Conversation-ID"], await r.read()

            await stream("/groq/openai/v1/chat/completions", "hi")
            cid, _ = await stream("/api/v1/chat/completions", "call a tool")
            await stream("/api/v1/chat/completions", "fail")

            async def events() -> Any:
                async with s.get(g.admin_url + "/audit?type=request", headers=ADMIN) as r:
                    got = (await r.json())["data"]
                return got if len(got) == 3 else None

            evs = await until(events, what="three audit events")
            tool = {"role": "tool", "tool_call_id": "t1", "content": "42"}
            async with s.post(g.url + "/api/v1/chat/completions", json={"model": "m", "messages": [tool]},
                              headers={"X-Conversation-ID": cid}) as r:
                await r.read()
        groq, tools, failed = sorted(evs, key=lambda e: e["seq"])
        # Groq: its x_groq usage, not an estimate from the deltas
        assert (groq["tokens_in"], groq["tokens_out"]) == (777, 55), groq
        # OpenRouter: a provider failing mid-stream is an upstream error, not a finished answer
        assert failed["outcome"] == "upstream_error", failed
        assert tools["outcome"] == "ok"
        # its streamed reasoning_details go back with the tool call, as a plain answer's do
        replayed = up.seen[-1]["messages"][1]
        assert replayed["reasoning_details"] == [{"type": "reasoning.text", "text": "Let me think.", "index": 0,
                                                  "format": "anthropic-claude-v1", "signature": "EqQB-sig"}], replayed
    finally:
        await runner.cleanup()
