"""Token quotas on several instances sharing one database and one real redis-server: each instance
adds its charges at once to a counter per quota period on Redis, so a quota holds across instances
as on one (not N times over within the database cache's ``cache_ttl``); the database stays the
record, so a lost counter or a Redis outage falls back to it."""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from .test_conversations_ops import metric
from .test_rate_limit import chat_body, ietf, post, rl, settle
from .test_rate_limit_store_edges import redis_cmd, redis_keys

WORDS = {"X-Demo-Words": "30"}  # completion 30 tokens; with the prompt "hi": 32 a request


def quota_plugins(redis_url: str, daily: int) -> list[dict[str, Any]]:
    # A long cache_ttl: an instance reads the database's figure once and relies on the shared counter.
    # (storage_timeout 2: an instance's first calls to a Redis it has not used yet, on a busy machine,
    # once took longer than the default 0.25 s, and it fell back to the database's figure)
    return [rl(storage=redis_url, estimate_default_max_tokens=0, storage_timeout=2,
               quotas={"daily_tokens": daily, "cache_ttl": 60})]


async def test_a_daily_quota_holds_across_three_instances(make_gateway, redis_server):
    redis = redis_server()
    gws = [await make_gateway(quota_plugins(redis.url, 100), name=f"g{i}.yaml") for i in range(3)]
    statuses, remaining, used = [], [], 0
    async with aiohttp.ClientSession() as s:
        for i in range(9):  # one request at a time, round robin over the instances
            g = gws[i % 3]
            st, body, h = await post(s, g.url, chat_body("hi"), headers=WORDS)
            statuses.append(st)
            remaining.append(int(ietf(h["RateLimit"])["daily-tokens"]["r"]))
            if st == 200:
                used += body["usage"]["total_tokens"]
            await settle(g)
    # 32 tokens a request: after 4 (128 used) none fits, whichever instance is asked
    assert statuses == [200] * 4 + [429] * 5, (statuses, remaining)
    assert used == 128
    # each answer shows what every instance used before it (the caller sees the same figure everywhere)
    assert remaining == [100, 68, 36, 4] + [0] * 5  # (128 used of 100: shown as none left)
    keys = redis_keys(redis.port, "*quota*")
    assert len(keys) == 1 and redis_cmd(redis.port, "GET", keys[0]).endswith("128\r\n")
    ttl = int(redis_cmd(redis.port, "TTL", keys[0]).strip(":\r\n"))
    assert 86400 <= ttl <= 2 * 86400 + 1  # the rest of the day, and a day more


async def test_a_lost_or_unreachable_counter_falls_back_to_the_database(make_gateway, redis_server):
    """The counter only adds to the database's record: after a FLUSHALL an instance still counts
    what the database holds, and with Redis stopped the quota is still enforced from it (no wait,
    whatever on_store_error says: the database answers)."""
    redis = redis_server()
    a = await make_gateway(quota_plugins(redis.url, 100), name="a.yaml")
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            assert (await post(s, a.url, chat_body("hi"), headers=WORDS))[0] == 200
        await settle(a)
        await a.plugin("rate_limit")._quota.writer.flush()
        redis_cmd(redis.port, "FLUSHALL")
        b = await make_gateway(quota_plugins(redis.url, 100), name="b.yaml")
        st, _, h = await post(s, b.url, chat_body("hi"), headers=WORDS)
        assert st == 200 and ietf(h["RateLimit"])["daily-tokens"]["r"] == "36"  # 64 used, from the database
        await settle(b)
        await b.plugin("rate_limit")._quota.writer.flush()
        redis.stop()
        c = await make_gateway([rl(storage=redis.url, estimate_default_max_tokens=0, on_store_error="deny",
                                   storage_timeout=0.3, quotas={"daily_tokens": 100, "cache_ttl": 60})],
                               name="c.yaml")
        st, body, h = await post(s, c.url, chat_body("hi"), headers=WORDS)
        assert st == 200 and ietf(h["RateLimit"])["daily-tokens"]["r"] == "4", body  # 96 used
        await settle(c)
        st, body, _ = await post(s, c.url, chat_body("hi"), headers=WORDS)
        assert st == 429 and body["error"]["code"] == "insufficient_quota"


async def test_a_token_rule_on_a_redis_that_is_down_leaves_the_quota_enforced_and_charged(make_gateway, redis_server,
                                                                                         tmp_path):
    """on_store_error: allow with a token rule and a daily quota: with Redis down the request goes on
    without the rule's counters (counted), but the quota, the database's, is still checked and
    every token used is still charged to it; the token rule's charges that the store cannot take
    are counted as dropped."""
    redis = redis_server()
    g = await make_gateway([rl(storage=redis.url, estimate_default_max_tokens=0, storage_timeout=0.3,
                               storage_retry=60, quotas={"daily_tokens": 100, "cache_ttl": 60},
                               rules=[{"name": "tpm", "limit": "100000/minute", "counts": "tokens",
                                       "key_by": ["ip"]}])])
    statuses, remaining = [], []
    async with aiohttp.ClientSession() as s:
        assert (await post(s, g.url, chat_body("hi"), headers=WORDS))[0] == 200  # 32 tokens
        await settle(g)
        redis.stop()
        for _ in range(4):
            st, body, h = await post(s, g.url, chat_body("hi"), headers=WORDS)
            statuses.append(st)
            remaining.append(ietf(h["RateLimit"])["daily-tokens"]["r"] if "RateLimit" in h else None)
            await settle(g)
        # the quota of 100 is checked as with Redis up: after 4 (128 used) it refuses, Redis or not
        assert statuses == [200, 200, 200, 429], (statuses, body)
        assert body["error"]["code"] == "insufficient_quota"
        assert remaining == ["68", "36", "4", "0"]  # the quota's own header stays
        assert await metric(g, "gateway_ratelimit_unchecked_total") == 3  # (the refused one is not)
        assert await metric(g, "gateway_ratelimit_store_errors_total", kind="charge_dropped") == 3
    await g.stop()
    from sqlalchemy import create_engine, text
    eng = create_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    with eng.connect() as c:
        rows = c.execute(text("SELECT subject, tokens FROM rate_limit_quota_usage")).all()
    eng.dispose()
    assert [tuple(r) for r in rows] == [("ip:127.0.0.1", 128)]  # every token used, the outage's included


async def test_a_quota_database_failure_leaves_the_request_rules_applied(make_gateway, tmp_path):
    """on_store_error: allow, healthy in-memory counters, a quota whose table cannot be read: the
    request rule still decides (the quota's failure is the database's, counted as such), and
    nothing is counted as let through without counters."""
    import sqlite3
    g = await make_gateway([rl(quotas={"daily_tokens": 100000, "cache_ttl": 0.01},
                               rules=[{"name": "rpm", "limit": "3/minute", "key_by": ["ip"]}])])
    async with aiohttp.ClientSession() as s:
        assert (await post(s, g.url, chat_body("hi")))[0] == 200
        await settle(g)
        db = sqlite3.connect(tmp_path / "gateway.db")
        db.execute("ALTER TABLE rate_limit_quota_usage RENAME TO away")
        db.commit()
        db.close()
        await asyncio.sleep(0.05)  # past the quota cache's ttl
        statuses = [(await post(s, g.url, chat_body("hi")))[0] for _ in range(5)]
        assert statuses == [200, 200, 429, 429, 429], statuses
        assert await metric(g, "gateway_ratelimit_unchecked_total") == 0
        assert await metric(g, "gateway_ratelimit_store_errors_total", storage="database") >= 2


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_the_rows_of_past_periods_are_deleted(make_gateway, request, backend):
    """A row per client address (or key) per day and month used to stay for ever: past periods
    are deleted in the background (days before yesterday, months before the last), in
    transactions of at most PRUNE_ROWS rows; the current ones and the quotas they hold stay."""
    import datetime as dt

    from sqlalchemy import func, select

    from gateway.plugins.rate_limit import quota

    db: dict[str, Any] = {}
    if backend == "postgresql":
        import uuid

        from .helpers import create_pg_database

        url = await create_pg_database(request.getfixturevalue("pg_cluster"), "gw_" + uuid.uuid4().hex[:12])
        db = {"url": url, "auto_migrate": True}
    g = await make_gateway([rl(quotas={"daily_tokens": 1000})], **({"database": db} if db else {}))
    store = g.plugin("rate_limit")._quota
    now = dt.datetime(2026, 11, 27, 0, 5, tzinfo=dt.timezone.utc)
    kept = ["d:2026-11-26", "d:2026-11-27", "m:2026-10", "m:2026-11"]
    old = ["d:2026-11-25", "d:2026-10-31", "m:2026-09", "m:2025-12"]
    rows = [{"subject": "key:k", "period": p, "tokens": 1, "updated_at": now} for p in kept + old]
    rows += [{"subject": f"ip:198.51.{i // 250}.{i % 250}", "period": "d:2026-01-02", "tokens": 1, "updated_at": now}
             for i in range(quota.PRUNE_ROWS + 7)]
    async with store.db.engine.begin() as conn:
        await conn.execute(quota.QuotaUsage.__table__.insert(), rows)
    assert await store.prune_periods(now) == len(old) + quota.PRUNE_ROWS + 7
    async with store.db.engine.connect() as conn:
        left = sorted(r[0] for r in await conn.execute(select(quota.QuotaUsage.period)))
        assert left == kept
        assert (await conn.execute(select(func.count()).select_from(quota.QuotaUsage.__table__))).scalar() == 4
    assert await store.prune_periods(now) == 0
