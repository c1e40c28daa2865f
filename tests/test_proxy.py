"""End-to-end proxying through a real gateway socket: JSON, SSE timing, the OpenAI SDK as client,
header hygiene (hop-by-hop, framing, forwarding headers, credentials), redirects, compression,
and every error path in the OpenAI error shape."""
from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import socket
import time
from collections import Counter
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.logs import ThrottledLog
from gateway.plugin import Plugin, Reply, registry

from .helpers import after_continue, open_idle_sockets

T = aiohttp.ClientTimeout(total=20)
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello there"}]}
HEX32 = re.compile(r"^[0-9a-f]{32}$")


# -- test-only plugins -------------------------------------------------------------------------------
class ProxyRecorder(Plugin):
    """Records how each exchange ended (on_complete) for assertions."""

    name = "t_proxy_recorder"
    seen: list[dict[str, Any]] = []

    async def on_complete(self, ctx: Any) -> None:
        type(self).seen.append({"outcome": ctx.outcome, "status": ctx.status, "error": ctx.error,
                                "source": ctx.source, "path": ctx.path, "streamed": ctx.streamed,
                                "bytes_out": ctx.bytes_out})


class Exploder(Plugin):
    """Raises in the hook named by the request header X-Explode."""

    name = "t_proxy_exploder"

    async def on_request(self, ctx: Any) -> Reply | None:
        if ctx.request.headers.get("X-Explode") == "request":
            raise RuntimeError("secret internal detail 42")
        return None

    async def on_response(self, ctx: Any, head: Any) -> None:
        if ctx.request.headers.get("X-Explode") == "response" and head.source == "upstream":
            raise RuntimeError("secret internal detail 43")

    async def on_chunk(self, ctx: Any, chunk: bytes, last: bool) -> bytes:
        if ctx.request.headers.get("X-Explode") == "chunk" and b"[DONE]" in chunk:
            raise RuntimeError("secret internal detail 44")
        return chunk


registry.register(ProxyRecorder)
registry.register(Exploder)


@pytest.fixture(autouse=True)
def _clear_recorder() -> None:
    ProxyRecorder.seen.clear()


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def assert_error_shape(body: Any, code: str | None = None) -> None:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err


# -- a purpose-built upstream for precise control ------------------------------------------------------
class Fake:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.sends: list[float] = []
        self.stream_closed = asyncio.Event()
        self.stream_sent = 0
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def start(self) -> "Fake":
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/endless", self.endless)
        app.router.add_get("/hop", self.hop)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/gzip", self.gzipped)
        app.router.add_get("/short", self.short)
        app.router.add_post("/cutjson", self.cutjson)
        app.router.add_get("/nocontent", self.nocontent)
        app.router.add_get("/cookies", self.cookies)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def record(self, request: web.Request) -> bytes:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append({"method": request.method, "path_qs": request.path_qs, "peer": peer,
                              "headers": request.headers.copy(), "body": body,
                              "chunked": request.headers.get("Transfer-Encoding") == "chunked"})
        return body

    async def cutjson(self, request: web.Request) -> web.StreamResponse:
        """A chunked JSON body the upstream abandons halfway."""
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'{"id": "x", "choices": [{"message": {"content": "par')
        assert request.transport is not None
        request.transport.close()
        return resp

    async def echo(self, request: web.Request) -> web.Response:
        body = await self.record(request)
        return web.json_response({"method": request.method, "path_qs": request.path_qs,
                                  "body": body.decode("utf-8", "replace")})

    async def sse(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        n = int(request.query.get("n", "5"))
        pause = float(request.query.get("pause", "0.25"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            if i:
                await asyncio.sleep(pause)
            self.sends.append(time.monotonic())
            await resp.write(f"data: {json.dumps({'i': i})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def endless(self, request: web.Request) -> web.StreamResponse:
        """Streams until the reader goes away; records that it noticed."""
        await self.record(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(400):
                await resp.write(f"data: {i}\n\n".encode())
                self.stream_sent += 1
                await asyncio.sleep(0.05)
        except (asyncio.CancelledError, ConnectionResetError, aiohttp.ClientConnectionResetError):
            self.stream_closed.set()
            raise
        return resp

    async def hop(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(body=b'{"ok": true}', content_type="application/json", headers={
            "Connection": "keep-alive, X-Resp-Private",
            "Keep-Alive": "timeout=5, max=100",
            "X-Resp-Private": "must not reach the client",
            "Trailer": "X-Checksum",
            "Upgrade": "h2c",
            "Proxy-Authenticate": "Basic realm=upstream",
            "Proxy-Authorization": "Basic dXA6c3RyZWFt",
            "X-Resp-End-To-End": "kept",
            "Server": "uvicorn/0.30.1",
            "X-Powered-By": "Express 4.18",
        })

    async def redirect(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(status=302, headers={"Location": "/elsewhere?x=1"}, text="moved")

    async def gzipped(self, request: web.Request) -> web.Response:
        await self.record(request)
        raw = gzip.compress(json.dumps({"compressed": True, "pad": "x" * 2000}).encode())
        return web.Response(body=raw, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})

    async def short(self, request: web.Request) -> web.StreamResponse:
        """Promises 1000 bytes, sends 100, then drops the connection."""
        await self.record(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b"a" * 100)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def nocontent(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(status=204, headers={"X-Empty": "yes"})

    async def cookies(self, request: web.Request) -> web.Response:
        await self.record(request)
        resp = web.Response(text="ok")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        return resp

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def fake() -> Any:
    f = await Fake().start()
    yield f
    await f.stop()


async def gateway_to(make_gateway: Any, url: str, plugins: list[dict[str, Any]] | None = None,
                     timeouts: dict[str, float] | None = None, **sections: Any) -> Any:
    up: dict[str, Any] = {"url": url, "timeouts": {"connect": 2, "first_byte": 10, "idle": 10, **(timeouts or {})}}
    up.update(sections.pop("upstream", {}))
    return await make_gateway(plugins, upstream=up, **sections)


# -- plain JSON ------------------------------------------------------------------------------------
async def test_openai_endpoints_relayed(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway()
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            body = await r.json()
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"]["content"].endswith("hello there")
            assert body["usage"]["prompt_tokens"] == 3
        async with s.post(g.url + "/v1/completions", json={"model": "demo-chat", "prompt": "say it"}) as r:
            assert r.status == 200
            assert (await r.json())["object"] == "text_completion"
        async with s.post(g.url + "/v1/embeddings", json={"model": "demo-embed", "input": ["a b", "c"]}) as r:
            assert r.status == 200
            body = await r.json()
            assert [d["index"] for d in body["data"]] == [0, 1]
            assert body["usage"]["prompt_tokens"] == 3
        async with s.get(g.url + "/v1/models") as r:
            assert r.status == 200
            assert [m["id"] for m in (await r.json())["data"]] == ["demo-chat", "demo-embed"]
        # The upstream's own error statuses and bodies are relayed as they are.
        async with s.post(g.url + "/v1/chat/completions", json=CHAT, headers={"X-Demo-Status": "429"}) as r:
            assert r.status == 429
            assert (await r.json())["error"]["message"] == "demo backend answered 429 as asked"
    seen = [r["path"] for r in upstream.requests]
    assert seen[:4] == ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"]
    assert upstream.requests[0]["body"] == CHAT


async def test_arbitrary_method_path_and_query(make_gateway: Any, fake: Any) -> None:
    g = await gateway_to(make_gateway, fake.url)
    async with aiohttp.ClientSession(timeout=T) as s:
        for method in ("PATCH", "DELETE", "PUT", "OPTIONS"):
            async with s.request(method, g.url + "/v1/some/thing%2Fencoded?b=2&a=x%20y&a=z",
                                 data=b"raw \x00 bytes" if method != "OPTIONS" else None) as r:
                assert r.status == 200, await r.text()
                got = await r.json()
                assert got["method"] == method
                assert got["path_qs"] == "/v1/some/thing%2Fencoded?b=2&a=x%20y&a=z"
        async with s.head(g.url + "/v1/whatever?q=1") as r:
            assert r.status == 200
    reqs = fake.requests
    assert [q["method"] for q in reqs] == ["PATCH", "DELETE", "PUT", "OPTIONS", "HEAD"]
    assert reqs[0]["body"] == b"raw \x00 bytes"
    assert reqs[-1]["path_qs"] == "/v1/whatever?q=1"


async def test_request_id(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway(server={"paths": ["/v1"]})
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models", headers={"X-Request-ID": "client-id_1.2:3"}) as r:
            assert r.status == 200
            assert r.headers["X-Request-ID"] == "client-id_1.2:3"
        assert upstream.requests[-1]["headers"]["X-Request-ID"] == "client-id_1.2:3"
        for bad in ("has space", "x" * 200, "semi;colon", "<script>"):
            async with s.get(g.url + "/v1/models", headers={"X-Request-ID": bad}) as r:
                rid = r.headers["X-Request-ID"]
                assert rid != bad and HEX32.match(rid)
            assert upstream.requests[-1]["headers"]["X-Request-ID"] == rid
        async with s.get(g.url + "/v1/models") as r:
            rid = r.headers["X-Request-ID"]
            assert HEX32.match(rid)
        assert upstream.requests[-1]["headers"]["X-Request-ID"] == rid
        # Errors carry it too: a path outside server.paths (404), an upstream error relayed.
        async with s.get(g.url + "/elsewhere", headers={"X-Request-ID": "err-1"}) as r:
            assert r.status == 404
            assert r.headers["X-Request-ID"] == "err-1"
            assert_error_shape(await r.json(), "not_found")
        async with s.get(g.url + "/v1/models", headers={"X-Demo-Status": "503"}) as r:
            assert r.status == 503
            assert HEX32.match(r.headers["X-Request-ID"])
    # The id is unique per request.
    ids = [q["headers"]["X-Request-ID"] for q in upstream.requests]
    assert len(set(ids[1:])) == len(ids) - 1


# -- streaming -------------------------------------------------------------------------------------
async def sse_arrivals(r: aiohttp.ClientResponse) -> list[float]:
    """When each event of the fake upstream's /sse stream ({"i": 0}, {"i": 1} ...) arrived."""
    assert r.headers["Content-Type"].startswith("text/event-stream")
    arrivals: list[float] = []
    buf = b""
    async for chunk in r.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if event != b"data: [DONE]":
                arrivals.append(time.monotonic())
                assert json.loads(event[6:])["i"] == len(arrivals) - 1
    return arrivals


async def test_sse_events_arrive_one_by_one(make_gateway: Any, fake: Any) -> None:
    n = 5
    g = await gateway_to(make_gateway, fake.url, [{"name": "t_proxy_recorder"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + f"/sse?n={n}&pause=0.4") as r:
            assert r.status == 200
            arrivals = await sse_arrivals(r)
    assert len(arrivals) == n and len(fake.sends) == n
    for i in range(n - 1):
        # event i reached the client before the upstream even sent event i+1
        assert arrivals[i] < fake.sends[i + 1], (i, arrivals, fake.sends)
    await wait_for(lambda: ProxyRecorder.seen)
    assert ProxyRecorder.seen[0]["outcome"] == "ok" and ProxyRecorder.seen[0]["streamed"] is True


async def test_demo_stream_relayed_whole(make_gateway: Any) -> None:
    g = await make_gateway()
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"X-Demo-Words": "7"}) as r:
            assert r.status == 200
            text = (await r.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert len([d for d in deltas if d]) == 7


# -- the OpenAI SDK as a client ----------------------------------------------------------------------
async def test_openai_sdk_plain_and_stream(make_gateway: Any) -> None:
    g = await make_gateway()
    client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="sk-client-side", max_retries=0, timeout=20)
    try:
        r = await client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi sdk"}])
        assert r.choices[0].message.content == "Hello from the demo backend. You said: hi sdk"
        assert r.usage is not None and r.usage.completion_tokens == 9
        parts = []
        stream = await client.chat.completions.create(model="demo-chat", stream=True,
                                                      stream_options={"include_usage": True},
                                                      messages=[{"role": "user", "content": "stream it"}])
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        assert "".join(parts) == "Hello from the demo backend. You said: stream it"
        assert usage is not None and usage.completion_tokens == len(parts)
        emb = await client.embeddings.create(model="demo-embed", input="one two")
        assert len(emb.data[0].embedding) == 8
        models = [m.id async for m in client.models.list()]
        assert models == ["demo-chat", "demo-embed"]
    finally:
        await client.close()


def _sync_sdk(url: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-x", max_retries=0, timeout=20)
    try:
        out = ""
        for chunk in client.chat.completions.create(model="demo-chat", stream=True,
                                                    messages=[{"role": "user", "content": "sync"}]):
            if chunk.choices:
                out += chunk.choices[0].delta.content or ""
        return out
    finally:
        client.close()


async def test_openai_sync_sdk_in_thread(make_gateway: Any) -> None:
    g = await make_gateway()
    assert await asyncio.to_thread(_sync_sdk, g.url) == "Hello from the demo backend. You said: sync"


# -- header hygiene ----------------------------------------------------------------------------------
async def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        async with asyncio.timeout(timeout):
            return await r.read()
    finally:
        w.close()


async def raw_request(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the request asks for Connection: close)."""
    raw = await raw_exchange(port, data, timeout)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, headers, body


async def test_a_header_value_that_is_not_utf8_is_refused_not_forwarded_cut(make_gateway: Any, fake: Any) -> None:
    """A Latin-1 byte in a header value used to be dropped on the way up ("Jos\\xe9" reached the
    upstream as "Jos"), and a gateway key with such a byte in it was not masked first. UTF-8 goes
    through byte for byte."""
    g = await gateway_to(make_gateway, fake.url, [{"name": "conversations"}])
    base = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
    status, _, body = await raw_request(g.gw.public_port, base + b"X-Name: Jos\xc3\xa9\r\n\r\n")
    assert status == 200 and fake.requests[-1]["headers"]["X-Name"] == "Jos\u00e9"
    n = len(fake.requests)
    for name, value in ((b"X-Name", b"Jos\xe9"), (b"X-Name", b"gw_abcdefgh1234_" + b"s" * 20 + b"\xff" + b"t" * 10),
                        (b"X-Forwarded-For", b"10.0.0.1, Jos\xe9")):  # (dropped, and rebuilt from it)
        status, _, body = await raw_request(g.gw.public_port, base + name + b": " + value + b"\r\n\r\n")
        assert status == 400, body
        err = json.loads(body)
        assert_error_shape(err, "bad_request")
        assert name.decode() in err["error"]["message"]
        assert b"sss" not in body
    status, _, body = await raw_request(g.gw.public_port, base.replace(b"Host: gw", b"Host: gw\xe9x") + b"\r\n")
    assert status == 400, body
    assert len(fake.requests) == n  # nothing forwarded
    # refused before the chain runs: no plugin acted on it (a conversation was made for one)
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, headers, body = await raw_request(g.gw.public_port, (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-Name: Jos\xe9\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(chat)) + chat)
    assert status == 400 and not any(k.lower() == "x-conversation-id" for k in headers), headers


async def test_hop_by_hop_stripped_on_the_way_up(make_gateway: Any, fake: Any) -> None:
    g = await gateway_to(make_gateway, fake.url,
                         upstream={"headers": {"Authorization": "Bearer upstream-secret"}})
    port = g.gw.public_port
    req = (b"POST /v1/anything?x=1 HTTP/1.1\r\n"
           b"Host: gw.example:1234\r\n"
           b"Connection: close, X-Req-Private\r\n"
           b"Keep-Alive: timeout=5\r\n"
           b"TE: trailers\r\n"
           b"Trailer: X-Checksum\r\n"
           b"Upgrade: foo/1\r\n"
           b"Proxy-Authorization: Basic Y2xpZW50OnNlY3JldA==\r\n"
           b"Proxy-Connection: keep-alive\r\n"
           b"X-Req-Private: must not go upstream\r\n"
           b"X-End-To-End: kept\r\n"
           b"Authorization: Bearer client-secret\r\n"
           b"X-Forwarded-For: 203.0.113.7\r\n"
           b"Forwarded: for=198.51.100.9\r\n"
           b"X-Real-IP: 198.51.100.9\r\n"
           b"OpenAI-Organization: org-the-clients\r\n"
           b"OpenAI-Project: proj_the_clients\r\n"
           b"Content-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"
           b"5\r\n{\"a\":\r\n"
           b"4\r\n 12}\r\n"
           b"0\r\n\r\n")
    status, headers, body = await raw_request(port, req)
    assert status == 200, body
    got = fake.requests[-1]
    h = got["headers"]
    for name in ("Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Authorization", "Proxy-Connection",
                 "X-Req-Private", "Forwarded", "X-Real-IP",
                 "OpenAI-Organization", "OpenAI-Project"):  # (they pick what the gateway's credential bills)
        assert name not in h, name
    assert "X-Req-Private" not in h.get("Connection", "")
    assert h["X-End-To-End"] == "kept"
    # Credentials are the configured ones, never the client's.
    assert h.getall("Authorization") == ["Bearer upstream-secret"]
    # Framing is recomputed: the body arrived whole, with a correct Content-Length of its own.
    assert got["body"] == b'{"a": 12}'
    assert h["Content-Length"] == str(len(b'{"a": 12}'))
    assert "Transfer-Encoding" not in h
    # Forwarding headers.
    assert h["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Forwarded-Host"] == "gw.example:1234"
    assert h["Host"] == fake.url.split("//")[1]
    assert got["path_qs"] == "/v1/anything?x=1"
    assert "x-request-id" in headers


async def test_hop_by_hop_stripped_on_the_way_down(make_gateway: Any, fake: Any) -> None:
    g = await gateway_to(make_gateway, fake.url)
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/hop") as r:
            assert r.status == 200
            assert await r.json() == {"ok": True}
            h = r.headers
            for name in ("Keep-Alive", "Trailer", "Upgrade", "Proxy-Authenticate", "Proxy-Authorization",
                         "X-Resp-Private"):
                assert name not in h, name
            assert "X-Resp-Private" not in h.get("Connection", "")
            assert h["X-Resp-End-To-End"] == "kept"
            # the backend's software and version are not the client's to learn
            assert h.getall("Server") == ["gateway"] and "X-Powered-By" not in h


async def test_redirect_relayed_not_followed(make_gateway: Any, fake: Any) -> None:
    g = await gateway_to(make_gateway, fake.url)
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/redirect", allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/elsewhere?x=1"
            assert await r.text() == "moved"
    assert [q["path_qs"] for q in fake.requests] == ["/redirect"]


async def test_gzip_relayed_byte_for_byte(make_gateway: Any, fake: Any) -> None:
    g = await gateway_to(make_gateway, fake.url)
    async with aiohttp.ClientSession(timeout=T, auto_decompress=False) as s:
        async with s.get(g.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status == 200
            assert r.headers["Content-Encoding"] == "gzip"
            raw = await r.read()
            assert r.headers["Content-Length"] == str(len(raw))
    assert json.loads(gzip.decompress(raw))["compressed"] is True
    assert fake.requests[-1]["headers"]["Accept-Encoding"] == "gzip"
    # An ordinary client decodes it transparently.
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/gzip") as r:
            assert (await r.json())["compressed"] is True


# -- error paths -------------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_upstream_refused_is_502(make_gateway: Any) -> None:
    g = await gateway_to(make_gateway, f"http://127.0.0.1:{_closed_port()}", [{"name": "t_proxy_recorder"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 502
            assert r.headers["Content-Type"].startswith("application/json")
            assert HEX32.match(r.headers["X-Request-ID"])
            body = await r.json()
    assert_error_shape(body, "upstream_unavailable")
    assert body["error"]["type"] == "upstream_error"
    await wait_for(lambda: ProxyRecorder.seen)
    assert ProxyRecorder.seen[0]["outcome"] == "upstream_error"
    assert ProxyRecorder.seen[0]["status"] == 502


async def test_first_byte_timeout_is_504(make_gateway: Any, caplog: Any) -> None:
    """...and logged (a backend loading a model on first use is slower than the timeout: the
    operator must see which one fired), one line per 10 s with the count."""
    g = await make_gateway([{"name": "t_proxy_recorder"}],
                           upstream={"timeouts": {"connect": 2, "first_byte": 0.3, "idle": 10}})
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    async with aiohttp.ClientSession(timeout=T) as s:
        for _ in range(3):
            async with s.post(g.url + "/v1/chat/completions", json=CHAT, headers={"X-Demo-Head-Delay": "1.5"}) as r:
                assert r.status == 504
                # (the upstream has the request: the SDKs would send it twice more, waiting each time)
                assert r.headers["x-should-retry"] == "false"
                body = await r.json()
    assert_error_shape(body, "upstream_timeout")
    await wait_for(lambda: ProxyRecorder.seen)
    assert ProxyRecorder.seen[0]["outcome"] == "upstream_timeout"
    await g.stop()
    lines = [r.getMessage() for r in caplog.records if "upstream.timeouts.first_byte" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("1 upstream request(s) got no response head within "
                                                   "upstream.timeouts.first_byte (0.3s; the last: request "), lines
    assert lines[1].startswith("2 upstream request(s)") and lines[1].endswith("504 since the last line"), lines


async def test_connect_timeout_is_504(make_gateway: Any) -> None:
    """A listener whose accept queue is full drops new SYNs, so connecting hangs (Linux loopback)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    try:
        # Fill the accept queue; once full, further connects hang in SYN-SENT.
        fillers.extend(open_idle_sockets(port, 8))
        await asyncio.sleep(0.2)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
            pytest.skip("this kernel completes connections to a full accept queue; connect timeout not testable")
        except (TimeoutError, socket.timeout):
            pass
        finally:
            probe.close()
        g = await gateway_to(make_gateway, f"http://127.0.0.1:{port}", [{"name": "t_proxy_recorder"}],
                             timeouts={"connect": 0.3, "first_byte": 10})
        t0 = time.monotonic()
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.get(g.url + "/v1/models") as r:
                assert r.status == 504
                body = await r.json()
        assert time.monotonic() - t0 < 8  # the connect timeout fired, not first_byte
        assert_error_shape(body, "upstream_timeout")
        assert "connect" in body["error"]["message"].lower()
        await wait_for(lambda: ProxyRecorder.seen)
        assert ProxyRecorder.seen[0]["outcome"] == "upstream_timeout"
    finally:
        for c in fillers:
            c.close()
        lsock.close()


async def read_until_cut(r: aiohttp.ClientResponse) -> str:
    """What arrived of a response whose connection the gateway dropped before its end; fails if it
    ended as a complete message instead."""
    got = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in r.content.iter_any():
            got += chunk
    return got.decode()


async def test_upstream_cuts_a_chunked_json_body(make_gateway: Any, fake: Any) -> None:
    """A non-streamed body without Content-Length that the upstream ends early: the client sees the
    connection drop, not truncated JSON framed as a complete response."""
    g = await gateway_to(make_gateway, fake.url, [{"name": "t_proxy_recorder"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/cutjson", json=CHAT) as r:
            assert r.status == 200
            assert (await read_until_cut(r)).startswith('{"id": "x"')
    await wait_for(lambda: ProxyRecorder.seen)
    assert ProxyRecorder.seen[0]["outcome"] == "upstream_disconnected"


async def test_idle_timeout_mid_stream(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "t_proxy_recorder"}],
                           upstream={"timeouts": {"connect": 2, "first_byte": 10, "idle": 0.3}})
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"X-Demo-Delay": "1.5", "X-Demo-Words": "3"}) as r:
            assert r.status == 200
            text = await read_until_cut(r)  # cut: the client must not take it for a whole answer
    # The upstream sends the role frame at once, then pauses far longer than `idle` before the
    # first word: the gateway must give up during that pause, so only the role frame got through.
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e]
    assert [e["choices"][0]["delta"] for e in events[:-1]] == [{"role": "assistant", "content": ""}]
    # then an error event says why the stream stops (before the connection drops)
    assert events[-1]["error"]["code"] == "upstream_timeout" and text.endswith("\n\n")
    await wait_for(lambda: ProxyRecorder.seen)
    assert ProxyRecorder.seen[0]["outcome"] == "upstream_timeout"
    assert ProxyRecorder.seen[0]["status"] == 200


async def test_upstream_dies_mid_stream(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "t_proxy_recorder"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"X-Demo-Die-After": "3", "X-Demo-Words": "10"}) as r:
            assert r.status == 200
            text = await read_until_cut(r)
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e]
    assert 1 <= len(events) - 1 <= 4 and "[DONE]" not in text
    assert all("choices" in e for e in events[:-1])
    assert events[-1]["error"]["code"] == "upstream_disconnected"
    await wait_for(lambda: ProxyRecorder.seen)
    assert ProxyRecorder.seen[0]["outcome"] == "upstream_disconnected"
    assert ProxyRecorder.seen[0]["bytes_out"] == len(text.encode())  # the error event included


async def test_a_sized_stream_cut_short_gets_no_error_event(make_gateway: Any) -> None:
    """A stream relayed with its Content-Length that ends short: no error event (it would fill the
    missing bytes and the body would look whole); the client sees the cut."""
    whole = b"".join(b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}).encode() + b"\n\n"
                     for w in ("Hello", " there", " friend")) + b"data: [DONE]\n\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(whole))
        writer.write(whole[:whole.index(b"\n\n", whole.index(b"there")) + 2])  # the rest never comes
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        g = await make_gateway([{"name": "t_proxy_recorder"}],
                               upstream={"url": f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"})
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status == 200 and r.headers["Content-Length"] == str(len(whole))
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
    finally:
        srv.close()
        await srv.wait_closed()
    await wait_for(lambda: ProxyRecorder.seen)
    assert ProxyRecorder.seen[0]["outcome"] == "upstream_disconnected"


async def test_a_stream_cut_upstream_is_an_api_error_in_the_openai_sdk(make_gateway: Any) -> None:
    """The OpenAI SDK raises the error event a cut stream ends with as an APIError naming the
    cause, after the chunks that came (not a bare transport error)."""
    import openai

    g = await make_gateway(upstream={"timeouts": {"connect": 2, "first_byte": 10, "idle": 0.5}})
    client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="none", max_retries=0, timeout=10)
    try:
        for headers, code in (({"X-Demo-Die-After": "3", "X-Demo-Words": "10"}, "upstream_disconnected"),
                              ({"X-Demo-Delay": "1.5", "X-Demo-Words": "3"}, "upstream_timeout")):
            got = []
            with pytest.raises(openai.APIError) as e:
                stream = await client.chat.completions.create(
                    model="demo-chat", messages=[{"role": "user", "content": "hi"}], stream=True,
                    extra_headers=headers)
                async for chunk in stream:
                    got.append(chunk)
            assert got and e.value.code == code and "incomplete" in e.value.message
    finally:
        await client.close()


async def test_body_too_large_with_content_length(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway([{"name": "t_proxy_recorder"}], server={"max_body_size": 1000})
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/embeddings", data=b"x" * 5000,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413
            body = await r.json()
            assert HEX32.match(r.headers["X-Request-ID"])
            assert body["error"]["message"] == "Request body exceeds the limit of 1000 bytes (server.max_body_size)."
        # at the limit is fine
        async with s.post(g.url + "/v1/echo", data=b"y" * 1000) as r:
            assert r.status == 200
    assert_error_shape(body, "request_too_large")
    assert [q["path"] for q in upstream.requests] == ["/v1/echo"]
    await wait_for(lambda: len(ProxyRecorder.seen) == 2)
    assert ProxyRecorder.seen[0]["status"] == 413 and ProxyRecorder.seen[0]["outcome"] == "error"


async def test_body_too_large_chunked(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway(server={"max_body_size": 1000})

    async def body(n: int) -> Any:
        for _ in range(n):
            yield b"z" * 300
            await asyncio.sleep(0)

    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/embeddings", data=body(10)) as r:
            assert r.status == 413
            err = await r.json()
            assert_error_shape(err, "request_too_large")
            assert err["error"]["message"] == "Request body exceeds the limit of 1000 bytes (server.max_body_size)."
        async with s.post(g.url + "/v1/echo", data=body(3)) as r:  # 900 bytes, chunked, fine
            assert r.status == 200
            assert (await r.json())["body"] == "z" * 900
    assert [q["path"] for q in upstream.requests] == ["/v1/echo"]


class ResponseCounter(Plugin):
    """Counts its on_response calls per request id."""

    name = "t_proxy_response_counter"
    calls: Counter[str] = Counter()

    async def on_response(self, ctx: Any, head: Any) -> None:
        type(self).calls[ctx.request_id] += 1
        head.headers["X-Counted"] = str(type(self).calls[ctx.request_id])


registry.register(ResponseCounter)


async def test_plugin_raising_is_generic_500(make_gateway: Any, upstream: Any, caplog: Any) -> None:
    # Response hooks run in reverse: the counter's runs before the exploder's raises.
    g = await make_gateway([{"name": "t_proxy_recorder"}, {"name": "t_proxy_exploder"},
                            {"name": "t_proxy_response_counter"}])
    caplog.set_level(logging.ERROR, logger="gateway")
    async with aiohttp.ClientSession(timeout=T) as s:
        for where in ("request", "response"):
            async with s.post(g.url + "/v1/chat/completions", json=CHAT, headers={"X-Explode": where}) as r:
                assert r.status == 500
                text = await r.text()
                assert HEX32.match(r.headers["X-Request-ID"])
                assert r.headers["X-Counted"] == {"request": "1", "response": "2"}[where]  # hooks ran on the 500
                # after the upstream answered, a retry would make it do the work again for nothing
                assert r.headers.get("x-should-retry") == {"request": None, "response": "false"}[where]
            assert "secret internal detail" not in text and "Traceback" not in text and "RuntimeError" not in text
            body = json.loads(text)
            assert_error_shape(body, "internal_error")
            assert body["error"]["message"] == "The gateway failed to handle the request."
    # Only the response-hook failure reached the upstream (the request-hook one stopped before).
    assert len(upstream.requests) == 1
    logged = caplog.text
    assert "secret internal detail 42" in logged and "secret internal detail 43" in logged
    assert "t_proxy_exploder" in logged
    await wait_for(lambda: len(ProxyRecorder.seen) == 2)
    assert [s["outcome"] for s in ProxyRecorder.seen] == ["error", "error"]
    # The 500 that replaced the failed upstream response ran the response hooks (it is what the
    # client got), except the one that failed: the counter ran for both responses of that request.
    assert sorted(ResponseCounter.calls.values()) == [1, 2]


async def test_sdk_surfaces_gateway_errors(make_gateway: Any) -> None:
    g = await gateway_to(make_gateway, f"http://127.0.0.1:{_closed_port()}", server={"max_body_size": 2000})
    client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="sk-x", max_retries=0, timeout=20)
    try:
        with pytest.raises(openai.APIStatusError) as ei:
            await client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}])
        assert ei.value.status_code == 502
        assert "The upstream could not be reached." in ei.value.message
        assert ei.value.code == "upstream_unavailable" and ei.value.type == "upstream_error"
        with pytest.raises(openai.APIStatusError) as ei:
            await client.chat.completions.create(model="demo-chat",
                                                 messages=[{"role": "user", "content": "x" * 5000}])
        assert ei.value.status_code == 413
        assert "exceeds the limit of 2000 bytes (server.max_body_size)." in ei.value.message
        with pytest.raises(openai.APIStatusError) as ei:
            stream = await client.chat.completions.create(model="demo-chat", stream=True,
                                                          messages=[{"role": "user", "content": "x"}])
            async for _ in stream:
                pass
        assert ei.value.status_code == 502
    finally:
        await client.close()


async def test_sdk_surfaces_timeout_and_plugin_errors(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "t_proxy_exploder"}],
                           upstream={"timeouts": {"connect": 2, "first_byte": 0.3, "idle": 10}})
    client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="sk-x", max_retries=0, timeout=20)
    try:
        with pytest.raises(openai.APIStatusError) as ei:
            await client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}],
                                                 extra_headers={"X-Demo-Head-Delay": "1.5"})
        assert ei.value.status_code == 504 and ei.value.code == "upstream_timeout"
        with pytest.raises(openai.InternalServerError) as ei2:
            await client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}],
                                                 extra_headers={"X-Explode": "request"})
        assert "The gateway failed to handle the request." in ei2.value.message
    finally:
        await client.close()


async def test_client_disconnect_cancels_upstream(make_gateway: Any, fake: Any) -> None:
    g = await gateway_to(make_gateway, fake.url, [{"name": "t_proxy_recorder"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        r = await s.get(g.url + "/endless")
        assert r.status == 200
        await r.content.readuntil(b"\n\n")
        await r.content.readuntil(b"\n\n")
        r.close()  # drop the connection mid-stream
    async with asyncio.timeout(5):
        await fake.stream_closed.wait()
    assert fake.stream_sent < 100
    await wait_for(lambda: ProxyRecorder.seen)
    assert ProxyRecorder.seen[0]["outcome"] == "client_disconnected"


# -- what is matched is what is forwarded ----------------------------------------------------------------
async def raw_get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    return await raw_request(port, f"GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())


async def test_dot_segments_cannot_escape_paths_or_routes(make_gateway: Any, upstream: Any) -> None:
    """`/v1/embeddings/../models` must not be matched as /v1/embeddings (a route that may turn auth
    off) and then served by the upstream as /v1/models; nor may `/v1/../x` escape server.paths."""
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Chain": "default"}}}],
                           server={"paths": ["/v1"]},
                           routes=[{"path_prefix": "/v1/embeddings", "plugins": {"headers": {"enabled": False}}}])
    port = g.gw.public_port
    for target in ("/v1/../secret", "/v1/%2e%2e/secret", "/v1/embeddings/../models", "/v1/embeddings/%2E%2E/models",
                   "/v1/./models", "/v1/embeddings/.."):
        status, headers, body = await raw_get(port, target)
        assert status == 400, (target, status, body)
        assert_error_shape(json.loads(body), "bad_request")
    assert list(upstream.requests) == []
    # Dots inside a segment are ordinary characters.
    status, _, body = await raw_get(port, "/v1/files/report..v2.txt?x=../y")
    assert status == 200, body
    assert upstream.requests[-1]["path"] == "/v1/files/report..v2.txt?x=../y"


async def test_request_target_forwarded_verbatim(make_gateway: Any, fake: Any) -> None:
    g = await gateway_to(make_gateway, fake.url)
    target = "/v1/x%20y/%7Efoo/a%2Fb?q=a+b&r=%2B&s=%zz&t=caf%C3%A9&empty=&flag"
    status, _, body = await raw_get(g.gw.public_port, target)
    assert status == 200, body
    assert fake.requests[-1]["path_qs"] == target


async def test_compressed_request_body(make_gateway: Any, fake: Any, caplog: Any) -> None:
    """The server decodes a Content-Encoding: gzip request body; the upstream gets it whole and plain,
    and max_body_size bounds the decoded size (a small gzip bomb is refused)."""
    g = await gateway_to(make_gateway, fake.url, server={"max_body_size": 50_000})
    plain = json.dumps({"messages": [{"role": "user", "content": "word " * 2000}]}).encode()
    packed = gzip.compress(plain)
    assert len(packed) < len(plain) // 10
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/echo", data=packed,
                          headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}) as r:
            assert r.status == 200
        got = fake.requests[-1]
        assert got["body"] == plain
        assert "Content-Encoding" not in got["headers"]
        assert got["headers"]["Content-Length"] == str(len(plain))
        bomb = gzip.compress(b"0" * 2_000_000)
        assert len(bomb) < 50_000
        async with s.post(g.url + "/v1/echo", data=bomb, headers={"Content-Encoding": "gzip"}) as r:
            assert r.status == 413
            assert_error_shape(await r.json(), "request_too_large")
        # A transfer coding besides chunked would reach the upstream still applied: 501.
        status, _, body = await raw_request(g.gw.public_port, (
            b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            + f"{len(packed):x}\r\n".encode() + packed + b"\r\n0\r\n\r\n"))
        assert status == 501
        assert_error_shape(json.loads(body), "unsupported_transfer_encoding")
        # An encoding the server does not decode is refused, not forwarded still encoded but unlabelled.
        # (br and zstd too when their packages are missing: aiohttp's parser refuses those itself)
        from gateway.proxy import _DECODED
        missing = [[e] for e in ("br", "zstd") if e not in _DECODED]
        for enc in (["compress"], ["gzip, br"], ["x-custom"], ["gzip", "x-custom"], ["gzip", ""], ["gzip", "gzip"],
                    *missing):
            hdrs = CIMultiDict([("Content-Encoding", e) for e in enc])
            async with s.post(g.url + "/v1/echo", data=packed, headers=hdrs) as r:
                assert r.status == 415, enc
                assert_error_shape(await r.json(), "unsupported_content_encoding")
        # An empty header is no encoding at all.
        async with s.post(g.url + "/v1/echo", data=plain, headers={"Content-Encoding": ""}) as r:
            assert r.status == 200
        # A corrupt gzip body is the client's error: a 400, and one log line without a traceback
        # (aiohttp reads the rest of the body after the answer and fails again).
        caplog.clear()
        with caplog.at_level(logging.INFO):
            async with s.post(g.url + "/v1/echo", data=b"not gzip at all",
                              headers={"Content-Encoding": "gzip"}) as r:
                assert r.status == 400
                assert_error_shape(await r.json(), "bad_request")
            await asyncio.sleep(0.3)
        assert not [r for r in caplog.records if r.exc_info or "Unhandled" in r.getMessage()], caplog.text
    assert len(fake.requests) == 2


async def test_response_edge_cases(make_gateway: Any, fake: Any) -> None:
    g = await gateway_to(make_gateway, fake.url, [{"name": "t_proxy_recorder"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/nocontent") as r:
            assert r.status == 204 and r.headers["X-Empty"] == "yes"
            assert await r.read() == b""
        async with s.get(g.url + "/cookies") as r:
            assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        # A fixed-length body that comes up short must not look complete to the client.
        async with s.get(g.url + "/short") as r:
            assert r.status == 200 and r.headers["Content-Length"] == "1000"
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    await wait_for(lambda: len(ProxyRecorder.seen) == 3)
    assert ProxyRecorder.seen[2]["outcome"] == "upstream_disconnected"


async def test_forwarding_headers_keep_every_hop(make_gateway: Any, fake: Any) -> None:
    """Several X-Forwarded-For lines mean the same as one comma-joined line (RFC 9110 5.3)."""
    g = await gateway_to(make_gateway, fake.url)
    req = (b"GET /v1/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
           b"X-Forwarded-For: 198.51.100.1, 198.51.100.2\r\nX-Forwarded-For: 198.51.100.3\r\n"
           b"Authorization: Bearer client-key\r\n\r\n")
    status, _, _ = await raw_request(g.gw.public_port, req)
    assert status == 200
    h = fake.requests[-1]["headers"]
    assert h.getall("X-Forwarded-For") == ["198.51.100.1, 198.51.100.2, 198.51.100.3, 127.0.0.1"]
    assert "Authorization" not in h  # no upstream.headers configured: the client's is still never sent


async def test_no_warning_per_connection(make_gateway: Any, caplog: Any) -> None:
    """The public listener is built with handler settings aiohttp accepts (no per-connection fallback
    that would also drop them)."""
    caplog.set_level(logging.WARNING)
    g = await make_gateway()
    for _ in range(3):
        async with aiohttp.ClientSession(timeout=T) as s:  # a new connection each time
            async with s.get(g.url + "/v1/models") as r:
                assert r.status == 200
    assert "Failed to create request handler" not in caplog.text


async def test_plugin_raising_mid_stream(make_gateway: Any, caplog: Any) -> None:
    """After the head is sent an error cannot be a 500 any more: the client sees the stream break
    (never a clean end that would pass for a complete answer), and the details are only logged."""
    g = await make_gateway([{"name": "t_proxy_recorder"}, {"name": "t_proxy_exploder"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"X-Explode": "chunk", "X-Demo-Words": "3", "X-Demo-Delay": "0.05"}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    await wait_for(lambda: ProxyRecorder.seen)
    assert ProxyRecorder.seen[0]["outcome"] == "error"
    assert "secret internal detail 44" in caplog.text


class WithMiddleware(Plugin):
    """A plugin contributing an aiohttp middleware, which puts the public listener on an Application."""

    name = "t_proxy_middleware"

    def middlewares(self) -> list[Any]:
        @web.middleware
        async def mw(request: web.Request, handler: Any) -> web.StreamResponse:
            resp = await handler(request)
            return resp

        return [mw]


registry.register(WithMiddleware)


@pytest.mark.parametrize("plugins", [[], [{"name": "t_proxy_middleware"}]], ids=["server", "application"])
async def test_expect_100_continue(make_gateway: Any, upstream: Any, plugins: Any) -> None:
    """A client that asks before sending its body (curl does for large ones) gets 100 Continue once,
    and only after the size check: an oversized body is refused without being sent."""
    g = await make_gateway(plugins, server={"max_body_size": 1000})
    body = b'{"model": "demo-embed", "input": "a b c"}'
    rest = await after_continue(g.gw.public_port, b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                                b"Expect: 100-continue\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\n\r\n" % len(body), body)
    assert rest.startswith(b"HTTP/1.1 200 ") and b"100 Continue" not in rest
    assert upstream.requests[-1]["body"]["input"] == "a b c"
    r, w = await asyncio.open_connection("127.0.0.1", g.gw.public_port)
    try:
        w.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5000\r\n\r\n")
        await w.drain()
        async with asyncio.timeout(5):
            head = await r.readuntil(b"\r\n\r\n")
    finally:
        w.close()
    assert head.startswith(b"HTTP/1.1 413 ")


async def test_short_fixed_length_body_with_chunk_plugin(make_gateway: Any, fake: Any) -> None:
    """With an on_chunk plugin the body is re-framed (chunked), but a truncated upstream body must
    still not end cleanly."""
    g = await gateway_to(make_gateway, fake.url, [{"name": "t_proxy_recorder"}, {"name": "t_proxy_exploder"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/short") as r:
            assert r.status == 200 and "Content-Length" not in r.headers
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    await wait_for(lambda: ProxyRecorder.seen)
    assert ProxyRecorder.seen[0]["outcome"] == "upstream_disconnected"


async def test_no_invented_content_type(make_gateway: Any, fake: Any) -> None:
    """The upstream gets the client's Content-Type, or none if the client sent none."""
    g = await gateway_to(make_gateway, fake.url)
    port = g.gw.public_port
    for body in (b"", b"raw"):
        req = (b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
               % (len(body), body))
        status, _, _ = await raw_request(port, req)
        assert status == 200
        h = fake.requests[-1]["headers"]
        assert "Content-Type" not in h, h
        assert h["Content-Length"] == str(len(body)) and fake.requests[-1]["body"] == body
    req = (b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Type: text/x-mine\r\n"
           b"Content-Length: 3\r\n\r\nabc")
    await raw_request(port, req)
    assert fake.requests[-1]["headers"].getall("Content-Type") == ["text/x-mine"]


async def test_upstream_connections_are_pooled(make_gateway: Any, fake: Any) -> None:
    g = await gateway_to(make_gateway, fake.url)
    async with aiohttp.ClientSession(timeout=T) as s:
        for i in range(5):
            async with s.post(g.url + f"/v1/x?i={i}", json={"i": i}) as r:
                assert r.status == 200
    # one upstream connection, kept alive and reused (clients' connections are not passed through)
    assert len({q["peer"] for q in fake.requests}) == 1


SECRET = b"gw_SeCrEtKeyMaterial0123456789abcdef"


async def test_a_flood_of_malformed_requests_logs_one_line_with_the_count(make_gateway: Any, caplog: Any,
                                                                           monkeypatch: Any) -> None:
    """Anyone can send malformed requests by the thousand: one line for the first, the rest
    counted into the next (here, at the stop), not a line each."""
    from gateway import app

    monkeypatch.setattr(app, "_REFUSED_LOG", ThrottledLog(app.log, level=logging.INFO))
    g = await make_gateway([])
    caplog.set_level(logging.INFO, logger="gateway")
    for _ in range(40):
        resp = await raw_exchange(g.gw.public_port, b"GARBAGE\r\n\r\n")
        assert b" 400 " in resp.split(b"\r\n", 1)[0]
    await g.stop()
    lines = [r.getMessage() for r in caplog.records if "refused by the HTTP parser" in r.getMessage()]
    assert len(lines) == 2, lines  # (the parser's error type, BadHttpMethod or BadHttpMessage, by version)
    assert re.fullmatch(r"1 request\(s\) refused by the HTTP parser: 400 \w+ \(the last from 127\.0\.0\.1\)",
                        lines[0]), lines
    assert re.fullmatch(r"39 request\(s\) refused by the HTTP parser: 400 \w+ \(the last from 127\.0\.0\.1\) "
                        r"since the last line", lines[1]), lines


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + SECRET + b"\x01\r\n\r\n",
], ids=["request-line", "header-too-long", "chunk-size", "bad-char-in-authorization"])
@pytest.mark.parametrize("listener", ["public", "admin"])
async def test_http_the_parser_rejects_gets_the_json_error_shape(make_gateway: Any, raw: bytes, listener: str,
                                                                 caplog: Any, monkeypatch: Any) -> None:
    """Requests aiohttp's HTTP parser rejects never reach the handler; on both listeners they still
    get the one JSON error shape (not aiohttp's plain text), without echoing what was sent, and the
    log says what happened without quoting it (the parser's message can hold a key or a token)."""
    from gateway import app

    monkeypatch.setattr(app, "_REFUSED_LOG", ThrottledLog(app.log, level=logging.INFO))  # (not held back)
    g = await make_gateway([])
    caplog.set_level(logging.DEBUG)
    resp = await raw_exchange(g.gw.public_port if listener == "public" else g.gw.admin_port, raw)
    head, _, body = resp.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 400 ", head), head  # HTTP/1.0 when the request line is garbage
    assert b"application/json" in head
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "malformed_request"
    assert b"aaaa" not in body and b"GARBAGE" not in body and SECRET not in body
    assert "1 request(s) refused by the HTTP parser: 400 " in caplog.text
    assert SECRET.decode() not in caplog.text and "Traceback" not in caplog.text


async def test_rewritten_body_keeps_big_integers_exact(make_gateway: Any, upstream: Any) -> None:
    """When the gateway rewrites a body (here: asking a stream for usage), numbers the client sent
    reach the upstream exactly, integers beyond 64 bits included."""
    g = await make_gateway([{"name": "metrics"}])
    big = 18446744073709551616  # 2**64
    body = ('{"model": "demo-chat", "stream": true, "seed": %d, "metadata": {"n": -9223372036854775809, '
            '"f": 1.5e300}, "messages": [{"role": "user", "content": "hi"}]}' % big)
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", data=body,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            await r.read()
    sent = upstream.requests[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["seed"] == big and type(sent["seed"]) is int
    assert sent["metadata"] == {"n": -9223372036854775809, "f": 1.5e300}


async def test_slow_clients_are_cut_off(make_gateway: Any) -> None:
    """A body that stops arriving gets 408 after server.body_timeout of silence (a slow but steady
    one is fine); a connection that sends nothing, or only part of a request head, is closed after
    server.keepalive_timeout."""
    g = await make_gateway([], server={"body_timeout": 1.5, "keepalive_timeout": 1.0})
    port = g.gw.public_port

    async def exchange(parts: list[bytes], pause: float) -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            for p in parts:
                w.write(p)
                await w.drain()
                await asyncio.sleep(pause)
            async with asyncio.timeout(10):
                return await r.read()
        finally:
            w.close()

    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    body = b'{"model": "e", "input": "0123456789ab"}'.ljust(40)
    stalled = await exchange([head, body[:10]], 0)
    assert stalled.startswith(b"HTTP/1.1 408 "), stalled[:80]
    assert json.loads(stalled.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    # 8 pieces 0.3 s apart: 2.4 s in all, never 1.5 s of silence
    steady = await exchange([head] + [body[i:i + 5] + (b"" if i + 5 < 40 else b"") for i in range(0, 40, 5)], 0.3)
    assert steady.startswith(b"HTTP/1.1 200 "), steady[:80]
    assert await exchange([], 0) == b""  # nothing sent: closed (within the 10 s read bound), no response
    assert await exchange([b"GET /v1/models HTTP/1.1\r\nHo"], 0) == b""  # half a head: the same


async def test_upstream_switching_protocols_is_a_502(make_gateway: Any) -> None:
    """The gateway relays HTTP: an upstream answering 101 gets the client a 502, not a 101 that
    lacks its Upgrade header and leads nowhere."""
    async def switch(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo/1\r\nConnection: Upgrade\r\n\r\n")
        await w.drain()
        await asyncio.sleep(1)
        w.close()

    server = await asyncio.start_server(switch, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        g = await gateway_to(make_gateway, f"http://127.0.0.1:{port}", [{"name": "t_proxy_recorder"}])
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.get(g.url + "/v1/models") as r:
                assert r.status == 502
                assert_error_shape(await r.json(), "upstream_unavailable")
        await wait_for(lambda: ProxyRecorder.seen)
        assert ProxyRecorder.seen[0]["outcome"] == "upstream_error"
    finally:
        server.close()


async def test_http10_with_transfer_encoding_closes_the_connection(make_gateway: Any, fake: Any) -> None:
    """An HTTP/1.0 request with Transfer-Encoding has faulty framing (RFC 9112 6.1): answered, then
    the connection is closed, whatever keep-alive it asked for."""
    g = await gateway_to(make_gateway, fake.url)
    raw = await raw_exchange(g.gw.public_port, b"POST /v1/echo HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", timeout=5)
    head = raw.partition(b"\r\n\r\n")[0].lower()  # (raw_exchange returned: the server closed it)
    assert head.startswith(b"http/1.") and b"keep-alive" not in head


async def test_the_openai_sdk_lists_and_retrieves_the_demo_models(make_gateway: Any) -> None:
    """The demo backend answers `models.retrieve` as the API does (the gateway relays it): the model,
    or a 404 model_not_found."""
    g = await make_gateway()
    client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="none", max_retries=0, timeout=10)
    try:
        assert [m.id async for m in client.models.list()] == ["demo-chat", "demo-embed"]
        m = await client.models.retrieve("demo-chat")
        assert (m.id, m.object, m.owned_by) == ("demo-chat", "model", "demo")
        with pytest.raises(openai.NotFoundError) as e:
            await client.models.retrieve("no-such-model")
        assert e.value.code == "model_not_found"
    finally:
        await client.close()


async def test_a_path_missing_its_v1_is_told_where_the_api_is(make_gateway: Any) -> None:
    """An SDK given base_url http://host:port (no /v1) asks for /models: the 404 says why."""
    import openai

    g = await make_gateway([], server={"paths": ["/v1"]})
    client = openai.AsyncOpenAI(base_url=g.url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as ei:
        await client.models.list()
    assert "No route for /models. The OpenAI API is under /v1: a client's base URL ends in /v1" in str(ei.value)
    g2 = await make_gateway([], server={"paths": ["/api"]}, name="api.yaml")
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g2.url + "/models") as r:  # (/v1/models is not proxied there: no hint)
            body = await r.json()
    assert r.status == 404 and body["error"]["message"] == "No route for /models."
    await client.close()
