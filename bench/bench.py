"""Side-by-side throughput and latency on loopback, in one run.

Rows: the fake upstream directly, a bare aiohttp pass-through proxy (the floor for any aiohttp
gateway), the gateway with an empty chain, and the gateway with each plugin. Each row is a
separate process; load comes from wrk (apt-get install wrk). Prints requests/s, p50 and p99
latency, ratios against the empty chain, and time-to-first-byte of a streamed response.

    python bench/bench.py                      # every scenario
    python bench/bench.py --only bare,empty    # some of them
    python bench/bench.py --duration 10 --connections 64 --rounds 3

Numbers depend on the machine; the README shows a run and says which machine it was.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

HERE = Path(__file__).resolve().parent
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
DUMMY_KEY = "sk-" + "x" * 43
BODY = json.dumps({"model": "demo-chat", "messages": [{"role": "user", "content": "hello there"}]})
STREAM_BODY = json.dumps({"model": "demo-chat", "stream": True, "messages": [{"role": "user", "content": "hello"}]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


class Proc:
    def __init__(self, args: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.log = log
        self._f = open(log, "ab")
        self.p = subprocess.Popen(args, stdout=self._f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            wait_port(port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{args} did not start: {log.read_text()[-2000:]}") from None

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self._f.close()


# -- scenarios ------------------------------------------------------------------------------------
class Scenario:
    def __init__(self, name: str, plugins: list[dict[str, Any]] | None, *, needs_redis: bool = False,
                 setup: Callable[["Ctx"], dict[str, str]] | None = None, note: str = "",
                 extra: Callable[["Ctx"], None] | None = None) -> None:
        self.name, self.plugins, self.needs_redis, self.setup, self.note, self.extra = \
            name, plugins, needs_redis, setup, note, extra


class Ctx:
    def __init__(self, tmp: Path, upstream_url: str) -> None:
        self.tmp = tmp
        self.upstream_url = upstream_url
        self.redis_url: str | None = None
        self.otlp_url: str | None = None
        self.db_path = tmp / "bench.db"


def gateway_config(ctx: Ctx, plugins: list[dict[str, Any]], port: int, admin_port: int) -> dict[str, Any]:
    def subst(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace("{redis}", ctx.redis_url or "").replace("{otlp}", ctx.otlp_url or "") \
                .replace("{tmp}", str(ctx.tmp))
        if isinstance(v, dict):
            return {k: subst(x) for k, x in v.items()}
        if isinstance(v, list):
            return [subst(x) for x in v]
        return v

    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout": 5},
        "admin": {"host": "127.0.0.1", "port": admin_port, "token": ADMIN_TOKEN},
        "upstream": {"url": ctx.upstream_url, "max_connections": 256},
        "database": {"url": f"sqlite+aiosqlite:///{ctx.db_path}"},
        "logging": {"level": "WARNING"},
        "plugins": subst(plugins),
    }


def create_key(ctx: Ctx) -> dict[str, str]:
    """A key for the key_auth scenario, created with the CLI against the bench database."""
    cfg = ctx.tmp / "keys.yaml"
    cfg.write_text(yaml.safe_dump(gateway_config(ctx, [{"name": "key_auth"}], 0, 0)))
    out = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--name", "bench", "--owner", "bench",
                          "--json", "-c", str(cfg)], capture_output=True, text=True, check=True)
    return {"BENCH_KEY": json.loads(out.stdout)["key"]}


SCENARIOS: list[Scenario] = [
    Scenario("direct", None, note="the fake upstream itself"),
    Scenario("bare", None, note="minimal aiohttp pass-through"),
    Scenario("empty", [], note="gateway, empty chain"),
    Scenario("key_auth", [{"name": "key_auth", "config": {"track_usage": False}}], setup=create_key,
             note="cached key check"),
    Scenario("key_auth+usage", [{"name": "key_auth"}], setup=create_key, note="cached check + usage rollup"),
    Scenario("rate_limit:memory", [{"name": "rate_limit", "config": {
        "storage": "memory://", "rules": [{"name": "bench", "limit": "100000000/minute", "key_by": ["ip"]}]}}]),
    Scenario("rate_limit:redis", [{"name": "rate_limit", "config": {
        "storage": "{redis}", "rules": [{"name": "bench", "limit": "100000000/minute", "key_by": ["ip"]}]}}],
        needs_redis=True),
    Scenario("conversations:sqlite", [{"name": "conversations"}], note="2 messages stored per request"),
    Scenario("shipped-chain", [{"name": "key_auth"}, {"name": "rate_limit", "config": {
        "rules": [{"name": "k", "limit": "100000000/minute", "key_by": ["key"]}]}}, {"name": "conversations"},
        {"name": "audit"}, {"name": "metrics"}], setup=create_key, note="key_auth+rate_limit+conversations+audit+metrics"),
    Scenario("audit:database", [{"name": "audit", "config": {"sinks": ["database"]}}]),
    Scenario("tracing:otlp", [{"name": "tracing", "config": {
        "exporter": {"type": "otlp_http", "endpoint": "{otlp}"}}}], note="every request, OTLP/HTTP to a local receiver"),
    Scenario("tracing:otlp@1%", [{"name": "tracing", "config": {
        "exporter": {"type": "otlp_http", "endpoint": "{otlp}"}, "sampling_ratio": 0.01}}], note="1% sampled"),
    Scenario("metrics", [{"name": "metrics"}]),
]


# -- load ---------------------------------------------------------------------------------------
LUA = """
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
"""


def _ms(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    assert m, v
    x = float(m.group(1))
    return {"us": x / 1000, "ms": x, "s": x * 1000}[m.group(2)]


def wrk(url: str, duration: float, connections: int, env: dict[str, str], lua: Path) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(lua), url],
                         capture_output=True, text=True, env={**os.environ, "BENCH_BODY": BODY, **env},
                         timeout=duration + 30)
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))  # type: ignore[union-attr]
    total = re.search(r"(\d+) requests in", text)
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: (.*)", text)
    return {"rps": rps, "p50": p50, "p99": p99, "requests": int(total.group(1)) if total else 0,
            "non2xx": int(errs.group(1)) if errs else 0,
            "socket_errors": sock.group(1) if sock else ""}


async def ttfb(url: str, n: int, env: dict[str, str]) -> float:
    import aiohttp

    headers = {"Content-Type": "application/json", "X-Bench-Delay": "0.002"}
    if env.get("BENCH_KEY"):
        headers["Authorization"] = "Bearer " + env["BENCH_KEY"]
    samples = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 5):
            t0 = time.perf_counter()
            async with s.post(url, data=STREAM_BODY, headers=headers) as r:
                await r.content.readany()
                t1 = time.perf_counter()
                await r.read()
            if i >= 5:
                samples.append((t1 - t0) * 1000)
    return statistics.median(samples)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(admin_url: str) -> dict[str, float]:
    """Writer counters from /metrics: records written and the deepest queue seen at the end."""
    import urllib.request

    req = urllib.request.Request(admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'gateway_writer_(written_total|queue_depth)\{writer="([^"]+)"\} ([\d.e+]+)', line)
        if m:
            out[f"{m.group(2)}.{m.group(1)}"] = float(m.group(3))
    # (a writer that wrote nothing and holds nothing, such as the quota writer with no quota
    # configured, is left out of the note)
    idle = {k.rsplit(".", 1)[0] for k, v in out.items() if k.endswith(".written_total") and not v}
    return {k: v for k, v in out.items() if k.rsplit(".", 1)[0] not in idle or out.get(
        k.rsplit(".", 1)[0] + ".queue_depth")}


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu or platform.machine()}, Python {platform.python_version()}, {platform.system()}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per scenario (median reported)")
    ap.add_argument("--ttfb", type=int, default=50, help="streamed requests for the TTFB column")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk is required (apt-get install wrk)", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else [s.name for s in SCENARIOS]
    scenarios = [s for s in SCENARIOS if s.name in names]
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    lua = tmp / "post.lua"
    lua.write_text(LUA)
    up_port = free_port()
    procs: list[Proc] = []
    results: dict[str, dict[str, Any]] = {}
    try:
        upstream = Proc([sys.executable, str(HERE / "upstream.py"), str(up_port)], up_port, tmp / "upstream.log")
        procs.append(upstream)
        ctx = Ctx(tmp, f"http://127.0.0.1:{up_port}")
        redis = None
        if any(s.needs_redis for s in scenarios) and shutil.which("redis-server"):
            rp = free_port()
            redis = Proc(["redis-server", "--port", str(rp), "--save", "", "--appendonly", "no"], rp, tmp / "redis.log")
            procs.append(redis)
            ctx.redis_url = f"redis://127.0.0.1:{rp}"
        if any(s.name.startswith("tracing") for s in scenarios):
            op = free_port()
            procs.append(Proc([sys.executable, str(HERE / "otlp_receiver.py"), str(op)], op, tmp / "otlp.log"))
            ctx.otlp_url = f"http://127.0.0.1:{op}/v1/traces"
        running: list[tuple[Scenario, str, dict[str, str], str | None, int]] = []
        for sc in scenarios:
            if sc.needs_redis and not ctx.redis_url:
                print(f"skip {sc.name}: redis-server not installed", file=sys.stderr)
                continue
            # Every row gets the same request: the OpenAI SDKs always send an Authorization header,
            # so rows without key_auth get a dummy key of a gateway key's length (the gateway drops
            # the client's Authorization before forwarding either way).
            env: dict[str, str] = {"BENCH_KEY": DUMMY_KEY}
            admin_url = None
            try:
                if sc.name == "direct":
                    port = up_port
                    pid = upstream.p.pid
                elif sc.name == "bare":
                    port = free_port()
                    procs.append(Proc([sys.executable, str(HERE / "bare_proxy.py"), str(port), ctx.upstream_url],
                                      port, tmp / "bare.log"))
                    pid = procs[-1].p.pid
                else:
                    slug = sc.name.replace(":", "_")
                    ctx.db_path = tmp / f"{slug}.db"
                    if sc.setup:
                        env.update(sc.setup(ctx))
                    port, aport = free_port(), free_port()
                    cfgp = tmp / f"{slug}.yaml"
                    cfgp.write_text(yaml.safe_dump(gateway_config(ctx, sc.plugins or [], port, aport)))
                    procs.append(Proc([sys.executable, "-m", "gateway", "serve", "-c", str(cfgp)], port,
                                      tmp / f"{slug}.log"))
                    pid = procs[-1].p.pid
                    admin_url = f"http://127.0.0.1:{aport}"
            except Exception as e:
                print(f"skip {sc.name}: {e}", file=sys.stderr)
                continue
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            wrk(url, 1, args.connections, env, lua)  # warm-up
            running.append((sc, url, env, admin_url, pid))
        # Rounds interleave the scenarios so a slow spell on the machine hits them all alike.
        per: dict[str, list[dict[str, Any]]] = {sc.name: [] for sc, *_ in running}
        for i in range(args.rounds):
            for sc, url, env, _, pid in running:
                c0 = cpu_seconds(pid)
                x = wrk(url, args.duration, args.connections, env, lua)
                # CPU time the serving process spent per request: what the scenario costs, less
                # sensitive than req/s to how busy the rest of the machine was.
                x["cpu_us"] = (cpu_seconds(pid) - c0) * 1e6 / max(1, x["requests"])
                per[sc.name].append(x)
                print(f"  round {i + 1} {sc.name:<22} {x['rps']:>9.0f} req/s  p50 {x['p50']:.2f} ms  "
                      f"p99 {x['p99']:.2f} ms  {x['cpu_us']:.0f} us CPU/req", file=sys.stderr, flush=True)
        for sc, url, env, admin_url, _ in running:
            rounds = per[sc.name]
            r: dict[str, Any] = {k: statistics.median(x[k] for x in rounds) for k in ("rps", "p50", "p99", "cpu_us")}
            r["non2xx"] = sum(x["non2xx"] for x in rounds)
            r["ttfb"] = asyncio.run(ttfb(url, args.ttfb, env))
            if admin_url:
                with contextlib.suppress(Exception):
                    r["writers"] = scrape(admin_url)
            r["note"] = sc.note
            r["rounds"] = [{k: x[k] for k in ("rps", "p50", "cpu_us")} for x in rounds]
            results[sc.name] = r
    finally:
        for p in reversed(procs):
            p.stop()
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "args": vars(args), "results": results}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def paired(r: dict[str, Any], base: dict[str, Any] | None, key: str, ratio: bool) -> float | None:
    """``r`` against ``base`` round by round (each pair ran back to back, so a slow spell of the
    machine hits both), then the median: steadier than comparing the two medians."""
    if base is None:
        return None
    pairs = list(zip(r.get("rounds", []), base.get("rounds", [])))
    if not pairs:
        return r[key] / base[key] if ratio else r[key] - base[key]
    return statistics.median(a[key] / b[key] if ratio else a[key] - b[key] for a, b in pairs)


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    empty = results.get("empty")
    bare = results.get("bare")
    print(f"\nmachine: {machine()}")
    print(f"load: wrk, 1 thread, {args.connections} connections, {args.duration:g}s x {args.rounds} rounds "
          f"(rounds interleave the rows; columns: medians, comparisons: median of per-round pairs), "
          f"POST /v1/chat/completions; TTFB: median of {args.ttfb} streamed requests\n")
    print("| scenario | req/s | p50 ms | p99 ms | TTFB ms | vs bare | vs empty chain | p50 added vs bare "
          "| CPU µs/req | CPU added vs empty | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        vb = paired(r, bare, "rps", True)
        ve = paired(r, empty, "rps", True)
        added = paired(r, bare, "p50", False) if name not in ("direct", "bare") else None
        cpu_added = paired(r, empty, "cpu_us", False) if name not in ("direct", "bare", "empty") else None
        note = r.get("note", "")
        w = r.get("writers")
        if w:
            note += "; " + ", ".join(f"{k}={v:.0f}" for k, v in sorted(w.items()))
        if r.get("non2xx"):
            note += f"; {r['non2xx']} non-2xx"
        print(f"| {name} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['ttfb']:.2f} "
              f"| {'' if vb is None else f'{vb:.2f}x'} | {'' if ve is None else f'{ve:.2f}x'} "
              f"| {'' if added is None else f'{added:+.2f} ms'} | {r['cpu_us']:.0f} "
              f"| {'' if cpu_added is None else f'{cpu_added:+.0f} µs'} | {note} |")


if __name__ == "__main__":
    raise SystemExit(main())
