"""An SQLite file that refuses writes (a full disk, a file size limit, a read-only file): the
operator must learn why from what the gateway says, and the admin API must not answer "retry
shortly" for what only a fix of the disk or file will end."""
from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import ADMIN_TOKEN, base_config, free_port, write_config

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_file_size_limit_is_named_in_logs_readyz_and_admin_answers(upstream: Any, tmp_path: Path) -> None:
    port, aport = free_port(), free_port()
    cfg = base_config(upstream.url, tmp_path, [{"name": "key_auth"}, {"name": "audit", "config": {"flush_interval": 0.05}}],
                      server={"port": port, "readiness_grace": 1}, admin={"port": aport})
    path = write_config(tmp_path / "gateway.yaml", cfg)
    # The log goes to a pipe: a file size limit on the process applies to every file it writes.
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(x.decode(errors="replace") for x in proc.stdout), daemon=True)
    reader.start()
    base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{aport}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, "".join(lines)[-2000:]
                try:
                    async with s.get(admin + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "".join(lines)[-2000:]
                await asyncio.sleep(0.1)
            async with s.post(admin + "/keys", json={"owner": "alice"}, headers=AUTH) as r:
                assert r.status == 201
                key = await r.json()
            # From now on the process may not write a file past its first byte (Python ignores
            # SIGXFSZ: the writes fail with EFBIG, as on a disk that is full).
            soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, hard))  # (the soft limit: it can be lifted)
            for _ in range(3):
                async with s.post(base + "/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": f"Bearer {key['key']}"}) as r:
                    assert r.status == 200
            # /readyz (no token) says which writer fails and why, in SQLite's words
            ready: dict[str, Any] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                async with s.get(admin + "/readyz") as r:
                    ready = await r.json()
                if ready["checks"]["writers"].get("detail") and r.status == 503:
                    break
                await asyncio.sleep(0.2)
            w = ready["checks"]["writers"]
            assert w["ok"] is False and "audit:database" in w["failing"], ready
            assert "audit:database: SQLITE_" in w["detail"] and "disk" in w["detail"], ready
            # the admin API says the database refuses, not "retry shortly" (a revoke: that it was
            # not stored, and is applied by this instance meanwhile)
            async with s.post(admin + f"/keys/{key['id']}/revoke", headers=AUTH) as r:
                body = await r.json()
                assert r.status == 503 and body["error"]["code"] == "revocation_not_stored", body
                assert "SQLITE_" in body["error"]["message"] and "retry shortly" not in body["error"]["message"]
                assert "Retry-After" not in r.headers
            # the writer's log line names it too
            assert any("writer audit:database: write of" in x and "(SQLITE_" in x for x in lines), lines[-5:]
            # lifting the limit: the writes go through, the instance is ready again, the key revoked
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
            deadline = time.monotonic() + 30
            while True:
                async with s.get(admin + "/readyz") as r:
                    if r.status == 200:
                        break
                assert time.monotonic() < deadline, await r.text()
                await asyncio.sleep(0.2)
            async with s.post(admin + f"/keys/{key['id']}/revoke", headers=AUTH) as r:
                assert r.status == 200, await r.text()
            async with s.get(admin + "/audit", params={"type": "request"}, headers=AUTH) as r:
                assert len((await r.json())["data"]) == 3  # kept in the queue meanwhile, nothing lost
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(5)
    assert "Traceback" not in "".join(lines)
