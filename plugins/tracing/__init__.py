"""``tracing``: OpenTelemetry spans for every request, exported over OTLP.

Per request (when sampled):

* a SERVER span from ``opentelemetry-instrumentation-aiohttp-server``, continuing the caller's W3C
  ``traceparent``; the gateway adds request id, route, outcome, key id and owner (never the key);
* a CLIENT span for the upstream call from ``opentelemetry-instrumentation-aiohttp-client``, which also
  sends the trace context upstream;
* one INTERNAL span per plugin and hook that ran (``key_auth.on_request`` ...), from the core's timings;
* a ``chat <model>`` span (``text_completion``, ``embeddings``) covering the model exchange from the
  upstream request to the last byte, with the GenAI semantic-convention attributes.

The plugin uses its own TracerProvider, never the global one. Its only hook is ``on_complete``, which
returns at once for unsampled requests; span export happens on a background thread through a bounded
queue, so a slow or dead collector costs requests nothing (when the queue is full the oldest queued
span makes room; every span lost is counted in gateway_tracing_spans_dropped_total).
"""
from __future__ import annotations

import json
import re
import time
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import Field, ValidationInfo, field_validator

from gateway.context import RequestContext, caller_key_id
from gateway.fastjson import utf8_safe
from gateway.plugin import Plugin, PluginConfig

from . import genai
from .otel import (SERVER_SPAN, URL_SERVER_ATTRS, ActiveTracerProvider, ProviderEntry, Providers, dropped_counter,
                   gate_client_trace_config, note_key_headers, prepare_server_instrumentation, redact_query,
                   sensitive_header_patterns, server_middleware)

#: Paths whose name is a fixed, low-cardinality endpoint: the server span is named after them.
_KNOWN_ENDPOINTS = ("/chat/completions", "/completions", "/embeddings", "/models", "/moderations", "/responses",
                    "/audio/speech", "/audio/transcriptions", "/audio/translations", "/images/generations")
_KNOWN_PATHS = frozenset(_KNOWN_ENDPOINTS) | frozenset("/v1" + p for p in _KNOWN_ENDPOINTS)


class ExporterConfig(PluginConfig):
    type: Literal["otlp_http", "otlp_grpc", "console", "none", "memory"] = Field(
        "otlp_http", description="Where spans go: OTLP over HTTP/protobuf or gRPC, the console (stdout), "
        "nowhere (`none`: tracing off, the caller's traceparent is passed on untouched), or `memory` "
        "(kept in process: for tests).")
    endpoint: str | None = Field(
        None, description="Collector URL. Unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then "
        "OTEL_EXPORTER_OTLP_ENDPOINT, then the OTLP default (http://localhost:4318/v1/traces for HTTP, "
        "localhost:4317 for gRPC). For HTTP, a URL without a path gets /v1/traces appended.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Headers sent with every export (e.g. a vendor API key: use "
        "${VAR}). Empty: OTEL_EXPORTER_OTLP_TRACES_HEADERS / OTEL_EXPORTER_OTLP_HEADERS.")
    timeout: float | None = Field(
        None, gt=0, le=3600, description="Seconds per export request (retries included). Unset: "
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT / OTEL_EXPORTER_OTLP_TIMEOUT, else 10.")
    insecure: bool | None = Field(
        None, description="gRPC only: plaintext connection. Unset: from the endpoint scheme "
        "(http:// is plaintext) or OTEL_EXPORTER_OTLP_INSECURE.")

    @field_validator("endpoint", mode="before")
    @classmethod
    def _blank(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    # Messages below never quote a header value or the endpoint: either may hold a credential, and a
    # config error goes to the terminal and the log.
    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        v = v.strip()
        kind = info.data.get("type")
        if any(c.isspace() or not c.isprintable() for c in v):
            raise ValueError("the endpoint must not contain spaces or control characters")
        has_scheme = "://" in v
        if kind == "otlp_http" and not has_scheme:
            raise ValueError("the endpoint must be an http:// or https:// URL (e.g. http://collector:4318)")
        try:
            u = urlsplit(v if has_scheme else "//" + v)
        except ValueError:
            raise ValueError("the endpoint is not a valid URL") from None
        scheme = u.scheme.lower()
        if "@" in u.netloc:
            raise ValueError("the endpoint must not contain a user name or password (user:pass@): put the "
                             "collector's credentials in exporter.headers (e.g. authorization: ${VAR})")
        if kind == "otlp_http" and scheme not in ("http", "https"):
            raise ValueError("the endpoint must be an http:// or https:// URL (e.g. http://collector:4318)")
        if kind in ("otlp_http", "otlp_grpc") and scheme in ("http", "https", ""):
            if not u.hostname:
                raise ValueError("the endpoint has no host (e.g. http://collector:4318)")
            try:
                port = u.port
            except ValueError:
                port = 0
            if port == 0 or (port is None and u.netloc.endswith(":")):
                raise ValueError("the endpoint's port must be a number from 1 to 65535")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        """Surrounding whitespace goes (a secret file's trailing newline, read through ${VAR}); what
        no HTTP library would send is refused here, not at every export. gRPC metadata keys are
        lower case and its values printable ASCII."""
        from gateway.config.loader import shown_key

        grpc = info.data.get("type") == "otlp_grpc"
        out: dict[str, str] = {}
        for name, value in v.items():
            n = name.strip()
            if not _HEADER_NAME.match(n):
                raise ValueError(f"{shown_key(n)!r} is not a valid header name")
            if grpc:
                n = n.lower()
            if n.lower() in {k.lower() for k in out}:
                raise ValueError(f"header {n!r} is given twice (names are case-insensitive)")
            val = value.strip()
            why = _header_value_problem(val, grpc)
            if why:
                raise ValueError(f"the value of header {n!r} {why} (the value is not shown)")
            out[n] = val
        return out

    @field_validator("type", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header_value_problem(value: str, grpc: bool) -> str | None:
    """Why ``value`` cannot be sent as a header value (None if it can); never quotes it."""
    if "\r" in value or "\n" in value:
        return "contains a line break (CR/LF)"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "contains a control character"
    if grpc and not value.isascii():
        return "contains non-ASCII characters (gRPC metadata must be printable ASCII)"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return "contains characters outside Latin-1 (HTTP header values are bytes: use ASCII)"
    return None


class BatchConfig(PluginConfig):
    max_queue_size: int = Field(2048, ge=1, description="Finished spans waiting for export (never blocks a "
                                "request). When it is full, the oldest queued span is dropped to make room "
                                "for the new one (counted in gateway_tracing_spans_dropped_total).")
    max_export_batch_size: int = Field(512, ge=1, description="Spans per export request.")
    schedule_delay_ms: int = Field(1000, ge=1, le=3_600_000, description="Export at least this often (milliseconds).")
    shutdown_timeout: float = Field(5.0, ge=0, le=3600, description="Seconds to flush pending spans at shutdown "
                                    "or when a reload retires this exporter; what is left is dropped.")


class TracingConfig(PluginConfig):
    exporter: ExporterConfig = Field(default_factory=ExporterConfig, description="Span exporter.")
    sampling_ratio: float | None = Field(
        None, ge=0, le=1, description="Fraction of new traces recorded, parent-based (a caller's sampled "
        "flag is followed). Unset: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, else always on.")
    service_name: str | None = Field(
        None, description="service.name resource attribute. Unset: OTEL_SERVICE_NAME, else `gateway`. "
        "OTEL_RESOURCE_ATTRIBUTES are added either way.")
    record_content: bool = Field(
        False, description="Put prompt and completion text on the GenAI span (gen_ai.input.messages, "
        "gen_ai.output.messages). Off by default: traces often reach more people than the data should.")
    max_content_chars: int = Field(4096, ge=16, description="With record_content: each text part is cut "
                                   "to this many characters.")
    plugin_spans: bool = Field(True, description="A span per plugin hook that ran (from the core's timings).")
    genai_span: bool = Field(True, description="GenAI attributes on their own `chat <model>` CLIENT span "
                             "(the semantic conventions' shape). false: on the server span instead, one span "
                             "fewer per request.")
    genai_provider: str = Field("openai", description="gen_ai.provider.name on the GenAI span (the "
                                "upstream's API flavour); empty to leave it out.")
    max_attribute_chars: int = Field(
        8192, ge=128, description="Every string span attribute (the instrumentations' too: URL, user "
        "agent) is cut to this many characters (the SDK's SpanLimits). With record_content, the message "
        "attributes too: raise it if whole conversations must fit.")
    batch: BatchConfig = Field(default_factory=BatchConfig, description="Background export queue.")

    def provider_key(self) -> str:
        """Settings that make a provider; instances that agree on them share one."""
        return json.dumps({"e": self.exporter.model_dump(), "s": self.sampling_ratio, "n": self.service_name,
                           "b": self.batch.model_dump(), "l": self.max_attribute_chars}, sort_keys=True)


class Tracing(Plugin):
    name = "tracing"
    Config = TracingConfig
    wants_timings = True
    header_safe = True  # its on_request only passes the trace context on and asks for usage
    config: TracingConfig

    _RESOURCE: ClassVar[str] = "tracing:providers"

    def __init__(self, config: TracingConfig, services: Any) -> None:
        super().__init__(config, services)
        self.entry: ProviderEntry | None = None
        self._chains: dict[Any, Tracing | None] = {}  # this runtime's chains -> their tracing instance
        if config.exporter.type == "none":
            self.unused_hooks = frozenset({"on_request", "on_complete"})  # nothing is recorded

    # -- lifecycle --------------------------------------------------------------------------------
    def _providers(self) -> Providers:
        return self.services.resource(self._RESOURCE, Providers, lambda p: p.close())

    async def startup(self) -> None:
        if self.config.exporter.type != "none":
            # The headers key_auth reads keys from are credentials too (the config being started:
            # at a reload, the new one).
            note_key_headers(_key_auth_headers(self.services.settings))
            prepare_server_instrumentation()
            p = self._providers()
            if p.dropped is None:
                p.dropped = dropped_counter(self.services)
        self.entry = self._providers().acquire(self.config)

    async def shutdown(self) -> None:
        entry, self.entry = self.entry, None
        await self._providers().release(self.config, entry)

    @property
    def memory_exporter(self) -> Any:
        """The InMemorySpanExporter when ``exporter.type`` is ``memory`` (tests), else None."""
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        e = self.entry.exporter if self.entry is not None else None
        return e if isinstance(e, InMemorySpanExporter) else None

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export what is queued now (blocking; for tests and tools, not the request path)."""
        return self.entry.provider.force_flush(int(timeout_s * 1000)) if self.entry is not None else True

    # -- what the core collects once at start-up ----------------------------------------------------
    # One middleware and one TraceConfig per process, whatever the instances: they find the
    # instance serving the request themselves.
    def middlewares(self) -> list[Any]:
        if self.config.exporter.type == "none":
            return []
        p = self._providers()
        if p.middleware is None:
            p.middleware = server_middleware(self.services, _find)
        return [p.middleware]

    def trace_configs(self) -> list[Any]:
        if self.config.exporter.type == "none":
            return []
        p = self._providers()
        if p.trace_config is None:
            from opentelemetry.instrumentation import aiohttp_server as srv
            from opentelemetry.instrumentation.aiohttp_client import create_trace_config

            prepare_server_instrumentation()  # so the client follows the same semantic-convention mode
            tc = create_trace_config(tracer_provider=ActiveTracerProvider(),
                                     sem_conv_opt_in_mode=srv._sem_conv_opt_in_mode,
                                     sensitive_headers=sensitive_header_patterns(), url_filter=redact_query)
            p.trace_config = gate_client_trace_config(tc)
        return [p.trace_config]

    # -- per request ----------------------------------------------------------------------------------
    async def on_request(self, ctx: RequestContext) -> None:
        # Only a recorded span carries usage, models and finish reasons: an unsampled request does
        # not pay for watching the response. Its upstream call skips the client instrumentation,
        # so the context (sampled flag off) is passed on here.
        if SERVER_SPAN in ctx.request:
            ctx.want_usage()
        elif self.entry is not None and self.config.exporter.type != "none":
            inject(ctx.upstream_headers)

    async def on_complete(self, ctx: RequestContext) -> None:
        span = ctx.request.get(SERVER_SPAN)
        if span is None or not span.is_recording() or self.entry is None:
            return
        cfg = self.config
        # One clock pairing per request: perf_counter seconds -> epoch nanoseconds.
        offset = time.time_ns() - int(time.perf_counter() * 1e9)

        def ns(t: float) -> int:
            return int(t * 1e9) + offset

        attrs = span.attributes
        for k, v in list(attrs.items()):  # e.g. a user agent with bytes that are not UTF-8
            if type(v) is str and not v.isascii():
                safe = utf8_safe(v)
                if safe is not v:
                    span.set_attribute(k, safe)
        # (captured credential headers are redacted at capture and at export: otel.redact_headers)
        for k in URL_SERVER_ATTRS:  # a key or token a client put in the query string, or a key in the path
            v = attrs.get(k)
            if isinstance(v, str) and ("=" in v or "gw" in v):
                r = redact_query(v)
                if r != v:
                    span.set_attribute(k, r)
        a: dict[str, Any] = {"client.address": ctx.client_ip,  # (as trusted_proxies resolve it)
                             "gateway.request_id": ctx.request_id, "gateway.route": ctx.route,
                             "gateway.outcome": ctx.outcome, "gateway.source": ctx.source,
                             "gateway.streamed": ctx.streamed, "gateway.bytes_in": ctx.bytes_in,
                             "gateway.bytes_out": ctx.bytes_out}
        ident = _identity(ctx)
        a.update(ident)
        if ctx.error:
            a["gateway.error"] = genai.text(ctx.error)
        r = ctx.refusal
        if r:
            for k in ("plugin", "type", "reason"):
                if r.get(k) is not None:
                    a[f"gateway.refusal.{k}"] = genai.text(r[k])
        if ctx.path in _KNOWN_PATHS:  # the API's own paths only: a client cannot invent span names
            span.update_name(f"{ctx.method} {ctx.path}")
            a["http.route"] = ctx.path
        if ctx.status and "http.status_code" not in attrs and "http.response.status_code" not in attrs:
            # The response began, then the client went away (or a shutdown cut the stream): the
            # instrumentation never gets to record the status it sent.
            stable = "http.request.method" in attrs
            a["http.response.status_code" if stable else "http.status_code"] = ctx.status
            if stable and "http.method" in attrs:  # (http/dup: both names)
                a["http.status_code"] = ctx.status
        failed = _failure(ctx)
        if failed is not None:
            # The exchange failed or was cut, whatever status (if any) went out first: a 200 stream
            # the upstream broke off, a client gone before the response head (status 0).
            a["error.type"] = failed
            span.set_status(Status(StatusCode.ERROR, failed))
        elif ctx.status >= 500:  # (the instrumentation marks a 5xx too, when it records the status)
            a["error.type"] = str(ctx.status)
            span.set_status(Status(StatusCode.ERROR, str(ctx.status)))
        span.set_attributes(a)

        tracer = self.entry.gateway_tracer
        parent = trace.set_span_in_context(span)
        if cfg.plugin_spans and ctx.timings:
            groups: dict[tuple[str, str], list[Any]] = {}
            for name, phase, t0, t1 in ctx.timings:
                if name == self.name:
                    continue  # its own bookkeeping is not a step of the request
                g = groups.get((name, phase))
                if g is None:
                    groups[(name, phase)] = [t0, t1, 1, t1 - t0]
                else:
                    g[1] = t1
                    g[2] += 1
                    g[3] += t1 - t0
            for (name, phase), (t0, t1, n, busy) in groups.items():
                pa: dict[str, Any] = {"gateway.plugin": name, "gateway.plugin.hook": f"on_{phase}"}
                if n > 1:
                    pa["gateway.plugin.calls"] = n
                    pa["gateway.plugin.busy_ms"] = round(busy * 1000, 3)
                s = tracer.start_span(f"{name}.on_{phase}", parent, SpanKind.INTERNAL, pa, start_time=ns(t0))
                s.end(end_time=ns(t1))

        op = genai.operation(ctx.lpath) if ctx.method == "POST" else None
        if op is not None and ctx.t_upstream is not None:
            ga = genai.attributes(op, ctx, cfg.genai_provider, cfg.record_content, cfg.max_content_chars)
            ga.update(ident)
            c = ctx.completion
            if c is not None and c.t_first_token is not None:
                ga["gateway.time_to_first_token_ms"] = round((c.t_first_token - ctx.t_upstream) * 1000, 3)
            err = None
            if ctx.outcome != "ok" or ctx.status >= 400:  # the model exchange failed (an upstream 4xx too)
                err = ctx.error or (str(ctx.status) if ctx.status >= 400 else ctx.outcome)
            if not cfg.genai_span:
                # The server span is the GenAI span: its error too (a failure outcome set it above).
                if err is not None and failed is None:
                    ga["error.type"] = err
                    span.set_status(Status(StatusCode.ERROR, ctx.outcome if ctx.outcome != "ok" else err))
                span.set_attributes(ga)
                return
            model = ga.get("gen_ai.request.model") or ga.get("gen_ai.response.model")
            if model and len(model) > genai.MAX_NAME_CHARS:  # (already valid UTF-8)
                model = model[:genai.MAX_NAME_CHARS] + "…"
            s = tracer.start_span(f"{op} {model}" if model else op, parent, SpanKind.CLIENT, ga,
                                  start_time=ns(ctx.t_upstream))
            if err is not None:
                s.set_attribute("error.type", err)
                s.set_status(Status(StatusCode.ERROR, ctx.outcome if ctx.outcome != "ok" else err))
            s.end(end_time=ns(ctx.t_end if ctx.t_end is not None else time.perf_counter()))


#: Outcomes of an exchange that failed or was cut off (not a refusal, not a relayed answer).
_FAILURES = frozenset({"client_disconnected", "gateway_shutdown", "upstream_error", "upstream_timeout",
                       "upstream_disconnected", "error"})


def _failure(ctx: RequestContext) -> str | None:
    """The server span's error.type: the outcome, when the exchange failed or was cut, whatever the
    status sent (none at all when the client left before the head). A 4xx the gateway answered for a
    bad request (outcome ``error``: malformed body, too large ...) is the client's fault, which the
    HTTP conventions leave UNSET on a server span, as they do a refusal."""
    o = ctx.outcome
    if o not in _FAILURES or (o == "error" and 400 <= ctx.status < 500):
        return None
    return o


def _identity(ctx: RequestContext) -> dict[str, Any]:
    """Who called: the admitted key's id and owner, else the id of the key a refusal named (revoked,
    expired, out of scope ...), as the audit event has it. A refusal holds the key id only, never
    the key."""
    out: dict[str, Any] = {}
    key_id = caller_key_id(ctx.key_id, ctx.refusal)
    if key_id:
        out["gateway.key_id"] = genai.text(key_id)
    if ctx.owner:
        out["gateway.owner"] = genai.text(ctx.owner)
    return out


def _key_auth_headers(settings: Any) -> set[str]:
    """The request headers the key_auth plugin reads keys from, in ``settings`` (the gateway config):
    its base config and every per-route override."""
    out: set[str] = set()
    for spec in getattr(settings, "plugins", None) or ():
        if getattr(spec, "name", None) == "key_auth":
            out.update(getattr(spec.validated, "headers", None) or ())
    for route in getattr(settings, "routes", None) or ():
        ov = (getattr(route, "plugins", None) or {}).get("key_auth")
        if ov is not None:
            out.update(getattr(ov.validated, "headers", None) or ())
    return out


def _find(services: Any, request: web.Request) -> Tracing | None:
    """The tracing instance in the chain this request will run, or None (tracing off for it)."""
    gw = services.gateway
    if gw is None:
        return None
    rt = gw.runtime
    base = rt.by_name.get(Tracing.name)
    if base is None:
        return None
    chain = rt.match_request(request)
    try:
        return base._chains[chain]
    except KeyError:
        t = next((p for p in chain.plugins if isinstance(p, Tracing)), None)
        base._chains[chain] = t
        return t


__all__ = ["Tracing", "TracingConfig"]
