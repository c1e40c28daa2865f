"""Answers too large to parse, and answers that are not text: the tokens the upstream reports are
still counted (the usage comes last, after the data), and binary downloads are not copied into the
gateway's memory to be read for usage they do not have."""
from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
from aiohttp import web

from gateway.observe import MAX_EVENT, MAX_JSON_BODY, ResponseObserver, tail_usage

from .helpers import ADMIN_TOKEN
from .test_observe import backend

EMB_USAGE = {"prompt_tokens": 10240, "total_tokens": 10240}
IMG_USAGE = {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210,
             "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}
BLOB = bytes(range(256)) * (3 * 4096)  # 3 MiB of every byte value


def big_embeddings() -> bytes:
    """An embeddings list over MAX_JSON_BODY, its usage at the end (as the API sends it), with a
    decoy: a text that quotes a usage object inside the data."""
    vec = base64.b64encode(b"\x01" * 6144).decode()
    items = [{"object": "embedding", "index": i, "embedding": vec} for i in range(2200)]
    items[-1]["note"] = 'say "usage": {"prompt_tokens": 7}'
    body = json.dumps({"object": "list", "data": items, "model": "emb-1", "usage": EMB_USAGE}).encode()
    assert len(body) > MAX_JSON_BODY
    return body


def image_stream() -> bytes:
    img = base64.b64encode(b"\x02" * (MAX_EVENT * 2)).decode()
    partial = {"type": "image_generation.partial_image", "b64_json": img[:1000], "partial_image_index": 0}
    done = {"type": "image_generation.completed", "b64_json": img, "usage": IMG_USAGE}
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n"
                    for e in (partial, done))


def test_usage_is_read_from_the_end_of_an_answer_too_large_to_parse() -> None:
    raw = big_embeddings()
    obs = ResponseObserver(False, False)
    assert b"".join(obs.feed(raw[i:i + 65536]) for i in range(0, len(raw), 65536)) == raw
    obs.finish()
    assert obs.c.usage == EMB_USAGE and obs.c.prompt_tokens == 10240
    raw = image_stream()
    obs = ResponseObserver(True, True)
    out = b"".join(obs.feed(raw[i:i + 65536]) for i in range(0, len(raw), 65536)) + obs.finish()
    assert out == raw and obs.c.usage == IMG_USAGE and obs.c.unread == 1
    # A quoted usage inside a string is never taken for the answer's own, nor an object without counts.
    assert tail_usage(b'{"t": "\\"usage\\": {\\"total_tokens\\": 5}", "usage": {"x": 1}}') is None
    assert tail_usage(b'd": 1}], "usage": {"total_tokens": 5}}') == {"total_tokens": 5}


def test_a_binary_answer_is_relayed_without_being_held() -> None:
    obs = ResponseObserver(False, False, readable=False)
    for i in range(0, len(BLOB), 65536):
        assert obs.feed(BLOB[i:i + 65536]) == BLOB[i:i + 65536]
        assert len(obs._buf) == 0 and len(obs._tail) == 0
    obs.finish()
    assert obs.c.usage is None


async def test_large_answers_are_counted_and_binary_ones_relayed_whole(make_gateway: Any, tmp_path: Any) -> None:
    seen: list[dict[str, str]] = []

    async def embeddings(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return web.Response(body=big_embeddings(), content_type="application/json")

    async def images(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        raw = image_stream()
        for i in range(0, len(raw), 300_000):
            await resp.write(raw[i:i + 300_000])
        return resp

    async def content(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return web.Response(body=BLOB, content_type="application/octet-stream")

    jl = tmp_path / "audit.jsonl"
    async with backend(embeddings, "/v1/embeddings") as url:
        g = await make_gateway([
            {"name": "key_auth"},
            {"name": "conversations"},
            {"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}},
            {"name": "metrics"}], upstream={"url": url})
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=admin) as r:
                rec = await r.json()
            auth = {"Authorization": f"Bearer {rec['key']}"}
            async with s.post(g.url + "/v1/embeddings", headers=auth, json={"model": "emb-1", "input": ["a"]}) as r:
                assert r.status == 200 and await r.read() == big_embeddings()
            await g.plugin("key_auth").flush_usage()
            async with s.get(g.admin_url + f"/keys/{rec['id']}/usage", headers=admin) as r:
                totals = (await r.json())["totals"]
            assert totals["prompt_tokens"] == 10240
            async with s.get(g.admin_url + "/metrics", headers=admin) as r:
                metrics = await r.text()
            assert 'gateway_tokens_total{direction="input",model="emb-1"} 10240.0' in metrics, metrics
        await g.stop()
        events = [json.loads(x) for x in jl.read_text().splitlines()]
        ok = [e for e in events if e.get("path") == "/v1/embeddings"]
        assert [(e["status"], e["tokens_in"]) for e in ok] == [(200, 10240)]

    async with backend(images, "/v1/images/generations") as url:
        g = await make_gateway([{"name": "key_auth"}, {"name": "conversations"}], upstream={"url": url},
                               name="g2.yaml")
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=admin) as r:
                rec = await r.json()
            auth = {"Authorization": f"Bearer {rec['key']}", "X-Conversation-ID": "conv_x",
                    "X-Conversation-Memory": "sometimes"}
            async with s.post(g.url + "/v1/images/generations", headers=auth,
                              json={"model": "img-1", "prompt": "a cat", "stream": True, "partial_images": 1}) as r:
                assert r.status == 200 and await r.read() == image_stream()
            await g.plugin("key_auth").flush_usage()
            async with s.get(g.admin_url + f"/keys/{rec['id']}/usage", headers=admin) as r:
                totals = (await r.json())["totals"]
            assert (totals["prompt_tokens"], totals["completion_tokens"]) == (50, 4160)
        # the conversations plugin's own headers never reach the upstream, on any path
        assert not {"x-conversation-id", "x-conversation-memory"} & {k.lower() for k in seen[-1]}

    async with backend(content, "/v1/files/f1/content") as url:
        g = await make_gateway([{"name": "key_auth"}, {"name": "conversations"}, {"name": "metrics"}],
                               upstream={"url": url}, name="g3.yaml")
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=admin) as r:
                rec = await r.json()
            auth = {"Authorization": f"Bearer {rec['key']}"}
            async with s.post(g.url + "/v1/files/f1/content", headers=auth) as r:
                assert r.status == 200 and await r.read() == BLOB


def test_only_the_answers_own_usage_is_taken_from_the_end() -> None:
    """A usage inside an item of the data (a list of stored answers, a JSON-lines file) is not the
    answer's: nothing is taken."""
    item = {"id": "x", "usage": {"prompt_tokens": 123456, "total_tokens": 123456}}
    listed = json.dumps({"object": "list", "data": [item] * 3}).encode()
    assert tail_usage(listed) is None
    assert tail_usage(json.dumps({"data": [1], "usage": {"total_tokens": 9}, "size": "1x1", "n": 1,
                                  "extra": {"vendor": [1, {"x": 2}]}}).encode()) == {"total_tokens": 9}
    # a Responses API final event: the usage of its `response`, members of any kind after it
    final = {"type": "response.completed", "response": {"output": [{"x": "y" * 100}], "usage": IMG_USAGE,
                                                         "user": None, "metadata": {"k": "v"}}, "sequence_number": 7}
    assert tail_usage(b"data: " + json.dumps(final).encode() + b"\n\n") == IMG_USAGE
    # nested deeper than the parser goes, after the usage or in it: not understood, no error
    deep = b'x", "usage": {"total_tokens": 7}, "meta": {"k": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    assert tail_usage(deep) is None
    assert tail_usage(b'x", "usage": {"a": ' + b"[" * 5000) is None


async def test_a_large_read_of_stored_answers_charges_nothing(make_gateway: Any, tmp_path: Any) -> None:
    item = {"id": "chatcmpl-1", "object": "chat.completion", "usage": {"prompt_tokens": 777, "total_tokens": 777},
            "pad": "p" * 4000}
    listed = json.dumps({"object": "list", "data": [item] * 4500}).encode()
    lines = b"\n".join(json.dumps(item).encode() for _ in range(4500)) + b"\n"
    assert len(listed) > MAX_JSON_BODY and len(lines) > MAX_JSON_BODY

    async def stored(request: web.Request) -> web.StreamResponse:
        return web.Response(body=listed, content_type="application/json")

    async def batch_output(request: web.Request) -> web.StreamResponse:
        return web.Response(body=lines, content_type="application/jsonl")

    app = web.Application()
    app.router.add_get("/v1/chat/completions", stored)
    app.router.add_post("/v1/files/out/content", batch_output)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        g = await make_gateway([{"name": "key_auth"}, {"name": "metrics"}], upstream={"url": f"http://127.0.0.1:{port}"})
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=admin) as r:
                rec = await r.json()
            auth = {"Authorization": f"Bearer {rec['key']}"}
            async with s.get(g.url + "/v1/chat/completions", headers=auth) as r:
                assert r.status == 200 and await r.read() == listed
            async with s.post(g.url + "/v1/files/out/content", headers=auth) as r:
                assert r.status == 200 and await r.read() == lines
            await g.plugin("key_auth").flush_usage()
            async with s.get(g.admin_url + f"/keys/{rec['id']}/usage", headers=admin) as r:
                totals = (await r.json())["totals"]
            assert (totals["prompt_tokens"] or 0) == 0, totals
    finally:
        await runner.cleanup()
