"""Secrets that a user's or a client's slip would have let out: a credential typed into a header's
name in the config (quoted back by the error, into the log, the admin API's answer and the audit
trail), the upstream refusing the gateway's own key (relayed to every client, quoting part of it),
a gateway key in a header key_auth does not read, in the query or in the body's ``model``
(forwarded to the upstream, recorded), and a third-party logger writing a request line with a key
in its query at DEBUG."""
from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.logs import setup_logging

from .helpers import ADMIN_TOKEN, serve_handler
from .test_key_auth import bearer, new_key

SECRET = "sk-proj-LiteralUpstreamSecretXyz9876"
OTLP_SECRET = "OtlpHeaderSecret0123456789"
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_a_secret_typed_into_a_header_name_is_never_quoted_by_config_errors(tmp_path: Path) -> None:
    for n, (section, extra) in enumerate([
        # `name=value`, the habit from OTEL_EXPORTER_OTLP_HEADERS: YAML reads one key, no value
        ("upstream", f"  headers: {{Authorization=Bearer {SECRET}}}\n"),
        ("upstream", f'  headers: {{"Authorization Bearer {SECRET}": x}}\n'),
        ("tracing", f'    config: {{exporter: {{type: otlp_http, endpoint: "http://127.0.0.1:4318", '
                    f'headers: {{"api-key: {OTLP_SECRET}": x}}}}}}\n'),
        ("headers", f'    config: {{request: {{"X-Api-Key={SECRET}": x}}}}\n'),
        ("upstream", f"  headers: {{{SECRET}}}\n"),  # the secret alone, as a name
    ]):
        plugins = f"plugins:\n  - name: {section}\n{extra}" if section != "upstream" else "plugins: []\n"
        upstream = "upstream:\n  url: http://127.0.0.1:9\n" + (extra if section == "upstream" else "")
        p = tmp_path / f"c{n}.yaml"
        p.write_text(upstream + plugins)
        r = check(p)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert "rest not shown" in out or "name, not shown" in out, out
        for s in (SECRET, OTLP_SECRET, "LiteralUpstream", "0123456789"):
            assert s not in out, (n, out)
    # a misspelt setting is named in full
    p = tmp_path / "typo.yaml"
    p.write_text("server:\n  max body size: 10\nupstream:\n  url: http://127.0.0.1:9\n")
    r = check(p)
    assert r.returncode != 0 and "server.max body size" in r.stdout + r.stderr, r.stdout + r.stderr
    # a control character in a credential: refused at load, not a 500 on every request
    p = tmp_path / "ctl.yaml"
    p.write_text(yaml.safe_dump({"upstream": {"url": "http://127.0.0.1:9",
                                              "headers": {"Authorization": f"Bearer {SECRET}\x01"}}}))
    r = check(p)
    assert r.returncode != 0 and "control characters" in r.stderr + r.stdout and SECRET not in r.stderr + r.stdout


async def test_a_refused_reload_does_not_carry_the_secret_into_the_audit_trail(make_gateway: Any,
                                                                               tmp_path: Path) -> None:
    g = await make_gateway([{"name": "audit", "config": {"sinks": ["database"]}}])
    cfg = tmp_path / "gateway.yaml"
    text = cfg.read_text().replace("upstream:\n", f"upstream:\n  headers: {{Authorization=Bearer {SECRET}}}\n", 1)
    cfg.write_text(text)
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/config/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            body = await r.text()
    assert r.status == 400 and "rest not shown" in body and SECRET not in body and "LiteralUpstream" not in body
    await g.plugin("audit").sinks[0][1].flush(10)
    db = sqlite3.connect(tmp_path / "gateway.db")
    rows = [d for (d,) in db.execute("SELECT data FROM audit_events WHERE type = 'config.reloaded'")]
    db.close()
    assert rows and not any("LiteralUpstream" in d for d in rows), rows


async def test_the_upstream_refusing_the_gateways_own_key_is_not_relayed_as_the_clients(
        make_gateway: Any, caplog: Any) -> None:
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "Incorrect API key provided: sk-p********9876.",
                                            "code": "invalid_api_key"}}, status=401)

    runner, url = await serve_handler(refuse)
    try:
        own = await make_gateway(upstream={"url": url, "headers": {"Authorization": f"Bearer {SECRET}"}})
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(own.url + "/v1/chat/completions", json=CHAT) as r:
                    body = await r.json()
                assert r.status == 502 and body["error"]["code"] == "upstream_auth_failed", body
                assert r.headers["x-should-retry"] == "false"  # (the SDKs would retry a 502 twice)
                assert "9876" not in json.dumps(body)
        told = [r for r in caplog.records if "401 to the gateway's own credentials" in r.getMessage()]
        assert len(told) == 1 and told[0].levelno == logging.ERROR  # (once a minute, not per request)
        # which credential it refuses: the error's code, never its message (it quotes part of the key)
        assert "its error code: invalid_api_key" in told[0].getMessage() and "9876" not in caplog.text
        # a key the headers plugin sets on a route is the gateway's own too
        plugin = await make_gateway([{"name": "headers", "config": {"request": {"api-key": SECRET}}}],
                                    upstream={"url": url}, name="plugin.yaml")
        async with aiohttp.ClientSession() as s:
            async with s.post(plugin.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 502 and (await r.json())["error"]["code"] == "upstream_auth_failed"
        # Otherwise the 401 answers the client's own credentials and is relayed: no credentials of
        # the gateway's; a client's key going along with them; a query parameter that only
        # contains "key"; a Proxy-Authorization (for a proxy, not the upstream).
        for n, (upstream, headers) in enumerate([
                ({"url": url}, {"Authorization": "Bearer the-clients-own"}),
                ({"url": url, "headers": {"x-api-key": SECRET}}, {"api-key": "the-clients-own"}),
                ({"url": url + "?keyspace=prod"}, {}),
                ({"url": url, "headers": {"Proxy-Authorization": "Basic eDp5"}}, {})]):
            passthrough = await make_gateway(upstream=upstream, name=f"plain{n}.yaml")
            async with aiohttp.ClientSession() as s:
                async with s.post(passthrough.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
                    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key", n
    finally:
        await runner.cleanup()


async def test_a_gateway_key_out_of_place_never_reaches_the_upstream_nor_the_records(
        make_gateway: Any, tmp_path: Path) -> None:
    from aiohttp import web

    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request.path_qs, dict(request.headers), await request.read()))
        return web.json_response({"id": "x", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    runner, url = await serve_handler(record)
    try:
        g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {"sinks": ["database"]}}],
                               upstream={"url": url})
        key = (await new_key(g))["key"]
        secret = key.rsplit("_", 1)[1]
        async with aiohttp.ClientSession() as s:
            headers = {**bearer(key), "X-Custom-Key": key, "OpenAI-Api-Key": f"Bearer {key}"}
            async with s.post(g.url + f"/v1/chat/completions?api_key={key}&x=1", json=CHAT, headers=headers) as r:
                assert r.status == 200, await r.text()
            # arguments swapped: the key as the model (also JSON-escaped)
            async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "model": key},
                              headers=bearer(key)) as r:
                assert r.status == 200, await r.text()
            escaped = json.dumps({**CHAT, "model": key}).replace('"gw_', '"\\u0067w_')
            assert '"gw_' not in escaped
            async with s.post(g.url + "/v1/chat/completions", data=escaped,
                              headers={**bearer(key), "Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
        assert len(seen) == 3
        for path_qs, hdrs, body in seen:
            assert secret not in path_qs and secret not in json.dumps(hdrs) and secret.encode() not in body
        assert seen[0][0].endswith("&x=1") and "_REDACTED" in seen[0][0]  # the rest of the query as sent
        assert seen[0][1]["X-Custom-Key"].endswith("_REDACTED")
        assert json.loads(seen[1][2])["model"].endswith("_REDACTED")
        assert json.loads(seen[2][2])["model"].endswith("_REDACTED")
        await g.plugin("audit").sinks[0][1].flush(10)
        db = sqlite3.connect(tmp_path / "gateway.db")
        rows = [d for (d,) in db.execute("SELECT data FROM audit_events")]
        db.close()
        assert rows and not any(secret in d for d in rows)
    finally:
        await runner.cleanup()


def test_third_party_request_lines_stay_out_of_a_debug_log() -> None:
    """urllib3 (under the OTLP/HTTP exporter) logs each request line, query and all, at DEBUG."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        setup_logging("DEBUG", "text")
        assert logging.getLogger("urllib3.connectionpool").getEffectiveLevel() == logging.WARNING
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)



async def test_the_upstreams_organization_and_project_do_not_reach_clients(make_gateway: Any) -> None:
    """A hosted backend names the organization and project the gateway's credential bills in its
    answers: the operator's identifiers, dropped like the clients' own choice of them."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []}, headers={
            "openai-organization": "org-operator-secret-id", "openai-project": "proj_operator",
            "openai-processing-ms": "12", "x-request-id": "req_up_1"})

    runner, url = await serve_handler(answer)
    try:
        g = await make_gateway(upstream={"url": url, "headers": {"OpenAI-Organization": "org-operator-secret-id"}})
        async with aiohttp.ClientSession() as s:
            async with s.get(g.url + "/v1/models") as r:
                assert r.status == 200
                names = {k.lower() for k in r.headers}
    finally:
        await runner.cleanup()
    assert "openai-organization" not in names and "openai-project" not in names, names
    assert "openai-processing-ms" in names and "x-upstream-request-id" in names
