"""SSE framing as real backends send it, through the observer and a real gateway: CR line ends
(with an upstream that keeps its connection open after [DONE]), a byte order mark at the start of
the body, streams of very many deltas, and the stream_options refusal a reload forgets."""
from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from gateway.observe import ResponseObserver

from .helpers import ADMIN_TOKEN, base_config, serve_handler, start_gateway, write_config

#: Shorter than the gateway's idle timeout (30 s): a client still waiting on an upstream that keeps
#: its connection open fails here instead of getting a cut answer much later.
T = aiohttp.ClientTimeout(total=5)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
BOM = b"\xef\xbb\xbf"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE_CHUNK = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [], "usage": USAGE}


def events(objs: list[Any], eol: str = "\n", blank: str | None = None) -> bytes:
    """SSE events of ``objs`` (a str is sent as is, e.g. "[DONE]"), each line ended by ``eol`` and
    each event by ``blank``."""
    out = []
    for o in objs:
        data = o if isinstance(o, str) else json.dumps(o)
        out.append(f"data: {data}{eol}{blank if blank is not None else eol}")
    return "".join(out).encode()


@contextlib.asynccontextmanager
async def upstream(handler: Callable[[web.Request], Any]) -> AsyncIterator[str]:
    runner, url = await serve_handler(handler)
    try:
        yield url
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, url: str, **upstream_cfg: Any) -> AsyncIterator[Any]:
    """A gateway storing conversations (written at once) in front of ``url``."""
    cfg = base_config(url, tmp_path, [{"name": "conversations", "config": {"flush_interval": 0.05}}],
                      upstream={"url": url, "timeouts": {"connect": 2, "first_byte": 10, "idle": 30},
                                **upstream_cfg})
    g = await start_gateway(write_config(tmp_path / "gateway.yaml", cfg))
    try:
        yield g
    finally:
        await g.stop()


async def stream(s: aiohttp.ClientSession, url: str, **extra: Any) -> tuple[bytes, str]:
    async with s.post(url + "/v1/chat/completions", json={
            "model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], **extra}) as r:
        assert r.status == 200, await r.text()
        return await r.read(), r.headers["X-Conversation-ID"]


async def stored(db: Path, cid: str) -> tuple[Any, ...]:
    """(turn status, completion tokens, assistant content, its tool calls) once written."""
    deadline = time.monotonic() + 10
    while True:
        if db.exists():
            with sqlite3.connect(db) as c:
                turn = c.execute("SELECT status, completion_tokens FROM conversation_turns WHERE conversation_id = ? "
                                 "ORDER BY id DESC LIMIT 1", (cid,)).fetchone()
                msg = c.execute("SELECT content, tool_calls FROM conversation_messages WHERE conversation_id = ? "
                                "AND role = 'assistant'", (cid,)).fetchone()
            if turn is not None and msg is not None:
                return (*turn, json.loads(msg[0]), json.loads(msg[1]) if msg[1] else None)
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


# -- 1. CR line ends, and an upstream that keeps its connection open after [DONE] ----------------

HELLO = [chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}, "stop")]


async def relayed(tmp_path: Path, pieces: list[bytes], keep_open: bool) -> tuple[bytes, tuple[Any, ...]]:
    """What a client gets through the gateway from an upstream that writes ``pieces`` (a moment
    apart), then keeps its connection open (until the client has its answer) or ends; and the turn
    stored."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(0.05)
            await resp.write(piece)
        if keep_open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 30)  # [DONE] sent, the connection kept open
        return resp

    async with upstream(handler) as url, gateway(tmp_path, url) as g:
        try:
            async with aiohttp.ClientSession(timeout=T) as s:
                body, cid = await stream(s, g.url)
        finally:
            release.set()
        return body, await stored(tmp_path / "gateway.db", cid)


@pytest.mark.parametrize("eol, blank", [("\r", "\r"), ("\n", "\r"), ("\r\n", "\r")],
                         ids=["cr", "lf-then-cr", "crlf-then-cr"])
async def test_cr_framed_stream_kept_open_after_done_ends_for_the_client(tmp_path: Path, eol: str,
                                                                         blank: str) -> None:
    """Every event ends with a blank line whose last line end is a CR; the upstream keeps its
    connection open after [DONE]. The blank line is whole at that CR: the client's response ends
    at [DONE], complete (not at the idle timeout, cut), and the turn is stored as complete with
    the usage the gateway asked for, whose chunk the client does not get."""
    body, turn = await relayed(tmp_path, [events([*HELLO, USAGE_CHUNK, "[DONE]"], eol, blank)], keep_open=True)
    assert body == events([*HELLO, "[DONE]"], eol, blank)
    assert turn == ("complete", 3, "Hello", None)


@pytest.mark.parametrize("close", [False, True], ids=["kept-open", "closed"])
async def test_a_crlf_stream_whose_last_lf_comes_a_moment_after_done_loses_no_byte(tmp_path: Path,
                                                                                   close: bool) -> None:
    """[DONE]\r\n\r in one read, the last \n in the next: the relay stops at [DONE] (the
    upstream may keep its connection open), but not before that LF, which the client gets too."""
    raw = events([*HELLO, USAGE_CHUNK, "[DONE]"], "\r\n")
    body, turn = await relayed(tmp_path, [raw[:-1], raw[-1:]], keep_open=not close)
    assert body == events([*HELLO, "[DONE]"], "\r\n")
    assert turn == ("complete", 3, "Hello", None)


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("strip", [False, True])
def test_line_ends_split_anywhere_relay_the_same_bytes(eol: str, strip: bool) -> None:
    """Whatever the chunking (here: byte by byte, and whole), the client gets the upstream's bytes
    (without the usage chunk the gateway hides): an LF that completes a CRLF after an event was
    already taken as ended goes with that event, relayed or hidden."""
    body = [chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}, "stop"), USAGE_CHUNK, "[DONE]"]
    raw = events(body, eol)
    want = events([o for o in body if o is not USAGE_CHUNK], eol) if strip else raw
    for size in (1, 2, 3, len(raw)):
        obs = ResponseObserver(True, strip)
        out = b"".join(obs.feed(raw[i:i + size]) for i in range(0, len(raw), size)) + obs.finish()
        c = obs.c
        assert (out if strip else raw) == want, (size, out)
        assert (c.content, c.usage, c.finish_reason, c.ended) == ("Hello", USAGE, "stop", True), size


# -- 2. Streams of very many deltas ---------------------------------------------------------------

def _pieces(n: int) -> list[str]:
    return [f"{i:05d}-\u00e9\U0001f600-" + "x" * (i % 7) for i in range(n)]


def test_many_deltas_assemble_to_the_joined_text() -> None:
    """Content, reasoning, refusal and two interleaved tool calls' arguments of a long stream are
    the deltas joined, also when they are read mid-stream and more deltas come after."""
    pieces = _pieces(20000)
    half = len(pieces) // 2
    obs = ResponseObserver(True, False)
    obs.feed(events([chunk({"role": "assistant"})]))
    for i, p in enumerate(pieces):
        d: dict[str, Any] = {"content": p, "tool_calls": [{"index": i % 2, "function": {"arguments": p}}]}
        if i == 0:
            d["tool_calls"][0].update(id="call_a", type="function")
            d["tool_calls"][0]["function"]["name"] = "fa"
        obs.feed(events([chunk(d), chunk({"reasoning_content": p}), chunk({"refusal": p})]))
        if i == half:  # read mid-stream (a plugin may): what comes after is still added
            c = obs.c
            assert c.content == "".join(pieces[:half + 1])
            assert c.reasoning == ("reasoning_content", "".join(pieces[:half + 1]))
            assert c.tool_calls[0]["function"]["arguments"] == "".join(pieces[0:half + 1:2])
            assert c.refusal == "".join(pieces[:half + 1])
    obs.feed(events([chunk({}, "stop"), "[DONE]"]))
    obs.finish()
    c = obs.c
    text = "".join(pieces)
    assert (c.content, c.refusal, c.reasoning) == (text, text, ("reasoning_content", text))
    assert [tc["function"]["arguments"] for tc in c.tool_calls] == ["".join(pieces[0::2]), "".join(pieces[1::2])]
    assert c.tool_calls[0]["id"] == "call_a" and c.tool_calls[0]["function"]["name"] == "fa"
    assert c.deltas == 3 * len(pieces)
    msg = c.assistant_message()
    assert msg is not None
    assert (msg["content"], msg["refusal"], msg["reasoning_content"]) == (text, text, text)
    assert msg["tool_calls"][1]["function"]["arguments"] == "".join(pieces[1::2])


def test_many_deltas_of_completions_and_responses_streams() -> None:
    """The legacy completions stream's text and a Responses API stream's output text likewise."""
    pieces = _pieces(20000)
    legacy = ResponseObserver(True, False)
    responses = ResponseObserver(True, False)
    for p in pieces:
        legacy.feed(events([{"id": "cmpl-1", "model": "m", "choices": [{"index": 0, "text": p,
                                                                        "finish_reason": None}]}]))
        responses.feed(b"event: response.output_text.delta\n" + events([{
            "type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": p}]))
    legacy.feed(events(["[DONE]"]))
    for o in (legacy, responses):
        o.finish()
        assert o.c.content == "".join(pieces)
        assert o.c.deltas == len(pieces)


async def test_a_long_streamed_answer_is_stored_whole(tmp_path: Path) -> None:
    """Through a real gateway: the stored answer of a stream of thousands of deltas (text and a
    tool call's arguments) is exactly what the client got, joined."""
    pieces = _pieces(5000)

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(events([chunk({"role": "assistant", "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]})]))
        for i in range(0, len(pieces), 500):
            await resp.write(events([chunk({"content": p, "tool_calls": [{"index": 0, "function": {"arguments": p}}]})
                                     for p in pieces[i:i + 500]]))
        await resp.write(events([chunk({}, "tool_calls"), USAGE_CHUNK, "[DONE]"]))
        await resp.write_eof()
        return resp

    async with upstream(handler) as url, gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            _, cid = await stream(s, g.url)
        status, tokens, content, tool_calls = await stored(tmp_path / "gateway.db", cid)
    assert (status, tokens, content) == ("complete", 3, "".join(pieces))
    assert tool_calls == [{"id": "call_1", "type": "function", "function": {"name": "f",
                                                                            "arguments": "".join(pieces)}}]


# -- 3. A byte order mark at the start of the body ------------------------------------------------

async def test_a_bom_at_the_start_of_a_stream_loses_no_event(tmp_path: Path) -> None:
    """A stream whose body starts with a UTF-8 BOM (an SSE parser skips it): the first event is
    read too, so the whole answer is stored; the client gets the BOM as it came."""
    body = [chunk({"role": "assistant", "content": "Hello"}), chunk({"content": " world!"}, "stop"), USAGE_CHUNK,
            "[DONE]"]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(BOM + events(body))
        await resp.write_eof()
        return resp

    async with upstream(handler) as url, gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            got, cid = await stream(s, g.url)
        assert got == BOM + events([o for o in body if o is not USAGE_CHUNK])  # (the usage chunk hidden)
        assert await stored(tmp_path / "gateway.db", cid) == ("complete", 3, "Hello world!", None)


@pytest.mark.parametrize("strip", [False, True])
def test_a_bom_split_over_chunks_is_relayed_and_skipped(strip: bool) -> None:
    """A BOM is skipped by the parser only at the very start of the body (in whatever chunks it
    comes), and always relayed as it came."""
    raw = BOM + events([chunk({"content": "Hello"}), chunk({"content": BOM.decode() + "!"}, "stop"), "[DONE]"])
    for size in (1, 2, 4, len(raw)):
        obs = ResponseObserver(True, strip)
        out = b"".join(obs.feed(raw[i:i + size]) for i in range(0, len(raw), size)) + obs.finish()
        assert (out if strip else raw) == raw
        assert (obs.c.content, obs.c.ended) == ("Hello\ufeff!", True), size
    obs = ResponseObserver(True, False)  # a BOM alone, then the stream's end
    obs.feed(BOM[:2])
    assert obs.finish() == b"" and obs.c.content is None


# -- 4. A refusal of stream_options is forgotten on a reload -------------------------------------

async def test_a_reload_asks_again_an_upstream_that_refused_stream_options(tmp_path: Path) -> None:
    """An upstream that refused stream_options gets streams as the client sent them until a reload
    (as documented): after one, with the same URL and settings, the gateway asks for usage again,
    and an upstream upgraded meanwhile reports it."""
    state = {"refuse": True}
    asked: list[bool] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        asked.append("stream_options" in body)
        if state["refuse"] and "stream_options" in body:
            return web.json_response({"object": "error", "message": "extra fields not permitted: stream_options",
                                      "type": "BadRequestError", "code": 400}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        objs: list[Any] = [chunk({"role": "assistant", "content": "Hi"}, "stop")]
        if "stream_options" in body:
            objs.append(USAGE_CHUNK)
        await resp.write(events(objs + ["[DONE]"]))
        await resp.write_eof()
        return resp

    async with upstream(handler) as url, gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            await stream(s, g.url)
            await stream(s, g.url)
            assert asked == [True, False, False]  # refused, sent again as sent; then not added
            state["refuse"] = False  # the upstream is upgraded
            async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
                assert r.status == 200, await r.text()
            body, cid = await stream(s, g.url)
        assert asked == [True, False, False, True]
        assert b'"usage"' not in body  # (the chunk the gateway asked for is hidden)
        assert (await stored(tmp_path / "gateway.db", cid))[:3] == ("complete", 3, "Hi")
