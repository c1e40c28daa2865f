"""A key limited to some models sees only those: the model list (OpenAI's ``/v1/models``,
Ollama's ``/api/tags``) is filtered, a model outside the scope cannot be read or deleted by its
path, and an answer the gateway cannot filter is never relayed as it came (a 502 instead). The
real gateway on a socket, an upstream that answers as the backends do, the OpenAI SDK."""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict

from .helpers import ADMIN_TOKEN, base_config, serve_handler, start_gateway, write_config

T = aiohttp.ClientTimeout(total=20)
MODELS = ["demo-chat", "demo-chat-large", "secret-model", "org/demo-chat-ft", "org/other"]
#: what the upstream answers /v1/models with: "plain", "gzip", "br" (not decodable), "html", "sse", "huge"
MODE = {"list": "plain"}
SEEN: list[tuple[str, str]] = []


async def backend(request: web.Request) -> web.StreamResponse:
    SEEN.append((request.method, request.path))
    path = request.path
    if path in ("/v1/models", "/v1/models/"):
        body = json.dumps({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "x"} for m in MODELS]
                          + [{"object": "model"}, "not-an-object"]}).encode()
        mode = MODE["list"]
        if mode == "gzip":
            c = zlib.compressobj(6, zlib.DEFLATED, 31)
            return web.Response(body=c.compress(body) + c.flush(),
                                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        if mode == "br":
            return web.Response(body=b"\x0b\x02\x80" + body, headers={"Content-Type": "application/json",
                                                                   "Content-Encoding": "br"})
        if mode == "sse":
            return web.Response(body=b"data: " + body + b"\n\n", content_type="text/event-stream")
        if mode == "html":
            return web.Response(text="<html>" + " ".join(MODELS) + "</html>", content_type="text/html")
        if mode == "huge":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(body[:-2] + b', "pad": "')
            for _ in range(9):
                await resp.write(b"x" * 2**20)
            await resp.write(b'"}')
            return resp
        return web.Response(body=body, content_type="application/json", headers={"ETag": '"all-models"'})
    if path == "/api/tags":  # (Ollama lists a model pulled without a tag as name:latest)
        return web.json_response({"models": [{"name": m + ":latest", "model": m + ":latest", "size": 1}
                                             for m in MODELS]})
    if path == "/api/chat":
        return web.json_response({"model": (await request.json())["model"], "message": {"role": "assistant",
                                                                                         "content": "hi"}})
    if path.startswith("/v1/models/"):
        mid = path[len("/v1/models/"):]
        if request.method == "DELETE":
            return web.json_response({"id": mid, "object": "model", "deleted": True})
        return web.json_response({"id": mid, "object": "model", "owned_by": "x"})
    return web.json_response({"error": {"message": "no such path"}}, status=404)


async def admin_post(g: Any, path: str, body: Any) -> Any:
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.admin_url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 201, await r.text()
            return await r.json()


async def get(g: Any, key: str, path: str, method: str = "GET") -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession(timeout=T, auto_decompress=False) as s:
        async with s.request(method, g.url + path, headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, CIMultiDict(r.headers), await r.read()


@pytest.fixture
async def gw(tmp_path: Path) -> Any:
    runner, url = await serve_handler(backend)
    MODE["list"] = "plain"
    SEEN.clear()
    g = await start_gateway(write_config(tmp_path / "gateway.yaml", base_config(
        url, tmp_path, [{"name": "key_auth"}, {"name": "audit", "config": {"sinks": ["database"]}}])))
    yield g
    await g.stop()
    await runner.cleanup()


async def test_model_list_shows_only_the_models_a_key_may_use(gw: Any) -> None:
    g = gw
    scoped = (await admin_post(g, "/keys", {"owner": "a", "scopes": {"models": ["demo-chat*", "org/demo-*"]}}))["key"]
    free = (await admin_post(g, "/keys", {"owner": "b"}))["key"]
    async with openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=scoped, max_retries=0) as c:
        assert [m.id async for m in c.models.list()] == ["demo-chat", "demo-chat-large", "org/demo-chat-ft"]
        assert (await c.models.retrieve("org/demo-chat-ft")).id == "org/demo-chat-ft"
        for hidden in ("secret-model", "org/other"):
            with pytest.raises(openai.PermissionDeniedError) as ei:
                await c.models.retrieve(hidden)
            assert ei.value.body["code"] == "key_scope_denied" and hidden in ei.value.body["message"]
            with pytest.raises(openai.PermissionDeniedError):
                await c.models.delete(hidden)
    # the upstream never got the refused ones
    assert ("GET", "/v1/models/secret-model") not in SEEN and ("DELETE", "/v1/models/org/other") not in SEEN
    # A key without a model scope gets the list as the upstream sent it, byte for byte.
    st, h, body = await get(g, free, "/v1/models")
    assert st == 200 and len(json.loads(body)["data"]) == len(MODELS) + 2
    # The length is that of the filtered body, and the upstream's ETag (which names the whole list)
    # is not kept; Ollama's list is filtered too, name:latest taken as name.
    assert h["ETag"] == '"all-models"'
    st, h, body = await get(g, scoped, "/v1/models/")
    assert st == 200 and int(h["Content-Length"]) == len(body) and "ETag" not in h
    assert [m["id"] for m in json.loads(body)["data"]] == ["demo-chat", "demo-chat-large", "org/demo-chat-ft"]
    st, h, body = await get(g, scoped, "/api/tags")
    assert st == 200 and [m["name"] for m in json.loads(body)["models"]] == \
        ["demo-chat:latest", "demo-chat-large:latest", "org/demo-chat-ft:latest"]
    async with aiohttp.ClientSession(timeout=T) as s:  # and a name the list shows may be used
        for model, status in (("demo-chat:latest", 200), ("demo-chat", 200), ("secret-model:latest", 403),
                              ("secret-model", 403)):
            async with s.post(g.url + "/api/chat", json={"model": model, "messages": []},
                              headers={"Authorization": f"Bearer {scoped}"}) as r:
                assert r.status == status, (model, r.status)


async def test_a_list_that_cannot_be_filtered_is_not_relayed(gw: Any) -> None:
    g = gw
    scoped = (await admin_post(g, "/keys", {"owner": "a", "scopes": {"models": ["demo-*"]}}))["key"]
    # An upstream that compresses though asked not to: decoded, filtered, sent uncompressed.
    MODE["list"] = "gzip"
    st, h, body = await get(g, scoped, "/v1/models")
    assert st == 200 and "Content-Encoding" not in h, h
    assert [m["id"] for m in json.loads(body)["data"]] == ["demo-chat", "demo-chat-large"]
    # What cannot be read (a coding the gateway does not decode, not JSON, too large) is a 502:
    # the client never gets the whole list.
    for mode in ("br", "html", "sse", "huge"):
        MODE["list"] = mode
        st, h, body = await get(g, scoped, "/v1/models")
        err = json.loads(body)["error"]
        assert st == 502 and err["code"] == "upstream_unreadable", (mode, st, body[:200])
        assert b"secret" not in body
