"""Reporting use per team and model from the audit trail: each request event records the key's
team as it was when the request was made (a key moved to another team later does not move its
past), `key.updated` records the old and new values, `audit top --by team|model` sums a month
on SQLite and PostgreSQL, a NUL a client puts in a model name no longer hides a record from
PostgreSQL's JSON queries, and `top` / `query` say when their --limit cut the answer."""
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


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "one two three"}]}


async def test_team_at_request_time_and_top_by_team_and_model(make_gateway: Any, db: Any, tmp_path: Path) -> None:
    g = await make_gateway([{"name": "key_auth", "config": {"cache_ttl": 0}},
                            {"name": "audit", "config": {"flush_interval": 0.05}}], database=db)
    async with aiohttp.ClientSession() as s:
        async def admin(method: str, path: str, body: Any = None) -> Any:
            async with s.request(method, g.admin_url + path, headers=ADMIN, json=body) as r:
                assert r.status < 300, await r.text()
                return await r.json()

        a = await admin("POST", "/keys", {"owner": "alice", "team": "alpha"})
        b = await admin("POST", "/keys", {"owner": "bob", "team": "beta", "limits": {"rpm": 100}})

        async def send(key: dict[str, Any], model: str, n: int) -> None:
            for _ in range(n):
                async with s.post(g.url + "/v1/chat/completions", json=chat(model),
                                  headers={"Authorization": f"Bearer {key['key']}"}) as r:
                    assert r.status == 200, await r.text()

        await send(a, "gpt-a", 5)
        await send(b, "gpt-b", 2)
        await admin("PATCH", f"/keys/{a['id']}", {"team": "gamma", "limits": {"rpm": 50}})
        await admin("PATCH", f"/keys/{b['id']}", {"limits": {"rpm": None}, "name": "batch"})
        await send(a, "gpt-b", 3)
        await send(b, "llama\x00x", 1)  # (a NUL in the model: PostgreSQL's jsonb cannot hold it)

        async def trail() -> Any:
            async with s.get(g.admin_url + "/audit?limit=100", headers=ADMIN) as r:
                evs = (await r.json())["data"]
            return evs if len([e for e in evs if e["type"] == "request"]) == 11 else None

        evs = await until(trail, what="eleven request events")
    reqs = [e for e in evs if e["type"] == "request"]
    assert sorted((e["team"], e["model"]) for e in reqs if e["key_id"] == a["id"]) == \
        [("alpha", "gpt-a")] * 5 + [("gamma", "gpt-b")] * 3
    assert {e["model"] for e in reqs if e["key_id"] == b["id"]} == {"gpt-b", "llama\ufffdx"}
    created = {e["key_id"]: e for e in evs if e["type"] == "key.created"}
    assert created[a["id"]]["team"] == "alpha" and created[b["id"]]["team"] == "beta"
    updated = {e["key_id"]: e for e in evs if e["type"] == "key.updated"}
    assert updated[a["id"]]["changes"] == {"team": {"from": "alpha", "to": "gamma"},
                                           "limits.rpm": {"from": None, "to": 50}}
    assert updated[b["id"]]["changes"] == {"name": {"from": "", "to": "batch"},
                                           "limits.rpm": {"from": 100, "to": None}}
    tokens = {t: sum(e["tokens_in"] + e["tokens_out"] for e in reqs if e["team"] == t) for t in ("alpha", "gamma")}

    cfg = tmp_path / "gateway.yaml"
    r = await acli(cfg, "top", "--by", "team", "--json")
    assert r.returncode == 0, r.stderr
    teams = {row["team"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert {t: (row["requests"], row["keys"]) for t, row in teams.items()} == {
        "alpha": (5, 1), "gamma": (3, 1), "beta": (3, 1)}
    assert teams["alpha"]["tokens_in"] + teams["alpha"]["tokens_out"] == tokens["alpha"]
    r = await acli(cfg, "top", "--by", "model", "--sort", "tokens", "--json")
    models = {row["model"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert {m: row["requests"] for m, row in models.items()} == {"gpt-a": 5, "gpt-b": 5, "llama\ufffdx": 1}
    assert models["llama\ufffdx"]["tokens_out"] > 0  # (its tokens are read on PostgreSQL too)
    r = await acli(cfg, "top", "--by", "team")
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[:2] == ["TEAM", "EVENTS"], r.stdout
    # a cut answer is said on stderr
    r = await acli(cfg, "top", "--by", "model", "--limit", "2")
    assert r.returncode == 0 and "more model groups than --limit 2" in r.stderr
    assert len(r.stdout.splitlines()) == 3
    r = await acli(cfg, "query", "--type", "request", "--limit", "4")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 4 and "more events match than --limit 4" in r.stderr
    r = await acli(cfg, "query", "--type", "request", "--limit", "11")
    assert r.returncode == 0 and r.stderr == ""


async def test_a_revoked_keys_refusal_and_the_key_events_name_its_owner_and_team(make_gateway: Any, tmp_path: Path
                                                                                 ) -> None:
    g = await make_gateway([{"name": "key_auth", "config": {"cache_ttl": 0}},
                            {"name": "audit", "config": {"flush_interval": 0.05}}])
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", headers=ADMIN, json={"owner": "bob", "team": "beta"}) as r:
            key = await r.json()
        for action in ("rotate", "revoke"):
            async with s.post(g.admin_url + f"/keys/{key['id']}/{action}", headers=ADMIN, json={}) as r:
                assert r.status == 200, await r.text()
                key = {**key, **{k: v for k, v in (await r.json()).items() if k == "key"}}
        async with s.post(g.url + "/v1/chat/completions", json=chat("m"),
                          headers={"Authorization": f"Bearer {key['key']}"}) as r:  # (its secret matches)
            assert r.status == 401

        async def trail() -> Any:
            async with s.get(g.admin_url + "/audit?limit=100", headers=ADMIN) as r:
                evs = (await r.json())["data"]
            return evs if any(e["type"] == "auth_failure" for e in evs) else None

        evs = await until(trail, what="the refusal's event")
    by_type = {e["type"]: e for e in evs}
    assert (by_type["auth_failure"]["owner"], by_type["auth_failure"]["team"]) == ("bob", "beta")
    for t in ("key.rotated", "key.revoked"):
        assert (by_type[t]["owner"], by_type[t]["team"]) == ("bob", "beta"), by_type[t]
    r = await acli(tmp_path / "gateway.yaml", "query", "--owner", "bob", "--type", "key.revoked")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1


async def test_cli_events_name_the_login_that_ran_them(tmp_path: Path) -> None:
    """A CLI command's audit events (actor `cli`) say who ran it: the login name, and under sudo
    the one who ran sudo (a revocation at 3 a.m. is traced to a person, not to "cli"). Control
    characters in what the environment says are not recorded as such."""
    import os
    import subprocess
    import sys

    from .helpers import write_config

    cfg = write_config(tmp_path / "g.yaml", {
        "upstream": {"url": "http://127.0.0.1:9"}, "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'g.db'}"},
        "plugins": [{"name": "key_auth"}, {"name": "audit"}]})

    def keys(*args: str, **env: str) -> str:
        r = subprocess.run([sys.executable, "-m", "gateway", "keys", *args, "-c", str(cfg)], capture_output=True,
                           text=True, timeout=60, env={**os.environ, **env})
        assert r.returncode == 0, r.stderr
        return r.stdout

    made = json.loads(keys("create", "--owner", "alice", "--json", LOGNAME="ops-ann", SUDO_USER="dan\x1b[2J"))
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    r = subprocess.run([sys.executable, "-m", "gateway", "keys", "revoke", made["id"], "-c", str(cfg)],
                       capture_output=True, text=True, timeout=60, env={**env, "LOGNAME": "ops-bob"})
    assert r.returncode == 0, r.stderr
    q = await acli(cfg, "query", "--type", "key.created,key.revoked", "--asc")
    created, revoked = [json.loads(line) for line in q.stdout.splitlines()]
    assert (created["actor"], created["os_user"], created["sudo_user"]) == ("cli", "ops-ann", "dan\ufffd[2J")
    assert (revoked["actor"], revoked["os_user"]) == ("cli", "ops-bob") and "sudo_user" not in revoked
