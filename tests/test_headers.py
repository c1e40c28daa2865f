"""The built-in `headers` plugin: set/remove headers on the upstream request and the client response."""
from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, load_config_text

T = aiohttp.ClientTimeout(total=20)


async def test_request_and_response_headers(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway([{"name": "headers", "config": {
        "request": {"X-Team": "search", "X-Client-Set": "overridden"},
        "remove_request": ["X-Drop-Me", "User-Agent"],
        "response": {"X-Served-By": "gateway", "Cache-Control": "no-store"},
        "remove_response": ["Cache-Control"],
    }}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models", headers={"X-Drop-Me": "1", "X-Client-Set": "client",
                                                         "X-Keep": "yes", "User-Agent": "ua/1"}) as r:
            assert r.status == 200
            assert r.headers["X-Served-By"] == "gateway"
            assert r.headers["Cache-Control"] == "no-store"
            await r.read()
        # remove_response drops what the upstream sent (the demo streams with Cache-Control: no-cache)
        async with s.post(g.url + "/v1/chat/completions", json={
                "model": "demo-chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.headers.getall("Cache-Control") == ["no-store"]
            await r.read()
        # Gateway errors go through the plugin too (on_response sees every head).
        async with s.get(g.url + "/v1/models", headers={"X-Demo-Status": "503"}) as r:
            assert r.status == 503 and r.headers["X-Served-By"] == "gateway"
    h = upstream.requests[0]["headers"]
    assert h["X-Team"] == "search"
    assert h["X-Client-Set"] == "overridden"
    assert "X-Drop-Me" not in h and "User-Agent" not in h
    assert h["X-Keep"] == "yes"


async def test_headers_on_streams_and_local_errors(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Served-By": "gw"}}}],
                           server={"paths": ["/v1"]})
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json={
                "model": "demo-chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.headers["X-Served-By"] == "gw"
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
        async with s.get(g.url + "/outside") as r:
            assert r.status == 404 and r.headers["X-Served-By"] == "gw"


async def test_remove_request_beats_configured_upstream_headers(make_gateway: Any, upstream: Any) -> None:
    """Plugins' upstream_headers are applied after upstream.headers, so a plugin can drop or replace them."""
    g = await make_gateway([{"name": "headers", "config": {"remove_request": ["X-Static"],
                                                           "request": {"X-Other": "plugin"}}}],
                           upstream={"headers": {"X-Static": "config", "X-Other": "config"}})
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models") as r:
            assert r.status == 200
    h = upstream.requests[0]["headers"]
    assert "X-Static" not in h and h["X-Other"] == "plugin"


def test_headers_config_validation() -> None:
    base = "admin: {enabled: false}\nupstream: {url: http://127.0.0.1:9}\nplugins:\n  - name: headers\n    config:\n"
    with pytest.raises(ConfigError) as ei:
        load_config_text(base + "      remove_response: Server\n", env={})
    assert ei.value.problems[0].startswith("plugins[0].config.remove_response -> line 6: ")
    with pytest.raises(ConfigError) as ei:
        load_config_text(base + "      responses: {}\n", env={})
    assert ei.value.problems == ["plugins[0].config.responses -> line 6: unknown key"]
    cfg = load_config_text(base + "      response: {X-A: '1'}\n", env={})
    assert cfg.plugins[0].validated.response == {"X-A": "1"}
