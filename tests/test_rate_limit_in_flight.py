"""Token limits and quotas under concurrent requests: requests arriving together are admitted against
what is left less the estimates of those still running, so 20 concurrent streams cannot each pass
a pre-check against the same budget and use it 20 times over. The estimates are given back as
each request ends (whatever its end: answered, refused by a later rule, cut by its client)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from gateway.plugins.rate_limit import IN_FLIGHT

from .helpers import serve_handler, until

USAGE = {"prompt_tokens": 10, "completion_tokens": 1000, "total_tokens": 1010}


async def slow_stream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(10):
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "w"}}]}\n\n')
        await asyncio.sleep(0.05)
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(b'data: ' + json.dumps({"choices": [], "usage": USAGE}).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


BODY = {"model": "m", "stream": True, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}


async def burst(url: str, n: int) -> list[int]:
    async with aiohttp.ClientSession() as s:
        async def one() -> int:
            async with s.post(url + "/v1/chat/completions", json=BODY) as r:
                await r.read()
                return r.status
        return list(await asyncio.gather(*[one() for _ in range(n)]))


async def left(g: Any, header: str) -> int:
    await g.plugin("rate_limit").drain()
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json={**BODY, "stream": False, "max_tokens": 0}) as r:
            await r.read()
            return int(r.headers[header])


async def test_concurrent_streams_pass_a_token_rule_and_a_quota_only_as_far_as_their_estimates_fit(
        make_gateway: Any) -> None:
    runner, url = await serve_handler(slow_stream)
    try:
        # estimate per request: 1 (prompt) + 1000 (max_tokens) = 1001; 4 fit in 5000, 5 do not
        for plugin, header in (
                ({"rules": [{"name": "tpm", "limit": "5000/minute", "counts": "tokens", "key_by": ["ip"]}]},
                 "x-ratelimit-remaining-tokens"),
                ({"rules": [], "quotas": {"daily_tokens": 5000}}, "x-ratelimit-remaining-tokens")):
            g = await make_gateway([{"name": "rate_limit", "config": plugin}], upstream={"url": url},
                                   name=f"gw-{len(plugin['rules'])}.yaml")
            codes = await burst(g.url, 20)
            assert sorted(codes) == [200] * 4 + [429] * 16, codes
            # every estimate given back (as each request ends: its client may see the end first)
            await until(lambda: not IN_FLIGHT, 5, what="the estimates given back")
            assert await left(g, header) == 5000 - 4 * 1010  # the four streams' real usage, charged
            # once they ended, the budget left admits what fits in it again
            codes = await burst(g.url, 3)
            assert sorted(codes) == [429] * 3  # 960 left: 1001 does not fit
            await g.stop()
    finally:
        await runner.cleanup()


async def test_an_estimate_is_given_back_when_the_request_is_refused_or_its_client_leaves(
        make_gateway: Any) -> None:
    runner, url = await serve_handler(slow_stream)
    try:
        g = await make_gateway([{"name": "rate_limit", "config": {"rules": [
            {"name": "tpm", "limit": "5000/minute", "counts": "tokens", "key_by": ["ip"]},
            {"name": "rpm", "limit": "2/minute", "key_by": ["ip"]}]}}], upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions", json=BODY) as r:
                assert r.status == 200
                await r.content.readany()
                assert sum(IN_FLIGHT.values()) == 1001  # held while it runs
                r.close()  # the client leaves mid-stream
            await until(lambda: not IN_FLIGHT, 5, what="the estimate given back")
            codes = await burst(g.url, 3)  # the second request rule's refusal: the held estimate back
            assert sorted(codes) == [200, 429, 429]
            await until(lambda: not IN_FLIGHT, 5, what="the estimates given back")
    finally:
        await runner.cleanup()


async def test_a_request_kept_out_only_by_running_requests_is_told_to_retry_shortly(make_gateway: Any) -> None:
    """It fits what is left, not beside what the running requests may still use: a retryable 429
    with a short Retry-After saying so, not a used-up quota until midnight (that no SDK retries)."""
    runner, url = await serve_handler(slow_stream)
    try:
        for plugin in ({"rules": [], "quotas": {"daily_tokens": 5000}},
                       {"rules": [{"name": "tpm", "limit": "5000/hour", "counts": "tokens", "key_by": ["ip"]}]}):
            g = await make_gateway([{"name": "rate_limit", "config": plugin}], upstream={"url": url},
                                   name=f"gw-{len(plugin['rules'])}.yaml")
            async with aiohttp.ClientSession() as s:
                async def one() -> tuple[int, Any, Any]:
                    async with s.post(g.url + "/v1/chat/completions", json=BODY) as r:
                        body = await r.read()
                        return r.status, r.headers, body
                got = await asyncio.gather(*[one() for _ in range(6)])
            refused = [(h, json.loads(b)) for st, h, b in got if st == 429]
            assert len(refused) == 2
            for h, b in refused:
                assert b["error"]["code"] == "rate_limit_exceeded", b
                assert "held by requests still running" in b["error"]["message"], b
                assert h["Retry-After"] == "1" and "x-should-retry" not in h
            await until(lambda: not IN_FLIGHT, 5, what="the estimates given back")
            await g.stop()
    finally:
        await runner.cleanup()
