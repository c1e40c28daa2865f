"""Shutdown as a load balancer sees it: server.drain_delay keeps serving (with Connection: close)
while /readyz already fails; the writers' final flushes share one deadline; a request still
waiting for its answer when the drain time runs out gets a 503 instead of a dropped connection;
what is still running is cut when shutdown_timeout is up, not half a second later."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .helpers import (ADMIN_TOKEN, GatewayProcess, base_config, free_port, port_refuses, stream_then_stop,
                      until, write_config)

T = aiohttp.ClientTimeout(total=30)
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


async def _status(s: aiohttp.ClientSession, url: str) -> int:
    async with s.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        await r.read()
        return r.status


async def _not_ready(s: aiohttp.ClientSession, admin_url: str) -> bool:
    return await _status(s, admin_url + "/readyz") == 503


def _serve(tmp_path: Path, upstream: Any, **server: Any) -> GatewayProcess:
    port, admin_port = free_port(), free_port()
    cfg = base_config(upstream.url, tmp_path, [], server={"port": port, **server}, admin={"port": admin_port})
    return GatewayProcess(write_config(tmp_path / "gateway.yaml", cfg), port, admin_port).start()


async def test_drain_delay_fails_readyz_but_keeps_serving_with_connection_close(tmp_path: Path,
                                                                                upstream: Any) -> None:
    """SIGTERM with server.drain_delay: /readyz fails at once, while the public port still answers,
    on a pooled keep-alive connection as on a new one, each response closing its connection; only
    after the delay does the listener close, and the process exits cleanly."""
    proc = _serve(tmp_path, upstream, drain_delay=3, shutdown_timeout=5)
    try:
        await proc.wait_ready()
        async with aiohttp.ClientSession(timeout=T) as s:  # pools its connections (keep-alive)
            async with s.post(proc.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200 and "close" not in r.headers.get("Connection", "").lower()
                await r.read()
            assert await _status(s, proc.admin_url + "/readyz") == 200
            proc.signal(signal.SIGTERM)
            await until(lambda: _not_ready(s, proc.admin_url), what="/readyz to fail")
            for _ in range(2):  # the pooled connection, then a new one
                async with s.post(proc.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200
                    assert r.headers.get("Connection", "").lower() == "close"
                    assert "choices" in await r.json()
        await until(lambda: port_refuses(proc.port), what="the listener to close after the delay")
        assert await asyncio.to_thread(proc.wait, 20) == 0
        log = proc.log()
        assert "server.drain_delay" in log and "gateway stopped" in log and "Traceback" not in log
    finally:
        proc.stop()


async def test_a_second_sigterm_skips_the_rest_of_the_drain_delay(tmp_path: Path, upstream: Any) -> None:
    proc = _serve(tmp_path, upstream, drain_delay=60, shutdown_timeout=5)
    try:
        await proc.wait_ready()
        async with aiohttp.ClientSession(timeout=T) as s:
            proc.signal(signal.SIGTERM)
            await until(lambda: _not_ready(s, proc.admin_url), what="/readyz to fail")
            async with s.post(proc.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200  # still serving: in the delay
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0  # not the 60 s of the delay
        assert "Traceback" not in proc.log()
    finally:
        proc.stop()


async def test_drain_delay_is_validated_and_reloadable(make_gateway: Any, upstream: Any, tmp_path: Path) -> None:
    """A negative delay is refused naming the setting; a reload applies a new one (it is read when
    the shutdown begins)."""
    from gateway.config import ConfigError, load_config

    bad = write_config(tmp_path / "bad.yaml", base_config(upstream.url, tmp_path, [], server={"drain_delay": -1}))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "server.drain_delay" in str(e.value)
    g = await make_gateway()
    assert g.gw.cfg.server.drain_delay == 0
    write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, [], server={"drain_delay": 0.3}))
    ok, detail = await g.gw.reload()
    assert ok, detail
    assert g.gw.cfg.server.drain_delay == 0.3


# -- the writers' final flush --------------------------------------------------------------------
HANG_BUDGET = 2.0


def _register_hang_plugins() -> None:
    from gateway.plugin import Plugin, registry

    async def hang(batch: Any) -> None:
        await asyncio.Event().wait()  # a database that takes no write (a lock held)

    class _Hang(Plugin):
        """A plugin whose writer's store hangs, closed in its shutdown hook; and a writer shared
        through services.resource (closed with the shared resources, after the plugins)."""
        name = "t_drain_hang_a"
        writers: dict[str, Any] = {}

        async def startup(self) -> None:
            w = self.services.writer(self.name, hang, batch_size=10, flush_interval=0.05,
                                     shutdown_retry_for=HANG_BUDGET)
            self.writer = w
            _Hang.writers[self.name] = w
            shared = self.services.resource("t_drain_hang:shared", lambda: self.services.writer(
                "t_drain_hang:shared", hang, batch_size=10, flush_interval=0.05, shutdown_retry_for=HANG_BUDGET),
                lambda x: x.close())
            _Hang.writers["shared"] = shared
            for x in (w, shared):
                x.start()
                for i in range(5):
                    x.put_nowait(i)

        async def shutdown(self) -> None:
            await self.writer.close()

    class _HangB(_Hang):
        name = "t_drain_hang_b"

    registry.register(_Hang)
    registry.register(_HangB)
    HANG["cls"] = _Hang


HANG: dict[str, Any] = {}
_register_hang_plugins()


async def test_writers_blocked_at_shutdown_share_one_deadline(make_gateway: Any, caplog: Any) -> None:
    """Three writers whose store hangs (two closed by their plugins' shutdown hooks, one with the
    shared resources): the shutdown takes about one flush budget, not one per writer in turn, and
    every record not written is counted and logged."""
    cls = HANG["cls"]
    cls.writers.clear()
    g = await make_gateway([{"name": "t_drain_hang_a"}, {"name": "t_drain_hang_b"}])
    await asyncio.sleep(0.3)  # the writes are under way (and hang)
    assert len(cls.writers) == 3 and all(w.written == 0 for w in cls.writers.values())
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gateway.writer"):
        async with asyncio.timeout(30):
            await g.stop()
    took = time.monotonic() - t0
    # about one budget (2 s); in turn, three writers took three (6 s and more)
    assert took < 2 * HANG_BUDGET, took
    # (the shared writer got five records from each plugin)
    assert {n: w.dropped for n, w in cls.writers.items()} == {"t_drain_hang_a": 5, "t_drain_hang_b": 5, "shared": 10}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(f"writer {n}" in logged for n in ("t_drain_hang_a", "t_drain_hang_b", "t_drain_hang:shared"))


# -- requests still in flight when the drain time runs out --------------------------------------
async def test_a_request_waiting_for_the_upstream_head_gets_a_503_when_the_drain_ends(
        make_gateway: Any, tmp_path: Path) -> None:
    """Nothing was sent to the client yet: it gets the gateway's JSON error (503 gateway_shutdown,
    Retry-After, Connection: close) instead of a dropped connection, and the audit trail and the
    metrics record that 503, cut by the shutdown."""
    trail = tmp_path / "audit.jsonl"
    g = await make_gateway([{"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(trail)}]}},
                            {"name": "metrics"}], server={"shutdown_timeout": 0.5})
    async with aiohttp.ClientSession(timeout=T) as s:
        async def call() -> tuple[int, dict[str, str], Any]:
            async with s.post(g.url + "/v1/chat/completions", json=CHAT,
                              headers={"X-Demo-Head-Delay": "4", "X-Request-ID": "slow-head-1"}) as r:
                return r.status, dict(r.headers), await r.json()

        calling = asyncio.create_task(call())
        await until(lambda: g.gw.runtime.inflight == 1, what="the request to be in flight")
        await asyncio.sleep(0.2)  # it waits for the upstream's head
        await g.stop()
        status, headers, body = await asyncio.wait_for(calling, 10)
    assert status == 503
    assert body["error"]["code"] == "gateway_shutdown" and body["error"]["type"] == "server_error"
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert headers.get("Connection", "").lower() == "close" and headers.get("Retry-After") == "1"
    events = [json.loads(line) for line in trail.read_text().splitlines()]
    rec = next(e for e in events if e.get("request_id") == "slow-head-1")
    assert (rec["status"], rec["outcome"], rec["error"]) == (503, "gateway_shutdown", "gateway_shutdown")
    from prometheus_client import generate_latest

    text = generate_latest(g.services.metrics).decode()
    assert any(line.startswith("gateway_requests_total{") and 'status="503"' in line and line.endswith(" 1.0")
               for line in text.splitlines()), text


async def test_a_stream_still_running_is_cut_when_the_drain_time_is_up(make_gateway: Any, monkeypatch: Any) -> None:
    """The drain lasts shutdown_timeout: the gateway cuts what still runs then itself, instead of
    leaving it to aiohttp's grace (made long here, so waiting it out would show)."""
    from gateway import app

    monkeypatch.setattr(app, "_CUT_AFTER_DRAIN", 5.0)
    g = await make_gateway([], server={"shutdown_timeout": 0.5})
    async with aiohttp.ClientSession(timeout=T) as s:
        r, got, t0, stopping = await stream_then_stop(g, s, CHAT)
        try:
            async for chunk in r.content.iter_any():
                got += chunk
        except aiohttp.ClientPayloadError:
            pass
        cut_after = time.monotonic() - t0
        r.close()
        await stopping
    assert b"[DONE]" not in got
    # about 0.5 s; waiting out aiohttp's grace (twice 5 s) would be over 10
    assert cut_after < 5, cut_after
    # the stream ends with an error event saying why (the OpenAI SDKs raise it), not a bare cut
    last = got.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ") and json.loads(last[6:])["error"]["code"] == "gateway_shutdown", got[-300:]


async def _read_to_close(r: asyncio.StreamReader, timeout: float = 20) -> bytes:
    """What comes until the gateway closes the connection (nothing if it closed it with our bytes
    unread: a reset)."""
    try:
        return await asyncio.wait_for(r.read(), timeout)
    except ConnectionResetError:
        return b""


async def _raw_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    body = json.dumps(CHAT).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    return await asyncio.wait_for(reader.read(), 20)  # (until the gateway closes the connection)


async def test_a_connection_accepted_just_before_the_listener_closes_gets_its_request_served(
        tmp_path: Path, upstream: Any) -> None:
    """A client whose connection was accepted a moment before SIGTERM, and which sends its request
    right after, is answered (with Connection: close), not reset: its client cannot tell whether a
    reset request went anywhere. An idle keep-alive connection that has had its answer is closed
    at once, as before."""
    proc = _serve(tmp_path, upstream, shutdown_timeout=10)
    try:
        await proc.wait_ready()
        fresh = await asyncio.open_connection("127.0.0.1", proc.port)
        used = await asyncio.open_connection("127.0.0.1", proc.port)
        used[1].write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        head = await asyncio.wait_for(used[0].readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await asyncio.wait_for(used[0].readexactly(length), 10)
        await asyncio.sleep(0.3)  # both accepted, one with a request answered, the other silent
        proc.signal(signal.SIGTERM)
        assert await asyncio.wait_for(used[0].read(), 10) == b""  # the idle keep-alive one: closed
        answer = await _raw_request(*fresh)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b"connection: close" in answer.lower() and b'"choices"' in answer
        assert await asyncio.to_thread(proc.wait, 20) == 0
        for _, w in (fresh, used):
            w.close()
    finally:
        proc.stop()


async def test_a_body_still_arriving_when_the_stop_begins_is_read_and_answered(tmp_path: Path, upstream: Any) -> None:
    """An upload under way (its head in, its body still coming) when SIGTERM arrives, and a request
    whose head comes in the half second a fresh connection gets, with its body a moment later:
    both bodies are read and answered. Told to close, the connection had dropped the bytes still to
    come, and the request waited for a body that never arrived (408, or 503 at the drain's end)."""
    proc = _serve(tmp_path, upstream, shutdown_timeout=10)
    try:
        await proc.wait_ready()
        body = json.dumps(CHAT).encode()
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        uploading = await asyncio.open_connection("127.0.0.1", proc.port)
        uploading[1].write(head + body[:10])
        fresh = await asyncio.open_connection("127.0.0.1", proc.port)
        await asyncio.sleep(0.3)
        proc.signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        fresh[1].write(head)
        await asyncio.sleep(0.15)
        for r, w in (uploading, fresh):
            w.write(body[10:] if w is uploading[1] else body)
            answer = await asyncio.wait_for(r.read(), 20)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
            assert b"connection: close" in answer.lower() and b'"choices"' in answer
            w.close()
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        proc.stop()


async def test_a_keep_alive_connection_whose_stream_spans_the_stop_takes_no_next_request(
        tmp_path: Path, upstream: Any) -> None:
    """A stream begun before SIGTERM went out without Connection: close. The request its client
    sends next on that connection, when the stream ends, is not read: it never reaches the upstream
    (the client sees the close and retries elsewhere), rather than being forwarded and then cut
    unanswered when the drain ends."""
    proc = _serve(tmp_path, upstream, shutdown_timeout=10)
    try:
        await proc.wait_ready()
        body = json.dumps({**CHAT, "stream": True}).encode()
        req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
               b"X-Demo-Delay: 0.05\r\nX-Demo-Words: 20\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
        r, w = await asyncio.open_connection("127.0.0.1", proc.port)
        w.write(req)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        proc.signal(signal.SIGTERM)
        await asyncio.wait_for(r.readuntil(b"0\r\n\r\n"), 20)  # the stream's end (chunked)
        n = len(upstream.requests)
        w.write(req.replace(b"X-Demo-Words: 20", b"X-Demo-Words: 2"))
        rest = await _read_to_close(r)
        assert rest == b"", rest[:200]  # closed, not answered
        await asyncio.sleep(0.3)
        assert len(upstream.requests) == n  # and never forwarded
        w.close()
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        proc.stop()


async def test_a_body_refused_during_the_drain_delay_closes_its_connection_once_it_is_in(
        tmp_path: Path, upstream: Any) -> None:
    """A body refused unread (413) while the gateway stops: the answer says Connection: close, and
    the connection closes once the rest of the body is in, as when not stopping; it was held open
    to the end of the drain (the rest of the body was ignored, so it never seemed to end)."""
    proc = _serve(tmp_path, upstream, drain_delay=30, shutdown_timeout=5, max_body_size=1000)
    try:
        await proc.wait_ready()
        async with aiohttp.ClientSession(timeout=T) as s:
            proc.signal(signal.SIGTERM)
            await until(lambda: _not_ready(s, proc.admin_url), what="/readyz to fail")
        r, w = await asyncio.open_connection("127.0.0.1", proc.port)
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                b"Content-Length: 200000\r\n\r\n" + b"x" * 1000)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
        w.write(b"x" * 199000)  # the rest of the body
        rest = await _read_to_close(r, 10)  # (the drain delay has 20 s and more to go)
        assert b"HTTP/1.1" not in rest
        w.close()
        proc.signal(signal.SIGTERM)  # (a second one ends the delay)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        proc.stop()


async def test_reuse_port_lets_a_new_gateway_take_over_the_ports(tmp_path: Path, upstream: Any) -> None:
    """server.reuse_port: a second gateway starts on the ports of a running one (without it, the
    second one's start fails and says why); after the first one's SIGTERM the second serves alone."""
    port, admin_port = free_port(), free_port()

    def config(name: str, reuse: bool) -> Path:
        cfg = base_config(upstream.url, tmp_path, [], server={"port": port, "reuse_port": reuse},
                          admin={"port": admin_port})
        return write_config(tmp_path / f"{name}.yaml", cfg)

    old = GatewayProcess(config("old", True), port, admin_port).start()
    new = refused = None
    try:
        await old.wait_ready()
        refused = GatewayProcess(config("plain", False), port, admin_port).start()
        assert await asyncio.to_thread(refused.wait, 60) == 1
        assert "address already in use" in refused.log() and "server.reuse_port: true" in refused.log()
        new = GatewayProcess(config("new", True), port, admin_port, log_path=tmp_path / "new.log").start()
        await until(lambda: "gateway listening" in new.log(), timeout=90, what="the new gateway to listen")
        async with aiohttp.ClientSession(timeout=T) as s:
            old.signal(signal.SIGTERM)
            assert await asyncio.to_thread(old.wait, 30) == 0
            for _ in range(5):
                async with s.post(new.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200 and "choices" in await r.json()
            assert await _status(s, new.admin_url + "/readyz") == 200
        assert new.proc is not None and new.proc.poll() is None
    finally:
        for p in (old, new, refused):
            if p is not None:
                p.stop()
