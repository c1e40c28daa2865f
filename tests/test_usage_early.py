"""A stream whose usage report comes before (some of) its output: an upstream that reports at the
start, the stream then cut short by the client. What was relayed after the report is counted (as
the deltas of a stream without a report are), in every view; a report on every chunk, which
covers the chunk's own output, is taken as it is."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from gateway.observe import Completion, ResponseObserver

from .helpers import ADMIN_TOKEN, recorded_usage_and_audit, until
from .test_observe import backend

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def chunk(content: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    obj: dict[str, Any] = {"id": "c1", "model": "m", "choices": [] if content is None else [
        {"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def observe(*events: bytes) -> Completion:
    o = ResponseObserver(True, False)
    for e in events:
        o.feed(e)
    o.finish()
    return o.c


def test_which_reports_cover_the_output() -> None:
    first = {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}
    c = observe(chunk(usage=first), *(chunk(f"t{i} ") for i in range(5)))  # reported first, then cut
    assert c.usage_stale and (c.completion_tokens, c.total_tokens) == (5, 14)
    c = observe(*(chunk(f"t{i} ", {"prompt_tokens": 9, "completion_tokens": i + 1, "total_tokens": 10 + i})
                  for i in range(5)))  # on every chunk (vLLM's continuous usage): each covers its own
    assert not c.usage_stale and (c.completion_tokens, c.total_tokens) == (5, 14)
    c = observe(*(chunk(f"t{i} ") for i in range(5)), chunk(usage={"prompt_tokens": 9, "completion_tokens": 7,
                                                                   "total_tokens": 16}))  # at the end
    assert not c.usage_stale and (c.completion_tokens, c.total_tokens) == (7, 16)


async def test_a_cut_stream_reported_at_its_start_is_charged_what_it_delivered(make_gateway: Any) -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("", {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}))
        for i in range(40):
            await resp.write(chunk(f"t{i} "))
            await asyncio.sleep(0.05)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async with backend(chat) as url:
        g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {"flush_interval": 0.05}},
                                {"name": "metrics"}], upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=ADMIN) as r:
                rec = await r.json()
            async with s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {rec['key']}"},
                              json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
                got = 0
                async for line in r.content:
                    got += line.startswith(b"data: {") and b'"content": "t' in line
                    if got == 6:
                        break  # the client leaves after 6 deltas
            # once the gateway noticed and the records are written
            totals, events = await until(lambda: recorded_usage_and_audit(g, s, rec["id"]), every=0.1,
                                         what="the usage and the audit event")
            async with s.get(g.admin_url + "/metrics", headers=ADMIN) as r:
                metrics = await r.text()
    ev = events[0]
    assert ev["outcome"] == "client_disconnected"
    assert ev["tokens_in"] == 9 and ev["tokens_out"] >= 6 and ev["tokens_estimated"] is True, ev
    assert totals["prompt_tokens"] == 9 and totals["completion_tokens"] == ev["tokens_out"], totals
    out = [line for line in metrics.splitlines() if line.startswith('gateway_tokens_total{direction="output"')]
    assert out and float(out[0].rsplit(" ", 1)[1]) == ev["tokens_out"], out


async def test_a_report_without_a_valid_output_count_counts_the_deltas_everywhere(make_gateway: Any) -> None:
    """A stream whose usage chunk has a completion count that is no count (negative, fractional, a
    string): taken as not reported, so every ledger counts the 8 deltas relayed, the conversation
    turn too, as they count those of a stream with no report at all."""
    bad = iter([-5, 1.5, "12"])

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(8):
            await resp.write(chunk(f"t{i} "))
        await resp.write(chunk(usage={"prompt_tokens": 9, "completion_tokens": next(bad), "total_tokens": 30}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async with backend(chat) as url:
        g = await make_gateway([{"name": "key_auth"}, {"name": "conversations", "config": {"flush_interval": 0.05}},
                                {"name": "audit", "config": {"flush_interval": 0.05}}, {"name": "metrics"}],
                               upstream={"url": url})
        conv = g.plugin("conversations")
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=ADMIN) as r:
                rec = await r.json()
            cids = []
            for _ in range(3):
                async with s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {rec['key']}"},
                                  json={"model": "m", "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]}) as r:
                    assert r.status == 200 and (await r.read()).count(b'"content": "t') == 8
                    cids.append(r.headers["X-Conversation-ID"])

            async def all_in() -> Any:
                got = await recorded_usage_and_audit(g, s, rec["id"])
                return got if got is not None and got[0]["requests"] == 3 and len(got[1]) == 3 else None

            totals, events = await until(all_in, every=0.1, what="the usage and the audit events")
            async with s.get(g.admin_url + "/metrics", headers=ADMIN) as r:
                metrics = await r.text()
            await conv.flush()
            turns = []
            for cid in cids:
                async with s.get(g.admin_url + f"/conversations/{cid}", headers=ADMIN) as r:
                    turns.append((await r.json())["completion_tokens"])
    assert [(ev["tokens_in"], ev["tokens_out"], ev.get("tokens_estimated")) for ev in events] == [(9, 8, True)] * 3
    assert totals["prompt_tokens"] == 27 and totals["completion_tokens"] == 24, totals
    out = [line for line in metrics.splitlines() if line.startswith('gateway_tokens_total{direction="output"')]
    assert out and float(out[0].rsplit(" ", 1)[1]) == 24, out
    assert turns == [8, 8, 8]
    # each turn: the report's prompt count, the deltas, and no total (the report's counts a bad count)
    from sqlalchemy import select

    from gateway.plugins.conversations.store import T as turn_table
    async with g.gw.db.engine.connect() as conn:
        rows = (await conn.execute(select(turn_table.c.prompt_tokens, turn_table.c.completion_tokens,
                                          turn_table.c.total_tokens))).all()
    assert sorted(tuple(r) for r in rows) == [(9, 8, None)] * 3
