"""Prometheus metrics scraped from the admin /metrics and checked against the traffic sent, and the
core's optional Server-Timing header."""
from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .helpers import ADMIN_TOKEN, free_port

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "count my tokens please"}]}
T = aiohttp.ClientTimeout(total=20)


async def scrape(s: aiohttp.ClientSession, admin_url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    async with s.get(admin_url + "/metrics", headers=AUTH) as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[smp.name][tuple(sorted(smp.labels.items()))] = smp.value
    return out


def total(samples: dict[tuple[tuple[str, str], ...], float], **match: str) -> float:
    return sum(v for k, v in samples.items() if all(dict(k).get(a) == b for a, b in match.items()))


async def chat(s: aiohttp.ClientSession, url: str, stream: bool = False, **headers: str) -> tuple[int, dict[str, Any] | None]:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}} if stream else CHAT
    async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        try:
            raw = await r.read()
        except aiohttp.ClientPayloadError:  # an upstream that died mid-stream: the gateway cuts too
            return r.status, None
        if r.status != 200:
            return r.status, None
        if not stream:
            return r.status, json.loads(raw).get("usage")
        usage = None
        for line in raw.decode().splitlines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
        return r.status, usage


async def test_metrics_match_the_traffic(make_gateway):
    g = await make_gateway([{"name": "key_auth"}, {"name": "rate_limit"}, {"name": "metrics"}])
    dead = await make_gateway([{"name": "metrics"}], name="dead.yaml",
                              upstream={"url": f"http://127.0.0.1:{free_port()}"})
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.admin_url + "/metrics") as r:
            assert r.status == 401
        keys = {}
        for owner, extra in (("alice", {}), ("bob", {"limits": {"rpm": 2}})):
            async with s.post(g.admin_url + "/keys", json={"owner": owner, **extra}, headers=AUTH) as r:
                keys[owner] = {"Authorization": "Bearer " + (await r.json())["key"]}
        a, b = keys["alice"], keys["bob"]
        jobs = ([chat(s, g.url, **a) for _ in range(10)]
                + [chat(s, g.url, stream=True, **a) for _ in range(6)]
                + [chat(s, g.url, **a, **{"X-Demo-Status": "500"}) for _ in range(4)]
                + [chat(s, g.url) for _ in range(3)]
                + [chat(s, g.url, Authorization="Bearer not-a-gateway-key") for _ in range(2)]
                + [chat(s, g.url, stream=True, **a, **{"X-Demo-Die-After": "2", "X-Demo-Words": "20"})])
        results = list(await asyncio.gather(*jobs))
        for _ in range(4):  # bob: 2 allowed, then refused
            results.append(await chat(s, g.url, **b))
        dead_results = await asyncio.gather(*(chat(s, dead.url) for _ in range(3)))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 200
        m = await scrape(s, g.admin_url)
        md = await scrape(s, dead.admin_url)

    sent = Counter(st for st, _ in results)
    assert sent == {200: 10 + 6 + 1 + 2, 500: 4, 401: 5, 429: 2}
    reqs = m["gateway_requests_total"]
    for status, n in sent.items():
        assert total(reqs, status=str(status)) == n, status
    assert total(reqs, source="upstream") == 10 + 6 + 1 + 2 + 4
    assert total(reqs, source="gateway") == 5 + 2
    assert total(reqs, route="default") == len(results)

    usages = [u for st, u in results if u]
    assert len(usages) == 10 + 6 + 2
    # The stream the upstream cut after 2 chunks reported no usage: its prompt counts as the
    # gateway's estimate (characters / 4), and its 2 relayed deltas as its output.
    estimate = (len(CHAT["messages"][0]["content"]) + 3) // 4
    assert total(m["gateway_tokens_total"], model="demo-chat", direction="input") == \
        sum(u["prompt_tokens"] for u in usages) + estimate
    assert total(m["gateway_tokens_total"], model="demo-chat", direction="output") == \
        sum(u["completion_tokens"] for u in usages) + 2

    assert total(m["gateway_auth_failures_total"]) == 5
    assert total(m["gateway_auth_failures_total"], reason="missing") == 3
    assert total(m["gateway_ratelimit_refusals_total"]) == 2
    assert total(m["gateway_upstream_errors_total"], kind="disconnected") == 1
    # the upstream's own 500 answers are answers (counted by status), not failures to reach it
    assert total(m.get("gateway_upstream_errors_total", {}), kind="error") == 0
    assert total(m["gateway_request_duration_seconds_count"], route="default") == len(results)
    assert total(m["gateway_ttfb_seconds_count"], route="default") == len(results)
    assert total(m["gateway_upstream_duration_seconds_count"], route="default") == 10 + 6 + 1 + 2 + 4
    assert total(m["gateway_overhead_seconds_count"], route="default") == len(results)
    assert total(m["gateway_request_duration_seconds_sum"]) >= total(m["gateway_upstream_duration_seconds_sum"])
    assert total(m["gateway_config_reloads_total"], result="success") == 1
    assert "gateway_writer_queue_depth" in m  # the core's background writers (key_auth usage)

    assert [st for st, _ in dead_results] == [502] * 3
    assert total(md["gateway_requests_total"], status="502", source="gateway") == 3
    assert total(md["gateway_upstream_errors_total"], kind="error") == 3
    assert total(md["gateway_upstream_duration_seconds_count"]) == 3  # time spent trying


async def test_server_timing_header(make_gateway):
    on = await make_gateway([{"name": "headers", "config": {"response": {"X-A": "1"}}}, {"name": "metrics"}],
                            server={"server_timing": True})
    off = await make_gateway([{"name": "metrics"}], name="off.yaml")
    small = await make_gateway([{"name": "metrics"}], name="small.yaml",
                               server={"server_timing": True, "max_body_size": 2000})
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(on.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            st = r.headers["Server-Timing"]
        async with s.post(small.url + "/v1/chat/completions", data=b"x" * 3000) as r:
            assert r.status == 413 and "Server-Timing" not in r.headers  # nothing ran: no empty header
        async with s.post(off.url + "/v1/chat/completions", json=CHAT) as r:
            assert "Server-Timing" not in r.headers
    parts = dict(p.strip().split(";dur=") for p in st.split(","))
    assert set(parts) >= {"headers", "upstream"}
    assert all(float(v) >= 0 for v in parts.values())


def test_exposition_matches_prometheus_client_for_the_same_observations():
    """The plugin's lock-free families print exactly what prometheus-client's Counter/Histogram would."""
    from prometheus_client import CollectorRegistry, Counter as PCounter, Histogram, generate_latest

    from gateway.plugins.metrics import LATENCY_BUCKETS, OVERHEAD_BUCKETS, _Families

    ours, ref = CollectorRegistry(), CollectorRegistry()
    fam = _Families(ours, LATENCY_BUCKETS, OVERHEAD_BUCKETS)
    hist = Histogram("gateway_request_duration_seconds", "Total request time, first byte in to last out",
                     ["route"], buckets=LATENCY_BUCKETS, registry=ref)
    reqs = PCounter("gateway_requests", "Requests that reached the chain, by route, status and source",
                    ["route", "status", "source"], registry=ref)
    values = [0.0, 0.005, 0.0050001, 0.01, 0.3, 299.9, 300.0, 300.1, 1e9] + list(LATENCY_BUCKETS)
    for i, v in enumerate(values):
        route = "a" if i % 3 else "b"
        fam.route(route)[0].observe(v)
        hist.labels(route).observe(v)
        fam.request(route, 200 + i % 2, "upstream")[0] += 1
        reqs.labels(route, str(200 + i % 2), "upstream").inc()

    def lines(reg: CollectorRegistry, names: tuple[str, ...]) -> list[str]:
        text = generate_latest(reg).decode()
        return sorted(x for x in text.splitlines() if x.startswith(names) and "_created" not in x)

    names = ("gateway_request_duration_seconds", "gateway_requests_total")
    assert lines(ours, names) == lines(ref, names)
    assert any('le="0.005"' in x and x.endswith(" 2.0") for x in lines(ours, names) if 'route="b"' in x)


async def test_model_label_values_are_capped(make_gateway):
    """Model names come from callers: past MAX_MODEL_LABELS distinct values they count as "other"."""
    import aiohttp

    from gateway.plugins import metrics as m

    g = await make_gateway([{"name": "metrics"}])
    fam = g.plugin("metrics")
    old = m.MAX_MODEL_LABELS
    m.MAX_MODEL_LABELS = 3
    try:
        async with aiohttp.ClientSession() as s:
            for i in range(6):
                async with s.post(g.url + "/v1/chat/completions",
                                  json={"model": f"made-up-{i}", "messages": [{"role": "user", "content": "hi"}]}) as r:
                    assert r.status == 200
            async with s.get(g.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                text = await r.text()
    finally:
        m.MAX_MODEL_LABELS = old
    models = {line.split('model="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("gateway_tokens_total{")}
    assert models == {"made-up-0", "made-up-1", "made-up-2", "other"}, (models, fam)


async def test_bucket_change_by_reload(make_gateway, upstream, tmp_path):
    """A reload with other buckets: the histograms show the new buckets at once and start from zero;
    the request counter keeps counting."""
    from pathlib import Path

    from .helpers import base_config, write_config
    g = await make_gateway([{"name": "metrics"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        for _ in range(3):
            assert (await chat(s, g.url))[0] == 200
        before = await scrape(s, g.admin_url)
        assert total(before["gateway_request_duration_seconds_count"]) == 3
        write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, [{"name": "metrics", "config": {
            "latency_buckets": [0.5, 60], "overhead_buckets": [0.25]}}]))
        ok, detail = await g.gw.reload(actor="test")
        assert ok, detail
        assert (await chat(s, g.url))[0] == 200
        after = await scrape(s, g.admin_url)
    les = {dict(k)["le"] for k in after["gateway_request_duration_seconds_bucket"]}
    assert les == {"0.5", "60.0", "+Inf"}
    assert {dict(k)["le"] for k in after["gateway_overhead_seconds_bucket"]} == {"0.25", "+Inf"}
    assert total(after["gateway_request_duration_seconds_count"]) == 1
    assert total(after["gateway_ttfb_seconds_count"]) == 1
    assert total(after["gateway_requests_total"]) == total(before["gateway_requests_total"]) + 1 == 4


def test_buckets_that_would_break_the_exposition_are_refused(tmp_path):
    from gateway.config import ConfigError, load_config

    from .helpers import base_config, write_config
    for bad in ([0.5, 0.5, 1], [0.5, float("inf")], [], [-1, 1]):
        p = write_config(tmp_path / "g.yaml", base_config("http://127.0.0.1:9", tmp_path, [
            {"name": "metrics", "config": {"latency_buckets": bad}}]))
        try:
            load_config(p)
        except ConfigError as e:
            assert "plugins[0].config.latency_buckets" in str(e)
        else:
            raise AssertionError(f"accepted {bad}")
