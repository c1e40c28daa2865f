"""Route and server.paths prefixes: matched on segment boundaries (``/v1`` is not ``/v10``), a path with
an empty segment refused (it would dodge a route's limits and reach a slash-merging upstream as the real
endpoint), prefixes that could never match refused at load, two routes taking the same requests refused,
and HEAD following GET."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.config.loader import ConfigError, load_config_text

from .helpers import base_config, write_config
from .test_cli import gateway
from .test_proxy import assert_error_shape, raw_get, raw_request

T = aiohttp.ClientTimeout(total=20)
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


def tagged(route: str) -> dict[str, Any]:
    """A route override that names the route in an X-Route response header."""
    return {"headers": {"config": {"response": {"X-Route": route}}}}


HEADERS = [{"name": "headers", "config": {"response": {"X-Route": "default"}}}]


async def route_of(s: aiohttp.ClientSession, url: str, method: str = "GET") -> tuple[int, str | None]:
    async with s.request(method, url) as r:
        await r.read()
        return r.status, r.headers.get("X-Route")


# -- 1. server.paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("paths", [["/v1"], ["/v1/"]])
async def test_server_paths_match_whole_segments(make_gateway: Any, upstream: Any, paths: list[str]) -> None:
    g = await make_gateway(server={"paths": paths})
    async with aiohttp.ClientSession(timeout=T) as s:
        for p in ("/v1-internal/admin", "/v10/x", "/v1beta/x", "/v1x"):
            async with s.get(g.url + p) as r:
                assert r.status == 404, p
                assert_error_shape(await r.json(), "not_found")
        assert list(upstream.requests) == []
        for p in ("/v1", "/v1/", "/v1/models", "/v1/files/x"):
            async with s.get(g.url + p) as r:
                assert r.status == 200, p
            assert upstream.requests[-1]["path"] == p


async def test_root_paths_take_everything(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway(server={"paths": ["/"]}, routes=[{"path_prefix": "/", "methods": ["POST"]}])
    async with aiohttp.ClientSession(timeout=T) as s:
        for p in ("/", "/anything", "/v10/x"):
            async with s.get(g.url + p) as r:
                assert r.status == 200, p


# -- 2. empty segments and other spellings ------------------------------------------------------------
async def limited_route(make_gateway: Any, prefix: str) -> Any:
    """A gateway whose only rate limit (1 a minute) is on the POST route ``prefix``."""
    return await make_gateway(
        [{"name": "rate_limit", "enabled": False,
          "config": {"rules": [{"name": "base", "limit": "100/minute", "key_by": ["ip"]}]}}],
        server={"paths": ["/v1"]},
        routes=[{"path_prefix": prefix, "methods": ["POST"], "plugins": {"rate_limit": {
            "enabled": True, "config": {"rules": [{"name": "chat", "limit": "1/minute", "key_by": ["ip"]}]}}}}])


async def raw_post(g: Any, target: str) -> tuple[int, bytes]:
    """POST a chat body to ``target`` exactly as written (no client normalises it)."""
    body = json.dumps(CHAT).encode()
    status, _, raw = await raw_request(
        g.gw.public_port, f"POST {target} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    return status, raw


async def test_empty_segment_cannot_dodge_a_route_limit(make_gateway: Any, upstream: Any) -> None:
    """With a limit only on the /v1/chat route, /v1//chat/completions used to go through unlimited
    (no route matched) and reach the upstream, which (nginx merges slashes) serves /v1/chat/completions."""
    g = await limited_route(make_gateway, "/v1/chat")
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429
    n = len(upstream.requests)
    for target in ("/v1//chat/completions", "/v1/%2Fchat/completions", "//v1/chat/completions",
                   "/v1/chat//completions", "/v1/models//"):
        status, raw = await raw_post(g, target)
        assert status == 400, (target, status, raw)
        err = json.loads(raw)
        assert_error_shape(err, "bad_request")
        assert "'//'" in err["error"]["message"]
    assert len(upstream.requests) == n
    # A trailing "/" alone is no empty segment.
    status, _, _ = await raw_get(g.gw.public_port, "/v1/models/")
    assert status == 200 and upstream.requests[-1]["path"] == "/v1/models/"


async def test_other_spellings_of_a_path_cannot_dodge_a_route_limit(make_gateway: Any, upstream: Any) -> None:
    """A route's rules hold for the path however a backend might read it: another case (Express and
    Fiber route /v1/Chat/completions as /v1/chat/completions) takes the route; ';' (path parameters
    to Spring and Tomcat), '\\' and control characters are refused, and nothing is forwarded."""
    g = await limited_route(make_gateway, "/v1/chat/completions")
    assert (await raw_post(g, "/v1/chat/completions"))[0] == 200
    for target in ("/v1/chat/completions", "/v1/chat/Completions", "/v1/CHAT/completions"):
        status, raw = await raw_post(g, target)
        assert status == 429, (target, raw)  # the route's rule, spent
    n = len(upstream.requests)
    for target in ("/v1/chat/completions;x", "/v1/chat/completions%3Bx", "/v1/chat/completions\\",
                   "/v1/chat/completions%5C", "/v1/chat/completions%00", "/v1/chat/completions%0A"):
        status, raw = await raw_post(g, target)
        assert status == 400, (target, status, raw)
        assert_error_shape(json.loads(raw), "bad_request")
    assert len(upstream.requests) == n


# -- 3. route prefixes -------------------------------------------------------------------------------
async def test_route_prefix_matches_whole_segments(make_gateway: Any) -> None:
    g = await make_gateway(HEADERS, routes=[
        {"path_prefix": "/v1/models", "plugins": tagged("models")},
        {"path_prefix": "/v1/", "methods": ["GET"], "plugins": tagged("v1")},  # a trailing slash: as /v1
        {"path_prefix": "/v1/chat/", "plugins": tagged("chat")},
    ])
    async with aiohttp.ClientSession(timeout=T) as s:
        for path, want in (("/v1/models", "models"), ("/v1/models/", "models"), ("/v1/models/demo-chat", "models"),
                           ("/v1/modelsX", "v1"), ("/v1/models-old/x", "v1"), ("/v1", "v1"), ("/v1/x", "v1"),
                           ("/v10/x", "default"), ("/v1beta", "default"), ("/v1/chat", "chat"),
                           ("/v1/chat/completions", "chat"), ("/v1/chatty", "v1")):
            assert await route_of(s, g.url + path) == (200, want), path


# -- 4. prefixes that could never match ---------------------------------------------------------------
BASE = "upstream: {url: 'http://127.0.0.1:9'}\n"


def problem(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config_text(text, "gateway.yaml", {})
    assert len(ei.value.problems) == 1, ei.value.problems
    return ei.value.problems[0]


@pytest.mark.parametrize("prefix, says", [
    ("/v1/models/*", "'*' is not a wildcard"), ("'/v1 '", "blanks"), ('"/v1\\t"', "blanks"),
    ("/v1?x=1", "query string"), ("/v1#top", "fragment"), ("/v1//chat", "'//'"), ("/v1/../admin", "'..'"),
    ("/v1/./chat", "'.'"), ("/", None), ("v1", "starts with '/'")])
def test_route_prefix_that_never_matches_is_refused(prefix: str, says: str | None) -> None:
    text = BASE + f"routes:\n  - name: first\n    path_prefix: /ok\n  - name: mine\n    path_prefix: {prefix}\n"
    if says is None:
        assert load_config_text(text, "gateway.yaml", {}).routes[1].path_prefix == "/"
        return
    p = problem(text)
    assert p.startswith("routes[1].path_prefix -> line 6: "), p
    assert says in p and "'mine'" in p, p


def test_server_paths_that_never_match_are_refused() -> None:
    p = problem(BASE + "server:\n  paths:\n    - /v1\n    - /v2/*\n")
    assert p.startswith("server.paths -> line 3: ") and "'/v2/*'" in p and "wildcard" in p, p
    p = problem(BASE + "server:\n  paths: ['/v1 ']\n")
    assert "blanks" in p, p
    cfg = load_config_text(BASE + "server:\n  paths: [/v1/, /v2, /]\nroutes:\n  - path_prefix: /v3/\n",
                           "gateway.yaml", {})
    assert cfg.server.paths == ["/v1", "/v2", "/"] and cfg.routes[0].path_prefix == "/v3"


def test_gateway_check_refuses_a_wildcard_prefix(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.yaml", "admin: {enabled: false}\nupstream: {url: http://127.0.0.1:9}\n"
                                              "routes:\n  - path_prefix: /v1/models/*\n")
    r = gateway("check", "-c", str(bad))
    assert r.returncode == 2, r.stdout
    assert r.stderr.strip().startswith(f"{bad}: routes[0].path_prefix -> line 4: ")
    assert "wildcard" in r.stderr and "Traceback" not in r.stderr and r.stdout == ""


# -- 5. two routes taking the same requests ---------------------------------------------------------
@pytest.mark.parametrize("routes, second, says", [
    ("  - path_prefix: /v3\n  - path_prefix: /v3\n", 1, "all methods on /v3"),
    ("  - path_prefix: /v3\n  - path_prefix: /v3/\n", 1, "all methods on /v3"),
    ("  - {name: a, path_prefix: /v3, methods: [get]}\n  - {name: b, path_prefix: /v3/, methods: [GET]}\n", 1,
     "routes[0] ('a') and routes[1] ('b') both take GET on /v3"),
    ("  - path_prefix: /v4\n  - {path_prefix: /v3, methods: [GET, POST]}\n  - {path_prefix: /v3, methods: [POST, PUT]}\n",
     2, "routes[1] and routes[2] both take POST on /v3"),
    ("  - path_prefix: /v1/chat\n  - path_prefix: /v1/Chat\n", 1, "all methods on /v1/Chat"),  # (case: no matter)
])
def test_duplicate_routes_are_refused(routes: str, second: int, says: str) -> None:
    text = BASE + "routes:\n" + routes
    p = problem(text)
    assert p.startswith(f"routes[{second}].path_prefix -> line {3 + second}: "), p  # (one line a route)
    assert says in p, p


def test_routes_that_differ_are_accepted() -> None:
    cfg = load_config_text(BASE + "routes:\n  - path_prefix: /v3\n  - {path_prefix: /v3, methods: [POST]}\n"
                                  "  - {path_prefix: /v3, methods: [GET]}\n  - {path_prefix: /v3, methods: [HEAD]}\n"
                                  "  - path_prefix: /v3/x\n", "gateway.yaml", {})
    assert len(cfg.routes) == 5


async def test_duplicate_route_refused_on_reload(make_gateway: Any, tmp_path: Path) -> None:
    """A reload with two routes taking the same requests is refused; the running config stays."""
    from .helpers import ADMIN_TOKEN

    g = await make_gateway(HEADERS, routes=[{"path_prefix": "/v3", "plugins": tagged("v3")}])
    cfg = base_config("http://127.0.0.1:9", tmp_path, HEADERS,
                      routes=[{"path_prefix": "/v3", "plugins": tagged("a")},
                              {"path_prefix": "/v3/", "plugins": tagged("b")}])
    cfg["upstream"] = yaml.safe_load(Path(g.gw.cfg.path).read_text())["upstream"]
    write_config(Path(g.gw.cfg.path), cfg)
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.admin_url + "/config/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status >= 400
            assert "both take all methods on /v3" in await r.text()
        assert await route_of(s, g.url + "/v3/x") == (200, "v3")


# -- 6. HEAD follows GET ---------------------------------------------------------------------------
async def test_head_follows_get(make_gateway: Any) -> None:
    g = await make_gateway(HEADERS, routes=[
        {"path_prefix": "/v1/models", "methods": ["GET"], "plugins": tagged("models")},
        {"path_prefix": "/v1/files", "methods": ["GET"], "plugins": tagged("files-get")},
        {"path_prefix": "/v1/files", "methods": ["HEAD"], "plugins": tagged("files-head")},
    ])
    async with aiohttp.ClientSession(timeout=T) as s:
        assert await route_of(s, g.url + "/v1/models", "HEAD") == (200, "models")
        assert await route_of(s, g.url + "/v1/models", "GET") == (200, "models")
        assert (await route_of(s, g.url + "/v1/models", "POST"))[1] == "default"
        # A route naming HEAD itself takes it.
        assert await route_of(s, g.url + "/v1/files/x", "HEAD") == (200, "files-head")
        assert await route_of(s, g.url + "/v1/files/x", "GET") == (200, "files-get")


async def test_an_endpoint_in_another_case_is_the_same_endpoint_to_the_plugins(make_gateway: Any) -> None:
    """Behind a backend that routes without regard to case, /v1/Chat/completions is a chat call:
    the conversation is recorded and the gateway asks a stream for its usage, as for the lower
    case path."""
    from aiohttp import web

    from .helpers import serve_handler

    seen: list[Any] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return web.json_response({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "hi"}}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    runner, url = await serve_handler(chat)
    try:
        g = await make_gateway([{"name": "conversations"}], upstream={"url": url})
        async with aiohttp.ClientSession(timeout=T) as s:
            for path in ("/v1/chat/completions", "/v1/Chat/Completions"):
                async with s.post(g.url + path, json={**CHAT, "stream": True}) as r:
                    assert r.status == 200
                    assert r.headers["X-Conversation-ID"].startswith("conv_"), path
        assert [b.get("stream_options") for b in seen] == [{"include_usage": True}] * 2
    finally:
        await runner.cleanup()
