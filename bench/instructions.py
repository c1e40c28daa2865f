"""What each plugin costs, in CPU instructions per request: a measure the machine's noise cannot move.

bench.py's rows compete for two cores with wrk and the fake upstream, and on a busy machine its
CPU-per-request column moves by tens of microseconds from run to run. This script runs the same
scenarios (bench.py's configs and request) with the serving gateway under valgrind's callgrind,
which counts the instructions the process executes: the same code, request and load give the
same count within a fraction of a percent, whatever else the machine is doing. It is slow
(callgrind runs the process some 50 times slower), so it sends a fixed number of requests from
8 concurrent connections, after a warm-up, and counts only those (instrumentation on from the
warm-up, counters zeroed after it). Background writers (SQLite, the OTLP exporter) run in the same
process and are counted: what the plugin costs the process, not only its request path.

    python bench/instructions.py                          # every gateway row (~1 minute each)
    python bench/instructions.py --only empty,rate_limit:memory --requests 2000

Needs valgrind (apt-get install valgrind). Prints instructions per request and each row against
the empty chain; the README shows a run.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench import BODY, DUMMY_KEY, HERE, SCENARIOS, Ctx, Proc, free_port, gateway_config, wait_port


async def _load(url: str, n: int, key: str, connections: int = 8) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as s:
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                async with s.post(url, data=BODY, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url}: status {r.status}")

        await asyncio.gather(*[worker() for _ in range(connections)])


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def measure(ctx: Ctx, sc: Any, n: int, warmup: int, tmp: Path) -> float:
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", sc.name)  # (valgrind reads % in a file name as a format)
    ctx.db_path = tmp / f"{slug}.db"
    env = {"BENCH_KEY": DUMMY_KEY}
    if sc.setup:
        env.update(sc.setup(ctx))
    port, aport = free_port(), free_port()
    cfg = tmp / f"{slug}.yaml"
    cfg.write_text(yaml.safe_dump(gateway_config(ctx, sc.plugins or [], port, aport)))
    out = tmp / f"{slug}.callgrind"
    p = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                          sys.executable, "-m", "gateway", "serve", "-c", str(cfg)],
                         stdout=open(tmp / f"{slug}.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # (a gateway under callgrind starts in tens of seconds)
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"{sc.name}: the gateway under valgrind exited; see {tmp / (slug + '.log')}")
            try:
                wait_port(port, timeout=1)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        _control(p.pid, "-i", "on")
        asyncio.run(_load(url, warmup, env["BENCH_KEY"]))
        time.sleep(3)  # (the warm-up's writes done)
        _control(p.pid, "-z")
        asyncio.run(_load(url, n, env["BENCH_KEY"]))
        time.sleep(2)  # (background writers catch up: their work is the plugin's cost too)
        _control(p.pid, "-d")
        time.sleep(1)
    finally:
        p.terminate()
        p.wait(120)
    dump = Path(f"{out}.1")  # (the dump asked for; the file without a number is the exit's)
    for line in dump.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1]) / n
    raise RuntimeError(f"no summary in {dump}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated scenario names (bench.py's)")
    ap.add_argument("--requests", type=int, default=1000, help="requests counted per row")
    ap.add_argument("--warmup", type=int, default=300)
    args = ap.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("valgrind is required (apt-get install valgrind)", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else [s.name for s in SCENARIOS]
    scenarios = [s for s in SCENARIOS if s.name in names and s.plugins is not None]
    if "empty" not in [s.name for s in scenarios]:
        scenarios.insert(0, next(s for s in SCENARIOS if s.name == "empty"))
    tmp = Path(tempfile.mkdtemp(prefix="gw-instr-"))
    procs: list[Proc] = []
    counts: dict[str, float] = {}
    try:
        up_port = free_port()
        procs.append(Proc([sys.executable, str(HERE / "upstream.py"), str(up_port)], up_port, tmp / "upstream.log"))
        ctx = Ctx(tmp, f"http://127.0.0.1:{up_port}")
        if any(s.needs_redis for s in scenarios) and shutil.which("redis-server"):
            rp = free_port()
            procs.append(Proc(["redis-server", "--port", str(rp), "--save", "", "--appendonly", "no"], rp,
                              tmp / "redis.log"))
            ctx.redis_url = f"redis://127.0.0.1:{rp}"
        if any(s.name.startswith("tracing") for s in scenarios):
            op = free_port()
            procs.append(Proc([sys.executable, str(HERE / "otlp_receiver.py"), str(op)], op, tmp / "otlp.log"))
            ctx.otlp_url = f"http://127.0.0.1:{op}/v1/traces"
        for sc in scenarios:
            if sc.needs_redis and not ctx.redis_url:
                print(f"skip {sc.name}: redis-server not installed", file=sys.stderr)
                continue
            try:
                counts[sc.name] = measure(ctx, sc, args.requests, args.warmup, tmp)
            except Exception as e:  # (one row failing leaves the others' counts)
                print(f"skip {sc.name}: {e}", file=sys.stderr)
                continue
            print(f"  {sc.name:<22} {counts[sc.name]:>12,.0f} instructions/request", file=sys.stderr, flush=True)
    finally:
        for p in reversed(procs):
            p.stop()
    base = counts.get("empty")
    print(f"\n{args.requests} requests per row (POST /v1/chat/completions, 8 connections), serving process only\n")
    print("| scenario | instructions/request | added vs empty chain | vs empty chain (cost as throughput) |")
    print("|---|---:|---:|---:|")
    for name, c in counts.items():
        added = f"+{c - base:,.0f} (+{(c - base) / base:.1%})" if base and name != "empty" else ""
        ratio = f"{base / c:.2f}x" if base else ""
        print(f"| {name} | {c:,.0f} | {added} | {ratio} |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
