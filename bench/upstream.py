"""A fast fake OpenAI-compatible upstream for benchmarks: fixed answers, no parsing.

POST /v1/chat/completions answers a fixed chat completion with usage; with "stream": true in the
body it streams 20 SSE chunks (first one immediately), then a usage chunk and [DONE].
Run: python bench/upstream.py PORT
"""
from __future__ import annotations

import asyncio
import json

from aiohttp import web

ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "demo-chat",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}).encode()


def _chunk(content: str) -> bytes:
    return b"data: " + json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                                   "model": "demo-chat", "choices": [{"index": 0, "delta": {"content": content},
                                                                      "finish_reason": None}]}).encode() + b"\n\n"


CHUNKS = [_chunk(" word") for _ in range(20)]
USAGE = b"data: " + json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                                "model": "demo-chat", "choices": [],
                                "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}}).encode() + b"\n\n"


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    body = await request.read()
    if b'"stream": true' in body or b'"stream":true' in body:
        delay = float(request.headers.get("X-Bench-Delay", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for c in CHUNKS:
            await resp.write(c)
            if delay:
                await asyncio.sleep(delay)
        if b"include_usage" in body:
            await resp.write(USAGE)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    return web.Response(body=ANSWER, content_type="application/json")


async def main(port: int) -> None:
    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="A fake OpenAI-compatible upstream for the benchmark: a fixed chat "
                                             "completion, streamed when asked, on 127.0.0.1.")
    ap.add_argument("port", type=int, help="port to listen on")
    asyncio.run(main(ap.parse_args().port))
