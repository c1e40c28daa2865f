"""Which requests are usage: only a request that generates is charged, and counted, the tokens its
answer reports. Reading, streaming again, cancelling or deleting a stored answer returns that
answer's usage, which its own request was already charged; none of them is refused for want of
tokens either. A request that may use tokens but has nothing to estimate (an audio upload) is
refused once a token limit is used up. A 504 for a request the upstream never got costs nothing;
a background job is charged what it was admitted for."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

import aiohttp
import openai
from aiohttp import web

from gateway.estimate import prompt_estimate
from gateway.observe import Completion
from gateway.plugins.rate_limit.rules import max_tokens
from gateway.plugins.tracing.genai import _usage

from .helpers import ADMIN_TOKEN, serve_handler, until

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USAGE = {"input_tokens": 100, "output_tokens": 50, "total_tokens": 150,
         "input_tokens_details": {"cached_tokens": 40}, "output_tokens_details": {"reasoning_tokens": 20}}


def _response(status: str = "completed", usage: Any = USAGE) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 1, "status": status, "model": "m",
            "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "hello", "annotations": []}]}],
            "usage": usage}


async def fake(request: web.Request) -> web.StreamResponse:
    """The Responses API as OpenAI documents it, and an audio transcription (multipart upload)."""
    path, method = request.path, request.method
    body = await request.read()
    if "X-Slow" in request.headers:
        await asyncio.sleep(float(request.headers["X-Slow"]))
    if path == "/v1/responses/input_tokens":
        return web.json_response({"object": "response.input_tokens", "input_tokens": 12})
    if path == "/v1/responses" and method == "POST":
        if json.loads(body).get("background") and json.loads(body).get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'event: response.created\ndata: {"type": "response.created", "response": '
                             + json.dumps(_response("queued", None)).encode() + b'}\n\n')
            for _ in range(50):
                await asyncio.sleep(0.05)
                await resp.write(b'event: response.output_text.delta\ndata: {"type": '
                                 b'"response.output_text.delta", "output_index": 0, "content_index": 0, '
                                 b'"delta": "w"}\n\n')
            return resp
        if json.loads(body).get("background"):
            return web.json_response(_response("queued", None))
        return web.json_response(_response())
    if path == "/v1/responses/resp_1" and method == "DELETE":
        return web.json_response({"id": "resp_1", "object": "response", "deleted": True})
    if path.startswith("/v1/responses/resp_1"):  # retrieve, and cancel (POST .../cancel)
        return web.json_response(_response())
    if path.endswith("/cancel") or path == "/v1/files":
        return web.json_response({"id": "x", "status": "cancelling"})
    if path == "/v1/audio/transcriptions":
        assert request.content_type == "multipart/form-data"
        return web.json_response({"text": "hi", "usage": {"type": "tokens", "input_tokens": 30,
                                                          "output_tokens": 5, "total_tokens": 35}})
    return web.json_response({"error": {"message": "no such path"}}, status=404)


def plugins(rules: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "key_auth", "config": {"last_used_interval": 0}},
            {"name": "rate_limit", "config": {"rules": rules, **extra}},
            {"name": "audit"}, {"name": "metrics"}]


async def new_key(s: aiohttp.ClientSession, g: Any) -> tuple[str, str]:
    async with s.post(g.admin_url + "/keys", json={"owner": "team-a"}, headers=ADMIN) as r:
        rec = await r.json()
    return rec["key"], rec["id"]


async def upload(s: aiohttp.ClientSession, g: Any, key: str) -> int:
    """An audio transcription (a multipart upload): its status."""
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("file", b"RIFF....WAVEfmt " + bytes(2000), filename="a.wav", content_type="audio/wav")
    return (await call(s, g, key, "POST", "/v1/audio/transcriptions", data=form))[0]


def tpd(limit: int) -> list[dict[str, Any]]:
    return plugins([{"name": "tpd", "limit": f"{limit}/day", "counts": "tokens", "key_by": ["key"]}])


@contextlib.asynccontextmanager
async def served(make_gateway: Any, chain: list[dict[str, Any]], handler: Any = fake,
                 upstream: dict[str, Any] | None = None,
                 **sections: Any) -> AsyncIterator[tuple[Any, aiohttp.ClientSession, str, str]]:
    """A gateway with ``chain`` before ``handler`` (the fake upstream), a client session, and a new
    key: (gateway, session, key, key id). The upstream stops at the end."""
    runner, url = await serve_handler(handler)
    try:
        g = await make_gateway(chain, upstream={"url": url, **(upstream or {})}, **sections)
        async with aiohttp.ClientSession() as s:
            key, kid = await new_key(s, g)
            yield g, s, key, kid
    finally:
        await runner.cleanup()


async def call(s: aiohttp.ClientSession, g: Any, key: str, method: str, path: str,
               **kw: Any) -> tuple[int, dict[str, str]]:
    async with s.request(method, g.url + path, headers={"Authorization": f"Bearer {key}", **kw.pop("headers", {})},
                         **kw) as r:
        await r.read()
        return r.status, dict(r.headers)


async def test_reading_cancelling_and_deleting_a_stored_response_is_not_charged_its_usage_again(
        make_gateway: Any) -> None:
    async with served(make_gateway, tpd(1000)) as (g, s, key, kid):
        client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=10)
        created = await client.responses.create(model="m", input="say hello")
        assert created.usage is not None and created.usage.total_tokens == 150
        for _ in range(3):
            got = await client.responses.retrieve("resp_1")
            assert got.usage is not None and got.usage.total_tokens == 150  # relayed as it came
        await client.responses.cancel("resp_1")
        await client.responses.delete("resp_1")
        await client.close()
        await g.plugin("rate_limit").drain()
        st, h = await call(s, g, key, "GET", "/v1/responses/resp_1")
        assert st == 200 and h["x-ratelimit-remaining-tokens"] == str(1000 - 150)

        async def ledgers() -> Any:
            await g.plugin("key_auth").flush_usage()
            async with s.get(g.admin_url + f"/keys/{kid}/usage", headers=ADMIN) as r:
                totals = (await r.json())["totals"]
            async with s.get(g.admin_url + "/audit?type=request", headers=ADMIN) as r:
                evs = (await r.json())["data"]
            return (totals, evs) if totals["requests"] == 7 and len(evs) == 7 else None

        totals, evs = await until(ledgers, what="seven requests in key usage and the audit trail")
        async with s.get(g.admin_url + "/metrics", headers=ADMIN) as r:
            text = await r.text()
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (100, 50)
    charged = [(e["method"], e["path"]) for e in evs if e["tokens_in"] is not None or e["tokens_out"] is not None]
    assert charged == [("POST", "/v1/responses")]
    assert 'gateway_tokens_total{direction="input",model="m"} 100.0' in text
    assert 'gateway_tokens_total{direction="output",model="m"} 50.0' in text


async def test_a_used_up_budget_refuses_an_upload_but_not_reads_counts_cancels_or_deletes(
        make_gateway: Any) -> None:
    # A token rule used up exactly (150 of 150), and a daily quota overdrawn (150 of 100).
    chain = plugins([{"name": "tpd", "limit": "150/day", "counts": "tokens", "key_by": ["key"]}],
                    quotas={"daily_tokens": 100})
    async with served(make_gateway, chain) as (g, s, key, _):
        st, _ = await call(s, g, key, "POST", "/v1/responses",
                           json={"model": "m", "input": "hi", "max_output_tokens": 50})
        assert st == 200
        await g.plugin("rate_limit").drain()
        # Nothing generates: none of these is refused, the quota overdrawn or not.
        for method, path, kw in (("GET", "/v1/responses/resp_1", {}),
                                 ("POST", "/v1/responses/resp_1/cancel", {}),
                                 ("POST", "/v1/batches/batch_1/cancel", {}),
                                 ("POST", "/v1/fine_tuning/jobs/ft_1/cancel", {"json": {}}),
                                 ("POST", "/v1/files", {"data": b"a file"}),
                                 ("POST", "/v1/responses/input_tokens", {"json": {"model": "m", "input": "hi"}}),
                                 ("DELETE", "/v1/responses/resp_1", {})):
            st, h = await call(s, g, key, method, path, **kw)
            assert st == 200, (method, path, st)
        # An audio upload may use tokens; with none to estimate it needs one left, and there is none.
        assert await upload(s, g, key) == 429


async def test_an_upload_is_refused_once_a_token_rule_is_used_up_to_exactly_zero(make_gateway: Any) -> None:
    async with served(make_gateway, tpd(70)) as (g, s, key, _):
        statuses = []
        for _ in range(3):  # 35 tokens each: two fit, the third finds 0 left
            statuses.append(await upload(s, g, key))
            await g.plugin("rate_limit").drain()
    assert statuses == [200, 200, 429]


async def test_a_background_response_is_charged_what_it_was_admitted_for(make_gateway: Any) -> None:
    async with served(make_gateway, tpd(100000)) as (g, s, key, _):
        body = {"model": "m", "input": "x" * 40, "background": True, "max_output_tokens": 4000}
        st, _ = await call(s, g, key, "POST", "/v1/responses", json=body)
        assert st == 200
        await g.plugin("rate_limit").drain()
        st, h = await call(s, g, key, "GET", "/v1/responses/resp_1")
    # the job's usage never comes through the gateway: its prompt (10) plus max_output_tokens
    assert int(h["x-ratelimit-remaining-tokens"]) == 100000 - (10 + 4000)


async def test_a_504_for_a_request_the_upstream_never_got_costs_no_tokens(make_gateway: Any) -> None:
    pool = {"max_connections": 1, "timeouts": {"connect": 0.3, "first_byte": 5, "idle": 5}}
    async with served(make_gateway, tpd(100000), upstream=pool) as (g, s, key, _):
        # The pool's one connection is busy with a slow answer; the next request waits for it
        # for timeouts.connect and gets a 504: its 1000-token prompt never went upstream.
        slow = asyncio.create_task(call(s, g, key, "POST", "/v1/responses", headers={"X-Slow": "1.5"},
                                        json={"model": "m", "input": "hi"}))
        await asyncio.sleep(0.3)
        st, h = await call(s, g, key, "POST", "/v1/responses", json={"model": "m", "input": "x" * 4000})
        assert st == 504
        assert (await slow)[0] == 200
        await g.plugin("rate_limit").drain()
        st, h = await call(s, g, key, "GET", "/v1/responses/resp_1")
    assert int(h["x-ratelimit-remaining-tokens"]) == 100000 - 150  # the slow request's usage alone


def test_the_prompt_estimate_counts_token_ids_tool_calls_and_function_call_items() -> None:
    assert prompt_estimate({"input": [[1, 2, 3] * 100] * 5}) == 1500  # embeddings of token ids
    assert prompt_estimate({"prompt": [5, 6, 7, 8]}) == 4
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "z" * 400}}
    with_call = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    assert prompt_estimate(with_call) == (len(json.dumps([call], separators=(",", ":"))) + 3) // 4
    items = [{"role": "user", "content": "u" * 40},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "a" * 400},
             {"type": "function_call_output", "call_id": "c1", "output": "o" * 800}]
    assert prompt_estimate({"input": items}) == (40 + 400 + 800) // 4


def test_a_span_has_the_responses_api_s_cached_input_tokens() -> None:
    c = Completion()
    c.usage = USAGE
    a: dict[str, Any] = {}
    _usage(a, c)
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"],
            a["gen_ai.usage.cache_read.input_tokens"]) == (100, 50, 40)


async def speech(request: web.Request) -> web.StreamResponse:
    await request.read()
    return web.Response(body=b"ID3" + bytes(3000), content_type="audio/mpeg")


async def test_a_speech_answer_is_charged_its_input_text_not_a_whole_completion(make_gateway: Any) -> None:
    """Audio answers are relayed, not read: the input text the upstream read is what they cost."""
    async with served(make_gateway, tpd(100000), speech) as (g, s, key, _):
        body = {"model": "tts-1", "voice": "alloy", "input": "Hello world, this is a test."}
        st, h = await call(s, g, key, "POST", "/v1/audio/speech", json=body)
        assert st == 200 and h["Content-Type"] == "audio/mpeg"
        await g.plugin("rate_limit").drain()
        st, h = await call(s, g, key, "POST", "/v1/audio/speech", json=body)
    estimate = (len(body["input"]) + 3) // 4
    # at the second's admission: the first's charge (not its admission estimate, prompt + 256)
    assert int(h["x-ratelimit-remaining-tokens"]) == 100000 - estimate


def test_what_is_about_a_stored_answer() -> None:
    from gateway.context import about_stored
    stored = [("GET", "/v1/responses/resp_1"), ("POST", "/v1/responses/resp_1/cancel"),
              ("DELETE", "/v1/responses/resp_1"), ("POST", "/v1/chat/completions/chatcmpl-1"),
              ("GET", "/v1/models")]
    generating = [("POST", "/v1/responses"), ("POST", "/v1/responses/"), ("POST", "/v1/chat/completions/"),
                  ("POST", "/v1/responses/compact"), ("POST", "/v1/chat/completions/x/y"),
                  ("POST", "/openai/deployments/gpt/chat/completions"), ("POST", "/v1/embeddings"),
                  ("POST", "/v1/responses/input_tokens"), ("POST", "/v1/messages")]
    assert [about_stored(m, p) for m, p in stored] == [True] * len(stored)
    assert [about_stored(m, p) for m, p in generating] == [False] * len(generating)


async def test_a_background_stream_its_client_leaves_is_charged_what_it_was_admitted_for(make_gateway: Any) -> None:
    """In background mode the job runs on upstream when the client goes: the cut stream is
    charged its admission estimate, not the deltas it got."""
    async with served(make_gateway, tpd(100000)) as (g, s, key, _):
        body = {"model": "m", "input": "x" * 40, "background": True, "stream": True, "max_output_tokens": 1900}
        async with s.post(g.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")
        await asyncio.sleep(0.3)
        await g.plugin("rate_limit").drain()
        st, h = await call(s, g, key, "GET", "/v1/responses/resp_1")
    assert int(h["x-ratelimit-remaining-tokens"]) == 100000 - (10 + 1900)


def test_the_completion_estimate_takes_the_largest_length_field_and_ollama_s_num_predict() -> None:
    # a backend reading "max_completion_tokens or max_tokens" takes 30000 past the 0
    assert max_tokens({"max_completion_tokens": 0, "max_tokens": 30000}, 256) == 30000
    assert max_tokens({"max_tokens": 5, "max_output_tokens": 7}, 256) == 7
    assert max_tokens({"options": {"num_predict": 20000}}, 256) == 20000
    assert max_tokens({"options": {"num_predict": -1}}, 256) == 256  # no limit: the default estimate
    assert max_tokens({}, 256) == 256


async def test_best_of_counts_on_a_legacy_completions_path_with_a_trailing_slash(make_gateway: Any) -> None:
    async with served(make_gateway, tpd(1000)) as (g, s, key, _):
        st, _ = await call(s, g, key, "POST", "/v1/completions/",
                           json={"model": "m", "prompt": "hi", "max_tokens": 300, "best_of": 5})
    assert st == 429  # five completions of 300 tokens cannot fit 1000


async def test_a_body_the_gateway_cannot_read_still_needs_a_token_left(make_gateway: Any) -> None:
    """JSON with a byte that is not UTF-8 is no JSON to the gateway, yet a lax backend (Go's
    decoder replaces the byte) generates from it: once the budget is used up, it is refused."""
    async with served(make_gateway, tpd(35)) as (g, s, key, _):
        assert await upload(s, g, key) == 200  # 35 tokens: the budget used up exactly
        await g.plugin("rate_limit").drain()
        bad = b'{"model": "m", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}'
        st, _ = await call(s, g, key, "POST", "/v1/chat/completions", data=bad,
                           headers={"Content-Type": "application/json"})
    assert st == 429
