"""A minimal OTLP/HTTP trace receiver for benchmarks: accepts ``POST /v1/traces`` (protobuf), counts the
spans, answers 200 with an empty ExportTraceServiceResponse. Nothing is stored.

Run it next to a gateway whose tracing plugin exports to it::

    python bench/otlp_receiver.py 4318       # (or --port 4318) prints "ready <port>", then counts every 5 s
    GET /stats -> {"requests": ..., "spans": ..., "bytes": ...}

or start it in-process: ``runner, port, stats = await start_receiver("127.0.0.1", 0)``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                        ExportTraceServiceResponse)

STATS = web.AppKey("stats", dict)
_OK = ExportTraceServiceResponse().SerializeToString()


async def _traces(request: web.Request) -> web.Response:
    body = await request.read()
    stats = request.app[STATS]
    stats["requests"] += 1
    stats["bytes"] += len(body)
    if request.app["decode"]:
        req = ExportTraceServiceRequest()
        try:
            req.ParseFromString(body)
        except Exception:
            return web.Response(status=400, text="bad protobuf")
        stats["spans"] += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
    return web.Response(body=_OK, content_type="application/x-protobuf")


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS])


def make_app(decode: bool = True) -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)
    app[STATS] = {"requests": 0, "spans": 0, "bytes": 0}
    app["decode"] = decode
    app.router.add_post("/v1/traces", _traces)
    app.router.add_get("/stats", _stats)
    return app


async def start_receiver(host: str = "127.0.0.1", port: int = 0,
                         decode: bool = True) -> tuple[web.AppRunner, int, dict[str, Any]]:
    app = make_app(decode)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, runner.addresses[0][1], app[STATS]


async def _main(args: argparse.Namespace) -> None:
    runner, port, stats = await start_receiver(args.host, args.port, not args.no_decode)
    print(f"ready {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), args.every or None)
        except asyncio.TimeoutError:
            if args.every:
                print(json.dumps(stats), flush=True)
    print(json.dumps(stats), flush=True)
    await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("port_arg", nargs="?", type=int, metavar="PORT", help="same as --port")
    p.add_argument("--port", type=int, default=4318, help="0 picks a free port (printed as 'ready <port>')")
    p.add_argument("--no-decode", action="store_true", help="count requests and bytes only")
    p.add_argument("--every", type=float, default=5.0, help="seconds between stats lines (0: only at exit)")
    args = p.parse_args()
    if args.port_arg is not None:
        args.port = args.port_arg
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
