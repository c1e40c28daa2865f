"""rate_limit's concurrency caps: requests running at once, per key / owner / ip / route / model or
global, in memory and across instances on one Redis; a slot is given back however a request ends
(answered, cut by its client, refused by a later check); a key's own ``max_parallel``; leases of a
process that died lapse on Redis."""
from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config import ConfigError, load_config_text
from gateway.plugin import Plugin, PluginConfig, registry
from gateway.plugins.rate_limit import concurrency
from gateway.plugins.rate_limit.concurrency import PREFIX, RUNNING

from .helpers import ADMIN_TOKEN, GatewayProcess, base_config, free_port, serve_handler, until, write_config

CHAT = "/v1/chat/completions"
T = aiohttp.ClientTimeout(total=30)


async def slow(request: web.Request) -> web.StreamResponse:
    """A chat answer after ``sleep`` seconds (from the body); streamed over that time when asked."""
    body = await request.json()
    wait = float(body.get("sleep", 0.5))
    if body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "w"}}]}\n\n')
            await asyncio.sleep(wait / 10)
        await resp.write(b"data: [DONE]\n\n")
        return resp
    await asyncio.sleep(wait)
    return web.json_response({"id": "c", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


def body(sleep: float = 0.5, **kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "sleep": sleep, **kw}


async def burst(urls: list[str], n: int, sleep: float = 0.5, headers: dict[str, str] | None = None
                ) -> list[tuple[int, dict[str, Any], Any]]:
    async with aiohttp.ClientSession(timeout=T) as s:
        async def one(i: int) -> tuple[int, dict[str, Any], Any]:
            async with s.post(urls[i % len(urls)] + CHAT, json=body(sleep), headers=headers) as r:
                return r.status, await r.json(), r.headers
        return list(await asyncio.gather(*[one(i) for i in range(n)]))


def cap(*caps: dict[str, Any], **config: Any) -> dict[str, Any]:
    return {"name": "rate_limit", "config": {"concurrency": list(caps), **config}}


async def test_a_cap_lets_exactly_max_run_at_once_and_frees_each_slot_as_its_request_ends(make_gateway):
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([cap({"name": "parallel", "max": 3, "key_by": ["ip"]})], upstream={"url": url})
        got = await burst([g.url], 10)
        codes = sorted(st for st, _, _ in got)
        assert codes == [200] * 3 + [429] * 7, codes
        refused = [(b, h) for st, b, h in got if st == 429]
        for b, h in refused:
            assert b["error"]["code"] == "rate_limit_exceeded"
            assert "rule parallel allows 3 running at once, and 3 are running" in b["error"]["message"], b
            assert h["Retry-After"] == "1" and h["retry-after-ms"] == "500"
        await until(lambda: not RUNNING, 5, what="every slot given back")
        # the slots are free again: three more run at once
        assert sorted(st for st, _, _ in await burst([g.url], 3)) == [200] * 3
        async with aiohttp.ClientSession() as s:
            async with s.get(g.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                text = await r.text()
        assert 'gateway_ratelimit_refused_total{reason="rate_limit_exceeded",rule="parallel"} 7.0' in text
    finally:
        await runner.cleanup()


async def test_a_slot_is_given_back_when_the_client_leaves_mid_stream_or_a_later_rule_refuses(make_gateway):
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([cap({"name": "one", "max": 1, "key_by": "global"},
                                    rules=[{"name": "rpm", "limit": "2/minute", "key_by": ["ip"]}])],
                               upstream={"url": url})
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.post(g.url + CHAT, json=body(2, stream=True)) as r:
                assert r.status == 200
                await r.content.readany()
                assert RUNNING == {"one": 1}
                async with s.post(g.url + CHAT, json=body(0)) as r2:  # the one slot is taken
                    assert r2.status == 429
                r.close()  # the client leaves mid-stream
            await until(lambda: not RUNNING, 5, what="the slot given back")
            # The rpm rule (2/minute, one used) lets one more through; the next is refused by it,
            # after its slot was taken: given back at once, so a request after it is refused by
            # the rpm rule again, not by the cap.
            async with s.post(g.url + CHAT, json=body(0)) as r:
                assert r.status == 200
            for _ in range(2):
                async with s.post(g.url + CHAT, json=body(0)) as r:
                    msg = (await r.json())["error"]["message"]
                    assert r.status == 429 and "rule rpm" in msg, msg
            assert not RUNNING
    finally:
        await runner.cleanup()


async def test_a_keys_own_max_parallel_replaces_the_cap_keyed_by_key_alone(make_gateway):
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([{"name": "key_auth", "config": {}},
                                cap({"name": "per-key", "max": 2, "key_by": ["key"]},
                                    {"name": "all", "max": 50, "key_by": "global"})], upstream={"url": url})
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "alice", "limits": {"max_parallel": 4}},
                              headers=admin) as r:
                assert r.status == 201, await r.text()
                big = await r.json()
            assert big["limits"]["max_parallel"] == 4
            async with s.post(g.admin_url + "/keys", json={"owner": "bob"}, headers=admin) as r:
                plain = await r.json()
            async with s.post(g.admin_url + "/keys", json={"owner": "eve", "limits": {"max_parallel": 0}},
                              headers=admin) as r:
                assert r.status == 422  # at least 1
        hb = {"Authorization": f"Bearer {big['key']}"}
        hp = {"Authorization": f"Bearer {plain['key']}"}
        both = await asyncio.gather(burst([g.url], 6, headers=hb), burst([g.url], 6, headers=hp))
        assert sorted(st for st, _, _ in both[0]) == [200] * 4 + [429] * 2
        assert sorted(st for st, _, _ in both[1]) == [200] * 2 + [429] * 4
        own = [b["error"]["message"] for st, b, _ in both[0] if st == 429]
        assert all("rule key-parallel allows 4" in m for m in own), own
        # cleared: the YAML's cap applies to the key again
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.patch(g.admin_url + f"/keys/{big['id']}", json={"limits": {"max_parallel": None}},
                               headers=admin) as r:
                assert r.status == 200 and (await r.json())["limits"]["max_parallel"] is None
        assert sorted(st for st, _, _ in await burst([g.url], 6, headers=hb)) == [200] * 2 + [429] * 4
        await until(lambda: not RUNNING, 5, what="every slot given back")
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("text, why", [
    ("concurrency: [{name: p, max: 0}]", "greater than or equal to 1"),
    ('concurrency: [{name: p, max: "4/minute"}]', "valid integer"),
    ("concurrency: [{name: p, max: 2}]\n      rules: [{name: p, limit: 5/minute}]", "duplicate rule names: ['p']"),
    ("concurrency: [{name: key-parallel, max: 2}]", "reserved for a key's own limit"),
    ("concurrency: [{name: p, max: 2, key_by: [global, key]}]", "cannot be combined"),
])
def test_config_errors_of_a_cap(text: str, why: str) -> None:
    yaml_text = f"""
upstream: {{url: "http://127.0.0.1:9"}}
admin: {{enabled: false}}
plugins:
  - name: rate_limit
    config:
      {text}
"""
    with pytest.raises(ConfigError) as e:
        load_config_text(yaml_text)
    assert why in str(e.value), str(e.value)


# -- Redis ------------------------------------------------------------------------------------------
async def _redis(url: str) -> Any:
    import coredis

    return coredis.Redis.from_url(url + "/0", decode_responses=True)


async def test_three_processes_on_one_redis_hold_a_cap_together(tmp_path, redis_server):
    redis = redis_server()
    runner, up = await serve_handler(slow)
    procs = []
    try:
        for i in range(3):
            port, aport = free_port(), free_port()
            cfg = base_config(up, tmp_path, [cap({"name": "fleet", "max": 4, "key_by": "global"},
                                                 storage=redis.url + "/0", storage_timeout=2, on_store_error="deny")],
                              server={"port": port}, admin={"port": aport},
                              database={"url": f"sqlite+aiosqlite:///{tmp_path / f'gw{i}.db'}"})
            procs.append(GatewayProcess(write_config(tmp_path / f"gw{i}.yaml", cfg), port, aport).start())
        await asyncio.gather(*[p.wait_ready() for p in procs])
        r = await _redis(redis.url)
        for _ in range(2):  # twice: the slots of the first round are all given back
            got = await burst([p.url for p in procs], 15, sleep=1.5)
            codes = [st for st, _, _ in got]
            print(f"\ncap 4 at once, 15 concurrent requests over 3 processes on one Redis: "
                  f"{codes.count(200)} passed, {codes.count(429)} refused")
            assert sorted(codes) == [200] * 4 + [429] * 11, (codes, [b for _, b, _ in got][:3])
            await until(lambda: _zcard_zero(r), 5, what="every lease removed")
        for p in procs:
            assert "gateway.rate_limit" not in p.log(), p.log()[-2000:]
    finally:
        for p in procs:
            p.stop()
        await runner.cleanup()


async def _zcard_zero(r: Any) -> bool:
    return await r.zcard(PREFIX + "fleet") == 0


async def test_leases_are_renewed_while_a_request_runs_and_a_dead_process_s_lapse(make_gateway, redis_server,
                                                                                  monkeypatch):
    monkeypatch.setattr(concurrency, "LEASE", 1.0)
    monkeypatch.setattr(concurrency, "RENEW_EVERY", 0.25)
    redis = redis_server()
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([cap({"name": "one", "max": 1, "key_by": "global"}, storage=redis.url + "/0",
                                    storage_timeout=2)], upstream={"url": url})
        r = await _redis(redis.url)
        key = PREFIX + "one"
        async with aiohttp.ClientSession(timeout=T) as s:
            long = asyncio.ensure_future(s.post(g.url + CHAT, json=body(3)))
            await until(lambda: _zcard(r, key, 1), 5, what="the lease taken")
            await asyncio.sleep(2)  # twice the lease: renewed meanwhile, so still held
            assert await r.zcard(key) == 1
            async with s.post(g.url + CHAT, json=body(0)) as x:
                assert x.status == 429
            resp = await long
            assert resp.status == 200
            resp.release()
            await until(lambda: _zcard(r, key, 0), 5, what="the lease removed")
            # A lease left by a process that died (never renewed, never removed) holds the slot
            # until it lapses, then counts no more.
            now = (await r.time()).timestamp()  # (Redis's clock: the leases' scores are on it)
            await r.zadd(key, {"dead-process-lease": now + 1.5})
            async with s.post(g.url + CHAT, json=body(0)) as x:
                assert x.status == 429
            await asyncio.sleep(1.6)
            async with s.post(g.url + CHAT, json=body(0)) as x:
                assert x.status == 200
            # the lapsed lease dropped by the script, the request's own removed as it ended
            await until(lambda: _zcard(r, key, 0), 5, what="no lease left")
    finally:
        await runner.cleanup()


async def _zcard(r: Any, key: str, n: int) -> bool:
    return await r.zcard(key) == n


@pytest.mark.parametrize("policy, status", [("allow", 200), ("deny", 503)])
async def test_a_cap_on_a_stopped_redis_follows_on_store_error(make_gateway, redis_server, policy, status):
    redis = redis_server()
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([cap({"name": "one", "max": 1, "key_by": "global"}, storage=redis.url + "/0",
                                    storage_timeout=0.5, on_store_error=policy)], upstream={"url": url})
        await until(lambda: _first_ok(g), 10, what="a request through")  # (the scripts loaded)
        redis.stop()
        got = await burst([g.url], 3, sleep=0)
        assert [st for st, _, _ in got] == [status] * 3, got
        if policy == "deny":
            assert got[0][1]["error"]["code"] == "rate_limit_unavailable"
    finally:
        await runner.cleanup()


# -- the review's cases -------------------------------------------------------------------------------
class GrowConfig(PluginConfig):
    pass


class GrowAndFreeze(Plugin):
    """Test-only, after rate_limit: makes the prompt larger (as memory does, so rate_limit admits the
    request again in on_forward) and freezes the Redis named by the request's X-Test-Freeze port."""

    name = "test_grow_freeze"
    Config = GrowConfig
    rewrites_body = True

    async def on_request(self, ctx: Any) -> None:
        ctx.set_json({**ctx.json, "messages": [{"role": "user", "content": "history " * 200}] + ctx.json["messages"]})
        pid = ctx.request.headers.get("X-Test-Freeze")
        if pid:
            os.kill(int(pid), signal.SIGSTOP)
        return None


GrowAndFreeze.__test__ = False  # type: ignore[attr-defined]
registry.register(GrowAndFreeze)


async def test_a_slot_is_given_back_when_on_forward_finds_the_store_down_with_deny(make_gateway, redis_server):
    redis = redis_server()
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([cap({"name": "one", "max": 1, "key_by": "global"}, storage=redis.url + "/0",
                                    storage_timeout=1, storage_retry=0, on_store_error="deny",
                                    rules=[{"name": "tpm", "limit": "100000/minute", "counts": "tokens",
                                            "key_by": "global"}]),
                                {"name": "test_grow_freeze"}], upstream={"url": url})
        r = await _redis(redis.url)
        # (the first calls load the scripts: on a busy machine one may miss the deadline, a 503)
        await until(lambda: _first_ok(g), 10, what="a request through")
        assert redis.proc is not None
        got = await burst([g.url], 1, sleep=0, headers={"X-Test-Freeze": str(redis.proc.pid)})
        redis.resume()
        assert got[0][0] == 503 and got[0][1]["error"]["code"] == "rate_limit_unavailable"
        # given back (tried at once, and Redis answered again): not renewed for ever
        await until(lambda: _zcard(r, PREFIX + "one", 0), 5, what="the slot given back")
        assert not g.plugin("rate_limit")._leases.held
    finally:
        await runner.cleanup()


async def _first_ok(g: Any) -> bool:
    return (await burst([g.url], 1, sleep=0))[0][0] == 200


async def test_a_take_whose_answer_was_lost_frees_soon_and_a_lost_lease_is_put_back(make_gateway, redis_server,
                                                                                   monkeypatch):
    monkeypatch.setattr(concurrency, "RENEW_EVERY", 0.3)
    redis = redis_server()
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([cap({"name": "one", "max": 1, "key_by": "global"}, storage=redis.url + "/0",
                                    storage_timeout=0.3, storage_retry=0)], upstream={"url": url})
        r = await _redis(redis.url)
        key = PREFIX + "one"
        await until(lambda: _first_ok(g), 10, what="a request through")  # (the scripts loaded)
        # A take Redis runs after the gateway gave up on it (frozen past storage_timeout): its lease
        # lives FIRST_LEASE seconds, not LEASE.
        redis.pause()
        got = asyncio.ensure_future(burst([g.url], 1, sleep=0))
        await asyncio.sleep(0.6)
        redis.resume()
        assert (await got)[0][0] == 200  # (on_store_error: allow)
        left = await r.zrange(key, 0, -1, withscores=True)
        now = (await r.time()).timestamp()
        # (FIRST_LEASE, 5 s, from when Redis ran it, which may be a moment after it answered ``time``)
        assert len(left) == 1 and left[0][1] - now < concurrency.LEASE / 2, (left, now)
        await r.delete([key])
        # A running request's lease that Redis lost (a flush, a restart) is put back by the renewal.
        long = asyncio.ensure_future(burst([g.url], 1, sleep=2))
        await until(lambda: _zcard(r, key, 1), 5, what="the lease taken")
        await r.flushall()
        await until(lambda: _zcard(r, key, 1), 5, what="the lease put back")
        assert (await burst([g.url], 1, sleep=0))[0][0] == 429
        assert (await long)[0][0] == 200
        await until(lambda: _zcard(r, key, 0), 5, what="the lease removed")
    finally:
        await runner.cleanup()


async def test_requests_that_generate_nothing_take_no_slot(make_gateway):
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([cap({"name": "one", "max": 1, "key_by": "global"})], upstream={"url": url})
        async with aiohttp.ClientSession(timeout=T) as s:
            long = asyncio.ensure_future(s.post(g.url + CHAT, json=body(1)))
            await until(lambda: RUNNING.get("one") == 1, 5, what="the slot taken")
            async with s.get(g.url + "/v1/models") as r:
                assert r.status != 429
            async with s.post(g.url + CHAT, json=body(0)) as r:
                msg = (await r.json())["error"]["message"]
                assert r.status == 429 and "and 1 is running" in msg, msg
            (await long).release()
    finally:
        await runner.cleanup()
