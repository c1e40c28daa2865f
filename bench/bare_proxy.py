"""The floor for any aiohttp gateway: a minimal pass-through proxy with one pooled ClientSession.

It reads the body, forwards method/path/headers/body, and streams the answer back. No header
hygiene, no request ids, no error mapping, no plugins.
Run: python bench/bare_proxy.py PORT UPSTREAM_URL
"""
from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web

DROP = {"host", "content-length", "transfer-encoding", "connection"}


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
        async with session.request(request.method, upstream + request.rel_url.raw_path_qs, data=body or None,
                                   headers=headers, allow_redirects=False) as up:
            out = web.StreamResponse(status=up.status,
                                     headers={k: v for k, v in up.headers.items() if k.lower() not in DROP})
            if up.content_length is not None:
                out.content_length = up.content_length
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
