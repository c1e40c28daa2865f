"""key_auth end to end: the real gateway on a socket, the demo backend, real SQLite files (and a real
PostgreSQL server for the lifecycle and store outages), the OpenAI SDK as the client."""
from __future__ import annotations

import asyncio
import datetime as dt
import glob
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.plugin import Plugin, registry
from gateway.plugins.key_auth.keys import KEY_LEN, format_key, new_key_id, new_secret, parse_key

from .helpers import ADMIN_TOKEN, GatewayProcess, base_config, free_port, write_config

CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello there gateway"}]}


class Probe(Plugin):
    """Placed after key_auth: records what the chain saw (identity, refusal) for each request."""

    name = "ka_probe"
    seen: list[dict[str, Any]] = []

    async def on_complete(self, ctx: Any) -> None:
        Probe.seen.append({"refusal": ctx.refusal, "identity": ctx.identity, "status": ctx.status,
                           "path": ctx.path})


registry.register(Probe)


def ka(**config: Any) -> list[dict[str, Any]]:
    return [{"name": "key_auth", "config": config}, {"name": "ka_probe"}]


async def admin(g: Any, method: str, path: str, body: Any = None, token: str | None = ADMIN_TOKEN,
                raw: bytes | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, g.admin_url + path, json=body if raw is None else None, data=raw,
                             headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
            return r.status, await r.json(content_type=None)


async def new_key(g: Any, **body: Any) -> dict[str, Any]:
    st, rec = await admin(g, "POST", "/keys", {"owner": "alice", "name": "test", **body})
    assert st == 201, rec
    return rec


def client(g: Any, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=10)


async def chat(g: Any, key: str, **kw: Any) -> Any:
    async with client(g, key) as c:
        return await c.chat.completions.create(**{**CHAT, **kw})


async def raw_call(url: str, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions",
                   body: Any = CHAT) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body, headers=headers or {},
                          timeout=aiohttp.ClientTimeout(total=10)) as r:
            return r.status, await r.json(content_type=None)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def expect_auth_error(g: Any, key: str, code: str, fragment: str) -> None:
    with pytest.raises(openai.AuthenticationError) as ei:
        await chat(g, key)
    err = ei.value.body
    assert ei.value.status_code == 401
    assert err["code"] == code and fragment in err["message"], err


# -- key format -------------------------------------------------------------------------------------------
def test_key_format_and_checksum() -> None:
    kid, secret = new_key_id(), new_secret()
    key = format_key(kid, secret)
    assert key.startswith(f"gw_{kid}_") and len(key) == KEY_LEN
    assert parse_key(key) == (kid, secret)
    assert len(secret) == 24  # 24 base62 characters: log2(62**24) > 142 bits
    for i in range(3, len(key)):  # any single mistyped character is caught by the checksum
        if key[i] == "_":
            continue
        bad = key[:i] + ("A" if key[i] != "A" else "B") + key[i + 1:]
        assert parse_key(bad) is None, i
    assert parse_key(key[:-1]) is None and parse_key("sk-" + key[3:]) is None


# -- lifecycle with the OpenAI SDK ------------------------------------------------------------------------
async def lifecycle(g: Any, upstream: Any) -> None:
    rec = await new_key(g, team="search", metadata={"cost_center": "42"}, limits={"rpm": 60, "tpm": 1000})
    key, kid = rec["key"], rec["id"]
    assert rec["status"] == "active" and "secret_hash" not in json.dumps(rec)
    r = await chat(g, key)
    assert r.choices[0].message.content.endswith("hello there gateway")
    sent = upstream.requests[-1]["headers"]
    assert key not in json.dumps(sent) and sent.get("X-Gateway-Key-Id") == kid and sent.get("X-Gateway-Owner") == "alice"
    ident = Probe.seen[-1]["identity"]
    assert ident == {"key_id": kid, "owner": "alice", "name": "test", "team": "search",
                     "scopes": {"paths": [], "models": []}, "metadata": {"cost_center": "42"},
                     "limits": {"rpm": 60, "tpm": 1000, "daily_tokens": None, "monthly_tokens": None,
                                "max_parallel": None}}

    st, rot = await admin(g, "POST", f"/keys/{kid}/rotate", {"grace_seconds": 1.5})
    assert st == 200 and rot["id"] == kid and rot["key"] != key and rot["previous_secret_valid_until"]
    new = rot["key"]
    t_rot = time.monotonic()
    for _ in range(2):  # the second time from what the cached entry has already verified
        assert (await chat(g, new)).choices  # the new secret works
        assert (await chat(g, key)).choices  # the old one too, during the grace period
    await asyncio.sleep(max(0.0, 1.7 - (time.monotonic() - t_rot)))
    await expect_auth_error(g, key, "invalid_api_key", "Invalid API key")  # after the grace period
    assert Probe.seen[-1]["refusal"] == {"plugin": "key_auth", "type": "auth", "reason": "invalid", "key_id": kid}
    assert (await chat(g, new)).choices

    st, rev = await admin(g, "POST", f"/keys/{kid}/revoke")
    assert st == 200 and rev["status"] == "revoked"
    await expect_auth_error(g, new, "revoked_api_key", "revoked")  # at once: same instance
    await expect_auth_error(g, new, "revoked_api_key", "revoked")
    st, shown = await admin(g, "GET", f"/keys/{kid}")
    assert st == 200 and shown["status"] == "revoked" and "key" not in shown


async def test_lifecycle_with_openai_sdk(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway(ka(cache_ttl=300, forward_identity_headers={"X-Gateway-Key-Id": "key_id",
                                                                       "X-Gateway-Owner": "owner"}))
    await lifecycle(g, upstream)


async def test_lifecycle_on_postgresql(make_gateway: Any, upstream: Any, pg_url: str) -> None:
    g = await make_gateway(ka(forward_identity_headers={"X-Gateway-Key-Id": "key_id", "X-Gateway-Owner": "owner"}),
                           database={"url": pg_url, "auto_migrate": True})
    await lifecycle(g, upstream)
    rec = await new_key(g)
    await chat(g, rec["key"])
    await chat(g, rec["key"], stream=False)
    await g.plugin("key_auth").flush_usage()
    st, u = await admin(g, "GET", f"/keys/{rec['id']}/usage")
    assert st == 200 and u["totals"]["requests"] == 2
    # a value PostgreSQL cannot take is the caller's error (400), not "the database is down, retry"
    st, b = await admin(g, "GET", "/keys?owner=a%00b")
    assert st == 400 and b["error"]["code"] == "invalid_value", b


async def test_usage_of_a_stream_that_outlives_a_reload_is_counted(make_gateway: Any, upstream: Any,
                                                                  tmp_path: Path) -> None:
    # The reload retires the old chain after shutdown_timeout, while the stream still runs: its
    # usage is counted when it ends, by the tally the new chain shares.
    g = await make_gateway(ka(), server={"shutdown_timeout": 0.5})
    rec = await new_key(g)
    headers = {**bearer(rec["key"]), "X-Demo-Delay": "0.3", "X-Demo-Words": "6"}

    async def stream() -> bytes:
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions", headers=headers,
                              json={**CHAT, "stream": True}, timeout=aiohttp.ClientTimeout(total=20)) as r:
                assert r.status == 200
                return await r.read()

    t = asyncio.create_task(stream())
    await asyncio.sleep(0.3)
    write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, ka(cache_ttl=7),
                                                  server={"shutdown_timeout": 0.5}))
    ok, detail = await g.gw.reload(actor="test")
    assert ok, detail
    body = await t
    assert body.endswith(b"data: [DONE]\n\n")
    await chat(g, rec["key"])  # one more on the new chain
    await g.plugin("key_auth").flush_usage()
    st, u = await admin(g, "GET", f"/keys/{rec['id']}/usage")
    assert st == 200 and u["totals"]["requests"] == 2, u
    assert u["totals"]["completion_tokens"] >= 6  # the stream's six words, plus the second answer


async def test_expiry(make_gateway: Any) -> None:
    g = await make_gateway(ka(cache_ttl=300))
    soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1.2)).isoformat()
    rec = await new_key(g, expires_at=soon)
    assert (await chat(g, rec["key"])).choices
    await asyncio.sleep(1.4)  # the cached entry expires exactly: expiry is checked on every request
    await expect_auth_error(g, rec["key"], "expired_api_key", "expired")
    st, rows = await admin(g, "GET", "/keys?status=expired")
    assert [r["id"] for r in rows["data"]] == [rec["id"]]
    # An admin can expire a key now, or lift the expiry.
    other = await new_key(g)
    assert (await chat(g, other["key"])).choices
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)).isoformat()
    st, _ = await admin(g, "PATCH", f"/keys/{other['id']}", {"expires_at": past})
    assert st == 200
    await expect_auth_error(g, other["key"], "expired_api_key", "expired")
    st, upd = await admin(g, "PATCH", f"/keys/{other['id']}", {"expires_at": None})
    assert st == 200 and upd["status"] == "active"
    assert (await chat(g, other["key"])).choices


async def test_scopes_path_and_model(make_gateway: Any) -> None:
    g = await make_gateway(ka())
    rec = await new_key(g, scopes={"paths": ["/v1/chat/"], "models": ["demo-c*"]})
    key = rec["key"]
    assert (await chat(g, key)).choices
    async with client(g, key) as c:
        with pytest.raises(openai.PermissionDeniedError) as ei:
            await c.embeddings.create(model="demo-embed", input="x")
        assert ei.value.status_code == 403 and ei.value.body["code"] == "key_scope_denied"
        assert "/v1/embeddings" in ei.value.body["message"]
        assert Probe.seen[-1]["refusal"]["reason"] == "scope_path"
        with pytest.raises(openai.PermissionDeniedError) as ei:
            await c.chat.completions.create(**{**CHAT, "model": "other-model"})
        assert "other-model" in ei.value.body["message"]
        assert Probe.seen[-1]["refusal"]["reason"] == "scope_model"
    # A body naming no model: the backend would answer with its default one, outside the scope.
    st, body = await raw_call(g.url, {"Authorization": f"Bearer {key}"},
                              body={"messages": [{"role": "user", "content": "hi"}]})
    assert st == 403 and body["error"]["code"] == "key_scope_denied", body
    assert Probe.seen[-1]["refusal"]["reason"] == "scope_model"
    # "Model" beside "model": Go's encoding/json (Ollama) would take "Model", which the scope
    # never saw; either spelling alone is judged as the gateway reads it
    for extra in ({"Model": "secret-model"}, {"MODEL": "demo-chat"}):
        st, body = await raw_call(g.url, {"Authorization": f"Bearer {key}"}, body={**CHAT, **extra})
        assert st == 403 and "more than one spelling" in body["error"]["message"], body
    # demo-c* matches "demo-chat/../secret-model", which an upstream reading names as paths serves
    for name in ("demo-chat/../secret-model", "demo-c\\..\\x", "demo-c/./x"):
        st, body = await raw_call(g.url, {"Authorization": f"Bearer {key}"}, body={**CHAT, "model": name})
        assert st == 403 and "path segments" in body["error"]["message"], (name, body)
    assert (await raw_call(g.url, {"Authorization": f"Bearer {key}"}, body={**CHAT, "model": "demo-chat.v2"}))[0] == 200
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:
        async with s.get(g.url + "/v1/models") as r:  # no body: the path scope alone decides
            assert r.status == 403 and (await r.json())["error"]["code"] == "key_scope_denied"
        # the scope's path in another case is the same path, as for routes
        async with s.post(g.url + "/v1/Chat/Completions", json=CHAT) as r:
            assert r.status == 200, await r.text()
    st, _ = await admin(g, "PATCH", f"/keys/{rec['id']}", {"scopes": {"paths": [], "models": []}})
    assert st == 200
    async with client(g, key) as c:
        assert (await c.embeddings.create(model="demo-embed", input="x")).data


async def test_path_scopes_cover_whole_segments(make_gateway: Any) -> None:
    """A path scope covers the path equal to it and those below it, as route prefixes do: a key
    scoped to /v1/models does not reach /v1/modelsX; a scope that could never match is refused."""
    g = await make_gateway(ka())
    key = (await new_key(g, scopes={"paths": ["/v1/models"]}))["key"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:
        for path, allowed in (("/v1/models", True), ("/v1/models/demo-chat", True), ("/v1/modelsX", False),
                              ("/v1/models-admin/x", False), ("/v1/chat/completions", False)):
            async with s.get(g.url + path) as r:
                body = await r.json()
                assert (r.status != 403) == allowed, (path, r.status, body)
                if not allowed:
                    assert body["error"]["code"] == "key_scope_denied"
    for bad in ("/v1/models/*", "/v1 ", "/v1//chat"):
        st, b = await admin(g, "POST", "/keys", {"owner": "a", "scopes": {"paths": [bad]}})
        assert st == 422 and "path prefix" in b["error"]["message"], (bad, b)


async def test_a_secret_rotated_through_another_instance_is_taken_at_once(make_gateway: Any, tmp_path: Any) -> None:
    """Two instances on one database: B has the key cached; it is rotated through A. The new secret
    works on B at once (B reads the record again before refusing it), not only after B's watcher
    (here: a minute) or cache_ttl; the old one keeps its grace period."""
    db = {"url": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"}
    cfg = {"cache_ttl": 300, "watch_interval": 60, "pepper": "p" * 32}
    a = await make_gateway(ka(**cfg), name="a.yaml", database=db)
    b = await make_gateway(ka(**cfg), name="b.yaml", database=db)
    rec = await new_key(a)
    assert (await chat(b, rec["key"])).choices  # cached on B
    await asyncio.sleep(1.1)  # (a record read this recently is not read again for a wrong secret)
    st, rot = await admin(a, "POST", f"/keys/{rec['id']}/rotate", {"grace_seconds": 60})
    assert st == 200, rot
    assert (await chat(b, rot["key"])).choices
    assert (await chat(b, rec["key"])).choices  # the grace period
    with pytest.raises(openai.AuthenticationError):
        await chat(b, rot["key"][:-4] + "AAAA")


async def test_limits_and_grace_take_numbers_only(make_gateway: Any) -> None:
    """JSON true was taken as a limit of 1 (a key that could make one request a minute), "5" as 5:
    a client generated from the OpenAPI document with a bug in it is refused instead."""
    g = await make_gateway(ka())
    for limits in ({"rpm": True}, {"daily_tokens": True}, {"tpm": "5"}):
        st, b = await admin(g, "POST", "/keys", {"owner": "a", "limits": limits})
        assert st == 422 and b["error"]["param"].startswith("limits."), (limits, b)
    rec = await new_key(g, limits={"rpm": 5})
    assert rec["limits"]["rpm"] == 5
    st, b = await admin(g, "PATCH", f"/keys/{rec['id']}", {"limits": {"tpm": True}})
    assert st == 422, b
    for grace in (True, "10"):
        st, b = await admin(g, "POST", f"/keys/{rec['id']}/rotate", {"grace_seconds": grace})
        assert st == 422 and b["error"]["param"] == "grace_seconds", (grace, b)
    st, b = await admin(g, "POST", f"/keys/{rec['id']}/rotate", {"grace_seconds": 10})
    assert st == 200, b


async def test_every_rejection_reason(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway(ka())
    rec = await new_key(g)
    key, kid = rec["key"], rec["id"]
    ok, body = await raw_call(g.url, bearer(key))
    assert ok == 200
    for h in ("X-API-Key", "api-key"):  # the other configured headers work, and are stripped
        st, _ = await raw_call(g.url, {h: key})
        assert st == 200
        assert h.lower() not in {k.lower() for k in upstream.requests[-1]["headers"]}

    cases: list[tuple[dict[str, str], str, int, str, str, str | None]] = []
    cases.append(({}, "", 401, "missing_api_key", "missing", None))
    # a key sent under another scheme is told what is wrong, not that no key came
    st, b = await raw_call(g.url, {"Authorization": f"Basic {key}"})
    assert st == 401 and b["error"]["code"] == "missing_api_key" and "must be 'Bearer <key>'" in b["error"]["message"]
    assert key not in b["error"]["message"]
    # The query string is never read.
    st, b = await raw_call(g.url, {}, path=f"/v1/chat/completions?api_key={key}")
    assert st == 401 and b["error"]["code"] == "missing_api_key"
    cases.append((bearer("sk-not-a-gateway-key"), "", 401, "invalid_api_key", "malformed", None))
    bad_checksum = key[:-1] + ("x" if key[-1] != "x" else "y")
    cases.append((bearer(bad_checksum), "", 401, "invalid_api_key", "malformed", kid))
    unknown = format_key(new_key_id(), new_secret())
    cases.append((bearer(unknown), "", 401, "invalid_api_key", "invalid", parse_key(unknown)[0]))  # type: ignore[index]
    wrong_secret = format_key(kid, new_secret())
    cases.append((bearer(wrong_secret), "", 401, "invalid_api_key", "invalid", kid))
    bodies = {}
    for headers, _, status, code, reason, rid in cases:
        st, b = await raw_call(g.url, headers)
        assert st == status and b["error"]["code"] == code, (reason, b)
        assert set(b["error"]) == {"message", "type", "code", "param"} and b["error"]["type"] == "invalid_request_error"
        assert Probe.seen[-1]["refusal"] == {"plugin": "key_auth", "type": "auth", "reason": reason, "key_id": rid}
        assert Probe.seen[-1]["identity"] is None
        bodies[(reason, rid)] = b
    # An unknown key id and a wrong secret for an existing one cannot be told apart.
    assert bodies[("invalid", kid)] == bodies[("invalid", parse_key(unknown)[0])]  # type: ignore[index]
    assert "Missing" in bodies[("missing", None)]["error"]["message"]
    assert "Malformed" in bodies[("malformed", None)]["error"]["message"]

    exp = await new_key(g, expires_at=(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.5)).isoformat())
    await asyncio.sleep(0.6)
    rev = await new_key(g)
    await admin(g, "POST", f"/keys/{rev['id']}/revoke")
    scoped = await new_key(g, scopes={"models": ["nothing-else"]})
    for k, status, code, reason in ((exp, 401, "expired_api_key", "expired"), (rev, 401, "revoked_api_key", "revoked"),
                                    (scoped, 403, "key_scope_denied", "scope_model")):
        st, b = await raw_call(g.url, bearer(k["key"]))
        assert st == status and b["error"]["code"] == code, b
        # (its secret matched: a revoked or expired key's refusal names its owner, for the audit
        # trail; one out of scope is admitted first, its owner known as the caller's)
        owner = {"owner": k["owner"], "team": k["team"]} if reason in ("expired", "revoked") else {}
        assert Probe.seen[-1]["refusal"] == {"plugin": "key_auth", "type": "auth", "reason": reason, "key_id": k["id"],
                                             **owner}
    # A revoked or expired key with a wrong secret says nothing about the key's state.
    st, b = await raw_call(g.url, bearer(format_key(rev["id"], new_secret())))
    assert st == 401 and b == bodies[("invalid", kid)]
    # The SDK maps the 401 to AuthenticationError with the message intact.
    with pytest.raises(openai.AuthenticationError) as ei:
        await chat(g, unknown)
    assert ei.value.body["message"] == "Invalid API key."


async def test_canary_secret_never_logged_or_stored(make_gateway: Any, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    g = await make_gateway(ka(pepper="canary-pepper-value"))
    rec = await new_key(g, name="canary")
    key = rec["key"]
    secret = parse_key(key)[1]  # type: ignore[index]
    assert (await chat(g, key)).choices
    async with client(g, key) as c:
        async for _ in await c.chat.completions.create(**CHAT, stream=True):
            pass
    wrong = format_key(rec["id"], new_secret())
    await raw_call(g.url, bearer(wrong))
    await raw_call(g.url, bearer(key[:-2]))  # malformed
    st, rot = await admin(g, "POST", f"/keys/{rec['id']}/rotate", {"grace_seconds": 60})
    new = rot["key"]
    assert (await chat(g, new)).choices
    await g.plugin("key_auth").flush_usage()
    needles = [key, secret, new, parse_key(new)[1], parse_key(wrong)[1]]  # type: ignore[index]

    def db_bytes() -> bytes:
        files = glob.glob(str(tmp_path / "gateway.db*"))
        assert any(f.endswith("gateway.db") for f in files)
        return b"".join(Path(f).read_bytes() for f in files)

    live = db_bytes()  # while running: the main file plus -wal and -shm
    assert Path(str(tmp_path / "gateway.db") + "-wal").exists()
    await g.stop()  # checkpoints the WAL into the main file
    for blob in (live, db_bytes()):
        assert rec["id"].encode() in blob  # the key id is stored, and is not secret
        for n in needles:
            assert n.encode() not in blob, n
    text = caplog.text
    assert "gateway listening" in text and rec["id"] in json.dumps(Probe.seen)
    for n in needles:
        assert n not in text
    # What is stored is the HMAC, not the secret.
    row = sqlite3.connect(tmp_path / "gateway.db").execute("SELECT secret_hash FROM api_keys").fetchone()
    assert len(row[0]) == 64 and secret not in row[0]


ADMIN_ROUTES = [("POST", "/keys"), ("GET", "/keys"), ("GET", "/keys/{id}"), ("PATCH", "/keys/{id}"),
                ("POST", "/keys/{id}/rotate"), ("POST", "/keys/{id}/revoke"), ("GET", "/keys/{id}/usage")]


async def test_admin_api_auth(make_gateway: Any) -> None:
    g = await make_gateway(ka())
    rec = await new_key(g)
    for method, path in ADMIN_ROUTES:
        p = path.replace("{id}", rec["id"])
        for token, code in ((None, "admin_token_missing"), ("wrong-token-0123456789abcdef", "admin_token_invalid"),
                            (rec["key"], "admin_token_invalid")):
            st, b = await admin(g, method, p, {"owner": "x"}, token=token)
            assert st == 401 and b["error"]["code"] == code, (method, p, token is None)
    st, b = await admin(g, "GET", f"/keys/{rec['id']}")
    assert st == 200 and b["status"] == "active"  # none of the above changed anything


async def test_admin_api_validation_events_and_openapi(make_gateway: Any) -> None:
    g = await make_gateway(ka(rotation_grace=7))
    events: list[tuple[str, dict[str, Any]]] = []
    g.services.events.subscribe(lambda t, f: events.append((t, f)))
    st, b = await admin(g, "POST", "/keys", {})
    assert st == 422 and b["error"]["param"] == "owner" and b["error"]["type"] == "invalid_request_error"
    st, b = await admin(g, "POST", "/keys", {"owner": "a", "colour": "red"})
    assert st == 422 and b["error"]["param"] == "colour"
    st, b = await admin(g, "POST", "/keys", {"owner": "a", "scopes": {"paths": ["v1"]}})
    assert st == 422
    st, b = await admin(g, "POST", "/keys", raw=b"{not json")
    assert st == 400 and b["error"]["code"] == "invalid_json"
    for method, path in ADMIN_ROUTES[2:]:
        st, b = await admin(g, method, path.replace("{id}", "AAAAAAAAAAAA"), {})
        assert st == 404 and b["error"]["code"] == "key_not_found", (method, path)
    rec = await new_key(g, owner="bob", limits={"rpm": 5})
    kid = rec["id"]
    st, b = await admin(g, "PATCH", f"/keys/{kid}", {"limits": {"tpm": 100}, "name": "renamed", "team": "t1",
                                                     "metadata": {"a": 1}})
    assert st == 200 and b["limits"] == {"rpm": 5, "tpm": 100, "daily_tokens": None, "monthly_tokens": None,
                                         "max_parallel": None}
    assert b["name"] == "renamed" and b["team"] == "t1" and b["metadata"] == {"a": 1}
    st, b = await admin(g, "PATCH", f"/keys/{kid}", {"limits": {"rpm": None, "daily_tokens": 1000,
                                                                "monthly_tokens": 20000}})
    assert b["limits"] == {"rpm": None, "tpm": 100, "daily_tokens": 1000, "monthly_tokens": 20000,
                           "max_parallel": None}
    st, b = await admin(g, "PATCH", f"/keys/{kid}", {"limits": {"rpm": 0}})
    assert st == 422 and b["error"]["param"] == "limits.rpm"
    st, b = await admin(g, "POST", f"/keys/{kid}/rotate")  # default grace from the config
    assert st == 200
    until = dt.datetime.fromisoformat(b["previous_secret_valid_until"].replace("Z", "+00:00"))
    assert 5 < (until - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 7
    await admin(g, "POST", f"/keys/{kid}/revoke")
    st, b = await admin(g, "POST", f"/keys/{kid}/rotate")
    assert st == 409 and b["error"]["code"] == "key_revoked"
    st, b = await admin(g, "GET", "/keys?owner=bob")
    assert [r["id"] for r in b["data"]] == [kid]
    st, b = await admin(g, "GET", "/keys?owner=bob&status=active")
    assert b["data"] == []
    st, b = await admin(g, "GET", "/keys?status=bogus")
    assert st == 400
    st, b = await admin(g, "GET", f"/keys/{kid}/usage?from=2026-13-01")
    assert st == 400
    assert [t for t, _ in events] == ["key.created", "key.updated", "key.updated", "key.rotated", "key.revoked"]
    assert all(f["actor"] == "admin" and f["key_id"] == kid for _, f in events)
    assert events[1][1]["fields"] == ["limits", "metadata", "name", "team"]
    assert "gw_" not in json.dumps([f for _, f in events])
    st, doc = await admin(g, "GET", "/openapi.json")
    assert st == 200
    for method, path in ADMIN_ROUTES:
        assert method.lower() in doc["paths"][path.replace("{id}", "{key_id}")], path
    assert "owner" in doc["paths"]["/keys"]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"]
    assert "$defs" not in json.dumps(doc)
    # for generated clients: a stable, unique operationId and a tag on every operation, and the
    # error shape as the answer for any status not listed
    ops = [(path, m, op) for path, item in doc["paths"].items() for m, op in item.items()]
    ids = [op["operationId"] for _, _, op in ops]
    assert len(ids) == len(set(ids)) and "postKeysKeyIdRotate" in ids
    assert all(op["tags"] and op["responses"]["default"]["content"] for _, _, op in ops)
    assert doc["paths"]["/keys/{key_id}/rotate"]["post"]["tags"] == ["keys"]


async def test_demo_setup_key_works(make_gateway: Any) -> None:
    """`gateway demo`'s key works; the next run's setup revokes it (one demo key valid at a time),
    and both changes are audited."""
    g = await make_gateway(ka() + [{"name": "audit"}])
    out = await g.plugin("key_auth").demo_setup()
    assert (await chat(g, out["api_key"])).choices
    assert Probe.seen[-1]["identity"]["owner"] == "demo"
    again = await g.plugin("key_auth").demo_setup()
    assert (await chat(g, again["api_key"])).choices
    with pytest.raises(openai.AuthenticationError):
        await chat(g, out["api_key"])
    assert [r["status"] for r in await g.plugin("key_auth").store.list(owner="demo")] == ["revoked", "active"]
    await g.stop()
    db = Path(g.gw.cfg.database.url.split("///", 1)[1])
    con = sqlite3.connect(db)
    try:
        types = [json.loads(d)["type"] for (d,) in con.execute("SELECT data FROM audit_events ORDER BY seq")]
    finally:
        con.close()
    assert [t for t in types if t.startswith("key.")] == ["key.created", "key.revoked", "key.created"]


# -- usage ------------------------------------------------------------------------------------------------
async def test_usage_rollup_plain_streamed_and_cancelled(make_gateway: Any) -> None:
    g = await make_gateway(ka(last_used_interval=0))
    rec = await new_key(g)
    key, kid = rec["key"], rec["id"]
    want = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def add(usage: Any) -> None:
        want["requests"] += 1
        want["prompt_tokens"] += usage.prompt_tokens
        want["completion_tokens"] += usage.completion_tokens

    async with client(g, key) as c:
        for i in range(3):
            r = await c.chat.completions.create(model="demo-chat",
                                                messages=[{"role": "user", "content": "word " * (i + 1)}])
            add(r.usage)
        # Streamed, the client asking for usage: the final chunk carries it.
        usage = None
        async for ch in await c.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}):
            usage = ch.usage or usage
        add(usage)
        # Streamed without asking: the gateway asks upstream and counts it; the client sees no usage chunk.
        chunks = [ch async for ch in await c.chat.completions.create(**CHAT, stream=True)]
        assert all(ch.usage is None for ch in chunks)
        add(usage)  # the same request as above: the demo backend reports the same usage
        s2 = await c.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
        async for ch in s2:
            if ch.usage:
                add(ch.usage)
    # A stream the client cancels after a few chunks: counted from what was generated.
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", headers={**bearer(key), "X-Demo-Delay": "0.05",
                                                                   "X-Demo-Words": "40"},
                          json={**CHAT, "stream": True}) as r:
            got = 0
            async for line in r.content:
                if line.startswith(b"data: {"):
                    got += 1
                if got >= 4:
                    break
    await asyncio.sleep(0.3)
    ka_plugin = g.plugin("key_auth")
    await ka_plugin.flush_usage()
    st, u = await admin(g, "GET", f"/keys/{kid}/usage")
    assert st == 200
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert [d["date"] for d in u["days"]] == [today]
    t = u["totals"]
    assert t["requests"] == want["requests"] + 1
    # (the cancelled stream reported no prompt count: the gateway's estimate, characters / 4)
    assert t["prompt_tokens"] == want["prompt_tokens"] + (len(CHAT["messages"][0]["content"]) + 3) // 4
    extra = t["completion_tokens"] - want["completion_tokens"]
    assert 3 <= extra < 40, extra  # the cancelled stream: the content chunks relayed before the cancel
    assert t["total_tokens"] == t["prompt_tokens"] + t["completion_tokens"]
    st, shown = await admin(g, "GET", f"/keys/{kid}")
    assert shown["last_used_at"] is not None
    st, empty = await admin(g, "GET", f"/keys/{kid}/usage?from=2020-01-01&to=2020-01-31")
    assert empty["days"] == [] and empty["totals"]["requests"] == 0
    # Refused requests are not usage.
    await raw_call(g.url, bearer(format_key(kid, new_secret())))
    await ka_plugin.flush_usage()
    st, u2 = await admin(g, "GET", f"/keys/{kid}/usage")
    assert u2["totals"] == u["totals"]


async def test_last_used_at_is_written_at_stop(make_gateway: Any, tmp_path: Path) -> None:
    """``last_used_at`` is written at most every last_used_interval while the gateway runs; at a stop
    the latest use of each key is written (it stayed at the first use of the interval: a key used
    all day before a nightly restart looked unused since the morning)."""
    g = await make_gateway(ka(last_used_interval=3600))
    rec = await new_key(g)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    await g.plugin("key_auth").flush_usage()
    st, first = await admin(g, "GET", f"/keys/{rec['id']}")
    assert first["last_used_at"] is not None
    await asyncio.sleep(1.1)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    await g.plugin("key_auth").flush_usage()
    st, shown = await admin(g, "GET", f"/keys/{rec['id']}")
    assert shown["last_used_at"] == first["last_used_at"]  # (within the interval: not written)
    await g.stop()
    with sqlite3.connect(tmp_path / "gateway.db") as con:
        (last,) = con.execute("SELECT last_used_at FROM api_keys WHERE id = ?", (rec["id"],)).fetchone()
    gap = dt.datetime.fromisoformat(str(last)).replace(tzinfo=dt.timezone.utc) - dt.datetime.fromisoformat(
        first["last_used_at"].replace("Z", "+00:00"))
    assert gap >= dt.timedelta(seconds=1), (last, first["last_used_at"])


# -- store outage: fail closed ------------------------------------------------------------------------------
async def test_a_hung_key_store_answers_503_at_store_timeout(make_gateway: Any, monkeypatch: Any) -> None:
    """A lookup against a database that does not answer, whose cancelled session then takes as long
    again to clean up (a connection reset against a frozen server): the request gets its 503 at
    store_timeout, not after the clean-up."""
    g = await make_gateway(ka(cache_ttl=0, store_timeout=0.5))
    rec = await new_key(g)
    store = g.plugin("key_auth").store
    cleaned = asyncio.Event()

    async def hung(key_id: str) -> Any:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(3)  # the session's close against the frozen server
            cleaned.set()
            raise

    monkeypatch.setattr(store, "get_row", hung)
    t0 = time.monotonic()
    st, b = await raw_call(g.url, bearer(rec["key"]))
    took = time.monotonic() - t0
    assert st == 503 and b["error"]["code"] == "key_store_unavailable"
    assert took < 2.5, took  # 0.5 s, not 3.5 s
    await asyncio.wait_for(cleaned.wait(), 10)  # the clean-up still ran, in the background


async def test_fail_closed_when_sqlite_store_breaks(make_gateway: Any, tmp_path: Path) -> None:
    g = await make_gateway(ka(cache_ttl=0))
    rec = await new_key(g)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    db = sqlite3.connect(tmp_path / "gateway.db")
    db.execute("ALTER TABLE api_keys RENAME TO api_keys_away")
    db.commit()
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", headers=bearer(rec["key"]), json={"model": "m"}) as r:
            st, b, retry = r.status, await r.json(), r.headers.get("Retry-After")
    assert st == 503 and b["error"]["code"] == "key_store_unavailable" and b["error"]["type"] == "server_error"
    assert retry == "1"  # (the SDKs retry a 503 soon anyway; others are told when)
    assert Probe.seen[-1]["refusal"] == {"plugin": "key_auth", "type": "auth", "reason": "store_unavailable",
                                         "key_id": rec["id"]}
    db.execute("ALTER TABLE api_keys_away RENAME TO api_keys")
    db.commit()
    db.close()
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200


async def test_fail_closed_when_postgresql_hangs_or_refuses(make_gateway: Any, pg_url: str, pg_cluster: str) -> None:
    import asyncpg

    g = await make_gateway(ka(cache_ttl=0, store_timeout=0.5), database={"url": pg_url, "auto_migrate": True})
    rec = await new_key(g)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    dbname = pg_url.rsplit("/", 1)[1]
    # 1. The table is locked by another session: the lookup hangs and is cut off by store_timeout.
    locker = await asyncpg.connect(pg_cluster.rsplit("/", 1)[0] + "/" + dbname)
    tr = locker.transaction()
    await tr.start()
    await locker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
    st, b = await raw_call(g.url, bearer(rec["key"]))
    assert st == 503 and b["error"]["code"] == "key_store_unavailable"
    await tr.rollback()
    await locker.close()
    for _ in range(20):  # the pool replaces the connection the timeout cut off
        st, _ = await raw_call(g.url, bearer(rec["key"]))
        if st == 200:
            break
        await asyncio.sleep(0.1)
    assert st == 200
    # 2. The database refuses connections altogether.
    admin_conn = await asyncpg.connect(pg_cluster)
    try:
        await admin_conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        await admin_conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 "
                                 "AND pid <> pg_backend_pid()", dbname)
        st, b = await raw_call(g.url, bearer(rec["key"]))
        assert st == 503 and b["error"]["code"] == "key_store_unavailable"
        # the admin API too: a 503 to retry, not a 500 (a revoke gets one of its own: see
        # test_incident_signals)
        st, b = await admin(g, "PATCH", f"/keys/{rec['id']}", {"name": "renamed"})
        assert st == 503 and b["error"]["code"] == "database_unavailable", b
        await admin_conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    finally:
        await admin_conn.close()
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200


# -- two gateway processes on one database ------------------------------------------------------------------
async def test_revocation_across_two_processes(tmp_path: Path, upstream: Any) -> None:
    # A long cache: what brings the revoke to the other instance is its watch of changed keys.
    ttl, watch = 60.0, 0.3
    procs = []
    try:
        for name in ("a", "b"):
            port, aport = free_port(), free_port()
            cfg = base_config(upstream.url, tmp_path, [{"name": "key_auth", "config": {
                "cache_ttl": ttl, "watch_interval": watch}}], server={"port": port}, admin={"port": aport})
            p = GatewayProcess(write_config(tmp_path / f"{name}.yaml", cfg), port, aport).start()
            await p.wait_ready()  # one after the other: the first one migrates the shared file
            procs.append(p)
        a, b = procs
        rec = await new_key(a)
        key = rec["key"]
        assert (await raw_call(a.url, bearer(key)))[0] == 200
        assert (await raw_call(b.url, bearer(key)))[0] == 200  # B has it cached now
        st, _ = await admin(a, "POST", f"/keys/{rec['id']}/revoke")
        assert st == 200
        t0 = time.monotonic()
        assert (await raw_call(a.url, bearer(key)))[0] == 401  # A: at once
        deadline = t0 + 20  # well inside cache_ttl: only the watch can have dropped B's entry
        while time.monotonic() < deadline:
            st, body = await raw_call(b.url, bearer(key))
            if st == 401:
                break
            await asyncio.sleep(0.1)
        took = time.monotonic() - t0
        assert st == 401 and body["error"]["code"] == "revoked_api_key", body
        print(f"revocation reached the other instance after {took:.2f}s (watch_interval {watch}s, "
              f"cache_ttl {ttl}s)")
    finally:
        for p in procs:
            p.stop()
    for p in procs:  # the subprocesses' whole log output never shows the key
        log = p.log()
        assert "gateway listening" in log and key not in log and parse_key(key)[1] not in log  # type: ignore[index]


# -- CLI ----------------------------------------------------------------------------------------------------
def gw_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "keys", *args, "-c", str(cfg)], capture_output=True,
                          text=True, timeout=60, env={**os.environ})


async def test_cli_create_list_update_revoke(make_gateway: Any, tmp_path: Path, upstream: Any) -> None:
    cfg = write_config(tmp_path / "cli.yaml", base_config(upstream.url, tmp_path, ka_cli := [
        {"name": "key_auth", "config": {"pepper": "cli-pepper", "cache_ttl": 0.5}}], admin={"enabled": False}))
    r = await asyncio.to_thread(gw_cli, cfg, "create", "--owner", "carol", "--name", "ci", "--rpm", "30",
                                "--scope-model", "demo-*", "--expires", "30d", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    key, kid = rec["key"], rec["id"]
    assert rec["limits"]["rpm"] == 30 and rec["scopes"]["models"] == ["demo-*"] and rec["expires_at"]
    r = await asyncio.to_thread(gw_cli, cfg, "list", "--owner", "carol", "--json")
    listed = json.loads(r.stdout)
    assert [x["id"] for x in listed] == [kid] and "key" not in listed[0] and key not in r.stdout
    r = await asyncio.to_thread(gw_cli, cfg, "list")
    assert kid in r.stdout and "active" in r.stdout
    # The same database, served: the CLI-made key works (same pepper from the same config).
    g = await make_gateway(ka_cli, name="cli.yaml")
    assert (await chat(g, key)).choices
    r = await asyncio.to_thread(gw_cli, cfg, "update", kid, "--tpm", "500", "--rpm", "none", "--daily-tokens", "9",
                                "--monthly-tokens", "99", "--max-parallel", "3", "--scope-path", "/v1/", "--name",
                                "renamed", "--expires", "never", "--json")
    upd = json.loads(r.stdout)
    assert upd["limits"] == {"rpm": None, "tpm": 500, "daily_tokens": 9, "monthly_tokens": 99, "max_parallel": 3}
    # --scope-path replaces the path scopes only; the model scopes given at creation stay.
    assert upd["scopes"] == {"paths": ["/v1/"], "models": ["demo-*"]} and upd["expires_at"] is None
    assert upd["name"] == "renamed"
    r = await asyncio.to_thread(gw_cli, cfg, "revoke", kid, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "revoked"
    r = await asyncio.to_thread(gw_cli, cfg, "list", "--status", "revoked", "--json")
    assert [x["id"] for x in json.loads(r.stdout)] == [kid]
    deadline = time.monotonic() + 5
    st = 200
    while st != 401 and time.monotonic() < deadline:  # the running gateway notices within cache_ttl
        st, _ = await raw_call(g.url, bearer(key))
        await asyncio.sleep(0.1)
    assert st == 401
    r = await asyncio.to_thread(gw_cli, cfg, "usage", kid, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["key_id"] == kid
    r = await asyncio.to_thread(gw_cli, cfg, "show", "AAAAAAAAAAAA")
    assert r.returncode == 1 and "no key" in r.stderr


async def test_a_leaked_key_pasted_whole_is_revoked_and_never_echoed(make_gateway: Any, tmp_path: Path,
                                                                      upstream: Any) -> None:
    """Containing a leak, an admin pastes the whole key: the CLI and the admin API act on its id;
    an argument that names no key (a mistyped key, another secret) is refused without being
    repeated in the output or the error body."""
    cfg = write_config(tmp_path / "leak.yaml", base_config(upstream.url, tmp_path, [{"name": "key_auth"}]))
    g = await make_gateway([{"name": "key_auth"}], name="leak.yaml")
    one = (await new_key(g, expires_at="2030-01-02T03:04:05.678+00:00"))["key"]
    two = (await new_key(g))["key"]
    bad = one[:-1] + ("A" if one[-1] != "A" else "B")  # checksum no longer matches
    r = await asyncio.to_thread(gw_cli, cfg, "revoke", bad)
    assert r.returncode == 2 and "not a key id" in r.stderr and bad[3:] not in r.stdout + r.stderr, r.stderr
    r = await asyncio.to_thread(gw_cli, cfg, "revoke", one, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["id"] == parse_key(one)[0] and json.loads(r.stdout)["status"] == "revoked"  # type: ignore[index]
    assert parse_key(one)[1] not in r.stdout + r.stderr  # type: ignore[index]
    st, body = await admin(g, "POST", f"/keys/{bad}/revoke")
    assert st == 404 and bad[3:] not in json.dumps(body), body
    st, body = await admin(g, "POST", f"/keys/{two}/revoke")
    assert st == 200 and body["id"] == parse_key(two)[0] and body["status"] == "revoked", body  # type: ignore[index]
    assert parse_key(two)[1] not in json.dumps(body)  # type: ignore[index]
    deadline = time.monotonic() + 5
    codes = [0, 0]
    while codes != [401, 401] and time.monotonic() < deadline:
        codes = [(await raw_call(g.url, bearer(k)))[0] for k in (one, two)]
        await asyncio.sleep(0.1)
    assert codes == [401, 401]
    r = await asyncio.to_thread(gw_cli, cfg, "list")
    assert r.returncode == 0 and r.stdout.count("revoked") == 2, r.stdout
    assert " 2030-01-02T03:04:05Z " in r.stdout  # the expiry to the second, not cut mid-way


async def test_header_hygiene_and_concurrent_first_use(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway(ka(forward_identity_headers={"X-Gateway-Owner": "owner", "X-Gateway-Team": "team"}),
                           upstream={"headers": {"api-key": "upstream-credential"}})
    rec = await new_key(g)
    # A client cannot spoof the identity headers, and its key never reaches the upstream; a header the
    # upstream config sets itself (here the upstream's own api-key) is the configured value.
    st, _ = await raw_call(g.url, {"api-key": rec["key"], "X-Gateway-Owner": "mallory", "X-Gateway-Team": "evil"})
    assert st == 200
    sent = {k.lower(): v for k, v in upstream.requests[-1]["headers"].items()}
    assert sent["x-gateway-owner"] == "alice" and "x-gateway-team" not in sent  # team is null: removed
    assert sent["api-key"] == "upstream-credential"
    assert rec["key"] not in json.dumps(sent)
    # Many requests with a key nobody used yet: all pass, one lookup serves them.
    from sqlalchemy import event

    lookups: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        # (the watch's read of the keys changed lately is not a lookup: it runs every watch_interval,
        # and on a busy machine the 30 requests can take longer than that)
        if statement.lstrip().upper().startswith("SELECT") and "FROM api_keys" in statement \
                and "api_keys.updated_at >" not in statement:
            lookups.append(statement)

    rec2 = await new_key(g)
    event.listen(g.gw.db.engine.sync_engine, "before_cursor_execute", count)
    results = await asyncio.gather(*(raw_call(g.url, bearer(rec2["key"])) for _ in range(30)))
    event.remove(g.gw.db.engine.sync_engine, "before_cursor_execute", count)
    assert [st for st, _ in results] == [200] * 30
    assert len(lookups) == 1, lookups
    bad = await asyncio.gather(*(raw_call(g.url, bearer(format_key(rec2["id"], new_secret()))) for _ in range(10)))
    assert {b["error"]["code"] for _, b in bad} == {"invalid_api_key"}


async def test_reload_keeps_keys_working(make_gateway: Any, tmp_path: Path, upstream: Any) -> None:
    g = await make_gateway(ka(rotation_grace=5))
    rec = await new_key(g)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    write_config(tmp_path / "gateway.yaml", base_config(upstream.url, tmp_path, ka(rotation_grace=60)))
    st, b = await admin(g, "POST", "/config/reload")
    assert st == 200, b
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    st, rot = await admin(g, "POST", f"/keys/{rec['id']}/rotate")  # the admin API follows the new config
    until = dt.datetime.fromisoformat(rot["previous_secret_valid_until"].replace("Z", "+00:00"))
    assert (until - dt.datetime.now(dt.timezone.utc)).total_seconds() > 50
    assert (await raw_call(g.url, bearer(rot["key"])))[0] == 200


async def test_per_key_rpm_override_reaches_rate_limit(make_gateway: Any) -> None:
    """The identity contract end to end: a key's rpm (set through the admin API) is what rate_limit enforces."""
    g = await make_gateway([{"name": "key_auth"},
                            {"name": "rate_limit", "config": {"strategy": "moving", "rules": [
                                {"name": "per-key", "limit": "100/minute", "key_by": ["key"]}]}}])
    rec = await new_key(g, limits={"rpm": 2})
    statuses = [(await raw_call(g.url, bearer(rec["key"])))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    other = await new_key(g)  # no override: the YAML default applies
    assert [(await raw_call(g.url, bearer(other["key"])))[0] for _ in range(3)] == [200, 200, 200]


async def test_odd_input_to_keys_and_the_admin_api(make_gateway: Any) -> None:
    """A model scope holds when the model is not a string or cannot be read; times past what UTC
    holds, NaN/Infinity, and token bytes that are not UTF-8 are 4xx, never 500."""
    g = await make_gateway(ka())
    rec = await new_key(g, scopes={"models": ["demo-chat"]})
    auth = {"Authorization": f"Bearer {rec['key']}"}
    async with aiohttp.ClientSession() as s:
        for body in ({"model": ["other"], "messages": []}, {"model": {"id": "other"}, "messages": []},
                     {"model": None, "messages": []}):
            async with s.post(g.url + "/v1/chat/completions", json=body, headers=auth) as r:
                assert r.status == 403 and (await r.json())["error"]["code"] == "key_scope_denied", body
        async with s.post(g.url + "/v1/chat/completions", data="model=other", headers={
                **auth, "Content-Type": "application/x-www-form-urlencoded"}) as r:
            assert r.status == 403
        async with s.post(g.url + "/v1/chat/completions", json={"model": "demo-chat", "messages": [
                {"role": "user", "content": "hi"}]}, headers=auth) as r:
            assert r.status == 200
    for when in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00"):
        st, b = await admin(g, "POST", "/keys", {"owner": "a", "expires_at": when})
        assert st == 422 and b["error"]["param"] == "expires_at", b
        st, b = await admin(g, "PATCH", f"/keys/{rec['id']}", {"expires_at": when})
        assert st == 422, b
    for raw in (b'{"owner": "a", "metadata": {"x": 1e400}}', b'{"owner": "a", "metadata": {"x": NaN}}'):
        st, b = await admin(g, "POST", "/keys", raw=raw)
        assert st == 400 and b["error"]["code"] == "invalid_json", b
    r, w = await asyncio.open_connection("127.0.0.1", g.gw.admin_port)
    try:
        w.write(b"GET /keys HTTP/1.1\r\nHost: a\r\nConnection: close\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
        await w.drain()
        async with asyncio.timeout(10):
            head = (await r.read()).split(b"\r\n", 1)[0]
    finally:
        w.close()
    assert head.startswith(b"HTTP/1.1 401"), head
    res = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "keys", "create", "--owner", "x",
                                                   "--expires", "99999999d", "-c", g.gw.cfg.path],
                                  capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "out of range" in res.stderr and "Traceback" not in res.stderr


async def test_key_bodies_and_list_queries_out_of_bounds_name_their_parameter(make_gateway):
    """What a key carries is bounded (it is cached in every instance and its model patterns are
    tried on each request); a key expired when made is refused as the CLI refuses it; a bad list
    query names the parameter at fault; a filter no stored label can match is a 400."""
    g = await make_gateway(ka())
    rec = await new_key(g)
    for body, param in (({"owner": "a", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
                        ({"owner": "a", "scopes": {"models": [f"m{i}" for i in range(257)]}}, "scopes.models"),
                        ({"owner": "a", "scopes": {"paths": ["/v1/" + "x" * 200]}}, "scopes.paths.0"),
                        ({"owner": "a", "metadata": {"blob": "x" * 20000}}, "metadata"),
                        # (the owner of keyless requests: such a key would read their conversations)
                        ({"owner": "anonymous"}, "owner")):
        st, b = await admin(g, "POST", "/keys", body)
        assert st == 422 and b["error"]["param"] == param, (param, b)
    st, b = await admin(g, "PATCH", f"/keys/{rec['id']}", {"metadata": {"blob": "x" * 20000}})
    assert st == 422 and b["error"]["param"] == "metadata", b
    st, b = await admin(g, "POST", "/keys", {"owner": "a", "scopes": {"models": [f"m{i}" for i in range(256)]},
                                             "metadata": {"blob": "x" * 16000}})
    assert st == 201, b  # (at the bounds)
    for query, param in (("offset=-1", "offset"), ("offset=x", "offset"), ("limit=0", "limit"),
                         ("limit=x", "limit"), ("limit=1_0", "limit"), ("owner=%00", "owner"), ("team=a%00", "team")):
        st, b = await admin(g, "GET", f"/keys?{query}")
        assert st == 400 and b["error"]["param"] == param, (query, b)
    st, b = await admin(g, "GET", "/keys?owner=a&limit=5&offset=0")
    assert st == 200 and len(b["data"]) == 1


async def test_labels_scopes_and_the_admin_token_as_an_operator_gets_them_wrong(make_gateway, upstream, tmp_path):
    """PATCH of one scope list keeps the other; labels a terminal or header would act on are refused;
    an admin token read from a secret file (a newline at its end) still opens the admin API."""
    import subprocess
    import sys

    import aiohttp
    import yaml

    from .helpers import base_config

    token = "admin-token-0123456789abcdef"
    cfg = base_config(upstream.url, tmp_path, [{"name": "key_auth"}])
    cfg["admin"]["token"] = token + "\n"
    g = await make_gateway(raw=yaml.safe_dump(cfg))
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", headers=auth, json={
                "owner": "alice", "scopes": {"paths": ["/v1/"], "models": ["demo-*"]}}) as r:
            assert r.status == 201, await r.text()
            rec = await r.json()
        async with s.patch(g.admin_url + f"/keys/{rec['id']}", headers=auth,
                           json={"scopes": {"paths": ["/v1/chat/"]}}) as r:
            assert r.status == 200
            assert (await r.json())["scopes"] == {"paths": ["/v1/chat/"], "models": ["demo-*"]}
        async with s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {rec['key']}"},
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 403
        for bad in ("al\u009bice", "bob\u202e", " padded ", "line\u2028two"):
            async with s.post(g.admin_url + "/keys", headers=auth, json={"owner": bad}) as r:
                assert r.status == 422, bad
            async with s.patch(g.admin_url + f"/keys/{rec['id']}", headers=auth, json={"name": bad}) as r:
                assert r.status == 422, bad
    # what is already stored (by an older version) is shown escaped by the CLI
    import sqlite3
    con = sqlite3.connect(tmp_path / "gateway.db")
    with con:
        con.execute("UPDATE api_keys SET name = ? WHERE id = ?", ("x\x1b[31mred\u202e", rec["id"]))
    con.close()
    out = subprocess.run([sys.executable, "-m", "gateway", "keys", "list", "-c", str(tmp_path / "gateway.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "\x1b" not in out.stdout and "\u202e" not in out.stdout
    assert "x\\x1b[31mred\\u202e" in out.stdout


async def test_usage_counts_for_the_utc_day_the_request_arrived(make_gateway: Any) -> None:
    """A stream running across midnight: its usage goes to the day it began, as its quota charge
    and its audit event do (the tally took the day the answer ended)."""
    import datetime as dt
    import time
    import types

    from gateway.observe import Completion

    g = await make_gateway(ka())
    rec = await new_key(g)
    plugin = g.plugin("key_auth")
    comp = Completion()
    comp.usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    two_days = 2 * 86400
    ctx = types.SimpleNamespace(state={plugin.name: rec["id"]}, t_upstream=1.0, completion=comp,
                                t_start=time.perf_counter() - two_days)  # arrived two days ago
    await plugin.on_complete(ctx)
    await plugin.flush_usage()
    day = dt.datetime.fromtimestamp(time.time() - two_days, dt.timezone.utc).date()
    st, u = await admin(g, "GET", f"/keys/{rec['id']}/usage?from={day.isoformat()}")
    assert st == 200, u
    assert [(d["date"], d["requests"], d["completion_tokens"]) for d in u["days"]] == [(day.isoformat(), 1, 4)], u


async def test_expires_at_must_be_a_date_time_string(make_gateway: Any) -> None:
    """A number is no expiry date: it would be read as seconds or milliseconds since 1970,
    whichever its size suggests (253402300800, year 9999 in seconds, became 1978)."""
    g = await make_gateway(ka())
    for v in (253402300800, 0, -1, 0.5, True):
        st, body = await admin(g, "POST", "/keys", {"owner": "a", "expires_at": v})
        assert st == 422 and body["error"]["param"] == "expires_at", (v, body)
    rec = await new_key(g)
    st, body = await admin(g, "PATCH", f"/keys/{rec['id']}", {"expires_at": 1893456000})
    assert st == 422 and "RFC 3339" in body["error"]["message"], body
    st, body = await admin(g, "PATCH", f"/keys/{rec['id']}", {"expires_at": "2099-01-31T00:00:00Z"})
    assert st == 200 and body["expires_at"].startswith("2099-01-31"), body
