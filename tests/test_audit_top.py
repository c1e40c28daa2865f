"""``gateway audit top``: who is busy during an incident (a leaked key, a tenant hammering the
backend), from the audit trail, grouped by key, owner or client address, on SQLite and PostgreSQL.
It was answered by exporting the trail and counting by hand."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from . import test_conversations
from .helpers import ADMIN_TOKEN, until
from .test_audit import acli

db = test_conversations.db  # the fixture: SQLite and PostgreSQL

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "one two three"}]}


async def test_top_groups_requests_and_refusals_by_key_owner_and_address(make_gateway: Any, db: Any,
                                                                          tmp_path: Path) -> None:
    g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {"flush_interval": 0.05}}],
                           database=db)
    async with aiohttp.ClientSession() as s:
        keys = {}
        for name, owner in (("a", "alice"), ("b", "bob"), ("c", "bob")):
            async with s.post(g.admin_url + "/keys", headers=ADMIN, json={"owner": owner, "name": name}) as r:
                keys[name] = await r.json()
        async with s.post(g.admin_url + f"/keys/{keys['c']['id']}/revoke", headers=ADMIN) as r:
            assert r.status == 200
        for name, n in (("a", 4), ("b", 1), ("c", 2)):
            for _ in range(n):
                async with s.post(g.url + "/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": f"Bearer {keys[name]['key']}"}) as r:
                    await r.read()
                    assert r.status == (401 if name == "c" else 200)

        async def traffic() -> Any:
            async with s.get(g.admin_url + "/audit", headers=ADMIN) as r:
                got = [e for e in (await r.json())["data"] if e["type"] in ("request", "auth_failure")]
            return got if len(got) == 7 else None

        evs = await until(traffic, what="seven audit events")
    tokens_in = {k: sum(e.get("tokens_in") or 0 for e in evs if e["key_id"] == keys[k]["id"]) for k in keys}
    assert tokens_in["a"] > 0
    cfg = tmp_path / "gateway.yaml"

    r = await acli(cfg, "top", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    by_key = {row["key"]: row for row in rows}
    a, b, c = (by_key[keys[k]["id"]] for k in "abc")
    assert rows[0]["key"] == keys["a"]["id"]  # the busiest first
    assert (a["events"], a["requests"], a["refused"], a["tokens_in"], a["ips"]) == (4, 4, 0, tokens_in["a"], 1)
    assert a["tokens_out"] > 0
    assert (b["events"], b["requests"], b["refused"]) == (1, 1, 0)
    assert (c["events"], c["requests"], c["refused"], c["tokens_in"]) == (2, 0, 2, 0)

    r = await acli(cfg, "top", "--by", "owner", "--sort", "refused", "--json")
    owners = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(o["owner"], o["events"], o["refused"]) for o in owners] == [("bob", 3, 2), ("alice", 4, 0)], owners

    r = await acli(cfg, "top", "--by", "ip")
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[:3] == ["IP", "EVENTS", "REQS"], r.stdout
    assert r.stdout.splitlines()[1].split()[:2] == ["127.0.0.1", "7"], r.stdout

    r = await acli(cfg, "top", "--since", "2000-01-01T00:00:00Z", "--until", "2000-01-02T00:00:00Z")
    assert r.returncode == 0 and "(no events)" in r.stdout
    r = await acli(cfg, "top", "--by", "model")
    assert r.returncode == 2 and "invalid choice" in r.stderr
