"""key_auth's admin API and CLI on inputs an operator's script gets wrong: a list filter the API
does not know (ignored, it listed every key), a scope entry with a control character (stored, the
key then refused for the model it was meant for), per-key limits nothing enforces."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import ADMIN_TOKEN, base_config, write_config

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def admin(g: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, g.admin_url + path, json=body, headers=AUTH,
                             timeout=aiohttp.ClientTimeout(total=10)) as r:
            return r.status, await r.json(content_type=None)


def keys_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "keys", *args, "-c", str(cfg)], capture_output=True,
                          text=True, timeout=60, env={**os.environ})


async def test_list_refuses_unknown_parameters_and_filters_by_name(make_gateway: Any, upstream: Any,
                                                                   tmp_path: Path) -> None:
    g = await make_gateway([{"name": "key_auth"}])
    made = {}
    for name in ("svc-007", "svc-008", "svc-007x"):
        st, rec = await admin(g, "POST", "/keys", {"owner": "ops", "name": name})
        assert st == 201, rec
        made[name] = rec["id"]
    # "find by name, then revoke": a filter the API did not know listed every key
    for query, param in (("nme=svc-007", "nme"), ("name=svc-007&ownr=ops", "ownr"), ("q=x", "q"),
                         ("name=svc-007&name=svc-008", "name"), ("gw_AAAAAAAAAAAA_secretsecret", None)):
        st, b = await admin(g, "GET", f"/keys?{query}")
        assert st == 400 and b["error"]["code"] == "invalid_value" and b["error"]["param"] == param, (query, b)
        assert b["error"]["type"] == "invalid_request_error" and "data" not in b
        assert "secret" not in json.dumps(b)  # (a key pasted as a parameter is not echoed)
    st, b = await admin(g, "GET", "/keys?name=svc-007")
    assert st == 200 and [r["id"] for r in b["data"]] == [made["svc-007"]], b  # exact: not svc-007x
    st, b = await admin(g, "GET", "/keys?name=svc-007&owner=ops&status=active&limit=5&offset=0")
    assert st == 200 and [r["id"] for r in b["data"]] == [made["svc-007"]], b
    st, b = await admin(g, "GET", "/keys?name=nobody")
    assert st == 200 and b["data"] == []
    st, b = await admin(g, "GET", "/keys?name=a%00b")
    assert st == 400 and b["error"]["param"] == "name", b
    st, doc = await admin(g, "GET", "/openapi.json")
    params = [p["name"] for p in doc["paths"]["/keys"]["get"]["parameters"]]
    assert "name" in params, params
    # the CLI: the same filter
    cfg = write_config(tmp_path / "cli.yaml", base_config(upstream.url, tmp_path, [{"name": "key_auth"}]))
    r = await asyncio.to_thread(keys_cli, cfg, "list", "--name", "svc-007", "--json")
    assert r.returncode == 0, r.stderr
    assert [x["id"] for x in json.loads(r.stdout)] == [made["svc-007"]]


async def test_scope_entries_with_control_characters_are_refused(make_gateway: Any, upstream: Any,
                                                                 tmp_path: Path) -> None:
    """``llama3\\r`` (a model list exported on Windows) was stored, and the key then got 403 for llama3."""
    g = await make_gateway([{"name": "key_auth"}])
    st, rec = await admin(g, "POST", "/keys", {"owner": "ops", "scopes": {"models": ["llama3"]}})
    assert st == 201, rec
    for scopes, param in (({"models": ["llama3\r"]}, "scopes.models.0"),
                          ({"models": ["gpt-4o", "llama3\n"]}, "scopes.models.1"),
                          ({"models": ["demo\t*"]}, "scopes.models.0"),
                          ({"models": ["llama3 "]}, "scopes.models.0"),
                          ({"models": ["llama\u202e3"]}, "scopes.models.0"),
                          ({"models": ["llama\x853"]}, "scopes.models.0"),
                          ({"models": ["\ufeffllama3"]}, "scopes.models.0"),  # (a BOM from an exported list)
                          ({"models": ["llama\u200b3"]}, "scopes.models.0"),
                          ({"paths": ["/v1/chat/\u202e"]}, "scopes.paths.0"),
                          ({"paths": ["/v1/\x9b"]}, "scopes.paths.0")):
        for method, path, body in (("POST", "/keys", {"owner": "ops", "scopes": scopes}),
                                   ("PATCH", f"/keys/{rec['id']}", {"scopes": scopes})):
            st, b = await admin(g, method, path, body)
            assert st == 422 and b["error"]["param"] == param, (method, scopes, b)
            assert "control characters" in b["error"]["message"] or "blanks" in b["error"]["message"], b
    st, b = await admin(g, "GET", f"/keys/{rec['id']}")
    assert b["scopes"] == {"paths": [], "models": ["llama3"]}, b  # unchanged
    st, b = await admin(g, "GET", "/keys?owner=ops")
    assert len(b["data"]) == 1, b  # nothing created
    # the CLI: the same rule, exit 2, the entry shown escaped
    cfg = write_config(tmp_path / "cli.yaml", base_config(upstream.url, tmp_path, [{"name": "key_auth"}]))
    for args in (("create", "--owner", "ops", "--scope-model", "llama3\r"),
                 ("update", rec["id"], "--scope-model", "llama3\r"),
                 ("create", "--owner", "ops", "--scope-path", "/v1/\u202e")):
        r = await asyncio.to_thread(keys_cli, cfg, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "control characters" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "\r" not in r.stderr and "\u202e" not in r.stderr, r.stderr
        assert "'llama3\\r'" in r.stderr or "\\u202e" in r.stderr, r.stderr  # which entry, escaped
    st, b = await admin(g, "GET", "/keys?owner=ops")
    assert len(b["data"]) == 1 and b["data"][0]["scopes"]["models"] == ["llama3"], b


def _cfg(tmp_path: Path, upstream: Any, name: str, *plugins: dict[str, Any], **sections: Any) -> Path:
    return write_config(tmp_path / name, base_config(upstream.url, tmp_path, [{"name": "key_auth"}, *plugins],
                                                     **sections))


async def test_cli_warns_of_per_key_limits_nothing_applies(upstream: Any, tmp_path: Path) -> None:
    """`gateway keys create --rpm 1` with no rate_limit (or with key_overrides: false) made a key that
    no limit held, and said nothing: now one line on stderr, the exit code and stdout unchanged."""
    bare = _cfg(tmp_path, upstream, "bare.yaml")
    r = await asyncio.to_thread(keys_cli, bare, "create", "--owner", "a", "--rpm", "1", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)  # stdout is still the record alone
    assert rec["limits"]["rpm"] == 1
    lines = [ln for ln in r.stderr.splitlines() if "warning" in ln]  # (and "created a new database")
    assert len(lines) == 1 and "limits (--rpm) are stored but not applied" in lines[0], r.stderr
    assert "no rate_limit plugin" in lines[0], r.stderr
    r = await asyncio.to_thread(keys_cli, bare, "update", rec["id"], "--tpm", "50", "--max-parallel", "2")
    assert r.returncode == 0 and "limits (--tpm, --max-parallel) are stored but not applied" in r.stderr, r.stderr
    off = _cfg(tmp_path, upstream, "off.yaml", {"name": "rate_limit", "config": {"key_overrides": False}})
    r = await asyncio.to_thread(keys_cli, off, "create", "--owner", "a", "--daily-tokens", "9")
    assert r.returncode == 0 and "key_overrides: false" in r.stderr and "--daily-tokens" in r.stderr, r.stderr
    disabled = _cfg(tmp_path, upstream, "disabled.yaml", {"name": "rate_limit", "enabled": False})
    r = await asyncio.to_thread(keys_cli, disabled, "create", "--owner", "a", "--rpm", "3")
    assert r.returncode == 0 and "disabled" in r.stderr, r.stderr
    # applied somewhere: no warning (rate_limit on, or off but on for one route, or off but with
    # key_overrides on one route); no limit given, or one cleared: no warning either
    quiet = [(bare, ("update", rec["id"], "--rpm", "none")), (bare, ("create", "--owner", "a", "--name", "n")),
             (_cfg(tmp_path, upstream, "on.yaml", {"name": "rate_limit"}), ("create", "--owner", "a", "--rpm", "1")),
             (_cfg(tmp_path, upstream, "route.yaml", {"name": "rate_limit", "enabled": False},
                   routes=[{"path_prefix": "/v1/chat", "plugins": {"rate_limit": {"enabled": True}}}]),
              ("create", "--owner", "a", "--rpm", "1")),
             (_cfg(tmp_path, upstream, "route2.yaml", {"name": "rate_limit", "config": {"key_overrides": False}},
                   routes=[{"path_prefix": "/v1/chat", "plugins": {"rate_limit": {"config": {
                       "key_overrides": True}}}}]),
              ("update", rec["id"], "--rpm", "1"))]
    for cfg, args in quiet:
        r = await asyncio.to_thread(keys_cli, cfg, *args)
        assert r.returncode == 0 and r.stderr == "", (cfg.name, args, r.stderr)


async def test_admin_api_logs_per_key_limits_nothing_applies(make_gateway: Any, caplog: Any) -> None:
    g = await make_gateway([{"name": "key_auth"}, {"name": "rate_limit", "config": {"key_overrides": False}}])
    with caplog.at_level("WARNING", logger="gateway.key_auth"):
        st, rec = await admin(g, "POST", "/keys", {"owner": "a", "limits": {"rpm": 1}})
        assert st == 201 and rec["limits"]["rpm"] == 1 and rec["key"], rec
        assert set(rec) >= {"id", "key", "limits", "owner", "status"} and "warning" not in rec
        st, upd = await admin(g, "PATCH", f"/keys/{rec['id']}", {"limits": {"tpm": 10, "rpm": None}})
        assert st == 200 and "warning" not in upd, upd
        st, _ = await admin(g, "PATCH", f"/keys/{rec['id']}", {"limits": {"rpm": None}})  # cleared: no line
        st, _ = await admin(g, "POST", "/keys", {"owner": "b"})  # no limits: no line
    said = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    assert len(said) == 2, said
    assert f"key {rec['id']}: its limits (rpm)" in said[0] and "key_overrides: false" in said[0], said
    assert "(tpm)" in said[1], said
