"""stdout and stderr into a pipe nobody reads (a log collector that stalled, `gateway serve 2>&1 |
slow-reader`): the gateway keeps answering, stays ready, and a SIGTERM still ends it; the audit
events meant for stdout are dropped and counted, the log lines dropped and counted."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import ADMIN_TOKEN, base_config, free_port, until, write_config

T = aiohttp.ClientTimeout(total=5)


async def test_a_pipe_nobody_reads_stops_nothing(upstream: Any, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    cfg = base_config(upstream.url, tmp_path, [{"name": "audit", "config": {
        "sinks": ["database", "stdout"], "flush_interval": 0.05, "queue_size": 20, "batch_size": 10,
        "on_full": "drop"}}],
        server={"port": port}, admin={"port": admin_port}, logging={"level": "DEBUG", "format": "json"})
    path = write_config(tmp_path / "gw.yaml", cfg)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # never read
    try:
        async with aiohttp.ClientSession(timeout=T) as s:
            async def alive() -> bool:
                async with s.get(f"http://127.0.0.1:{admin_port}/healthz") as r:
                    return r.status == 200

            await until(alive, 30, 0.1, "start-up")  # (its log lines go into the pipe too)
            body = {"model": "demo-chat", "messages": [{"role": "user", "content": "x" * 2000}]}
            # ~700 bytes of audit line each, and DEBUG log lines: the 64 KiB pipe takes about 90
            # events, a stuck write holds 10, the queue 20: the rest are dropped
            for i in range(400):
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                    assert r.status == 200, i
            async with s.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                ready = await r.json()
            async with s.get(f"http://127.0.0.1:{admin_port}/metrics",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                metrics = await r.text()
        assert ready["status"] == "ready", ready  # a stalled log reader is no reason to leave the pool
        dropped = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith('gateway_writer_dropped_total{') and 'writer="audit:stdout"' in line)
        assert dropped > 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) is not None  # it ends, the pipe still unread
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
