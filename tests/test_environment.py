"""The gateway on a machine that is not being kind: too few file descriptors, a wrong clock, a
config with clashing ports."""
from __future__ import annotations

import asyncio
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, load_config_text

from .helpers import base_config, free_port, open_idle_sockets, until, write_config


def test_admin_on_the_public_port_is_refused_by_check() -> None:
    """The admin listener on the public listener's port (same host, or a wildcard) passed `check`
    and then failed at start with "address already in use", which points at another process."""
    base = "upstream: {url: 'http://127.0.0.1:9'}\nadmin: {token: 'a-long-enough-admin-token-123'"
    for server, admin in (("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("0.0.0.0", "localhost"),
                          ("127.0.0.1", "localhost"), ("LOCALHOST", "localhost")):
        text = f"server: {{host: '{server}', port: 8080}}\n{base}, host: '{admin}', port: 8080}}\n"
        with pytest.raises(ConfigError, match="admin.port"):
            load_config_text(text, "g.yaml")
    # (brackets are a URL's: the listener could not resolve "[::]")
    with pytest.raises(ConfigError, match="without brackets"):
        load_config_text(f"server: {{host: '[::]', port: 8080}}\n{base}, host: '::1', port: 8080}}\n", "g.yaml")
    # Two addresses, or a wildcard of the other address family (IPV6_V6ONLY): two listeners.
    for server, admin in (("127.0.0.1", "127.0.0.2"), ("::1", "0.0.0.0"), ("::", "127.0.0.1")):
        load_config_text(f"server: {{host: '{server}', port: 8080}}\n{base}, host: '{admin}', port: 8080}}\n",
                         "g.yaml")


async def test_running_out_of_file_descriptors_is_logged_once_not_flooded(tmp_path: Path, upstream: Any) -> None:
    """With every file descriptor taken by idle clients, asyncio reported each failed accept() with
    a traceback, thousands of lines a second. It is one counted line per 10 s, and the gateway
    serves again once clients go away."""
    port = free_port()
    cfg = base_config(upstream.url, tmp_path, [], server={"port": port}, admin={"enabled": False},
                      logging={"level": "INFO", "format": "text"})
    path = write_config(tmp_path / "g.yaml", cfg)
    log = tmp_path / "g.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(path)], stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=limit)
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while "gateway listening" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            await asyncio.sleep(0.1)
        clients.extend(open_idle_sockets(port, 120))  # more than the 64 descriptors the gateway has
        await asyncio.sleep(2)
        text = log.read_text(errors="replace")
        assert "cannot accept connections" in text and "open files limit is reached" in text
        assert text.count("Traceback") == 0 and text.count("out of system resource") <= 1, text[-3000:]
        assert "the open files limit is 64" in text
        for c in clients:
            c.close()
        clients.clear()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async def serving() -> bool:
                async with s.get(f"http://127.0.0.1:{port}/v1/models") as r:
                    return r.status == 200

            await until(serving, 10, 0.2, "the gateway to serve again")
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(20)


async def test_readiness_checks_an_https_upstreams_certificate(make_gateway: Any, tmp_path: Path, caplog: Any) -> None:
    """An https upstream whose certificate is refused fails every request (502): /readyz says not
    ready, naming the reason, instead of ready after a bare TCP connect. With upstream.ca_file
    naming the CA (here the self-signed certificate itself) the upstream is trusted."""
    import shutil
    import ssl

    from aiohttp import web

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    app = web.Application()

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        g = await make_gateway([], upstream={"url": f"https://127.0.0.1:{port}"})
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
            async with s.get(g.admin_url + "/readyz") as r:
                text = await r.text()
                assert r.status == 503, text
                assert "SSLCertVerificationError" in text
            async with s.get(g.url + "/v1/models") as r:
                assert r.status == 502
        # the log says where the fix is; and http:// to that TLS port is told it may be https
        assert "upstream.ca_file names the CA's PEM file" in caplog.text, caplog.text[-2000:]
        plain = await make_gateway([], upstream={"url": f"http://127.0.0.1:{port}"}, name="plain.yaml")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
            async with s.get(plain.url + "/v1/models") as r:
                assert r.status == 502
        assert "an https upstream written http://" in caplog.text, caplog.text[-2000:]
        # upstream.ca_file trusts that certificate for the upstream (alone): ready, and answered
        g2 = await make_gateway([], upstream={"url": f"https://127.0.0.1:{port}", "ca_file": str(cert)})
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
            async with s.get(g2.admin_url + "/readyz") as r:
                assert r.status == 200, await r.text()
            async with s.get(g2.url + "/v1/models") as r:
                assert r.status == 200 and (await r.json())["object"] == "list"
    finally:
        await runner.cleanup()
    with pytest.raises(ConfigError, match="upstream.ca_file.*no such file"):
        load_config_text(f"upstream: {{url: 'https://x', ca_file: {tmp_path / 'none.pem'}}}")
    with pytest.raises(ConfigError, match="upstream.ca_file.*cannot load"):
        load_config_text(f"upstream: {{url: 'https://x', ca_file: {key}}}")


async def test_text_logs_keep_the_fields_listening_names_its_port(tmp_path: Path, upstream: Any) -> None:
    """logging.format: text with port 0: the 'gateway listening' line is the only place the port
    is told, and the text formatter used to drop its fields."""
    cfg = base_config(upstream.url, tmp_path, [{"name": "headers"}], server={"port": 0}, admin={"enabled": False},
                      logging={"level": "INFO", "format": "text"})
    path = write_config(tmp_path / "t.yaml", cfg)
    log = tmp_path / "t.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(path)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "gateway listening" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    line = next(ln for ln in log.read_text().splitlines() if "gateway listening" in ln)
    m = re.search(r" public=127\.0\.0\.1:(\d+) ", line)
    assert m and int(m.group(1)) > 0, line
    assert f'upstream={upstream.url}' in line and 'plugins=["headers"]' in line, line
    starting = next(ln for ln in log.read_text().splitlines() if "gateway starting" in ln)
    assert f"config={path}" in starting or f'config="{path}"' in starting, starting
