"""A stream its client cancels before the upstream's usage chunk: the upstream reported no token
counts, yet it read the whole prompt and generated what was relayed. Every ledger records the same
figures for it: the gateway's estimate of the prompt it sent upstream (characters / 4, a
conversation's history included) and one token per delta relayed, marked as estimated. The key's
usage, the audit event, the conversation's turn, the metrics and the rate limiter all agree."""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from .helpers import ADMIN_TOKEN, serve_handler, until
from .test_conversations import turns

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FIRST = "Tell me about the sea, the tides and the moon, at some length please."
SECOND = "And now about rivers, the longer the better."
PROBE = {"model": "demo-chat", "max_tokens": 5, "messages": [{"role": "user", "content": "probe"}]}


def estimate(*texts: str) -> int:
    return (sum(len(t) for t in texts) + 3) // 4


async def remaining(s: aiohttp.ClientSession, g: Any, auth: dict[str, str]) -> tuple[int, int]:
    """The token rule's remaining count as a probe is admitted, and what the probe then used."""
    await g.plugin("rate_limit").drain()
    async with s.post(g.url + "/v1/chat/completions", json=PROBE, headers=auth) as r:
        assert r.status == 200
        used = (await r.json())["usage"]["total_tokens"]
        return int(r.headers["x-ratelimit-remaining-tokens"]), used


async def test_every_ledger_records_a_cancelled_stream_s_prompt_estimate_and_relayed_deltas(
        make_gateway: Any) -> None:
    g = await make_gateway([
        {"name": "key_auth", "config": {"last_used_interval": 0}},
        {"name": "rate_limit", "config": {"rules": [
            {"name": "tpd", "limit": "10000000/day", "counts": "tokens", "key_by": ["key"]}]}},
        {"name": "conversations", "config": {"memory": {"enabled": True}}},
        {"name": "audit"},
        {"name": "metrics"},
    ])
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", json={"owner": "team-a"}, headers=ADMIN) as r:
            rec = await r.json()
        auth = {"Authorization": f"Bearer {rec['key']}"}
        client = AsyncOpenAI(base_url=g.url + "/v1", api_key=rec["key"], max_retries=0, timeout=20)

        # A first turn, answered whole: the conversation's history for the second.
        raw = await client.chat.completions.with_raw_response.create(
            model="demo-chat", messages=[{"role": "user", "content": FIRST}])
        cid = raw.headers["X-Conversation-ID"]
        answer = raw.parse().choices[0].message.content
        assert answer

        before, probe1 = await remaining(s, g, auth)
        # The second turn, streamed (memory sends the history with it); the client reads three
        # chunks and closes the stream.
        stream = await client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": SECOND}], stream=True,
            extra_headers={"X-Conversation-ID": cid, "X-Demo-Delay": "0.05", "X-Demo-Words": "60"})
        seen = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen += 1
            if seen == 3:
                break
        await stream.close()
        await client.close()

        async def recorded() -> Any:
            await g.plugin("key_auth").flush_usage()
            async with s.get(g.admin_url + "/audit?type=request&limit=100", headers=ADMIN) as r:
                evs = [e for e in (await r.json())["data"] if e["conversation_id"] == cid]
            t = await turns(g, cid)
            return (evs, t) if len(evs) == 2 and len(t) == 2 else None

        evs, ts = await until(recorded, what="the cancelled turn in the audit trail and the store")
        cut = next(e for e in evs if e["outcome"] == "client_disconnected")
        # What went upstream: the history (the first question and its answer), then the new question.
        est = estimate(FIRST, answer, SECOND)
        assert cut["tokens_estimated"] is True
        assert cut["tokens_in"] == est
        assert 3 <= cut["tokens_out"] < 60
        assert (ts[1].status, ts[1].prompt_tokens, ts[1].completion_tokens) == \
            ("client_disconnected", est, cut["tokens_out"])

        after, _ = await remaining(s, g, auth)
        # Between the two probes the limiter charged the first probe's usage and the cancelled stream.
        assert before - after == probe1 + est + cut["tokens_out"]

        # The key's usage and the metrics hold the same figures as the audit trail, request by request.
        await g.plugin("key_auth").flush_usage()
        async with s.get(g.admin_url + "/audit?type=request&limit=100", headers=ADMIN) as r:
            every = [e for e in (await r.json())["data"] if e["status"] == 200]
        assert len(every) == 4  # the first turn, two probes, the cancelled stream
        async with s.get(g.admin_url + f"/keys/{rec['id']}/usage", headers=ADMIN) as r:
            totals = (await r.json())["totals"]
        assert totals["requests"] == 4
        assert totals["prompt_tokens"] == sum(e["tokens_in"] for e in every)
        assert totals["completion_tokens"] == sum(e["tokens_out"] for e in every)
        async with s.get(g.admin_url + "/metrics", headers=ADMIN) as r:
            text = await r.text()
        tokens = {dict(x.labels)["direction"]: x.value for f in text_string_to_metric_families(text)
                  for x in f.samples if x.name == "gateway_tokens_total"}
        assert tokens == {"input": totals["prompt_tokens"], "output": totals["completion_tokens"]}


async def _error_stream(request: web.Request) -> web.StreamResponse:
    """An upstream answering 503 with an event stream that holds only an error (no output)."""
    await request.read()
    resp = web.StreamResponse(status=503, headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    return resp


async def test_an_error_answered_as_a_stream_with_no_output_records_no_tokens(make_gateway: Any) -> None:
    """The upstream generated nothing: no prompt estimate in any ledger (as the limiter charges nothing)."""
    runner, url = await serve_handler(_error_stream)
    try:
        g = await make_gateway([{"name": "audit"}, {"name": "metrics"}], upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions", json={
                    "model": "m", "stream": True, "messages": [{"role": "user", "content": "x" * 400}]}) as r:
                assert r.status == 503
                await r.read()
            evs = await until(lambda: audit_request_events(s, g), what="the audit event")
            async with s.get(g.admin_url + "/metrics", headers=ADMIN) as r:
                text = await r.text()
    finally:
        await runner.cleanup()
    assert (evs[0]["tokens_in"], evs[0]["tokens_out"], evs[0]["tokens_estimated"]) == (None, 0, True)
    assert "gateway_tokens_total{" not in text


async def audit_request_events(s: aiohttp.ClientSession, g: Any) -> Any:
    async with s.get(g.admin_url + "/audit?type=request", headers=ADMIN) as r:
        return (await r.json())["data"] or None


async def test_every_ledger_records_the_prompt_estimate_of_a_request_cut_before_its_head(make_gateway: Any) -> None:
    """A client that gives up while the model thinks, and a 504 for no head within first_byte: the
    upstream was reading the prompt; every ledger records its estimate (no output), marked."""
    g = await make_gateway([
        {"name": "key_auth", "config": {"last_used_interval": 0}},
        {"name": "rate_limit", "config": {"rules": [
            {"name": "tpd", "limit": "10000000/day", "counts": "tokens", "key_by": ["key"]}]}},
        {"name": "conversations"},
        {"name": "audit"},
        {"name": "metrics"},
    ], upstream={"timeouts": {"connect": 5, "first_byte": 1, "idle": 5}})
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", json={"owner": "team-a"}, headers=ADMIN) as r:
            rec = await r.json()
        auth = {"Authorization": f"Bearer {rec['key']}"}
        before, probe1 = await remaining(s, g, auth)
        body = {"model": "demo-chat", "messages": [{"role": "user", "content": FIRST}]}
        # the client leaves after 0.3 s; the next request gets the gateway's 504 after 1 s
        try:
            async with s.post(g.url + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.3),
                              headers={**auth, "X-Demo-Head-Delay": "3"}) as r:
                await r.read()
        except TimeoutError:
            pass
        async with s.post(g.url + "/v1/chat/completions", json=body, headers={**auth, "X-Demo-Head-Delay": "3"}) as r:
            assert r.status == 504
            await r.read()

        after, _ = await remaining(s, g, auth)

        async def recorded() -> Any:
            async with s.get(g.admin_url + "/audit?type=request&limit=100", headers=ADMIN) as r:
                evs = (await r.json())["data"]
            return evs if len(evs) == 4 else None  # two probes, the two cut requests

        every = await until(recorded, what="four requests in the audit trail")
        cut = [e for e in every if e["outcome"] != "ok"]
        await g.plugin("key_auth").flush_usage()
        async with s.get(g.admin_url + f"/keys/{rec['id']}/usage", headers=ADMIN) as r:
            totals = (await r.json())["totals"]
        async with s.get(g.admin_url + "/metrics", headers=ADMIN) as r:
            text = await r.text()
        turns_of = [await turns(g, e["conversation_id"]) for e in cut]
    est = estimate(FIRST)
    assert sorted(e["outcome"] for e in cut) == ["client_disconnected", "upstream_timeout"]
    assert [(e["tokens_in"], e["tokens_out"], e.get("tokens_estimated")) for e in cut] == [(est, 0, True)] * 2
    assert [(t[0].prompt_tokens, t[0].completion_tokens) for t in turns_of] == [(est, 0)] * 2
    assert before - after == probe1 + 2 * est  # the limiter charged the same
    # key usage: the probes' reported prompts, and the two estimates
    assert (totals["requests"], totals["prompt_tokens"]) == (4, sum(e["tokens_in"] for e in every))
    assert f'gateway_tokens_total{{direction="input",model="unknown"}} {float(2 * est)}' in text



def test_a_span_of_a_request_cut_before_its_head_has_the_prompt_estimate() -> None:
    from types import SimpleNamespace

    from gateway.plugins.tracing.genai import attributes
    ctx = SimpleNamespace(json={"model": "m", "messages": []}, model="m", conversation_id=None, completion=None,
                          cut_estimate=18, lpath="/v1/chat/completions")
    a = attributes("chat", ctx, "", False, 100)
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"], a["gateway.tokens_estimated"]) == \
        (18, 0, True)


async def _head_then_silence(request: web.Request) -> web.StreamResponse:
    """The head at once (not an event stream), then nothing for 3 s."""
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    await asyncio.sleep(3)
    return resp


async def test_a_client_that_leaves_after_the_head_came_is_no_cut_before_the_head(make_gateway: Any) -> None:
    """The head came (the gateway was still reading the first bytes to tell a stream): not the
    'cut before the head' case, whose estimate goes to every ledger."""
    runner, url = await serve_handler(_head_then_silence)
    try:
        g = await make_gateway([{"name": "audit"}], upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            try:
                async with s.post(g.url + "/v1/chat/completions", timeout=aiohttp.ClientTimeout(total=0.5),
                                  json={"model": "m", "stream": True,
                                        "messages": [{"role": "user", "content": FIRST}]}) as r:
                    await r.read()
            except TimeoutError:
                pass
            evs = await until(lambda: audit_request_events(s, g), what="the audit event")
    finally:
        await runner.cleanup()
    assert evs[0]["outcome"] == "client_disconnected" and evs[0]["upstream_headers_ms"] is not None
    assert "tokens_estimated" not in evs[0]
