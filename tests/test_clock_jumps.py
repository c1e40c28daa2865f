"""A wall clock stepped ahead while the gateway runs (a mistyped `date -s`, a VM resumed before NTP
corrects it) must not make retention delete what is not old: 400 days ahead for a few seconds
emptied the audit trail and every conversation. Deletions by age wait while the wall clock is
ahead of where the monotonic clock puts it; a clock that moved back deletes less, and goes on."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

import gateway.clock
import gateway.plugins.audit
from gateway.clock import SETTLE, WallClock

from .helpers import until

CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}
DAY = 86400.0


def test_deletions_wait_while_the_wall_clock_is_ahead(monkeypatch: Any, caplog: Any) -> None:
    now = {"wall": 1_800_000_000.0, "mono": 1000.0}
    monkeypatch.setattr(gateway.clock.time, "time", lambda: now["wall"])
    monkeypatch.setattr(gateway.clock.time, "monotonic", lambda: now["mono"])
    c = WallClock()

    def tick(s: float, wall_jump: float = 0.0) -> None:
        now["mono"] += s
        now["wall"] += s + wall_jump

    tick(3600)
    assert c.deletions_allowed("x")  # in step
    tick(10, -7200)
    assert c.deletions_allowed("x")  # back two hours: deletes less than intended, never more
    tick(10, 7200 + 400 * DAY)
    with caplog.at_level(logging.WARNING, "gateway.clock"):
        assert not c.deletions_allowed("audit retention")
    assert "audit retention skipped" in caplog.text
    tick(60, -400 * DAY)
    assert c.deletions_allowed("x")  # back where it was
    tick(60, 3 * 3600)  # ahead again, for good this time (an operator's correction)
    assert not c.deletions_allowed("x")
    tick(SETTLE - 1)
    assert not c.deletions_allowed("x")
    tick(2)
    assert c.deletions_allowed("x")  # held long enough: the new time is taken
    tick(3600)
    assert c.deletions_allowed("x")


async def test_audit_retention_keeps_the_trail_when_the_clock_jumps_ahead(make_gateway: Any, monkeypatch: Any,
                                                                          tmp_path: Path, caplog: Any) -> None:
    monkeypatch.setattr(gateway.plugins.audit, "FIRST_PURGE_DELAY", 0.2)
    monkeypatch.setattr(gateway.clock, "CLOCK", WallClock())
    g = await make_gateway([{"name": "audit", "config": {"retention_days": 90, "purge_interval": 0.2,
                                                         "flush_interval": 0.05}}])
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200

    def events() -> int:
        with sqlite3.connect(tmp_path / "gateway.db") as c:
            return c.execute("SELECT count(*) FROM audit_events WHERE type = 'request'").fetchone()[0]

    await until(lambda: events() == 3, what="the three events written")
    real = time.time
    with caplog.at_level(logging.WARNING, "gateway.clock"):
        monkeypatch.setattr(time, "time", lambda: real() + 400 * DAY)  # a clock stepped 400 days ahead
        await asyncio.sleep(1.0)  # five purge intervals
        monkeypatch.setattr(time, "time", real)
    assert events() == 3, "the retention purged events that were minutes old"
    assert "audit retention skipped: the wall clock moved" in caplog.text
