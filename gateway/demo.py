"""A built-in OpenAI-compatible demo backend, for ``gateway demo`` and for tests and benchmarks.

It answers ``/v1/chat/completions`` (plain and streamed, with ``usage``, tool calls when ``tools`` are
given), ``/v1/completions``, ``/v1/embeddings`` and ``/v1/models``. Token counts are whitespace words:
the prompt's words, and one token per streamed chunk.

Failure knobs (request headers), to see how the gateway behaves when a backend misbehaves:
``X-Demo-Delay: 0.05`` seconds between streamed chunks; ``X-Demo-Status: 500`` answer with that status;
``X-Demo-Die-After: 3`` drop the connection after 3 chunks; ``X-Demo-Head-Delay: 2`` wait before the
response head; ``X-Demo-Words: 50`` length of the answer.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import time
import uuid
from typing import Any

from aiohttp import web

MODELS = ["demo-chat", "demo-embed"]
REQUESTS = web.AppKey("requests", collections.deque)
# Never echoed back: the gateway adds the upstream's credentials, and a caller must not read them.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"})


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _words(s: str) -> int:
    return len(s.split())


def _prompt_tokens(messages: list[Any]) -> int:
    return sum(_words(_text_of(m.get("content"))) + 1 for m in messages if isinstance(m, dict))


def _answer(messages: list[Any], words: int | None) -> list[str]:
    last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") in ("user", "tool")), None)
    said = _text_of(last.get("content")) if last else ""
    if last is not None and last.get("role") == "tool":
        text = f"The tool returned: {said}"
    else:
        text = f"Hello from the demo backend. You said: {said}" if said else "Hello from the demo backend."
    toks = text.split()
    if words is not None:
        base = toks or ["word"]
        toks = [base[i % len(base)] for i in range(words)]
    return [t if i == 0 else " " + t for i, t in enumerate(toks)]


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": None,
                                        "param": None}}, status=status)


async def _knobs(request: web.Request) -> web.Response | None:
    h = request.headers
    if "X-Demo-Head-Delay" in h:
        await asyncio.sleep(float(h["X-Demo-Head-Delay"]))
    if "X-Demo-Status" in h:
        st = int(h["X-Demo-Status"])
        return _err(st, f"demo backend answered {st} as asked")
    return None


def _record(request: web.Request, body: Any) -> None:
    request.app[REQUESTS].append({"method": request.method, "path": request.path_qs,
                                  "headers": dict(request.headers), "body": body})


async def chat(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return _err(400, "body is not JSON")
    if not isinstance(body, dict):
        return _err(400, "body must be a JSON object")
    _record(request, body)
    knob = await _knobs(request)
    if knob is not None:
        return knob
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _err(400, "messages is required")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list)
                              or not all(isinstance(t, dict) and isinstance(t.get("function", {}), dict)
                                         for t in tools)):
        return _err(400, "tools must be a list of objects, each with a 'function' object")
    model = body.get("model") or "demo-chat"
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    words_hdr = request.headers.get("X-Demo-Words")
    words = int(words_hdr) if words_hdr else None
    pieces = _answer(messages, words)
    if isinstance(max_tokens, int) and max_tokens > 0:
        pieces = pieces[:max_tokens]
    finish = "length" if isinstance(max_tokens, int) and words is None and len(_answer(messages, None)) > len(pieces) else "stop"
    tool_call = None
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    if body.get("tools") and body.get("tool_choice") != "none" and last.get("role") == "user":
        fn = body["tools"][0].get("function", {}).get("name", "tool")
        tool_call = {"id": "call_" + uuid.uuid4().hex[:12], "type": "function",
                     "function": {"name": fn, "arguments": json.dumps({"query": _text_of(last.get("content"))})}}
        finish = "tool_calls"
    prompt = _prompt_tokens(messages)
    cid = "chatcmpl-" + uuid.uuid4().hex[:16]
    created = int(time.time())
    if not body.get("stream"):
        if tool_call:
            msg = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
            comp = len(tool_call["function"]["arguments"].split())
        else:
            msg = {"role": "assistant", "content": "".join(pieces)}
            comp = len(pieces)
        return web.json_response({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp}})
    delay = float(request.headers.get("X-Demo-Delay", "0") or 0)
    die_after = int(request.headers.get("X-Demo-Die-After", "-1"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    def frame(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return b"data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                       "model": model, "choices": [{"index": 0, "delta": delta,
                                                                    "finish_reason": finish_reason}]}).encode() + b"\n\n"

    await resp.write(frame({"role": "assistant", "content": ""}))
    sent = 0
    if tool_call:
        args = tool_call["function"]["arguments"]
        parts = [args[i:i + 8] for i in range(0, len(args), 8)]
        await resp.write(frame({"tool_calls": [{"index": 0, "id": tool_call["id"], "type": "function",
                                                "function": {"name": tool_call["function"]["name"], "arguments": ""}}]}))
        sent = 1
        for p in parts:
            if delay:
                await asyncio.sleep(delay)
            await resp.write(frame({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}))
            sent += 1
    else:
        for p in pieces:
            if sent == die_after:
                assert request.transport is not None
                request.transport.close()
                return resp
            if delay:
                await asyncio.sleep(delay)
            await resp.write(frame({"content": p}))
            sent += 1
    await resp.write(frame({}, finish))
    opts = body.get("stream_options") or {}
    if opts.get("include_usage"):
        await resp.write(b"data: " + json.dumps({
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": sent, "total_tokens": prompt + sent}}).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return _err(400, "body is not JSON")
    if not isinstance(body, dict):
        return _err(400, "body must be a JSON object")
    _record(request, body)
    knob = await _knobs(request)
    if knob is not None:
        return knob
    prompt = body.get("prompt") or ""
    prompt = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    pieces = _answer([{"role": "user", "content": prompt}], None)
    mt = body.get("max_tokens")
    if isinstance(mt, int) and mt > 0:
        pieces = pieces[:mt]
    p_tok = _words(prompt)
    usage = {"prompt_tokens": p_tok, "completion_tokens": len(pieces), "total_tokens": p_tok + len(pieces)}
    cid = "cmpl-" + uuid.uuid4().hex[:16]
    model = body.get("model") or "demo-chat"
    if not body.get("stream"):
        return web.json_response({"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
                                  "choices": [{"index": 0, "text": "".join(pieces), "finish_reason": "stop"}],
                                  "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i, p in enumerate(pieces):
        await resp.write(b"data: " + json.dumps({"id": cid, "object": "text_completion", "model": model, "choices": [
            {"index": 0, "text": p, "finish_reason": "stop" if i == len(pieces) - 1 else None}]}).encode() + b"\n\n")
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(b"data: " + json.dumps({"id": cid, "object": "text_completion", "model": model,
                                                 "choices": [], "usage": usage}).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def embeddings(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return _err(400, "body is not JSON")
    if not isinstance(body, dict):
        return _err(400, "body must be a JSON object")
    _record(request, body)
    knob = await _knobs(request)
    if knob is not None:
        return knob
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else (inputs or [])
    data = []
    for i, text in enumerate(inputs):
        h = hashlib.sha256(str(text).encode()).digest()
        data.append({"object": "embedding", "index": i, "embedding": [b / 255 for b in h[:8]]})
    tok = sum(_words(str(t)) for t in inputs)
    return web.json_response({"object": "list", "data": data, "model": body.get("model") or "demo-embed",
                              "usage": {"prompt_tokens": tok, "total_tokens": tok}})


async def models(request: web.Request) -> web.Response:
    _record(request, None)
    knob = await _knobs(request)
    if knob is not None:
        return knob
    return web.json_response({"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": "demo"} for m in MODELS]})


async def model(request: web.Request) -> web.Response:
    """One model (``client.models.retrieve``), or the API's 404 for a model it does not serve."""
    _record(request, None)
    knob = await _knobs(request)
    if knob is not None:
        return knob
    mid = request.match_info["model"]
    if mid not in MODELS:
        return web.json_response({"error": {"message": f"The model '{mid}' does not exist", "type":
                                            "invalid_request_error", "code": "model_not_found", "param": None}},
                                 status=404)
    return web.json_response({"id": mid, "object": "model", "created": 0, "owned_by": "demo"})


async def echo(request: web.Request) -> web.Response:
    """Any other path: echo what arrived (used to check what the gateway forwards)."""
    body = await request.read()
    _record(request, body.decode("utf-8", "replace"))
    knob = await _knobs(request)
    if knob is not None:
        return knob
    headers = {k: ("<redacted>" if k.lower() in _SECRET_HEADERS else v) for k, v in request.headers.items()}
    return web.json_response({"method": request.method, "path": request.path_qs, "headers": headers,
                              "body": body.decode("utf-8", "replace")})


@web.middleware
async def _client_gone(request: web.Request, handler: Any) -> web.StreamResponse:
    """A client that leaves mid-stream (the gateway passing on its client's cancel) is normal: the
    stream just ends, without an error in the log."""
    try:
        return await handler(request)
    except ConnectionResetError:
        if request.transport is not None:
            request.transport.close()
        raise _Gone() from None  # (nothing more can be sent; aiohttp logs nothing for it)


class _Gone(web.HTTPException):
    status_code = 499  # (the access log's "client closed request")


def make_demo_app(record: int = 1000) -> web.Application:
    app = web.Application(client_max_size=64 * 2**20, middlewares=[_client_gone])
    app[REQUESTS] = collections.deque(maxlen=record)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def start_demo_upstream(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(make_demo_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    addr = runner.addresses[0]
    return runner, int(addr[1])
