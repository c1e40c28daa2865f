"""``metrics``: Prometheus request metrics on the admin listener's ``/metrics``.

::

    - name: metrics

Every request that reached the chain is counted once, in ``on_complete``. The families are
registered once per registry (shared by plugin instances and config reloads). The core already
exports the background writers' queue depth / written / dropped counters and config reloads on the
same registry. See docs/metrics.md.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram
from pydantic import Field

from gateway.context import RequestContext
from gateway.plugin import Plugin, PluginConfig

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class MetricsConfig(PluginConfig):
    tokens: bool = Field(True, description="Count tokens by model and direction (needs the response observed).")
    latency_buckets: list[float] = Field(default_factory=lambda: list(LATENCY_BUCKETS),
                                         description="Histogram buckets (seconds) for total, upstream and TTFB.")
    overhead_buckets: list[float] = Field(default_factory=lambda: list(OVERHEAD_BUCKETS),
                                          description="Histogram buckets (seconds) for the gateway's own overhead.")


class _Families:
    def __init__(self, reg: Any, lat: tuple[float, ...], over: tuple[float, ...]) -> None:
        self.requests = Counter("gateway_requests", "Requests that reached the chain, by route, status and source",
                                ["route", "status", "source"], registry=reg)
        self.duration = Histogram("gateway_request_duration_seconds", "Total request time, first byte in to last out",
                                  ["route"], buckets=lat, registry=reg)
        self.upstream = Histogram("gateway_upstream_duration_seconds",
                                  "Time from sending upstream to the end of the response", ["route"],
                                  buckets=lat, registry=reg)
        self.overhead = Histogram("gateway_overhead_seconds",
                                  "Gateway's own time: total minus upstream time", ["route"],
                                  buckets=over, registry=reg)
        self.ttfb = Histogram("gateway_ttfb_seconds", "Time to the first response byte sent to the client",
                              ["route"], buckets=lat, registry=reg)
        self.tokens = Counter("gateway_tokens", "Tokens by model and direction, as the upstream reported them",
                              ["model", "direction"], registry=reg)
        self.auth_failures = Counter("gateway_auth_failures", "Requests refused by authentication, by reason",
                                     ["reason"], registry=reg)
        self.ratelimit = Counter("gateway_ratelimit_refusals", "Requests refused by a rate limit, by limit",
                                 ["limit"], registry=reg)
        self.upstream_errors = Counter("gateway_upstream_errors",
                                       "Upstream failures: error (unreachable), timeout, disconnected",
                                       ["kind"], registry=reg)
        # Label children looked up once (labels() takes a lock and builds keys on every call).
        self._routes: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._requests: dict[tuple[str, int, str], Any] = {}

    def route(self, route: str) -> tuple[Any, Any, Any, Any]:
        r = self._routes.get(route)
        if r is None:
            r = (self.duration.labels(route), self.upstream.labels(route), self.overhead.labels(route),
                 self.ttfb.labels(route))
            if len(self._routes) < 1000:
                self._routes[route] = r
        return r

    def request(self, route: str, status: int, source: str) -> Any:
        k = (route, status, source)
        c = self._requests.get(k)
        if c is None:
            c = self.requests.labels(route, str(status), source)
            if len(self._requests) < 10000:
                self._requests[k] = c
        return c


class Metrics(Plugin):
    name = "metrics"
    Config = MetricsConfig
    observes_response = True

    def __init__(self, config: MetricsConfig, services: Any) -> None:
        super().__init__(config, services)
        lat, over = tuple(config.latency_buckets), tuple(config.overhead_buckets)
        self.m: _Families = services.metric("metrics:families", lambda reg: _Families(reg, lat, over))

    async def on_complete(self, ctx: RequestContext) -> None:
        m = self.m
        m.request(ctx.route, ctx.status, ctx.source).inc()
        duration, upstream, overhead, ttfb = m.route(ctx.route)
        end = ctx.t_end
        if end is not None:
            total = end - ctx.t_start
            duration.observe(total)
            if ctx.t_upstream is not None:
                up = end - ctx.t_upstream
                upstream.observe(up)
                overhead.observe(max(total - up, 0.0))
            else:
                overhead.observe(total)
        if ctx.t_first_byte is not None:
            ttfb.observe(ctx.t_first_byte - ctx.t_start)
        c = ctx.completion
        if c is not None and c.usage and self.config.tokens:
            model = c.model or ctx.model or "unknown"
            if c.prompt_tokens:
                m.tokens.labels(model, "input").inc(c.prompt_tokens)
            if c.completion_tokens:
                m.tokens.labels(model, "output").inc(c.completion_tokens)
        r = ctx.refusal
        if r:
            kind = r.get("type")
            if kind == "auth":
                m.auth_failures.labels(str(r.get("reason") or "unknown")).inc()
            elif kind == "rate_limit":
                m.ratelimit.labels(str(r.get("limit") or r.get("reason") or "unknown")).inc()
        if ctx.outcome.startswith("upstream_"):
            m.upstream_errors.labels(ctx.outcome[len("upstream_"):]).inc()
