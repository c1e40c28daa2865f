"""Wiring and lifecycle: listeners, the shared upstream session, the runtime, reloads, shutdown."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import logging
import os
import re
import signal
import time
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, PayloadEncodingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from prometheus_client import Counter, Gauge

from gateway import early_signals, stop_requested
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.config.loader import file_state

from .admin import build_admin_app
from .cli import redact_url
from .db import Database, DatabaseError, in_daemon_thread, sqlite_hint, sqlite_place_problem
from .errors import error_body
from .logs import ThrottledLog, setup_logging
from .proxy import _DECODED, SERVER, Proxy, undecodable_body_message, unsupported_encoding_message
from .runtime import Runtime
from .services import Services
from .upstream import Upstream

log = logging.getLogger("gateway")
#: Seconds a reload waits for its config file to be read.
RELOAD_READ_TIMEOUT = 10.0
#: A reload reads the file, waits this long and compares it with what was read (a file still being
#: written is read again), at most RELOAD_READS times.
RELOAD_SETTLE = 0.2
RELOAD_READS = 5


def uses_database(cfg: GatewayConfig) -> bool:
    from .plugin import registry

    return any(getattr(registry.get(p.name), "uses_database", False) for p in cfg.plugins)


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        d = cfg.database
        self.db: Database | None = Database(d.url, busy_timeout_ms=d.busy_timeout_ms, pool_size=d.pool_size,
                                            echo=d.echo)
        self.services = Services(cfg, self.db)
        self.services.gateway = self
        self.upstream = Upstream(cfg.upstream)
        self.runtime = Runtime(cfg, self.services)
        self.proxy = Proxy(self)
        self._public: web.BaseRunner | None = None
        self._admin: web.AppRunner | None = None
        self.public_port = 0
        self.admin_port = 0
        self._reloads = Counter("gateway_config_reloads_total", "Config reloads by result", ["result"],
                                registry=self.services.metrics)
        for result in ("success", "failure"):  # at 0 from the start: an alert on the first failure fires
            self._reloads.labels(result)
        if self.db.file is not None:
            # A long or stalled read stops SQLite's checkpoints: the write-ahead log then grows with
            # every write until it ends (docs/configuration.md, The SQLite file).
            wal = self.db.file + "-wal"
            Gauge("gateway_sqlite_wal_bytes", "Size of the SQLite database's write-ahead log (-wal file)",
                  registry=self.services.metrics).set_function(lambda: _size(wal))
        self._reload_lock = asyncio.Lock()
        self._mounted: list[Any] = []  # plugin middlewares and TraceConfigs in use
        self._old_runtimes: set[asyncio.Task[None]] = set()
        self._retiring: set[Runtime] = set()  # runtimes a reload replaced, still finishing requests
        #: The runtime the reload being reported replaced: a plugin it removed (audit) still
        #: records that reload's event.
        self.replaced: Runtime | None = None
        self._stopping = False
        self._skip_delay = asyncio.Event()  # a second SIGTERM/SIGINT: the rest of drain_delay is skipped
        #: Set by stop(): when the drain time runs out (requests cut after it were cut by the shutdown).
        self.drain_deadline: float | None = None
        self._client_fds = 0  # descriptors the open files limit leaves client connections (set at start)

    async def migrate_if_configured(self) -> None:
        assert self.db is not None
        problem = sqlite_place_problem(self.cfg.database.url)
        if problem:
            raise DatabaseError(problem)
        auto = self.cfg.database.auto_migrate
        if auto is None:
            auto = self.db.is_sqlite
        if auto:
            pending = await self.db.pending_migrations()
            if pending:
                # (a migration may rebuild a large table, audit_events say: minutes, on a big file,
                # before the listeners open)
                log.info("migrating the database schema to %s: the listeners open when it is done",
                         ", ".join(pending))
                t0 = time.monotonic()
                heads = await self.db.upgrade()
                log.info("database schema migrated in %.1fs (now at %s)", time.monotonic() - t0, ", ".join(heads))
        await self.db.check()
        if not auto:
            pending = await self.db.pending_migrations()
            if pending:
                raise DatabaseError(f"the database schema is not up to date ({len(pending)} migration branch(es) "
                                    "behind): run `gateway db upgrade -c <config>`, or set database.auto_migrate: true")

    async def start(self) -> None:
        if uses_database(self.cfg):
            await self.migrate_if_configured()
        trace_configs, owners = self._unmounted_trace_configs(self.runtime)
        self.upstream = Upstream(self.cfg.upstream, trace_configs)
        self.upstream.trace_owners = frozenset(owners)
        await self.upstream.start()
        await self.runtime.startup()
        # One catch-all handler needs no router: aiohttp's low-level server skips URL dispatch, and
        # the plugins' middlewares are wrapped around the handler here (the first listed outermost).
        middlewares = self._unmounted_middlewares(self.runtime)
        self._handler = wrap_middlewares(self.proxy.handle, middlewares)
        self._mount(middlewares + trace_configs)
        _activate(self.runtime)
        _check_grace(self.cfg, self.services)
        # (no client_max_size: it is not a connection setting, and passing one made aiohttp drop
        # every setting and warn on each connection; the proxy bounds bodies itself)
        server = JsonErrorServer(self._dispatch, handler_cancellation=True, access_log=None,
                                 keepalive_timeout=self.cfg.server.keepalive_timeout)
        server.cap = self.connection_cap
        server.refused = Counter("gateway_connections_refused_total", "Client connections answered 503 and "
                                 "closed: server.max_connections were open", registry=self.services.metrics)
        Gauge("gateway_connections_open", "Client connections open on the public listener",
              registry=self.services.metrics).set_function(lambda: len(server.connections))
        Gauge("gateway_upstream_waiting", "Requests sent to the upstream whose response head has not come yet",
              registry=self.services.metrics).set_function(lambda: len(self.upstream.waiting))
        Gauge("gateway_upstream_oldest_wait_seconds", "Seconds the longest-waiting request has waited for the "
              "upstream's response head (0: none waiting)", registry=self.services.metrics).set_function(
            lambda: self.upstream.oldest_wait())
        # (the open files limit is raised before the start, and upstream.max_connections needs a
        # restart: what they leave client connections is worked out once, not at each accept)
        self._client_fds = open_files_limit() - self.cfg.upstream.max_connections - FD_RESERVE - LISTEN_BACKLOG
        if self.cfg.server.max_connections is not None and self.cfg.server.max_connections > self._client_fds:
            log.warning("server.max_connections (%d) is more than the open files limit (%d) leaves beside "
                        "upstream.max_connections (%d): idle client connections can then take the descriptors the "
                        "admin listener, the upstream and the database need (raise the limit, or lower the "
                        "setting)", self.cfg.server.max_connections, open_files_limit(),
                        self.cfg.upstream.max_connections)
        self._public = web.ServerRunner(server, shutdown_timeout=_CUT_AFTER_DRAIN)
        await self._public.setup()
        reuse = self.cfg.server.reuse_port or None
        site = web.TCPSite(self._public, self.cfg.server.host, self.cfg.server.port, backlog=LISTEN_BACKLOG,
                           reuse_port=reuse)
        await _listen(site, "server.host", self.cfg.server.host)
        self.public_port = _port(self._public)
        if self.cfg.admin.enabled:
            self._admin = JsonErrorAppRunner(build_admin_app(self), access_log=None, shutdown_timeout=5,
                                             keepalive_timeout=self.cfg.server.keepalive_timeout)
            await self._admin.setup()
            await _listen(web.TCPSite(self._admin, self.cfg.admin.host, self.cfg.admin.port, reuse_port=reuse),
                          "admin.host", self.cfg.admin.host)
            self.admin_port = _port(self._admin)
        else:
            needs = sorted({p.name for p in self.cfg.plugins if p.enabled and p.name in _ADMIN_PLUGINS})
            if needs:
                log.warning("the admin listener is off (no `admin:` section, or enabled: false): %s %s no "
                            "admin API here (/metrics, /keys, /audit, /conversations, /config/reload)",
                            ", ".join(needs), "has" if len(needs) == 1 else "have")

        def host_port(host: str, port: int | None) -> str:  # (an IPv6 address in brackets: [::1]:8080)
            return f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"

        log.info("gateway listening", extra={"fields": {
            "public": host_port(self.cfg.server.host, self.public_port),
            "admin": host_port(self.cfg.admin.host, self.admin_port) if self._admin else None,
            "upstream": redact_url(self.cfg.upstream.url), "plugins": [p.name for p in self.cfg.plugins if p.enabled]}})

    # Plugin middlewares and TraceConfigs, each object mounted once per process (a reload collects
    # them again: only a plugin that was not running brings new ones).
    # (several instances of one plugin, per-route overrides, hand out the same objects: each once)
    def _unmounted_middlewares(self, rt: Runtime) -> list[Any]:
        out: list[Any] = []
        for p in rt.instances:
            out += [m for m in p.middlewares() if not self._is_mounted(m, out)]
        return out

    def _unmounted_trace_configs(self, rt: Runtime) -> tuple[list[Any], set[str]]:
        tcs: list[Any] = []
        owners = set()
        for p in rt.instances:
            new = [tc for tc in p.trace_configs() if not self._is_mounted(tc, tcs)]
            if new:
                tcs += new
                owners.add(p.name)
        return tcs, owners

    def _is_mounted(self, obj: Any, collected: list[Any]) -> bool:
        return any(obj is m for m in self._mounted) or any(obj is m for m in collected)

    def _mount(self, objs: list[Any]) -> None:
        self._mounted.extend(objs)

    @property
    def stopping(self) -> bool:
        """A shutdown has begun: responses from now on close their connection."""
        return self._stopping

    def _dispatch(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # A connection keeps the handler it was given: this indirection lets a reload wrap a new
        # plugin's middleware around the handler for connections already open too.
        return self._handler(request)

    def connection_cap(self) -> int:
        """server.max_connections, or what the open files limit leaves for client connections."""
        if self.cfg.server.max_connections is not None:
            return self.cfg.server.max_connections
        return max(MIN_AUTO_CONNECTIONS, self._client_fds)

    def skip_drain_delay(self) -> None:
        """End ``server.drain_delay`` now (a second SIGTERM/SIGINT: whoever sent it wants the stop)."""
        self._skip_delay.set()

    async def stop(self) -> None:
        """Fail /readyz and keep serving for server.drain_delay, then stop accepting, let in-flight
        requests finish (up to shutdown_timeout), then shut the plugins down (they flush what they
        buffered, all under one deadline) and close the shared resources."""
        self._stopping = True  # /readyz fails from now on, and every response closes its connection
        delay = self.cfg.server.drain_delay
        if delay > 0 and self._public is not None and not self._skip_delay.is_set():
            # A load balancer sees /readyz fail only at its next health check (and takes the
            # instance out after its threshold of them): until then it still sends requests here.
            # They are served, with Connection: close so keep-alive clients go elsewhere; closing
            # the listener at once would reset the requests already on their way.
            log.info("shutting down: /readyz fails; still serving for %gs (server.drain_delay) so load "
                     "balancers take this instance out", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._skip_delay.wait()
            if self._skip_delay.is_set():
                log.info("shutting down: a second signal ended server.drain_delay early")
        try:  # a reload under way finishes (or is refused) first; one stuck on its file does not hold the stop
            async with asyncio.timeout(RELOAD_READ_TIMEOUT + 5):
                async with self._reload_lock:
                    pass
        except TimeoutError:
            log.warning("stopping while a config reload is still under way")
        timeout = self.cfg.server.shutdown_timeout
        self.drain_deadline = time.monotonic() + timeout
        log.info("shutting down: listener closed; draining in-flight requests (up to %gs, "
                 "server.shutdown_timeout)", timeout)
        if self._public is not None:
            # aiohttp's own drain would give a streaming response up to twice its timeout (it waits,
            # cancels the request body, which such a handler no longer reads, and waits again). So
            # the gateway drains itself: stop accepting, close idle connections, wait for the
            # requests in flight up to shutdown_timeout; then the gateway cuts what is left
            # (Proxy.cut: a request not answered yet gets a 503 first).
            for site in list(self._public.sites):
                await site.stop()
            server = self._public.server
            if server is not None:
                # A connection waiting for its next request after an answer (keep-alive) is closed
                # now: a request its client sent on it meanwhile would wait for nothing, unanswered
                # and unrecorded; closed, the client sees it at once (and retries elsewhere).
                # One accepted a moment ago that has not sent its first request yet has a client
                # that has begun one: closing it would reset a request the client cannot tell went
                # nowhere. Those get FRESH_GRACE to send it (answered with Connection: close).
                # Connections with a request under way are left alone (not told to close: that
                # would drop the rest of a body still arriving); their answers close them.
                fresh = [c for c in self._waiting(server) if getattr(c, "_request_count", 1) == 0]
                self._close_waiting(server, keep=fresh)
                until = time.monotonic() + min(FRESH_GRACE, max(0.0, self.drain_deadline - time.monotonic()))
                while fresh and time.monotonic() < until:
                    await asyncio.sleep(0.02)
                    fresh = [c for c in self._waiting(server) if c in fresh and getattr(c, "_request_count", 1) == 0]
                self._close_waiting(server, keep=[])  # (and those that sent nothing in FRESH_GRACE)
            # (requests that began before a reload are counted on the runtime they began with)
            left = max(0.0, self.drain_deadline - time.monotonic())
            idle = await asyncio.gather(*(rt.wait_idle(left) for rt in [self.runtime, *self._retiring]))
            if not all(idle):
                # The drain time is up: what is still running is cut now, not after aiohttp's own
                # grace (_CUT_AFTER_DRAIN, twice); a request not answered yet gets a 503 first.
                self.drain_deadline = min(self.drain_deadline, time.monotonic())
                n = self.proxy.cut()
                if n:
                    log.warning("drain time (server.shutdown_timeout: %gs) is up: %d request(s) still in flight "
                                "cut", timeout, n)
            await self._public.cleanup()
            self._public = None
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        self._writers_close_by()
        for t in list(self._old_runtimes):
            await t
        await self.runtime.shutdown(wait=0)
        from .proxy import DRAINING  # upstream responses still being read after [DONE] (0.5 s at most)
        loop = asyncio.get_running_loop()
        await asyncio.gather(*[t for t in list(DRAINING.values()) if t.get_loop() is loop], return_exceptions=True)
        await self.upstream.close()
        await self.services.close()
        if self.db is not None:
            await self.db.close()
        _REFUSED_LOG.flush()  # (the counts held back for their next line)
        _RESOURCE_LOG.flush()
        _CONNECTIONS_LOG.flush()
        log.info("gateway stopped")

    @staticmethod
    def _waiting(server: Any) -> list[Any]:
        """The public connections waiting for a request: aiohttp's handler sets ``_waiter`` only
        then (a request taken off the queue, its handler task not started yet, has none)."""
        return [conn for conn in getattr(server, "connections", ())
                if conn.transport is not None and getattr(conn, "_waiter", None) is not None
                and not getattr(conn, "_messages", None)]

    def _close_waiting(self, server: Any, keep: list[Any]) -> None:
        for conn in self._waiting(server):
            if conn not in keep:
                conn.force_close()

    def _writers_close_by(self) -> None:
        """One deadline for every background writer's final flush, set before the plugins shut
        down: they flush at once (their shutdown hooks and the shared resources closing after
        them all wait within it), so a database that takes no writes costs one retry budget in
        all, not one per writer in turn (which could outlast a process manager's wait for exit,
        and its SIGKILL loses records uncounted)."""
        writers = self.services.writers()
        budget = max((w.shutdown_retry_for for w in writers), default=0.0)
        deadline = time.monotonic() + budget
        for w in writers:
            w.close_by(deadline)

    async def reload(self, actor: str = "signal") -> tuple[bool, str]:
        """Load and validate the config file again, start the new chain, swap it in atomically.
        On any error the running config is left untouched."""
        async with self._reload_lock:
            try:
                ok, detail = await self._reload()
            except Exception as e:  # anything unforeseen: the running config stays, and it is said why
                self.services.settings = self.cfg
                ok, detail = False, redact_url(f"the reload failed: {type(e).__name__}: {e}")
            self._reloads.labels("success" if ok else "failure").inc()
            try:
                self.services.events.emit("config.reloaded", actor=actor, result="success" if ok else "failure",
                                          detail=detail)
            finally:
                self.replaced = None
        # (refused because the gateway is stopping: nothing is wrong)
        (log.info if ok or self._stopping else log.error)("config reload %s: %s", "applied" if ok else "rejected",
                                                          detail)
        return ok, detail

    async def _reload(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "the gateway is shutting down"
        if not self.cfg.path:
            return False, "the running config was not loaded from a file"
        path = self.cfg.path
        for _ in range(RELOAD_READS):
            try:
                # In a thread: a big file must not stall requests. Bounded: a file on a stalled network
                # mount must not hold the reload lock (and a shutdown waiting on it) for ever.
                new = await asyncio.wait_for(in_daemon_thread(load_config, path), RELOAD_READ_TIMEOUT)
            except ConfigError as e:
                if e.read_state is not None:  # (what was wrong may be a file half written: as below)
                    await asyncio.sleep(RELOAD_SETTLE)
                if file_state(path) == e.read_state or e.read_state is None:
                    return False, str(e)
                continue
            except TimeoutError:
                return False, f"{path}: reading the file did not finish within {RELOAD_READ_TIMEOUT:g}s"
            # A file written in place (truncated, then written: an editor, a bind-mounted file
            # copied over) can be read half-written, a list of plugins cut short and valid: it
            # is read again until it stays the same for a moment.
            await asyncio.sleep(RELOAD_SETTLE)
            if file_state(path) == new._read_state:
                break
        else:
            return False, f"{path}: the file kept changing while it was read; reload once it is written"
        if self._stopping:
            return False, "the gateway is shutting down"
        fixed = self.cfg.restart_needed(new)
        if fixed:
            return False, (f"{', '.join(fixed)} cannot change without a restart (server.host, server.port, "
                           "server.reuse_port, server.shutdown_timeout, server.keepalive_timeout, admin, database, upstream.max_connections "
                           "and upstream.keepalive_timeout need one)")
        if uses_database(new) and not uses_database(self.cfg):
            assert self.db is not None
            try:
                await self.migrate_if_configured()
            except Exception as e:
                return False, f"database not ready: {type(e).__name__}"
        rt: Runtime | None = None
        # The new chain's plugins are built against the new settings (e.g. key_auth strips the
        # client's key header unless the new upstream.headers set it); put back if refused.
        self.services.settings = new
        try:
            rt = Runtime(new, self.services)
            await rt.startup()
            middlewares = self._unmounted_middlewares(rt)
            trace_configs, owners = self._unmounted_trace_configs(rt)
        except Exception as e:
            # What a plugin or its library says can quote its settings (a URL with a password): the
            # message is scrubbed, and no traceback goes to the log.
            why = redact_url(f"{type(e).__name__}: {e}")
            which = _which_plugin(e) or "a plugin"
            log.error("%s failed to start during reload: %s", which, why)
            self.services.settings = self.cfg
            if rt is not None:
                await rt.shutdown(wait=0)
            return False, f"{which} failed to start: {why}"
        # From here on nothing fails: the new config is applied as a whole.
        if trace_configs:
            self.upstream.add_trace_configs(trace_configs, owners)
        if middlewares:
            self._handler = wrap_middlewares(self._handler, middlewares)
        self._mount(middlewares + trace_configs)
        if new.logging != self.cfg.logging:
            setup_logging(new.logging.level, new.logging.format)
        old, self.runtime, self.cfg = self.runtime, rt, new
        self.replaced = old  # (until this reload's event is recorded: see Gateway.reload)
        self.upstream.configure(new.upstream)  # (the current target: readiness, the learned stream_usage)
        _activate(rt)
        _check_grace(new, self.services)
        # The old chain serves the requests it began for as long as they last (an LLM stream can
        # outlast server.shutdown_timeout): a plugin the reload removed still records them.
        task = asyncio.create_task(old.shutdown(wait=None))
        self._old_runtimes.add(task)
        self._retiring.add(old)
        task.add_done_callback(self._old_runtimes.discard)
        task.add_done_callback(lambda _t: self._retiring.discard(old))
        gone = sorted(old.in_use - rt.in_use)  # (taken out of the list, or enabled: false on every route)
        if gone:  # (key_auth or audit taken out is a change of what the gateway guards: said aloud)
            log.warning("config reload removes the plugin(s) %s", ", ".join(gone))
        return True, f"{len(new.plugins)} plugin(s), {len(new.routes)} route(s) from {new.path}"


def ephemeral_port(port: int) -> bool:
    """Is this port in the range the system picks outgoing connections' local ports from?"""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return False
    return lo <= port <= hi


def tune_gc() -> None:
    """Move everything built at start-up (modules, config, plugin objects) out of the collector's
    reach and collect young objects less often. Measured with bench/: without it, full collections
    over the imported libraries' objects cost ~14% of CPU under load and spike p99 latency."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering what never reaches the gateway's handler (a request
    its HTTP parser rejects: garbage, an over-long header line, a bad chunk size) in the gateway's
    one JSON error shape instead of aiohttp's plain text, on the public and the admin listener.
    The parser's message is neither echoed nor logged: it can quote what the client sent, an API
    key or the admin token included."""

    #: made by a JsonErrorServer with a cap, and not yet among its connections (see __call__)
    _counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._uncount()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._uncount()
        super().connection_lost(exc)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            server = self._manager
            if isinstance(server, JsonErrorServer):
                server.accepting -= 1

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response already began: the connection is broken
            if exc is not None and not isinstance(exc, OSError):
                # (a fault of the gateway's own after the head went out: the client sees the
                # connection drop, and the log must say why)
                log.error("request handling failed after the response began (from %s); connection closed",
                          request.remote, exc_info=exc)
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if isinstance(exc, ContentEncodingError) and _decodable(exc):
            # A coding the gateway takes, with data that is not that coding or stops before its
            # end (a deflate or gzip body cut short): the client's body is broken.
            _refused("undecodable", "request(s) refused: body not decodable as its Content-Encoding", request)
            status = 400
            body = error_body(undecodable_body_message(), "invalid_request_error", "bad_request")
        elif isinstance(exc, ContentEncodingError):
            # A body coding the parser knows but cannot decode here (br or zstd without their
            # packages): the same 415 as any other coding the gateway does not take.
            _refused("unsupported", "request(s) refused: unsupported Content-Encoding", request)
            status = 415
            body = error_body(unsupported_encoding_message(), "invalid_request_error", "unsupported_content_encoding")
        elif status >= 500:
            log.error("request handling failed (from %s)", request.remote, exc_info=exc)
            body = error_body("The gateway failed to handle the request.", "server_error", "internal_error")
        else:
            _refused(f"parser {status}", f"request(s) refused by the HTTP parser: {status} "
                     f"{type(exc).__name__ if exc is not None else ''}", request)
            body = error_body("The request is not valid HTTP/1.1 (malformed request line, header or body "
                              "framing, or a header line that is too long).", "invalid_request_error",
                              "malformed_request")
        resp = web.Response(status=status, body=body, content_type="application/json",
                            headers={"Server": SERVER})
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, (ContentEncodingError, PayloadEncodingError, RequestPayloadError)):
            # aiohttp reading the rest of a body after the response (to keep the connection) and
            # finding it cannot be decoded, e.g. "gzip" that is not: the client's error, already
            # answered. One line, no traceback (a client could fill the log with them otherwise).
            _REFUSED_LOG.event("payload", 1, f"%d request body(ies) could not be decoded ({type(exc).__name__}); "
                                              "connection closed")
            return
        super().log_exception(*args, **kw)


#: Requests refused before the gateway's handler (by the HTTP parser, or for their body coding):
#: anyone can send them by the thousand, so one line per kind per 10 s, with the count.
_REFUSED_LOG = ThrottledLog(log, interval=10.0, level=logging.INFO)


def _refused(kind: str, what: str, request: web.BaseRequest) -> None:
    remote = str(request.remote or "?").replace("%", "%%")  # (an IPv6 zone id: fe80::1%eth0)
    _REFUSED_LOG.event(kind, 1, f"%d {what} (the last from {remote})")


def _decodable(exc: ContentEncodingError) -> bool:
    """The parser failed on a coding the gateway decodes (so the data is at fault), not on one it
    lacks the package for ("... brotli (br). Please install `Brotli`"). (The request the parser
    hands over with the error has no headers: the coding is read from the error.)"""
    text = str(getattr(exc, "message", "") or "")
    coding = text.rsplit(":", 1)[-1].strip().lower()
    return "install" not in text.lower() and coding in _DECODED and coding != "identity"


#: After the gateway's own drain (Gateway.stop), which cancels what still runs, what aiohttp gives
#: such a handler to end (to record its exchange) before cutting it (it waits this long twice).
_CUT_AFTER_DRAIN = 0.25
#: On shutdown, how long a connection accepted just before the listener closed gets to send its
#: first request (within the drain time).
FRESH_GRACE = 0.5


def _activate(rt: Runtime) -> None:
    for p in rt.instances:
        try:
            p.activated()
        except Exception:
            log.exception("plugin %s failed in activated()", p.name)


def _size(path: str) -> float:
    try:
        return float(os.stat(path).st_size)
    except OSError:  # (none yet, or the file moved away)
        return 0.0


def _check_grace(cfg: GatewayConfig, services: Services) -> None:
    """A writer that gives up on a failing database sooner than server.readiness_grace drops
    records while /readyz still says ready: said at start and reload (with the config's other
    warnings)."""
    for w in cfg.warnings():
        log.warning("%s", w)
    grace = cfg.server.readiness_grace
    short = sorted(f"{w.name} ({w.retry_for:g}s)" for w in services.writers() if w.readiness and w.retry_for < grace)
    if short:
        log.warning("server.readiness_grace (%gs) is longer than the retry_for of %s: a database failing that "
                    "long makes them drop records while /readyz still says ready; keep the grace below "
                    "retry_for", grace, ", ".join(short))


#: Descriptors kept back from client connections for the database pool, the admin listener, Redis,
#: log and database files (besides upstream.max_connections), when server.max_connections is unset.
FD_RESERVE = 256
MIN_AUTO_CONNECTIONS = 64
#: The public listener's backlog: asyncio accepts up to this many connections at one wake-up, each
#: taking its descriptor before the cap can refuse it, so the cap leaves room for them too.
LISTEN_BACKLOG = 1024


def open_files_limit() -> int:
    try:
        import resource
    except ImportError:
        return 1 << 20
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


_FULL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nServer: " + SERVER.encode() + b"\r\nContent-Length: %d\r\n\r\n")
_FULL_BODY = error_body("The gateway has as many client connections open as it takes (server.max_connections); "
                        "retry shortly.", "server_error", "too_many_connections")
_CONNECTIONS_LOG = ThrottledLog(log, interval=10.0, level=logging.WARNING)


class _Full(asyncio.Protocol):
    """A connection over server.max_connections: answered 503 at once (the one error shape), then
    closed. Closed at once with the client's request unread, the kernel would reset it, and the
    client would lose the answer: the connection ends its side after the answer and discards what
    arrives until the client closes, for at most a second (and without that wait once
    FULL_LINGER of them are lingering: the descriptors are what is short)."""

    lingering = 0

    def __init__(self) -> None:
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_FULL % len(_FULL_BODY) + _FULL_BODY)
        if _Full.lingering >= FULL_LINGER or not transport.can_write_eof():
            transport.close()
            return
        _Full.lingering += 1
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(FULL_LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # (discarded: the request is not read)

    def eof_received(self) -> bool:
        return False  # the client has read the answer and closed: close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            _Full.lingering -= 1


#: Refused connections (over server.max_connections) that may wait for their client to close
FULL_LINGER = 64
FULL_LINGER_SECONDS = 1.0



def _which_plugin(e: BaseException, after: str = "") -> str:
    """"plugin NAME" (then ``after``) for an error a plugin's start-up raised (Runtime.startup
    names it), else ""."""
    who = getattr(e, "gateway_plugin", None)
    return f"plugin {who}{after}" if isinstance(who, str) else ""

class JsonErrorServer(web.Server):
    #: the public listener's connection cap (read at each accept: a reload changes it); None: none
    cap: Callable[[], int] | None = None
    refused: Any = None
    #: Connections made (their handler built) but not yet among ``_connections``: asyncio runs the
    #: factory for every connection of a burst before any of them is registered (connection_made
    #: comes a loop turn later), so counting only those registered let a burst past the cap.
    accepting = 0

    def __call__(self) -> asyncio.Protocol:
        if self.cap is not None:
            cap = self.cap()
            if len(self._connections) + self.accepting >= cap:
                if self.refused is not None:
                    self.refused.inc()
                _CONNECTIONS_LOG.event("full", 1, f"%d client connection(s) answered 503 and closed: {cap} were "
                                                  "open (server.max_connections)")
                return _Full()
        try:
            handler = _JsonErrorHandler(self, loop=self._loop, **self._kwargs)
        except (AttributeError, TypeError):  # a future aiohttp without these: its own handler
            return super().__call__()
        if self.cap is not None:
            handler._counted = True
            self.accepting += 1
        return handler


class JsonErrorAppRunner(web.AppRunner):
    """An application runner (the admin API) whose connections use the same JSON error handler."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is web.Server:  # the application's server, with the gateway's connection handler
            server.__class__ = JsonErrorServer
        return server


def raise_open_files_limit() -> None:
    """Every client connection and every upstream connection is a file descriptor: the soft limit
    (often 1024, or 256) is raised as far as the hard one allows, and a low limit is said."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    # An unlimited hard limit is not always settable (macOS takes at most OPEN_MAX, 10240).
    for want in ([hard, 1_048_576, 10240] if hard == inf else [hard]):
        if soft != inf and (want == inf or want > soft):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
                break
            except (ValueError, OSError):
                continue
    if soft != inf and soft < 4096:
        log.warning("the open files limit is %d: each client and upstream connection takes one (raise it with "
                    "`ulimit -n` or LimitNOFILE=)", soft)


_RESOURCE_LOG = ThrottledLog(log, interval=10.0, level=logging.ERROR)


def _quiet_resource_errors(previous: Any) -> Any:
    """asyncio reports an accept() that fails for want of file descriptors with a traceback, over
    and over while the condition lasts (megabytes of log a second): one counted line per 10 s."""
    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "out of system resource" in str(context.get("message", "")):
            exc = context.get("exception")
            why = f"{type(exc).__name__}: {exc}".replace("%", "%%")
            _RESOURCE_LOG.event("accept", 1, f"cannot accept connections: {why} (the open files limit is "
                                             "reached); %d failed accept() call(s)")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)
    return handler


def wrap_middlewares(handler: Any, middlewares: list[Any]) -> Any:
    """``handler`` wrapped in aiohttp-style ``(request, handler)`` middlewares, the first outermost."""
    for mw in reversed(middlewares):
        handler = functools.partial(_through, mw, handler)
    return handler


async def _through(mw: Any, inner: Any, request: web.BaseRequest) -> web.StreamResponse:
    return await mw(request, inner)


#: Plugins whose use is mostly through the admin API.
_ADMIN_PLUGINS = frozenset({"metrics", "key_auth", "audit", "conversations"})


async def _listen(site: web.TCPSite, setting: str, host: str) -> None:
    """Start a listener; a failure names the setting and the host (a name that does not resolve
    said only "Name or service not known", for either listener)."""
    try:
        await site.start()
    except OSError as e:
        raise OSError(e.errno, f"{setting} {host or '*'!r}: {e.strerror or e}") from None


def _port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, (tuple, list)) and len(addr) >= 2:
            return int(addr[1])
    return 0


async def serve(cfg: GatewayConfig, ready: Any = None, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``stop`` is set); SIGHUP reloads the config."""
    gw = Gateway(cfg)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    raise_open_files_limit()
    loop.set_exception_handler(_quiet_resource_errors(loop.get_exception_handler()))
    # Signal handlers go in before anything starts: a SIGHUP sent as soon as the gateway is up (a
    # deploy tool reloading right after a start) would otherwise kill it (the default action). A
    # SIGHUP during start-up reloads once start-up is done; SIGTERM/SIGINT interrupt it.
    starting = asyncio.ensure_future(gw.start())
    hup_pending = False

    def on_hup() -> None:
        nonlocal hup_pending
        if starting.done():
            asyncio.ensure_future(gw.reload(actor="SIGHUP"))
        else:
            hup_pending = True

    def on_stop() -> None:
        if stop.is_set():  # a second signal: stop without the rest of server.drain_delay
            gw.skip_drain_delay()
        stop.set()
        if not starting.done():
            starting.cancel()

    for sig, fn in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup)):
        try:
            loop.add_signal_handler(sig, fn)
        except (NotImplementedError, RuntimeError, AttributeError):
            pass
    # (signals that came before these handlers were in: see gateway.run)
    hup_pending = hup_pending or signal.SIGHUP in early_signals
    if stop_requested():
        on_stop()
    early_signals.clear()
    log.info("gateway starting", extra={"fields": {"config": cfg.path}})
    try:
        await starting
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        log.info("start-up interrupted by a signal")
        await gw.stop()
        return 0
    except Exception as e:
        # e.g. the port is taken or a plugin's backend is unreachable: say so in one line (a
        # traceback only for what is not an OS-level error), and undo what had started.
        if isinstance(e, (OSError, DatabaseError)):
            # (a message that is empty, as a timeout's is, shows the type instead of nothing)
            hint = ""
            if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
                hint = ("; another process listens there (two gateways share a port only if both set "
                        "server.reuse_port: true and run as the same user)")
                m = re.search(r"\('[^']*', (\d+)[,)]", str(e))  # ('127.0.0.1', 8080) or ('::1', 8080, 0, 0)
                if m and ephemeral_port(int(m.group(1))):
                    hint += (f", or an outgoing connection uses it: {m.group(1)} is in this system's range "
                             "of ports for outgoing connections (net.ipv4.ip_local_port_range); a listening "
                             "port below that range never collides with one")
            log.error("start-up failed: %s%s%s", _which_plugin(e, ": "), redact_url(str(e).strip() or type(e).__name__),
                      hint)
        else:
            # (scrubbed, and no traceback: a library's message can quote a URL with its password)
            log.error("start-up failed: %s%s%s", _which_plugin(e, ": "), redact_url(f"{type(e).__name__}: {e}"),
                      sqlite_hint(e))
        # Never ready, so in no load balancer: no drain_delay (the listener that did start would
        # serve for it, from a process that is exiting).
        gw.skip_drain_delay()
        await gw.stop()
        return 1
    tune_gc()
    if hup_pending and not stop.is_set():
        asyncio.ensure_future(gw.reload(actor="SIGHUP"))
    if ready is not None:
        await ready(gw)
    await stop.wait()
    log.info("shutting down (server.drain_delay %gs, then up to %gs for requests in flight)",
             gw.cfg.server.drain_delay, gw.cfg.server.shutdown_timeout)
    await gw.stop()
    return 0
