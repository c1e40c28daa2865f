"""What the on-call engineer has during an incident: a leaked key stopped while the database
refuses writes, a hanging backend visible while it hangs, readiness that rides out a backend
restart, and a database outage that does not fill the log with a line per retry."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any, Sequence

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc

from gateway.config import load_config_text
from gateway.config.loader import ConfigError
from gateway.writer import BatchWriter, WriterMetrics

from .helpers import ADMIN_TOKEN, free_port, serve_handler, until, write_config
from .test_conversations_ops import metric

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


async def _key(s: aiohttp.ClientSession, g: Any) -> tuple[str, str]:
    async with s.post(g.admin_url + "/keys", headers=ADMIN, json={"owner": "o"}) as r:
        rec = await r.json()
    return rec["id"], rec["key"]


async def _status(s: aiohttp.ClientSession, g: Any, key: str) -> int:
    async with s.post(g.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


async def test_a_key_revoked_while_the_database_refuses_writes_is_refused_here(make_gateway: Any,
                                                                                tmp_path: Path) -> None:
    """The revocation cannot be stored (another process holds the SQLite file): the admin gets a
    503 saying what was and was not done, and this instance refuses the key from then on (it
    kept serving it, with no way to stop it but stopping the gateway)."""
    g = await make_gateway([{"name": "key_auth"}])
    async with aiohttp.ClientSession() as s:
        key_id, key = await _key(s, g)
        assert await _status(s, g, key) == 200
        holder = sqlite3.connect(tmp_path / "gateway.db", timeout=1, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            async with s.post(g.admin_url + f"/keys/{key_id}/revoke", headers=ADMIN) as r:
                assert r.status == 503
                err = (await r.json())["error"]
            assert err["code"] == "revocation_not_stored" and "this instance refuses the key" in err["message"].lower()
            assert await _status(s, g, key) == 401
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert await _status(s, g, key) == 401  # (not stored: still refused here)
        async with s.get(g.admin_url + f"/keys/{key_id}", headers=ADMIN) as r:  # what decides here, shown
            rec = await r.json()
            assert rec["status"] == "active" and rec["revoked_here"] is True
        async with s.post(g.admin_url + f"/keys/{key_id}/rotate", headers=ADMIN) as r:  # not a way around it
            assert r.status == 409 and "send the revoke again" in (await r.json())["error"]["message"]
        async with s.post(g.admin_url + f"/keys/{key_id}/revoke", headers=ADMIN) as r:  # the retry stores it
            assert r.status == 200 and (await r.json())["status"] == "revoked"


async def test_deny_keys_refuses_a_key_whatever_the_database_says(make_gateway: Any, tmp_path: Path) -> None:
    g = await make_gateway([{"name": "key_auth"}])
    async with aiohttp.ClientSession() as s:
        key_id, key = await _key(s, g)
        other_id, other = await _key(s, g)
        path = tmp_path / "gateway.yaml"
        write_config(path, path.read_text().replace("- name: key_auth", f"- name: key_auth\n  config: {{deny_keys: [{key_id}]}}"))
        async with s.post(g.admin_url + "/config/reload", headers=ADMIN) as r:
            assert r.status == 200, await r.text()
        assert await _status(s, g, key) == 401
        assert await _status(s, g, other) == 200
    with pytest.raises(ConfigError, match="key ids .*not keys"):
        load_config_text(f"upstream: {{url: 'http://x'}}\nplugins: [{{name: key_auth, config: {{deny_keys: ['{key}']}}}}]")
    # one list for the whole process: a route's own list would let a denied key through there
    with pytest.raises(ConfigError, match="deny_keys"):
        load_config_text(f"upstream: {{url: 'http://x'}}\nplugins: [{{name: key_auth, config: {{deny_keys: [{key_id}]}}}}]\n"
                         "routes: [{path_prefix: /v1/audio, plugins: {key_auth: {config: {deny_keys: []}}}}]")


async def test_a_hanging_backend_shows_in_the_metrics_while_it_hangs(make_gateway: Any) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return web.json_response({"choices": []})

    runner, url = await serve_handler(hang)
    try:
        g = await make_gateway([], upstream={"url": url})
        assert await metric(g, "gateway_upstream_waiting") == 0
        async with aiohttp.ClientSession() as s:
            calls = [asyncio.create_task(s.post(g.url + "/v1/chat/completions", json=CHAT)) for _ in range(3)]
            await until(lambda: metric(g, "gateway_upstream_waiting"), what="requests waiting on the upstream")
            await asyncio.sleep(1.1)
            assert await metric(g, "gateway_upstream_waiting") == 3
            assert await metric(g, "gateway_upstream_oldest_wait_seconds") >= 1.0
            release.set()
            for c in calls:
                (await c).release()
        assert await metric(g, "gateway_upstream_waiting") == 0
        assert await metric(g, "gateway_upstream_oldest_wait_seconds") == 0
    finally:
        await runner.cleanup()


async def test_readiness_rides_out_a_backend_restart_shorter_than_the_grace(make_gateway: Any) -> None:
    """One backend restart took every instance out of the load balancer at once (each then
    answered nothing instead of the gateway's 502). An upstream that answered before gets
    server.readiness_grace; one never reached is not ready at once (test_lifecycle)."""
    port = free_port()

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    g = await make_gateway([], upstream={"url": f"http://127.0.0.1:{port}"}, server={"readiness_grace": 2})
    async with aiohttp.ClientSession() as s:
        async def ready() -> tuple[int, Any]:
            async with s.get(g.admin_url + "/readyz") as r:
                return r.status, (await r.json())["checks"]["upstream"]

        assert (await ready())[0] == 200
        await runner.cleanup()  # the backend goes away
        status, up = await ready()
        assert status == 200 and up["ok"] is False and up["not_ready_after"] == 2
        await until(lambda: _is(ready, 503), timeout=10, what="not ready after the grace")
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await until(lambda: _is(ready, 200), timeout=10, what="ready again")
        finally:
            await runner.cleanup()


async def _is(ready: Any, want: int) -> bool:
    return (await ready())[0] == want


async def test_a_database_outage_logs_its_retries_once_per_interval(caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.writer")
    down = [True]

    async def write(batch: Sequence[int]) -> None:
        if down[0]:
            raise sa_exc.OperationalError("INSERT", {}, Exception("database is locked"))

    w = BatchWriter("t", write, WriterMetrics(CollectorRegistry()), batch_size=100, flush_interval=0.05,
                    retry_for=60)
    w.start()
    await w.put(1)
    await asyncio.sleep(3.5)  # retried after 0.05, 0.1, 0.2, 0.4, 0.8, 1.6 s: six retries
    down[0] = False
    await w.flush(timeout=10)
    await w.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.writer"]
    retries = [m for m in lines if "retrying in" in m]
    assert len(retries) == 1, lines
    back = [m for m in lines if "go through again" in m]
    assert len(back) == 1 and "more failed write(s) retried" in back[0], back
    assert w.written == 1


def test_a_deny_keys_value_that_may_be_a_secret_is_not_shown() -> None:
    secretish = "OWyW3px1Aqkm_" + "s3cr3tpart" * 4  # (a key pasted without its gw_ prefix)
    with pytest.raises(ConfigError) as e:
        load_config_text(f"upstream: {{url: 'http://x'}}\nplugins: [{{name: key_auth, config: {{deny_keys: ['{secretish}']}}}}]")
    assert "s3cr3t" not in str(e.value) and "not a key id" in str(e.value)
    with pytest.raises(ConfigError, match="not a key id: 'abc'"):
        load_config_text("upstream: {url: 'http://x'}\nplugins: [{name: key_auth, config: {deny_keys: [abc]}}]")
