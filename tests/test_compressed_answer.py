"""An upstream that compresses its answer though the gateway asked for none (``Accept-Encoding:
identity``), as a backend behind nginx with ``gzip on; gzip_proxied any`` does: the client gets
the upstream's bytes as they came, and the observer reads a decoded copy, so usage is counted and
the assistant's answer stored; a corrupt body or a decompression bomb only stops the reading."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

import gateway.observe
import gateway.proxy
from gateway.observe import MAX_JSON_BODY, ResponseObserver

from .helpers import ADMIN_TOKEN, base_config, serve_handler, start_gateway, until, write_config
from .test_sse_framing import stored as stored_with_calls

T = aiohttp.ClientTimeout(total=20)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def gzip_member(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def compress(coding: str, data: bytes) -> bytes:
    """``data`` as an upstream sends it with this Content-Encoding ("deflate-raw": the raw deflate
    some servers label deflate)."""
    if coding == "gzip":
        return gzip_member(data)
    c = zlib.compressobj(6, zlib.DEFLATED, -15 if coding == "deflate-raw" else 15)
    return c.compress(data) + c.flush()


def answer(text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m-up", "usage": USAGE,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m-up",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


class Backend:
    """An upstream answering with ``pieces(request body)``: the body's bytes, each written on its
    own (a stream flushed per event), with these headers. What it sent is kept."""

    def __init__(self, headers: dict[str, str], pieces: Callable[[dict[str, Any]], list[bytes]]) -> None:
        self.headers, self.pieces = headers, pieces
        self.sent = b""
        self.asked: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.asked.append({"body": body, "accept_encoding": request.headers.get("Accept-Encoding")})
        resp = web.StreamResponse(headers=self.headers)
        await resp.prepare(request)
        for p in self.pieces(body):
            await resp.write(p)
            self.sent += p
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp


@contextlib.asynccontextmanager
async def through_gateway(tmp_path: Path, backend: Backend) -> AsyncIterator[Any]:
    runner, url = await serve_handler(backend.handle)
    cfg = base_config(url, tmp_path, [{"name": "conversations", "config": {"flush_interval": 0.05}},
                                      {"name": "audit", "config": {"flush_interval": 0.05}}])
    g = await start_gateway(write_config(tmp_path / "gateway.yaml", cfg))
    try:
        yield g
    finally:
        await g.stop()
        await runner.cleanup()


async def post(g: Any, body: dict[str, Any]) -> tuple[int, bytes, str]:
    """(status, the raw body bytes as the client got them, the conversation id)."""
    async with aiohttp.ClientSession(timeout=T, auto_decompress=False) as s:
        async with s.post(g.url + "/v1/chat/completions", json=body) as r:
            return r.status, await r.read(), r.headers.get("X-Conversation-ID", "")


async def audited(g: Any) -> dict[str, Any]:
    async def one() -> Any:
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.get(g.admin_url + "/audit?type=request", headers=AUTH) as r:
                data = (await r.json())["data"]
        return data[0] if data else None
    return await until(one, what="the audit event")


async def stored(db: Path, cid: str) -> tuple[Any, ...]:
    """(turn status, completion tokens, the stored assistant content) once written."""
    return (await stored_with_calls(db, cid))[:3]


def no_traceback(caplog: Any) -> None:
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "Traceback" not in caplog.text


# -- 1. a JSON answer, gzip or deflate ----------------------------------------------------------------

@pytest.mark.parametrize("coding", ["gzip", "deflate", "deflate-raw"])
async def test_a_compressed_json_answer_is_counted_and_stored_and_relayed_as_it_came(
        tmp_path: Path, coding: str, caplog: Any) -> None:
    """The audit's tokens and the stored assistant message are the upstream's; the client gets
    exactly the compressed bytes the upstream sent, with its Content-Encoding."""
    text = "Bonjour, " + "le monde " * 200  # (compresses well: several reads' worth either way)
    label = "deflate" if coding.startswith("deflate") else coding
    backend = Backend({"Content-Type": "application/json", "Content-Encoding": label},
                      lambda _: [compress(coding, json.dumps(answer(text)).encode())])
    async with through_gateway(tmp_path, backend) as g:
        status, got, cid = await post(g, CHAT)
        assert status == 200
        assert got == backend.sent  # (never decoded nor encoded again for the client)
        assert backend.asked[0]["accept_encoding"] == "identity"
        ev = await audited(g)
        assert (ev["tokens_in"], ev["tokens_out"]) == (11, 5)
        assert ev["response_model"] == "m-up"
        assert await stored(tmp_path / "gateway.db", cid) == ("complete", 5, text)
    no_traceback(caplog)


async def test_the_compressed_answer_keeps_its_headers(tmp_path: Path) -> None:
    """Content-Encoding and Content-Length reach the client as the upstream sent them."""
    body = gzip_member(json.dumps(answer("hello")).encode())

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})

    runner, url = await serve_handler(handler)
    cfg = base_config(url, tmp_path, [{"name": "audit", "config": {"flush_interval": 0.05}}])
    g = await start_gateway(write_config(tmp_path / "gateway.yaml", cfg))
    try:
        async with aiohttp.ClientSession(timeout=T, auto_decompress=False) as s:
            async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                assert r.headers["Content-Length"] == str(len(body))
                assert await r.read() == body
        ev = await audited(g)
        assert (ev["tokens_in"], ev["tokens_out"]) == (11, 5)
    finally:
        await g.stop()
        await runner.cleanup()


# -- 2. a stream, gzip-compressed and flushed per event (as nginx does) ----------------------------

WORDS = ["Hel", "lo", ", wor", "ld", " \u00e9t\u00e9 \U0001F600"]


def gzip_events(body: dict[str, Any]) -> list[bytes]:
    """The stream as nginx compresses it: one gzip member, a sync flush after each event (each
    arrives decodable as it comes), the trailer at the end; the usage chunk only if asked for."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": w}) for w in WORDS]
    events.append(chunk({}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({"id": "c1", "object": "chat.completion.chunk", "model": "m-up", "choices": [], "usage": USAGE})
    out = [c.compress(sse(e)) + c.flush(zlib.Z_SYNC_FLUSH) for e in [*events, "[DONE]"]]
    out.append(c.flush())
    return out


def assembled(stream: bytes) -> tuple[str, dict[str, Any] | None]:
    """The content a client assembles from the (decoded) stream, and the usage it saw."""
    text = zlib.decompressobj(31).decompress(stream).decode()
    content, usage = "", None
    for ev in text.split("\n\n"):
        if not ev.startswith("data: ") or ev == "data: [DONE]":
            continue
        obj = json.loads(ev[6:])
        usage = obj.get("usage") or usage
        for ch in obj["choices"]:
            content += ch["delta"].get("content") or ""
    return content, usage


@pytest.mark.parametrize("ctype", ["text/event-stream", "text/plain"])
async def test_a_gzip_stream_is_read_decoded_and_relayed_byte_for_byte(tmp_path: Path, ctype: str,
                                                                       caplog: Any, monkeypatch: Any) -> None:
    """The stored content is the decoded stream's text, the usage is counted, and the client gets
    the upstream's compressed bytes unchanged: the usage chunk the gateway asked for is not
    removed from a compressed stream (that would take encoding it again), and the log says so.
    Also when the stream comes labelled text/plain: its decoded start is SSE."""
    backend = Backend({"Content-Type": ctype, "Content-Encoding": "gzip"}, gzip_events)
    monkeypatch.setattr(gateway.proxy, "_told", set(), raising=False)  # (what this process already said)
    with caplog.at_level(logging.WARNING, logger="gateway.proxy"):
        async with through_gateway(tmp_path, backend) as g:
            status, got, cid = await post(g, {**CHAT, "stream": True})
            assert status == 200
            assert backend.asked[0]["body"]["stream_options"] == {"include_usage": True}
            assert got == backend.sent
            content, usage = assembled(got)
            assert content == "".join(WORDS) and usage == USAGE
            ev = await audited(g)
            assert (ev["tokens_in"], ev["tokens_out"]) == (11, 5)
            assert "tokens_estimated" not in ev
            assert ev["streamed"] is True
            assert await stored(tmp_path / "gateway.db", cid) == ("complete", 5, content)
            status, got2, _ = await post(g, {**CHAT, "stream": True})  # (said once, not per stream)
            assert got2 == got
    no_traceback(caplog)
    told = [r for r in caplog.records if "usage chunk" in r.getMessage()]
    assert len(told) == 1 and "gzip" in told[0].getMessage()


async def test_a_gzip_stream_kept_open_after_done_ends_for_the_client(tmp_path: Path) -> None:
    """An upstream that keeps its connection open after [DONE] without ending its gzip stream: the
    client's response still ends at [DONE], a moment later (not at the idle timeout, cut), with
    every byte the upstream sent, and the answer is stored as complete."""
    release = asyncio.Event()

    class KeptOpen(Backend):
        async def handle(self, request: web.Request) -> web.StreamResponse:
            body = await request.json()
            resp = web.StreamResponse(headers=self.headers)
            await resp.prepare(request)
            for p in gzip_events(body)[:-1]:  # (not the stream's last block and trailer)
                await resp.write(p)
                self.sent += p
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 30)
            return resp

    backend = KeptOpen({"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}, gzip_events)
    async with through_gateway(tmp_path, backend) as g:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15), auto_decompress=False) as s:
                async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                    got, cid = await r.read(), r.headers["X-Conversation-ID"]
        finally:
            release.set()
        assert got == backend.sent
        assert await stored(tmp_path / "gateway.db", cid) == ("complete", 5, "".join(WORDS))


async def test_a_gzip_stream_whose_end_comes_a_moment_after_done_is_relayed_whole(tmp_path: Path) -> None:
    """The last block and trailer of a compressed stream a little after [DONE] (a second): the
    client gets them, so its decoder sees the stream end (not cut 0.25 s after [DONE])."""
    class Late(Backend):
        async def handle(self, request: web.Request) -> web.StreamResponse:
            body = await request.json()
            resp = web.StreamResponse(headers=self.headers)
            await resp.prepare(request)
            parts = gzip_events(body)
            for p in parts[:-1]:
                await resp.write(p)
                self.sent += p
            await asyncio.sleep(1.0)
            await resp.write(parts[-1])
            self.sent += parts[-1]
            return resp

    backend = Late({"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}, gzip_events)
    async with through_gateway(tmp_path, backend) as g:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15), auto_decompress=False) as s:
            async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                got = await r.read()
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert d.decompress(got).endswith(b"data: [DONE]\n\n")
    assert d.eof  # (the gzip stream's end, which came a second after [DONE])


class RefusingBackend(Backend):
    """An older server behind a compressing proxy: it refuses stream_options with a 400 whose JSON
    error comes gzip-compressed too."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if "stream_options" in body:
            self.asked.append({"body": body, "accept_encoding": request.headers.get("Accept-Encoding")})
            err = {"error": {"message": "Unrecognized request argument supplied: stream_options",
                             "type": "invalid_request_error", "code": None, "param": None}}
            return web.Response(status=400, body=gzip_member(json.dumps(err).encode()),
                                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        return await super().handle(request)


async def test_a_compressed_refusal_of_stream_options_is_understood(tmp_path: Path) -> None:
    """The 400 refusing the stream_options the gateway added is read decoded: the stream is asked
    again as the client sent it, and the client gets it (not the 400 for a field it never sent)."""
    backend = RefusingBackend({"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}, gzip_events)
    async with through_gateway(tmp_path, backend) as g:
        status, got, cid = await post(g, {**CHAT, "stream": True})
        assert status == 200
        assert [("stream_options" in a["body"]) for a in backend.asked] == [True, False]
        assert got == backend.sent
        ev = await audited(g)
        assert ev["tokens_out"] == len(WORDS) and ev["tokens_estimated"] is True  # (no usage asked for)
        # (the turn counts the deltas too, as the audit event does)
        assert await stored(tmp_path / "gateway.db", cid) == ("complete", len(WORDS), "".join(WORDS))


# -- 3. a corrupt compressed body -------------------------------------------------------------------

def corrupt_stream(body: dict[str, Any]) -> list[bytes]:
    """Two events that decode, then bytes that do not (an invalid deflate block), then the end."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    first = [c.compress(sse(e)) + c.flush(zlib.Z_SYNC_FLUSH)
             for e in (chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}))]
    return [*first, b"\xff" * 64, c.compress(sse("[DONE]")) + c.flush()]


def corrupt_json(body: dict[str, Any]) -> list[bytes]:
    """A whole gzip JSON answer whose trailer's checksum is wrong: its text is not to be trusted."""
    data = bytearray(gzip_member(json.dumps(answer("hello")).encode()))
    data[-8] ^= 0xFF
    return [bytes(data)]


@pytest.mark.parametrize("kind", ["stream", "json"])
async def test_a_corrupt_compressed_body_is_relayed_whole_and_only_stops_the_reading(
        tmp_path: Path, kind: str, caplog: Any) -> None:
    """The client gets every byte the upstream sent (200, not a 500, not a cut), nothing raises:
    the gateway logs one line saying the body did not decode. What a stream delivered before the
    corruption is stored, as an incomplete answer; a JSON body failing its checksum is not read."""
    ctype = "text/event-stream" if kind == "stream" else "application/json"
    backend = Backend({"Content-Type": ctype, "Content-Encoding": "gzip"},
                      corrupt_stream if kind == "stream" else corrupt_json)
    with caplog.at_level(logging.INFO):
        async with through_gateway(tmp_path, backend) as g:
            status, got, cid = await post(g, {**CHAT, "stream": kind == "stream"})
            assert status == 200
            assert got == backend.sent
            ev = await audited(g)
            assert ev["status"] == 200 and ev["outcome"] == "ok"
            if kind == "stream":
                assert await stored(tmp_path / "gateway.db", cid) == ("incomplete", 2, "Hello")
                assert ev["tokens_out"] == 2 and ev["tokens_estimated"] is True
            else:
                assert ev["tokens_in"] is None and ev["tokens_out"] is None
    no_traceback(caplog)
    said = [r.getMessage() for r in caplog.records if "did not decode" in r.getMessage()]
    assert len(said) == 1 and ev["request_id"] in said[0]


# -- 4. a decompression bomb ---------------------------------------------------------------------

def bomb(prefix: bytes, megabytes: int, suffix: bytes) -> bytes:
    """A gzip body of ``prefix``, ``megabytes`` MiB of "0" and ``suffix``: each MiB compressed once
    (after a full flush the compressor starts afresh, so every MiB's bytes are the same), about a
    thousandth of its size."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = b"0" * 2**20
    one = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.compress(suffix) + c.flush()
    crc = zlib.crc32(prefix)
    for _ in range(megabytes):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(suffix, crc)
    size = (len(prefix) + megabytes * len(block) + len(suffix)) & 0xFFFFFFFF
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + head + one * megabytes + end + struct.pack("<II", crc, size)


def peak_rss_reset() -> int | None:
    """This process's peak resident size (kB), after resetting it (Linux); None if it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_rss()
    except OSError:
        return None


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


async def test_a_decompression_bomb_is_relayed_without_being_inflated(tmp_path: Path, caplog: Any,
                                                                     monkeypatch: Any) -> None:
    """A 1 GiB answer compressed to 1 MiB: the client gets the 1 MiB as it came; the observer
    inflates a bounded part of it (no more decoded bytes kept than a plain body's bounds), reads
    the usage its first bytes report (as for any JSON body too large to parse), and stops; the
    gateway's memory does not grow by the gigabyte."""
    lead = json.dumps(answer("ok"))[:-1].encode() + b', "pad": "'
    body = bomb(lead, 1024, b'"}')
    backend = Backend({"Content-Type": "application/json", "Content-Encoding": "gzip"},
                      lambda _: [body[i:i + 65536] for i in range(0, len(body), 65536)])
    seen: list[Any] = []

    class Spy(ResponseObserver):
        """The gateway's observer, noting the decoded bytes it held and made."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.kept = self.decoded = 0
            seen.append(self)

        def _feed_coded(self, chunk: bytes) -> bytes:
            d = self._decoder
            out = super()._feed_coded(chunk)
            if d is not None:
                self.decoded = d.total_out
            self.kept = max(self.kept, len(self._buf) + len(self._tail))
            return out

    monkeypatch.setattr(gateway.proxy, "ResponseObserver", Spy)
    async with through_gateway(tmp_path, backend) as g:
        before = peak_rss_reset()
        status, got, _ = await post(g, CHAT)
        grown = peak_rss() - before if before is not None else None
        assert status == 200 and got == backend.sent
        ev = await audited(g)
        assert (ev["tokens_in"], ev["tokens_out"]) == (11, 5)
        assert ev["response_model"] == "m-up"
    obs, = seen
    assert getattr(obs, "unreadable", None) == "bomb"
    assert obs.kept <= MAX_JSON_BODY
    assert MAX_JSON_BODY < obs.decoded <= gateway.observe.MAX_DECODED + gateway.observe.DECODE_STEP
    if grown is not None:
        assert grown < 256 * 1024, f"peak RSS grew by {grown} kB"
    no_traceback(caplog)
