"""Lifecycle and the admin listener: graceful SIGTERM with a stream in flight, health and
readiness, admin paths kept off the public port, config reload over HTTP and by SIGHUP."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .helpers import (ADMIN_TOKEN, GatewayProcess, base_config, free_port, port_refuses, stream_then_stop,
                      write_config)

T = aiohttp.ClientTimeout(total=30)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}

MARKER_PLUGIN = '''
import os
from gateway.plugin import Plugin, registry


def _mark(line):
    with open(os.environ["LIFECYCLE_MARKS"], "a") as f:
        f.write(line + "\\n")


class Marker(Plugin):
    """Writes each lifecycle step to a file so the test can see it from outside the process."""
    name = "t_lifecycle_marker"

    async def startup(self):
        _mark("startup")

    async def on_complete(self, ctx):
        _mark(f"complete {ctx.path} {ctx.outcome} {ctx.status} {ctx.bytes_out}")

    async def shutdown(self):
        _mark("shutdown")


registry.register(Marker)
'''


class MarkedGatewayProcess(GatewayProcess):
    """`gateway serve` in a subprocess with one extra test plugin registered before the CLI runs."""

    def start(self) -> "MarkedGatewayProcess":
        import subprocess

        self._log = open(self.log_path, "ab")
        code = "import marker_plugin, sys; from gateway.cli import main; raise SystemExit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", "-c", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self


async def test_sigterm_drains_stream_then_shuts_down(tmp_path: Path, upstream: Any) -> None:
    (tmp_path / "marker_plugin.py").write_text(MARKER_PLUGIN)
    marks = tmp_path / "marks.txt"
    port, admin_port = free_port(), free_port()
    cfg = base_config(upstream.url, tmp_path, [{"name": "t_lifecycle_marker"}],
                      server={"port": port, "shutdown_timeout": 20}, admin={"port": admin_port})
    path = write_config(tmp_path / "gateway.yaml", cfg)
    proc = MarkedGatewayProcess(path, port, admin_port,
                                env={"PYTHONPATH": str(tmp_path), "LIFECYCLE_MARKS": str(marks)}).start()
    try:
        await proc.wait_ready()
        words = 30
        first = asyncio.Event()

        async def read_stream() -> str:
            async with aiohttp.ClientSession(timeout=T) as s:
                async with s.post(proc.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                                  headers={"X-Demo-Delay": "0.1", "X-Demo-Words": str(words)}) as r:
                    assert r.status == 200
                    out = await r.content.readuntil(b"\n\n")
                    first.set()
                    return (out + await r.read()).decode()

        reader = asyncio.create_task(read_stream())
        async with asyncio.timeout(10):
            await first.wait()
        proc.signal(signal.SIGTERM)
        # New connections are refused while the stream is still being served.
        deadline = time.monotonic() + 5
        while not port_refuses(port):
            assert time.monotonic() < deadline, "the listener kept accepting after SIGTERM"
            await asyncio.sleep(0.02)
        assert not reader.done(), "the stream ended before the listener closed"
        async with asyncio.timeout(20):
            text = await reader
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        contents = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1]]
        assert len([c for c in contents if c]) == words
        rc = await asyncio.to_thread(proc.wait, 20)
        assert rc == 0, proc.log()[-3000:]
        lines = marks.read_text().splitlines()
        assert lines[0] == "startup"
        assert lines[1].startswith("complete /v1/chat/completions ok 200 ")
        assert lines[-1] == "shutdown" and lines.count("shutdown") == 1
        log = proc.log()
        assert "shutting down" in log and "gateway stopped" in log
        assert "Traceback" not in log
    finally:
        proc.stop()


async def test_health_ready_and_admin_auth(make_gateway: Any) -> None:
    g = await make_gateway()
    assert g.gw.cfg.admin.host == "127.0.0.1"
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.admin_url + "/healthz") as r:
            assert r.status == 200 and await r.json() == {"status": "ok"}
        async with s.get(g.admin_url + "/readyz") as r:
            assert r.status == 200
            body = await r.json()
            assert body["status"] == "ready"
            assert body["checks"]["upstream"]["ok"] and body["checks"]["database"]["ok"]
        for path in ("/metrics", "/openapi.json"):
            async with s.get(g.admin_url + path) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "admin_token_missing"
            async with s.get(g.admin_url + path, headers={"Authorization": "Bearer wrong-token-0123456789"}) as r:
                assert r.status == 401
                text = await r.text()
                assert json.loads(text)["error"]["code"] == "admin_token_invalid"
                assert "wrong-token" not in text
        async with s.post(g.admin_url + "/config/reload") as r:
            assert r.status == 401
        async with s.get(g.admin_url + "/metrics", headers=AUTH) as r:
            assert r.status == 200
            assert "gateway_config_reloads_total" in await r.text()
        async with s.get(g.admin_url + "/openapi.json", headers=AUTH) as r:
            doc = await r.json()
            assert doc["openapi"].startswith("3.") and "/config/reload" in doc["paths"]
        async with s.get(g.admin_url + "/no/such/admin/path", headers=AUTH) as r:
            assert r.status == 404
            assert set((await r.json())["error"]) >= {"message", "type", "code"}


async def test_readyz_503_when_upstream_down(make_gateway: Any) -> None:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        dead = sk.getsockname()[1]
    g = await make_gateway(upstream={"url": f"http://127.0.0.1:{dead}"})
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.admin_url + "/readyz") as r:
            assert r.status == 503
            body = await r.json()
            assert body["status"] == "not_ready"
            assert body["checks"]["upstream"]["ok"] is False
            assert body["checks"]["database"]["ok"] is True
        async with s.get(g.admin_url + "/healthz") as r:
            assert r.status == 200  # alive, just not ready


async def test_readyz_rides_out_a_database_outage_shorter_than_readiness_grace(make_gateway: Any,
                                                                               tmp_path: Path, caplog: Any) -> None:
    """A database that stops answering (here: its file gone) is shown at once in /readyz, which
    still answers 200 until it has failed for server.readiness_grace: every instance sharing the
    database would fail the probe together, and a short restart must not take the fleet out of
    the load balancer. Past the grace: 503. Back: ready, noticed without a probe, and the next
    outage gets a grace of its own. A reload changes the grace; 0 fails at the first failed probe,
    and not for writes merely under way. A writer giving up sooner than the grace is warned of."""
    from .helpers import until

    g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {"retry_for": 1}}],
                           server={"readiness_grace": 1.5})
    assert any("readiness_grace (1.5s) is longer than the retry_for of audit:database (1s)" in r.getMessage()
               for r in caplog.records)
    db = tmp_path / "gateway.db"
    away = tmp_path / "away.db"

    async def ready() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.get(g.admin_url + "/readyz") as r:
                return r.status, await r.json()

    def take_away() -> None:
        db.rename(away)

    st, body = await ready()
    assert st == 200 and body["checks"]["database"] == {"ok": True}
    for _ in range(2):
        take_away()
        t0 = time.monotonic()
        st, body = await ready()
        assert body["checks"]["database"]["ok"] is False and body["checks"]["database"]["not_ready_after"] == 1.5
        if time.monotonic() - t0 < 1.2:  # (a probe on a very slow machine may itself take the grace)
            assert st == 200 and body["status"] == "ready", body
            assert body["checks"]["database"]["failing_for"] < 1.5
        st, body = await until(lambda: _not_ready(ready), timeout=15, what="/readyz 503")
        assert body["status"] == "not_ready" and body["checks"]["database"]["failing_for"] >= 1.5
        assert time.monotonic() - t0 >= 1.5
        away.rename(db)
        # no probe now: the gateway notices by itself that the database is back, so the next
        # outage's first probe does not find this one's clock still running
        await until(lambda: g.gw.db.failing_for() == 0.0, timeout=10, what="the database seen back")
        await asyncio.sleep(2.0)
    st, body = await until(lambda: _ready(ready), timeout=15, what="/readyz 200")
    assert body["checks"]["database"] == {"ok": True}
    # readiness_grace: 0 (a reload): not ready at the first failed probe; writes merely under way
    # (traffic being audited) are no failure
    cfg = yaml.safe_load((tmp_path / "gateway.yaml").read_text())
    cfg["server"]["readiness_grace"] = 0
    write_config(tmp_path / "gateway.yaml", cfg)
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 200, await r.text()

        async def traffic() -> None:
            for _ in range(300):
                async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 401  # (refused, and audited)

        load = asyncio.create_task(traffic())
        probes = []
        while not load.done():
            probes.append((await ready())[0])
        await load
    assert probes and set(probes) == {200}, probes
    take_away()
    st, body = await ready()
    assert st == 503 and body["checks"]["database"]["ok"] is False, body
    away.rename(db)


async def _not_ready(ready: Any) -> Any:
    st, body = await ready()
    return (st, body) if st == 503 else None


async def _ready(ready: Any) -> Any:
    st, body = await ready()
    return (st, body) if st == 200 else None


async def test_admin_paths_never_on_public_port(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway()
    admin_paths = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/config/reload"]
    async with aiohttp.ClientSession(timeout=T) as s:
        for p in admin_paths:
            method = "POST" if p == "/config/reload" else "GET"
            async with s.request(method, g.url + p, headers=AUTH) as r:
                assert r.status == 200
                body = await r.json()
                assert body["path"] == p  # the demo backend's echo answered: it was proxied
                assert "status" not in body and "openapi" not in body
    assert [q["path"] for q in upstream.requests] == admin_paths
    # the admin listener names no versions, even to a client without the token
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.admin_url + "/metrics") as r:
            assert r.status == 401 and r.headers["Server"] == "gateway"
    # With the public paths restricted, they are plain 404s in the OpenAI error shape.
    g2 = await make_gateway(server={"paths": ["/v1"]}, name="restricted.yaml")
    async with aiohttp.ClientSession(timeout=T) as s:
        for p in admin_paths:
            async with s.get(g2.url + p, headers=AUTH) as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "not_found"


def _edit(path: Path, fn: Any) -> None:
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


async def test_config_reload_over_http(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Version": "1"}}}])
    path = Path(g.gw.cfg.path)
    old_runtime = g.gw.runtime

    async def version(s: aiohttp.ClientSession) -> str | None:
        async with s.get(g.url + "/v1/models") as r:
            assert r.status == 200
            return r.headers.get("X-Version")

    async with aiohttp.ClientSession(timeout=T) as s:
        assert await version(s) == "1"
        _edit(path, lambda c: c["plugins"][0]["config"]["response"].update({"X-Version": "2"}))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 200, await r.text()
            assert (await r.json()) == {"status": "reloaded", "plugins": ["headers"]}
        assert await version(s) == "2"
        assert g.gw.runtime is not old_runtime
        # An invalid edit is rejected with the problem and its line; the old config keeps serving.
        good = path.read_text()
        path.write_text(good.replace("X-Version: '2'", "X-Version: '3'\n    colour: red"))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert err["code"] == "config_invalid"
            assert "plugins[0].config.colour -> line " in err["message"] and "unknown key" in err["message"]
        assert await version(s) == "2"
        # Settings that need a restart are refused, by name (a secret's value is never shown).
        path.write_text(good)
        _edit(path, lambda c: (c["server"].update({"port": free_port(), "max_body_size": 123, "reuse_port": True}),
                               c["admin"].update({"token": "another-admin-token-0123456789"})))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 400
            msg = (await r.json())["error"]["message"]
            assert "unchanged: server.port, server.reuse_port, admin.token cannot change without a restart" in msg
            assert "another-admin-token" not in msg
        assert await version(s) == "2"
        async with s.get(g.admin_url + "/metrics", headers=AUTH) as r:
            text = await r.text()
        assert 'gateway_config_reloads_total{result="success"} 1.0' in text
        assert 'gateway_config_reloads_total{result="failure"} 2.0' in text


async def test_reload_waits_for_inflight_requests(make_gateway: Any) -> None:
    """The old chain serves the requests it started; it is shut down only after they finish."""
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Version": "1"}}}])
    path = Path(g.gw.cfg.path)
    async with aiohttp.ClientSession(timeout=T) as s:
        r = await s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"X-Demo-Delay": "0.1", "X-Demo-Words": "25"})
        assert r.headers["X-Version"] == "1"
        old = g.gw.runtime
        _edit(path, lambda c: c["plugins"][0]["config"]["response"].update({"X-Version": "2"}))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as rr:
            assert rr.status == 200
        async with s.get(g.url + "/v1/models") as r2:
            assert r2.headers["X-Version"] == "2"
        assert old.inflight == 1 and old.started  # still serving the stream, not shut down
        text = (await r.read()).decode()
        r.close()
        assert text.endswith("data: [DONE]\n\n")
    deadline = time.monotonic() + 5
    while old.started:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert old.inflight == 0


async def test_sighup_reload_on_subprocess(tmp_path: Path, upstream: Any) -> None:
    port, admin_port = free_port(), free_port()
    cfg = base_config(upstream.url, tmp_path, [{"name": "headers", "config": {"response": {"X-Version": "1"}}}],
                      server={"port": port}, admin={"port": admin_port})
    path = write_config(tmp_path / "gateway.yaml", cfg)
    proc = GatewayProcess(path, port, admin_port).start()

    async def version(s: aiohttp.ClientSession) -> str | None:
        async with s.get(proc.url + "/v1/models") as r:
            return r.headers.get("X-Version")

    try:
        await proc.wait_ready()
        async with aiohttp.ClientSession(timeout=T) as s:
            assert await version(s) == "1"
            assert '"msg": "gateway listening"' in proc.log()
            _edit(path, lambda c: (c["plugins"][0]["config"]["response"].update({"X-Version": "2"}),
                                   c["logging"].update({"format": "text"})))
            proc.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while await version(s) != "2":
                assert time.monotonic() < deadline, proc.log()[-2000:]
                await asyncio.sleep(0.05)
            while "INFO gateway: config reload applied" not in proc.log():  # the new log format
                assert time.monotonic() < deadline, proc.log()[-2000:]
                await asyncio.sleep(0.05)
            path.write_text(path.read_text().replace("plugins:", "plugins:\n- name: no_such_plugin"))
            proc.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "config reload rejected" not in proc.log():
                assert time.monotonic() < deadline, proc.log()[-2000:]
                await asyncio.sleep(0.05)
            assert await version(s) == "2"
            assert "no_such_plugin" in proc.log()
        assert proc.proc is not None and proc.proc.poll() is None  # still running
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        proc.stop()


async def test_start_fails_cleanly_on_bad_config(tmp_path: Path, upstream: Any) -> None:
    path = write_config(tmp_path / "gateway.yaml", textwrap.dedent(f"""\
        admin: {{enabled: false}}
        upstream:
          url: {upstream.url}
          timeouts: {{idle: -1}}
        """))
    import subprocess

    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "serve", "-c", str(path)],
                                capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "upstream.timeouts.idle -> line 4: Input should be greater than 0" in r.stderr
    assert "Traceback" not in r.stderr


class LifeRec:
    events: list[str] = []


def _register_liferec() -> None:
    from gateway.plugin import Plugin, registry

    class _Rec(Plugin):
        name = "t_lifecycle_rec"

        async def on_complete(self, ctx: Any) -> None:
            LifeRec.events.append(f"complete {ctx.outcome}")

        async def shutdown(self) -> None:
            LifeRec.events.append("shutdown")

    registry.register(_Rec)


_register_liferec()


async def test_shutdown_timeout_bounds_the_drain(make_gateway: Any) -> None:
    """A stream longer than shutdown_timeout is cut once that time is up (not twice that: aiohttp's
    own drain would wait, cancel the request body, and wait again); the plugins still complete
    (seeing it cut by the shutdown, not by its client) and shut down."""
    LifeRec.events.clear()
    g = await make_gateway([{"name": "t_lifecycle_rec"}], server={"shutdown_timeout": 3})
    async with aiohttp.ClientSession(timeout=T) as s:
        r, got, t0, stopping = await stream_then_stop(g, s, CHAT)
        await asyncio.sleep(0.5)
        async with s.get(g.admin_url + "/readyz") as rr:  # draining: a load balancer must move on
            assert rr.status == 503 and (await rr.json())["status"] == "not_ready"
        await stopping
        assert time.monotonic() - t0 < 5  # about 3.5 s; twice the timeout would be over 6
        try:
            got += await r.read()
        except aiohttp.ClientPayloadError:
            pass
        r.close()
    assert b"[DONE]" not in got  # cut well before the 200 words
    assert LifeRec.events == ["complete gateway_shutdown", "shutdown"]


def _register_failstart() -> None:
    from pydantic import Field

    from gateway.plugin import Plugin, PluginConfig, registry

    class FailConfig(PluginConfig):
        fail: bool = Field(False, description="Raise in startup.")
        hang: bool = Field(False, description="Never finish startup.")

    class _FailStart(Plugin):
        name = "t_lifecycle_failstart"
        Config = FailConfig

        async def startup(self) -> None:
            if self.config.fail:
                raise RuntimeError("cannot start on purpose")
            if self.config.hang:
                await asyncio.Event().wait()  # (a connect to a server that never answers)
            LifeRec.events.append("failstart started")

        async def shutdown(self) -> None:
            LifeRec.events.append("failstart shutdown")

    registry.register(_FailStart)


_register_failstart()


async def test_a_plugin_whose_startup_never_finishes_fails_the_reload_and_the_start(
        make_gateway: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """A plugin's startup() that hung held the reload's answer, and every reload after it, for
    ever. It is cut off: the reload fails naming the plugin, the running chain keeps serving,
    the next reload works; a start with such a plugin fails instead of hanging."""
    import gateway.runtime

    monkeypatch.setattr(gateway.runtime, "PLUGIN_STARTUP_TIMEOUT", 0.5, raising=False)
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Version": "1"}}},
                            {"name": "t_lifecycle_failstart"}])
    path = Path(g.gw.cfg.path)
    async with aiohttp.ClientSession(timeout=T) as s:
        _edit(path, lambda c: (c["plugins"][1].update({"config": {"hang": True}}),
                               c["plugins"][0]["config"]["response"].update({"X-Version": "2"})))
        async with asyncio.timeout(20):
            async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
                assert r.status == 400
                msg = (await r.json())["error"]["message"]
        assert "plugin t_lifecycle_failstart failed to start" in msg and "within 0.5s" in msg, msg
        async with s.get(g.url + "/v1/models") as r:
            assert r.status == 200 and r.headers["X-Version"] == "1"
        _edit(path, lambda c: c["plugins"][1].update({"config": {"hang": False}}))
        async with asyncio.timeout(20):
            async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
                assert r.status == 200, await r.text()
        async with s.get(g.url + "/v1/models") as r:
            assert r.headers["X-Version"] == "2"
    _edit(path, lambda c: c["plugins"][1].update({"config": {"hang": True}}))
    from gateway.app import Gateway
    from gateway.config import load_config

    gw = Gateway(load_config(path))
    try:
        with pytest.raises(gateway.runtime.PluginStartupTimeout, match="within 0.5s") as e:
            async with asyncio.timeout(20):
                await gw.start()
        assert e.value.gateway_plugin == "t_lifecycle_failstart"  # (named by `gateway serve`'s error)
    finally:
        if gw.upstream is not None:
            await gw.upstream.close()


async def test_reload_applies_server_settings_and_upstream_url(make_gateway: Any, upstream: Any) -> None:
    """Body limit, proxied paths, Server-Timing and the upstream's URL change by reload, on a
    connection that stays open."""
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-A": "1"}}}])
    path = Path(g.gw.cfg.path)
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}
    async with aiohttp.ClientSession(timeout=T) as s:
        async def call(p: str = "/v1/chat/completions", body: Any = big) -> aiohttp.ClientResponse:
            async with s.post(g.url + p, json=body) as r:
                await r.read()
                return r

        r = await call()
        assert r.status == 200 and "Server-Timing" not in r.headers
        _edit(path, lambda c: c["server"].update({"max_body_size": 1000, "paths": ["/v1/chat/"],
                                                  "server_timing": True}))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as rr:
            assert rr.status == 200, await rr.text()
        assert (await call()).status == 413
        r = await call(body={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status == 200 and "headers;dur=" in r.headers["Server-Timing"]
        assert (await call("/v1/embeddings", {"model": "e", "input": "x"})).status == 404
        n = len(upstream.requests)
        _edit(path, lambda c: c["upstream"].update({"url": f"http://127.0.0.1:{free_port()}"}))  # nobody there
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as rr:
            assert rr.status == 200, await rr.text()
        assert (await call(body={"model": "m", "messages": [{"role": "user", "content": "hi"}]})).status == 502
        assert len(upstream.requests) == n
        _edit(path, lambda c: c["upstream"].update({"url": upstream.url}))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as rr:
            assert rr.status == 200, await rr.text()
        assert (await call(body={"model": "m", "messages": [{"role": "user", "content": "hi"}]})).status == 200
        assert len(upstream.requests) == n + 1


async def test_rejected_reload_leaves_shared_settings_alone(make_gateway: Any, upstream: Any, tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    """Writer queues (audit, conversations) and metric buckets are shared across reloads: a reload
    that is rejected after the new instances started does not change them; one that succeeds does."""
    from gateway.plugins.headers import Headers

    def plugins(small: bool) -> list[dict[str, Any]]:
        q = {"queue_size": 3, "on_full": "drop"} if small else {}
        cq = {"queue_size": 3, "on_queue_full": "drop"} if small else {}
        return [{"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(tmp_path / "a.jsonl")}], **q}},
                {"name": "conversations", "config": cq},
                {"name": "metrics", "config": {"latency_buckets": [0.5, 60]} if small else {}},
                {"name": "headers"}]

    g = await make_gateway(plugins(False))
    audit_w = g.plugin("audit").sinks[0][1]
    conv = g.plugin("conversations").shared

    def state() -> tuple[Any, ...]:
        return (audit_w.max_queue, audit_w.on_full, conv.writer.max_queue, conv.writer.on_full,
                conv.cfg.queue_size, g.plugin("metrics").m.duration.bounds[:2])

    before = state()
    assert before[:5] == (10000, "wait", 10000, "wait", 10000)
    write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, plugins(True)))

    async def broken(self: Any) -> None:
        raise RuntimeError("cannot start")

    monkeypatch.setattr(Headers, "startup", broken)  # the last plugin: the others already started
    ok, detail = await g.gw.reload(actor="test")
    assert not ok and "cannot start" in detail
    assert state() == before
    monkeypatch.undo()
    ok, detail = await g.gw.reload(actor="test")
    assert ok, detail
    assert state() == (3, "drop", 3, "drop", 3, (0.5, 60.0))


async def test_reload_applies_upstream_settings_and_survives_a_failing_plugin(make_gateway: Any, upstream: Any) -> None:
    LifeRec.events.clear()
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Version": "1"}}},
                            {"name": "t_lifecycle_failstart"}],
                           upstream={"headers": {"X-Upstream-Key": "one"}})
    path = Path(g.gw.cfg.path)

    def timeouts_and_key(c: dict[str, Any]) -> None:
        c["upstream"]["timeouts"]["first_byte"] = 0.8
        c["upstream"]["headers"] = {"X-Upstream-Key": "two"}

    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models", headers={"X-Demo-Head-Delay": "1.6"}) as r:
            assert r.status == 200
        assert upstream.requests[-1]["headers"]["X-Upstream-Key"] == "one"
        _edit(path, timeouts_and_key)
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 200
        async with s.get(g.url + "/v1/models", headers={"X-Demo-Head-Delay": "1.6"}) as r:
            assert r.status == 504  # the new first_byte applies
        async with s.get(g.url + "/v1/models") as r:
            assert r.status == 200
        assert upstream.requests[-1]["headers"]["X-Upstream-Key"] == "two"
        # A plugin that fails to start makes the reload fail as a whole; the running chain stays.
        before = g.gw.runtime
        _edit(path, lambda c: (c["plugins"][1].update({"config": {"fail": True}}),
                               c["plugins"][0]["config"]["response"].update({"X-Version": "3"})))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 400
            msg = (await r.json())["error"]["message"]
            assert "failed to start" in msg and "cannot start on purpose" in msg
        assert g.gw.runtime is before
        async with s.get(g.url + "/v1/models") as r:
            assert r.headers["X-Version"] == "1"
    # the reload's instances that did start were shut down again; the running one is still up
    assert LifeRec.events.count("failstart started") == 2
    assert LifeRec.events.count("failstart shutdown") == 1  # the one replaced by the first reload


async def test_start_fails_cleanly_when_port_busy(tmp_path: Path, upstream: Any) -> None:
    import subprocess

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = base_config(upstream.url, tmp_path, [{"name": "t_lifecycle_marker"}], server={"port": port})
        path = write_config(tmp_path / "gateway.yaml", cfg)
        (tmp_path / "marker_plugin.py").write_text(MARKER_PLUGIN)
        marks = tmp_path / "marks.txt"
        code = "import marker_plugin, sys; from gateway.cli import main; raise SystemExit(main(sys.argv[1:]))"
        r = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", code, "serve", "-c", str(path)], capture_output=True, text=True,
            timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path), "LIFECYCLE_MARKS": str(marks)})
    assert r.returncode == 1, r.stderr
    assert "address already in use" in r.stderr
    # (the port the kernel picked is in its range for outgoing connections: the hint says so)
    assert "ip_local_port_range" in r.stderr
    assert "Traceback" not in r.stderr and "Unclosed" not in r.stderr
    # the plugins that had started were shut down again
    assert marks.read_text().splitlines() == ["startup", "shutdown"]


async def test_a_failed_start_does_not_serve_for_drain_delay(tmp_path: Path, upstream: Any) -> None:
    """The public listener up, the admin port taken: the start fails, and the process exits
    without serving for server.drain_delay (never ready, it is in no load balancer)."""
    import subprocess

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port()))
        busy.listen()
        cfg = base_config(upstream.url, tmp_path, [], server={"port": free_port(), "drain_delay": 30},
                          admin={"port": busy.getsockname()[1]})
        path = write_config(tmp_path / "gateway.yaml", cfg)
        r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "serve", "-c", str(path)],
                                    capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "address already in use" in r.stderr and "ip_local_port_range" not in r.stderr
    assert "still serving" not in r.stderr, r.stderr


async def test_reload_adds_and_removes_a_plugins_admin_api(make_gateway: Any) -> None:
    """A plugin added by a reload brings its admin routes with it (no restart); removed, they go."""
    g = await make_gateway([{"name": "audit"}])
    path = Path(g.gw.cfg.path)
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.admin_url + "/keys", headers=AUTH) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "plugin_not_configured"
        async with s.get(g.admin_url + "/audit", headers=AUTH) as r:
            assert r.status == 200
        _edit(path, lambda c: c["plugins"].insert(0, {"name": "key_auth"}))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 200, await r.text()
        async with s.post(g.admin_url + "/keys", headers=AUTH, json={"name": "n", "owner": "o"}) as r:
            assert r.status == 201, await r.text()
            key = (await r.json())["key"]
        async with s.post(g.url + "/v1/chat/completions", json=CHAT,
                          headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
        async with s.get(g.admin_url + "/openapi.json", headers=AUTH) as r:
            assert "/keys" in (await r.json())["paths"]
        async with s.get(g.admin_url + "/keys", headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 401  # a client key is never an admin credential
        _edit(path, lambda c: c["plugins"].pop(0))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 200
        async with s.get(g.admin_url + "/keys", headers=AUTH) as r:
            assert r.status == 404


async def test_shutdown_drains_requests_that_began_before_a_reload(make_gateway: Any) -> None:
    """A stream that began before a reload is counted on the chain it began with: a shutdown right
    after the reload still lets it finish within shutdown_timeout, and a reload asked for during
    the shutdown is refused."""
    g = await make_gateway([{"name": "headers"}], server={"shutdown_timeout": 10})
    async with aiohttp.ClientSession(timeout=T) as s:
        r = await s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"X-Demo-Delay": "0.1", "X-Demo-Words": "15"})
        first = await r.content.readuntil(b"\n\n")
        ok, detail = await g.gw.reload(actor="test")
        assert ok, detail
        # one more whose answer begins during the shutdown: it tells the client to reconnect elsewhere
        late = asyncio.create_task(s.post(g.url + "/v1/chat/completions", json=CHAT,
                                          headers={"X-Demo-Head-Delay": "0.5"}))
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(g.stop())
        await asyncio.sleep(0.05)
        assert (await g.gw.reload(actor="test")) == (False, "the gateway is shutting down")
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as rr:
            # not the config's fault: 503, not the 400 of a config refused
            assert rr.status == 503 and (await rr.json())["error"]["code"] == "shutting_down"
        rest = await r.read()  # not cut: it ends with its [DONE]
        r2 = await late
        assert r2.status == 200 and r2.headers.get("Connection", "").lower() == "close"
        await r2.read()
        await stopping
    assert b"[DONE]" in first + rest
