"""rate_limit end to end: real gateway on a loopback socket, the demo upstream, real SQLite files and,
where the feature is about it, real redis-server processes (one shared by three `gateway serve`
subprocesses for the multi-instance test)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
from pydantic import Field

from gateway.config import ConfigError, load_config_text
from gateway.plugin import Plugin, PluginConfig, registry
from gateway.plugins.rate_limit.headers import duration
from gateway.estimate import prompt_estimate

from .helpers import ADMIN_TOKEN, GatewayProcess, base_config, clear_of_a_minute_boundary, free_port, write_config

CHAT = "/v1/chat/completions"
T = aiohttp.ClientTimeout(total=15)


# -- a tiny identity plugin (stands in for key_auth where a test must not depend on it) ------------
class IdentityConfig(PluginConfig):
    keys: dict[str, dict[str, Any]] = Field(default_factory=dict, description="key id -> limits")


class TestIdentity(Plugin):
    """Test-only: sets ctx.identity from an X-Test-Key header, with the limits configured for it."""

    name = "test_identity"
    Config = IdentityConfig

    async def on_request(self, ctx: Any) -> None:
        k = ctx.request.headers.get("X-Test-Key")
        if k:
            ctx.identity = {"key_id": k, "owner": f"owner-{k}", "name": k, "team": None, "scopes": {},
                            "metadata": {}, "limits": {"rpm": None, "tpm": None, "daily_tokens": None,
                                                       "monthly_tokens": None, **self.config.keys.get(k, {})}}
        return None


TestIdentity.__test__ = False  # type: ignore[attr-defined]
registry.register(TestIdentity)


def rl(**config: Any) -> dict[str, Any]:
    return {"name": "rate_limit", "config": config}


def chat_body(text: str = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": "demo-chat", "messages": [{"role": "user", "content": text}], **kw}


async def settle(g: Any) -> None:
    """Wait until every request's on_complete ran and the token charges landed."""
    deadline = time.monotonic() + 5
    while g.gw.runtime.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await g.plugin("rate_limit").drain()


def ietf(value: str) -> dict[str, dict[str, str]]:
    """Parse RateLimit / RateLimit-Policy: '"name";r=1;t=2, ...' -> {name: {r: 1, t: 2}}."""
    out = {}
    for item in value.split(","):
        parts = item.strip().split(";")
        out[parts[0].strip('"')] = dict(p.split("=", 1) for p in parts[1:])
    return out


async def post(s: aiohttp.ClientSession, url: str, body: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    async with s.post(url + CHAT, json=body or chat_body(), headers=headers or {}, timeout=T) as r:
        data = await r.json(content_type=None)
        return r.status, data, dict(r.headers)


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["sliding", "fixed", "moving"])
async def test_exactly_limit_of_2L_concurrent_pass_on_one_instance(make_gateway, upstream, strategy):
    L = 25
    await clear_of_a_minute_boundary()  # (the sliding window's minutes are UTC minutes)
    g = await make_gateway([rl(strategy=strategy, rules=[{"name": "all", "limit": f"{L}/minute",
                                                           "key_by": "global"}])])
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*[post(s, g.url) for _ in range(2 * L)])
    statuses = [st for st, _, _ in results]
    print(f"{strategy}: {statuses.count(200)} passed, {statuses.count(429)} refused of {2 * L}")
    assert statuses.count(200) == L
    assert statuses.count(429) == L
    assert len([r for r in upstream.requests if r["path"] == CHAT]) == L
    refused = [(d, h) for st, d, h in results if st == 429]
    d, h = refused[0]
    assert d["error"]["code"] == "rate_limit_exceeded"
    assert "all (25/minute)" in d["error"]["message"]
    assert int(h["Retry-After"]) >= 1
    assert h["x-ratelimit-remaining-requests"] == "0"


async def test_three_processes_on_one_redis_never_exceed_the_limit(tmp_path, upstream, redis_server):
    redis = redis_server()
    L = 20
    procs = []
    for i in range(3):
        port, aport = free_port(), free_port()
        cfg = base_config(upstream.url, tmp_path, [rl(storage=redis.url, storage_timeout=2, on_store_error="deny", rules=[
            {"name": "shared", "limit": f"{L}/hour", "key_by": "global"}])],
                          server={"port": port}, admin={"port": aport},
                          database={"url": f"sqlite+aiosqlite:///{tmp_path / f'gw{i}.db'}"})
        procs.append(GatewayProcess(write_config(tmp_path / f"gw{i}.yaml", cfg), port, aport).start())
    try:
        await asyncio.gather(*[p.wait_ready() for p in procs])
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(*[post(s, procs[i % 3].url) for i in range(2 * L)])
        per = {p.url: [0, 0] for p in procs}
        for i, (st, _, _) in enumerate(results):
            per[procs[i % 3].url][0 if st == 200 else 1] += 1
            assert st in (200, 429), (results[i], [line for p in procs for line in p.log().splitlines()
                                                   if "gateway.rate_limit" in line][:5])
        passed = sum(v[0] for v in per.values())
        print(f"\nlimit {L}/hour, {2 * L} concurrent requests over 3 processes on one Redis:")
        for i, p in enumerate(procs):
            print(f"  process {i}: {per[p.url][0]} passed, {per[p.url][1]} refused")
        print(f"  total: {passed} passed")
        for p in procs:
            errs = [line for line in p.log().splitlines() if "gateway.rate_limit" in line]
            assert not errs, errs[:5]
        assert passed <= L
        assert passed == L  # the Lua scripts are atomic: nothing lost either
        # A later request on any process is refused too: the counter is shared.
        async with aiohttp.ClientSession() as s:
            st, body, _ = await post(s, procs[1].url)
        assert st == 429 and body["error"]["code"] == "rate_limit_exceeded"
    finally:
        for p in procs:
            p.stop()


# -- window boundaries per strategy ----------------------------------------------------------------
# One schedule for every strategy, limit 2/second, times relative to a whole second k (limits' clock).
# What each strategy lets through follows from the library's semantics:
#   fixed:   a window starts at the first hit and lasts 1 s (refused hits count too)
#   moving:  a hit passes if fewer than 2 passed in the last second
#   sliding: previous window's count weighted by its remaining overlap + current count
SCHEDULE = [("A", .05), ("B", .55), ("C", .55), ("D", 1.2), ("E", 1.2), ("F", 1.2), ("G", 1.62), ("H", 1.62),
            ("I", 2.08), ("J", 2.08)]
EXPECT = {
    "fixed":   "PPR" "PPR" "RR" "RR",
    "moving":  "PPR" "PRR" "PR" "RR",
    "sliding": "PPR" "PRR" "PR" "PR",
}


def _timing_ok(t: dict[str, tuple[float, float]], k: float) -> bool:
    """The schedule's assumptions held (each hit happened inside the span its outcome depends on)."""
    s, r = {n: v[0] for n, v in t.items()}, {n: v[1] for n, v in t.items()}
    checks = [
        s["A"] >= k and r["C"] < k + 1,
        all(s[n] > r["A"] + 1 and r[n] < min(k + 1.5, s["B"] + 1) for n in "DEF"),
        all(s[n] > max(r["B"] + 1, k + 1.5) and r[n] < min(k + 2, s["D"] + 1) for n in "GH"),
        all(s[n] > k + 2 and r[n] < min(k + 2.5, s["D"] + 1) for n in "IJ"),
    ]
    return all(checks)


@pytest.mark.parametrize("strategy", ["fixed", "moving", "sliding"])
async def test_window_boundary_behaviour_per_strategy(make_gateway, strategy):
    g = await make_gateway([rl(strategy=strategy, rules=[{"name": "burst", "limit": "2/second",
                                                           "key_by": ["model"]}])])
    async with aiohttp.ClientSession() as s:
        for attempt in range(5):
            model = f"m-{strategy}-{attempt}"  # a fresh counter per attempt
            k = math.ceil(time.time()) + 1
            outcome, times = "", {}
            for name, off in SCHEDULE:
                await asyncio.sleep(max(0.0, k + off - time.time()))
                t0 = time.time()
                st, _, _ = await post(s, g.url, chat_body(model=model))
                times[name] = (t0, time.time())
                outcome += "P" if st == 200 else "R"
            if _timing_ok(times, k):
                print(f"{strategy}: {outcome} (attempt {attempt + 1})")
                assert outcome == EXPECT[strategy]
                return
            print(f"{strategy}: machine too slow for the schedule on attempt {attempt + 1}, retrying")
        pytest.fail("could not run the boundary schedule within its timing assumptions in 5 attempts")


# -- tokens ---------------------------------------------------------------------------------------
async def test_token_limit_streamed_counts_real_usage_and_refuses_before_forwarding(make_gateway, upstream):
    g = await make_gateway([rl(strategy="fixed", estimate_default_max_tokens=10, rules=[
        {"name": "tpm", "limit": "60/minute", "counts": "tokens", "key_by": ["ip"]}])])
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + CHAT, json=chat_body("one two three", stream=True, max_tokens=20),
                          timeout=T) as r:
            assert r.status == 200
            assert r.headers["x-ratelimit-remaining-tokens"] == "60"
            raw = (await r.read()).decode()
        # The client did not ask for usage: the extra chunk the gateway asked for is not passed on.
        assert '"usage"' not in raw
        assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
        await settle(g)
        # demo usage: prompt = 3 words + 1, completion = one token per chunk
        chunks = [json.loads(line[6:]) for line in raw.splitlines()
                  if line.startswith("data: {")]
        completion = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
        used = 4 + completion
        st, _, h = await post(s, g.url, chat_body("x", max_tokens=1))
        assert st == 200
        assert int(h["x-ratelimit-remaining-tokens"]) == 60 - used
        await settle(g)
        # A client that asked for usage gets it, counted the same way.
        async with s.post(g.url + CHAT, json=chat_body("a", stream=True, max_tokens=1,
                                                       stream_options={"include_usage": True}), timeout=T) as r:
            assert '"usage"' in (await r.read()).decode()
        await settle(g)
        # Now ask for more than is left: refused before the upstream sees it.
        n_before = len(upstream.requests)
        st, body, h = await post(s, g.url, chat_body("hello", max_tokens=55))  # 2 + 55: fits the limit, not what is left
        assert st == 429
        assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "tokens"
        assert "tpm (60/minute)" in body["error"]["message"]
        assert len(upstream.requests) == n_before
        assert int(h["Retry-After"]) >= 1
        # Larger than the whole limit: can never fit, and the message says so.
        st, body, h = await post(s, g.url, chat_body("hello", max_tokens=500))
        assert st == 429 and "Request too large for rule tpm (60/minute)" in body["error"]["message"]
        assert h["x-should-retry"] == "false" and "Retry-After" not in h  # the SDKs do not retry it
        # A GET generates no tokens: not refused for an estimate.
        async with s.get(g.url + "/v1/models", timeout=T) as r:
            assert r.status == 200


async def test_a_refusal_names_what_frees_last_of_quotas_and_token_rules_used_up(make_gateway, monkeypatch):
    """A daily and a monthly quota both used up, on the 15th at 23:59:45: the refusal is the
    monthly quota's (15 days), not the daily one's 15 s after which the caller is refused again. A
    token rule and a quota both used up: the quota's, which frees later."""
    import datetime as dt

    import gateway.plugins.rate_limit as rl_mod
    from gateway.plugins.rate_limit.quota import periods

    now = dt.datetime(2026, 11, 15, 23, 59, 45, tzinfo=dt.timezone.utc)
    monkeypatch.setattr(rl_mod, "periods", lambda: periods(now))
    g = await make_gateway([rl(estimate_default_max_tokens=2, quotas={"daily_tokens": 30, "monthly_tokens": 34})],
                           name="quotas.yaml")
    h = await make_gateway([rl(estimate_default_max_tokens=2, quotas={"monthly_tokens": 34}, rules=[
        {"name": "tpm", "limit": "30/minute", "counts": "tokens", "key_by": ["ip"]}])], name="rule.yaml")
    async with aiohttp.ClientSession() as s:
        for gw in (g, h):
            st, body, _ = await post(s, gw.url, chat_body("hi"), headers={"X-Demo-Words": "30"})
            assert st == 200 and body["usage"]["total_tokens"] >= 31
            await settle(gw)
        st, body, hd = await post(s, g.url, chat_body("hi"))
        assert st == 429 and body["error"]["code"] == "insufficient_quota", body
        assert "monthly tokens quota" in body["error"]["message"]
        assert int(hd["Retry-After"]) == 15 * 86400 + 15 and hd["x-should-retry"] == "false"
        assert int(hd["x-ratelimit-reset-tokens"].split("h")[0]) == 15 * 24  # the headers agree
        st, body, hd = await post(s, h.url, chat_body("hi"))
        assert st == 429 and body["error"]["code"] == "insufficient_quota", body
        assert int(hd["Retry-After"]) == 15 * 86400 + 15


async def test_a_token_refusal_gives_way_to_a_request_rule_used_up_for_longer(make_gateway):
    """Tokens used up for 5 s and requests for an hour: the refusal names the hourly request rule
    (a client retrying after 5 s was refused for the hour), and the headers carry both kinds."""
    g = await make_gateway([rl(strategy="fixed", estimate_default_max_tokens=0, rules=[
        {"name": "req-hour", "limit": "2/hour", "key_by": ["ip"]},
        {"name": "tok-5s", "limit": "100 per 5 seconds", "counts": "tokens", "key_by": ["ip"]}])])
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            st, body, _ = await post(s, g.url, chat_body("hi"), headers={"X-Demo-Words": "55"})
            assert st == 200
            await settle(g)
        st, body, h = await post(s, g.url, chat_body("hi"))
    assert st == 429 and "req-hour (2/hour)" in body["error"]["message"], body
    assert int(h["Retry-After"]) > 3500 and body["error"]["type"] == "requests"
    assert h["x-ratelimit-remaining-requests"] == "0" and int(h["X-RateLimit-Reset"]) > 3500
    assert "x-ratelimit-remaining-tokens" in h


async def test_refusals_the_sdks_cannot_wait_for_say_not_to_retry(make_gateway):
    """A quota the request can never fit, an exhausted quota and a token rule whose room frees in
    minutes: the 429 says x-should-retry: false (the SDKs wait at most 60 s; openai-node would retry
    at once on its own back-off instead). The OpenAI SDK, allowed 2 retries, sends each once."""
    import openai

    g = await make_gateway([rl(estimate_default_max_tokens=0, quotas={"monthly_tokens": 300})], name="quota.yaml")
    h2 = await make_gateway([rl(estimate_default_max_tokens=0, rules=[
        {"name": "hourly", "limit": "40/hour", "counts": "tokens", "key_by": ["ip"]}])], name="hour.yaml")

    def refused(*gws: Any) -> float:  # 429s sent, as the gateways count them
        return sum(x.value for gw in gws for m in gw.gw.services.metrics.collect()
                   if m.name == "gateway_ratelimit_refused" for x in m.samples if x.name.endswith("_total"))

    async def sdk_call(url: str, **kw: Any) -> openai.RateLimitError:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=2, timeout=10)
        with pytest.raises(openai.RateLimitError) as e:
            await client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}],
                                                 **kw)
        await client.close()
        return e.value

    # never fits the quota: no Retry-After, a message that says why
    err = await sdk_call(g.url, max_tokens=1000)
    assert err.code == "insufficient_quota" and "Request too large for your monthly tokens quota" in err.message
    assert err.response.headers["x-should-retry"] == "false" and "retry-after" not in err.response.headers
    assert refused(g, h2) == 1
    # the quota used up (300 of 300): the wait is in Retry-After, and not retried
    async with aiohttp.ClientSession() as s:
        st, _, _ = await post(s, g.url, chat_body("hi"), headers={"X-Demo-Words": "298"})
        assert st == 200
        await settle(g)
    err = await sdk_call(g.url)
    assert err.code == "insufficient_quota" and "exceeded your monthly tokens quota" in err.message
    assert int(err.response.headers["retry-after"]) > 60 and err.response.headers["x-should-retry"] == "false"
    assert refused(g, h2) == 2
    # a token rule per hour, 32 of 40 used: this one fits again in minutes, not seconds
    async with aiohttp.ClientSession() as s:
        assert (await post(s, h2.url, chat_body("hi"), headers={"X-Demo-Words": "30"}))[0] == 200
        await settle(h2)
    err = await sdk_call(h2.url, max_tokens=10)
    assert err.code == "rate_limit_exceeded" and int(err.response.headers["retry-after"]) > 60
    assert err.response.headers["x-should-retry"] == "false"
    assert refused(g, h2) == 3


async def test_a_rule_s_own_completion_estimate_applies(make_gateway, upstream):
    """rules[].estimate_default_max_tokens replaces the plugin-wide value for that rule's pre-check
    (a request without max_tokens); rules without one keep the plugin-wide value."""
    g = await make_gateway([rl(estimate_default_max_tokens=256, rules=[
        {"name": "small", "limit": "100/minute", "counts": "tokens", "key_by": ["ip"], "estimate_default_max_tokens": 10},
        {"name": "wide", "limit": "300/minute", "counts": "tokens", "key_by": ["ip"]}])])
    async with aiohttp.ClientSession() as s:
        st, body, _ = await post(s, g.url, chat_body("one two three"))
        assert st == 200, body  # small: 1 + 10 <= 100; wide: 1 + 256 <= 300
        st, body, _ = await post(s, g.url, chat_body("one two three", max_tokens=150))
        assert st == 429 and "Request too large for rule small (100/minute)" in body["error"]["message"]


async def test_cancelled_stream_is_charged_for_what_was_generated(make_gateway, upstream):
    g = await make_gateway([rl(strategy="fixed", rules=[
        {"name": "tpm", "limit": "10000/minute", "counts": "tokens", "key_by": ["ip"]}])])
    prompt = "please write a long answer"
    est = prompt_estimate(chat_body(prompt))
    async with aiohttp.ClientSession() as s:
        seen = 0
        async with s.post(g.url + CHAT, json=chat_body(prompt, stream=True),
                          headers={"X-Demo-Delay": "0.02", "X-Demo-Words": "400"}, timeout=T) as r:
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
                    seen += 1
                    if seen == 10:
                        break
            r.close()  # the client goes away mid-stream
        await settle(g)
        await asyncio.sleep(0.1)
        await settle(g)
        st, _, h = await post(s, g.url, chat_body("x", max_tokens=1))
        charged = 10000 - int(h["x-ratelimit-remaining-tokens"])
        print(f"cancelled after {seen} chunks: charged {charged} tokens (prompt estimate {est})")
        assert charged >= est + seen          # what was generated (and the prompt) is paid for
        assert charged < est + 400            # but not the full answer that was never generated


async def test_a_request_whose_answer_timed_out_is_charged_its_prompt(make_gateway, upstream):
    """504 upstream_timeout: the upstream had the prompt (and may still be generating), so the
    request pays its prompt estimate, as one its client gave up on does. An SDK retries a 504
    twice by default: three paid prompts, which a token rule must see."""
    g = await make_gateway([rl(strategy="fixed", rules=[
        {"name": "tpm", "limit": "100000/minute", "counts": "tokens", "key_by": ["ip"]}])],
        upstream={"url": upstream.url, "timeouts": {"first_byte": 0.3}})
    prompt = "word " * 4000
    est = prompt_estimate(chat_body(prompt))
    async with aiohttp.ClientSession() as s:
        st, body, _ = await post(s, g.url, chat_body(prompt), headers={"X-Demo-Head-Delay": "2"})
        assert st == 504 and body["error"]["code"] == "upstream_timeout"
        await settle(g)
        st, _, h = await post(s, g.url, chat_body("x", max_tokens=1))
        assert st == 200
        assert 100000 - int(h["x-ratelimit-remaining-tokens"]) == est


async def test_an_answer_the_gateway_cannot_read_is_charged_what_the_request_was_admitted_for(make_gateway):
    """A backend's own API (Ollama's /api/chat answers NDJSON, no OpenAI usage): the tokens it
    generated cannot be read, so the request pays the estimate it was admitted with (prompt plus
    max_tokens, or the default), not a token or so for its prompt (a quota would never hold)."""
    from .test_observe import backend

    from aiohttp import web

    async def ollama(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for i in range(500):
            await resp.write(json.dumps({"model": "llama3", "message": {"role": "assistant", "content": f"w{i} "},
                                         "done": False}).encode() + b"\n")
        await resp.write(json.dumps({"model": "llama3", "done": True, "eval_count": 500}).encode() + b"\n")
        return resp

    async with backend(ollama, "/api/chat") as url:
        g = await make_gateway([rl(strategy="fixed", estimate_default_max_tokens=300, rules=[
            {"name": "tpm", "limit": "10000/minute", "counts": "tokens", "key_by": ["ip"]}])], upstream={"url": url})
        body = chat_body("why is the sky blue")
        est = prompt_estimate(body)
        async with aiohttp.ClientSession() as s:
            left = 10000
            for max_tokens, admitted in ((None, est + 300), (700, est + 700)):
                b = body if max_tokens is None else {**body, "max_tokens": max_tokens}
                async with s.post(g.url + "/api/chat", json=b, timeout=T) as r:
                    assert r.status == 200 and (await r.read()).count(b"\n") == 501
                await settle(g)
                async with s.get(g.url + "/api/chat", timeout=T) as r:  # (a GET: admitted for nothing)
                    now = int(r.headers["x-ratelimit-remaining-tokens"])
                assert left - now == admitted, (max_tokens, left, now)
                left = now


async def test_a_stream_that_said_nothing_or_only_an_error_is_not_charged_the_estimate(make_gateway):
    """A stream is read even when it carries no output (a model that said nothing, an engine failure
    reported as an error event inside a 200): it costs the prompt, not the whole estimate the
    request was admitted with (that is for answers the gateway cannot read at all)."""
    from aiohttp import web

    from .test_observe import backend

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if body["model"] == "error":
            await resp.write(b'data: {"error": {"message": "engine died", "type": "InternalServerError"}}\n\n')
        else:
            await resp.write(b'data: {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant"}, '
                             b'"finish_reason": "stop"}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async with backend(chat) as url:
        g = await make_gateway([rl(strategy="fixed", rules=[
            {"name": "tpm", "limit": "10000/minute", "counts": "tokens", "key_by": ["ip"]}])],
            upstream={"url": url, "stream_usage": False})
        async with aiohttp.ClientSession() as s:
            left = 10000
            for model in ("silent", "error"):
                b = {**chat_body("why is the sky blue", stream=True, max_tokens=4000), "model": model}
                async with s.post(g.url + CHAT, json=b, timeout=T) as r:
                    assert r.status == 200
                    await r.read()
                await settle(g)
                async with s.get(g.url + "/v1/models", timeout=T) as r:
                    now = int(r.headers["x-ratelimit-remaining-tokens"])
                assert left - now == prompt_estimate(b), (model, left, now)
                left = now


# -- per-key overrides ----------------------------------------------------------------------------
async def test_per_key_overrides_take_precedence(make_gateway):
    g = await make_gateway([
        {"name": "test_identity", "config": {"keys": {"small": {"rpm": 2}, "quota": {"daily_tokens": 30},
                                                      "tok": {"tpm": 20}}}},
        rl(strategy="fixed", estimate_default_max_tokens=5, rules=[
            {"name": "per-key", "limit": "5/minute", "key_by": ["key"]},
            {"name": "per-key-tokens", "limit": "100000/minute", "counts": "tokens", "key_by": ["key"]}])])
    async with aiohttp.ClientSession() as s:
        async def run(key: str, n: int) -> list[tuple[int, Any, dict[str, str]]]:
            return [await post(s, g.url, headers={"X-Test-Key": key}) for _ in range(n)]

        small = await run("small", 3)
        assert [r[0] for r in small] == [200, 200, 429]
        assert small[0][2]["x-ratelimit-limit-requests"] == "2"
        assert "key-rpm (2/minute)" in small[2][1]["error"]["message"]
        big = await run("default", 6)
        assert [r[0] for r in big] == [200] * 5 + [429]
        assert big[0][2]["x-ratelimit-limit-requests"] == "5"
        # tpm override: 20 tokens per minute for this key instead of 100000
        st, _, h = await post(s, g.url, chat_body("a b c"), headers={"X-Test-Key": "tok"})
        assert st == 200 and h["x-ratelimit-limit-tokens"] == "20"
        await settle(g)
        st, body, _ = await post(s, g.url, chat_body("a b c", max_tokens=15), headers={"X-Test-Key": "tok"})
        assert st == 429 and "key-tpm (20/minute)" in body["error"]["message"]
        # daily token quota override -> insufficient_quota
        st, body, h = await post(s, g.url, chat_body("one two three"), headers={"X-Test-Key": "quota"})
        assert st == 200
        assert ietf(h["RateLimit-Policy"])["daily-tokens"]["q"] == "30"
        used = body["usage"]["total_tokens"]
        await settle(g)
        codes = []
        for _ in range(5):
            st, body, h = await post(s, g.url, chat_body("one two three"), headers={"X-Test-Key": "quota"})
            await settle(g)
            codes.append(st)
            if st == 429:
                break
            used += body["usage"]["total_tokens"]
        assert codes[-1] == 429
        assert body["error"]["code"] == "insufficient_quota" and body["error"]["type"] == "insufficient_quota"
        assert f"limit 30, used {used}," in body["error"]["message"]  # what was used (it can pass the limit)
        assert int(h["Retry-After"]) >= 1


async def test_a_keys_own_rpm_replaces_only_its_per_minute_limit(make_gateway):
    """A key's own rpm raises its limit per minute; the YAML's other windows for the key (per
    hour) and its limits keyed by key and something else (per key and model) still apply."""
    g = await make_gateway([
        {"name": "test_identity", "config": {"keys": {"big": {"rpm": 200}}}},
        rl(strategy="fixed", rules=[
            {"name": "per-key", "limit": "2/minute; 4/hour", "key_by": ["key"]},
            {"name": "per-key-model", "limit": "3/minute", "key_by": ["key", "model"]}])])
    async with aiohttp.ClientSession() as s:
        async def run(model: str, n: int) -> list[tuple[int, Any, dict[str, str]]]:
            return [await post(s, g.url, chat_body(model=model), headers={"X-Test-Key": "big"}) for _ in range(n)]

        first = await run("a", 4)  # over the YAML's 2/minute, within the key's own 200
        assert [r[0] for r in first] == [200, 200, 200, 429]
        assert "per-key-model (3/minute)" in first[3][1]["error"]["message"]
        pol = ietf(first[0][2]["RateLimit-Policy"])
        assert set(pol) == {"key-rpm", "per-key-1", "per-key-model"} and pol["key-rpm"]["q"] == "200"
        more = await run("b", 2)
        assert [r[0] for r in more] == [200, 429]
        assert "per-key (4/hour)" in more[1][1]["error"]["message"]


async def test_per_key_overrides_through_key_auth(make_gateway):
    if registry.get("key_auth") is None:
        pytest.skip("key_auth plugin not available")
    g = await make_gateway([{"name": "key_auth", "config": {}},
                            rl(rules=[{"name": "per-key", "limit": "5/minute", "key_by": ["key"]}])])
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", json={"owner": "alice", "name": "small",
                                                       "limits": {"rpm": 2}}, headers=admin, timeout=T) as r:
            if r.status != 201:
                pytest.skip(f"key_auth admin API not ready ({r.status})")
            small = (await r.json())["key"]
        async with s.post(g.admin_url + "/keys", json={"owner": "bob"}, headers=admin, timeout=T) as r:
            rec = await r.json()
            plain = rec["key"]
        res_small = [(await post(s, g.url, headers={"Authorization": f"Bearer {small}"}))[0] for _ in range(3)]
        res_plain = [(await post(s, g.url, headers={"Authorization": f"Bearer {plain}"}))[0] for _ in range(6)]
        # Giving the key its own rpm, then taking it away, keeps what it has used this minute
        # (its own limit counts on the per-key rule's counter): 5 used, own limit 8 -> 3 more.
        async def set_rpm(rpm: Any) -> None:
            async with s.patch(g.admin_url + f"/keys/{rec['id']}", json={"limits": {"rpm": rpm}},
                               headers=admin, timeout=T) as r:
                assert r.status == 200, await r.text()

        await set_rpm(8)
        res_own = [(await post(s, g.url, headers={"Authorization": f"Bearer {plain}"}))[0] for _ in range(4)]
        await set_rpm(None)
        res_back = (await post(s, g.url, headers={"Authorization": f"Bearer {plain}"}))[0]
    assert res_small == [200, 200, 429]
    assert res_plain == [200] * 5 + [429]
    assert res_own == [200, 200, 200, 429]
    assert res_back == 429  # 8 used of the YAML rule's 5


# -- quotas survive a restart ---------------------------------------------------------------------
async def test_quota_persists_across_restart(make_gateway, tmp_path):
    plugins = [rl(estimate_default_max_tokens=2, quotas={"daily_tokens": 40, "monthly_tokens": 1000})]
    g = await make_gateway(plugins)
    used = 0
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            st, body, _ = await post(s, g.url, chat_body("one two three four", max_tokens=2))
            assert st == 200
            used += body["usage"]["total_tokens"]
    await settle(g)
    await g.stop()  # flushes the quota writer into the SQLite file
    g2 = await make_gateway(plugins)  # same database file, fresh process state
    async with aiohttp.ClientSession() as s:
        st, _, h = await post(s, g2.url, chat_body("x", max_tokens=1))
        assert st == 200
        cur = ietf(h["RateLimit"])
        assert int(cur["daily-tokens"]["r"]) == 40 - used
        assert int(cur["monthly-tokens"]["r"]) == 1000 - used
        # the OpenAI-style token headers show the quota closest to running out
        assert h["x-ratelimit-limit-tokens"] == "40" and h["x-ratelimit-remaining-tokens"] == str(40 - used)
        used += 3  # that request: prompt 1 word + 1, completion 1
        await settle(g2)
        st, body, h = await post(s, g2.url, chat_body("y " * 60, max_tokens=2))
        assert st == 429 and body["error"]["code"] == "insufficient_quota"
        assert h["x-ratelimit-limit-tokens"] == "40"
        assert "daily tokens quota" in body["error"]["message"]
    await g2.stop()
    from sqlalchemy import create_engine, text
    eng = create_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    with eng.connect() as c:
        rows = c.execute(text("SELECT subject, period, tokens FROM rate_limit_quota_usage ORDER BY period")).all()
    eng.dispose()
    assert [r[0] for r in rows] == ["ip:127.0.0.1", "ip:127.0.0.1"]
    assert all(r[2] == used for r in rows)


# -- store failures -------------------------------------------------------------------------------
async def _timed_posts(url: str, n: int) -> list[tuple[int, float, Any]]:
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            t0 = time.monotonic()
            st, body, _ = await post(s, url)
            out.append((st, time.monotonic() - t0, body))
    return out


async def _metric(g: Any, name: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(g.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.parametrize("failure", ["stopped", "frozen"])
async def test_store_failure_allow_and_deny_never_hang(make_gateway, redis_server, failure):
    timeout = 0.3
    redis = redis_server()
    rules = [{"name": "r", "limit": "3/minute", "key_by": ["ip"]}]
    allow = await make_gateway([rl(storage=redis.url, storage_timeout=timeout, rules=rules)], name="a.yaml")
    deny = await make_gateway([rl(storage=redis.url + "/1", storage_timeout=timeout, on_store_error="deny",
                                  rules=rules)], name="d.yaml")
    ok = await _timed_posts(allow.url, 1)
    assert ok[0][0] == 200
    if failure == "stopped":
        redis.stop()
    else:
        redis.pause()
    try:
        a = await _timed_posts(allow.url, 5)  # more than the limit: all pass while the store is down
        d = await _timed_posts(deny.url, 3)
    finally:
        if failure == "frozen":
            redis.resume()
    print(f"{failure}: allow {[(st, round(t, 3)) for st, t, _ in a]}, deny {[(st, round(t, 3)) for st, t, _ in d]}")
    assert [st for st, _, _ in a] == [200] * 5
    assert [st for st, _, _ in d] == [503] * 3
    assert d[0][2]["error"]["code"] == "rate_limit_unavailable"
    for _, t, _ in a + d:
        assert t < timeout + 2.0, "a request waited past the store timeout"
    assert await _metric(allow, "gateway_ratelimit_store_errors_total") >= 1
    assert await _metric(deny, "gateway_ratelimit_store_errors_total") >= 1
    if failure == "frozen":
        # Once Redis answers again (and the retry pause is over) the limit is enforced again.
        await asyncio.sleep(1.2)
        res = await _timed_posts(allow.url, 5)
        assert 429 in [st for st, _, _ in res], res


# -- client IP ------------------------------------------------------------------------------------
async def test_rotating_forwarded_for_gains_nothing(make_gateway):
    rules = [{"name": "per-ip", "limit": "3/minute", "key_by": ["ip"]}]
    g = await make_gateway([rl(rules=rules)], name="plain.yaml")
    async with aiohttp.ClientSession() as s:
        res = [await post(s, g.url, headers={"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(6)]
    assert [r[0] for r in res] == [200, 200, 200, 429, 429, 429]
    # Behind a trusted proxy (the test client is 127.0.0.1) the header is believed, right to left.
    t = await make_gateway([rl(rules=rules)], name="trusted.yaml",
                           server={"trusted_proxies": ["127.0.0.1/32"]})
    async with aiohttp.ClientSession() as s:
        res = [await post(s, t.url, headers={"X-Forwarded-For": f"198.51.100.{i % 2}"}) for i in range(8)]
        spoof = [await post(s, t.url, headers={"X-Forwarded-For": f"10.9.9.{i}, 198.51.100.0"}) for i in range(2)]
    assert [r[0] for r in res] == [200] * 6 + [429, 429]
    # A client prepending fake hops does not escape: the right-most untrusted address counts.
    assert [r[0] for r in spoof] == [429, 429]


# -- headers --------------------------------------------------------------------------------------
async def test_header_values_match_the_remaining_budget(make_gateway):
    g = await make_gateway([rl(strategy="fixed", estimate_default_max_tokens=5, rules=[
        {"name": "rpm", "limit": "5/minute", "key_by": ["ip"]},
        {"name": "rph", "limit": "100/hour", "key_by": ["ip"]},
        {"name": "tpm", "limit": "1000/minute", "counts": "tokens", "key_by": ["ip"]}])])
    p = g.plugin("rate_limit")
    spent = 0
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            st, body, h = await post(s, g.url, chat_body("a b c d", max_tokens=3))
            assert st == 200
            # requests: the strictest rule (least remaining) is reported, after this request
            assert h["x-ratelimit-limit-requests"] == "5"
            assert h["x-ratelimit-remaining-requests"] == str(4 - i)
            assert h["X-RateLimit-Limit"] == "5" and h["X-RateLimit-Remaining"] == str(4 - i)
            cur, pol = ietf(h["RateLimit"]), ietf(h["RateLimit-Policy"])
            assert pol["rpm"] == {"q": "5", "w": "60"} and pol["rph"] == {"q": "100", "w": "3600"}
            assert pol["tpm"] == {"q": "1000", "qu": '"tokens"', "w": "60"}
            assert cur["rpm"]["r"] == str(4 - i) and cur["rph"]["r"] == str(99 - i)
            # tokens: what is left before this request's usage is charged
            assert h["x-ratelimit-remaining-tokens"] == str(1000 - spent) == cur["tpm"]["r"]
            # the store agrees with the headers
            lim = next(x for x in p.limits if x.rule == "rpm")
            _, remaining = await p.store.stats(lim.item, ("rpm", "ip:127.0.0.1"))
            assert remaining == 4 - i
            reset = int(h["X-RateLimit-Reset"])
            assert 0 <= reset <= 60 and int(cur["rpm"]["t"]) == reset
            assert h["x-ratelimit-reset-requests"].endswith("s")
            spent += body["usage"]["total_tokens"]
            await settle(g)
        st, body, h = await post(s, g.url)
        assert st == 429 and h["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(h["Retry-After"]) <= 60


async def test_headers_of_limits_all_used_up_name_the_one_that_frees_last(make_gateway):
    """A 5-second burst limit and an hourly one, both used up: the headers say what the refusal
    says, that the caller gets through in an hour, not in a few seconds."""
    g = await make_gateway([rl(strategy="fixed", rules=[
        {"name": "burst", "limit": "3 per 5 seconds", "key_by": ["ip"]},
        {"name": "hourly", "limit": "3/hour", "key_by": ["ip"]}])])
    async with aiohttp.ClientSession() as s:
        for want in (200, 200, 200, 429):
            st, _, h = await post(s, g.url)
            assert st == want
        assert h["X-RateLimit-Remaining"] == "0" and h["x-ratelimit-remaining-requests"] == "0"
        assert int(h["X-RateLimit-Reset"]) > 3500 and h["x-ratelimit-reset-requests"].startswith(("59m", "1h"))
        assert abs(int(h["X-RateLimit-Reset"]) - int(h["Retry-After"])) <= 1
        # the third request's headers (a 200 that used both up) say the same
        g2 = await make_gateway([rl(strategy="fixed", rules=[
            {"name": "burst", "limit": "1 per 5 seconds", "key_by": ["ip"]},
            {"name": "hourly", "limit": "1/hour", "key_by": ["ip"]}])])
        st, _, h = await post(s, g2.url)
        assert st == 200 and h["X-RateLimit-Limit"] == "1" and int(h["X-RateLimit-Reset"]) > 3500


async def test_the_upstreams_own_429_keeps_its_rate_limit_headers(make_gateway):
    """A backend refusing with 429 on tokens says so in its x-ratelimit-* headers: the client gets
    those and none of the gateway's rate-limit headers (its figures would contradict them); the
    gateway's other headers (the conversation id) stay its own; its 200s carry the gateway's."""
    from aiohttp import web

    from .test_observe import backend

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        if request.headers.get("X-Refuse"):
            return web.json_response(
                {"error": {"message": "Rate limit reached for tokens", "type": "tokens", "code": "rate_limit_exceeded"}},
                status=429, headers={"x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "0",
                                     "x-ratelimit-reset-tokens": "2.5s", "retry-after-ms": "2500",
                                     "X-Conversation-ID": "inner-tier-conversation"})
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    async with backend(chat) as url:
        g = await make_gateway([{"name": "conversations"}, rl(rules=[
            {"name": "rpm", "limit": "100/minute", "key_by": ["ip"]},
            {"name": "tpm", "limit": "200000/minute", "counts": "tokens", "key_by": ["ip"]}])], upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            st, _, h = await post(s, g.url)
            assert st == 200 and h["x-ratelimit-remaining-tokens"] == "200000"
            st, body, h = await post(s, g.url, headers={"X-Refuse": "1"})
    assert st == 429 and body["error"]["type"] == "tokens"
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"], h["x-ratelimit-reset-tokens"],
            h["retry-after-ms"]) == ("30000", "0", "2.5s", "2500")
    assert not {k.lower() for k in h} & {"x-ratelimit-limit-requests", "ratelimit", "ratelimit-policy",
                                         "x-ratelimit-remaining"}
    assert h["X-Conversation-ID"] != "inner-tier-conversation"


def test_openai_duration_format():
    assert duration(0) == "0s"
    assert duration(0.02) == "20ms"
    assert duration(1) == "1s"
    assert duration(1.5) == "1.5s"
    assert duration(360) == "6m0s"
    assert duration(3723) == "1h2m3s"


async def test_openai_sdk_gets_rate_limit_error(make_gateway):
    openai = pytest.importorskip("openai")
    g = await make_gateway([rl(rules=[{"name": "per-ip", "limit": "1/minute", "key_by": ["ip"]}])])
    client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    try:
        raw = await client.chat.completions.with_raw_response.create(model="demo-chat",
                                                                     messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as ei:
            await client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
        e = ei.value
        assert e.status_code == 429 and e.code == "rate_limit_exceeded"
        assert int(e.response.headers["retry-after"]) >= 1
        assert 1 <= int(e.response.headers["retry-after-ms"]) <= 60000
    finally:
        await client.close()


async def test_openai_sdk_backs_off_and_retries_after_429(make_gateway, upstream):
    openai = pytest.importorskip("openai")
    g = await make_gateway([rl(strategy="fixed", rules=[{"name": "per-ip", "limit": "1/second",
                                                          "key_by": ["ip"]}])])
    client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="unused", max_retries=3, timeout=10)
    try:
        msgs = [{"role": "user", "content": "hi"}]
        first = await client.chat.completions.create(model="demo-chat", messages=msgs)
        second = await client.chat.completions.create(model="demo-chat", messages=msgs)  # 429, waits, retries
    finally:
        await client.close()
    assert first.choices[0].message.content and second.choices[0].message.content
    refused = await _metric(g, "gateway_ratelimit_refused_total")
    print(f"SDK got {int(refused)} 429(s) before its retry passed")
    assert refused >= 1
    assert len([r for r in upstream.requests if r["path"] == CHAT]) == 2


# -- config ---------------------------------------------------------------------------------------
async def test_reload_keeps_in_memory_counters(make_gateway):
    await clear_of_a_minute_boundary()  # (a sliding window weighs the earlier minute less as it ends)
    g = await make_gateway([rl(rules=[{"name": "per-ip", "limit": "3/minute", "key_by": ["ip"]}])])
    async with aiohttp.ClientSession() as s:
        assert (await post(s, g.url))[0] == 200
        assert (await post(s, g.url))[0] == 200
        ok, detail = await g.gw.reload(actor="test")
        assert ok, detail
        assert [(await post(s, g.url))[0] for _ in range(2)] == [200, 429]


async def test_a_limit_changed_by_a_reload_applies_to_what_was_counted(make_gateway, upstream, tmp_path):
    """Lowering a limit does not hand every caller a fresh budget (the counters are the rule's, not
    the amount's); raising it lets the caller on at once. A changed window is a new counter."""
    await clear_of_a_minute_boundary()  # (its exact counts span a few seconds of sliding minutes)

    def plugins(limit):
        return [rl(rules=[{"name": "per-ip", "limit": limit, "key_by": ["ip"]}])]

    async def reload(limit):
        write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, plugins(limit)))
        ok, detail = await g.gw.reload(actor="test")
        assert ok, detail

    g = await make_gateway(plugins("5/minute"))
    async with aiohttp.ClientSession() as s:
        assert [(await post(s, g.url))[0] for _ in range(3)] == [200] * 3
        await reload("3/minute")  # 3 used of 3
        st, _, h = await post(s, g.url)
        assert st == 429 and h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"
        await reload("4/minute")
        assert [(await post(s, g.url))[0] for _ in range(2)] == [200, 429]
        await reload("4/hour")  # another window: counted afresh
        assert (await post(s, g.url))[0] == 200


async def test_the_order_of_key_by_is_not_a_new_counter(make_gateway, upstream, tmp_path):
    """[ip, model] and [model, ip] are one counter: tidying the YAML and reloading hands nobody a
    fresh budget."""
    def plugins(key_by):
        return [rl(rules=[{"name": "per-ip-model", "limit": "3/minute", "key_by": key_by}])]

    g = await make_gateway(plugins(["ip", "model"]))
    async with aiohttp.ClientSession() as s:
        assert [(await post(s, g.url))[0] for _ in range(3)] == [200] * 3
        write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, plugins(["model", "ip"])))
        ok, detail = await g.gw.reload(actor="test")
        assert ok, detail
        assert (await post(s, g.url))[0] == 429


async def test_reload_applies_the_quota_cache_ttl(make_gateway, upstream, tmp_path):
    def plugins(ttl):
        return [rl(rules=[], quotas={"daily_tokens": 1000, "cache_ttl": ttl})]

    g = await make_gateway(plugins(5))
    assert g.plugin("rate_limit")._quota.cache_ttl == 5
    write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, plugins(60)))
    ok, detail = await g.gw.reload(actor="test")
    assert ok, detail
    assert g.plugin("rate_limit")._quota.cache_ttl == 60  # the store every instance shares


async def test_reload_to_a_counter_store_that_cannot_be_reached_is_refused(make_gateway, redis_server, tmp_path):
    """A mistyped Redis host or password in a reload would make every limit stop applying (with
    on_store_error: allow): the reload is refused and the running store keeps counting."""
    redis = redis_server()
    rules = [{"name": "r", "limit": "2/minute", "key_by": ["ip"]}]
    g = await make_gateway([rl(storage=redis.url, rules=rules)])
    write_config(tmp_path / "gateway.yaml", base_config(g.gw.cfg.upstream.url, tmp_path, [
        rl(storage=f"redis://127.0.0.1:{free_port()}/0", rules=rules)]))
    ok, detail = await g.gw.reload(actor="test")
    assert not ok and "cannot be used" in detail and "Connect call failed" in detail, detail  # (and why)
    async with aiohttp.ClientSession() as s:
        assert [(await post(s, g.url))[0] for _ in range(3)] == [200, 200, 429]


async def test_a_redis_that_refuses_the_login_or_evicts_counters_is_named(make_gateway, redis_server, tmp_path,
                                                                         caplog):
    """A wrong password is said as such (a reload to it is refused, naming it), and a Redis that
    may evict keys when full, which would drop counters without an error anywhere, is warned
    about at start."""
    import subprocess

    redis = redis_server()
    port = redis.url.rsplit(":", 1)[1]
    for setting in (("maxmemory", "64mb"), ("maxmemory-policy", "allkeys-lru"), ("requirepass", "right-one")):
        subprocess.run(["redis-cli", "-p", port, "CONFIG", "SET", *setting], check=True, capture_output=True, timeout=10)
    rules = [{"name": "r", "limit": "2/minute", "key_by": ["ip"]}]
    caplog.set_level(logging.WARNING)
    g = await make_gateway([rl(storage=f"redis://:right-one@127.0.0.1:{port}/0", rules=rules)])
    told = [r.getMessage() for r in caplog.records if "evicts keys when full" in r.getMessage()]
    assert len(told) == 1 and "allkeys-lru" in told[0] and "right-one" not in told[0]
    write_config(tmp_path / "gateway.yaml", base_config(g.gw.cfg.upstream.url, tmp_path, [
        rl(storage=f"redis://:wrong-one@127.0.0.1:{port}/1", rules=rules)]))
    ok, detail = await g.gw.reload(actor="test")
    assert not ok and "cannot be used" in detail and "wrong-one" not in detail
    assert "password" in detail.lower() or "auth" in detail.lower(), detail


def test_bad_config_is_rejected(tmp_path: Path):
    for bad in ({"rules": [{"name": "x", "limit": "lots"}]},
                {"strategy": "leaky"},
                {"storage": "mongodb://x"},
                {"rules": [{"name": "x", "limit": "1/second", "key_by": ["colour"]}]},
                {"rules": [{"name": "x", "limit": "1/second"}, {"name": "x", "limit": "2/second"}]},
                # (the Redis client does not read a password there: it would connect without it)
                {"storage": "redis://127.0.0.1:6379/0?password=pw-in-the-query"}):
        cfg = base_config("http://127.0.0.1:9", tmp_path, [rl(**bad)])
        import yaml
        with pytest.raises(ConfigError) as ei:
            load_config_text(yaml.safe_dump(cfg))
        assert "pw-in-the-query" not in str(ei.value)


async def test_route_scoped_rules(make_gateway):
    g = await make_gateway(
        [rl(rules=[{"name": "per-ip", "limit": "100/minute", "key_by": ["ip"]}])],
        routes=[{"path_prefix": "/v1/embeddings", "methods": ["POST"],
                 "plugins": {"rate_limit": {"config": {"rules": [
                     {"name": "embed-per-ip", "limit": "2/minute", "key_by": ["ip", "route"]}]}}}}])
    async with aiohttp.ClientSession() as s:
        emb = []
        for _ in range(3):
            async with s.post(g.url + "/v1/embeddings", json={"model": "demo-embed", "input": "hi"}, timeout=T) as r:
                emb.append((r.status, r.headers.get("x-ratelimit-limit-requests")))
        chat = [(await post(s, g.url))[0] for _ in range(3)]
    assert emb == [(200, "2"), (200, "2"), (429, "2")]
    assert chat == [200, 200, 200]


async def test_quota_persists_on_postgresql(make_gateway, pg_url):
    plugins = [rl(estimate_default_max_tokens=2, quotas={"daily_tokens": 30})]
    db = {"url": pg_url, "auto_migrate": True}
    g = await make_gateway(plugins, database=db)
    async with aiohttp.ClientSession() as s:
        st, body, _ = await post(s, g.url, chat_body("one two three", max_tokens=2))
        st2, body2, _ = await post(s, g.url, chat_body("one two three", max_tokens=2))
    assert st == st2 == 200
    used = body["usage"]["total_tokens"] + body2["usage"]["total_tokens"]
    await settle(g)
    await g.stop()
    g2 = await make_gateway(plugins, database=db)
    async with aiohttp.ClientSession() as s:
        st, _, h = await post(s, g2.url, chat_body("x", max_tokens=1))
    assert st == 200 and int(ietf(h["RateLimit"])["daily-tokens"]["r"]) == 30 - used


def test_storage_uri_password_is_redacted():
    from gateway.plugins.rate_limit.store import async_uri, redacted
    assert redacted("redis://:s3cret@10.0.0.1:6379/0") == "redis://***@10.0.0.1:6379/0"
    assert redacted("redis://10.0.0.1:6379") == "redis://10.0.0.1:6379"
    assert async_uri("redis+sentinel://h:26379/svc") == "async+redis+sentinel://h:26379/svc"
    assert async_uri("memory://") == "async+memory://"


@contextlib.contextmanager
def sentinel(tmp_path: Any, primary_port: int, password: str | None = None) -> Iterator[int]:
    """A redis-server in sentinel mode watching the primary as ``mymaster`` (both behind
    ``password`` if given); yields its port, stopped after."""
    import shutil
    import subprocess
    sport = free_port()
    conf = tmp_path / "sentinel.conf"
    auth = f"requirepass \"{password}\"\n" if password else ""
    conf.write_text(f"port {sport}\nbind 127.0.0.1\ndir {tmp_path}\n{auth}"
                    f"sentinel monitor mymaster 127.0.0.1 {primary_port} 1\n"
                    + (f"sentinel auth-pass mymaster \"{password}\"\n" if password else ""))
    exe = shutil.which("redis-server")
    assert exe
    proc = subprocess.Popen([exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield sport
    finally:
        proc.terminate()
        proc.wait(5)


async def test_redis_sentinel_storage(make_gateway, redis_server, tmp_path):
    primary = redis_server()
    with sentinel(tmp_path, primary.port) as sport:
        g = await make_gateway([rl(storage=f"redis+sentinel://127.0.0.1:{sport}/mymaster", storage_timeout=2,
                                   on_store_error="deny",
                                   rules=[{"name": "s", "limit": "3/minute", "key_by": ["ip"]}])])
        async with aiohttp.ClientSession() as s:
            res = [(await post(s, g.url))[0] for _ in range(4)]
        assert res == [200, 200, 200, 429]
        # the counter really is on the primary the sentinel named
        import socket
        with socket.create_connection(("127.0.0.1", primary.port), timeout=2) as c:
            c.sendall(b"KEYS LIMITS*\r\n")
            assert b"LIMITS" in c.recv(4096)


async def test_memory_storage_sweeps_at_most_once_a_second():
    from limits import parse
    from limits.storage import MemoryStorage
    from limits.strategies import FixedWindowRateLimiter

    from gateway.plugins.rate_limit.store import build_storage
    # the private hook the throttle wraps is still there in the installed limits
    assert hasattr(MemoryStorage, "_MemoryStorage__schedule_expiry")
    st = build_storage("memory://", 0.25)
    assert isinstance(st, MemoryStorage)
    lim = FixedWindowRateLimiter(st)
    for i in range(50):
        assert lim.hit(parse("1/second"), f"k{i}")
    first = st.timer
    for i in range(50):
        lim.hit(parse("1/second"), f"x{i}")
        await asyncio.sleep(0.001)
    assert st.timer is first  # no sweep thread after the library's first one: sweeps run on the loop
    assert not lim.hit(parse("1/second"), "k0")  # counts are the library's own
    await asyncio.sleep(1.1)
    assert lim.hit(parse("1/second"), "k0")  # expired on read
    await asyncio.sleep(0.1)
    assert "LIMITER/k1/1/1/second" not in st.storage  # and the sweep ran again after a second
    st.timer.cancel()


async def test_memory_sweep_of_many_keys_runs_in_slices_between_requests(monkeypatch):
    """A sweep over many keys (one per client IP, say) goes a slice per event-loop turn: other work
    runs between the slices, expired counters and moving-window entries are all dropped, live
    ones kept."""
    from limits import parse
    from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

    from gateway.plugins.rate_limit import store as rl_store

    st = rl_store.build_storage("memory://", 0.25)
    fixed, moving = FixedWindowRateLimiter(st), MovingWindowRateLimiter(st)
    n = rl_store.SWEEP_SLICE * 3
    # No sweep while the keys are made and expire: on a busy machine making them takes over a
    # second, and a sweep then dropped the first ones, leaving too few for the slices to show.
    monkeypatch.setattr(rl_store, "SWEEP_EVERY", 1e9)
    try:
        for i in range(n):
            fixed.hit(parse("5/second"), f"f{i}")
            moving.hit(parse("5/second"), f"m{i}")
        await asyncio.sleep(1.1)  # every one of those has expired
        assert len(st.expirations) + len(st.events) == 2 * n
        monkeypatch.setattr(rl_store, "SWEEP_EVERY", 1.0)
        live = parse("5/minute")
        seen: set[int] = set()  # keys left, as other work on the loop sees them during the sweep

        async def ticker() -> None:
            while True:
                seen.add(len(st.expirations) + len(st.events))
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        assert fixed.hit(live, "live") and moving.hit(live, "live-m")  # starts a sweep
        for _ in range(200):
            await asyncio.sleep(0)
        t.cancel()
        assert len(st.expirations) == 1 and len(st.events) == 1  # only the live ones are left
        assert fixed.get_window_stats(live, "live").remaining == 4
        assert moving.get_window_stats(live, "live-m").remaining == 4
        # the loop ran between the slices: it saw the sweep half done, more than once
        assert len([x for x in seen if 2 < x < 2 * n + 2]) >= 3, sorted(seen)
    finally:
        st.timer.cancel()


async def test_headers_can_be_turned_off(make_gateway):
    g = await make_gateway([rl(headers=False, rules=[{"name": "per-ip", "limit": "2/minute", "key_by": ["ip"]}])])
    async with aiohttp.ClientSession() as s:
        res = [await post(s, g.url) for _ in range(3)]
    assert [r[0] for r in res] == [200, 200, 429]
    assert not any(k.lower().startswith(("ratelimit", "x-ratelimit")) for r in res for k in r[2])
    assert int(res[2][2]["Retry-After"]) >= 1


async def quota_store(tmp_path: Path) -> tuple[Any, Any]:
    """A quota store on its own SQLite file (no gateway): (database, store)."""
    from gateway.db import Database
    from gateway.plugins.rate_limit.quota import QuotaStore
    from gateway.services import Services

    d = Database(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}")
    await d.upgrade()
    return d, QuotaStore(Services(None, d), cache_ttl=0)  # type: ignore[arg-type]


class Session:
    """A database session passed through, for a test to slow one step of it down."""

    def __init__(self, s: Any) -> None:
        self.s = s

    async def __aenter__(self) -> "Session":
        await self.s.__aenter__()
        return self

    async def __aexit__(self, *a: Any) -> None:
        await self.s.__aexit__(*a)

    async def execute(self, *a: Any, **k: Any) -> Any:
        return await self.s.execute(*a, **k)

    async def commit(self) -> None:
        await self.s.commit()


async def test_quota_read_racing_a_write_does_not_lose_tokens(tmp_path):
    """A quota read that started before one of this instance's batches committed, and returns
    after, must not make those tokens vanish (the write already moved them from pending to db)."""
    d, q = await quota_store(tmp_path)
    gate, slow = asyncio.Event(), [False]
    real_session = d.session

    class Held(Session):  # a session whose query result is handed back only once the gate opens
        async def execute(self, *a: Any, **k: Any) -> Any:
            r = await self.s.execute(*a, **k)
            await gate.wait()
            return r

    d.session = lambda: Held(real_session()) if slow[0] else real_session()  # type: ignore[method-assign]
    try:
        assert await q.used("key:k", "d:x", 5) == 0
        q.charge("key:k", "d:x", 10)
        slow[0] = True
        read = asyncio.create_task(q.used("key:k", "d:x", 5))  # reads 0, then waits
        await asyncio.sleep(0.1)
        slow[0] = False
        await q.writer.flush(5)  # the 10 tokens commit meanwhile
        gate.set()
        assert await read == 10
        assert await q.used("key:k", "d:x", 5) == 10  # and the next read is a fresh one
    finally:
        await q.close()
        await d.close()


async def test_quota_read_between_a_commit_and_its_return_counts_it_once(tmp_path):
    """A quota read that sees a batch already committed, before the writer knows it is (its commit
    has not returned yet), must not count those tokens twice."""
    d, q = await quota_store(tmp_path)
    committed, release = asyncio.Event(), asyncio.Event()
    real_session = d.session

    class SlowReturn(Session):  # the writer's session: the commit lands, then returning from it takes a while
        async def commit(self) -> None:
            await self.s.commit()
            committed.set()
            await release.wait()

    def session() -> Any:
        t = asyncio.current_task()
        writer = t is not None and t.get_name().startswith("writer:")
        return SlowReturn(real_session()) if writer else real_session()

    d.session = session  # type: ignore[method-assign]
    try:
        assert await q.used("key:k", "d:x", 5) == 0
        q.charge("key:k", "d:x", 100)
        await asyncio.wait_for(committed.wait(), 5)
        assert await q.used("key:k", "d:x", 5) == 100  # the database has it; the writer does not know yet
        release.set()
        await q.writer.flush(5)
        assert await q.used("key:k", "d:x", 5) == 100
    finally:
        release.set()
        await q.close()
        await d.close()


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_a_request_one_rule_refuses_uses_up_no_other_rule(make_gateway, redis_server, where):
    """A caller over its own limit keeps retrying: those refused requests must not eat a budget
    other callers share (here a global one), in memory and on Redis."""
    storage = "memory://" if where == "memory" else redis_server().url
    g = await make_gateway([rl(storage=storage, rules=[
        {"name": "per-ip", "limit": "2/minute", "key_by": ["ip"]},
        {"name": "everyone", "limit": "5/minute", "key_by": "global"}])])
    async with aiohttp.ClientSession() as s:
        got = [await post(s, g.url) for _ in range(6)]
    assert [st for st, _, _ in got] == [200, 200, 429, 429, 429, 429]
    # the four refused ones counted nowhere: the shared budget has 3 left, the refusals say so too
    assert [int(ietf(h["RateLimit"])["everyone"]["r"]) for _, _, h in got] == [4, 3, 3, 3, 3, 3]
    assert all("per-ip" in b["error"]["message"] for st, b, _ in got if st == 429)


async def test_requests_arriving_at_once_that_one_rule_refuses_on_redis(make_gateway, redis_server):
    """On a shared store other requests count in between: the rules are counted one by one, the
    one with the least left first, stopping at a refusal. 30 requests at once from one IP under
    per-ip 1/minute: one passes, and the global budget counts that one alone."""
    # (a generous timeout: this is about the order of the counts, and on a busy machine the first
    # call's warm-up racing 29 others can take longer than the default 0.25 s)
    g = await make_gateway([rl(storage=redis_server().url, storage_timeout=3, rules=[
        {"name": "everyone", "limit": "1000/minute", "key_by": "global"},
        {"name": "per-ip", "limit": "1/minute", "key_by": ["ip"]}])])
    async with aiohttp.ClientSession() as s:
        got = await asyncio.gather(*[post(s, g.url) for _ in range(30)])
        assert sorted(st for st, _, _ in got) == [200] + [429] * 29
        st, _, h = await post(s, g.url)
    assert st == 429 and ietf(h["RateLimit"])["everyone"]["r"] == "999"


async def just_after_a_boundary(seconds: int) -> None:
    """Sleep until just past the next multiple of `seconds` (the windows' boundaries), unless already
    within 0.3 s after one."""
    into = time.time() % seconds
    if into >= 0.3:
        await asyncio.sleep(seconds - into + 0.02)


async def test_a_token_refusal_says_when_the_request_will_fit(make_gateway):
    """Sliding window (the default): the window's reset time is when the first token frees, too soon
    for a request that needs many. Retry-After / retry-after-ms say when this one fits, so a client
    (the OpenAI SDK) that waits that long gets in."""
    g = await make_gateway([{"name": "rate_limit", "config": {"estimate_default_max_tokens": 0, "rules": [
        {"name": "t", "limit": "40 per 2 seconds", "counts": "tokens", "key_by": ["ip"]}]}}])
    rl = g.plugin("rate_limit")
    small = {"model": "demo-chat", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}  # needs 12
    async with aiohttp.ClientSession() as s:
        await just_after_a_boundary(2)  # so the two requests fall in one window
        async with s.post(g.url + "/v1/chat/completions", headers={"X-Demo-Words": "30"},
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200  # 2 + 30 = 32 tokens
            await r.read()
        await rl.drain()
        async with s.post(g.url + "/v1/chat/completions", json=small) as r:
            assert r.status == 429
            wait_ms = int(r.headers["retry-after-ms"])
            await r.read()
        assert wait_ms > 200  # more than the first token freeing
        await asyncio.sleep(wait_ms / 1000)
        async with s.post(g.url + "/v1/chat/completions", json=small) as r:
            assert r.status == 200, await r.text()


async def test_with_several_token_rules_the_wait_given_fits_them_all(make_gateway, monkeypatch):
    g = await make_gateway([{"name": "rate_limit", "config": {"estimate_default_max_tokens": 0, "rules": [
        {"name": "short", "limit": "40 per 2 seconds", "counts": "tokens", "key_by": ["ip"]},
        {"name": "long", "limit": "36 per 4 seconds", "counts": "tokens"}]}}])
    rl = g.plugin("rate_limit")
    small = {"model": "demo-chat", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}  # needs 11
    async with aiohttp.ClientSession() as s:
        await just_after_a_boundary(4)  # a boundary of both windows
        async with s.post(g.url + "/v1/chat/completions", headers={"X-Demo-Words": "30"},
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200  # 32 tokens: both rules short of 11
            await r.read()
        await rl.drain()
        async with s.post(g.url + "/v1/chat/completions", json=small) as r:
            assert r.status == 429
            assert "rule long" in (await r.json())["error"]["message"]  # the one it fits last
            wait_ms = int(r.headers["retry-after-ms"])
        await asyncio.sleep(wait_ms / 1000)
        async with s.post(g.url + "/v1/chat/completions", json=small) as r:
            assert r.status == 200, await r.text()
        # The extra store call a refusal makes failing: still a 429 (the window's reset time), not a pass.
        from gateway.plugins.rate_limit.store import StoreDown

        async def down(*a, **k):
            raise StoreDown("timeout")

        monkeypatch.setattr(rl.store, "wait_for", down)
        async with s.post(g.url + "/v1/chat/completions", json={**small, "max_tokens": 30}) as r:
            assert r.status == 429 and "Retry-After" in r.headers
