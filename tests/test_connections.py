"""Connection-level abuse that needs no API key: connections held open until the process runs out
of file descriptors, pipelined requests whose answers are never read, and a refused chunked upload
that keeps coming."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import aiohttp

from .helpers import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def metric(g: Any, name: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(g.admin_url + "/metrics", headers=AUTH) as r:
            text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def read_answer(port: int) -> bytes:
    """Connect and send a request without yielding to the event loop (so the request is there
    before the gateway, on this loop, accepts the connection), then read to the close."""
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    c.settimeout(10)

    def read_all() -> bytes:
        out = b""
        try:
            while chunk := c.recv(65536):
                out += chunk
        except ConnectionResetError:
            out += b"<reset>"
        return out

    try:
        return await asyncio.to_thread(read_all)
    finally:
        c.close()


async def test_connections_over_the_cap_get_a_503_and_the_rest_of_the_process_keeps_working(make_gateway: Any) -> None:
    g = await make_gateway([], server={"max_connections": 5})
    port = g.gw.public_port
    idle = []
    try:
        for _ in range(5):  # idle connections, as a client that opens and never sends
            idle.append(await asyncio.open_connection("127.0.0.1", port))
        deadline = time.monotonic() + 10
        while await metric(g, "gateway_connections_open") < 5:  # (accepted by the loop in its time)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await metric(g, "gateway_connections_open") == 5
        for _ in range(10):  # (each sends its request at once: the answer must not be lost to a reset)
            answer = await read_answer(port)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer[:200]
            assert b"Retry-After: 1" in head and b"Connection: close" in head
            assert json.loads(body)["error"]["code"] == "too_many_connections"
        # the admin listener, and so the probes, are not under the public cap
        async with aiohttp.ClientSession() as s:
            async with s.get(g.admin_url + "/readyz") as r:
                assert r.status == 200
        assert await metric(g, "gateway_connections_refused_total") == 10
        # one goes: there is room again
        _, w = idle.pop()
        w.close()
        deadline = time.monotonic() + 10
        while await metric(g, "gateway_connections_open") > 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (await read_answer(port)).startswith(b"HTTP/1.1 200")
    finally:
        for _, w in idle:
            w.close()


async def test_the_default_cap_leaves_descriptors_for_the_rest_of_the_process(make_gateway: Any) -> None:
    import resource

    from gateway.app import FD_RESERVE, LISTEN_BACKLOG
    g = await make_gateway([], upstream={"max_connections": 100})
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert g.gw.connection_cap() == max(64, soft - 100 - FD_RESERVE - LISTEN_BACKLOG)


async def test_pipelined_answers_never_read_are_cut_at_send_timeout(make_gateway: Any) -> None:
    """20,000 pipelined requests refused by key_auth, none of their answers read: the gateway's own
    answers wait at most send_timeout too, then the connection is cut (it held megabytes of socket
    buffers and a descriptor for as long as the client liked)."""
    g = await make_gateway([{"name": "key_auth"}], server={"send_timeout": 1})
    port = g.gw.public_port
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(("127.0.0.1", port))
    c.settimeout(20)
    one = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"
    sender = threading.Thread(target=lambda: _send_quietly(c, one * 20000), daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 60
        seen_open = False
        while time.monotonic() < deadline:
            n = await metric(g, "gateway_connections_open")
            seen_open = seen_open or n == 1
            if seen_open and n == 0:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the connection that reads nothing is still open")
    finally:
        c.close()
        sender.join(20)


def _send_quietly(c: socket.socket, data: bytes) -> None:
    try:
        c.sendall(data)
    except OSError:
        pass  # (cut by the gateway: what the test waits for)


async def test_a_refused_chunked_upload_is_not_parsed_after_the_answer(make_gateway: Any, monkeypatch: Any) -> None:
    """A chunked upload refused before its body was read (no key): what it still sends after the
    answer is dropped unparsed (aiohttp would otherwise parse it for its 10 s of lingering, and
    one-byte chunks cost the parser ten times the CPU of their bytes)."""
    from aiohttp import web_protocol

    parsed = [0]
    real = web_protocol.RequestHandler.data_received

    def counting(self: Any, data: bytes) -> None:
        if not (self._force_close or self._close):  # (what aiohttp hands its parser)
            parsed[0] += len(data)
        real(self, data)

    monkeypatch.setattr(web_protocol.RequestHandler, "data_received", counting)
    g = await make_gateway([{"name": "key_auth"}])
    r, w = await asyncio.open_connection("127.0.0.1", g.gw.public_port)
    try:
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
        await w.drain()
        async with asyncio.timeout(10):
            head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401") and b"Connection: close" in head
        before = parsed[0]
        rest = b"1\r\n \r\n" * 20000
        w.write(rest)
        await w.drain()
        await asyncio.sleep(1)
        assert parsed[0] - before < len(rest) // 10, (parsed[0] - before, len(rest))
    finally:
        w.close()


async def test_a_burst_of_connections_does_not_pass_the_cap(make_gateway: Any) -> None:
    """asyncio builds the handlers of a burst of connections before any is registered: counting the
    registered ones only let a burst of 50 past a cap of 3."""
    g = await make_gateway([], server={"max_connections": 3})
    socks = [socket.create_connection(("127.0.0.1", g.gw.public_port)) for _ in range(50)]  # (no yield: a burst)
    try:
        deadline = time.monotonic() + 15
        while await metric(g, "gateway_connections_refused_total") < 47:
            assert time.monotonic() < deadline, await metric(g, "gateway_connections_refused_total")
            await asyncio.sleep(0.05)
        assert await metric(g, "gateway_connections_open") == 3
        assert await metric(g, "gateway_connections_refused_total") == 47
    finally:
        for c in socks:
            c.close()
