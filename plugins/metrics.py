"""``metrics``: Prometheus request metrics on the admin listener's ``/metrics``.

::

    - name: metrics

Every request that reached the chain is counted once, in ``on_complete``. The families are
registered once per registry (shared by plugin instances and config reloads). The core already
exports the background writers' queue depth / written / dropped counters and config reloads on the
same registry. See docs/metrics.md.
"""
from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from typing import Any, ClassVar, Iterator

import prometheus_client.metrics as _pm
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString
from pydantic import Field, field_validator

from gateway.context import RequestContext
from gateway.fastjson import utf8_safe
from gateway.plugin import Plugin, PluginConfig

log = logging.getLogger("gateway.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MAX_MODEL_LABELS = 200  # distinct `model` label values before the rest count as "other"
MAX_LABEL_CHARS = 128  # a label value from a client or the upstream is cut to this many characters
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: The label values counters are created with at 0 (an `increase(...) > 0` alert fires on the first
#: failure only if the series existed before it): the upstream failure kinds, and key_auth's refusal
#: reasons (when key_auth is in use).
UPSTREAM_ERROR_KINDS = ("error", "timeout", "disconnected")
AUTH_REASONS = ("missing", "malformed", "invalid", "revoked", "expired", "scope_model", "scope_path",
                "store_unavailable")


def label(value: Any) -> str:
    """A label value that came from a client or the upstream, as a scrape can always carry it:
    at most MAX_LABEL_CHARS characters (a megabyte model name would otherwise be in every scrape)
    and valid UTF-8 (a lone surrogate, valid in a JSON string, would make every scrape fail)."""
    s = value if type(value) is str else str(value)
    if len(s) > MAX_LABEL_CHARS:
        s = s[:MAX_LABEL_CHARS]
    return utf8_safe(s)


class MetricsConfig(PluginConfig):
    tokens: bool = Field(True, description="Count tokens by model and direction (needs the response observed).")
    latency_buckets: list[float] = Field(default_factory=lambda: list(LATENCY_BUCKETS),
                                         description="Histogram buckets (seconds) for total, upstream and TTFB.")
    overhead_buckets: list[float] = Field(default_factory=lambda: list(OVERHEAD_BUCKETS),
                                          description="Histogram buckets (seconds) for the gateway's own overhead.")

    @field_validator("latency_buckets", "overhead_buckets")
    @classmethod
    def _buckets(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one bucket")
        if any(not math.isfinite(b) or b <= 0 for b in v):
            raise ValueError("buckets are positive, finite numbers of seconds (+Inf is always added)")
        if len(set(v)) != len(v):
            raise ValueError("a bucket is listed twice")
        return sorted(v)


def _created() -> bool:
    return getattr(_pm, "_use_created", True)  # PROMETHEUS_DISABLE_CREATED_SERIES, as prometheus-client


class _Hist:
    """One label value's histogram: per-bucket counts (the last one is +Inf), sum, creation time."""

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1  # first bucket with v <= le
        self.sum += v


class _HistFamily:
    def __init__(self, name: str, doc: str, label: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.bounds = tuple(sorted(bounds))
        self.les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self.children: dict[str, _Hist] = {}

    def child(self, value: str) -> _Hist:
        h = self.children.get(value)
        if h is None:
            h = self.children[value] = _Hist(self.bounds)
        return h

    def set_bounds(self, bounds: tuple[float, ...]) -> bool:
        """New buckets (a config reload): the family's series start again from zero, as after a
        restart. False when they are the same."""
        bounds = tuple(sorted(bounds))
        if bounds == self.bounds:
            return False
        self.bounds = bounds
        self.les = [floatToGoString(b) for b in bounds] + ["+Inf"]
        self.children = {}
        return True

    def collect(self, created: bool) -> Metric:
        m = Metric(self.name, self.doc, "histogram")
        name, label = self.name, self.label
        for value, h in list(self.children.items()):
            acc = 0.0
            for le, n in zip(self.les, list(h.counts)):
                acc += n
                m.add_sample(name + "_bucket", {label: value, "le": le}, acc)
            m.add_sample(name + "_count", {label: value}, acc)
            m.add_sample(name + "_sum", {label: value}, h.sum)
            if created:
                m.add_sample(name + "_created", {label: value}, h.created)
        return m


class _CounterFamily:
    """Counter values by label tuple: [value, created] lists updated in place."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.children: dict[tuple[str, ...], list[float]] = {}

    def child(self, *values: str) -> list[float]:
        c = self.children.get(values)
        if c is None:
            c = self.children[values] = [0, time.time()]
        return c

    def inc(self, *values: str, amount: float = 1) -> None:
        self.child(*values)[0] += amount

    def collect(self, created: bool) -> Metric:
        m = Metric(self.name, self.doc, "counter")
        for values, (v, t) in list(self.children.items()):
            labels = dict(zip(self.labels, values))
            m.add_sample(self.name + "_total", labels, v)
            if created:
                m.add_sample(self.name + "_created", labels, t)
        return m


class _Families:
    """The plugin's metric families, exposed through one registry collector.

    Updated on the event loop with plain integer/float arithmetic (no locks, no per-call label
    handling); the Prometheus samples are only built when /metrics is scraped. The exposition is
    the same as prometheus-client's Counter and Histogram (``_total``/``_bucket``/``_count``/
    ``_sum``/``_created``)."""

    def __init__(self, reg: Any, lat: tuple[float, ...], over: tuple[float, ...]) -> None:
        self.requests = _CounterFamily("gateway_requests", "Requests that reached the chain, by route, status and source",
                                       ("route", "status", "source"))
        self.duration = _HistFamily("gateway_request_duration_seconds", "Total request time, first byte in to last out",
                                    "route", lat)
        self.upstream = _HistFamily("gateway_upstream_duration_seconds",
                                    "Time from sending upstream to the end of the response", "route", lat)
        self.overhead = _HistFamily("gateway_overhead_seconds",
                                    "Gateway's own time: total minus upstream time, i.e. until the request was sent "
                                    "upstream (the whole request when it never was); the work on the response "
                                    "(per chunk, for a stream) is counted in upstream time", "route", over)
        self.ttfb = _HistFamily("gateway_ttfb_seconds", "Time to the first response byte sent to the client",
                                "route", lat)
        self.tokens = _CounterFamily("gateway_tokens", "Tokens by model and direction, as the upstream reported them "
                                     "(a stream cut short before its usage: the deltas relayed)",
                                     ("model", "direction"))
        self.auth_failures = _CounterFamily("gateway_auth_failures", "Requests refused by authentication, by reason",
                                            ("reason",))
        self.ratelimit = _CounterFamily("gateway_ratelimit_refusals", "Requests refused by a rate limit, by limit",
                                        ("limit",))
        self.upstream_errors = _CounterFamily("gateway_upstream_errors",
                                              "Upstream failures: error (unreachable), timeout, disconnected", ("kind",))
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.child(kind)
        self._capped = False  # the model label cap was reached (said once in the log)
        self._families = (self.requests, self.duration, self.upstream, self.overhead, self.ttfb, self.tokens,
                          self.auth_failures, self.ratelimit, self.upstream_errors)
        # Per-route and per-(route, status, source) children looked up with one dict get per request.
        self._routes: dict[str, tuple[_Hist, _Hist, _Hist, _Hist]] = {}
        self._requests: dict[tuple[str, int, str], list[float]] = {}
        self._tokens: dict[tuple[str, str], list[float]] = {}
        reg.register(self)

    def set_buckets(self, lat: tuple[float, ...], over: tuple[float, ...]) -> None:
        changed = [f.set_bounds(b) for f, b in ((self.duration, lat), (self.upstream, lat), (self.ttfb, lat),
                                                (self.overhead, over))]
        if any(changed):
            self._routes.clear()

    def keep_routes(self, routes: set[str]) -> None:
        """Drop the series of routes no longer configured (a reload removed or renamed them), so
        they do not stay in every scrape for as long as the process runs. A request still finishing
        on the old chain may create its route's series again; that is one series, not a leak."""
        for f in (self.duration, self.upstream, self.overhead, self.ttfb):
            for r in [r for r in f.children if r not in routes]:
                del f.children[r]
        for r in [r for r in self._routes if r not in routes]:
            del self._routes[r]
        for k in [k for k in self.requests.children if k[0] not in routes]:
            del self.requests.children[k]
        for k2 in [k2 for k2 in self._requests if k2[0] not in routes]:
            del self._requests[k2]

    # -- prometheus-client collector protocol -------------------------------------------------------
    def describe(self) -> Iterator[Metric]:
        for f in self._families:
            yield Metric(f.name, f.doc, "histogram" if isinstance(f, _HistFamily) else "counter")

    def collect(self) -> Iterator[Metric]:
        created = _created()
        for f in self._families:
            yield f.collect(created)

    # -- hot path -----------------------------------------------------------------------------------
    def route(self, route: str) -> tuple[_Hist, _Hist, _Hist, _Hist]:
        r = self._routes.get(route)
        if r is None:
            r = self._routes[route] = (self.duration.child(route), self.upstream.child(route),
                                       self.overhead.child(route), self.ttfb.child(route))
        return r

    def request(self, route: str, status: int, source: str) -> list[float]:
        k = (route, status, source)
        c = self._requests.get(k)
        if c is None:
            c = self._requests[k] = self.requests.child(route, str(status), source)
        return c

    def token_counters(self, model: str) -> tuple[list[float], list[float]]:
        c = self._tokens.get(model)
        if c is None:
            # The model name comes from the upstream, which may echo whatever a client asked for:
            # cap the label values so a caller inventing model names cannot grow the series
            # without bound (and say so once: later models then count as "other").
            if len(self._tokens) >= MAX_MODEL_LABELS:
                if not self._capped:
                    self._capped = True
                    log.warning("metrics: %d distinct model names have a gateway_tokens_total series (the most "
                                "kept); tokens of every further model, %r first, are counted under "
                                "model=\"other\" until the gateway restarts. See which models took the places "
                                "with: count by (model) (gateway_tokens_total); the audit trail keeps each "
                                "request's model (response_model)", MAX_MODEL_LABELS, model)
                model = "other"
                c = self._tokens.get(model)
                if c is not None:
                    return c
            c = self._tokens[model] = (self.tokens.child(model, "input"), self.tokens.child(model, "output"))
        return c


class Metrics(Plugin):
    name = "metrics"
    Config = MetricsConfig
    observes_response = True
    #: The histogram families are shared by every route (one set of buckets per process): a route's
    #: override of them would change every route's histograms, and reset them on every reload.
    route_fixed: ClassVar[tuple[str, ...]] = ("latency_buckets", "overhead_buckets")

    def __init__(self, config: MetricsConfig, services: Any) -> None:
        super().__init__(config, services)
        lat, over = tuple(config.latency_buckets), tuple(config.overhead_buckets)
        self.m: _Families = services.metric("metrics:families", lambda reg: _Families(reg, lat, over))
        self.tokens = config.tokens

    def activated(self) -> None:
        # The families are shared by every instance and kept across reloads; the instance activated
        # last (a reload's new config) brings its buckets.
        self.m.set_buckets(tuple(self.config.latency_buckets), tuple(self.config.overhead_buckets))
        gw = getattr(self.services, "gateway", None)
        rt = getattr(gw, "runtime", None)
        if rt is not None and self in rt.instances:
            if "key_auth" in rt.in_use:  # its refusal reasons, at 0 before the first one
                for reason in AUTH_REASONS:
                    self.m.auth_failures.child(reason)
            self.m.keep_routes({c.name for c in rt.all_chains})

    async def on_complete(self, ctx: RequestContext) -> None:
        m = self.m
        m.request(ctx.route, ctx.status, ctx.source)[0] += 1
        duration, upstream, overhead, ttfb = m.route(ctx.route)
        t_start = ctx.t_start
        end = ctx.t_end
        if end is not None:
            total = end - t_start
            duration.observe(total)
            t_up = ctx.t_upstream
            if t_up is not None:
                upstream.observe(end - t_up)
                overhead.observe(max(t_up - t_start, 0.0))
            else:
                overhead.observe(total)
        if ctx.t_first_byte is not None:
            ttfb.observe(ctx.t_first_byte - t_start)
        c = ctx.completion
        if c is not None and self.tokens:
            # a stream without a usage report (or a valid output count in it): the deltas relayed,
            # as key_auth counts them
            tin, tout = c.input_tokens, c.relayed_tokens
            if tout is None:
                tout = c.completion_tokens
            if (type(tin) is int and tin > 0) or (type(tout) is int and tout > 0):
                # The model the upstream says answered: the request's is the client's free input
                # (and not what was billed, when the upstream maps it). An answer too large to read
                # whole names it too: the observer reads it from its first or last bytes.
                cin, cout = m.token_counters(label(c.model or "unknown"))
                if type(tin) is int and tin > 0:
                    cin[0] += tin
                if type(tout) is int and tout > 0:
                    cout[0] += tout
        elif ctx.cut_estimate and self.tokens:  # cut before the head: the prompt the upstream read
            m.token_counters(label("unknown"))[0][0] += ctx.cut_estimate
        r = ctx.refusal
        if r:
            kind = r.get("type")
            if kind == "auth":
                m.auth_failures.inc(label(r.get("reason") or "unknown"))
            elif kind == "rate_limit":
                m.ratelimit.inc(label(r.get("limit") or r.get("reason") or "unknown"))
        outcome = ctx.outcome
        if outcome.startswith("upstream_"):
            m.upstream_errors.inc(outcome[9:])
