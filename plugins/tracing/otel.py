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
import collections
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
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter,
                                            SpanExportResult)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from gateway.context import PLAIN_UPSTREAM, SKIP_TIMINGS
from gateway.redact import mask_gateway_keys, mask_params

if TYPE_CHECKING:
    from . import Tracing, TracingConfig

log = logging.getLogger("gateway.tracing")

#: The tracing plugin instance serving the request being handled (set by the server middleware).
ACTIVE: ContextVar["Tracing | None"] = ContextVar("gateway_tracing_active", default=None)
#: A trace id chosen (and sampled) by the middleware, for the server span's SDK to use.
_NEXT_TRACE_ID: ContextVar[int] = ContextVar("gateway_tracing_next_trace_id", default=0)
#: Where the middleware leaves the server span on the aiohttp request, for ``on_complete``.
SERVER_SPAN = web.RequestKey("gateway.tracing.server_span", trace.Span)

#: Header values never put on a span, whatever OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_* say.
SENSITIVE_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie",
                     "x-admin-token")
#: Words that make any header a credential's (searched in the lower-cased name): ``X-Auth-Token``,
#: ``X-Gateway-Key``, ``X-Client-Secret``, ``X-Session-Id`` ... Redacting a harmless header costs a
#: debugging detail; missing a credential leaks it to everyone who can read traces.
SENSITIVE_WORDS = ("auth", "token", "key", "secret", "cookie", "passw", "session", "credential", "signature")
#: Headers some key_auth configuration of this process reads the key from (only grows: a header that
#: carried keys before a reload may still carry them from old clients).
_key_headers: set[str] = set()
_REQ_HEADER, _RESP_HEADER = "http.request.header.", "http.response.header."
_CAPTURE_ENV = ("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST",
                "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE")


_WORDS = re.compile("|".join(SENSITIVE_WORDS))


def sensitive_header_patterns() -> list[str]:
    """Regexes (searched, case-insensitively) for the header names whose values stay off spans: the
    words, plus the named headers no word covers (the instrumentation splits and joins this list for
    every recorded request: it stays short)."""
    named = [h for h in (*SENSITIVE_HEADERS, *sorted(_key_headers)) if not _WORDS.search(h)]
    return list(SENSITIVE_WORDS) + [re.escape(h) for h in named]


def _name_regex() -> re.Pattern[str]:
    # Span attribute names carry the header name lower-cased, with "-" as "_".
    return re.compile("|".join(p.replace("-", "_").replace("\\_", "_") for p in sensitive_header_patterns()), re.I)


_sensitive_name = _name_regex()


def note_key_headers(names: Any) -> None:
    """Headers a key_auth instance reads the key from: their values are redacted like the fixed list's
    (at capture by the instrumentation, and again at export)."""
    global _sensitive_name
    new = {str(n).strip().lower() for n in names} - _key_headers
    if new:
        _key_headers.update(new)
        _sensitive_name = _name_regex()
    sanitize_sensitive_headers()


#: Server span attributes that carry the request URL, its path or its query string (old and stable
#: HTTP conventions: OTEL_SEMCONV_STABILITY_OPT_IN=http gives url.path and url.query).
URL_SERVER_ATTRS = ("http.target", "http.url", "url.full", "url.path", "url.query")


def redact_query(url: Any) -> str:
    """``url`` with the values of sensitive query parameters, and any gateway key's secret, replaced
    by ``REDACTED``."""
    # (a gateway key under any parameter name, or in the path: its id stays, its secret does not)
    return mask_params(mask_gateway_keys(str(url)), "REDACTED")  # (url.query comes without its "?": the start counts)


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
    after the gateway's handler has returned. The exporter checks again (``redact_headers``)."""
    have = [h.strip() for h in os.environ.get(_SANITIZE_ENV, "").split(",") if h.strip()]
    lower = {x.lower() for x in have}
    missing = [h for h in sensitive_header_patterns() if h.lower() not in lower]
    if missing:
        os.environ[_SANITIZE_ENV] = ",".join(have + missing)


def _redact_value(v: Any) -> Any:
    """A captured header's value (a tuple of strings) with any gateway key's secret replaced; the
    same object when there is none."""
    if isinstance(v, str):
        return mask_gateway_keys(v)
    if isinstance(v, tuple) and any(isinstance(x, str) and "gw" in x for x in v):
        return tuple(_redact_value(x) for x in v)
    return v


def redact_headers(span: ReadableSpan) -> ReadableSpan:
    """``span``, or a copy of it whose captured header attributes hold no credential: a credential
    header's value (by name) is ``[REDACTED]``, a gateway key in any other header keeps only its id.

    Runs on the export thread, and only while header capture is switched on: no cost per request."""
    attrs = span.attributes
    if not attrs:
        return span
    new: dict[str, Any] | None = None
    for k, v in attrs.items():
        if k.startswith(_REQ_HEADER):
            name = k[len(_REQ_HEADER):]
        elif k.startswith(_RESP_HEADER):
            name = k[len(_RESP_HEADER):]
        else:
            continue
        r = "[REDACTED]" if _sensitive_name.search(name) else _redact_value(v)
        if r != v:
            if new is None:
                new = dict(attrs)
            new[k] = r
    if new is None:
        return span
    bounded = BoundedAttributes(attributes=new, immutable=True)
    bounded.dropped = span.dropped_attributes
    return ReadableSpan(name=span.name, context=span.context, parent=span.parent, resource=span.resource,
                        attributes=bounded, events=span.events, links=span.links, kind=span.kind,
                        status=span.status, start_time=span.start_time, end_time=span.end_time,
                        instrumentation_scope=span.instrumentation_scope)


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


# -- spans that never reach the collector -------------------------------------------------------------
DROP_REASONS = ("queue_full", "export_failed", "shutdown")
#: Seconds between two log lines about dropped spans (each says how many since the last one).
DROP_REPORT_EVERY = 60.0


def dropped_counter(services: Any) -> Any:
    """``gateway_tracing_spans_dropped_total{reason}``, registered once per registry."""
    from prometheus_client import Counter

    return services.metric("tracing_spans_dropped", lambda reg: Counter(
        "gateway_tracing_spans_dropped_total", "Finished spans never delivered to the collector, by reason: "
        "queue_full (the export queue was full: the oldest queued span made room), export_failed (the "
        "collector refused or could not be reached), shutdown (still queued when the exporter was stopped)",
        ["reason"], registry=reg))


class SpanDrops:
    """Counts lost spans by reason (the metric) and says so in the log: at the first loss, then at most
    once per ``DROP_REPORT_EVERY`` seconds with the exact number since the last line, and at shutdown.

    The SDK's own "Queue full" warning is not a count (its duplicate filter hides repeats), so it is
    held back in favour of these lines."""

    def __init__(self, counter: Any | None) -> None:
        self._children = {r: counter.labels(reason=r) for r in DROP_REASONS} if counter is not None else {}
        self._pending = dict.fromkeys(DROP_REASONS, 0)
        self._lock = threading.Lock()
        self._last: float | None = None
        self._timer: threading.Timer | None = None
        self.total = 0

    def add(self, reason: str, n: int) -> None:
        if n <= 0:
            return
        c = self._children.get(reason)
        if c is not None:
            c.inc(n)
        with self._lock:
            self._pending[reason] += n
            self.total += n
        self.tick()

    def tick(self) -> None:
        """Log the pending count if the last line is old enough (called on drops and on each export);
        else make sure it is logged when it is (a timer, one at a time)."""
        last = self._last
        wait = 0.0 if last is None else DROP_REPORT_EVERY - (time.monotonic() - last)
        if wait <= 0:
            self.report()
        elif self._timer is None and any(self._pending.values()):
            with self._lock:
                if self._timer is not None:
                    return
                self._timer = threading.Timer(wait, self._due)
                self._timer.daemon = True
            self._timer.start()

    def _due(self) -> None:
        self._timer = None
        self.report()

    def report(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, dict.fromkeys(DROP_REASONS, 0)
            n = sum(pending.values())
            if not n:
                return
            since = self._last
            self._last = time.monotonic()
        why = ", ".join(f"{r.replace('_', ' ')}: {c}" for r, c in pending.items() if c)
        when = f"in the last {self._last - since:.0f}s" if since is not None else "so far"
        log.warning("tracing: %d span(s) dropped %s (%s); see gateway_tracing_spans_dropped_total", n, when, why)


class _ProcessorDrops:
    """Stands in for the SDK batch processor's metrics object, whose ``drop_items`` is the SDK's own
    hook for a span it lets go after shutdown: so counting costs the request path nothing. (Its
    "queue full" call is not counted here: see ``_CountingQueue``.) Everything else goes to the SDK's
    object."""

    def __init__(self, inner: Any, drops: SpanDrops, queue_counted: bool) -> None:
        self._inner = inner
        self._drops = drops
        self._queue_counted = queue_counted

    def drop_items(self, count: int, error_type: str = "queue_full") -> None:
        if error_type != "queue_full":
            self._drops.add("shutdown", count)
        elif not self._queue_counted:
            self._drops.add("queue_full", count)
        self._inner.drop_items(count, error_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _CountingQueue(collections.deque):  # type: ignore[type-arg]
    """The batch processor's queue, counting the spans it really drops. The SDK says "queue full"
    when the queue is full as a span arrives, but its worker thread may take a batch out before the
    span goes in, and then nothing is dropped (a span counted lost that was exported). Here the
    check and the insertion are one step against the worker's ``pop``."""

    def __init__(self, maxlen: int | None, drops: SpanDrops) -> None:
        super().__init__((), maxlen)
        self._lock = threading.Lock()
        self._drops = drops

    def appendleft(self, x: Any) -> None:
        with self._lock:
            full = self.maxlen is not None and len(self) >= self.maxlen
            super().appendleft(x)  # (drops the oldest when full)
        if full:
            self._drops.add("queue_full", 1)

    def pop(self) -> Any:
        with self._lock:
            return super().pop()


class GuardedExporter(SpanExporter):
    """Wraps every exporter: redacts captured header values (``redact_headers``), counts the spans of
    failed exports, and knows the batch under way (what a shutdown that times out loses)."""

    def __init__(self, inner: Any, drops: SpanDrops) -> None:
        self.inner = inner
        self.drops = drops
        self.inflight = 0
        #: Set when shutdown gave up on what was left: those spans are counted already.
        self.abandoned = False
        self._lock = threading.Lock()

    def export(self, spans: Any) -> SpanExportResult:
        if os.environ.get(_CAPTURE_ENV[0]) or os.environ.get(_CAPTURE_ENV[1]):
            spans = [redact_headers(s) for s in spans]
        with self._lock:
            if self.abandoned:  # (a batch the stopped worker still took: counted with the queue)
                return SpanExportResult.FAILURE
            self.inflight = len(spans)
        result = SpanExportResult.FAILURE
        try:
            result = self.inner.export(spans)
        except Exception as e:  # (the SDK would log the exception, whose text can quote a header)
            log.error("tracing: exporting %d span(s) raised %s", len(spans), type(e).__name__)
        finally:
            with self._lock:
                self.inflight = 0
                counted = not self.abandoned
        if result is not SpanExportResult.SUCCESS and counted:
            self.drops.add("export_failed", len(spans))
        else:
            self.drops.tick()
        return result

    def abandon(self) -> int:
        """Stop counting this exporter's failures; the spans of the export under way, if any."""
        with self._lock:
            self.abandoned = True
            return self.inflight

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, with its drops counted (``SpanDrops``)."""

    def __init__(self, exporter: GuardedExporter, drops: SpanDrops, **kw: Any) -> None:
        super().__init__(exporter, **kw)
        self.drops = drops
        bp = getattr(self, "_batch_processor", None)
        if bp is not None and hasattr(bp, "_metrics") and hasattr(bp, "_queue"):
            counted = isinstance(bp._queue, collections.deque) and not bp._queue
            if counted:
                bp._queue = _CountingQueue(bp._queue.maxlen, drops)
            bp._metrics = _ProcessorDrops(bp._metrics, drops, counted)
        else:  # (an SDK without that hook: count at the door instead)
            self.on_end = self._counting_on_end  # type: ignore[method-assign]

    def _counting_on_end(self, span: ReadableSpan) -> None:
        q = self.queue
        if q is not None and q.maxlen is not None and len(q) >= q.maxlen and span.context.trace_flags.sampled:
            self.drops.add("queue_full", 1)
        BatchSpanProcessor.on_end(self, span)

    @property
    def queue(self) -> Any:
        return getattr(getattr(self, "_batch_processor", None), "_queue", None)

    def unexported(self) -> int:
        """Spans still queued, after a shutdown: they will not be exported."""
        q = self.queue
        return len(q) if q is not None else 0

    def shutdown_within(self, timeout_s: float) -> None:
        """``shutdown``, bounded: the SDK's processor waits ``timeout_s`` for its worker, then gives up
        on the rest without a word (it returns normally)."""
        bp = getattr(self, "_batch_processor", None)
        if bp is not None:
            bp.shutdown(timeout_millis=int(timeout_s * 1000))
        else:
            self.shutdown()


class ProviderEntry:
    """One SDK TracerProvider with its processor, and the aiohttp-server middleware bound to it."""

    def __init__(self, provider: TracerProvider, processor: SpanProcessor | None,
                 exporter: Any, flush_timeout: float, guard: GuardedExporter | None = None,
                 drops: SpanDrops | None = None) -> None:
        self.provider = provider
        self.processor = processor
        self.exporter = exporter  # (the SDK's: ``memory_exporter`` hands it out)
        self.exporter_guard = guard
        self.drops = drops or SpanDrops(None)
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
        """Flush and stop, bounded by ``flush_timeout``: a dead collector never holds shutdown up.
        What could not be exported by then is counted and logged (reason ``shutdown``)."""
        if self.processor is None:
            return
        processor, timeout = self.processor, self.flush_timeout
        self.processor = None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            try:
                if isinstance(processor, CountingBatchSpanProcessor):
                    processor.shutdown_within(timeout)
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
            pass
        # The SDK's shutdown returns normally when its time is up, whatever is left: a hung collector
        # holds the batch under way, and the queue behind it is never exported.
        lost = 0
        if isinstance(processor, CountingBatchSpanProcessor) and isinstance(self.exporter_guard, GuardedExporter):
            lost = self.exporter_guard.abandon() + processor.unexported()
        if lost:
            self.drops.add("shutdown", lost)
            log.warning("tracing: %d span(s) still unexported after %.1fs at shutdown were dropped", lost, timeout)
        self.drops.report()


class Providers:
    """Per-Services registry of providers keyed by their settings, plus the core hooks (one each)."""

    def __init__(self) -> None:
        self.entries: dict[str, ProviderEntry] = {}
        #: The one server middleware and upstream TraceConfig (the core mounts each once).
        self.middleware: Any = None
        self.trace_config: Any = None
        #: gateway_tracing_spans_dropped_total (set by the plugin: it has the metrics registry).
        self.dropped: Any = None

    def acquire(self, cfg: "TracingConfig") -> ProviderEntry | None:
        if cfg.exporter.type == "none":
            return None
        key = cfg.provider_key()
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = build_provider(cfg, self.dropped)
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


def build_provider(cfg: "TracingConfig", dropped: Any = None) -> ProviderEntry:
    """``dropped``: the gateway_tracing_spans_dropped_total counter (None: not counted)."""
    from gateway import __version__

    # The gateway's version, unless OTEL_RESOURCE_ATTRIBUTES names another (a deployment's own
    # build id); then OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME.
    resource = Resource({"service.version": __version__}).merge(Resource.create())
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
    quiet_exporter_logs()  # (first: building the exporter may log its settings)
    exporter = build_exporter(cfg)
    drops = SpanDrops(dropped)
    guard = GuardedExporter(exporter, drops)
    b = cfg.batch
    processor: SpanProcessor
    if cfg.exporter.type == "memory":
        processor = SimpleSpanProcessor(guard)
    else:
        processor = CountingBatchSpanProcessor(guard, drops, max_queue_size=b.max_queue_size,
                                               schedule_delay_millis=b.schedule_delay_ms,
                                               max_export_batch_size=min(b.max_export_batch_size, b.max_queue_size),
                                               export_timeout_millis=int((cfg.exporter.timeout or 10) * 1000))
    provider.add_span_processor(processor)
    return ProviderEntry(provider, processor, exporter, b.shutdown_timeout, guard, drops)


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


_ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def _env_secrets() -> set[str]:
    """Values the exporter may log that are credentials: the header values of
    OTEL_EXPORTER_OTLP_(TRACES_)HEADERS (however malformed) and a password in an endpoint variable."""
    from urllib.parse import unquote

    out: set[str] = set()
    for n in _HEADER_ENV:
        for item in os.environ.get(n, "").split(","):
            m = re.match(r"\s*[^=:]*[=:](.*)", item)
            v = m.group(1).strip() if m else item.strip()  # (an item with no name: a bare token set as the variable)
            if v:
                out.update({v, unquote(v)})
    for n in _ENDPOINT_ENV:
        try:
            pw = urlsplit(os.environ.get(n, "").strip()).password
        except ValueError:
            pw = None
        if pw:
            out.update({pw, unquote(pw)})
    return out


def build_exporter(cfg: "TracingConfig") -> Any:
    e = cfg.exporter
    note_secrets(set(e.headers.values()) | _env_secrets())
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

    A dead collector makes the SDK warn per retry: without this, an outage turns into a log flood.
    Put first among the logger's filters (the SDK's own duplicate filter would otherwise hide records
    from the count). The SDK's "Queue full" warning is dropped: ``SpanDrops`` says how many."""

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key.startswith("Queue full"):
            return False
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            if len(self._last) > 1000:  # (templates are few; bound it anyway)
                self._last.clear()
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} similar messages suppressed)"
        return True


#: Exporter credentials (configured and OTEL_* header values, endpoint passwords): masked in the
#: records of the OpenTelemetry loggers that may quote them ("Header format invalid! ... <value>",
#: an HTTP library's "Invalid header value ..." reason).
_secrets: frozenset[str] = frozenset()


def note_secrets(values: set[str]) -> None:
    global _secrets
    new = {v for v in values if isinstance(v, str) and len(v) >= 3} - _secrets
    if new:
        _secrets = _secrets | new


def _mask(text: str) -> str:
    for v in sorted(_secrets, key=len, reverse=True):
        if v in text:
            text = text.replace(v, "***")
    return text


class _MaskSecrets(logging.Filter):
    """Masks exporter credentials in a record (message, arguments and traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, str) and msg.startswith("Header format invalid!") and record.args:
            # The argument is one "name=value" item of an OTEL_*_HEADERS variable: the name is enough.
            arg = str(record.args[0] if isinstance(record.args, tuple) else record.args)
            name = re.match(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]{0,64})", arg)
            record.args = ((name.group(1) if name else "") + " (value not shown)",)
        if not _secrets:
            return True
        try:
            text = record.getMessage()
        except Exception:
            return True
        masked = _mask(text)
        if masked != text:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            tb = logging.Formatter().formatException(record.exc_info)
            if _mask(tb) != tb:  # the traceback quotes a credential: its masked text goes in the message
                record.msg, record.args = f"{record.getMessage()}\n{_mask(tb)}", None
                record.exc_info, record.exc_text = None, None
        return True


class _ClientInput(_RateLimited):
    """For the propagators' warnings about a malformed ``traceparent``, ``tracestate`` or ``baggage``:
    any client can send those, before authentication, with kilobytes in them. Each argument is cut to
    a short excerpt, and each message appears at most once a minute (with a count)."""

    MAX = 64

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(self._cut(a) for a in args)
        return super().filter(record)

    @classmethod
    def _cut(cls, a: Any) -> Any:
        if not isinstance(a, (str, bytes)):
            return a
        t = a.decode("latin-1") if isinstance(a, bytes) else a
        t = "".join(c if c.isprintable() else "?" for c in t[:cls.MAX])
        return t if len(a) <= cls.MAX else f"{t}... ({len(a)} chars)"


#: Loggers of the exporters and the batch processor (may quote credentials, repeat per export).
_EXPORTER_LOGGERS = ("opentelemetry.sdk._shared_internal", "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                     "opentelemetry.exporter.otlp.proto.http._common", "opentelemetry.exporter.otlp.common.http",
                     "opentelemetry.exporter.otlp.proto.grpc.exporter",
                     "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "opentelemetry.util.re")
#: Loggers that quote what a client sent in its trace-context and baggage headers.
_CLIENT_INPUT_LOGGERS = ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext",
                         "opentelemetry.baggage", "opentelemetry.baggage.propagation")

_quieted = False


def quiet_exporter_logs() -> None:
    global _quieted
    if _quieted:
        return
    _quieted = True
    limit, mask, client = _RateLimited(), _MaskSecrets(), _ClientInput()
    for name in _EXPORTER_LOGGERS:
        lg = logging.getLogger(name)
        lg.filters[:0] = [limit, mask]  # before the SDK's duplicate filter, which would spoil the counts
    for name in _CLIENT_INPUT_LOGGERS:
        logging.getLogger(name).filters.insert(0, client)


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
