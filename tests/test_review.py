"""End-to-end checks for defects found in review: each test drives the gateway the way a user does
(the CLI as a subprocess, HTTP on real sockets) and pins the fixed behaviour."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .helpers import ADMIN_TOKEN, base_config, write_config

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
T = aiohttp.ClientTimeout(total=20)


def gw_cli(cfg: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gateway", *args]
    if cfg is not None:
        argv += ["-c", str(cfg)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


async def agw_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(gw_cli, cfg, *args)


def audit_rows(db_path: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db_path)
    try:
        return [json.loads(d) for (d,) in con.execute("SELECT data FROM audit_events ORDER BY seq")]
    finally:
        con.close()


async def test_cli_key_changes_are_audited(tmp_path):
    """`gateway keys create|update|rotate|revoke` record key.* events with actor "cli", as the admin API does."""
    cfg = write_config(tmp_path / "gateway.yaml", base_config("http://127.0.0.1:9", tmp_path, [
        {"name": "key_auth"}, {"name": "audit"}]))
    res = await agw_cli(cfg, "keys", "create", "--owner", "alice", "--name", "laptop", "--json")
    assert res.returncode == 0, res.stderr
    created = json.loads(res.stdout)
    kid, secret = created["id"], created["key"]
    for args in (("update", kid, "--rpm", "10"), ("rotate", kid, "--grace", "0"), ("revoke", kid)):
        res = await agw_cli(cfg, "keys", *args, "--json")
        assert res.returncode == 0, res.stderr
    res = await agw_cli(cfg, "keys", "revoke", "nosuchkey000")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    evs = audit_rows(tmp_path / "gateway.db")
    assert [e["type"] for e in evs] == ["key.created", "key.updated", "key.rotated", "key.revoked"]
    assert all(e["actor"] == "cli" and e["key_id"] == kid for e in evs)
    assert evs[0]["owner"] == "alice" and evs[1]["fields"] == ["limits"]
    assert secret not in json.dumps(evs)
    res = await agw_cli(cfg, "audit", "verify")
    assert res.returncode == 0, res.stdout + res.stderr


async def test_demo_config_reload_keeps_demo_values(tmp_path):
    """`gateway demo` then POST /config/reload: the re-read file sees the demo's upstream and admin token."""
    from .test_cli import Demo

    demo = Demo(tmp_path)
    try:
        lines = await asyncio.to_thread(demo.instructions)
        token = next(ln for ln in lines if "admin token:" in ln).split("admin token: ")[1].rstrip(")")
        key = next(ln for ln in lines if "demo API key" in ln).split()[4]
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.post(f"http://127.0.0.1:{demo.admin_port}/config/reload",
                              headers={"Authorization": f"Bearer {token}"}) as r:
                body = await r.json()
                assert r.status == 200, body
                assert body["status"] == "reloaded"
            async with s.post(f"http://127.0.0.1:{demo.port}/v1/chat/completions",
                              json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]},
                              headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200, await r.text()
    finally:
        rc = await asyncio.to_thread(demo.stop)
    assert rc == 0


async def test_key_limit_out_of_range_is_422_not_500(make_gateway, upstream, tmp_path):
    """A limit larger than its column holds is a 422 naming the field (admin API) or a usage error (CLI),
    not a 500 from the database."""
    g = await make_gateway(plugins=[{"name": "key_auth"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        for field, value in (("rpm", 2**31), ("tpm", 10**30), ("daily_tokens", 2**63)):
            async with s.post(g.admin_url + "/keys", headers=AUTH,
                              json={"owner": "bob", "limits": {field: value}}) as r:
                body = await r.json()
                assert r.status == 422, body
                assert body["error"]["param"] == f"limits.{field}" and body["error"]["code"] == "invalid_value"
        async with s.post(g.admin_url + "/keys", headers=AUTH, json={"owner": "bob"}) as r:
            kid = (await r.json())["id"]
        async with s.patch(g.admin_url + f"/keys/{kid}", headers=AUTH,
                           json={"limits": {"monthly_tokens": 10**40}}) as r:
            assert r.status == 422, await r.text()
        async with s.patch(g.admin_url + f"/keys/{kid}", headers=AUTH,
                           json={"limits": {"rpm": 2**31 - 1, "daily_tokens": 2**63 - 1}}) as r:
            rec = await r.json()
            assert r.status == 200 and rec["limits"]["daily_tokens"] == 2**63 - 1, rec
    cfg = write_config(tmp_path / "cli.yaml", base_config("http://127.0.0.1:9", tmp_path, [{"name": "key_auth"}]))
    for bad in ("99999999999999999999", "abc", "0"):
        res = await agw_cli(cfg, "keys", "update", kid, "--rpm", bad)
        assert res.returncode == 2 and "--rpm" in res.stderr and "Traceback" not in res.stderr, res.stderr


async def test_query_string_secrets_stay_out_of_spans(make_gateway, upstream):
    """A key or token a client puts in the URL never reaches a span: not the server span's target/URL
    (refused or forwarded request) and not the upstream CLIENT span's URL."""
    secret = "gw_QUERYCANARY_abcdefghijklmnopqrstuvwxyz0123"
    g = await make_gateway([{"name": "tracing", "config": {"exporter": {"type": "memory"}}}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + f"/v1/models?api_key={secret}&limit=3&token={secret}") as r:
            assert r.status == 200
    spans = g.plugin("tracing").memory_exporter.get_finished_spans()
    assert len(spans) >= 2
    dumped = json.dumps([dict(sp.attributes) for sp in spans], default=str)
    assert secret not in dumped
    assert "api_key=REDACTED" in dumped and "limit=3" in dumped
    assert secret in upstream.requests[-1]["path"]  # only the spans are redacted, the request is relayed as sent


async def test_cli_unreachable_database_and_credentials_in_urls(tmp_path):
    """CLI commands against an unreachable PostgreSQL exit 1 with one line (no traceback, no password);
    `gateway check` does not print the upstream URL's password."""
    from .helpers import free_port

    port = free_port()
    cfg = base_config("http://gwuser:UPSTREAMCANARY@127.0.0.1:9", tmp_path, [
        {"name": "key_auth"}, {"name": "conversations"}, {"name": "audit"}],
        database={"url": f"postgresql+asyncpg://gw:DBCANARY@127.0.0.1:{port}/gw"})
    path = write_config(tmp_path / "pg.yaml", cfg)
    res = await agw_cli(path, "check")
    assert res.returncode == 0 and "UPSTREAMCANARY" not in res.stdout and "gwuser:***@" in res.stdout, res.stdout
    for args in (("keys", "list"), ("keys", "create", "--owner", "a"), ("conversations", "list"),
                 ("audit", "tail"), ("db", "upgrade")):
        res = await agw_cli(path, *args)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and "CANARY" not in res.stderr + res.stdout, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "error" in res.stderr, (args, res.stderr)


async def test_cli_key_values_checked_like_admin_api(tmp_path):
    """`gateway keys` applies the admin API's rules: empty owner, over-long name, a scope path without '/',
    a grace period out of range are refused (exit 1, one line) and nothing is written."""
    cfg = write_config(tmp_path / "gateway.yaml", base_config("http://127.0.0.1:9", tmp_path, [{"name": "key_auth"}]))
    res = await agw_cli(cfg, "keys", "create", "--owner", "a", "--json")
    assert res.returncode == 0, res.stderr
    kid = json.loads(res.stdout)["id"]
    for args, word in ((("create", "--owner", ""), "owner"), (("create", "--owner", "a", "--name", "n" * 201), "name"),
                       (("create", "--owner", "a", "--scope-path", "v1"), "scopes.paths"),
                       (("update", kid, "--scope-path", "v1"), "scopes.paths"),
                       (("rotate", kid, "--grace", "-1"), "--grace")):
        res = await agw_cli(cfg, "keys", *args)
        assert res.returncode == 2 and word in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    res = await agw_cli(cfg, "keys", "list", "--limit", "0")
    assert res.returncode == 2 and "--limit" in res.stderr
    res = await agw_cli(cfg, "keys", "show", kid, "--json")
    rec = json.loads(res.stdout)
    assert rec["scopes"] == {"paths": [], "models": []} and rec["rotated_at"] is None
    con = sqlite3.connect(tmp_path / "gateway.db")
    try:
        assert con.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1
    finally:
        con.close()


async def test_unsendable_header_values_rejected_at_load(tmp_path):
    """A CR/LF in an upstream.headers value (or in the headers plugin) made every request a plain-text 500;
    now `gateway check` refuses the file, naming the key and line, without repeating the credential."""
    cfg = base_config("http://127.0.0.1:9", tmp_path, [
        {"name": "headers", "config": {"request": {"X-A": "v\nX-B: 2"}, "response": {"X:Y": "ok"}}}],
        upstream={"url": "http://127.0.0.1:9", "headers": {"Authorization": "Bearer HDRCANARY\r\nX-Evil: 1"}})
    path = write_config(tmp_path / "h.yaml", cfg)
    res = await agw_cli(path, "check")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "HDRCANARY" not in res.stderr and "Traceback" not in res.stderr
    assert "upstream.headers.Authorization -> line" in res.stderr
    assert "plugins[0].config.request -> line" in res.stderr and "plugins[0].config.response -> line" in res.stderr
    ok = base_config("http://127.0.0.1:9", tmp_path, [{"name": "headers", "config": {"request": {"X-A": "v"}}}],
                     upstream={"url": "http://127.0.0.1:9", "headers": {"Authorization": "Bearer x"}})
    res = await agw_cli(write_config(tmp_path / "ok.yaml", ok), "check")
    assert res.returncode == 0, res.stderr


async def test_admin_keys_hostile_bodies_and_params(make_gateway, upstream):
    """Deeply nested JSON, an offset past the database's integer range, a body over the admin limit and a
    NaN grace period each get a 4xx in the error shape, not a 500."""
    g = await make_gateway(plugins=[{"name": "key_auth"}])
    nested = '{"owner": "x", "metadata": {"a": ' + "[" * 100000 + "]" * 100000 + "}}"
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.admin_url + "/keys", headers={**AUTH, "Content-Type": "application/json"},
                          data=nested) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["code"] == "invalid_json", body
        async with s.get(g.admin_url + "/keys?offset=99999999999999999999999", headers=AUTH) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["param"] == "offset", body
        async with s.post(g.admin_url + "/keys", headers=AUTH, data=b"a" * (2 * 2**20)) as r:
            body = await r.json()
            assert r.status == 413 and body["error"]["code"] == "request_too_large", body
        async with s.post(g.admin_url + "/keys", headers=AUTH, json={"owner": "x"}) as r:
            kid = (await r.json())["id"]
        async with s.post(g.admin_url + f"/keys/{kid}/rotate", headers={**AUTH, "Content-Type": "application/json"},
                          data='{"grace_seconds": NaN}') as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["code"] == "invalid_json", body  # NaN is not JSON
        async with s.get(g.admin_url + f"/keys/{kid}", headers=AUTH) as r:
            assert (await r.json())["rotated_at"] is None


async def test_identity_headers_never_carry_control_characters(make_gateway, upstream):
    """A key owner/name with CR/LF made every request of that key a plain-text 500 once the identity was
    forwarded in headers. The admin API now refuses such labels, and a row that already has them is
    forwarded with the control characters replaced (no header injection, no 500)."""
    from gateway.plugins.key_auth import key_store

    g = await make_gateway(plugins=[{"name": "key_auth", "config": {
        "forward_identity_headers": {"X-Owner": "owner", "X-Key-Name": "name"}}}])
    async with aiohttp.ClientSession(timeout=T) as s:
        for body in ({"owner": "a\r\nX-Evil: 1"}, {"owner": "a", "name": "n\nm"}, {"owner": "a", "team": "t\x00"}):
            async with s.post(g.admin_url + "/keys", headers=AUTH, json=body) as r:
                err = await r.json()
                assert r.status == 422 and "control characters" in err["error"]["message"], err
        _, key = await key_store(g.gw.services).create(pepper="", owner="old\r\nX-Evil: 1", name="José 日本")
        async with s.get(g.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200, await r.text()
    seen = upstream.requests[-1]["headers"]
    assert "X-Evil" not in seen and seen["X-Owner"] == "old  X-Evil: 1" and seen["X-Key-Name"] == "José 日本"
    res = await agw_cli(g.gw.cfg.path, "keys", "create", "--owner", "bad\nowner")
    assert res.returncode == 2 and "control characters" in res.stderr, res.stderr


async def test_rate_limit_counters_of_long_owners_do_not_collide(make_gateway, upstream):
    """Counter identifiers were cut at 200 characters: two owners (up to 200 characters each) sharing their
    first 194 characters shared one counter, so one user's traffic throttled the other."""
    g = await make_gateway(plugins=[{"name": "key_auth"}, {"name": "rate_limit", "config": {
        "rules": [{"name": "per-owner", "limit": "1/minute", "key_by": ["owner"]}]}}])
    keys = []
    async with aiohttp.ClientSession(timeout=T) as s:
        for last in "ab":
            async with s.post(g.admin_url + "/keys", headers=AUTH, json={"owner": "o" * 199 + last}) as r:
                keys.append((await r.json())["key"])
        statuses = []
        for key in keys + keys:
            async with s.get(g.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                statuses.append(r.status)
    assert statuses == [200, 200, 429, 429]



async def test_redis_password_in_query_stays_out_of_logs_and_metrics(make_gateway, upstream, caplog):
    """A Redis URL carrying its password as ?password= was logged and used as a metric label in
    clear when the store failed; only user:password@ was masked. The Redis client does not read a
    password there (it connected without it), so such a URL is now refused at load, without
    showing it; a Unix socket's query is masked as before."""
    from gateway.config import ConfigError

    from .helpers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0?password=QUERYCANARY&socket_timeout=1"
    with pytest.raises(ConfigError) as ei:
        await make_gateway(plugins=[{"name": "rate_limit", "config": {
            "storage": url, "on_store_error": "allow", "rules": [{"name": "r", "limit": "100/minute", "key_by": ["ip"]}]}}])
    assert "QUERYCANARY" not in str(ei.value) and "in the storage URL's query is not used" in str(ei.value)
    sock = "redis+unix:///nonexistent/redis.sock?db=0&password=QUERYCANARY"
    g = await make_gateway(plugins=[{"name": "rate_limit", "config": {
        "storage": sock, "on_store_error": "allow", "rules": [{"name": "r", "limit": "100/minute", "key_by": ["ip"]}]}}],
        name="unix.yaml")
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models") as r:
            assert r.status == 200
        async with s.get(g.admin_url + "/metrics", headers=AUTH) as r:
            metrics = await r.text()
    assert "gateway_ratelimit_store_errors_total{" in metrics and "password=***" in metrics
    assert "QUERYCANARY" not in metrics and "QUERYCANARY" not in caplog.text
    assert "password=***" in caplog.text


async def test_env_secrets_are_taken_verbatim(tmp_path, upstream, monkeypatch):
    """An interpolated value was re-read as a YAML document: a pepper or token starting with '#' became
    empty (keys silently hashed without the pepper), 'a #b' lost its end, 'a: b' became a mapping.
    Now such values are kept verbatim; numbers and flow lists ("[10.0.0.0/8]") are still typed."""
    from .helpers import start_gateway

    text = ("server:\n  host: 127.0.0.1\n  port: 0\n  trusted_proxies: ${PROXIES:-[10.0.0.0/8]}\n"
            "admin:\n  host: 127.0.0.1\n  port: ${APORT:-0}\n  token: ${TOK}\n"
            f"upstream: {{url: {upstream.url}}}\n"
            f"database: {{url: 'sqlite+aiosqlite:///{tmp_path / 'gateway.db'}'}}\n"
            "plugins:\n  - name: key_auth\n    config:\n      pepper: ${PEPPER:-}\n      cache_ttl: 0\n")
    cfg = write_config(tmp_path / "gateway.yaml", text)
    monkeypatch.setenv("TOK", "#admin: token #with-hash")
    monkeypatch.setenv("PEPPER", "#first-pepper")
    res = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "keys", "create", "--owner", "o",
                                                   "--json", "-c", str(cfg)], capture_output=True, text=True,
                                  timeout=60)
    assert res.returncode == 0, res.stderr
    key = json.loads(res.stdout)["key"]
    statuses = []
    for pepper in ("#first-pepper", "#second-pepper"):
        monkeypatch.setenv("PEPPER", pepper)
        g = await start_gateway(cfg)
        try:
            assert g.gw.cfg.admin.token == "#admin: token #with-hash"
            assert g.gw.cfg.server.trusted_proxies == ["10.0.0.0/8"] and g.gw.admin_port
            async with aiohttp.ClientSession(timeout=T) as s:
                async with s.get(g.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                    statuses.append(r.status)
                async with s.get(g.admin_url + "/keys", headers={"Authorization": "Bearer #admin: token #with-hash"}) as r:
                    assert r.status == 200
        finally:
            await g.stop()
    assert statuses == [200, 401]  # the pepper is really in use: another pepper rejects the key


async def test_check_rejects_unparsable_database_url(tmp_path):
    """`gateway check` said OK for a database URL SQLAlchemy cannot parse (a non-numeric port, an
    unclosed IPv6 bracket), which then failed at start; now it names the key and line, never the URL."""
    for url in ("postgresql+asyncpg://u:DBCANARY@db:notaport/gw", "postgresql+asyncpg://u:DBCANARY@[::1/gw"):
        cfg = write_config(tmp_path / "db.yaml", base_config("http://127.0.0.1:9", tmp_path, database={"url": url}))
        res = await agw_cli(cfg, "check")
        assert res.returncode == 2 and "database.url -> line" in res.stderr, res.stdout + res.stderr
        assert "DBCANARY" not in res.stderr
    cfg = write_config(tmp_path / "ok.yaml", base_config("http://127.0.0.1:9", tmp_path, database={
        "url": "postgresql+asyncpg://u:p%40ss@db:5432/gw"}))
    res = await agw_cli(cfg, "check")
    assert res.returncode == 0, res.stderr
