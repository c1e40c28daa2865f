"""Config reloads at their edges: what a reload reads, what it refuses, and what it records."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .helpers import ADMIN_TOKEN, GatewayProcess, base_config, free_port, serve_handler, write_config

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
T = aiohttp.ClientTimeout(total=30)
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


def _edit(path: Path, fn: Any) -> None:
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


async def _held(s: aiohttp.ClientSession, g: Any, body: Any) -> "asyncio.Task[Any]":
    """A chat request whose body is still arriving, once the gateway holds it (its chain picked)."""
    slow = asyncio.create_task(s.post(g.url + "/v1/chat/completions", data=body,
                                      headers={"Content-Type": "application/json"}))
    for _ in range(200):
        if g.gw.runtime.inflight:
            break
        await asyncio.sleep(0.01)
    assert g.gw.runtime.inflight == 1
    return slow


async def _across_reload(s: aiohttp.ClientSession, g: Any, head: bytes, edit: Any) -> Any:
    """A chat request whose body starts with ``head`` and is held until the config is edited
    (``edit``) and reloaded; its response once the rest of the body arrived after the reload."""
    gate = asyncio.Event()

    async def body() -> Any:
        yield head
        await gate.wait()
        yield b'"messages": []}'

    slow = await _held(s, g, body())
    _edit(Path(g.gw.cfg.path), edit)
    assert (await _reload(s, g.admin_url))[0] == 200
    gate.set()
    return await slow


async def _reload(s: aiohttp.ClientSession, admin_url: str) -> tuple[int, Any]:
    async with s.post(admin_url + "/config/reload", headers=AUTH) as r:
        return r.status, await r.json()


async def test_reload_to_new_upstream_headers_strips_the_client_key(make_gateway: Any, upstream: Any) -> None:
    """key_auth keeps a client's key header away from the upstream unless the upstream config sets
    that header itself. A reload that changes upstream.headers must apply to that decision too:
    the client's gateway key must never reach the backend."""
    g = await make_gateway([{"name": "key_auth", "config": {"headers": ["Authorization", "api-key"]}}],
                           upstream={"url": upstream.url, "headers": {"api-key": "upstream-secret"}})
    path = Path(g.gw.cfg.path)
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=AUTH) as r:
            key = (await r.json())["key"]
        _edit(path, lambda c: c["upstream"].update({"headers": {"Authorization": "Bearer upstream-secret"}}))
        status, body = await _reload(s, g.admin_url)
        assert status == 200, body
        async with s.post(g.url + "/v1/echo", json={}, headers={"api-key": key}) as r:
            assert r.status == 200, await r.text()
    sent = upstream.requests[-1]["headers"]
    assert key not in sent.values(), sent
    assert "api-key" not in {k.lower() for k in sent}
    assert sent["Authorization"] == "Bearer upstream-secret"


async def test_reload_follows_a_symlinked_config(make_gateway: Any, tmp_path: Path) -> None:
    """A config reached through a symlink (a release "current" link, a Kubernetes ConfigMap's
    ..data link) is re-read through the link: a reload after the link moved reads the new target."""
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Version": "1"}}}])
    real = Path(g.gw.cfg.path)
    rel1, rel2 = tmp_path / "rel1", tmp_path / "rel2"
    rel1.mkdir()
    rel2.mkdir()
    (rel1 / "gateway.yaml").write_text(real.read_text())
    (rel2 / "gateway.yaml").write_text(real.read_text().replace("X-Version: '1'", "X-Version: '2'"))
    current = tmp_path / "current"
    current.symlink_to(rel1)
    from gateway.config.loader import load_config

    g.gw.cfg = load_config(current / "gateway.yaml")  # as if started with -c current/gateway.yaml
    assert g.gw.cfg.path == str(current / "gateway.yaml")
    tmp_link = tmp_path / "current.new"
    tmp_link.symlink_to(rel2)
    os.replace(tmp_link, current)  # ln -sfn rel2 current
    async with aiohttp.ClientSession(timeout=T) as s:
        status, body = await _reload(s, g.admin_url)
        assert status == 200, body
        async with s.get(g.url + "/v1/models") as r:
            assert r.headers.get("X-Version") == "2"


async def test_a_reload_reading_a_half_written_file_waits_for_the_whole(make_gateway: Any, caplog: Any) -> None:
    """The file is written in place (truncated, then written) while the reload reads it: the part
    before ``plugins:`` is a valid config with no plugins. The reload reads it again once it has
    stopped changing, so key_auth stays; taking key_auth out on purpose is applied and logged as
    a warning."""
    g = await make_gateway([{"name": "key_auth"}])
    path = Path(g.gw.cfg.path)
    whole = path.read_text()
    half = whole[:whole.index("plugins:")]
    path.write_text(half)  # (truncated and half written when the reload begins)
    reload = asyncio.create_task(g.gw.reload())
    await asyncio.sleep(0.05)
    path.write_text(whole)
    ok, detail = await reload
    assert ok and detail.startswith("1 plugin(s)"), detail
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 401
        path.write_text(half)
        with caplog.at_level("WARNING", logger="gateway"):
            ok, detail = await g.gw.reload()
        assert ok and detail.startswith("0 plugin(s)"), detail
        assert "config reload removes the plugin(s) key_auth" in caplog.text
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
    # the same with key_auth listed but turned off (enabled: false)
    path.write_text(whole)
    assert (await g.gw.reload())[0]
    caplog.clear()
    path.write_text(whole.replace("- name: key_auth", "- name: key_auth\n  enabled: false"))
    with caplog.at_level("WARNING", logger="gateway"):
        ok, detail = await g.gw.reload()
    assert ok and "config reload removes the plugin(s) key_auth" in caplog.text, (detail, caplog.text)
    # a half-written file that is not even valid YAML is waited for as well, not refused at once
    path.write_text(whole)
    assert (await g.gw.reload())[0]
    path.write_text(whole + "x-broken: [unclosed\n")
    reload = asyncio.create_task(g.gw.reload())
    await asyncio.sleep(0.05)
    path.write_text(whole)
    ok, detail = await reload
    assert ok and detail.startswith("1 plugin(s)"), detail


async def test_a_reload_of_a_file_that_keeps_changing_is_refused(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "key_auth"}])
    path = Path(g.gw.cfg.path)
    whole = path.read_text()
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            path.write_text(whole + f"# {n}\n")
            await asyncio.sleep(0.02)

    task = asyncio.create_task(writer())
    try:
        ok, detail = await g.gw.reload()
    finally:
        stop.set()
        await task
    assert not ok and "the file kept changing while it was read" in detail, detail
    assert [p.name for p in g.gw.cfg.plugins] == ["key_auth"]


async def test_reload_refuses_a_fifo_and_does_not_hang(make_gateway: Any) -> None:
    """A config path that is not a regular file (a FIFO nobody writes) would block the read, the
    reload lock and a shutdown behind it: it is refused at once, and the running config stays."""
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Version": "1"}}}])
    path = Path(g.gw.cfg.path)
    path.unlink()
    os.mkfifo(path)
    async with aiohttp.ClientSession(timeout=T) as s:
        status, body = await _reload(s, g.admin_url)
        assert status == 400
        assert "not a regular file" in body["error"]["message"]
        async with s.get(g.url + "/v1/models") as r:
            assert r.headers.get("X-Version") == "1"


def _reload_events(db: Path) -> list[str]:
    """result and plugin count of each recorded reload"""
    with sqlite3.connect(db) as c:
        return [f"{r[0]}: {r[1].split(',')[0]}" for r in c.execute(
            "SELECT json_extract(data, '$.result'), json_extract(data, '$.detail') FROM audit_events "
            "WHERE type = 'config.reloaded' ORDER BY seq")]


async def test_reload_that_removes_or_disables_audit_is_recorded(make_gateway: Any, tmp_path: Path) -> None:
    """Turning the audit trail off by reload leaves a trace in it: the instance it replaces records
    that reload. After that, nothing more is recorded (enabled: false means off)."""
    audit = {"name": "audit", "config": {"flush_interval": 0.05}}
    g = await make_gateway([{"name": "key_auth"}, audit])
    path = Path(g.gw.cfg.path)
    db = tmp_path / "gateway.db"
    async with aiohttp.ClientSession(timeout=T) as s:
        _edit(path, lambda c: c.update({"plugins": [{"name": "key_auth"}]}))
        assert (await _reload(s, g.admin_url))[0] == 200
        _edit(path, lambda c: c.update({"plugins": [{"name": "key_auth"}, audit]}))
        assert (await _reload(s, g.admin_url))[0] == 200
        _edit(path, lambda c: c["plugins"][1].update({"enabled": False}))
        assert (await _reload(s, g.admin_url))[0] == 200
        # Off: neither this reload nor an admin action is recorded.
        _edit(path, lambda c: c["plugins"][1]["config"].update({"batch_size": 7}))
        assert (await _reload(s, g.admin_url))[0] == 200
        async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=AUTH) as r:
            assert r.status == 201, await r.text()
    deadline = time.monotonic() + 10
    while len(_reload_events(db)) < 3:
        assert time.monotonic() < deadline, _reload_events(db)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert _reload_events(db) == ["success: 1 plugin(s)", "success: 2 plugin(s)", "success: 2 plugin(s)"]
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM audit_events WHERE type LIKE 'key.%'").fetchone()[0] == 0


async def test_reload_adding_limits_on_an_unreachable_store_is_refused(make_gateway: Any) -> None:
    """Adding rate limits whose Redis cannot be reached would leave them silently not applying
    (on_store_error: allow): the reload is refused and says why."""
    g = await make_gateway([])
    path = Path(g.gw.cfg.path)
    dead = f"redis://:pw@127.0.0.1:{free_port()}/0"
    _edit(path, lambda c: c.update({"plugins": [{"name": "rate_limit", "config": {
        "storage": dead, "storage_timeout": 0.3, "rules": [{"name": "r", "limit": "2/minute", "key_by": ["ip"]}]}}]}))
    async with aiohttp.ClientSession(timeout=T) as s:
        status, body = await _reload(s, g.admin_url)
        assert status == 400, body
        msg = body["error"]["message"]
        assert "cannot be used" in msg and ":pw@" not in msg
        assert "rate_limit" not in g.gw.runtime.by_name


async def test_sighup_right_after_start_does_not_kill(tmp_path: Path, upstream: Any) -> None:
    """A SIGHUP sent while the gateway is still starting (a deploy tool reloading at once) is
    applied once start-up is done instead of killing the process (its default action)."""
    port, admin_port = free_port(), free_port()
    cfg = base_config(upstream.url, tmp_path, [{"name": "headers", "config": {"response": {"X-Version": "1"}}}],
                      server={"port": port}, admin={"port": admin_port})
    path = write_config(tmp_path / "gateway.yaml", cfg)
    proc = GatewayProcess(path, port, admin_port).start()
    try:
        # As soon as the interpreter has started the gateway's code: poll its log for the first line.
        _edit(path, lambda c: c["plugins"][0]["config"]["response"].update({"X-Version": "2"}))
        deadline = time.monotonic() + 20
        while "gateway starting" not in proc.log() and "gateway listening" not in proc.log():
            assert proc.proc is not None and proc.proc.poll() is None, proc.log()[-2000:]
            assert time.monotonic() < deadline, proc.log()[-2000:]
            await asyncio.sleep(0.005)
        proc.signal(signal.SIGHUP)
        await proc.wait_ready()
        await _serves_version(proc, "2")
        assert proc.proc is not None and proc.proc.poll() is None
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        proc.stop()


async def _serves_version(proc: GatewayProcess, version: str) -> None:
    """Until the gateway's answers carry ``X-Version: version`` (the reload applied), 10 s at most."""
    async with aiohttp.ClientSession(timeout=T) as s:
        deadline = time.monotonic() + 10
        while True:
            async with s.get(proc.url + "/v1/models") as r:
                if r.headers.get("X-Version") == version:
                    return
            assert time.monotonic() < deadline, proc.log()[-2000:]
            await asyncio.sleep(0.05)


async def _handles(proc: GatewayProcess, sig: int) -> bool:
    """Until the process has a handler for ``sig`` (its SigCgt mask): the first thing the gateway
    command does (a signal before the interpreter gets there at all cannot be handled). True if it
    was seen before the gateway's code was imported (aiohttp's extension modules not loaded yet)."""
    assert proc.proc is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{proc.proc.pid}/status").read_text()
            caught = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
            if caught >> (sig - 1) & 1:
                return "/aiohttp/" not in Path(f"/proc/{proc.proc.pid}/maps").read_text()
        await asyncio.sleep(0.001)
    raise AssertionError("no handler for the signal after 10 s")


async def _caught_early(path: Path, port: int, admin_port: int, sig: int) -> GatewayProcess:
    """A gateway process seen handling ``sig`` while still importing its code. (A busy machine can
    delay the poll past the imports: then another process is started, three at most.)"""
    for _ in range(3):
        proc = GatewayProcess(path, port, admin_port).start()
        try:
            if await _handles(proc, sig):
                return proc
        except BaseException:
            proc.stop()
            raise
        proc.stop()
    raise AssertionError("the handler came only once the gateway's code was imported (three starts)")


async def test_a_signal_during_the_imports_neither_kills_nor_is_lost(tmp_path: Path, upstream: Any) -> None:
    """Sent at once after exec, before the gateway's code has even been imported: a SIGHUP is
    applied once the gateway is up (it used to kill it: exit 129, no log line); a SIGTERM ends it
    with exit 0 (as PID 1 in a container, where an unhandled SIGTERM does nothing, it was lost)."""
    port, admin_port = free_port(), free_port()
    cfg = base_config(upstream.url, tmp_path, [{"name": "headers", "config": {"response": {"X-Version": "1"}}}],
                      server={"port": port}, admin={"port": admin_port})
    path = write_config(tmp_path / "gateway.yaml", cfg)
    proc = await _caught_early(path, port, admin_port, signal.SIGHUP)
    try:
        _edit(path, lambda c: c["plugins"][0]["config"]["response"].update({"X-Version": "2"}))
        proc.signal(signal.SIGHUP)
        await proc.wait_ready()
        await _serves_version(proc, "2")
    finally:
        proc.stop()
    proc = await _caught_early(path, port, admin_port, signal.SIGTERM)
    try:
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0, proc.log()[-2000:]
    finally:
        proc.stop()


async def test_a_stop_ends_a_start_blocked_reading_its_config() -> None:
    """`gateway serve -c /dev/fd/N` whose writer has not written yet (a secrets pipe, a process
    substitution): SIGTERM ends it, exit 0 (the signals noted during the imports must not keep it
    waiting for a config that may never come)."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", f"/dev/fd/{r}"], pass_fds=(r,),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.close(r)
    try:
        deadline = time.monotonic() + 30
        while "/aiohttp/" not in Path(f"/proc/{proc.pid}/maps").read_text():  # (past the imports, reading)
            assert proc.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        os.close(w)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_stream_outliving_shutdown_timeout_is_recorded_after_its_plugin_is_removed(
        make_gateway: Any, tmp_path: Path) -> None:
    """A reload that removes conversations while a stream runs longer than server.shutdown_timeout:
    the old chain keeps serving that stream to its end, and its turn is stored."""
    g = await make_gateway([{"name": "conversations", "config": {"flush_interval": 0.05}}],
                           server={"shutdown_timeout": 0.5})
    path = Path(g.gw.cfg.path)
    async with aiohttp.ClientSession(timeout=T) as s:
        r = await s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"X-Demo-Delay": "0.1", "X-Demo-Words": "15"})
        assert r.status == 200
        cid = r.headers["X-Conversation-ID"]
        _edit(path, lambda c: c.update({"plugins": []}))
        assert (await _reload(s, g.admin_url))[0] == 200
        text = (await r.read()).decode()
        r.close()
        assert text.endswith("data: [DONE]\n\n")
    deadline = time.monotonic() + 10
    while True:
        with sqlite3.connect(tmp_path / "gateway.db") as c:
            roles = [row[0] for row in c.execute(
                "SELECT role FROM conversation_messages WHERE conversation_id = ? ORDER BY position", (cid,))]
        if roles == ["user", "assistant"]:
            break
        assert time.monotonic() < deadline, roles
        await asyncio.sleep(0.05)


async def test_conversations_readded_while_its_last_instance_closes_gets_a_live_writer(make_gateway: Any) -> None:
    """A reload that adds `conversations` back while the instance of the config without it is
    still closing the shared writer (its last request had just ended): the new instance must not
    join the closing writer, or every turn it records is dropped ("closed") until all instances go."""
    from gateway.plugins.conversations import Conversations
    from gateway.plugins.conversations.state import Shared

    g = await make_gateway([{"name": "conversations"}])
    running = g.plugin("conversations")
    shared = running.shared
    old = Conversations(running.config, g.services)
    await old.startup()
    await running.shutdown()  # the running instance leaves; `old` is the last user
    closing = asyncio.create_task(old.shutdown())
    await asyncio.sleep(0)  # inside close(), awaiting the retention task's end
    new = Conversations(running.config, g.services)
    await new.startup()
    await closing
    assert Shared.get(g.services) is shared and new.shared is shared
    assert not shared.closed and shared._task is not None
    # the gateway's chain records through the shared writer: the turn is written, nothing dropped
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200, await r.text()
    await new.flush()
    assert (shared.writer.written, shared.writer.dropped) == (1, 0)
    await new.shutdown()


async def test_request_begun_before_a_reload_goes_to_its_configs_upstream(make_gateway: Any) -> None:
    """A request whose chain was picked before a reload (here: its body still arriving) is sent to
    the upstream of that config, with that config's upstream headers, not the new config's: the
    chain that authorised and checked it belongs with where it goes."""
    from aiohttp import web

    seen: list[tuple[str, str | None]] = []

    async def start(name: str) -> tuple[web.AppRunner, str]:
        async def answer(request: web.Request) -> web.Response:
            seen.append((name, request.headers.get("X-Upstream-Token")))
            return web.json_response({"upstream": name})
        return await serve_handler(answer)

    (ra, url_a), (rb, url_b) = await start("a"), await start("b")
    try:
        g = await make_gateway([], upstream={"url": url_a, "headers": {"X-Upstream-Token": "for-a"}})
        async with aiohttp.ClientSession(timeout=T) as s:
            r = await _across_reload(s, g, b'{"model": "m", ', lambda c: c["upstream"].update(
                url=url_b, headers={"X-Upstream-Token": "for-b"}))
            assert r.status == 200 and await r.json() == {"upstream": "a"}
            async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r2:
                assert await r2.json() == {"upstream": "b"}
        assert seen == [("a", "for-a"), ("b", "for-b")]
    finally:
        await ra.cleanup()
        await rb.cleanup()


async def test_request_begun_before_a_reload_asks_usage_as_its_config_says(make_gateway: Any) -> None:
    """upstream.stream_usage is the request's config's too: a stream begun under a config that
    says its upstream takes no stream_options is not sent one because a reload meanwhile points
    at an upstream that does."""
    from aiohttp import web

    seen: list[tuple[str, bool]] = []

    async def start(name: str) -> tuple[web.AppRunner, str]:
        async def answer(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            seen.append((name, "stream_options" in body))
            r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await r.prepare(request)
            await r.write(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n')
            return r
        return await serve_handler(answer)

    (ra, url_a), (rb, url_b) = await start("a"), await start("b")
    try:
        g = await make_gateway([{"name": "metrics"}], upstream={"url": url_a, "stream_usage": False})
        async with aiohttp.ClientSession(timeout=T) as s:
            r = await _across_reload(s, g, b'{"model": "m", "stream": true, ', lambda c: c["upstream"].update(
                url=url_b, stream_usage=True))
            assert r.status == 200
            await r.read()
            async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r2:
                await r2.read()
        assert seen == [("a", False), ("b", True)]
    finally:
        await ra.cleanup()
        await rb.cleanup()
