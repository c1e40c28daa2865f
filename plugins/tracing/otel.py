"""OpenTelemetry plumbing for the tracing plugin: providers, exporters, the server middleware and the
upstream client trace config.

Nothing here touches the global ``TracerProvider``. Each distinct exporter/sampling setup gets its own
SDK ``TracerProvider`` (shared, reference-counted, by plugin instances with the same settings, so a
config reload that keeps the settings keeps the exporter and its queue).

Two pieces are collected by the core once, at start-up, while plugin instances come and go with config
reloads and per-route overrides. So they hold no provider themselves; they find the right one per request:

* the server middleware looks up the tracing instance in the chain the request will run, and delegates
  to that instance's ``opentelemetry-instrumentation-aiohttp-server`` middleware (built for its provider);
* the upstream client ``TraceConfig`` (``opentelemetry-instrumentation-aiohttp-client``) is given a
  tracer provider whose tracers resolve, per call, to the provider of the instance serving the current
  request (a context variable set by the middleware). Calls outside a traced request (the readiness
  probe, a route with tracing off) get no span, and whatever ``traceparent`` the client sent passes on
  unchanged.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from gateway.context import PLAIN_UPSTREAM, SKIP_TIMINGS
from gateway.redact import mask_params

if TYPE_CHECKING:
    from . import Tracing, TracingConfig

log = logging.getLogger("gateway.tracing")

#: The tracing plugin instance serving the request being handled (set by the server middleware).
ACTIVE: ContextVar["Tracing | None"] = ContextVar("gateway_tracing_active", default=None)
#: A trace id chosen (and sampled) by the middleware, for the server span's SDK to use.
_NEXT_TRACE_ID: ContextVar[int] = ContextVar("gateway_tracing_next_trace_id", default=0)
#: Where the middleware leaves the server span on the aiohttp request, for ``on_complete``.
SERVER_SPAN = "gateway.tracing.server_span"

#: Header values never put on a span, whatever OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_* say.
SENSITIVE_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie",
                     "x-admin-token")
SENSITIVE_SERVER_ATTRS = tuple(f"http.request.header.{h.replace('-', '_')}" for h in SENSITIVE_HEADERS) + \
    tuple(f"http.response.header.{h.replace('-', '_')}" for h in SENSITIVE_HEADERS)

#: Server span attributes that carry the request URL or its query string.
URL_SERVER_ATTRS = ("http.target", "http.url", "url.full", "url.query")


#: A gateway API key wherever it appears (under any parameter name, percent-encoded or not): the
#: key's id stays, for telling requests apart; its secret does not.
_GATEWAY_KEY = re.compile(r"(gw(?:_|%5[Ff])[0-9A-Za-z]{12})(?:_|%5[Ff])[0-9A-Za-z]{20,}")


def redact_query(url: Any) -> str:
    """``url`` with the values of sensitive query parameters, and any gateway key's secret, replaced
    by ``REDACTED``."""
    s = str(url)
    if "gw" in s:
        s = _GATEWAY_KEY.sub(r"\1_REDACTED", s)
    return mask_params(s, "REDACTED")  # (url.query comes without its "?": the start counts)


# -- the aiohttp-server instrumentation ----------------------------------------------------------------
_server_ready = False


def prepare_server_instrumentation() -> None:
    """Make ``create_aiohttp_middleware`` usable without patching ``aiohttp.web.Application``.

    The middleware it returns reads module state (URL exclusions from
    ``OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS``, the semantic-convention mode, its request meters) that
    only ``AioHttpServerInstrumentor.instrument()`` initialises; without it every request fails. That
    call also replaces ``web.Application`` process-wide (every app, the admin one included, would get
    a middleware bound to the *global* provider). So: run the instrumentor's own initialisation and
    undo its patch straight away (no await in between, so no application is created meanwhile), then
    add the middleware, bound to our provider, to the public app only.
    """
    global _server_ready
    sanitize_sensitive_headers()  # (every time: the environment may have changed since)
    if _server_ready:
        return
    from opentelemetry.instrumentation import aiohttp_server as srv

    inst = srv.AioHttpServerInstrumentor()
    if inst.is_instrumented_by_opentelemetry:
        log.warning("aiohttp server auto-instrumentation is active: every app gets a second server span; "
                    "set OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=aiohttp-server,aiohttp-client")
    else:
        original = web.Application
        inst.instrument(skip_dep_check=True)
        inst.uninstrument()
        web.Application = original  # type: ignore[misc]  # (uninstrument restores it; be explicit)
    if getattr(srv, "_excluded_urls", None) is None or getattr(srv, "active_requests_counter", None) is None:
        raise RuntimeError("this version of opentelemetry-instrumentation-aiohttp-server cannot be "
                           "initialised without instrumenting every aiohttp application")
    _server_ready = True


_SANITIZE_ENV = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS"


def sanitize_sensitive_headers() -> None:
    """Header values the instrumentations may capture (OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*)
    are replaced by ``[REDACTED]`` for the credential headers, by the instrumentation itself
    (through its own sanitize setting, extended here): response headers too, which it captures
    after the gateway's handler has returned."""
    have = [h.strip() for h in os.environ.get(_SANITIZE_ENV, "").split(",") if h.strip()]
    missing = [h for h in SENSITIVE_HEADERS if h not in {x.lower() for x in have}]
    if missing:
        os.environ[_SANITIZE_ENV] = ",".join(have + missing)


# -- a tracer provider that resolves to the instance serving the current request -----------------------
class _ActiveTracer(trace.Tracer):
    def __init__(self, scope: tuple[Any, ...]) -> None:
        self._scope = scope

    def _target(self) -> trace.Tracer | None:
        t = ACTIVE.get()
        return t.entry.tracer(self._scope) if t is not None and t.entry is not None else None

    def start_span(self, name: str, context: Any = None, kind: trace.SpanKind = trace.SpanKind.INTERNAL,
                   attributes: Any = None, links: Any = None, start_time: int | None = None,
                   record_exception: bool = True, set_status_on_exception: bool = True) -> trace.Span:
        target = self._target()
        if target is None:
            return trace.INVALID_SPAN
        return target.start_span(name, context, kind, attributes, links, start_time, record_exception,
                                 set_status_on_exception)

    @contextmanager
    def start_as_current_span(self, name: str, context: Any = None, kind: trace.SpanKind = trace.SpanKind.INTERNAL,
                              attributes: Any = None, links: Any = None, start_time: int | None = None,
                              record_exception: bool = True, set_status_on_exception: bool = True,
                              end_on_exit: bool = True) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time, record_exception,
                               set_status_on_exception)
        with trace.use_span(span, end_on_exit=end_on_exit, record_exception=record_exception,
                            set_status_on_exception=set_status_on_exception) as s:
            yield s


class ActiveTracerProvider(trace.TracerProvider):
    """Hands out tracers that use the provider of the tracing instance serving the current request."""

    def get_tracer(self, instrumenting_module_name: str, instrumenting_library_version: str | None = None,
                   schema_url: str | None = None, attributes: Any = None) -> trace.Tracer:
        return _ActiveTracer((instrumenting_module_name, instrumenting_library_version, schema_url))


# -- providers, shared by settings --------------------------------------------------------------------
class PresetIdGenerator(RandomIdGenerator):
    """Random ids, except a root server span takes the trace id the middleware already sampled on."""

    def generate_trace_id(self) -> int:
        return _NEXT_TRACE_ID.get() or super().generate_trace_id()


class ProviderEntry:
    """One SDK TracerProvider with its processor, and the aiohttp-server middleware bound to it."""

    def __init__(self, provider: TracerProvider, processor: SpanProcessor | None,
                 exporter: Any, flush_timeout: float) -> None:
        self.provider = provider
        self.processor = processor
        self.exporter = exporter
        self.flush_timeout = flush_timeout
        self.refs = 0
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self._tracers: dict[tuple[Any, ...], trace.Tracer] = {}
        from opentelemetry.instrumentation.aiohttp_server import create_aiohttp_middleware

        self.server_middleware = create_aiohttp_middleware(tracer_provider=provider)
        self.gateway_tracer = provider.get_tracer("gateway")

    def tracer(self, scope: tuple[Any, ...]) -> trace.Tracer:
        t = self._tracers.get(scope)
        if t is None:
            t = self._tracers[scope] = self.provider.get_tracer(scope[0], scope[1], scope[2])
        return t

    async def close(self) -> None:
        """Flush and stop, bounded by ``flush_timeout``: a dead collector never holds shutdown up."""
        if self.processor is None:
            return
        processor, timeout = self.processor, self.flush_timeout
        self.processor = None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            try:
                if isinstance(processor, BatchSpanProcessor):
                    processor._batch_processor.shutdown(timeout_millis=int(timeout * 1000))
                else:
                    processor.shutdown()
            except Exception:
                log.exception("tracing exporter shutdown failed")
            finally:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        # A daemon thread (not the default executor): an export stuck past the deadline must not keep
        # the process alive at exit.
        threading.Thread(target=run, name="gateway-tracing-shutdown", daemon=True).start()
        try:
            async with asyncio.timeout(timeout + 1.0):
                await done
        except TimeoutError:
            log.warning("tracing: spans still unexported after %.1fs at shutdown were dropped", timeout)


class Providers:
    """Per-Services registry of providers keyed by their settings, plus the core hooks (one each)."""

    def __init__(self) -> None:
        self.entries: dict[str, ProviderEntry] = {}
        #: The one server middleware and upstream TraceConfig (the core mounts each once).
        self.middleware: Any = None
        self.trace_config: Any = None

    def acquire(self, cfg: "TracingConfig") -> ProviderEntry | None:
        if cfg.exporter.type == "none":
            return None
        key = cfg.provider_key()
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = build_provider(cfg)
        e.refs += 1
        return e

    async def release(self, cfg: "TracingConfig", entry: ProviderEntry | None) -> None:
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            key = cfg.provider_key()
            if self.entries.get(key) is entry:
                del self.entries[key]
            await entry.close()

    async def close(self) -> None:
        for e in list(self.entries.values()):
            await e.close()
        self.entries.clear()


def build_provider(cfg: "TracingConfig") -> ProviderEntry:
    from gateway import __version__

    resource = Resource.create({"service.version": __version__})  # + OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME
    if cfg.service_name:
        resource = resource.merge(Resource({"service.name": cfg.service_name}))
    elif str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "gateway"}))
    sampler = None if cfg.sampling_ratio is None else ParentBased(TraceIdRatioBased(cfg.sampling_ratio))
    # sampler=None: the SDK reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on).
    # Attribute values are cut (a megabyte URL or model name must not reach every export).
    provider = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False,
                              id_generator=PresetIdGenerator(),
                              span_limits=SpanLimits(max_attribute_length=cfg.max_attribute_chars))
    exporter = build_exporter(cfg)
    b = cfg.batch
    processor: SpanProcessor
    if cfg.exporter.type == "memory":
        processor = SimpleSpanProcessor(exporter)
    else:
        processor = BatchSpanProcessor(exporter, max_queue_size=b.max_queue_size,
                                       schedule_delay_millis=b.schedule_delay_ms,
                                       max_export_batch_size=min(b.max_export_batch_size, b.max_queue_size),
                                       export_timeout_millis=int((cfg.exporter.timeout or 10) * 1000))
    provider.add_span_processor(processor)
    quiet_exporter_logs()
    return ProviderEntry(provider, processor, exporter, b.shutdown_timeout)


def otlp_http_endpoint(endpoint: str) -> str:
    """A base URL (``http://collector:4318``) gets the traces path; a full URL is kept as given."""
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


_HEADER_ENV = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")


@contextmanager
def _without_env(*names: str) -> Iterator[None]:
    """These environment variables unset while the block runs (an exporter reading them as it is
    built, on the event loop's thread at start-up or reload)."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def build_exporter(cfg: "TracingConfig") -> Any:
    e = cfg.exporter
    if e.type == "memory":
        return InMemorySpanExporter()
    if e.type == "console":
        return ConsoleSpanExporter(out=sys.stdout)
    if e.type == "otlp_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        # The HTTP exporter adds the OTEL_EXPORTER_OTLP_(TRACES_)HEADERS to the headers it is given.
        # Headers in the YAML replace those (they may be another collector's credentials).
        with _without_env(*(_HEADER_ENV if e.headers else ())):
            return HttpExporter(endpoint=otlp_http_endpoint(e.endpoint) if e.endpoint else None,
                                headers=dict(e.headers) or None, timeout=e.timeout)
    if e.type == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=e.endpoint or None, headers=dict(e.headers) or None, timeout=e.timeout,
                            insecure=e.insecure)
    raise ValueError(f"unknown exporter type {e.type!r}")


# -- exporter log hygiene -------------------------------------------------------------------------------
class _RateLimited(logging.Filter):
    """At most one record per message template per ``every`` seconds; says how many were held back.

    A dead collector makes the SDK warn once per dropped span ("Queue full") and per retry: without
    this, an outage turns into a log flood on the request path."""

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} similar messages suppressed)"
        return True


_quieted = False


def quiet_exporter_logs() -> None:
    global _quieted
    if _quieted:
        return
    _quieted = True
    f = _RateLimited()
    for name in ("opentelemetry.sdk._shared_internal", "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                 "opentelemetry.exporter.otlp.common.http", "opentelemetry.exporter.otlp.proto.grpc.exporter"):
        logging.getLogger(name).addFilter(f)


def gate_client_trace_config(tc: Any) -> Any:
    """Run the client instrumentation only for requests whose server span is recorded.

    The core skips the TraceConfigs for requests the middleware marked ``PLAIN_UPSTREAM`` (no
    tracing for the route, or not sampled). This gate is the second line: a request with no active
    tracing gets nothing, an unrecorded span only the injected context, and a recorded one the full
    client span (the instrumentation copies every header before it asks the sampler)."""
    from opentelemetry.propagate import inject

    starts = list(tc.on_request_start)
    tc.on_request_start.clear()

    async def on_request_start(session: Any, tctx: Any, params: Any) -> None:
        if ACTIVE.get() is None:
            return
        if not trace.get_current_span().is_recording():
            inject(params.headers)
            return
        for cb in starts:
            await cb(session, tctx, params)

    tc.on_request_start.append(on_request_start)
    return tc


_ONLY_US = frozenset({"tracing"})


def _untraced(services: Any, request: web.BaseRequest) -> None:
    """Tell the core that nothing will read this request's hook timings or upstream TraceConfig
    signals, when tracing is the only plugin that uses them."""
    gw = services.gateway
    if gw is None:
        return
    if gw.runtime.timing_plugins <= _ONLY_US:
        request[SKIP_TIMINGS] = True
    if gw.upstream.trace_owners <= _ONLY_US:
        request[PLAIN_UPSTREAM] = True


def server_middleware(services: Any, find: Callable[[Any, web.Request], "Tracing | None"]) -> Any:
    """The one middleware the core mounts on the public app.

    It makes the sampling decision itself, from the incoming trace context, before the server
    instrumentation runs: that one builds a dozen attributes before it asks the sampler, which an
    unsampled request does not need. Unsampled: a non-recording span carrying the trace context is made
    current (the upstream still learns the decision, plugins can still read the trace id). Sampled: the
    instrumentation's middleware makes the server span, with the same trace id (so it reaches the same
    decision).
    """
    from opentelemetry import context as context_api
    from opentelemetry.instrumentation.aiohttp_server import getter
    from opentelemetry.propagate import extract
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

    @web.middleware
    async def tracing_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        t = find(services, request)
        if t is None or t.entry is None:
            _untraced(services, request)  # the caller's traceparent passes on as it came
            return await handler(request)
        e = t.entry
        parent = extract(request, getter=getter)
        psc = trace.get_current_span(parent).get_span_context()
        root = not psc.is_valid
        tid = e.ids.generate_trace_id() if root else psc.trace_id
        result = e.sampler.should_sample(parent, tid, request.path, SpanKind.SERVER)
        token = ACTIVE.set(t)
        try:
            if result.decision.is_sampled():
                if root:
                    _NEXT_TRACE_ID.set(tid)

                async def inner(req: web.Request) -> web.StreamResponse:
                    _NEXT_TRACE_ID.set(0)
                    req[SERVER_SPAN] = trace.get_current_span()
                    return await handler(req)

                try:
                    return await e.server_middleware(request, inner)
                finally:
                    _NEXT_TRACE_ID.set(0)
            _untraced(services, request)  # no span for timings; on_request passes the context on
            sc = SpanContext(tid, e.ids.generate_span_id(), is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT),
                             trace_state=result.trace_state)
            ctoken = context_api.attach(trace.set_span_in_context(NonRecordingSpan(sc), parent))
            try:
                return await handler(request)
            finally:
                context_api.detach(ctoken)
        finally:
            ACTIVE.reset(token)

    return tracing_middleware
