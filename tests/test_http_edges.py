"""HTTP/1 edges at the public listener, over raw sockets: connections that must close after the
answer (or the next request on them is lost or glued to this one), request lines of another HTTP
version, and upstream responses that HTTP cannot carry on as they are."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator

import pytest

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


@contextlib.asynccontextmanager
async def raw_backend() -> AsyncIterator[str]:
    """An upstream that writes crafted bytes: /ctl answers with a control character in a header and
    in its reason phrase (and a header that is not UTF-8), /badline with a status line that is not HTTP (quoting the answer), any
    other path a stream without a length (read to the close)."""
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            n = next((int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")), 0)
            await r.readexactly(n)
            path = head.split(b" ")[1]
            if path.endswith(b"/ctl"):
                body = b'{"ok": true}'
                w.write(b"HTTP/1.1 200 O\x01K\r\nX-A: a\x01b\r\nX-B: fine\r\nX-C: Jos\xe9\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            elif path.endswith(b"/drop"):
                return  # read, then closed without a word
            elif path.endswith(b"/badline"):
                w.write(b"HTTP/1.1 2x0 SECRET-ANSWER-TEXT\r\nContent-Length: 2\r\n\r\nok")
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                        b'data: {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]}\n\n'
                        b"data: [DONE]\n\n")
            await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send ``data`` and read until the gateway closes the connection (or ``timeout``: then the
    bytes so far, with b"<open>" appended)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await r.read(65536):
                out += chunk
    except TimeoutError:
        out += b"<open>"
    w.close()
    return out


def post(path: str, body: bytes, version: str = "1.1", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nHost: gw\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


@pytest.fixture
async def gw(make_gateway: Any) -> AsyncIterator[Any]:
    async with raw_backend() as url:
        # a long keep-alive: a connection left open would still be open when the test reads it
        yield await make_gateway([], upstream={"url": url}, server={"keepalive_timeout": 120, "max_body_size": 1000})


async def test_an_http10_client_gets_the_close_that_ends_a_body_without_length(gw: Any) -> None:
    out = await exchange(gw.gw.public_port, post("/v1/chat/completions", STREAM, "1.0", "Connection: keep-alive\r\n"))
    assert not out.endswith(b"<open>") and out.endswith(b"data: [DONE]\n\n")
    assert b"Content-Length" not in out.split(b"\r\n\r\n")[0]


async def test_a_413_before_an_expected_body_closes_the_connection(gw: Any) -> None:
    """The client waits for 100 Continue and never sends its body; a request it sends next on the
    connection would be read as that body. The answer says Connection: close and the gateway closes."""
    big = post("/v1/chat/completions", b"", extra="Expect: 100-continue\r\n").replace(b"Content-Length: 0", b"Content-Length: 5000")
    out = await exchange(gw.gw.public_port, big)
    head = out.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 413") and b"connection: close" in head and not out.endswith(b"<open>")


async def test_a_request_asking_for_an_upgrade_is_answered_and_the_connection_closed(gw: Any) -> None:
    req = post("/v1/chat/completions", STREAM, extra="Connection: Upgrade\r\nUpgrade: websocket\r\n")
    out = await exchange(gw.gw.public_port, req + post("/v1/chat/completions", STREAM))
    assert out.count(b"HTTP/1.1 200") == 1 and b"connection: close" in out.split(b"\r\n\r\n")[0].lower()
    assert not out.endswith(b"<open>")


async def test_an_upgrade_offer_without_a_body_is_answered_and_closed_too(gw: Any) -> None:
    """curl's h2c offer on a GET: declined (an HTTP/1.1 answer) and closed, so the client sends its
    next request on a new connection (behind the offer it would never be answered)."""
    req = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n" \
          b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
    out = await exchange(gw.gw.public_port, req * 2)
    assert out.count(b"HTTP/1.1 200") == 1 and b"connection: close" in out.split(b"\r\n\r\n")[0].lower()
    assert not out.endswith(b"<open>")


async def test_a_request_line_of_another_http_version_gets_505(gw: Any) -> None:
    out = await exchange(gw.gw.public_port, post("/v1/chat/completions", CHAT, "2.0"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert b" 505 " in head.split(b"\r\n")[0]
    assert json.loads(body)["error"]["code"] == "http_version_not_supported"


async def test_an_upstream_header_http_cannot_carry_is_dropped_not_a_500(gw: Any, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING):
        out = await exchange(gw.gw.public_port, post("/v1/ctl", CHAT, extra="Connection: close\r\n"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"X-B: fine" in head and b"X-A" not in head and b"\x01" not in head
    assert b"X-C" not in head  # (not UTF-8: the writer would have sent "Jos")
    assert body == b'{"ok": true}'
    assert not [r for r in caplog.records if r.exc_info]


async def test_an_unreadable_upstream_answer_is_not_quoted_in_the_log(gw: Any, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING):
        out = await exchange(gw.gw.public_port, post("/v1/badline", CHAT, extra="Connection: close\r\n"))
    assert out.startswith(b"HTTP/1.1 502 ")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "upstream request(s) failed" in logged and "SECRET-ANSWER-TEXT" not in logged



async def test_a_stop_closes_idle_keepalive_connections_at_once(make_gateway: Any) -> None:
    """SIGTERM's drain: a connection with no request in flight is closed straight away, so a client
    that sends its next request on it sees the close (and retries elsewhere) instead of waiting
    out the drain unanswered. The stream in flight still finishes."""
    import aiohttp

    g = await make_gateway([], server={"shutdown_timeout": 20})
    r, w = await asyncio.open_connection("127.0.0.1", g.gw.public_port)
    w.write(post("/v1/chat/completions", CHAT))
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    n = int(next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")).split(b":")[1])
    await r.readexactly(n)  # an idle keep-alive connection now

    async def stream() -> bytes:
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions", data=STREAM,
                              headers={"Content-Type": "application/json", "X-Demo-Delay": "0.1",
                                       "X-Demo-Words": "30"}) as resp:
                return await resp.read()

    streaming = asyncio.create_task(stream())
    await asyncio.sleep(0.5)
    stopping = asyncio.create_task(g.gw.stop())
    await asyncio.sleep(0.3)
    w.write(post("/v1/chat/completions", CHAT))
    with contextlib.suppress(ConnectionError):
        await w.drain()
    async with asyncio.timeout(10):
        rest = await r.read()
    assert rest == b"" and not streaming.done(), "the idle connection was held for the drain"
    assert (await streaming).endswith(b"data: [DONE]\n\n")
    await stopping


async def test_a_request_read_as_the_stop_begins_is_answered_not_dropped(make_gateway: Any, monkeypatch: Any) -> None:
    """A request whose bytes arrive in the same loop turn as the stop's idle-close step has been read
    by the server but not dispatched yet: its connection is not idle, and it is answered."""
    import socket
    import threading

    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

    g = await make_gateway([], server={"shutdown_timeout": 10})
    sock = socket.create_connection(("127.0.0.1", g.gw.public_port))

    def read_one() -> bytes:
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = sock.recv(65536)
            if not d:
                return buf
            buf += d
        head, _, rest = buf.partition(b"\r\n\r\n")
        n = int(next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")).split(b":")[1])
        while len(rest) < n:
            rest += sock.recv(65536)
        return head

    sock.sendall(post("/v1/chat/completions", CHAT))
    assert (await asyncio.to_thread(read_one)).startswith(b"HTTP/1.1 200")  # now an idle keep-alive connection
    result: dict[str, bytes] = {}
    go = threading.Event()

    def client() -> None:
        go.wait(10)
        sock.sendall(post("/v1/chat/completions", CHAT))
        sock.settimeout(15)
        result["answer"] = sock.recv(65536)

    th = threading.Thread(target=client)
    th.start()
    arrived = asyncio.get_running_loop().create_future()
    original_received = RequestHandler.data_received

    def data_received(self: Any, data: bytes) -> None:
        if not arrived.done():
            arrived.set_result(None)  # the stop's next step runs in this same loop turn
        original_received(self, data)  # the server reads the request (and wakes its task)

    monkeypatch.setattr(RequestHandler, "data_received", data_received)
    original_stop = web.TCPSite.stop

    async def stop_then_wait(self: Any) -> None:
        await original_stop(self)
        go.set()
        await arrived

    monkeypatch.setattr(web.TCPSite, "stop", stop_then_wait)
    await g.gw.stop()
    await asyncio.to_thread(th.join)
    sock.close()
    assert result["answer"].startswith(b"HTTP/1.1 200"), result


async def test_the_demo_backend_takes_a_cancelled_stream_quietly(caplog: Any) -> None:
    """A client cancelling a stream is normal: `gateway demo` logs no error traceback for it."""
    import aiohttp

    from gateway.demo import start_demo_upstream

    runner, port = await start_demo_upstream()
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(2):
                async with aiohttp.ClientSession() as s:
                    r = await s.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=STREAM,
                                     headers={"X-Demo-Delay": "0.05", "X-Demo-Words": "40",
                                              "Content-Type": "application/json"})
                    await r.content.readuntil(b"\n\n")
                    r.close()
            await asyncio.sleep(1.0)  # the backend's next writes meet the closed connection
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_client_that_reads_nothing_is_cut_and_frees_its_upstream_connection(make_gateway: Any) -> None:
    """A client that asks for a large answer and reads none of it held its upstream connection for
    as long as it liked (the relay waits on the client): a few such clients took the whole pool
    and every other request got 504. Now it is cut after server.send_timeout, and while the pool is
    full the 504 says so (not "timed out connecting")."""
    import aiohttp
    from aiohttp import web

    from .helpers import serve_handler

    async def big(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/small"):
            return web.json_response({"ok": True})
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(request)
        event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 16000 + b'"}}]}\n\n'
        with contextlib.suppress(ConnectionError):
            for _ in range(6000):  # ~96 MB: more than any socket buffers hold
                await r.write(event)
        return r

    runner, url = await serve_handler(big)
    try:
        g = await make_gateway([], server={"send_timeout": 2},
                               upstream={"url": url, "max_connections": 1,
                                         "timeouts": {"connect": 0.5, "first_byte": 10, "idle": 30}})
        host, gport = g.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(gport))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT))
        await writer.drain()
        await asyncio.sleep(0.5)  # (its answer fills the socket buffers; it reads none of it)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            async with s.get(g.url + "/v1/small") as r:
                assert r.status == 504
                assert "all in use" in (await r.json())["error"]["message"]
            await asyncio.sleep(3)  # send_timeout passes: the stalled client is cut
            async with s.get(g.url + "/v1/small") as r:
                assert r.status == 200 and await r.json() == {"ok": True}
        with contextlib.suppress(ConnectionError):  # its connection was closed (read to the end)
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await runner.cleanup()


async def test_the_demo_backend_answers_malformed_tools_with_a_json_400() -> None:
    """`gateway demo` stands in for a real backend: a malformed `tools` is the caller's error (a
    JSON 400), not a plain-text 500 with a traceback in its log."""
    import aiohttp

    from gateway.demo import start_demo_upstream

    runner, port = await start_demo_upstream()
    try:
        async with aiohttp.ClientSession() as s:
            for tools in (True, "x", [1], [{"function": "f"}]):
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                  json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}],
                                        "tools": tools}) as r:
                    assert r.status == 400, (tools, await r.text())
                    assert "tools" in (await r.json())["error"]["message"]
    finally:
        await runner.cleanup()


async def test_an_upstream_url_with_a_query_keeps_it_on_every_request(make_gateway: Any) -> None:
    """``upstream.url: http://host/api/openai?api-version=2024-02-01`` (a deployment that wants a
    version parameter): each request's path goes before the query and the query on every request,
    replacing a client's parameter of the same name; the readiness probe gets it too. (The URL
    was glued to the request path: `...?api-version=2024-02-01/v1/chat/completions`.)"""
    import aiohttp
    from aiohttp import web

    from .helpers import serve_handler

    seen: list[tuple[str, list[tuple[str, str]]]] = []

    async def backend(request: web.Request) -> web.Response:
        seen.append((request.path, list(request.query.items())))
        return web.json_response({"ok": True})

    runner, url = await serve_handler(backend)
    try:
        g = await make_gateway([], upstream={"url": url + "/api/openai/?api-version=2024-02-01#frag",
                                             "health_path": "/health"})
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.post(g.url + "/v1/chat/completions", data=CHAT) as r:
                assert r.status == 200
            async with s.get(g.url + "/v1/models?limit=5&api-version=old") as r:
                assert r.status == 200
            async with s.get(g.admin_url + "/readyz") as r:
                assert r.status == 200
        assert seen[0] == ("/api/openai/v1/chat/completions", [("api-version", "2024-02-01")])
        assert seen[1] == ("/api/openai/v1/models", [("limit", "5"), ("api-version", "2024-02-01")])
        assert ("/api/openai/health", [("api-version", "2024-02-01")]) in seen[2:]
    finally:
        await runner.cleanup()


async def test_a_redirect_into_the_upstream_points_at_the_gateway(make_gateway: Any) -> None:
    """Redirects are relayed, not followed; one into the upstream (its own URL with the prefix of
    upstream.url, or an absolute path under that prefix) is rewritten to the same path on the
    gateway, so the client neither learns the internal address nor leaves the gateway; one
    elsewhere is relayed as it is."""
    import aiohttp
    from aiohttp import web

    from .helpers import serve_handler

    where: dict[str, str] = {}

    async def backend(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": where[request.path.rsplit("/", 1)[-1]]})

    runner, url = await serve_handler(backend)
    try:
        where.update({"abs": url + "/api/openai/v1/files/f1?x=1", "path": "/api/openai/v1/files/f2",
                      "other": "https://files.example.com/f3"})
        g = await make_gateway([], upstream={"url": url + "/api/openai"})
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            got = {}
            for name in where:
                async with s.get(g.url + f"/v1/files/{name}", allow_redirects=False) as r:
                    assert r.status == 307
                    got[name] = r.headers["Location"]
        assert got == {"abs": "/v1/files/f1?x=1", "path": "/v1/files/f2", "other": "https://files.example.com/f3"}
    finally:
        await runner.cleanup()


async def test_a_head_over_32_kib_in_all_gets_431_and_is_not_forwarded(make_gateway: Any, upstream: Any) -> None:
    """The parser takes 128 header lines of 8 KiB each (a 1 MB head); past 32 KiB in all the
    gateway answers 431 in the one error shape instead of forwarding it (most upstreams refuse such
    a head with something less clear, after every plugin ran)."""
    g = await make_gateway([])
    before = len(upstream.requests)
    big = "".join(f"X-Big-{i}: {'v' * 8000}\r\n" for i in range(5))
    out = await exchange(g.gw.public_port, post("/v1/chat/completions", CHAT, extra=big + "Connection: close\r\n"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), out[:200]
    assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
    assert len(upstream.requests) == before
    fits = "".join(f"X-Big-{i}: {'v' * 8000}\r\n" for i in range(3))
    out = await exchange(g.gw.public_port, post("/v1/chat/completions", CHAT, extra=fits + "Connection: close\r\n"))
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert len(upstream.requests[-1]["headers"]["X-Big-2"]) == 8000


async def test_an_upstream_that_drops_the_request_is_a_502_saying_so(gw: Any) -> None:
    """Reached, then the connection closed before an answer: not "could not be reached", which
    would send people to debug the network."""
    out = await exchange(gw.gw.public_port, post("/v1/drop", CHAT, extra="Connection: close\r\n"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502"), out[:200]
    err = json.loads(body)["error"]
    assert err["code"] == "upstream_unavailable" and err["message"] == "The upstream closed the connection before answering."
