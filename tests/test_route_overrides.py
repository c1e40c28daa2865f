"""Per-route overrides at their edges: process-wide settings refused per route, prefixes written
with %XX escapes refused, and a plugin API served when the plugin runs on some routes only."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import base_config, until, write_config

T = aiohttp.ClientTimeout(total=20)


def check(tmp_path: Path, plugins: Any, **sections: Any) -> subprocess.CompletedProcess[str]:
    cfg = write_config(tmp_path / "c.yaml", base_config("http://127.0.0.1:9", tmp_path, plugins, **sections))
    return subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)


def test_shared_writer_settings_cannot_be_set_per_route(tmp_path: Path) -> None:
    # A route's flush_interval: 8 used to configure the one shared writer, for every route.
    res = check(tmp_path, [{"name": "audit"}], routes=[{"path_prefix": "/v1/rare", "plugins": {
        "audit": {"config": {"flush_interval": 8, "retention_days": 1}}}}])
    assert res.returncode == 2, res.stdout
    for field in ("flush_interval", "retention_days"):
        assert f"routes[0].plugins.audit.config.{field} -> line" in res.stderr and "cannot be set per route" in res.stderr
    # The sinks may differ per route.
    ok = check(tmp_path, [{"name": "audit"}], routes=[{"path_prefix": "/v1/rare", "plugins": {
        "audit": {"config": {"sinks": ["database", {"type": "jsonl", "path": str(tmp_path / "rare.jsonl")}]}}}}])
    assert ok.returncode == 0, ok.stderr


def test_each_plugin_s_shared_settings_are_refused_per_route(tmp_path: Path) -> None:
    for plugin, config, field in (("conversations", {"queue_size": 10}, "queue_size"),
                                  ("conversations", {"cache_bytes": 0}, "cache_bytes"),
                                  ("key_auth", {"usage_writer": {"batch_size": 1}}, "usage_writer"),
                                  ("key_auth", {"pepper": "x" * 40}, "pepper"),
                                  ("rate_limit", {"quotas": {"cache_ttl": 1}}, "quotas.cache_ttl")):
        res = check(tmp_path, [{"name": plugin}], routes=[{"path_prefix": "/v1/x", "plugins": {
            plugin: {"config": config}}}])
        assert res.returncode == 2 and f"routes[0].plugins.{plugin}.config.{field} -> line" in res.stderr, res.stderr
    # what may differ per route still does
    ok = check(tmp_path, [{"name": "conversations"}, {"name": "key_auth"}], routes=[{"path_prefix": "/v1/x", "plugins": {
        "conversations": {"config": {"memory": {"enabled": True}, "cache_ttl": 0}},
        "key_auth": {"config": {"track_usage": False}}}}])
    assert ok.returncode == 0, ok.stderr


def test_check_names_a_plugin_on_for_some_routes_only(tmp_path: Path) -> None:
    res = check(tmp_path, [{"name": "key_auth"}, {"name": "conversations", "enabled": False},
                           {"name": "audit", "enabled": False}],
                routes=[{"path_prefix": "/v1/chat", "plugins": {"conversations": {"enabled": True}}}])
    assert res.returncode == 0 and "3 plugin(s): key_auth, conversations (on some routes);" in res.stdout


def test_an_override_left_empty_is_as_if_absent(tmp_path: Path) -> None:
    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"""upstream: {{url: "http://127.0.0.1:9"}}
database: {{url: "sqlite+aiosqlite:///{tmp_path / 'e.db'}"}}
plugins:
  - name: rate_limit
routes:
  - path_prefix: /v1/models
    plugins:
      rate_limit:
  - path_prefix: /v1/x
    plugins:
      # conversations: {{enabled: false}}
""")
    res = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "2 route override(s)" in res.stdout, res.stderr


def test_a_percent_escape_in_a_prefix_is_refused(tmp_path: Path) -> None:
    # It would match only a path escaping the '%' itself (/v1/a%253Ab): the prefix is compared
    # with the decoded request path.
    res = check(tmp_path, [], routes=[{"path_prefix": "/v1/a%3Ab", "plugins": {}}])
    assert res.returncode == 2 and "routes[0].path_prefix" in res.stderr and "%XX escape" in res.stderr
    res = check(tmp_path, [], server={"paths": ["/v1/x%2Fy"]})
    assert res.returncode == 2 and "%XX escape" in res.stderr
    assert check(tmp_path, [], routes=[{"path_prefix": "/v1/100%", "plugins": {}}]).returncode == 0


async def own_conversation_listed(g: Any, tmp_path: Path) -> tuple[dict[str, str], str]:
    """A new key chats once through the gateway; its conversation shows in its caller list, and the
    list wants a key. (The key's headers and the conversation id.)"""
    out = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--name", "k", "--owner", "alice",
                          "--json", "-c", str(tmp_path / "gateway.yaml")], capture_output=True, text=True, timeout=60,
                         check=True)
    auth = {"Authorization": "Bearer " + json.loads(out.stdout)["key"]}
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", headers=auth,
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
            cid = r.headers["X-Conversation-ID"]

        async def listed() -> Any:
            async with s.get(g.url + "/gateway/conversations", headers=auth) as r:
                assert r.status == 200, await r.text()  # (was 404 with no route for it, or 200 anonymous)
                return [c["id"] for c in (await r.json())["data"]] == [cid]

        await until(listed, what="the conversation in the caller's list")
        async with s.get(g.url + "/gateway/conversations") as r:  # a key_auth applies
            assert r.status == 401
    return auth, cid


async def test_caller_api_of_a_plugin_on_for_some_routes_only(make_gateway: Any, tmp_path: Path) -> None:
    g = await make_gateway([{"name": "key_auth"}, {"name": "conversations", "enabled": False}],
                           routes=[{"path_prefix": "/v1/chat/completions", "methods": ["POST"],
                                    "plugins": {"conversations": {"enabled": True}}}])
    auth, cid = await own_conversation_listed(g, tmp_path)
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + f"/gateway/conversations/{cid}", headers=auth) as r:
            assert r.status == 200 and [m["role"] for m in (await r.json())["messages"]] == ["user", "assistant"]


async def test_the_plugin_api_is_answered_with_the_default_chain_s_auth(make_gateway: Any, tmp_path: Path) -> None:
    """The route conversations comes from turns key_auth off: its API still needs a key (the
    default chain's key_auth), and a caller sees their own conversations only."""
    g = await make_gateway([{"name": "key_auth"}, {"name": "conversations", "enabled": False}],
                           routes=[{"path_prefix": "/v1", "plugins": {"conversations": {"enabled": True}}},
                                   {"path_prefix": "/v1/chat/completions", "plugins": {
                                       "key_auth": {"enabled": False}, "conversations": {"enabled": True}}}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions",  # anonymous: key_auth is off there
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
        async with s.get(g.url + "/gateway/conversations") as r:
            assert r.status == 401, await r.text()  # (was 200, listing the anonymous conversations)


async def test_the_plugin_api_needs_a_key_if_its_route_does(make_gateway: Any, tmp_path: Path) -> None:
    """key_auth and conversations both on for one route only: the caller's API on its own path
    takes the route's key_auth, so a caller sees their own conversations (not served anonymously)."""
    g = await make_gateway([{"name": "key_auth", "enabled": False}, {"name": "conversations", "enabled": False}],
                           routes=[{"path_prefix": "/v1/chat", "plugins": {"key_auth": {"enabled": True},
                                                                          "conversations": {"enabled": True}}}])
    await own_conversation_listed(g, tmp_path)


async def test_a_route_takes_bodies_of_its_own_size(make_gateway: Any, upstream: Any, tmp_path: Path) -> None:
    """Uploads (audio transcriptions, files) need more than chat: a route's max_body_size applies
    to it alone; the rest keeps server.max_body_size; a reload changes it."""
    g = await make_gateway(server={"max_body_size": "1MiB"},
                           routes=[{"path_prefix": "/v1/audio", "max_body_size": "2MiB"}])
    big, bigger = b"x" * (3 * 2**19), b"x" * (5 * 2**19)  # 1.5 MiB, 2.5 MiB
    async with aiohttp.ClientSession() as s:
        async def post(path: str, body: bytes) -> tuple[int, Any]:
            async with s.post(g.url + path, data=body, headers={"Content-Type": "application/octet-stream"}) as r:
                return r.status, await r.read()

        assert (await post("/v1/audio/transcriptions", big))[0] == 200
        assert len(upstream.requests[-1]["body"]) == len(big)
        # the 413 names the setting that decides it: what the operator reading a client's report raises
        status, body = await post("/v1/chat/completions", big)
        assert status == 413 and json.loads(body)["error"]["message"] == (
            "Request body exceeds the limit of 1048576 bytes (server.max_body_size)."), body
        status, body = await post("/v1/audio/transcriptions", bigger)
        assert status == 413 and json.loads(body)["error"]["message"] == (
            "Request body exceeds the limit of 2097152 bytes (max_body_size of route '/v1/audio')."), body

        async def chunks() -> Any:  # (no Content-Length: refused while it is read)
            for _ in range(5):
                yield b"x" * 2**19

        async with s.post(g.url + "/v1/audio/transcriptions", data=chunks()) as r:
            assert r.status == 413 and "(max_body_size of route '/v1/audio')" in (await r.json())["error"]["message"]
        path = Path(g.gw.cfg.path)
        path.write_text(path.read_text().replace("2MiB", "3MiB"))
        assert (await g.gw.reload())[0] is True
        assert (await post("/v1/audio/transcriptions", bigger))[0] == 200


async def test_a_closed_route_is_answered_404_after_its_plugins_and_never_forwarded(make_gateway: Any, upstream: Any,
                                                                                    tmp_path: Path) -> None:
    """Stored objects a hosted API keeps per API key (stored completions, files) would be shared by
    every owner through the gateway's one credential: routes closed with forward: false answer
    404 without reaching the upstream, after key_auth (a missing key is still a 401) and with the
    attempt in the audit trail; the rest of the path's methods still go through."""
    import sqlite3

    g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {"flush_interval": 0.05}}],
                           routes=[{"name": "stored", "path_prefix": "/v1/chat/completions", "methods": ["GET", "DELETE"],
                                    "forward": False},
                                   {"path_prefix": "/v1/files", "forward": False}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.admin_url + "/keys", json={"owner": "alice"},
                          headers={"Authorization": "Bearer test-admin-token-0123456789abcdef"}) as r:
            key = (await r.json())["key"]
        auth = {"Authorization": f"Bearer {key}"}
        before = len(upstream.requests)
        for method, path in (("GET", "/v1/chat/completions"), ("GET", "/v1/chat/completions/chatcmpl-1/messages"),
                             ("HEAD", "/v1/chat/completions"), ("DELETE", "/v1/chat/completions/chatcmpl-1"),
                             ("POST", "/v1/files"), ("GET", "/v1/FILES/file-1")):
            async with s.request(method, g.url + path, headers=auth) as r:
                assert r.status == 404, (method, path)
                if method != "HEAD":
                    err = (await r.json())["error"]
                    assert err["code"] == "not_found" and "does not forward" in err["message"], err
        async with s.get(g.url + "/v1/chat/completions") as r:
            assert r.status == 401  # (the route's plugins ran first)
        assert len(upstream.requests) == before
        async with s.post(g.url + "/v1/chat/completions", headers=auth,
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
        assert len(upstream.requests) == before + 1
    await g.stop()
    con = sqlite3.connect(tmp_path / "gateway.db")
    try:
        rows = [json.loads(d) for (d,) in con.execute("SELECT data FROM audit_events WHERE type = 'request'")]
    finally:
        con.close()
    closed = [e for e in rows if e["status"] == 404]
    assert len(closed) == 6 and all(e["key_id"] and e["route"] in ("stored", "/v1/files") for e in closed), closed


async def test_memory_fits_history_within_the_routes_own_body_size(make_gateway: Any, upstream: Any) -> None:
    """Memory mode keeps the forwarded body within the limit the request had: its route's
    max_body_size, not server.max_body_size (under which a turn the route allows went without its
    history, silently)."""
    g = await make_gateway([{"name": "conversations", "config": {"memory": {"enabled": True}}}],
                           server={"max_body_size": "64KiB"},
                           routes=[{"path_prefix": "/v1/chat/completions", "max_body_size": "1MiB"}])
    async with aiohttp.ClientSession() as s:
        async def turn(text: str, cid: str | None) -> str:
            h = {"X-Conversation-ID": cid} if cid else {}
            async with s.post(g.url + "/v1/chat/completions", headers=h, json={
                    "model": "demo-chat", "messages": [{"role": "user", "content": text}]}) as r:
                assert r.status == 200, await r.text()
                return r.headers["X-Conversation-ID"]

        cid = await turn("a" * 30_000, None)
        await turn("b" * 50_000, cid)
    sent = upstream.requests[-1]["body"]["messages"]
    assert [m["content"][:1] for m in sent if m["role"] == "user"] == ["a", "b"]  # the history went along
