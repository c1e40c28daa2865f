"""key_auth checks the key from the request head, before the body is read: a client without a
valid key is refused without its body being taken in (an ``Expect: 100-continue`` client gets
its 401 instead of ``100 Continue``; a slow or endless upload is answered at once), while a
plugin placed ahead of key_auth that must see every attempt (a rate limit by IP) still does.
Real gateway, raw sockets, the demo upstream."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from .helpers import after_continue
from .test_key_auth import ka, new_key

CHAT = json.dumps({"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def exchange(port: int, head: bytes, body: bytes = b"", wait: float = 5.0) -> bytes:
    """Send a request head (and the start of a body), then read what comes back within ``wait``."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(head + body)
        await w.drain()
        got = b""
        try:
            async with asyncio.timeout(wait):
                while b"\r\n\r\n" not in got:
                    chunk = await r.read(65536)
                    if not chunk:
                        break
                    got += chunk
        except TimeoutError:
            pass
        return got
    finally:
        w.close()


def head(key: str, extra: str = "", length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\n{framing}{extra}\r\n").encode()


async def test_expect_100_continue_with_a_bad_key_gets_401_not_continue(make_gateway: Any) -> None:
    g = await make_gateway(ka())
    got = await exchange(g.gw.public_port, head("gw-not-a-key", "Expect: 100-continue\r\n", 50_000_000))
    assert got.startswith(b"HTTP/1.1 401 "), got[:200]
    assert b"100 Continue" not in got
    assert b"connection: close" in got.lower()  # the body was never sent: nothing more to read on it


async def test_a_bad_key_is_answered_before_the_body_ends(make_gateway: Any) -> None:
    """An upload that has not finished (here it never does) gets its 401 at once, not after the
    body (or body_timeout's 408)."""
    g = await make_gateway(ka(), server={"body_timeout": 30})
    got = await exchange(g.gw.public_port, head("gw-not-a-key"), b"1000\r\n" + b"x" * 100, wait=5)
    assert got.startswith(b"HTTP/1.1 401 "), got[:200]
    assert b'"invalid_api_key"' in got


async def test_a_valid_key_gets_100_continue_and_its_answer(make_gateway: Any) -> None:
    g = await make_gateway(ka())
    key = (await new_key(g))["key"]
    rest = await after_continue(g.gw.public_port, head(key, "Expect: 100-continue\r\nConnection: close\r\n",
                                                       len(CHAT)), CHAT)
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:300]


async def test_the_model_scope_is_still_checked_with_the_body(make_gateway: Any) -> None:
    g = await make_gateway(ka())
    key = (await new_key(g, scopes={"models": ["demo-embed"]}))["key"]
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", data=CHAT, headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "key_scope_denied"
        async with s.post(g.url + "/v1/embeddings", json={"model": "demo-embed", "input": "a"},
                          headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200


async def test_a_rate_limit_ahead_of_key_auth_still_counts_every_attempt(make_gateway: Any) -> None:
    """rate_limit by IP placed before key_auth (to slow down key guessing) sees each attempt
    first: the bad keys are counted and the third attempt is refused by the limit."""
    g = await make_gateway([{"name": "rate_limit", "config": {"rules": [
        {"name": "per-ip", "limit": "2/minute", "key_by": ["ip"]}]}}] + ka())
    async with aiohttp.ClientSession() as s:
        codes = []
        for _ in range(3):
            async with s.post(g.url + "/v1/chat/completions", data=CHAT, headers={
                    "Authorization": "Bearer gw-not-a-key", "Content-Type": "application/json"}) as r:
                codes.append((r.status, (await r.json())["error"]["code"]))
    assert codes == [(401, "invalid_api_key"), (401, "invalid_api_key"), (429, "rate_limit_exceeded")], codes
