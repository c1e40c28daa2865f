"""The cors plugin as a browser meets it: preflights answered before the key check and never
forwarded, the headers a page needs on answers and on the gateway's own refusals, origins and
methods not allowed, subdomain patterns, the upstream's own CORS headers replaced, bad configs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from .helpers import base_config, write_config
from .test_cli_admin_edges import gw
from .test_usage_scope import served

PAGE = "https://chat.example.com"
SEEN: list[str] = []


async def upstream_with_cors(request: web.Request) -> web.StreamResponse:
    """An OpenAI-style answer from a backend that sets CORS headers of its own (as `*`)."""
    SEEN.append(request.method)
    await request.read()
    return web.json_response({"id": "c1", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
        headers=CIMultiDict([("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Credentials", "true"),
                             ("Vary", "Accept-Encoding"), ("Vary", "X-Origin-Country")]))


def chain(**cors: Any) -> list[dict[str, Any]]:
    return [{"name": "cors", "config": {"allow_origins": [PAGE, "https://*.example.org"], **cors}},
            {"name": "key_auth"}, {"name": "rate_limit", "config": {"rules": [
                {"name": "per-key", "limit": "2/minute", "key_by": ["key"]}]}}]


async def preflight(s: aiohttp.ClientSession, g: Any, origin: str, method: str = "POST",
                    headers: str = "authorization, content-type") -> tuple[int, Any, bytes]:
    async with s.options(g.url + "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers}) as r:
        return r.status, r.headers, await r.read()


async def test_a_browser_page_calls_the_gateway(make_gateway: Any) -> None:
    SEEN.clear()
    async with served(make_gateway, chain(), upstream_with_cors) as (g, s, key, _):
        st, h, body = await preflight(s, g, PAGE)
        assert st == 204 and body == b"", body  # answered before key_auth: a preflight carries no key
        assert h["Access-Control-Allow-Origin"] == PAGE and h["Access-Control-Allow-Methods"] == "GET, POST, DELETE"
        assert h["Access-Control-Allow-Headers"] == "authorization, content-type"
        assert h["Access-Control-Max-Age"] == "600" and "Origin" in h["Vary"]
        assert SEEN == []  # never forwarded
        chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
        for _ in range(2):
            async with s.post(g.url + "/v1/chat/completions", json=chat,
                              headers={"Origin": PAGE, "Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == "hi"
                assert r.headers["Access-Control-Allow-Origin"] == PAGE  # the upstream's "*" replaced
                assert "Access-Control-Allow-Credentials" not in r.headers
                exposed = r.headers["Access-Control-Expose-Headers"]
                assert "x-ratelimit-remaining-requests" in exposed and "X-Conversation-ID" in exposed
                assert r.headers.getall("Vary") == ["Accept-Encoding", "X-Origin-Country", "Origin"]
        async with s.post(g.url + "/v1/chat/completions", json=chat,
                          headers={"Origin": PAGE, "Authorization": f"Bearer {key}"}) as r:
            assert r.status == 429  # the gateway's own refusal: readable by the page too
            assert r.headers["Access-Control-Allow-Origin"] == PAGE and "Retry-After" in r.headers
            exposed = r.headers["Access-Control-Expose-Headers"]
            assert "Retry-After" in exposed and "retry-after-ms" in exposed and "x-should-retry" in exposed
            assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
        async with s.post(g.url + "/v1/chat/completions", json=chat, headers={"Origin": PAGE}) as r:
            assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == PAGE
        async with s.post(g.url + "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"}) as r:
            # without Origin: no CORS headers, but a cache must still keep it from pages (Vary)
            assert "Access-Control-Allow-Origin" not in r.headers and "Origin" in r.headers.getall("Vary")
        assert SEEN == ["POST", "POST"]


async def test_origins_and_methods_not_allowed(make_gateway: Any) -> None:
    SEEN.clear()
    async with served(make_gateway, chain(), upstream_with_cors) as (g, s, key, _):
        for origin in ("https://evil.example.net", "http://chat.example.com", "https://example.org",
                       "https://chat.example.com.evil.net", "null"):
            st, h, body = await preflight(s, g, origin)
            assert st == 403 and json.loads(body)["error"]["code"] == "cors_origin_not_allowed", origin
            assert "Access-Control-Allow-Origin" not in h
        for origin in ("https://a.example.org", "https://b.a.example.org", "HTTPS://A.EXAMPLE.ORG"):
            st, h, _ = await preflight(s, g, origin)
            assert st == 204 and h["Access-Control-Allow-Origin"] == origin, origin
        st, h, body = await preflight(s, g, PAGE, method="PUT")
        assert st == 403 and json.loads(body)["error"]["code"] == "cors_method_not_allowed"
        # a page of another origin is still served (CORS is for browsers; keys are the access
        # control), without what a browser needs to hand it the answer; the upstream's "*" is gone
        async with s.post(g.url + "/v1/chat/completions", json={"model": "m", "messages": []},
                          headers={"Origin": "https://evil.example.net", "Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200 and not [k for k in r.headers if k.lower().startswith("access-control-")]
        async with s.options(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200 and SEEN == ["POST", "OPTIONS"]  # a plain OPTIONS is forwarded as before


async def test_any_origin_without_credentials(make_gateway: Any) -> None:
    async with served(make_gateway, chain(allow_origins=["*"], allow_headers=["Authorization", "Content-Type"],
                                          max_age=60), upstream_with_cors) as (g, s, key, _):
        st, h, _ = await preflight(s, g, "https://anything.example", headers="authorization, x-custom")
        assert st == 204 and h["Access-Control-Allow-Origin"] == "*" and h["Access-Control-Max-Age"] == "60"
        assert h["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
        async with s.get(g.url + "/v1/models", headers={"Origin": "https://x.example",
                                                          "Authorization": f"Bearer {key}"}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"


async def test_credentials_echo_the_origin(make_gateway: Any) -> None:
    async with served(make_gateway, chain(allow_credentials=True), upstream_with_cors) as (g, s, key, _):
        st, h, _ = await preflight(s, g, PAGE)
        assert h["Access-Control-Allow-Origin"] == PAGE and h["Access-Control-Allow-Credentials"] == "true"


async def test_a_preflight_takes_the_route_of_the_request_it_asks_about(make_gateway: Any) -> None:
    """A route limited to POST with origins of its own: the preflight for its POSTs (an OPTIONS) is
    answered with the route's settings, not the default chain's; cors \"*\" methods and a default
    port in the config (browsers leave it out of Origin)."""
    legacy = "https://legacy.example.net"
    routes = [{"path_prefix": "/v1/completions", "methods": ["POST"], "plugins": {"cors": {"config": {
        "allow_origins": [legacy + ":443"], "allow_methods": ["*"]}}}}]
    async with served(make_gateway, chain(), upstream_with_cors, routes=routes) as (g, s, key, _):
        async def ask(path: str, origin: str) -> tuple[int, Any]:
            async with s.options(g.url + path, headers={"Origin": origin, "Access-Control-Request-Method": "POST"}) as r:
                return r.status, r.headers
        st, h = await ask("/v1/completions", legacy)
        assert st == 204 and h["Access-Control-Allow-Origin"] == legacy and h["Access-Control-Allow-Methods"] == "POST"
        assert (await ask("/v1/completions", PAGE))[0] == 403
        assert (await ask("/v1/chat/completions", legacy))[0] == 403


async def test_without_cors_a_preflight_takes_the_options_route_as_before(make_gateway: Any) -> None:
    """No cors plugin, the upstream answering CORS itself behind a route that lets OPTIONS through
    without a key: browsers' preflights still reach it (they are not routed as the POST they ask
    about, whose chain asks for a key)."""
    SEEN.clear()
    routes = [{"path_prefix": "/v1", "methods": ["OPTIONS"], "plugins": {"key_auth": {"enabled": False}}}]
    async with served(make_gateway, [{"name": "key_auth"}], upstream_with_cors, routes=routes) as (g, s, key, _):
        st, h, _ = await preflight(s, g, PAGE)
        assert st == 200 and h["Access-Control-Allow-Origin"] == "*" and SEEN == ["OPTIONS"]


@pytest.mark.parametrize("cors, message", [
    ({"allow_origins": ["https://chat.example.com/app"]}, "is not an origin"),
    ({"allow_origins": ["null"], "allow_credentials": True}, "list the origins"),
    ({"allow_origins": ["https://*.com"]}, "name the domain"),
    ({"allow_origins": ["https://chat.example.com:99999"]}, "a port is 1..65535"),
    ({"allow_origins": [PAGE], "allow_methods": []}, "allow_methods"),
    ({"allow_origins": [PAGE], "allow_credentials": True, "expose_headers": ["*"]}, "list the headers"),
    ({"allow_origins": []}, "allow_origins"),
    ({"allow_origins": ["*"], "allow_credentials": True}, "list the origins"),
    ({"allow_origins": [PAGE], "allow_methods": ["PO ST"]}, "not a header or method name"),
    ({"allow_origins": [PAGE], "max_age": -1}, "max_age"),
])
def test_bad_configs_are_refused_by_check(tmp_path: Path, cors: dict[str, Any], message: str) -> None:
    cfg = write_config(tmp_path / "g.yaml", base_config("http://127.0.0.1:9", tmp_path,
                                                        [{"name": "cors", "config": cors}]))
    r = gw("check", "-c", str(cfg))
    assert r.returncode == 2 and message in r.stderr + r.stdout and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("plugins, routes, warned", [
    ([{"name": "key_auth"}, {"name": "cors", "config": {"allow_origins": [PAGE]}}], [], True),
    # turned on for one route only: the order is the list's
    ([{"name": "key_auth"}, {"name": "cors", "enabled": False, "config": {"allow_origins": [PAGE]}}],
     [{"path_prefix": "/v1/chat", "plugins": {"cors": {"enabled": True}}}], True),
    # plugins that never refuse (headers, metrics, audit, tracing) may come first
    ([{"name": "headers"}, {"name": "metrics"}, {"name": "audit"}, {"name": "cors", "config": {"allow_origins": [PAGE]}},
      {"name": "key_auth"}], [], False),
])
def test_check_warns_when_cors_is_not_first(tmp_path: Path, plugins: list[Any], routes: list[Any],
                                            warned: bool) -> None:
    cfg = write_config(tmp_path / "g.yaml", base_config("http://127.0.0.1:9", tmp_path, plugins, routes=routes))
    r = gw("check", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert ("cors comes after" in r.stdout + r.stderr) is warned, r.stdout + r.stderr
