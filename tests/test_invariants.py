"""Checks that each guard one invariant on their own (the other tests would still pass without
them): every column the audit chain verifies, the anchor's hash after a purge, the genesis link
and the seq column; the documented key hash; a key lookup racing a revoke; an unsampled caller
trace continued upstream; the rate-limit refusal metric's label; a refused reload's settings and
redacted reason."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
from types import SimpleNamespace as R
from typing import Any

import aiohttp
import pytest

from gateway.plugins.audit.chain import GENESIS, INDEXED, record_body, record_text, row_hash, verify_rows
from gateway.plugins.key_auth.keys import hash_secret

from .test_key_auth import admin, ka, new_key
from .test_metrics import scrape
from .test_rate_limit import post as rl_post, rl
from .test_tracing import CHAT, post, tracing

TID = "4bf92f3577b34da6a3ce929d0e0e4736"


def trail(n: int) -> list[Any]:
    out, prev = [], GENESIS
    for seq in range(1, n + 1):
        ev = {"time": f"2024-01-01T00:00:0{seq}.000000Z", "type": "request", "request_id": f"r{seq}",
              "key_id": f"k{seq}", "owner": f"o{seq}", "client_ip": "10.0.0.1", "status": 200}
        data = record_text(seq, record_body(ev))
        h = row_hash(prev, data)
        out.append(R(seq=seq, prev_hash=prev, hash=h, data=data, **ev))
        prev = h
    return out


def rechain(rs: list[Any], prev: str) -> None:
    for r in rs:
        r.prev_hash, r.hash = prev, row_hash(prev, r.data)
        prev = r.hash


async def walk(rs: list[Any], anchor: Any = None) -> Any:
    async def it():
        for r in rs:
            yield r
    return await verify_rows(it(), anchor)


@pytest.mark.parametrize("col", INDEXED)
async def test_verify_compares_every_indexed_column(col: str) -> None:
    """An edited filter column (the record untouched) is reported, whichever column."""
    rs = trail(3)
    setattr(rs[1], col, 999 if col == "status" else "forged")
    res = await walk(rs)
    assert not res.ok and res.broken["seq"] == 2 and col in res.broken["detail"], res.message()


async def test_first_row_after_the_anchor_must_follow_its_hash() -> None:
    """The rows after a purge anchor replaced (re-chained from another hash) are reported."""
    rs = trail(5)
    anchor = {"seq": 2, "hash": rs[1].hash}
    rest = rs[2:]
    rechain(rest, "f" * 64)
    res = await walk(rest, anchor)
    assert not res.ok and res.broken["seq"] == 3 and res.broken["problem"] == "deleted", res.message()


async def test_first_row_must_start_at_genesis() -> None:
    """A trail whose first row does not chain from the genesis value is reported."""
    rs = trail(3)
    rechain(rs, "ab" * 32)
    res = await walk(rs)
    assert not res.ok and res.broken == {"seq": 1, "problem": "inserted", "detail": res.broken["detail"]}


async def test_seq_column_must_match_the_record() -> None:
    """The oldest rows deleted and the rest renumbered from 1 and re-chained from genesis."""
    rs = trail(5)[2:]
    for i, r in enumerate(rs, 1):
        r.seq = i
    rechain(rs, GENESIS)
    res = await walk(rs)
    assert not res.ok and res.broken["seq"] == 1 and "seq column" in res.broken["detail"], res.message()


def test_pepper_hash_is_hmac_sha256_of_the_secret_keyed_by_the_pepper() -> None:
    """The stored hash is the documented HMAC-SHA-256(pepper, secret) (a known answer)."""
    assert hash_secret("pep", "sec") == hmac.new(b"pep", b"sec", hashlib.sha256).hexdigest()
    assert hash_secret("", "sec") == hashlib.sha256(b"sec").hexdigest()


async def test_a_lookup_racing_a_revoke_is_not_cached(make_gateway: Any) -> None:
    """A key lookup that read the row before a revoke, and finished after it, is not cached."""
    g = await make_gateway(ka(cache_ttl=60))
    rec = await new_key(g)
    store = g.plugin("key_auth").store
    orig, gate, read = store.get_row, asyncio.Event(), asyncio.Event()

    async def slow(key_id: str) -> Any:
        row = await orig(key_id)
        read.set()
        await gate.wait()
        return row

    store.get_row = slow

    async def call() -> int:
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions", json=CHAT,
                              headers={"Authorization": "Bearer " + rec["key"]}) as r:
                return r.status

    first = asyncio.create_task(call())
    await asyncio.wait_for(read.wait(), 10)
    st, _ = await admin(g, "POST", f"/keys/{rec['id']}/revoke")
    assert st == 200
    gate.set()
    await first
    store.get_row = orig
    assert await call() == 401


async def test_unsampled_caller_trace_id_goes_upstream(make_gateway: Any, upstream: Any) -> None:
    """A caller's unsampled trace (flags 00) is continued upstream with the caller's trace id."""
    g = await make_gateway([tracing()])
    st, _ = await post(g.url + "/v1/chat/completions", CHAT, {"traceparent": f"00-{TID}-b7ad6b7169203331-00"})
    assert st == 200
    tp = upstream.requests[-1]["headers"]["traceparent"].split("-")
    assert tp[1] == TID and int(tp[3], 16) & 1 == 0, tp


async def test_ratelimit_refusals_are_labelled_by_limit(make_gateway: Any) -> None:
    """Gateway_ratelimit_refusals_total{limit=...} names the rule, not the reason."""
    g = await make_gateway([rl(rules=[{"name": "tiny", "limit": "1/minute", "key_by": "global"}]), {"name": "metrics"}])
    async with aiohttp.ClientSession() as s:
        assert (await rl_post(s, g.url))[0] == 200
        assert (await rl_post(s, g.url))[0] == 429
        m = await scrape(s, g.admin_url)
    labels = [dict(k)["limit"] for k in m["gateway_ratelimit_refusals_total"]]
    assert any(lbl.startswith("tiny") for lbl in labels), labels


async def test_a_refused_reload_keeps_the_running_settings_and_hides_secrets(make_gateway: Any, monkeypatch: Any) -> None:
    """A plugin failing to start leaves services.settings on the running config, and the
    reason (which may quote a URL with a password) is redacted."""
    from gateway.plugins.headers import Headers
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-A": "1"}}}])
    running = g.gw.cfg

    async def broken(self: Any) -> None:
        raise RuntimeError("cannot reach redis://user:hunter2@127.0.0.1:1/0")

    monkeypatch.setattr(Headers, "startup", broken)
    ok, detail = await g.gw.reload(actor="test")
    assert not ok and "hunter2" not in detail, detail
    assert g.gw.services.settings is running
