"""The gateway behind a real nginx, the way teams deploy it: streamed answers arrive event by event
(not in one lump at the end) through a bare ``proxy_pass`` (HTTP/1.0 to the gateway) and through
gzip on text/event-stream, both with nginx's default proxy buffering; a proxy nobody listed in
trusted_proxies is named in the log."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from .helpers import IN_CI, free_port, stop_process, until
from .test_proxy import Fake, gateway_to, sse_arrivals

T = aiohttp.ClientTimeout(total=30)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


CONF = """
user root;
worker_processes 1;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  client_body_temp_path {dir}/cb; proxy_temp_path {dir}/px;
  fastcgi_temp_path {dir}/px; uwsgi_temp_path {dir}/px; scgi_temp_path {dir}/px;
  access_log off;
  # what many teams write first: proxy_pass alone (HTTP/1.0 to the gateway), buffering on
  server {{
    listen 127.0.0.1:{bare};
    location / {{ proxy_pass http://127.0.0.1:{gw}; }}
  }}
  # HTTP/1.1, buffering on, gzip for SSE too; TLS ended here, as nginx says to the gateway
  server {{
    listen 127.0.0.1:{gzip};
    gzip on; gzip_types text/event-stream application/json; gzip_min_length 1;
    location / {{
      proxy_pass http://127.0.0.1:{gw};
      proxy_http_version 1.1;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https;
      proxy_set_header X-Forwarded-Host api.example.test;
    }}
  }}
}}
"""


class Nginx:
    def __init__(self, tmp: Path, gateway_port: int) -> None:
        self.dir = tmp / f"nginx-{gateway_port}"
        self.dir.mkdir()
        self.bare, self.gzip = free_port(), free_port()
        (self.dir / "nginx.conf").write_text(CONF.format(dir=self.dir, bare=self.bare, gzip=self.gzip,
                                                         gw=gateway_port))
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> "Nginx":
        exe = nginx_binary()
        assert exe
        self.proc = subprocess.Popen([exe, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                      "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        async def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
                async with s.get(f"http://127.0.0.1:{self.gzip}/nginx-up") as r:
                    return r.status > 0

        await until(up, timeout=20, what="nginx listening")
        return self

    def stop(self) -> None:
        stop_process(self.proc, 10)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Any]:
    if nginx_binary() is None:
        if IN_CI:
            pytest.fail("nginx is not installed (.ci/run installs nginx-light)")
        pytest.skip("nginx not installed")
    started: list[Nginx] = []

    async def factory(gateway_port: int) -> Nginx:
        n = Nginx(tmp_path, gateway_port)
        started.append(n)
        return await n.start()

    yield factory
    for n in started:
        n.stop()


@pytest.fixture
async def fake() -> Any:
    f = await Fake().start()
    yield f
    await f.stop()


async def arrivals_through(url: str, fake: Any, n: int) -> list[float]:
    """Read a stream of n events (the upstream sends one every 0.4 s): when each one arrived."""
    fake.sends.clear()
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(url + f"/sse?n={n}&pause=0.4", headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status == 200
            assert "X-Accel-Buffering" not in r.headers  # (nginx takes it for itself)
            return await sse_arrivals(r)


async def test_streams_arrive_event_by_event_through_nginx_with_its_default_buffering(
        make_gateway: Any, nginx: Any, fake: Any) -> None:
    g = await gateway_to(make_gateway, fake.url, server={"trusted_proxies": ["127.0.0.1/32"]})
    port = int(g.url.rsplit(":", 1)[1])
    # the gateway says it to whoever is in front
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/sse?n=1&pause=0") as r:
            assert r.headers.get("X-Accel-Buffering") == "no"
            await r.read()
        async with s.get(g.url + "/hop") as r:
            assert "X-Accel-Buffering" not in r.headers  # not on a whole answer
    ng = await nginx(port)
    n = 4
    for front in (ng.bare, ng.gzip):
        arrived = await arrivals_through(f"http://127.0.0.1:{front}", fake, n)
        assert len(arrived) == n and len(fake.sends) == n
        for i in range(n - 1):
            # event i reached the client before the upstream even sent event i+1
            assert arrived[i] < fake.sends[i + 1], (front, i, arrived, fake.sends)


async def test_a_proxy_missing_from_trusted_proxies_is_named_in_the_log(
        make_gateway: Any, nginx: Any, fake: Any, caplog: Any, monkeypatch: Any) -> None:
    """Behind an nginx the config does not list, every client has nginx's address: said once.
    X-Forwarded-Proto / -Host sent upstream are the gateway's own connection's, whatever a proxy or
    a client claims (a trusted proxy relays a client's forged ones as readily as its own)."""
    import gateway.context

    monkeypatch.setattr(gateway.context, "_XFF_TOLD", set())  # (what this process said before)
    caplog.set_level(logging.WARNING, logger="gateway")
    trusted = await gateway_to(make_gateway, fake.url, [{"name": "audit", "config": {"sinks": ["stdout"]}}],
                               server={"trusted_proxies": ["127.0.0.1/32"]})
    listed = await nginx(int(trusted.url.rsplit(":", 1)[1]))
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(f"http://127.0.0.1:{listed.bare}/echo",
                         headers={"X-Forwarded-Host": "evil.example", "X-Forwarded-For": "198.51.100.7"}) as r:
            assert r.status == 200
    seen = fake.requests[-1]["headers"]
    assert seen["X-Forwarded-Proto"] == "http" and seen["X-Forwarded-Host"] != "evil.example"
    assert not [r for r in caplog.records if "X-Forwarded-For" in r.getMessage()]

    other = await gateway_to(make_gateway, fake.url, [{"name": "audit", "config": {"sinks": ["stdout"]}}],
                             name="other.yaml")
    unlisted = await nginx(int(other.url.rsplit(":", 1)[1]))
    async with aiohttp.ClientSession(timeout=T) as s:
        for _ in range(3):
            async with s.get(f"http://127.0.0.1:{unlisted.gzip}/echo") as r:
                assert r.status == 200
    told = [r.getMessage() for r in caplog.records if "X-Forwarded-For" in r.getMessage()]
    assert len(told) == 1 and "127.0.0.1 is not in server.trusted_proxies" in told[0], told


async def test_an_ndjson_stream_is_marked_too(make_gateway: Any) -> None:
    """Ollama's own API streams NDJSON lines: marked like SSE, so nginx does not hold them back."""
    from aiohttp import web

    from .helpers import serve_handler

    async def ndjson(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(b'{"message": {"content": "hi"}, "done": true}\n')
        return resp

    runner, url = await serve_handler(ndjson)
    try:
        g = await gateway_to(make_gateway, url, server={"paths": ["/api"]})
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.post(g.url + "/api/chat", json={"model": "m", "messages": []}) as r:
                assert r.headers.get("X-Accel-Buffering") == "no"
                await r.read()
    finally:
        await runner.cleanup()
