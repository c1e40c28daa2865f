"""Observability under hostile or unlucky input: metrics, spans and the audit trail stay usable when a
client sends a lone surrogate or a huge model name, when stdout stops being read, when a stream is
cut short, when a filter value uses non-ASCII digits, and when a URL hides a secret behind
percent-encoding. Real gateways on loopback sockets, the demo upstream, real SQLite files."""
from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from yarl import URL

from gateway.plugins.audit import store

from .helpers import ADMIN_TOKEN, base_config, free_port, write_config

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROOT = Path(__file__).resolve().parent.parent


def tracing(**config: Any) -> dict[str, Any]:
    return {"name": "tracing", "config": {"exporter": {"type": "memory"}, **config}}


async def post_raw(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST ``url`` exactly as written (percent-escapes not normalised by the client)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.post(URL(url, encoded=True), data=body,
                          headers={"Content-Type": "application/json", **(headers or {})}) as r:
            try:
                return r.status, await r.read()
            except aiohttp.ClientPayloadError:  # a stream the upstream cut short
                return r.status, b""


async def scrape(admin_url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(admin_url + "/metrics", headers=AUTH) as r:
            return r.status, await r.text()


def label_values(text: str, family: str, label: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r'^%s\{[^}]*%s="([^"]*)"' % (family, label), text, re.M)]


async def audit_events(g: Any, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The gateway's first ``n`` request events, once written (oldest first)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        data, _ = await store.query(g.services.db, {"type": "request"}, limit=1000, order="asc")
        if len(data) >= n or asyncio.get_running_loop().time() > deadline:
            return data
        await asyncio.sleep(0.05)


# -- 1. a lone surrogate in the model name -------------------------------------------------------------------
async def test_lone_surrogate_model_breaks_neither_metrics_nor_span_export(make_gateway: Any) -> None:
    """``"x\\ud800y"`` is valid JSON but not UTF-8: /metrics keeps answering (the label is ``x?y``) and
    every span of the request can still be OTLP-encoded (the span is named ``chat x?y``)."""
    g = await make_gateway([{"name": "metrics"}, tracing()])
    st, _ = await post_raw(g.url + "/v1/chat/completions",
                           b'{"model": "x\\ud800y", "messages": [{"role": "user", "content": "hi"}]}')
    assert st == 200
    status, text = await scrape(g.admin_url)
    assert status == 200
    assert "x?y" in label_values(text, "gateway_tokens_total", "model")
    spans = g.plugin("tracing").memory_exporter.get_finished_spans()
    assert spans
    encode_spans(spans).SerializeToString()  # what the OTLP exporter does with the batch
    genai = [s for s in spans if s.name.startswith("chat ")]
    assert [s.name for s in genai] == ["chat x?y"]
    assert genai[0].attributes["gen_ai.request.model"] == "x?y"
    status, _ = await scrape(g.admin_url)  # and stays up
    assert status == 200


# -- 2. huge model names ---------------------------------------------------------------------------------------
async def test_huge_model_names_are_cut_in_labels_span_names_and_attributes(make_gateway: Any) -> None:
    """A 20 000-character model name reaches /metrics as its first 128 characters; on spans the model
    is cut, in the span name more, and every attribute (the instrumentation's URL too) is bounded by the
    provider's span limits."""
    g = await make_gateway([{"name": "metrics"}, tracing(max_attribute_chars=2048)])
    model = "m" * 20_000
    query = "q=" + "z" * 6000  # (within aiohttp's request-line limit)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    for _ in range(3):
        st, _ = await post_raw(g.url + "/v1/chat/completions?" + query, body)
        assert st == 200
    status, text = await scrape(g.admin_url)
    assert status == 200
    models = label_values(text, "gateway_tokens_total", "model")
    assert models and all(len(m) <= 128 for m in models) and "m" * 128 in models
    assert len(text) < 50_000
    t = g.plugin("tracing")
    limit = 2048
    spans = t.memory_exporter.get_finished_spans()
    longest = max(len(v) for s in spans for v in s.attributes.values() if isinstance(v, str))
    assert longest <= limit
    server = [s for s in spans if any("z" * 100 in str(v) for v in s.attributes.values())]
    assert server  # the long URL is there, cut
    genai = [s for s in spans if s.name.startswith("chat ")]
    assert genai and all(len(s.name) <= 5 + 129 for s in genai)
    assert all(len(s.attributes["gen_ai.request.model"]) <= 1024 for s in genai)


# -- 3. a stdout nobody reads --------------------------------------------------------------------------------
async def test_stdout_sink_with_an_unread_pipe_does_not_freeze_the_gateway(tmp_path: Path, upstream: Any) -> None:
    """The stdout sink's pipe fills (nobody reads it): requests and the admin /healthz keep answering;
    the audit queue fills and drops instead. (The 10 s client timeout only detects a hang.)"""
    port, admin_port = free_port(), free_port()
    cfg = base_config(upstream.url, tmp_path, [{"name": "audit", "config": {
        "sinks": ["stdout"], "on_full": "drop", "queue_size": 20, "batch_size": 5, "flush_interval": 0.01}}],
        server={"port": port}, admin={"port": admin_port})
    path = write_config(tmp_path / "gw.yaml", cfg)
    log = open(tmp_path / "gw.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=log)
    try:
        url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            for _ in range(200):
                try:
                    async with s.get(admin + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.poll() is None, (tmp_path / "gw.log").read_text()
                await asyncio.sleep(0.1)
            # Each event carries the model name (its first 256 characters): ~1 KiB a line, so 64 KiB
            # of pipe is full after ~70.
            body = json.dumps({"model": "p" * 8000, "messages": [{"role": "user", "content": "hi"}]})
            for i in range(200):
                async with s.post(url + "/v1/chat/completions", data=body,
                                  headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 200, i
                    await r.read()
            async with s.get(admin + "/healthz") as r:
                assert r.status == 200
            async with s.get(admin + "/metrics", headers=AUTH) as r:
                text = await r.text()
            dropped = [float(v) for v in re.findall(
                r'^gateway_writer_dropped_total\{[^}]*writer="audit:stdout"[^}]*\} (\S+)', text, re.M)]
            assert sum(dropped) > 0
    finally:
        proc.kill()
        proc.wait()
        log.close()


# -- 4. streams cut short ----------------------------------------------------------------------------------
async def test_cut_short_streams_count_relayed_tokens_in_audit_and_metrics(make_gateway: Any) -> None:
    """The upstream dies after 3 content chunks, before its usage chunk: the audit event has the relayed
    deltas as tokens_out and the prompt estimate (characters / 4) as tokens_in, marked
    ``tokens_estimated``, and gateway_tokens_total counts them."""
    g = await make_gateway([{"name": "metrics"}, {"name": "audit"}])
    body = json.dumps({"model": "cut-model", "stream": True,
                       "messages": [{"role": "user", "content": "tell me a long story please"}]}).encode()
    await post_raw(g.url + "/v1/chat/completions", body, {"X-Demo-Die-After": "3"})
    full = json.dumps({"model": "cut-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert (await post_raw(g.url + "/v1/chat/completions", full))[0] == 200
    # cut before its first chunk: the gateway's error event is the first byte the client gets
    await post_raw(g.url + "/v1/chat/completions", body, {"X-Demo-Die-After": "0"})
    evs = await audit_events(g, 3)
    cut, whole, early = evs[0], evs[1], evs[2]
    assert (cut["outcome"], cut["error"]) == ("upstream_disconnected", "upstream_disconnected")
    assert (early["outcome"], early["error"], early["tokens_out"]) == ("upstream_disconnected", "upstream_disconnected", 0)
    assert early["tokens_in"] == (len("tell me a long story please") + 3) // 4  # the upstream read the prompt
    assert early["ttfb_ms"] is not None and early["bytes_out"] > 0
    estimate = (len("tell me a long story please") + 3) // 4
    assert cut["tokens_out"] == 3 and cut["tokens_in"] == estimate and cut["tokens_estimated"] is True
    assert "tokens_estimated" not in whole and whole["tokens_out"] > 0
    _, text = await scrape(g.admin_url)
    inp = re.search(r'^gateway_tokens_total\{direction="input",model="cut-model"\} (\S+)', text, re.M)
    assert inp and float(inp.group(1)) == 2 * estimate + whole["tokens_in"]
    out = re.search(r'^gateway_tokens_total\{direction="output",model="cut-model"\} (\S+)', text, re.M)
    assert out and float(out.group(1)) == 3 + whole["tokens_out"]


# -- 5. status and cursor filters -------------------------------------------------------------------------
async def test_non_ascii_digits_in_audit_filters_are_400_naming_the_parameter(make_gateway: Any,
                                                                             tmp_path: Path) -> None:
    """``status=²²²`` passes str.isdigit() but not int(): a 400 in the JSON error shape naming
    ``status``, from the API, the store and the CLI alike; a bad cursor names the cursor."""
    g = await make_gateway([{"name": "audit"}])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for q, param in (("status=²²²", "status"), ("status=²xx", "status"), ("status=42", "status"),
                         ("cursor=²", "cursor"), ("limit=²", "limit")):
            async with s.get(g.admin_url + "/audit?" + q, headers=AUTH) as r:
                assert r.status == 400, q
                err = (await r.json())["error"]
                assert err["param"] == param and err["message"].startswith(param + ":"), (q, err)
                assert err["type"] == "invalid_request_error"
        for q in ("status=429", "status=4xx", "status=4XX"):
            async with s.get(g.admin_url + "/audit?" + q, headers=AUTH) as r:
                assert r.status == 200, q
    try:
        await store.query(g.services.db, {"status": "²²²"})
    except ValueError as e:
        assert str(e).startswith("status:")
    else:
        raise AssertionError("the store ran a query for status ²²²")
    cfg = tmp_path / "gateway.yaml"
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "audit", "query", "--status", "²²²",
                                             "-c", str(cfg), stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    assert p.returncode == 2, (out, err)
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "status: expected" in lines[0] and "Traceback" not in err.decode()


# -- 6. re-verifying exported records offline -----------------------------------------------------------------
def documented_recipe() -> Any:
    """The Python function docs/audit.md gives for re-checking an exported record."""
    text = (ROOT / "docs" / "audit.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "hashlib" in b]
    assert len(blocks) == 1, "docs/audit.md gives one Python recipe for re-checking a record"
    ns: dict[str, Any] = {}
    exec(blocks[0], ns)
    return next(v for k, v in ns.items() if callable(v) and not k.startswith("_") and k not in ("hashlib", "json"))


async def test_documented_recipe_reverifies_records_with_lone_surrogates(make_gateway: Any, tmp_path: Path) -> None:
    """Records holding a lone surrogate next to other non-ASCII text are stored as the documented
    recipe serialises them (non-ASCII kept, only the surrogate escaped), and the recipe re-checks every
    exported record, and rejects an edited one."""
    g = await make_gateway([{"name": "audit"}])
    for model in ("plain", "caf\\u00e9 \\ud800 \\udfff end", "\\u00e9t\\u00e9"):
        body = ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % model).encode()
        assert (await post_raw(g.url + "/v1/chat/completions", body))[0] == 200
    await audit_events(g, 3)
    with sqlite3.connect(tmp_path / "gateway.db") as conn:
        rows = conn.execute("SELECT data, prev_hash, hash FROM audit_events ORDER BY seq").fetchall()
    assert len(rows) >= 3
    hostile = [d for d, _, _ in rows if "\\ud800" in d]
    assert len(hostile) == 1 and "café" in hostile[0]  # only the surrogate is escaped
    record_ok = documented_recipe()
    for data, prev, h in rows:
        exported = {**json.loads(data), "prev_hash": prev, "hash": h, "record": data}  # as export --with-chain
        assert record_ok(exported), data
    i = next(i for i, r in enumerate(rows) if r[0] == hostile[0])
    edited = {**json.loads(hostile[0]), "prev_hash": rows[i][1], "hash": rows[i][2], "record": hostile[0]}
    assert record_ok(edited)
    edited["model"] = "other"
    assert not record_ok(edited)


# -- 7. percent-encoded secrets in the query string -----------------------------------------------------------
async def test_percent_encoded_secret_query_names_are_redacted_on_spans(make_gateway: Any) -> None:
    """``api%5Fkey`` is the ``api_key`` the application reads, ``access%2Dtoken`` an access token: their
    values reach no span attribute (server and client spans), other parameters are kept."""
    g = await make_gateway([tracing()])
    body = json.dumps({"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
    st, _ = await post_raw(g.url + "/v1/chat/completions?api%5Fkey=SECRETONE&access%2Dtoken=SECRETTWO"
                           "&API%5fKEY=SECRETTHREE&keep=visible", body)
    assert st == 200
    spans = g.plugin("tracing").memory_exporter.get_finished_spans()
    values = [str(v) for s in spans for v in s.attributes.values()]
    assert not [v for v in values if "SECRET" in v]
    urls = [v for v in values if "keep=visible" in v]
    assert len(urls) >= 2 and all("api%5Fkey=REDACTED" in v for v in urls)  # server and client spans
