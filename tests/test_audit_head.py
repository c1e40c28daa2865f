"""Recorded heads: the chain alone cannot tell that its newest rows were removed (what remains links
up), nor rows appended again in their place. The gateway logs its head (``audit head: seq=N
hash=H``); ``gateway audit verify --head N:H`` (and ``GET /audit/verify?head=N:H``) compares it
with the trail: truncated, replaced, found, or deleted by retention."""
from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from gateway.db import Database
from gateway.plugins.audit import store

from .test_audit import AUTH, T, acli, post

AUDIT = [{"name": "audit", "config": {"sinks": ["database"], "flush_interval": 0.05}}]
HEAD_LINE = re.compile(r"audit head: seq=(\d+) hash=([0-9a-f]{64})")


def logged_heads(caplog: Any) -> list[tuple[int, str]]:
    out = []
    for r in caplog.records:
        m = HEAD_LINE.match(r.getMessage())
        if m:
            out.append((int(m.group(1)), m.group(2)))
    return out


async def traffic(g: Any, n: int) -> None:
    async with aiohttp.ClientSession(timeout=T) as s:
        for _ in range(n):
            assert (await post(s, g.url))[0] == 200


async def test_a_recorded_head_catches_rows_removed_from_the_end_and_appended_again(
        make_gateway: Any, tmp_path: Path, caplog: Any) -> None:
    # (logging.level WARNING: the head lines are logged all the same)
    g = await make_gateway(AUDIT, logging={"level": "WARNING"})
    await traffic(g, 2)
    await g.plugin("audit").sinks[0][1].flush(10)  # the first write: its head is logged at once
    await traffic(g, 3)
    await g.stop()  # flushes, and says the head it leaves behind
    heads = logged_heads(caplog)
    assert len(heads) == 2, heads  # (not one line per write: at most one per HEAD_LOG_INTERVAL)
    assert heads[0][0] <= 2
    seq, h = heads[-1]
    assert seq == 5
    cfg = tmp_path / "gateway.yaml"

    r = await acli(cfg, "verify", "--json", "--head", f"{seq}:{h}")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert (out["last_seq"], out["head_hash"]) == (seq, h)  # verify's own report gives the same head
    assert out["heads"] == [{"seq": seq, "hash": h, "result": "found"}]
    assert "recorded head(s) at seq 5 found" in out["message"]

    # The last two rows removed: the chain alone still verifies; the recorded head does not.
    db = sqlite3.connect(tmp_path / "gateway.db")
    db.execute("DELETE FROM audit_events WHERE seq >= 4")
    db.commit()
    db.close()
    assert (await acli(cfg, "verify")).returncode == 0
    r = await acli(cfg, "verify", "--json", "--head", f"{seq}:{h}")
    assert r.returncode == 1, r.stdout + r.stderr
    broken = json.loads(r.stdout)["broken"]
    assert broken["problem"] == "truncated" and broken["seq"] == 5
    assert "ends at seq 3" in broken["detail"]

    # A gateway appends again in their place: seq 5 exists once more, with another hash.
    g2 = await make_gateway(AUDIT, name="again.yaml")
    await traffic(g2, 3)
    await g2.stop()
    assert (await acli(cfg, "verify")).returncode == 0
    r = await acli(cfg, "verify", "--head", f"{seq}:{h}")
    assert r.returncode == 1 and "BROKEN at seq 5 (replaced)" in r.stdout, r.stdout + r.stderr
    # an earlier head still in place is found; the first one that differs is reported
    r = await acli(cfg, "verify", "--head", f"{heads[0][0]}:{heads[0][1]}")
    assert r.returncode == 0 and "found" in r.stdout, r.stdout + r.stderr

    # A malformed head is the caller's error (exit 2), not a verdict
    for bad in ("5", "5:abc", "x:" + "0" * 64, "0:" + "0" * 64, "9" * 19 + ":" + "0" * 64, "9" * 5000):
        r = await acli(cfg, "verify", "--head", bad)
        assert r.returncode == 2 and "recorded head" in r.stderr, (bad, r.stderr)


async def test_recorded_heads_over_the_admin_api_and_across_a_retention_purge(make_gateway: Any,
                                                                              tmp_path: Path) -> None:
    g = await make_gateway(AUDIT)
    await traffic(g, 3)
    await g.plugin("audit").sinks[0][1].flush(10)

    async def verify(*heads: str) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.get(g.admin_url + "/audit/verify", params=[("head", x) for x in heads],
                             headers=AUTH) as r:
                return r.status, await r.json()

    st, first = await verify()
    assert st == 200 and first["ok"] and first["heads"] == []
    h1 = f"{first['last_seq']}:{first['head_hash']}"
    await traffic(g, 2)
    await g.plugin("audit").sinks[0][1].flush(10)
    st, second = await verify(h1)
    assert st == 200 and second["ok"] and second["heads"][0]["result"] == "found", second
    h2 = f"{second['last_seq']}:{second['head_hash']}"

    st, body = await verify("12:" + "z" * 64)
    assert st == 400 and body["error"]["code"] == "invalid_value" and body["error"]["param"] == "head"
    st, body = await verify(*[h1] * 101)
    assert st == 400 and "at most 100" in body["error"]["message"]

    # Retention deletes every row so far: h2's row was the last deleted (the purge's anchor: its
    # hash is still compared), h1's is before it (deleted, not comparable, not an error).
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    try:
        later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)).isoformat()
        assert await store.purge(db, later) is not None
    finally:
        await db.close()
    st, after = await verify(h1, h2)
    assert st == 200 and after["ok"], after
    assert after["anchor"]["seq"] == second["last_seq"]
    assert [x["result"] for x in after["heads"]] == ["purged", "anchor"]
    assert "deleted by retention" in after["message"]
    forged = f"{second['last_seq']}:{'0' * 64}"
    st, after = await verify(forged)
    assert st == 200 and not after["ok"] and after["broken"]["problem"] == "replaced"


async def test_events_the_writer_gave_up_on_are_marked_in_the_trail(make_gateway: Any, tmp_path: Path) -> None:
    """The database unavailable for longer than retry_for: the requests' events are dropped (and
    counted). The trail itself says so with its next batch: an audit.dropped event with the count,
    where they belong, so a reader of the trail (not only of the metrics) sees the gap."""
    from .helpers import until

    g = await make_gateway([{"name": "audit", "config": {"sinks": ["database"], "retry_for": 0.5,
                                                         "flush_interval": 0.05}}])
    writer = g.plugin("audit").sinks[0][1]
    await traffic(g, 1)
    await writer.flush(10)
    db = tmp_path / "gateway.db"
    away = tmp_path / "away.db"
    db.rename(away)
    await traffic(g, 3)
    await until(lambda: writer.dropped >= 3, timeout=20, what="the 3 events dropped")
    away.rename(db)
    await traffic(g, 1)
    await writer.flush(10)
    con = sqlite3.connect(db)
    rows = [json.loads(d) for (d,) in con.execute("SELECT data FROM audit_events ORDER BY seq")]
    con.close()
    types = [r["type"] for r in rows]
    assert types == ["request", "audit.dropped", "request"], types
    marker = rows[1]
    assert marker["dropped"] == 3 and marker["after"] is not None and marker["actor"] == "system"
    r = await acli(tmp_path / "gateway.yaml", "verify")
    assert r.returncode == 0, r.stdout + r.stderr
