"""Endpoints that are not chat, as vLLM and Ollama serve them: a rerank or a score is estimated on
its query and documents (not admitted on 0), needs no completion tokens, and its usage (a total
alone) reaches every ledger; /tokenize generates nothing; Ollama's create names its source model
in "from", which a key limited to some models must be allowed to use."""
from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from .helpers import ADMIN_TOKEN, recorded_usage_and_audit, serve_handler, until
from .test_key_auth_model_list import admin_post

SEEN: list[tuple[str, Any]] = []


async def backend(request: web.Request) -> web.Response:
    body = await request.json()
    SEEN.append((request.path, body))
    if request.path.endswith("/rerank"):
        docs = body["documents"]
        return web.json_response({"id": "r", "model": body["model"], "usage": {"total_tokens": 500},
                                  "results": [{"index": i, "relevance_score": 0.5} for i in range(len(docs))]})
    if request.path.endswith("/tokenize"):
        return web.json_response({"count": 3, "max_model_len": 8192, "tokens": [1, 2, 3]})
    return web.json_response({"status": "success"})


async def gateway(make_gateway: Any, *plugins: dict[str, Any]) -> Any:
    runner, url = await serve_handler(backend)
    SEEN.clear()
    g = await make_gateway([{"name": "key_auth"}, *plugins, {"name": "audit", "config": {"sinks": ["database"]}}],
                           upstream={"url": url}, server={"paths": ["/v1", "/api", "/tokenize"]})
    g.runner = runner
    return g


async def post(g: Any, key: str, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json()


async def test_a_rerank_is_estimated_on_its_documents_and_its_usage_is_recorded(make_gateway: Any) -> None:
    g = await gateway(make_gateway, {"name": "rate_limit", "config": {"rules": [
        {"name": "tpm", "limit": "2000/minute", "counts": "tokens", "key_by": ["key"]}]}})
    try:
        made = await admin_post(g, "/keys", {"owner": "a"})
        key, kid = made["key"], made["id"]
        # 100 documents of 400 characters, each read with the query: about 11,000 tokens
        status, err = await post(g, key, "/v1/rerank", {"model": "rr", "query": "q" * 40, "documents": ["d" * 400] * 100})
        assert status == 429 and "about 11000 tokens estimated" in err["error"]["message"], err
        assert SEEN == []
        # A small one: admitted without room for a completion it will not make (256 by default)
        status, got = await post(g, key, "/v1/rerank", {"model": "rr", "query": "q", "documents": ["a", "b"]})
        assert status == 200 and len(got["results"]) == 2
        async with aiohttp.ClientSession() as s:
            totals, events = await until(lambda: recorded_usage_and_audit(g, s, kid), what="usage and audit")
        # its usage is a total alone: every ledger has it (as input), as rate_limit charged it
        assert totals["prompt_tokens"] == 500 and totals["total_tokens"] == 500, totals
        assert [e["tokens_in"] for e in events] == [500]
        status, err = await post(g, key, "/v1/rerank", {"model": "rr", "query": "q" * 400, "documents": ["a" * 3000] * 2})
        assert status == 429 and "remaining 1500" in err["error"]["message"], err
    finally:
        await g.runner.cleanup()


async def test_tokenize_and_a_small_rerank_fit_a_nearly_used_quota(make_gateway: Any) -> None:
    g = await gateway(make_gateway, {"name": "rate_limit", "config": {"quotas": {"daily_tokens": 200}}})
    try:
        key = (await admin_post(g, "/keys", {"owner": "a"}))["key"]
        for path, body in (("/v1/rerank", {"model": "rr", "query": "q", "documents": ["a"]}),
                           ("/tokenize", {"model": "rr", "prompt": "hello"})):
            status, got = await post(g, key, path, body)
            assert status == 200, (path, got)
        # /tokenize counted nothing; the rerank its 500: the quota is used up, /tokenize still works
        status, _ = await post(g, key, "/tokenize", {"model": "rr", "prompt": "hello"})
        assert status == 200
        status, err = await post(g, key, "/v1/rerank", {"model": "rr", "query": "q", "documents": ["a"]})
        assert status == 429 and err["error"]["code"] == "insufficient_quota"
    finally:
        await g.runner.cleanup()


async def test_ollama_create_from_another_model_is_refused_to_a_scoped_key(make_gateway: Any) -> None:
    g = await gateway(make_gateway)
    try:
        key = (await admin_post(g, "/keys", {"owner": "a", "scopes": {"models": ["m-embed*"]}}))["key"]
        for body in ({"model": "m-embed-copy", "from": "m-secret"}, {"model": "m-embed-copy", "modelfile": "FROM m-secret"},
                     {"source": "m-secret", "destination": "m-embed-2", "model": "m-embed-2"}):
            status, err = await post(g, key, "/api/create", body)
            assert status == 403 and err["error"]["code"] == "key_scope_denied", (body, err)
        assert SEEN == []
        status, _ = await post(g, key, "/api/create", {"model": "m-embed-copy", "from": "m-embed-base"})
        assert status == 200 and SEEN[-1][1]["from"] == "m-embed-base"
        async with aiohttp.ClientSession() as s:
            async with s.get(g.admin_url + "/audit?type=request", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                assert r.status == 200
    finally:
        await g.runner.cleanup()
