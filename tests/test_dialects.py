"""The response observer against the dialects of real OpenAI-compatible servers (vLLM, llama.cpp's
server, close-delimited HTTP/1.0 upstreams), with the exact bytes they send: errors, usage and cut
streams are read as the backend meant them."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.observe import MAX_JSON_BODY, ResponseObserver
from gateway.plugin import Plugin, registry

from .helpers import ADMIN_TOKEN, recorded_usage_and_audit, until
from .test_observe import backend, streaming

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WORDS = ["Hello", " there", ",", " how", " can", " I", " help", "?"]


def j(o: Any) -> bytes:
    return json.dumps(o, separators=(",", ":")).encode()


def observe(raw: bytes, step: int = 57, strip: bool = False, streamed: bool = True) -> tuple[ResponseObserver, bytes]:
    """Feed ``raw`` in pieces of ``step`` bytes; returns the observer and what reached the client."""
    obs = ResponseObserver(streamed, strip)
    out = b"".join(obs.feed(raw[i:i + step]) for i in range(0, len(raw), step)) + obs.finish()
    return obs, out


async def audit_events(path: Path, rid: str) -> list[dict[str, Any]]:
    for _ in range(200):
        if path.exists():
            evs = [e for e in map(json.loads, path.read_text().splitlines()) if e.get("request_id") == rid]
            if evs:
                return evs
        await asyncio.sleep(0.05)
    raise AssertionError(f"no audit event for {rid}")


async def post_stream(g: Any, body: dict[str, Any], rid: str, headers: dict[str, str] | None = None) -> tuple[bytes, str]:
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json=body,
                          headers={"X-Request-ID": rid, **(headers or {})}) as r:
            assert r.status == 200
            return await r.read(), r.headers.get("X-Conversation-ID", "")


async def stored_messages(g: Any, cid: str) -> list[dict[str, Any]]:
    await g.plugin("conversations").flush()
    async with aiohttp.ClientSession() as s:
        async with s.get(g.url + f"/gateway/conversations/{cid}") as r:
            return (await r.json())["messages"]


# -- 1. llama.cpp's `error:` line ----------------------------------------------------------------

LCPP = {"created": 1732600000, "id": "chatcmpl-lcpp", "model": "gpt-3.5-turbo", "system_fingerprint": "b4500-abcdef",
        "object": "chat.completion.chunk"}


def llamacpp_error_stream(words: int = 3, done: bool = True) -> bytes:
    """llama.cpp's server before PR #16109: a comment, the role chunk, some words, then a failure as
    an `error:` field line, the stream ending (here followed by [DONE], as some builds did)."""
    parts = [b": ping\n\n", b"data: " + j({"choices": [{"finish_reason": None, "index": 0, "delta": {
        "role": "assistant", "content": None}}], **LCPP}) + b"\n\n"]
    for w in WORDS[:words]:
        parts.append(b"data: " + j({"choices": [{"finish_reason": None, "index": 0, "delta": {"content": w}}], **LCPP})
                     + b"\n\n")
    parts.append(b"error: " + j({"code": 500, "message": "the request exceeds the available context size. try "
                                 "increasing the context size or enable context shift", "type": "server_error"}) + b"\n\n")
    if done:
        parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def test_a_llamacpp_error_line_marks_the_stream_an_error() -> None:
    for raw in (llamacpp_error_stream(), llamacpp_error_stream(done=False), llamacpp_error_stream(0),
                b"error: " + j({"code": 400, "message": "the request exceeds the available context size",
                                "type": "invalid_request_error"}) + b"\n\ndata: [DONE]\n\n",
                llamacpp_error_stream(done=False)[:-2]):  # (the last line without its blank line)
        for strip in (False, True):
            obs, out = observe(raw, strip=strip)
            assert out == raw and obs.c.error, raw
    obs, _ = observe(llamacpp_error_stream())
    assert obs.c.content == "Hello there," and obs.c.ended
    # a field whose name only starts with "error" is not one
    obs, _ = observe(b"errors: 1\n\n" + b"data: " + j({"choices": [{"index": 0, "delta": {"content": "a"},
                                                                    "finish_reason": "stop"}]}) + b"\n\ndata: [DONE]\n\n")
    assert not obs.c.error


async def test_a_llamacpp_error_line_is_an_upstream_error_end_to_end(make_gateway: Any, tmp_path: Path) -> None:
    raw = llamacpp_error_stream()
    jl = tmp_path / "audit.jsonl"
    async with backend(streaming(raw, 57)) as url:
        g = await make_gateway([{"name": "conversations"},
                                {"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}}],
                               upstream={"url": url})
        got, cid = await post_stream(g, {"model": "llamacpp-err", "stream": True,
                                         "messages": [{"role": "user", "content": "hi"}]}, "lcpp-err-1")
        assert got == raw
        msgs = await stored_messages(g, cid)
        assert msgs[1]["content"] == "Hello there," and msgs[1]["status"] == "upstream_error"
        ev = (await audit_events(jl, "lcpp-err-1"))[-1]
        assert ev["outcome"] == "upstream_error" and ev["status"] == 200


# -- 2. vLLM's usage before a huge prompt_logprobs -----------------------------------------------

VLLM_USAGE = {"prompt_tokens": 17, "total_tokens": 25, "completion_tokens": 8, "prompt_tokens_details": None}


def vllm_prompt_logprobs_answer(k: int = 5) -> bytes:
    """vLLM's answer to a request with ``prompt_logprobs``: the usage comes before the (huge) prompt
    logprobs, so it is not in the body's last bytes. The content quotes a usage object (a decoy)."""
    text = 'It said "usage": {"prompt_tokens": 99999, "completion_tokens": 99999, "total_tokens": 1}'
    obj: dict[str, Any] = {
        "id": "chatcmpl-vllm1", "object": "chat.completion", "created": 1732600000, "model": "vllm-plp",
        "choices": [{"index": 0, "message": {"role": "assistant", "reasoning_content": None, "content": text,
                                             "tool_calls": []},
                     "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
        "usage": VLLM_USAGE, "prompt_logprobs": None, "kv_transfer_params": None}
    n = MAX_JSON_BODY // (75 * k) + 1000
    obj["prompt_logprobs"] = [None] + [{str(t): {"logprob": -1.2345678, "rank": r + 1, "decoded_token": "tok%d" % t}
                                        for r, t in enumerate(range(i, i + k))} for i in range(n)]
    raw = json.dumps(obj).encode()
    assert len(raw) > MAX_JSON_BODY
    return raw


def test_usage_before_a_huge_member_is_read_from_the_head() -> None:
    raw = vllm_prompt_logprobs_answer()
    obs, out = observe(raw, step=65536, streamed=False)
    assert out == raw
    c = obs.c
    assert c.usage == VLLM_USAGE and (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (17, 8, 25)
    assert (c.model, c.response_id, c.finish_reason, c.finish_reasons) == ("vllm-plp", "chatcmpl-vllm1", "stop", ["stop"])
    assert len(obs._buf) == 0 and not obs._lead
    # one huge first read: the same
    obs = ResponseObserver(False, False)
    obs.feed(raw)
    obs.finish()
    assert obs.c.usage == VLLM_USAGE
    # not read when the end is not to be read either (a GET, JSON lines)
    obs = ResponseObserver(False, False, tail=False)
    obs.feed(raw)
    obs.finish()
    assert obs.c.usage is None
    # a usage nested in the first items of a large list is not the answer's own
    item = {"id": "chatcmpl-1", "object": "chat.completion", "usage": {"prompt_tokens": 777, "total_tokens": 777},
            "pad": "p" * 4000}
    listed = json.dumps({"object": "list", "data": [item] * 4500}).encode()
    obs, _ = observe(listed, step=65536, streamed=False)
    assert obs.c.usage is None
    # nor the usage of a first JSON line followed by others
    from gateway.observe import head_members
    assert head_members(b"\n".join(json.dumps(item).encode() for _ in range(3))) == {}
    assert head_members(json.dumps(item).encode()[:-40]) == {"id": "chatcmpl-1", "object": "chat.completion",
                                                             "usage": item["usage"]}


async def test_a_huge_vllm_answer_is_charged_its_usage_end_to_end(make_gateway: Any, tmp_path: Path) -> None:
    raw = vllm_prompt_logprobs_answer()

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=raw, content_type="application/json")

    jl = tmp_path / "audit.jsonl"
    async with backend(chat) as url:
        g = await make_gateway([{"name": "key_auth"},
                                {"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}}],
                               upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=ADMIN) as r:
                rec = await r.json()
            async with s.post(g.url + "/v1/chat/completions", headers={
                    "Authorization": f"Bearer {rec['key']}", "X-Request-ID": "plp-1"}, json={
                    "model": "vllm-plp", "prompt_logprobs": 5, "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200 and await r.read() == raw
            await g.plugin("key_auth").flush_usage()
            async with s.get(g.admin_url + f"/keys/{rec['id']}/usage", headers=ADMIN) as r:
                totals = (await r.json())["totals"]
        assert (totals["prompt_tokens"], totals["completion_tokens"]) == (17, 8)
        ev = (await audit_events(jl, "plp-1"))[-1]
        assert (ev["tokens_in"], ev["tokens_out"], ev["outcome"]) == (17, 8, "ok")


# -- 3. vLLM's continuous_usage_stats with n > 1, cut --------------------------------------------

def usage(p: int, c: int) -> dict[str, int]:
    return {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c}


def vllm_n2_events(words: int = 240, final: bool = True) -> list[bytes]:
    """vLLM's stream for n=2 with ``continuous_usage_stats``: every chunk carries the cumulative usage
    of its own choice; the final usage-only chunk the sum (if ``final``)."""
    base = {"id": "chatcmpl-n2", "object": "chat.completion.chunk", "created": 1732600000, "model": "vllm-n2"}
    out, prev = [], [0, 0]
    for i in range(2):
        out.append({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}], "usage": usage(17, 0)})
    for w in (WORDS * 30)[:words]:
        for i in range(2):
            prev[i] += 1
            out.append({**base, "choices": [{"index": i, "delta": {"content": w}, "logprobs": None,
                                             "finish_reason": None}], "usage": usage(17, prev[i])})
    if words == 240:
        for i in range(2):
            out.append({**base, "choices": [{"index": i, "delta": {"content": ""}, "logprobs": None,
                                             "finish_reason": "length", "stop_reason": None}],
                        "usage": usage(17, prev[i])})
    if final:
        out.append({**base, "choices": [], "usage": usage(17, sum(prev))})
    return [b"data: " + json.dumps(o).encode() + b"\n\n" for o in out]


def test_a_cut_n2_stream_with_per_choice_usage_is_charged_its_deltas() -> None:
    # cut after 16 words of each choice: the last report counts choice 1's 16 tokens, 32 were delivered
    obs, _ = observe(b"".join(vllm_n2_events(16, final=False)))
    c = obs.c
    assert c.deltas == 32 and c.usage == usage(17, 16)
    assert c.usage_stale and (c.completion_tokens, c.total_tokens) == (32, 49)
    # both choices finished, cut before the usage-only chunk: the same
    obs, _ = observe(b"".join(vllm_n2_events(final=False)))
    assert (obs.c.completion_tokens, obs.c.total_tokens) == (480, 497)
    # whole, with its final usage chunk: exactly what it reports (hidden from the client here)
    raw = b"".join(vllm_n2_events()) + b"data: [DONE]\n\n"
    obs, out = observe(raw, strip=True)
    assert out == raw.replace(vllm_n2_events()[-1], b"")
    assert not obs.c.usage_stale and (obs.c.completion_tokens, obs.c.total_tokens) == (480, 497)
    # n = 1, usage on every chunk, cut: each report covers its own choice's output, taken as it is
    one = [e for e in vllm_n2_events(16, final=False) if b'"index": 0' in e]
    obs, _ = observe(b"".join(one))
    assert not obs.c.usage_stale and (obs.c.completion_tokens, obs.c.total_tokens) == (16, 33)
    # a usage on a finish chunk (TGI, older llama.cpp) that counts what came: as it is
    obs, _ = observe(b"".join(one[:-1]) + b"data: " + j({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                                         "usage": usage(17, 20)}) + b"\n\ndata: [DONE]\n\n")
    assert not obs.c.usage_stale and obs.c.completion_tokens == 20


async def test_a_cancelled_n2_stream_is_charged_what_it_delivered_end_to_end(make_gateway: Any) -> None:
    events = vllm_n2_events(16, final=False)
    left = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in events:
            await resp.write(e)
        try:
            await asyncio.wait_for(left.wait(), 10)  # (the rest never comes: the client leaves)
        except TimeoutError:
            pass
        return resp

    async with backend(chat) as url:
        g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {"flush_interval": 0.05}}],
                               upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=ADMIN) as r:
                rec = await r.json()
            async with s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {rec['key']}"}, json={
                    "model": "vllm-n2", "n": 2, "stream": True, "messages": [{"role": "user", "content": "hi"}],
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
                got = 0
                async for line in r.content:
                    got += line.startswith(b"data: {") and b'"content": ""' not in line
                    if got == 32:
                        break  # the client leaves after every delta sent so far
            left.set()

            totals, evs = await until(lambda: recorded_usage_and_audit(g, s, rec["id"]), every=0.1,
                                      what="the usage and the audit event")
    ev = evs[0]
    assert ev["outcome"] == "client_disconnected"
    assert (ev["tokens_in"], ev["tokens_out"], ev["tokens_estimated"]) == (17, 32, True), ev
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (17, 32), totals


# -- 4. a close-delimited stream cut mid-event ---------------------------------------------------

def vllm_stream() -> bytes:
    """vLLM's stream (n=1, include_usage as the gateway asks): the role chunk, 8 words, the finish
    chunk, the usage-only chunk, [DONE]."""
    base = {"id": "chatcmpl-vllm1", "object": "chat.completion.chunk", "created": 1732600000, "model": "vllm"}
    out = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]}]
    out += [{**base, "choices": [{"index": 0, "delta": {"content": w}, "logprobs": None, "finish_reason": None}]}
            for w in WORDS]
    out.append({**base, "choices": [{"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": "stop",
                                     "stop_reason": None}]})
    out.append({**base, "choices": [], "usage": usage(17, len(WORDS))})
    return b"".join(b"data: " + j(o) + b"\n\n" for o in out) + b"data: [DONE]\n\n"


def test_a_stream_ending_inside_an_event_is_seen_cut() -> None:
    whole = vllm_stream()
    half = whole[:len(whole) // 2]  # what an HTTP/1.0 upstream that went away mid-answer sent
    assert not half.endswith(b"\n\n")
    for strip in (False, True):
        obs, out = observe(half, step=61, strip=strip)
        assert out == half and obs.c.cut_mid_event and not obs.c.done
    # ended where an event ends: not known to be cut mid-event (the turn is incomplete, as before)
    obs, _ = observe(half[:half.rindex(b"\n\n") + 2])
    assert not obs.c.cut_mid_event and not obs.c.done
    # whole; whole without the last blank line; cut in the usage chunk after the finish: not cut
    for raw in (whole, whole[:-2], whole[:whole.rindex(b"data: {") + 30]):
        obs, _ = observe(raw, step=61)
        assert not obs.c.cut_mid_event, raw[-40:]
    # inside an event too large to read
    obs, _ = observe(b"data: " + j({"choices": [{"index": 0, "delta": {"content": "x" * (2**20 + 10)}}]})[:-20],
                     step=65536)
    assert obs.c.unread == 1 and obs.c.cut_mid_event


class _Seen(Plugin):
    """Keeps the completion the core assembled for each exchange (it asks for one)."""

    name = "t_dialects_seen"
    seen: list[Any] = []

    async def on_request(self, ctx: Any) -> None:
        ctx.want_usage()

    async def on_complete(self, ctx: Any) -> None:
        type(self).seen.append((ctx.completion, ctx.outcome))


registry.register(_Seen)


async def test_a_close_delimited_stream_cut_mid_event_end_to_end(make_gateway: Any) -> None:
    """An HTTP/1.0 upstream (no length: the body ends when the connection closes) that goes away
    in the middle of an event: the gateway sees it cut (outcome upstream_disconnected), and the
    client sees its connection drop, not a clean end."""
    whole = vllm_stream()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        n = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        body = json.loads(await reader.readexactly(n))
        data = whole if body["model"] == "whole" else whole[:len(whole) // 2]
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        for i in range(0, len(data), 61):
            writer.write(data[i:i + 61])
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    _Seen.seen.clear()
    try:
        g = await make_gateway([{"name": "t_dialects_seen"}], upstream={"url": f"http://127.0.0.1:{port}"})
        got = []
        for model in ("whole", "cut"):
            async with aiohttp.ClientSession() as s:
                async with s.post(g.url + "/v1/chat/completions", json={
                        "model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
                    assert r.status == 200
                    try:
                        got.append(await r.read())
                    except aiohttp.ClientPayloadError:  # (once the core cuts the client's response too)
                        got.append(None)
        await until(lambda: len(_Seen.seen) == 2, what="both exchanges complete")
    finally:
        srv.close()
        await srv.wait_closed()
    (whole_c, whole_outcome), (cut_c, cut_outcome) = _Seen.seen
    assert got[0] == whole.replace(b"data: " + j(json.loads(whole.split(b"\n\n")[-3][6:])) + b"\n\n", b"")
    assert not whole_c.cut_mid_event and whole_c.done
    assert (whole_outcome, cut_outcome, got[1]) == ("ok", "upstream_disconnected", None)
    assert cut_c.cut_mid_event and not cut_c.done and cut_c.content == "".join(WORDS)[:len(cut_c.content)]


async def test_a_framed_stream_whose_last_event_lacks_its_blank_line_is_not_a_cut(make_gateway: Any) -> None:
    """A chunked body the upstream ended on purpose (its last chunk sent) whose last event has no
    blank line after it: the body came whole, so the exchange is not an upstream gone mid-answer
    (only a body delimited by the connection's close can end short without anyone knowing)."""
    from aiohttp import web

    from .test_observe import backend

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)  # (chunked: no length)
        await resp.write(b'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'
                         b'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": " there"}}]}\n')
        await resp.write_eof()
        return resp

    _Seen.seen.clear()
    async with backend(chat) as url:
        g = await make_gateway([{"name": "t_dialects_seen"}], upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions", json={
                    "model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200
                await r.read()  # (a clean end: no ClientPayloadError)
        await until(lambda: len(_Seen.seen) == 1, what="the exchange complete")
    (c, outcome), = _Seen.seen
    assert c.cut_mid_event and outcome == "ok"


# -- 5. relays' empty finish reasons, tool calls without index, TGI's usage on its last chunk ----

def chunk(choices: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-d", "object": "chat.completion.chunk", "created": 1732600000, "model": "m",
            "choices": choices, **more}


def events(objs: list[dict[str, Any]], prefix: bytes = b"data: ") -> bytes:
    return b"".join(prefix + j(o) + b"\n\n" for o in objs)


def relay_stream(words: int = len(WORDS), end: bool = True) -> bytes:
    """A relay's stream (one-api style): ``"finish_reason": ""`` on every chunk but the last."""
    objs = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": ""}])]
    objs += [chunk([{"index": 0, "delta": {"content": w}, "finish_reason": ""}]) for w in WORDS[:words]]
    if end:
        objs.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    return events(objs) + (b"data: [DONE]\n\n" if end else b"")


#: Tool-call deltas without ``index`` (mistral.rs before its fix, some relays): a call in pieces,
#: then a second call whole, then its id repeated on an empty piece.
NOINDEX_CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
                 {"function": {"arguments": '{"city": '}}, {"function": {"arguments": '"Paris"'}},
                 {"function": {"arguments": "}"}},
                 {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                 {"id": "call_2", "function": {"arguments": ""}}]
NOINDEX_JOINED = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                  {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]


def noindex_stream() -> bytes:
    objs = [chunk([{"index": 0, "delta": {"role": "assistant", "tool_calls": [tc]}, "finish_reason": None}])
            for tc in NOINDEX_CALLS]
    return events(objs + [chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])]) + b"data: [DONE]\n\n"


def tgi_stream(include_usage: bool) -> bytes:
    """TGI's stream: ``data:`` without a space, ``"usage": null`` on every chunk, and when asked
    for usage, the report on the last chunk of output (there is no usage-only chunk)."""
    objs = [chunk([{"index": 0, "delta": {"role": "assistant", "content": w}, "logprobs": None,
                    "finish_reason": "eos_token" if i == len(WORDS) - 1 else None}],
                  usage=usage(17, 8) if include_usage and i == len(WORDS) - 1 else None)
            for i, w in enumerate(WORDS)]
    return events(objs, b"data:") + b"data:[DONE]\n\n"


def test_an_empty_finish_reason_is_none() -> None:
    obs, _ = observe(relay_stream())
    assert (obs.c.finish_reason, obs.c.finish_reasons, obs.c.done) == ("stop", ["stop"], True)
    # ended before its last chunk, or inside an event: not finished, and a cut
    obs, _ = observe(relay_stream(5, end=False))
    assert (obs.c.finish_reason, obs.c.finish_reasons, obs.c.done) == (None, [], False)
    obs, _ = observe(relay_stream(5, end=False)[:-7])
    assert obs.c.cut_mid_event and obs.c.content == "Hello there, how"
    obs, _ = observe(j({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": ""}],
                        "usage": usage(3, 1)}), streamed=False)
    assert (obs.c.finish_reason, obs.c.finish_reasons) == (None, [])


def test_tool_calls_streamed_without_index_are_joined() -> None:
    obs, out = observe(noindex_stream(), step=31, strip=True)
    assert out == noindex_stream()
    assert obs.c.tool_calls == NOINDEX_JOINED
    # the id and the whole name repeated on every delta; the id alone, then the name: one call each
    for shape in ([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": a}} for a in ('{"x"', ': 1}')],
                  [{"id": "c1", "type": "function"}, {"function": {"name": "f", "arguments": '{"x"'}},
                   {"function": {"arguments": ": 1}"}}]):
        obs, _ = observe(events([chunk([{"index": 0, "delta": {"tool_calls": [tc]}, "finish_reason": None}])
                                 for tc in shape]))
        assert obs.c.tool_calls == [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    # a name streamed in pieces (indexed, no id) that happen to repeat: joined as sent
    obs, _ = observe(events([chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": n}}]},
                                     "finish_reason": None}]) for n in ("echo", "echo")]))
    assert obs.c.tool_calls[0]["function"]["name"] == "echoecho"
    # whole calls with no id, each with its name: one call each
    whole = [{"type": "function", "function": {"name": n, "arguments": "{}"}} for n in ("a", "b")]
    obs, _ = observe(events([chunk([{"index": 0, "delta": {"tool_calls": [tc]}, "finish_reason": None}])
                             for tc in whole]))
    assert [c["function"]["name"] for c in obs.c.tool_calls] == ["a", "b"]


def test_a_usage_report_on_a_chunk_of_output_is_read_and_relayed_as_it_came() -> None:
    """TGI's report on its last chunk of output (``data:`` without a space) counts; the chunk goes
    on unchanged (a server may send it whether asked or not: the client keeps what it had)."""
    asked = tgi_stream(True)
    for strip in (True, False):
        obs, out = observe(asked, step=43, strip=strip)
        assert out == asked
        assert (obs.c.prompt_tokens, obs.c.completion_tokens, obs.c.finish_reason) == (17, 8, "eos_token")


async def test_dialects_end_to_end(make_gateway: Any, tmp_path: Path) -> None:
    """Through a gateway that counts tokens (so it asks for usage): TGI's report on its last chunk
    is the tokens counted; a relay's stream that stops short is stored as incomplete; tool calls
    without index are stored whole."""
    jl = tmp_path / "audit.jsonl"
    asked: list[Any] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        asked.append(body.get("stream_options"))
        raw = {"tgi": lambda: tgi_stream(bool((body.get("stream_options") or {}).get("include_usage"))),
               "relay": lambda: relay_stream(4, end=False), "noindex": noindex_stream}[body["model"]]()
        return await streaming(raw, 29)(request)

    async with backend(chat) as url:
        g = await make_gateway([{"name": "conversations"},
                                {"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}}],
                               upstream={"url": url})
        msg = [{"role": "user", "content": "hi"}]
        got, cid = await post_stream(g, {"model": "tgi", "stream": True, "messages": msg}, "d-tgi")
        assert asked[-1] == {"include_usage": True} and got == tgi_stream(True)
        ev = (await audit_events(jl, "d-tgi"))[-1]
        assert (ev["tokens_in"], ev["tokens_out"], ev.get("tokens_estimated")) == (17, 8, None)
        stored = await stored_messages(g, cid)
        assert (stored[1]["content"], stored[1]["tokens"], stored[1]["status"]) == ("".join(WORDS), 8, "complete")

        got, cid = await post_stream(g, {"model": "relay", "stream": True, "messages": msg}, "d-relay")
        assert got == relay_stream(4, end=False)
        stored = await stored_messages(g, cid)
        assert (stored[1]["content"], stored[1]["status"], stored[1]["finish_reason"]) == ("Hello there, how", "incomplete", None)

        got, cid = await post_stream(g, {"model": "noindex", "stream": True, "messages": msg}, "d-noindex")
        assert got == noindex_stream()
        stored = await stored_messages(g, cid)
        assert stored[1]["tool_calls"] == NOINDEX_JOINED and stored[1]["finish_reason"] == "tool_calls"


def test_a_huge_answer_whose_choices_hold_a_non_object_is_read_from_its_head() -> None:
    """A body too large to parse whose first bytes list a choice that is not an object: the head is
    read past it (it raised, and the client's response was never ended)."""
    raw = (b'{"id":"x","choices":[null,{"index":0,"finish_reason":"stop","message":{"role":"assistant",'
           b'"content":"hi"}}],"prompt_logprobs":"' + b"a" * (MAX_JSON_BODY + 10) + b'","usage":{"prompt_tokens":3,'
           b'"completion_tokens":4,"total_tokens":7}}')
    obs, out = observe(raw, step=1 << 20, streamed=False)
    assert out == raw and obs.c.finish_reasons == ["stop"] and obs.c.completion_tokens == 4
