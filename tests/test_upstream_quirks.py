"""Backends that are OpenAI-compatible with quirks: a stream without its media type, a server that
refuses stream_options, reasoning models' extra fields, an error inside a 200 stream, and a
stream that stays open after [DONE]."""
from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from .helpers import ADMIN_TOKEN, base_config, start_gateway, write_config

T = aiohttp.ClientTimeout(total=15)
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"


USAGE_CHUNK = b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [],
                                      "usage": USAGE}).encode() + b"\n\n"


class Quirky:
    """An upstream whose behaviour the request's model names."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.peers: list[Any] = []

    async def job(self, request: web.Request) -> web.StreamResponse:
        """A resource that describes a failure (a failed fine-tuning job): data, not an error."""
        return web.json_response({"object": "fine_tuning.job", "id": "ftjob-1", "status": "failed",
                                  "error": {"code": "invalid_file", "message": "bad line 3"}})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        mode = body.get("model")
        wants_usage = (body.get("stream_options") or {}).get("include_usage") is True
        if mode == "picky" and set(body.get("stream_options") or {}) - {"include_usage"}:
            return web.json_response({"object": "error", "message": "unknown field stream_options.bogus"}, status=400)
        if mode == "strict" and "stream_options" in body:
            return web.json_response({"object": "error", "message": "extra fields not permitted: stream_options",
                                      "type": "BadRequestError", "code": 400}, status=400)
        if mode == "reasoning":
            return web.json_response({"id": "c1", "object": "chat.completion", "model": "m", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "Answer", "reasoning_content": "Let me think"}}],
                "usage": USAGE})
        if not body.get("stream"):
            return web.json_response({"id": "c1", "object": "chat.completion", "model": "m", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi"}}],
                "usage": USAGE})
        plain = mode.startswith("no_ctype") or mode == "json_ctype"
        headers = {"Content-Type": "text/plain"} if plain else {"Content-Type": "text/event-stream"}
        resp = web.StreamResponse(headers=headers)
        if plain:
            resp.content_type = "application/json" if mode == "json_ctype" else "text/plain"
        if mode == "done_sized":  # a sized SSE body whose last bytes come after [DONE], a moment later
            first = _chunk({"role": "assistant", "content": "Hel"}) + USAGE_CHUNK + b"data: [DONE]\n\n"
            resp.content_length = len(first) + len(b": end\n\n")
            await resp.prepare(request)
            await resp.write(first)
            await asyncio.sleep(0.3)
            await resp.write(b": end\n\n")
            return resp
        await resp.prepare(request)
        if mode == "reasoning_stream":
            await resp.write(_chunk({"role": "assistant", "reasoning_content": "Let me "}))
            await resp.write(_chunk({"reasoning_content": "think"}))
        first = _chunk({"role": "assistant", "content": "Hel"})
        if mode == "no_ctype_split":  # the first read holds too little to tell SSE from text
            await resp.write(first[:2])
            await asyncio.sleep(0.1)
            first = first[2:]
        elif mode == "no_ctype_bom":
            first = b"\xef\xbb\xbf" + first
        await resp.write(first)
        if mode == "error_event":
            await resp.write(b'data: {"error": {"message": "Engine died", "type": "InternalServerError"}}\n\n')
            await resp.write(b"data: [DONE]\n\n")
            return resp
        await resp.write(_chunk({"content": "lo"}, "stop"))
        if wants_usage:
            await resp.write(USAGE_CHUNK)
        await resp.write(b"data: [DONE]\n\n")
        if mode == "done_open":
            await asyncio.sleep(60)  # [DONE] sent, connection kept open
        await asyncio.sleep(0.01)  # the end of the body a moment after [DONE], as uvicorn's writes come
        await resp.write_eof()
        return resp


@pytest.fixture
async def quirky() -> AsyncIterator[tuple[Quirky, str]]:
    q = Quirky()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", q.handle)
    app.router.add_get("/v1/fine_tuning/jobs/ftjob-1", q.job)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield q, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@contextlib.asynccontextmanager
async def _gateway(tmp_path: Path, url: str, plugins: list[dict[str, Any]] | None = None,
                   **upstream: Any) -> AsyncIterator[Any]:
    """A gateway in front of ``url`` (conversations, writing at once, unless ``plugins``), stopped after."""
    plugins = plugins or [{"name": "conversations", "config": {"flush_interval": 0.05}}]
    cfg = base_config(url, tmp_path, plugins, upstream={
        "url": url, "timeouts": {"connect": 2, "first_byte": 10, "idle": 30}, **upstream})
    g = await start_gateway(write_config(tmp_path / "gateway.yaml", cfg))
    try:
        yield g
    finally:
        await g.stop()


def _turn(db: Path, cid: str) -> tuple[Any, ...] | None:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT status, completion_tokens FROM conversation_turns WHERE conversation_id = ? "
                         "ORDER BY id DESC LIMIT 1", (cid,)).fetchone()


async def _wait_turn(db: Path, cid: str) -> tuple[Any, ...]:
    deadline = time.monotonic() + 10
    while True:
        if db.exists():
            row = _turn(db, cid)
            if row is not None:
                return row
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def _stream(s: aiohttp.ClientSession, url: str, model: str, **headers: str) -> tuple[str, str]:
    async with s.post(url + "/v1/chat/completions", headers=headers, json={
            "model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status == 200, await r.text()
        return (await r.read()).decode(), r.headers["X-Conversation-ID"]


@pytest.mark.parametrize("mode", ["no_ctype", "no_ctype_split", "no_ctype_bom", "json_ctype"])
async def test_stream_without_its_media_type_is_read_as_sse(quirky: Any, tmp_path: Path, mode: str) -> None:
    """A server that streams SSE as text/plain: the usage the gateway asked for is counted, and the
    chunk carrying it does not reach a client that did not ask for it; also when its first read
    holds only "da" (too little to tell), or starts with a byte order mark, or when the stream is
    labelled application/json (as some local servers do)."""
    q, url = quirky
    async with _gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            text, cid = await _stream(s, g.url, mode)
        assert q.bodies[-1]["stream_options"] == {"include_usage": True}
        assert '"usage"' not in text and text.endswith("data: [DONE]\n\n") and '"content": "lo"' in text
        assert await _wait_turn(tmp_path / "gateway.db", cid) == ("complete", 3)


async def test_upstream_refusing_stream_options_gets_the_request_as_sent(quirky: Any, tmp_path: Path) -> None:
    """An older server that refuses unknown fields: the gateway's stream_options would turn a
    working request into a 400. It is sent again as the client sent it, and not added again."""
    q, url = quirky
    async with _gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            text, cid = await _stream(s, g.url, "strict")
            assert text.endswith("data: [DONE]\n\n") and '"content": "Hel"' in text
            assert [("stream_options" in b) for b in q.bodies] == [True, False]
            await _stream(s, g.url, "strict")
            assert [("stream_options" in b) for b in q.bodies] == [True, False, False]
        # no usage reported: the turn counts the 2 deltas relayed, as every other ledger does (its
        # usage stays null; the message's tokens are derived from the deltas)
        assert await _wait_turn(tmp_path / "gateway.db", cid) == ("complete", 2)


async def test_reasoning_in_an_answer_neither_forks_nor_is_replayed(quirky: Any, tmp_path: Path) -> None:
    """A reasoning model's answer carries reasoning_content; clients send the answer back without
    it (as such backends ask). That is the same conversation, not a fork, and memory does not send
    the reasoning back (such backends refuse it in a request)."""
    q, url = quirky
    async with _gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            first = [{"role": "user", "content": "q1"}]
            async with s.post(g.url + "/v1/chat/completions", json={"model": "reasoning", "messages": first}) as r:
                cid = r.headers["X-Conversation-ID"]
                answer = (await r.json())["choices"][0]["message"]
            assert answer["reasoning_content"] == "Let me think"
            resent = first + [{"role": "assistant", "content": answer["content"]}, {"role": "user", "content": "q2"}]
            await _wait_turn(tmp_path / "gateway.db", cid)
            async with s.post(g.url + "/v1/chat/completions", headers={"X-Conversation-ID": cid},
                              json={"model": "reasoning", "messages": resent}) as r:
                assert r.status == 200
                assert r.headers["X-Conversation-ID"] == cid  # not a fork
            async with s.post(g.url + "/v1/chat/completions",
                              headers={"X-Conversation-ID": cid, "X-Conversation-Memory": "on"},
                              json={"model": "reasoning", "messages": [{"role": "user", "content": "q3"}]}) as r:
                assert r.status == 200
        sent = q.bodies[-1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
        assert not any("reasoning_content" in m for m in sent)


async def test_error_event_inside_a_200_stream_is_not_a_complete_answer(quirky: Any, tmp_path: Path) -> None:
    """A server that fails mid-stream sends an error object as an event, then [DONE], with HTTP 200.
    The partial answer is stored, as an upstream error, not as a complete answer."""
    _, url = quirky
    async with _gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            text, cid = await _stream(s, g.url, "error_event")
        assert "Engine died" in text
        status, _ = await _wait_turn(tmp_path / "gateway.db", cid)
        assert status == "upstream_error"


async def test_stream_kept_open_after_done_ends_for_the_client(quirky: Any, tmp_path: Path) -> None:
    """[DONE] is the last event: the client's response ends there, complete, even if the upstream
    keeps its connection open (the client would otherwise wait out the 30 s idle timeout; the
    client's 15 s timeout here catches that)."""
    _, url = quirky
    async with _gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            text, cid = await _stream(s, g.url, "done_open")
        assert text.endswith("data: [DONE]\n\n")
        assert await _wait_turn(tmp_path / "gateway.db", cid) == ("complete", 3)


async def test_a_clients_own_bad_stream_options_changes_nothing_for_others(quirky: Any, tmp_path: Path) -> None:
    """A client whose own stream_options the upstream refuses gets that 400; the gateway keeps
    asking for usage on everyone else's streams (one caller cannot switch exact counting off)."""
    q, url = quirky
    async with _gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.post(g.url + "/v1/chat/completions", json={
                    "model": "picky", "stream": True, "stream_options": {"bogus": True},
                    "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 400
            assert len(q.bodies) == 1  # not sent again
            text, cid = await _stream(s, g.url, "picky")
        assert q.bodies[-1]["stream_options"] == {"include_usage": True}
        assert '"usage"' not in text
        assert await _wait_turn(tmp_path / "gateway.db", cid) == ("complete", 3)


async def test_stream_without_its_media_type_is_read_without_usage_too(quirky: Any, tmp_path: Path) -> None:
    """With upstream.stream_usage off, a text/plain stream is still read as a stream: the answer is
    stored (and its tokens come from the deltas)."""
    _, url = quirky
    async with _gateway(tmp_path, url, stream_usage=False) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            text, cid = await _stream(s, g.url, "no_ctype")
        assert await _wait_turn(tmp_path / "gateway.db", cid) == ("complete", 2)
        with sqlite3.connect(tmp_path / "gateway.db") as c:
            row = c.execute("SELECT content, tokens FROM conversation_messages WHERE conversation_id = ? "
                            "AND role = 'assistant'", (cid,)).fetchone()
        assert row == ('"Hello"', 2)


async def test_a_sized_stream_is_relayed_to_its_last_byte(quirky: Any, tmp_path: Path) -> None:
    """An SSE body with a Content-Length (relayed as is when the client asked for usage itself):
    the client gets every byte it was promised, also those after [DONE]."""
    _, url = quirky
    async with _gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.post(g.url + "/v1/chat/completions", json={
                    "model": "done_sized", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "hi"}]}) as r:
                body = await r.read()
                assert len(body) == int(r.headers["Content-Length"])
        assert body.endswith(b"data: [DONE]\n\n: end\n\n")


async def test_streams_keep_their_upstream_connection(quirky: Any, tmp_path: Path) -> None:
    """The client's response ends at [DONE]; the upstream's end of body, a moment later, is still
    read, so its connection goes back to the pool instead of a new connection per stream."""
    q, url = quirky
    async with _gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            for _ in range(5):
                await _stream(s, g.url, "plain")
                await asyncio.sleep(0.1)  # (a client's next request rarely comes within the 10 ms)
        assert len(set(q.peers)) == 1, q.peers


async def test_streamed_reasoning_is_stored_with_the_answer(quirky: Any, tmp_path: Path) -> None:
    """A reasoning model's streamed thinking is stored with the assembled answer, as a non-streamed
    answer's is (and, as there, it is not what the answer is compared by)."""
    _, url = quirky
    async with _gateway(tmp_path, url) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            text, cid = await _stream(s, g.url, "reasoning_stream")
        await _wait_turn(tmp_path / "gateway.db", cid)
        with sqlite3.connect(tmp_path / "gateway.db") as c:
            row = c.execute("SELECT content, extra FROM conversation_messages WHERE conversation_id = ? "
                            "AND role = 'assistant'", (cid,)).fetchone()
        assert row[0] == '"Hello"' and json.loads(row[1]) == {"reasoning_content": "Let me think"}


async def test_a_resource_describing_a_failure_is_not_an_upstream_error(quirky: Any, tmp_path: Path) -> None:
    """A 200 read of a failed fine-tuning job carries an error field: that is the job's data, the
    request succeeded (only a generation's 2xx answer that is an error counts as one)."""
    _, url = quirky
    async with _gateway(tmp_path, url, [{"name": "metrics"}]) as g:
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.get(g.url + "/v1/fine_tuning/jobs/ftjob-1") as r:
                assert r.status == 200 and (await r.json())["status"] == "failed"
            async with s.get(g.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                text = await r.text()
        errors = [line for line in text.splitlines() if line.startswith("gateway_upstream_errors_total{")]
        assert errors and all(line.endswith(" 0.0") for line in errors), errors  # (each kind shown at 0)
