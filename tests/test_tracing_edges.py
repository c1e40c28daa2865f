"""tracing as operators run it: header capture switched on next to key_auth, exporter settings from
secret files, a collector that refuses or hangs, hostile trace-context headers. Real gateways on
loopback sockets, the demo upstream, a real OTLP/HTTP receiver, real config files and the CLI."""
from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from gateway.config import ConfigError, load_config_text

from .helpers import ADMIN_TOKEN, base_config, write_config
from .test_tracing import CHAT, TRACEPARENT, post, tracing

ROOT = Path(__file__).resolve().parent.parent
CAPTURE_REQ = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST"
CAPTURE_RESP = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE"
SANITIZE = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS"


def dump_attrs(spans: Any) -> str:
    return repr([dict(s.attributes) for s in spans])


# -- a collector that answers with an error, or not at all -------------------------------------------------
class BadCollector:
    """An OTLP/HTTP endpoint that reads each export and answers ``status`` after ``delay`` seconds
    (``delay`` None: never answers)."""

    def __init__(self, status: int = 503, delay: float | None = 0.0) -> None:
        self.status, self.delay = status, delay
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        if self.delay is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.delay)
        return web.Response(status=self.status)

    async def __aenter__(self) -> "BadCollector":
        app = web.Application()
        app.router.add_post("/v1/traces", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def dropped(g: Any, reason: str) -> float:
    return g.services.metrics.get_sample_value("gateway_tracing_spans_dropped_total", {"reason": reason}) or 0.0


def logged_drops(records: list[logging.LogRecord]) -> int:
    """The spans the gateway's own log lines say were dropped."""
    n = 0
    for r in records:
        m = re.match(r"tracing: (\d+) span\(s\) dropped", r.getMessage())
        if m and r.name == "gateway.tracing":
            n += int(m.group(1))
    return n


# -- 1. credentials in captured headers ----------------------------------------------------------------------
async def test_headers_key_auth_reads_and_gateway_keys_never_reach_a_span(make_gateway: Any, upstream: Any,
                                                                           tmp_path: Path, monkeypatch: Any) -> None:
    """With every header captured, the headers key_auth is configured to read (valid or wrong key),
    auth-ish headers (X-Auth-Token) and a gateway key in any other header reach no span; after a
    reload that makes key_auth read another header, that one is redacted too."""
    monkeypatch.setenv(CAPTURE_REQ, ".*")
    monkeypatch.setenv(CAPTURE_RESP, ".*")
    monkeypatch.delenv(SANITIZE, raising=False)
    plugins = [{"name": "key_auth", "config": {"headers": ["X-Caller", "X-Gateway-Key"]}}, tracing()]
    g = await make_gateway(plugins)
    api_key = (await g.plugin("key_auth").demo_setup())["api_key"]
    key_id, key_secret = api_key.rsplit("_", 1)
    exp = g.plugin("tracing").memory_exporter

    assert (await post(g.url + "/v1/chat/completions", CHAT, {"X-Gateway-Key": api_key}))[0] == 200
    assert (await post(g.url + "/v1/chat/completions", CHAT, {"X-Caller": "wrong-CALLERSECRET-1"}))[0] == 401
    assert (await post(g.url + "/v1/chat/completions", CHAT,
                       {"X-Gateway-Key": api_key, "X-Auth-Token": "TOKENSECRET-2",
                        "X-Note": f"from {api_key}", "X-Visible": "yes"}))[0] == 200
    spans = exp.get_finished_spans()
    text = dump_attrs(spans)
    for secret in (key_secret, "CALLERSECRET", "TOKENSECRET"):
        assert secret not in text, secret
    servers = [s for s in spans if "http.request.header.x_visible" in s.attributes]
    assert len(servers) == 1
    a = servers[0].attributes
    assert a["http.request.header.x_gateway_key"] == "[REDACTED]"
    assert a["http.request.header.x_auth_token"] == "[REDACTED]"
    assert list(a["http.request.header.x_note"]) == [f"from {key_id}_REDACTED"]  # the key id stays
    assert list(a["http.request.header.x_visible"]) == ["yes"]

    # A reload: key_auth now reads X-Pass-Along (no credential word in it).
    plugins[0] = {"name": "key_auth", "config": {"headers": ["X-Pass-Along"]}}
    write_config(tmp_path / "gateway.yaml", base_config(upstream.url, tmp_path, plugins))
    ok, detail = await g.gw.reload(actor="test")
    assert ok, detail
    exp.clear()
    assert (await post(g.url + "/v1/chat/completions", CHAT, {"X-Pass-Along": "wrong-ALONGSECRET-3"}))[0] == 401
    assert (await post(g.url + "/v1/chat/completions", CHAT, {"X-Pass-Along": api_key}))[0] == 200
    spans = exp.get_finished_spans()
    text = dump_attrs(spans)
    assert "ALONGSECRET" not in text and key_secret not in text
    assert "'http.request.header.x_pass_along': '[REDACTED]'" in text


async def test_a_key_in_the_request_path_reaches_no_span_and_no_audit_record(make_gateway: Any,
                                                                              tmp_path: Path) -> None:
    """A client that puts its key in the path (GET /v1/models/<key>, a mistyped URL): the server
    span's URL attributes and the audit event's path keep the key's id, never its secret."""
    import sqlite3
    g = await make_gateway([{"name": "key_auth"}, {"name": "audit"}, tracing()])
    api_key = (await g.plugin("key_auth").demo_setup())["api_key"]
    key_id, key_secret = api_key.rsplit("_", 1)
    exp = g.plugin("tracing").memory_exporter
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{g.url}/v1/models/{api_key}", headers={"Authorization": f"Bearer {api_key}"}) as r:
            await r.read()
    await g.stop()  # (the audit record written, the spans exported)
    text = dump_attrs(exp.get_finished_spans())
    assert key_secret not in text and f"/v1/models/{key_id}_REDACTED" in text
    with sqlite3.connect(tmp_path / "gateway.db") as c:
        paths = [p for (p,) in c.execute("SELECT json_extract(data, '$.path') FROM audit_events "
                                         "WHERE type = 'request'")]
        assert paths == [f"/v1/models/{key_id}_REDACTED"]
        assert not any(key_secret in d for (d,) in c.execute("SELECT data FROM audit_events"))


# -- 2. exporter settings ---------------------------------------------------------------------------------------
def exporter_yaml(exporter: dict[str, Any]) -> str:
    return yaml.safe_dump({"upstream": {"url": "http://127.0.0.1:9"},
                           "plugins": [{"name": "tracing", "config": {"exporter": exporter}}]})


def exporter_of(text: str, env: dict[str, str] | None = None) -> Any:
    return load_config_text(text, env=env).plugins[0].validated.exporter


def test_exporter_headers_and_endpoint_are_checked_without_quoting_them() -> None:
    """A secret file's trailing newline (through ${VAR}) is stripped; CR/LF inside, control characters,
    non-Latin-1 (non-ASCII for gRPC) and credentials in the endpoint are refused by the config check with
    a message that names the problem, never the value; gRPC header names are lower-cased."""
    text = exporter_yaml({"type": "otlp_http", "endpoint": "http://127.0.0.1:4318",
                          "headers": {"x-honeycomb-team": "${HC_KEY}", " X-Two ": " two "}})
    e = exporter_of(text, {"HC_KEY": "hcsecret123\n"})
    assert e.headers == {"x-honeycomb-team": "hcsecret123", "X-Two": "two"}
    e = exporter_of(exporter_yaml({"type": "otlp_grpc", "endpoint": "127.0.0.1:4317",
                                   "headers": {"X-Honeycomb-Team": "abc"}}))
    assert e.headers == {"x-honeycomb-team": "abc"}

    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"type": "otlp_http", "headers": {"authorization": "Bearer SECRET\nX-Injected: 1"}}, "SECRET", "line break"),
        ({"type": "otlp_http", "headers": {"authorization": "Bearer SECRET\x01"}}, "SECRET", "control character"),
        ({"type": "otlp_http", "headers": {"authorization": "Bearer SECRET€"}}, "SECRET", "Latin-1"),
        ({"type": "otlp_grpc", "headers": {"authorization": "Bearer SECRETé"}}, "SECRET", "ASCII"),
        ({"type": "otlp_grpc", "endpoint": "http://user:PASSWD@127.0.0.1:4317"}, "PASSWD", "password"),
        ({"type": "otlp_http", "endpoint": "https://PASSWD@collector:4318"}, "PASSWD", "password"),
        ({"type": "otlp_http", "endpoint": "ftp://collector/SECRETPATH"}, "SECRETPATH", "http://"),
        ({"type": "otlp_http", "endpoint": "http://mycoll:0"}, "mycoll", "port"),
        ({"type": "otlp_http", "endpoint": "http://mycoll:70000"}, "mycoll", "port"),
        ({"type": "otlp_grpc", "endpoint": "mycoll:99999"}, "mycoll", "port"),
        ({"type": "otlp_http", "endpoint": "http://:4319"}, "4319", "no host"),
    ]
    for exporter, secret, why in bad:
        with pytest.raises(ConfigError) as ei:
            exporter_of(exporter_yaml(exporter))
        msg = str(ei.value)
        assert why in msg, (exporter, msg)
        assert secret not in msg, (exporter, msg)


def test_gateway_check_refuses_a_newline_inside_an_exporter_header(tmp_path: Path) -> None:
    """``gateway check``: one line naming the header, exit code non-zero, the value nowhere."""
    cfg = base_config("http://127.0.0.1:9", tmp_path, [{"name": "tracing", "config": {"exporter": {
        "type": "otlp_http", "endpoint": "http://127.0.0.1:4318", "headers": {"x-api-key": "${TRACE_KEY}"}}}}])
    path = write_config(tmp_path / "gw.yaml", cfg)
    env = {"TRACE_KEY": "CHECKSECRET\nsecond-line", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "CHECKSECRET" not in out and "Traceback" not in out
    assert "x-api-key" in out and "line break" in out


async def test_malformed_otel_headers_variable_is_not_logged(make_gateway: Any, monkeypatch: Any,
                                                             caplog: Any) -> None:
    """OTEL_EXPORTER_OTLP_HEADERS written as "name: value" makes the SDK complain at every start and
    reload: the complaint names the header, not its value."""
    # (and a bare token set as the variable, no name at all)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "ENVSECRETBARE43,authorization: Bearer ENVSECRET-42")
    caplog.set_level(logging.DEBUG)
    async with BadCollector(200) as c:
        g = await make_gateway([tracing(exporter={"type": "otlp_http", "endpoint": c.url})])
        await g.stop()
    msgs = [r.getMessage() for r in caplog.records]
    invalid = [m for m in msgs if "Header format invalid" in m]
    assert all("value not shown" in m for m in invalid)  # (one a minute: an earlier test may have had it)
    assert not [m for m in msgs if "ENVSECRET" in m]


# -- 3. dropped spans are counted ----------------------------------------------------------------------------------
async def test_spans_dropped_by_a_refusing_collector_are_counted_exactly(make_gateway: Any, caplog: Any) -> None:
    """A collector answering 503 slowly: the queue overflows and every export fails. Every span the
    gateway made is accounted for in gateway_tracing_spans_dropped_total (queue_full, export_failed,
    shutdown) and in the gateway's own log lines, which give the real numbers."""
    caplog.set_level(logging.INFO)
    async with BadCollector(503, delay=0.2) as c:
        g = await make_gateway([tracing(exporter={"type": "otlp_http", "endpoint": c.url, "timeout": 0.5},
                                        plugin_spans=False, genai_span=False,
                                        batch={"max_queue_size": 6, "max_export_batch_size": 3,
                                               "schedule_delay_ms": 20, "shutdown_timeout": 0.5})])
        n = 30  # 2 spans each: server and upstream call

        async def one(_: int) -> int:
            return (await post(g.url + "/v1/chat/completions", CHAT))[0]

        assert set(await asyncio.gather(*(one(i) for i in range(n)))) == {200}
        async with aiohttp.ClientSession() as s:
            async with s.get(g.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                text = await r.text()
        assert 'gateway_tracing_spans_dropped_total{reason="queue_full"}' in text
        await g.stop()
        assert c.requests > 0
    counts = {r: dropped(g, r) for r in ("queue_full", "export_failed", "shutdown")}
    assert counts["queue_full"] > 0 and counts["export_failed"] > 0, counts
    assert sum(counts.values()) == 2 * n, counts
    assert logged_drops(caplog.records) == 2 * n
    assert not [r for r in caplog.records if r.getMessage().startswith("Queue full")]


# -- 4. a hung collector at shutdown ----------------------------------------------------------------------------------
async def test_spans_pending_at_shutdown_with_a_hung_collector_are_counted_and_logged(make_gateway: Any,
                                                                                      caplog: Any) -> None:
    """The collector never answers: the SDK's bounded shutdown returns normally with the spans still
    queued or in the export under way. The gateway says how many were lost and counts them."""
    caplog.set_level(logging.INFO)
    async with BadCollector(200, delay=None) as c:
        g = await make_gateway([tracing(exporter={"type": "otlp_http", "endpoint": c.url, "timeout": 30},
                                        plugin_spans=False, genai_span=False,
                                        batch={"schedule_delay_ms": 20, "shutdown_timeout": 0.3})])
        for _ in range(3):
            assert (await post(g.url + "/v1/chat/completions", CHAT))[0] == 200
        for _ in range(100):  # the first export is under way (and hangs)
            if c.requests:
                break
            await asyncio.sleep(0.02)
        for _ in range(4):
            assert (await post(g.url + "/v1/chat/completions", CHAT))[0] == 200
        await g.stop()
    assert dropped(g, "shutdown") == 14  # 7 requests, 2 spans each: in the hung export or queued
    warned = [r.getMessage() for r in caplog.records if "still unexported" in r.getMessage()]
    assert warned == ["tracing: 14 span(s) still unexported after 0.3s at shutdown were dropped"]


# -- 6. hostile trace-context headers ----------------------------------------------------------------------------------
async def test_malformed_tracestate_and_baggage_do_not_flood_the_log(make_gateway: Any, caplog: Any) -> None:
    """20 requests with a bad tracestate and a 7 KB malformed baggage (no authentication needed): a few
    short lines, not 40 lines repeating kilobytes of what the client sent."""
    caplog.set_level(logging.INFO)
    g = await make_gateway([tracing()])
    junk = "B" * 7000
    for _ in range(20):
        st, _ = await post(g.url + "/v1/chat/completions", CHAT,
                           {"traceparent": TRACEPARENT, "tracestate": "@@bad", "baggage": junk})
        assert st == 200
    otel = [r for r in caplog.records if r.name.startswith("opentelemetry")]
    assert len(otel) <= 4, [r.getMessage()[:100] for r in otel]
    assert all(len(r.getMessage()) < 400 for r in otel)
    assert not [r for r in caplog.records if "B" * 100 in r.getMessage()]


# -- 7. which spans a full queue drops ---------------------------------------------------------------------------------
def test_a_full_queue_drops_the_oldest_span_as_documented() -> None:
    """The SDK's queue is a bounded deque filled from the left: a full queue loses its OLDEST span.
    The docs and the setting's description say so (and not that new spans are dropped)."""
    from gateway.plugins.tracing import BatchConfig
    from gateway.plugins.tracing.otel import CountingBatchSpanProcessor, GuardedExporter, SpanDrops

    release, busy = threading.Event(), threading.Event()
    got: list[str] = []

    class Blocking(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            busy.set()
            release.wait(10)
            got.extend(s.name for s in spans)
            return SpanExportResult.SUCCESS

    drops = SpanDrops(None)
    proc = CountingBatchSpanProcessor(GuardedExporter(Blocking(), drops), drops, max_queue_size=2,
                                      max_export_batch_size=2, schedule_delay_millis=60_000)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("t")
    for name in ("s1", "s2"):
        tracer.start_span(name).end()
    assert busy.wait(10)  # s1 and s2 are being exported; the queue is empty
    for name in ("s3", "s4", "s5"):
        tracer.start_span(name).end()
    release.set()
    proc.shutdown()
    assert sorted(got) == ["s1", "s2", "s4", "s5"]  # s3, the oldest queued, made room for s5
    assert drops.total == 1

    docs = (ROOT / "docs" / "tracing.md").read_text()
    desc = BatchConfig.model_fields["max_queue_size"].description or ""
    for text in (docs, desc):
        assert "new spans are dropped" not in text
    assert "oldest" in desc
    assert len(re.findall(r"oldest", docs)) >= 2


# -- 5. a full queue the worker empties at that very moment -------------------------------------------------------------
def test_a_span_the_worker_makes_room_for_is_not_counted_dropped() -> None:
    """The SDK says "queue full" when the queue is full as a span arrives, but its worker thread can
    take the oldest span out (to export it) before the new one goes in: then nothing is lost, and a
    count of one dropped span would be wrong (seen as 61 drops for 60 spans under a refusing
    collector). Here the worker's pop is made to happen exactly then."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.plugins.tracing.otel import CountingBatchSpanProcessor, GuardedExporter, SpanDrops

    drops = SpanDrops(None)
    exporter = InMemorySpanExporter()
    proc = CountingBatchSpanProcessor(GuardedExporter(exporter, drops), drops, max_queue_size=2,
                                      max_export_batch_size=2, schedule_delay_millis=60_000)
    provider = TracerProvider()
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("t")
    bp = proc._batch_processor
    bp._worker_awaken.set = lambda: None  # the real worker stays asleep: the test plays it
    taken: list[Any] = []
    sdk_hook = bp._metrics._inner.drop_items

    def worker_takes_one(count: int, error_type: str = "queue_full") -> None:
        taken.append(bp._queue.pop())  # (what the worker's export does, between the check and the insert)
        sdk_hook(count, error_type)

    for name in ("a", "b"):
        tracer.start_span(name).end()
    bp._metrics._inner.drop_items = worker_takes_one
    tracer.start_span("c").end()  # the queue was full: the worker made room
    assert [s.name for s in taken] == ["a"] and [s.name for s in bp._queue] == ["c", "b"]
    assert drops.total == 0
    bp._metrics._inner.drop_items = sdk_hook
    tracer.start_span("d").end()  # full, nobody takes one: "b" is really dropped
    assert [s.name for s in bp._queue] == ["d", "c"] and drops.total == 1
    del bp._worker_awaken.set
    provider.shutdown()
    assert [s.name for s in exporter.get_finished_spans()] == ["c", "d"]  # exported at shutdown
