"""Test helpers: free ports, config files, a gateway on a real socket (in-process or as a
subprocess), and private Redis / PostgreSQL servers on loopback."""
from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


#: Ports free_port hands out: below the kernel's ephemeral range (32768 and up on Linux), which
#: outgoing connections take theirs from (a port the kernel picked for a listener, closed, then
#: given to a client socket elsewhere before the server bound it: "address already in use"), and
#: a range of its own for each parallel test worker (PYTEST_XDIST_WORKER gw0, gw1 ...).
_PORT_SPAN = 3000
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
_PORT_BASE = 20000 + (int(_worker[2:]) % 4 if _worker[2:].isdigit() else 0) * _PORT_SPAN
_next_port = [_PORT_BASE + os.getpid() % _PORT_SPAN]


def free_port() -> int:
    """A loopback port nothing listens on now, not one the kernel hands to outgoing connections."""
    for _ in range(_PORT_SPAN):
        port = _next_port[0]
        _next_port[0] = _PORT_BASE + (port - _PORT_BASE + 1) % _PORT_SPAN
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # (all taken: any free one)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(check: Any, timeout: float = 10.0, every: float = 0.05, what: str = "the condition") -> Any:
    """Call ``check`` (a function, or a coroutine function) until it returns something true, and
    return that; AssertionError after ``timeout`` seconds. Exceptions from ``check`` count as not yet
    (a server still starting refuses connections)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if asyncio.iscoroutine(got):
                got = await got
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(every)


def base_config(upstream_url: str, tmp: Path, plugins: list[dict[str, Any]] | None = None, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout": 5},
        "admin": {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN},
        "upstream": {"url": upstream_url, "timeouts": {"connect": 2, "first_byte": 10, "idle": 10}},
        "database": {"url": f"sqlite+aiosqlite:///{tmp / 'gateway.db'}"},
        "logging": {"level": "INFO", "format": "json"},
        "plugins": plugins or [],
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def write_config(path: Path, cfg: dict[str, Any] | str) -> Path:
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


class RunningGateway:
    """A gateway started in this process (same event loop as the test)."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.url = f"http://127.0.0.1:{gw.public_port}"
        self.admin_url = f"http://127.0.0.1:{gw.admin_port}" if gw.admin_port else None
        self.stopped = False

    @property
    def services(self) -> Any:
        return self.gw.services

    def plugin(self, name: str) -> Any:
        return self.gw.runtime.by_name[name]

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.gw.stop()


async def start_gateway(config_path: Path) -> RunningGateway:
    from gateway.app import Gateway
    from gateway.config import load_config

    cfg = load_config(config_path)
    gw = Gateway(cfg)
    await gw.start()
    return RunningGateway(gw)


class GatewayProcess:
    """``gateway serve`` as a real subprocess (for SIGTERM and multi-instance tests)."""

    def __init__(self, config_path: Path, port: int, admin_port: int | None, env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.admin_port = admin_port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}" if admin_port else None
        self.log_path = log_path or config_path.with_suffix(f".{port}.log")
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "GatewayProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    async def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the gateway answers. Start-up speed is not what these tests check: the bound only
        stops a test that would otherwise hang (a busy CI machine can take half a minute to import)."""
        started = time.monotonic()
        deadline = started + timeout
        url = (self.admin_url or self.url) + ("/healthz" if self.admin_url else "/")
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log()[-2000:]}")
                try:
                    async with s.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status < 500 or not self.admin_url:
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(0.1)
        running = self.proc is not None and self.proc.poll() is None
        raise TimeoutError(f"gateway not ready after {time.monotonic() - started:.0f} s (process "
                           f"{'still running' if running else 'gone'}); its log: {self.log()[-2000:]!r}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_process(self.proc, 15)
        with contextlib.suppress(Exception):
            self._log.close()


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float, resume: bool = False) -> None:
    """SIGTERM (after SIGCONT, for one that may be frozen), then SIGKILL if it is still there
    after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    if resume:
        proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- Redis ----------------------------------------------------------------------------------------
class RedisServer:
    def __init__(self, port: int, dir_: Path) -> None:
        self.port = port
        self.dir = dir_
        self.url = f"redis://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        assert exe
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        stop_process(self.proc, 5, resume=True)


def have_redis() -> bool:
    return shutil.which("redis-server") is not None


# -- PostgreSQL -----------------------------------------------------------------------------------
class PostgresCluster:
    """A private PostgreSQL cluster in a temp dir (run as the ``postgres`` user when we are root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")

    @staticmethod
    def bindir() -> str | None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if found:
            return os.path.dirname(found[-1])
        exe = shutil.which("initdb")
        return os.path.dirname(exe) if exe else None

    def _run(self, args: list[str]) -> None:
        if os.geteuid() == 0:
            args = ["runuser", "-u", "postgres", "--"] + args
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> "PostgresCluster":
        b = self.bindir()
        assert b
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        self._run([f"{b}/initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"])
        self._run([f"{b}/pg_ctl", "-D", str(data), "-l", str(self.dir / "log"), "-w", "-t", "30",
                   "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                         f"-c max_connections=200", "start"])
        return self

    def stop(self) -> None:
        b = self.bindir()
        with contextlib.suppress(Exception):
            self._run([f"{b}/pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


#: Databases create_pg_database made on a server the tests did not start ($GATEWAY_TEST_PG_DSN):
#: dropped at the end of the session (conftest's pg_cluster).
PG_DATABASES: list[str] = []


async def create_pg_database(admin_dsn: str, name: str) -> str:
    """Create a fresh database; returns its SQLAlchemy URL."""
    import asyncpg

    PG_DATABASES.append(name)

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    rest = admin_dsn.split("://", 1)[1].rsplit("/", 1)[0]
    return f"postgresql+asyncpg://{rest}/{name}"


def open_idle_sockets(port: int, n: int) -> list[socket.socket]:
    """``n`` client sockets connecting (non-blocking) to 127.0.0.1:``port`` and left idle."""
    out = []
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        out.append(c)
    return out


async def clear_of_a_minute_boundary(margin: float = 15.0) -> None:
    """Wait, if a new UTC minute is less than ``margin`` seconds away, until it has begun: the
    sliding window's counters are per UTC minute (of a per-minute rule), and a test that compares
    exact figures across several requests must not straddle two minutes (the earlier minute's
    count is weighed less in the later one)."""
    left = 60 - time.time() % 60
    if left < margin:
        await asyncio.sleep(left + 0.05)


async def serve_handler(handler: Any) -> tuple[Any, str]:
    """A small aiohttp app answering every path with ``handler``, on a free port: (runner, url)."""
    from aiohttp import web

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def port_refuses(port: int) -> bool:
    """Does 127.0.0.1:``port`` refuse connections (the listener closed)? (Any other failure: no.)"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


async def recorded_usage_and_audit(g: Any, s: Any, key_id: str) -> Any:
    """The key's usage totals and the audit's request events once both hold the request (None
    until then: poll it with ``until``)."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    await g.plugin("key_auth").flush_usage()
    async with s.get(g.admin_url + f"/keys/{key_id}/usage", headers=admin) as r:
        totals = (await r.json())["totals"]
    async with s.get(g.admin_url + "/audit?type=request", headers=admin) as r:
        events = (await r.json())["data"]
    return (totals, events) if totals["requests"] and events else None


async def stream_then_stop(g: Any, s: Any, chat: dict[str, Any]) -> tuple[Any, bytes, float, Any]:
    """Start a long demo stream (200 words, one each 0.2 s), read its first event, then begin
    stopping the gateway: (the response, that event, when the stop began, the stop's task)."""
    r = await s.post(g.url + "/v1/chat/completions", json={**chat, "stream": True},
                     headers={"X-Demo-Delay": "0.2", "X-Demo-Words": "200"})
    got = await r.content.readuntil(b"\n\n")
    return r, got, time.monotonic(), asyncio.create_task(g.stop())


async def after_continue(port: int, head: bytes, body: bytes) -> bytes:
    """Send a request head asking ``Expect: 100-continue`` (with ``Connection: close``), wait for
    the ``100 Continue``, send the body and return everything after it up to the close."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(head)
        await w.drain()
        async with asyncio.timeout(5):
            assert await r.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.write(body)
        await w.drain()
        async with asyncio.timeout(10):
            return await r.read()
    finally:
        w.close()
