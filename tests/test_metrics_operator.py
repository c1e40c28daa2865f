"""/metrics as an operator uses it: per-route settings that would change every route's histograms
are refused, alerts have series to fire on before the first failure, the model label is the
upstream's and its cap is said in the log, the scrape speaks OpenMetrics and gzip, and what
docs/metrics.md shows (HELP texts, the Alerts section) matches a real scrape."""
from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

from .helpers import ADMIN_TOKEN, base_config, until, write_config

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello there"}]}
T = aiohttp.ClientTimeout(total=20)
ROOT = Path(__file__).resolve().parent.parent
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def samples_of(text: str) -> Samples:
    out: Samples = defaultdict(dict)
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[smp.name][tuple(sorted(smp.labels.items()))] = smp.value
    return out


async def scrape_text(s: aiohttp.ClientSession, admin_url: str) -> str:
    async with s.get(admin_url + "/metrics", headers=AUTH) as r:
        assert r.status == 200
        return await r.text()


async def scrape(s: aiohttp.ClientSession, admin_url: str) -> Samples:
    return samples_of(await scrape_text(s, admin_url))


def series(m: Samples, name: str, **match: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {k: v for k, v in m.get(name, {}).items() if all(dict(k).get(a) == b for a, b in match.items())}


async def chat(s: aiohttp.ClientSession, url: str, path: str = "/v1/chat/completions", **body: Any) -> int:
    async with s.post(url + path, json={**CHAT, **body}) as r:
        await r.read()
        return r.status


# -- 1. buckets are one setting per process ----------------------------------------------------------
def test_a_route_cannot_set_the_shared_buckets(tmp_path):
    def check(route_config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        cfg = base_config("http://127.0.0.1:9", tmp_path, [{"name": "metrics"}],
                          routes=[{"path_prefix": "/v1/chat", "plugins": {"metrics": {"config": route_config}}}])
        p = write_config(tmp_path / "c.yaml", cfg)
        return subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(p)],
                              capture_output=True, text=True, timeout=60)

    for field in ("latency_buckets", "overhead_buckets"):
        res = check({field: [1, 2, 3]})
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert f"routes[0].plugins.metrics.config.{field} -> line" in res.stderr
        assert "cannot be set per route" in res.stderr and "Traceback" not in res.stderr
    assert check({"tokens": False}).returncode == 0  # the rest can still differ per route


async def test_a_reload_keeps_every_routes_histograms_and_drops_removed_routes(make_gateway, upstream, tmp_path):
    """Two metrics instances (a route's own config): a reload that changes nothing keeps every
    series as it was; one that removes the route drops that route's series."""
    routes = [{"name": "models", "path_prefix": "/v1/models", "methods": ["GET"],
               "plugins": {"metrics": {"config": {"tokens": False}}}}]
    g = await make_gateway([{"name": "metrics", "config": {"latency_buckets": [0.5, 60]}}], routes=routes)
    cfg_path = Path(g.gw.cfg.path)
    async with aiohttp.ClientSession(timeout=T) as s:
        for _ in range(2):
            assert await chat(s, g.url) == 200
            async with s.get(g.url + "/v1/models") as r:
                assert r.status == 200
        before = await scrape(s, g.admin_url)
        ok, detail = await g.gw.reload(actor="test")
        assert ok, detail
        after = await scrape(s, g.admin_url)
        for fam in ("gateway_request_duration_seconds", "gateway_ttfb_seconds", "gateway_overhead_seconds",
                    "gateway_upstream_duration_seconds"):
            for suffix in ("_count", "_bucket"):
                assert after[fam + suffix] == before[fam + suffix], fam + suffix
        assert {dict(k)["route"] for k in after["gateway_request_duration_seconds_count"]} == {"default", "models"}
        assert all(v == 2 for v in after["gateway_request_duration_seconds_count"].values())
        assert {dict(k)["le"] for k in after["gateway_ttfb_seconds_bucket"]} == {"0.5", "60.0", "+Inf"}

        cfg = base_config(upstream.url, tmp_path, [{"name": "metrics", "config": {"latency_buckets": [0.5, 60]}}])
        write_config(cfg_path, cfg)
        ok, detail = await g.gw.reload(actor="test")
        assert ok, detail
        gone = await scrape(s, g.admin_url)
    for name in ("gateway_request_duration_seconds_count", "gateway_ttfb_seconds_bucket", "gateway_requests_total"):
        assert series(gone, name, route="models") == {}, name
        assert series(gone, name, route="default"), name
    assert sum(series(gone, "gateway_requests_total", route="default").values()) == 2


# -- 2. series at 0 before the first failure ---------------------------------------------------------
def _reasons(module: str, pattern: str) -> set[str]:
    """The values ``pattern`` finds in the source of ``module`` (as installed: not by a path into
    the repository)."""
    import importlib

    path = Path(importlib.import_module(module).__file__ or "")
    return set(re.findall(pattern, path.read_text()))


async def test_a_fresh_gateway_shows_the_failure_series_at_zero(make_gateway, tmp_path):
    rules = [{"name": "per-key", "limit": "60/minute", "key_by": ["key"]},
             {"name": "tokens", "limit": "100000/minute", "counts": "tokens", "key_by": ["key"]}]
    g = await make_gateway([
        {"name": "key_auth"},
        {"name": "rate_limit", "config": {"rules": rules, "on_store_error": "deny",
                                          "quotas": {"daily_tokens": 1000000}}},
        {"name": "audit", "config": {"sinks": ["database", {"type": "jsonl", "path": str(tmp_path / "a.jsonl")}]}},
        {"name": "conversations"},
        {"name": "metrics"}])
    drop_reasons = _reasons("gateway.writer", r'self\._drop\([^,()]+(?:\([^)]*\))?, "(\w+)"\)')
    auth_reasons = _reasons("gateway.plugins.key_auth", r'self\._refuse\(ctx, \d+, "(\w+)"')
    assert {"queue_full", "write_failed", "rejected"} <= drop_reasons and "missing" in auth_reasons
    async with aiohttp.ClientSession(timeout=T) as s:
        m = await scrape(s, g.admin_url)
        writers = {dict(k)["writer"] for k in m["gateway_writer_queue_depth"]}
        assert {"audit:database", "conversations", "key_auth.usage"} <= writers
        assert any(w.startswith("audit:jsonl:") for w in writers)
        for w in writers:
            for reason in drop_reasons:
                assert series(m, "gateway_writer_dropped_total", writer=w, reason=reason) == {
                    (("reason", reason), ("writer", w)): 0.0}, (w, reason)
            assert list(series(m, "gateway_writer_retries_total", writer=w).values()) == [0.0], w
        for result in ("success", "failure"):
            assert list(series(m, "gateway_config_reloads_total", result=result).values()) == [0.0]
        for kind in ("error", "timeout", "disconnected"):
            assert list(series(m, "gateway_upstream_errors_total", kind=kind).values()) == [0.0]
        for reason in auth_reasons:
            assert list(series(m, "gateway_auth_failures_total", reason=reason).values()) == [0.0], reason
        refused = m["gateway_ratelimit_refused_total"]
        assert refused == {(("reason", "rate_limit_exceeded"), ("rule", "per-key")): 0.0,
                           (("reason", "rate_limit_exceeded"), ("rule", "tokens")): 0.0,
                           (("reason", "insufficient_quota"), ("rule", "daily-tokens")): 0.0,
                           (("reason", "store_unavailable"), ("rule", "-")): 0.0}

        # The series are the ones the failures count in: a refusal and a failed reload.
        assert await chat(s, g.url) == 401
        Path(g.gw.cfg.path).write_text("plugins: [")
        ok, _ = await g.gw.reload(actor="test")
        assert not ok
        m = await scrape(s, g.admin_url)
    assert list(series(m, "gateway_auth_failures_total", reason="missing").values()) == [1.0]
    assert list(series(m, "gateway_config_reloads_total", result="failure").values()) == [1.0]
    assert list(series(m, "gateway_config_reloads_total", result="success").values()) == [0.0]


# -- 3. the model label: the upstream's, and capped out loud -----------------------------------------
async def test_the_model_cap_is_said_once_in_the_log(make_gateway, monkeypatch):
    from gateway.plugins import metrics as mp

    monkeypatch.setattr(mp, "MAX_MODEL_LABELS", 3)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    h = Keep(logging.WARNING)
    logger = logging.getLogger("gateway.metrics")
    logger.addHandler(h)
    try:
        g = await make_gateway([{"name": "metrics"}])
        async with aiohttp.ClientSession(timeout=T) as s:
            for i in range(6):
                assert await chat(s, g.url, model=f"made-up-{i}") == 200
            assert await chat(s, g.url) == 200  # a real model, after the cap: still counted
            m = await scrape(s, g.admin_url)
    finally:
        logger.removeHandler(h)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert 'model="other"' in warnings[0] and "made-up-3" in warnings[0]
    assert "count by (model) (gateway_tokens_total)" in warnings[0]
    models = {dict(k)["model"] for k in m["gateway_tokens_total"]}
    assert models == {"made-up-0", "made-up-1", "made-up-2", "other"}
    # 3 requests past the cap (made-up-3..5, demo-chat: 4) all under "other"
    per_request = sum(series(m, "gateway_tokens_total", model="made-up-0", direction="input").values())
    assert sum(series(m, "gateway_tokens_total", model="other", direction="input").values()) == 4 * per_request


async def _start_upstream(model_of: Any) -> tuple[web.AppRunner, str]:
    """An OpenAI-style upstream whose answers name the model ``model_of(requested)`` (None: no
    ``model`` field at all), streamed or not, always with usage."""
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = model_of(body.get("model"))
        named = {"model": model} if model is not None else {}
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if not body.get("stream"):
            return web.json_response({"id": "c1", "object": "chat.completion", "created": 0, **named,
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": "hi"}}],
                                      "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in ({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                      {"choices": [], "usage": usage}):
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 0, **named, **chunk}
            await resp.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def test_token_labels_name_the_model_the_upstream_reported(make_gateway):
    served = {"alias": "served-model-v2"}
    runner, url = await _start_upstream(lambda asked: served.get(asked))
    try:
        g = await make_gateway([{"name": "metrics"}], upstream={"url": url})
        async with aiohttp.ClientSession(timeout=T) as s:
            assert await chat(s, g.url, model="alias") == 200
            assert await chat(s, g.url, model="client-chosen-1") == 200
            assert await chat(s, g.url, model="client-chosen-2", stream=True) == 200
            m = await scrape(s, g.admin_url)
    finally:
        await runner.cleanup()
    tokens = m["gateway_tokens_total"]
    assert {dict(k)["model"] for k in tokens} == {"served-model-v2", "unknown"}
    assert tokens[(("direction", "input"), ("model", "served-model-v2"))] == 7
    assert tokens[(("direction", "input"), ("model", "unknown"))] == 14
    assert tokens[(("direction", "output"), ("model", "unknown"))] == 6


# -- 4. the scrape: OpenMetrics when asked, gzip when accepted ---------------------------------------
async def test_scrape_formats_and_compression(make_gateway):
    g = await make_gateway([{"name": "metrics"}])
    om_accept = ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;"
                 "q=0.4,text/plain;version=0.0.4;q=0.2,*/*;q=0.1")  # what Prometheus sends
    async with aiohttp.ClientSession(timeout=T, auto_decompress=False) as s:
        assert await chat(s, g.url) == 200
        for headers in ({"Accept": om_accept}, {"Accept-Encoding": "gzip"}, {}):
            async with s.get(g.admin_url + "/metrics", headers=headers) as r:
                assert r.status == 401  # the admin token is still needed
                assert (await r.json())["error"]["type"]
        # (aiohttp asks for gzip unless told otherwise)
        async with s.get(g.admin_url + "/metrics", headers={**AUTH, "Accept": om_accept,
                                                            "Accept-Encoding": "identity"}) as r:
            assert r.status == 200 and "Content-Encoding" not in r.headers
            assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
            om = (await r.read()).decode()
        async with s.get(g.admin_url + "/metrics", headers={**AUTH, "Accept": om_accept,
                                                            "Accept-Encoding": "gzip, deflate"}) as r:
            assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            om_gz = gzip.decompress(await r.read()).decode()
        async with s.get(g.admin_url + "/metrics", headers={**AUTH, "Accept-Encoding": "gzip"}) as r:
            assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            raw = await r.read()
            text = gzip.decompress(raw).decode()
        async with s.get(g.admin_url + "/metrics", headers={**AUTH, "Accept-Encoding": "identity"}) as r:
            assert r.status == 200 and "Content-Encoding" not in r.headers
            plain = (await r.read()).decode()
    assert om.rstrip().endswith("# EOF") and om_gz.rstrip().endswith("# EOF")
    fams = {f.name: f for f in om_families(om)}
    assert fams["gateway_requests"].type == "counter"
    assert sum(x.value for x in fams["gateway_requests"].samples if x.name == "gateway_requests_total") == 1
    assert fams["gateway_request_duration_seconds"].type == "histogram"
    assert {f.name for f in om_families(om_gz)} == set(fams)
    assert len(raw) < len(text) / 3  # compressed
    for body in (text, plain):
        m = samples_of(body)
        assert sum(m["gateway_requests_total"].values()) == 1
        assert sum(m["gateway_request_duration_seconds_count"].values()) == 1


# -- 5. what the scrape and docs/metrics.md say -----------------------------------------------------
async def test_help_texts_say_what_is_counted(make_gateway):
    g = await make_gateway([{"name": "conversations"}, {"name": "metrics"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        text = await scrape_text(s, g.admin_url)
    helps = {f.name: f.documentation for f in text_string_to_metric_families(text)}
    assert "forked_late" in helps["gateway_conversations_skipped"] and "deleted" in helps["gateway_conversations_skipped"]
    assert "stream" in helps["gateway_overhead_seconds"] and "upstream time" in helps["gateway_overhead_seconds"]


def _alerts() -> list[str]:
    """The expressions, an indented line continuing the one before."""
    doc = (ROOT / "docs" / "metrics.md").read_text()
    section = doc.split("\n## Alerts", 1)[1].split("\n## ", 1)[0]
    exprs: list[str] = []
    for block in re.findall(r"```promql\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            if line[0].isspace() and exprs:
                exprs[-1] += " " + line.strip()
            else:
                exprs.append(line)
    assert len(exprs) >= 3, section
    return exprs


async def _scraped_with(s: aiohttp.ClientSession, url: str, name: str, label: str, value: str) -> Any:
    m = await scrape(s, url)
    return m if any(dict(k).get(label) == value for k in m.get(name, {})) else None


async def test_the_documented_alerts_name_real_series(make_gateway, tmp_path):
    """Each PromQL expression of the docs' Alerts section: every metric it names is in a scrape of
    a gateway with those plugins (after a request answered, one the upstream answers 503 and one
    whose client gives up before the head), with the labels it matches or groups by."""
    # (on_store_error: allow has its alert, deny another: a route here denies)
    g = await make_gateway([{"name": "audit", "config": {"sinks": ["database"]}}, {"name": "rate_limit"},
                            {"name": "conversations"}, {"name": "metrics"}],
                           routes=[{"path_prefix": "/v1/embeddings",
                                    "plugins": {"rate_limit": {"config": {"on_store_error": "deny"}}}}])
    async with aiohttp.ClientSession(timeout=T) as s:
        assert await chat(s, g.url) == 200
        async with s.post(g.url + "/v1/chat/completions", json=CHAT, headers={"X-Demo-Status": "503"}) as r:
            assert r.status == 503
        with contextlib.suppress(asyncio.TimeoutError):
            async with s.post(g.url + "/v1/chat/completions", json=CHAT, headers={"X-Demo-Head-Delay": "2"},
                              timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                await r.read()
        m = await until(lambda: _scraped_with(s, g.admin_url, "gateway_requests_total", "status", "0"), 5,
                        what="the request its client gave up on, counted")
    exprs = _alerts()
    named = set()
    for expr in exprs:
        names = set(re.findall(r"\b(gateway_[a-z_]+)", expr))
        assert names, expr
        named |= names
        labels_of = {lbl for n in names for k in m.get(n, {}) for lbl, _ in k}
        for n in names:
            assert m.get(n), f"{n} (in {expr!r}) is not in a scrape"
        for grouped in re.findall(r"\bby \(([^)]*)\)", expr):
            for lbl in (x.strip() for x in grouped.split(",")):
                assert lbl in labels_of, (lbl, expr)
        for n, matchers in re.findall(r"\b(gateway_[a-z_]+)\{([^}]*)\}", expr):
            for lbl, op, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', matchers):
                values = {dict(k).get(lbl) for k in m[n]}
                hit = [v for v in values if v is not None and (re.fullmatch(value, v) if op == "=~" else v == value)]
                assert hit, (n, lbl, value, values)
    assert {"gateway_writer_dropped_total", "gateway_config_reloads_total", "gateway_upstream_errors_total",
            "gateway_ttfb_seconds_bucket"} <= named
