"""A client's API key and its own copies of the identity headers key_auth forwards never reach the
upstream, also through a route that turns key_auth off (a public model list, say): a backend that
trusts X-Gateway-Owner must not be fooled there, and the gateway key must not leak to it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

T = aiohttp.ClientTimeout(total=20)
KEY_AUTH = {"name": "key_auth", "config": {
    "headers": ["Authorization", "X-API-Key", "api-key"],
    "forward_identity_headers": {"X-Gateway-Owner": "owner", "X-Gateway-Key-Id": "key_id"}}}
PUBLIC = {"name": "models", "path_prefix": "/v1/models", "methods": ["GET"], "plugins": {"key_auth": {"enabled": False}}}


def create_key(cfg: Path, owner: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--name", "k", "--owner", owner,
                          "--json", "-c", str(cfg)], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)["key"]


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


async def test_forged_identity_and_keys_are_dropped_on_a_route_without_key_auth(make_gateway: Any, upstream: Any,
                                                                                tmp_path: Path) -> None:
    g = await make_gateway([KEY_AUTH], routes=[PUBLIC])
    key = create_key(tmp_path / "gateway.yaml", "alice")
    forged = {"X-Gateway-Owner": "root", "X-Gateway-Key-Id": "admin", "X-API-Key": key, "api-key": key,
              # (what CGI/WSGI servers read as X-Gateway-Owner and X-Forwarded-For)
              "X_Gateway_Owner": "root", "X-Gateway_Key-Id": "admin", "X_Forwarded_For": "10.0.0.1"}
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models", headers=forged) as r:  # the public route
            assert r.status == 200
        seen = lower(upstream.requests[-1]["headers"])
        assert upstream.requests[-1]["path"] == "/v1/models"
        for h in ("x-gateway-owner", "x-gateway-key-id", "x-api-key", "api-key", "x_gateway_owner",
                  "x-gateway_key-id", "x_forwarded_for"):
            assert h not in seen, (h, seen)
        assert key not in json.dumps(upstream.requests[-1])

        # On a key_auth route the real identity is forwarded, not the client's.
        async with s.post(g.url + "/v1/chat/completions", headers=forged,
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
        seen = lower(upstream.requests[-1]["headers"])
        assert seen["x-gateway-owner"] == "alice" and seen["x-gateway-key-id"] == key.split("_")[1]
        assert "x-api-key" not in seen and "api-key" not in seen


async def test_a_header_the_upstream_config_sets_is_the_config_s(make_gateway: Any, upstream: Any,
                                                                 tmp_path: Path) -> None:
    """An upstream that authenticates with `api-key` gets the configured one, never the client's
    gateway key, with key_auth on or off; a key_auth configured only on a route guards every route."""
    ka = {**KEY_AUTH, "enabled": False}
    chat_route = {"path_prefix": "/v1/chat", "plugins": {"key_auth": {"enabled": True}}}
    g = await make_gateway([ka], routes=[chat_route], upstream={"url": upstream.url,
                                                               "headers": {"api-key": "backend-secret"}})
    key = create_key(tmp_path / "gateway.yaml", "bob")
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models", headers={"api-key": key, "X-Gateway-Owner": "root"}) as r:
            assert r.status == 200
        seen = lower(upstream.requests[-1]["headers"])
        assert seen["api-key"] == "backend-secret" and "x-gateway-owner" not in seen
        async with s.post(g.url + "/v1/chat/completions", headers={"api-key": key},
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
        seen = lower(upstream.requests[-1]["headers"])
        assert seen["api-key"] == "backend-secret" and seen["x-gateway-owner"] == "bob"


async def test_configured_names_with_underscores_are_guarded_in_every_spelling(make_gateway: Any, upstream: Any,
                                                                                 tmp_path: Path) -> None:
    ka = {"name": "key_auth", "config": {"headers": ["Authorization", "X_Api_Key"],
                                         "forward_identity_headers": {"X_Gateway_Owner": "owner"}}}
    g = await make_gateway([ka], routes=[PUBLIC])
    key = create_key(tmp_path / "gateway.yaml", "carol")
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models", headers={"X_Gateway_Owner": "mallory", "X-Gateway-Owner": "m2",
                                                         "X_Api_Key": key, "X-Api-Key": key}) as r:
            assert r.status == 200
        seen = lower(upstream.requests[-1]["headers"])
        assert not {"x_gateway_owner", "x-gateway-owner", "x_api_key", "x-api-key"} & set(seen), seen
        async with s.post(g.url + "/v1/chat/completions", headers={"X_Api_Key": key, "X-Gateway-Owner": "m2"},
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
        seen = lower(upstream.requests[-1]["headers"])
        assert seen.get("x_gateway_owner") == "carol" and "x-gateway-owner" not in seen, seen
