"""The response observer against upstream answers of shapes nobody expects: the bytes always reach the
client, what can be understood is, and nothing is held back or buffered without bound."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web

from gateway.observe import MAX_EVENT, ResponseObserver

from .helpers import free_port, until


@contextlib.asynccontextmanager
async def backend(chat: Any, path: str = "/v1/chat/completions") -> AsyncIterator[str]:
    """A chat backend of the test's own on loopback; yields its base URL."""
    app = web.Application()
    app.router.add_post(path, chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def streaming(raw: bytes, piece: int) -> Any:
    """A chat handler that streams ``raw`` as server-sent events, ``piece`` bytes per write."""
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(raw), piece):
            await resp.write(raw[i:i + piece])
        await resp.write_eof()
        return resp

    return chat


def sse(*objs: Any) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


def delta(**d: Any) -> dict[str, Any]:
    return {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": d, "finish_reason": None}]}


ODD = [
    delta(role="assistant", content=""),
    delta(content="Hel"),
    delta(tool_calls=[{"index": -5, "function": {"name": "neg"}}]),
    delta(tool_calls=[{"index": 3_000_000, "function": {"name": "huge"}}]),
    delta(tool_calls=[{"index": "1", "function": {"name": "str-index"}}]),
    delta(tool_calls=[{"index": 0, "id": "call_1", "function": "oops"}]),
    delta(tool_calls=[{"index": 0, "function": {"name": "get", "arguments": 5}}]),
    delta(tool_calls=5),
    delta(content="lo"),
    {"id": ["x"], "model": 5, "choices": [{"index": 0, "delta": {"role": 7}, "finish_reason": ["a"]}]},
    {"choices": 5},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
]


def test_odd_stream_shapes_are_relayed_and_what_fits_is_understood() -> None:
    raw = sse(*ODD)
    for strip in (False, True):
        obs = ResponseObserver(True, strip)
        out = b"".join(obs.feed(raw[i:i + 7]) for i in range(0, len(raw), 7)) + obs.finish()
        c = obs.c
        usage_event = b"data: " + json.dumps(ODD[-1]).encode() + b"\n\n"
        assert out == (raw.replace(usage_event, b"") if strip else raw)
        assert c.content == "Hello" and c.model == "m" and c.response_id == "c1"
        assert c.finish_reasons == ["stop"] and c.done and c.usage == ODD[-1]["usage"]
        assert c.tool_calls == [{"id": "call_1", "type": "function", "function": {"name": "get", "arguments": ""}}]


def test_odd_json_shapes_are_understood_as_far_as_they_fit() -> None:
    body = {"id": 5, "model": ["m"], "choices": [{"index": 0, "finish_reason": ["a"],
                                                  "message": {"role": 1, "content": "hi", "tool_calls": 5}}]}
    obs = ResponseObserver(False, False)
    raw = json.dumps(body).encode()
    assert obs.feed(raw) == raw and obs.finish() == b""
    c = obs.c
    assert (c.model, c.response_id, c.finish_reasons, c.role, c.content, c.tool_calls) == (None, None, [], None, "hi", [])
    obs = ResponseObserver(False, False)
    obs.feed(b'{"choices": 5}')
    obs.finish()
    assert obs.c.done and obs.c.content is None


def test_an_event_without_end_is_relayed_as_it_comes_not_buffered_whole() -> None:
    """An event longer than MAX_EVENT (no blank line yet) goes on to the client while it arrives,
    even when the observer is removing the usage chunk, and the buffer stays small."""
    obs = ResponseObserver(True, True)
    out = bytearray(obs.feed(b"data: " + json.dumps(delta(content="a")).encode() + b"\n\n"))
    piece = b"x" * 65536
    fed = 0
    out += obs.feed(b"data: {\"big\": \"")
    while fed < 3 * MAX_EVENT:
        out += obs.feed(piece)
        fed += len(piece)
        assert len(obs._buf) <= MAX_EVENT + len(piece)
    assert len(out) >= fed  # what was fed went on (a few bytes may wait for the boundary check)
    out += obs.feed(b"\"}\n\n" + b"data: " + json.dumps(delta(content="b")).encode() + b"\n\n")
    usage = b"data: " + json.dumps({"choices": [], "usage": {"total_tokens": 1}}).encode() + b"\n\n"
    out += obs.feed(usage + b"data: [DONE]\n\n") + obs.finish()
    assert out.endswith(b'"b"}, "finish_reason": null}]}\n\ndata: [DONE]\n\n')  # usage chunk removed
    assert obs.c.content == "ab" and obs.c.usage == {"total_tokens": 1}


async def test_odd_upstream_stream_reaches_the_client_whole_and_is_stored(make_gateway: Any) -> None:
    raw = sse(*ODD)
    async with backend(streaming(raw, 50)) as url:
        g = await make_gateway([{"name": "conversations"}, {"name": "audit"}],
                               upstream={"url": url})
        body = {"model": "m", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                got = await r.read()
                cid = r.headers["X-Conversation-ID"]
            assert got == raw
            await g.plugin("conversations").flush()
            async with s.get(g.url + f"/gateway/conversations/{cid}") as r:
                msgs = (await r.json())["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert msgs[1]["content"] == "Hello" and msgs[1]["finish_reason"] == "stop"


async def test_odd_client_messages_and_an_escaped_stream_flag(make_gateway: Any) -> None:
    """Client messages with tool calls of odd shapes are proxied and stored as sent (no 500, no lost
    record); a body that spells "stream" with a JSON escape still gets its usage counted."""
    g = await make_gateway([{"name": "conversations"}, {"name": "audit"}])
    odd = [
        [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1", "function": "oops"}]},
         {"role": "user", "content": "hi"}],
        [{"role": "assistant", "content": "x", "tool_calls": 5}, {"role": "user", "content": "hi"}],
    ]
    async with aiohttp.ClientSession() as s:
        for msgs in odd:
            async with s.post(g.url + "/v1/chat/completions", json={"model": "demo-chat", "messages": msgs}) as r:
                assert r.status == 200, await r.text()
                cid = r.headers["X-Conversation-ID"]
            await g.plugin("conversations").flush()
            async with s.get(g.url + f"/gateway/conversations/{cid}") as r:
                stored = (await r.json())["messages"]
            assert [m["role"] for m in stored] == ["assistant", "user", "assistant"]
            assert stored[0]["tool_calls"] == msgs[0]["tool_calls"]
        raw = b'{"model": "demo-chat", "\\u0073tream": true, "messages": [{"role": "user", "content": "count me"}]}'
        async with s.post(g.url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            text = await r.text()
            cid = r.headers["X-Conversation-ID"]
    assert '"usage"' not in text  # the client did not ask for the usage chunk: not shown
    await g.plugin("conversations").flush()
    async with aiohttp.ClientSession() as s:
        async with s.get(g.url + f"/gateway/conversations/{cid}") as r:
            conv = await r.json()
    # the upstream was asked for usage and reported it (not a count derived from the deltas)
    assert conv["messages"][1]["tokens"] > 0 and conv["messages"][1]["tokens_derived"] is False


async def test_token_charges_from_backends_that_report_oddly(make_gateway: Any) -> None:
    """What the rate limiter charges and the key's usage record, for a backend that reports no
    usage on a whole JSON answer, streams reasoning deltas and a second choice without usage, or
    reports a count no column holds: an estimate for the first two, and the bogus count is not
    believed (it does not wipe the key's other usage)."""
    from .helpers import ADMIN_TOKEN

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        mode = request.headers.get("X-Mode")
        if mode == "json-no-usage":  # 40 characters of content: 10 tokens at 4 characters each
            return web.json_response({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "x" * 40}}]})
        if mode == "huge":
            return web.json_response({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "hi"}}],
                                      "usage": {"prompt_tokens": 2**63, "completion_tokens": 1, "total_tokens": 2**63}})
        if body.get("stream") and mode == "empty-usage":  # 2 content deltas, and a usage with no count in it
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for obj in [{"choices": [{"index": 0, "delta": {"content": "ok"}}]}] * 2 + [{"choices": [], "usage": {}}]:
                await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if body.get("stream"):  # 3 reasoning deltas, 2 content deltas, 2 deltas of a second choice; no usage
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for d, i in [({"reasoning_content": "hm"}, 0)] * 3 + [({"content": "ok"}, 0)] * 2 + [({"content": "b"}, 1)] * 2:
                await resp.write(b"data: " + json.dumps({"choices": [{"index": i, "delta": d}]}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "hi"}}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    async with backend(chat) as url:
        g = await make_gateway([{"name": "key_auth"}, {"name": "rate_limit", "config": {
            "estimate_default_max_tokens": 0, "rules": [{"name": "t", "limit": "1000/minute", "counts": "tokens",
                                                         "key_by": ["key"], }]}}],
            upstream={"url": url})
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=admin) as r:
                rec = await r.json()
            auth = {"Authorization": f"Bearer {rec['key']}"}
            prompt = {"model": "m", "messages": [{"role": "user", "content": "abcdefgh"}]}  # estimate: 2

            async def call(mode: str = "", stream: bool = False) -> int:
                async with s.post(g.url + "/v1/chat/completions", json={**prompt, "stream": stream},
                                  headers={**auth, "X-Mode": mode}) as r:
                    assert r.status == 200
                    await r.read()
                await g.plugin("rate_limit").drain()
                async with s.post(g.url + "/v1/chat/completions", json=prompt, headers=auth) as r:
                    left = int(r.headers["x-ratelimit-remaining-tokens"])
                    await r.read()
                await g.plugin("rate_limit").drain()
                return left

            base = await call()                                  # a normal answer: 5 tokens
            assert base == 1000 - 5
            assert await call("json-no-usage") == base - 5 - (2 + 10)  # estimate: prompt 2 + 40 chars / 4
            after_stream = await call(stream=True)                # prompt 2 + 7 deltas
            assert after_stream == base - 5 - 12 - 5 - (2 + 7)
            after_huge = await call("huge")                       # not believed: an estimate instead
            assert after_huge == after_stream - 5 - (2 + 1)
            after_empty = await call("empty-usage", stream=True)  # "usage": {} reports nothing: 2 + 2 deltas
            assert after_empty == after_huge - 5 - (2 + 2)
            await g.plugin("key_auth").flush_usage()
            async with s.get(g.admin_url + f"/keys/{rec['id']}/usage", headers=admin) as r:
                totals = (await r.json())["totals"]
        # 6 normal answers (3 + 2 each), the stream's 7 deltas, the huge one's believable completion
        # count, the 2 deltas of the stream whose usage said nothing; the two streams without a
        # prompt count are charged the prompt estimate (2 each), as rate_limit charged them
        assert totals["requests"] == 10 and totals["prompt_tokens"] == 6 * 3 + 2 + 2
        assert totals["completion_tokens"] == 6 * 2 + 7 + 1 + 2


def test_tool_call_indexes_a_stream_skipped_are_not_stored_as_empty_calls() -> None:
    """A backend (or adapter) numbering its tool calls from 1, say by content block: the answer has
    the one call it streamed, as the client's SDK assembles it, not an empty call before it (which
    made the next turn's history differ, and fork the conversation)."""
    obs = ResponseObserver(True, False)
    obs.feed(sse(delta(tool_calls=[{"index": 1, "id": "call_a", "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""}}]),
                 delta(tool_calls=[{"index": 1, "function": {"arguments": '{"city": "Paris"}'}}])))
    obs.finish()
    assert obs.c.tool_calls == [{"id": "call_a", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]


def test_a_carriage_return_just_before_an_events_end_ends_its_line() -> None:
    """An SSE parser ends a line at a lone CR: this event's data is its text up to the CR (not
    JSON), and the answer reads as a client reads it, not as the whole line parsed."""
    for raw in (b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]\r}\n\n',
                b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}\r}\n\n'):
        obs = ResponseObserver(True, True)
        assert obs.feed(raw) + obs.finish() == raw  # (not taken for a usage chunk and removed either)
        assert obs.c.content is None and obs.c.usage is None and obs.c.deltas == 0


def responses_sse(text: list[str], usage: dict[str, int] | None, status: str = "completed") -> bytes:
    """A Responses API stream (``/v1/responses``): typed events with ``event:`` lines, no [DONE]."""
    def ev(obj: dict[str, Any]) -> bytes:
        return f"event: {obj['type']}\ndata: {json.dumps(obj)}\n\n".encode()

    head = {"id": "resp_1", "object": "response", "model": "m-1", "status": "in_progress", "output": []}
    out = [ev({"type": "response.created", "response": head})]
    out += [ev({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": t})
            for t in text]
    if usage is not None:
        done = {**head, "status": status, "usage": usage, "output": [
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "".join(text)}]}]}
        out.append(ev({"type": f"response.{status}", "response": done}))
    return b"".join(out)


def test_a_responses_api_stream_is_understood() -> None:
    usage = {"input_tokens": 13, "output_tokens": 9, "total_tokens": 22}
    raw = responses_sse(["Hel", "lo", "!"], usage)
    obs = ResponseObserver(True, False)
    out = b"".join(obs.feed(raw[i:i + 11]) for i in range(0, len(raw), 11)) + obs.finish()
    c = obs.c
    assert out == raw
    assert (c.content, c.model, c.response_id, c.deltas, c.done) == ("Hello!", "m-1", "resp_1", 3, True)
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens, c.finish_reason) == (13, 9, 22, "completed")
    obs = ResponseObserver(False, False)
    obs.feed(json.dumps({"id": "resp_2", "object": "response", "model": "m-2", "status": "incomplete",
                         "incomplete_details": {"reason": "max_output_tokens"}, "usage": usage, "output": [
                             {"type": "reasoning", "summary": []},
                             {"type": "message", "role": "assistant", "content": [
                                 {"type": "output_text", "text": "Hi "}, {"type": "output_text", "text": "there"}]}]}
                        ).encode())
    obs.finish()
    c = obs.c
    assert (c.content, c.model, c.prompt_tokens, c.completion_tokens) == ("Hi there", "m-2", 13, 9)
    assert c.finish_reason == "max_output_tokens"
    # a reasoning model: the message is the second output item; its text is the one assembled
    def ev(o: dict[str, Any]) -> bytes:
        return f"event: {o['type']}\ndata: {json.dumps(o)}\n\n".encode()

    obs = ResponseObserver(True, False)
    obs.feed(b"".join(ev(o) for o in [
        {"type": "response.output_item.added", "output_index": 0, "item": {"type": "reasoning"}},
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "hm"},
        {"type": "response.output_item.added", "output_index": 1, "item": {"type": "message"}},
        {"type": "response.output_text.delta", "output_index": 1, "content_index": 0, "delta": "Hi"},
        {"type": "response.completed", "response": {"status": "completed", "usage": usage}}]))
    obs.finish()
    assert (obs.c.content, obs.c.deltas, obs.c.total_tokens) == ("Hi", 2, 22)
    # a final event over MAX_EVENT (it repeats the whole output): its usage is still read
    huge = "x" * (2 * MAX_EVENT)
    raw = b"".join(ev(o) for o in [
        {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": huge},
        {"type": "response.completed", "response": {"status": "completed", "output": [
            {"type": "message", "content": [{"type": "output_text", "text": huge}]}], "usage": usage}}])
    obs = ResponseObserver(True, False)
    out = b"".join(obs.feed(raw[i:i + 65536]) for i in range(0, len(raw), 65536)) + obs.finish()
    assert out == raw
    assert (obs.c.total_tokens, obs.c.done, obs.c.unread) == (22, True, 1)  # the delta event: unread


async def test_responses_api_calls_are_metered_like_chat(make_gateway: Any, tmp_path: Any) -> None:
    """/v1/responses, plain and streamed: the token limit, the key's usage, the audit event and the
    token metric all count the input/output tokens the upstream reported; the pre-check reads
    max_output_tokens and the `input` items."""
    from .helpers import ADMIN_TOKEN

    usage = {"input_tokens": 13, "output_tokens": 9, "total_tokens": 22}

    async def responses(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(responses_sse(["a", "b"], usage))
            return resp
        return web.json_response({"id": "resp_3", "object": "response", "model": "m-1", "status": "completed",
                                  "usage": usage, "output": [{"type": "message", "role": "assistant", "content": [
                                      {"type": "output_text", "text": "ab"}]}]})

    jl = tmp_path / "audit.jsonl"
    async with backend(responses, "/v1/responses") as url:
        g = await make_gateway([
            {"name": "key_auth"},
            {"name": "rate_limit", "config": {"estimate_default_max_tokens": 0, "rules": [
                {"name": "t", "limit": "1000/minute", "counts": "tokens", "key_by": ["key"]}]}},
            {"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}},
            {"name": "metrics"}], upstream={"url": url})
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=admin) as r:
                rec = await r.json()
            auth = {"Authorization": f"Bearer {rec['key']}"}
            left = []
            for stream in (False, True):
                async with s.post(g.url + "/v1/responses", headers=auth,
                                  json={"model": "m", "input": "hi", "stream": stream}) as r:
                    assert r.status == 200
                    await r.read()
                await g.plugin("rate_limit").drain()
                # A request that may not fit: 8 characters of input items (2 tokens) + max_output_tokens.
                async with s.post(g.url + "/v1/responses", headers=auth, json={
                        "model": "m", "max_output_tokens": 990,
                        "input": [{"role": "user", "content": [{"type": "input_text", "text": "abcdefgh"}]}]}) as r:
                    left.append((r.status, int(r.headers["x-ratelimit-remaining-tokens"])))
                    await r.read()
                await g.plugin("rate_limit").drain()
            # 1000 - 22 = 978 left: 992 needed is refused; then the refused one cost nothing
            assert left == [(429, 978), (429, 956)]
            await g.plugin("key_auth").flush_usage()
            async with s.get(g.admin_url + f"/keys/{rec['id']}/usage", headers=admin) as r:
                totals = (await r.json())["totals"]
            assert (totals["prompt_tokens"], totals["completion_tokens"]) == (2 * 13, 2 * 9)
            async with s.get(g.admin_url + "/metrics", headers=admin) as r:
                metrics = await r.text()
            assert 'gateway_tokens_total{direction="input",model="m-1"} 26.0' in metrics, metrics
            assert 'gateway_tokens_total{direction="output",model="m-1"} 18.0' in metrics
        await g.stop()
        events = [json.loads(x) for x in jl.read_text().splitlines()]
        ok = [e for e in events if e.get("path") == "/v1/responses" and e.get("status") == 200]
        assert [(e["tokens_in"], e["tokens_out"], e["streamed"]) for e in ok] == [(13, 9, False), (13, 9, True)]


def test_the_finish_reason_kept_is_choice_zeros_whatever_the_order() -> None:
    raw = sse({"choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]},
              {"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    obs = ResponseObserver(True, False)
    obs.feed(raw)
    obs.finish()
    assert obs.c.finish_reasons == ["length", "stop"] and obs.c.finish_reason == "stop"
    obs = ResponseObserver(False, False)
    obs.feed(json.dumps({"choices": [{"index": 1, "finish_reason": "length", "message": {"content": "b"}},
                                     {"index": 0, "finish_reason": "stop", "message": {"content": "a"}}]}).encode())
    obs.finish()
    assert obs.c.finish_reason == "stop" and obs.c.content == "a"


async def test_json_with_a_byte_order_mark_or_in_utf16_is_read_and_forwarded_as_utf8(make_gateway: Any,
                                                                                     upstream: Any) -> None:
    """Python backends parse such bodies (json.loads on bytes detects them), so the gateway must not
    let them past its token checks and records unread: it reads them and forwards plain UTF-8."""
    g = await make_gateway([{"name": "rate_limit", "config": {"rules": [
        {"name": "t", "limit": "1000/minute", "counts": "tokens", "key_by": ["ip"]}]}}, {"name": "conversations"}])
    big = json.dumps({"model": "demo-chat", "messages": [{"role": "user", "content": "x" * 8000}]})
    small = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello there"}]}
    async with aiohttp.ClientSession() as s:
        for raw in (b"\xef\xbb\xbf" + big.encode(), big.encode("utf-16"), big.encode("utf-32-le")):
            async with s.post(g.url + "/v1/chat/completions", data=raw,
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 429, raw[:4]  # about 2000 prompt tokens: over the limit, as UTF-8 is
                assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
        async with s.post(g.url + "/v1/chat/completions", data=json.dumps(small).encode("utf-16"),
                          headers={"Content-Type": "application/json; charset=utf-16"}) as r:
            assert r.status == 200
            cid = r.headers["X-Conversation-ID"]
        got = upstream.requests[-1]
        assert got["body"]["messages"] == small["messages"] and got["headers"]["Content-Type"] == "application/json"
        await g.plugin("conversations").flush()
        async with s.get(g.url + f"/gateway/conversations/{cid}") as r:
            stored = (await r.json())["messages"]
        assert [m["content"] for m in stored][:1] == ["hello there"]
    assert len([q for q in upstream.requests if q["path"] == "/v1/chat/completions"]) == 1
    # with no plugin reading the body, too: the upstream gets UTF-8
    plain = await make_gateway([], name="plain.yaml")
    async with aiohttp.ClientSession() as s:
        async with s.post(plain.url + "/v1/chat/completions", data=json.dumps(small).encode("utf-16"),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
    assert upstream.requests[-1]["body"]["messages"] == small["messages"]


def test_sse_line_ends_of_every_kind_and_oversized_events() -> None:
    """CR-only lines (multi-line data too), LF then CRLF and CRLF then LF as the blank line: each is
    an event boundary per the SSE spec. An event over MAX_EVENT is relayed, counted as output and
    marked unread. A finish reason on choice 0 means the answer is whole, [DONE] or not."""
    d1 = json.dumps({"choices": [{"index": 0, "delta": {"content": "a"}}]})
    d2 = json.dumps({"choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": "stop"}]})
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
    half = d1.index(": ") + 1  # a multi-line data field is joined with a newline: split where JSON allows one
    for raw in (f"data: {d1[:half]}\rdata: {d1[half:]}\r\rdata: {d2}\r\rdata: {usage}\r\r".encode(),
                f"data: {d1}\n\r\ndata: {d2}\r\n\ndata: {usage}\n\r\n".encode(),
                f"data: {d1}\r\n\rdata: {d2}\n\rdata: {usage}\r\n\r".encode()):
        obs = ResponseObserver(True, True)
        out = b"".join(obs.feed(raw[i:i + 5]) for i in range(0, len(raw), 5)) + obs.finish()
        c = obs.c
        assert (c.content, c.deltas, c.total_tokens, c.done, c.unread) == ("ab", 2, 3, True, 0), raw[:40]
        assert b'"usage"' not in out and out.count(b"data:") == raw.count(b"data:") - 1  # the usage event hidden
    big = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "x" * (2 * MAX_EVENT)}}]}).encode()
    raw = b"data: " + d1.encode() + b"\n\n" + big + b"\n\n" + b"data: " + d2.encode() + b"\n\n"
    obs = ResponseObserver(True, False)
    out = b"".join(obs.feed(raw[i:i + 65536]) for i in range(0, len(raw), 65536)) + obs.finish()
    assert out == raw
    assert (obs.c.content, obs.c.deltas, obs.c.unread, obs.c.done) == ("ab", 3, 1, True)


async def test_an_sse_media_type_in_capitals_and_a_cancel_before_the_head_are_charged(make_gateway: Any) -> None:
    """`Text/Event-Stream` is a stream like any other (media types ignore case): its usage is
    charged and the usage chunk the client did not ask for is hidden. A client that gives up
    before the response head is charged the prompt estimate (the upstream was reading it)."""
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if request.headers.get("X-Mode") == "slow-head":
            await asyncio.sleep(3)
        resp = web.StreamResponse(headers={"Content-Type": "Text/Event-Stream; charset=UTF-8"})
        await resp.prepare(request)
        events = [delta(content="hi"), delta(content=" there")]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
        await resp.write(sse(*events))
        return resp

    async with backend(chat) as url:
        # (the moving window counts exactly what the last minute charged: with the sliding window,
        # a minute's boundary between two charges weighs the first one less, and the figure read
        # is no longer 1000 - 9 - 100)
        g = await make_gateway([{"name": "rate_limit", "config": {"estimate_default_max_tokens": 0, "strategy": "moving",
                                                                  "rules": [{"name": "t", "limit": "1000/minute",
                                                                             "counts": "tokens", "key_by": ["ip"]}]}}],
                               upstream={"url": url})
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x" * 400}]}  # estimate 100
        async with aiohttp.ClientSession() as s:
            async def left() -> int:
                await g.plugin("rate_limit").drain()
                async with s.get(g.url + "/v1/models") as r:
                    return int(r.headers["x-ratelimit-remaining-tokens"])

            async with s.post(g.url + "/v1/chat/completions", json=body) as r:
                text = await r.text()
            assert '"usage"' not in text and "there" in text
            assert await left() == 1000 - 9
            with contextlib.suppress(asyncio.TimeoutError):
                async with s.post(g.url + "/v1/chat/completions", json=body, headers={"X-Mode": "slow-head"},
                                  timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                    await r.read()

            async def charged() -> bool:  # (once the gateway has seen the client go: a busy machine takes a while)
                return await left() == 1000 - 9 - 100

            await until(charged, what="the prompt estimate charged")


async def test_bodies_that_would_grow_or_nest_too_deep(make_gateway: Any, upstream: Any) -> None:
    """A UTF-16 body within max_body_size whose UTF-8 form is over it gets 413 (never forwarded
    larger than the limit); messages nested deeper than the gateway can record get 400, not a 500
    with a traceback; a cursor nested as deep is an invalid cursor."""
    import base64

    g = await make_gateway([{"name": "conversations"}], server={"max_body_size": 3000})
    text = "一" * 1200  # 2 bytes each in UTF-16, 3 in UTF-8
    body = json.dumps({"model": "demo-chat", "messages": [{"role": "user", "content": text}]},
                      ensure_ascii=False).encode("utf-16")
    assert len(body) <= 3000
    n = len(upstream.requests)
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}) as r:
            err = (await r.json())["error"]
            assert r.status == 413 and err["code"] == "request_too_large"
            assert err["message"] == "Request body exceeds the limit of 3000 bytes (server.max_body_size).", err
        deep = '{"model": "demo-chat", "messages": [{"role": "user", "content": ' + "[" * 990 + "]" * 990 + "}]}"
        async with s.post(g.url + "/v1/chat/completions", data=deep.encode(),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_value"
        # the core re-serialises a streamed request to ask for usage: the same depth is a 400 there too
        deep_stream = ('{"model": "demo-chat", "stream": true, "messages": [{"role": "user", "content": "hi"}], '
                       '"extra": ' + "[" * 990 + "]" * 990 + "}")
        async with s.post(g.url + "/v1/chat/completions", data=deep_stream.encode(),
                          headers={"Content-Type": "application/json", "X-Conversation-Memory": "off"}) as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
        cursor = base64.urlsafe_b64encode(("[" * 3000 + "]" * 3000).encode()).decode()
        async with s.get(g.url + "/gateway/conversations", params={"cursor": cursor}) as r:
            assert r.status == 400, await r.text()
    assert len(upstream.requests) == n


def test_a_stream_split_at_every_byte_reaches_the_client_unchanged() -> None:
    """Whatever the chunking (a CRLF cut between its CR and LF included), the client gets the
    upstream's bytes exactly, minus only the hidden usage event."""
    evs = [b"data: " + json.dumps(delta(content="hi")).encode(),
           b"data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode(),
           b"data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                                         "total_tokens": 3}}).encode(),
           b"data: [DONE]"]
    for sep in (b"\r\n", b"\n", b"\r"):
        body = b"".join(e + sep + sep for e in evs)
        want = body.replace(evs[2] + sep + sep, b"")
        for i in range(1, len(body)):
            for strip in (False, True):
                obs = ResponseObserver(True, strip)
                out = obs.feed(body[:i]) + obs.feed(body[i:]) + obs.finish()
                assert out == (want if strip else body), (sep, i, strip)
                assert obs.c.total_tokens == 3 and obs.c.content == "hi"


def test_a_failed_responses_api_answer_is_an_error() -> None:
    """The Responses API says an answer failed with a response.failed event (streamed) or status
    "failed" (a JSON body): not a finished answer, whatever else came."""
    failed = {"type": "response.failed", "response": {"id": "r1", "model": "m", "status": "failed",
                                                       "error": {"code": "server_error", "message": "x"},
                                                       "usage": {"input_tokens": 5, "output_tokens": 2}}}
    obs = ResponseObserver(True, False)
    obs.feed(sse({"type": "response.output_text.delta", "delta": "Hi", "output_index": 0, "content_index": 0}, failed))
    obs.finish()
    assert obs.c.error and obs.c.usage == failed["response"]["usage"]
    obs = ResponseObserver(False, False)
    obs.feed(json.dumps({"object": "response", "status": "failed", "output": [], "error": {"message": "x"}}).encode())
    obs.finish()
    assert obs.c.error
    ok = ResponseObserver(False, False)
    ok.feed(json.dumps({"object": "response", "status": "completed", "output": []}).encode())
    ok.finish()
    assert not ok.c.error
