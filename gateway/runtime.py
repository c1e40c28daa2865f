"""The chain as data: plugin instances built once from the config, and per-route chains.

A :class:`Runtime` is immutable once started; a config reload builds a new one, starts it, and
swaps it in atomically. Requests hold the runtime they started with, so the old one is shut down
only after its in-flight requests are done.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from .context import preflight_method
from .plugin import Plugin, registry
from .upstream import Target

if TYPE_CHECKING:
    from gateway.config.model import GatewayConfig

    from .services import Services

log = logging.getLogger("gateway")

#: Seconds a plugin's ``startup()`` may take, at start and on a reload, before it counts as failed.
PLUGIN_STARTUP_TIMEOUT = 60.0


class PluginStartupTimeout(Exception):
    """A plugin's ``startup()`` did not finish within PLUGIN_STARTUP_TIMEOUT."""


class Chain:
    __slots__ = ("name", "plugins", "headers", "request", "before_forward", "response", "chunk", "complete",
                 "observe", "served", "max_body", "forward")

    def __init__(self, name: str, plugins: list[Plugin], max_body: int | None = None, forward: bool = True) -> None:
        self.name = name
        self.plugins = plugins
        self.max_body = max_body  # a route's own limit on request bodies (None: server.max_body_size)
        self.forward = forward  # False: a closed route (routes[].forward), answered 404 after the plugins
        def uses(p: Plugin, hook: str) -> bool:
            return type(p).overrides(hook) and hook not in p.unused_hooks

        self.request = [p for p in plugins if uses(p, "on_request")]
        # (only where a plugin further down may change the body they would look at again)
        self.before_forward = [p for i, p in enumerate(plugins) if uses(p, "on_forward") and any(
            type(q).rewrites_body and uses(q, "on_request") for q in plugins[i + 1:])]
        # The head checks run before the body is read, as long as no plugin ahead of them in
        # the chain must see the request first (a rate limit counting refused attempts does).
        self.headers: list[Plugin] = []
        for p in plugins:
            if uses(p, "on_headers"):
                self.headers.append(p)
            elif uses(p, "on_request") and not type(p).header_safe:
                break
        self.response = [p for p in reversed(plugins) if uses(p, "on_response")]
        self.chunk = [p for p in reversed(plugins) if uses(p, "on_chunk")]
        self.complete = [p for p in plugins if uses(p, "on_complete")]
        self.observe = any(type(p).observes_response for p in plugins)
        # Paths plugins answer themselves: each prefix exactly, or followed by "/".
        prefixes = [x.rstrip("/") for p in plugins for x in p.public_prefixes()]
        self.served = (frozenset(prefixes), tuple(x + "/" for x in prefixes)) if prefixes else None

    def serves(self, path: str) -> bool:
        """Is ``path`` under a prefix a plugin of this chain answers itself?"""
        s = self.served
        return s is not None and (path in s[0] or path.startswith(s[1]))


class Route:
    """A route's chain and what it takes: its prefix (normalised by the config: no trailing '/') and
    the paths below it, on segment boundaries (``/v1/models`` takes ``/v1/models/x``, not
    ``/v1/modelsX``), for its methods (empty: all). Paths are compared without regard to case:
    many backends (Express, Fiber) route ``/v1/Chat/completions`` as ``/v1/chat/completions``,
    and a route's rules must not be dodged by spelling its path otherwise."""
    __slots__ = ("name", "prefix", "low", "below", "methods", "chain")

    def __init__(self, name: str, prefix: str, methods: frozenset[str], chain: Chain) -> None:
        self.name, self.prefix, self.methods, self.chain = name, prefix, methods, chain
        self.low = prefix.lower()
        self.below = self.low if self.low.endswith("/") else self.low + "/"  # ("/" itself: every path)


class Settings:
    """What the request handler reads from one config: the server's limits and paths, and the
    upstream target. A runtime keeps its own, so a request is read, checked and sent wholly as the
    config its chain came from says, however many reloads happen meanwhile."""
    __slots__ = ("max_body", "body_timeout", "send_timeout", "trusted", "paths", "paths_below", "server_timing",
                 "upstream", "guarded")

    def __init__(self, cfg: "GatewayConfig") -> None:
        s = cfg.server
        self.max_body = s.max_body_size
        self.body_timeout = s.body_timeout
        self.send_timeout = s.send_timeout
        self.trusted = s.networks
        # The prefixes proxied (normalised by the config): a path is one of them, or below one
        # (paths_below: each followed by "/", so /v1 takes /v1/x and not /v10).
        self.paths = tuple(s.paths)
        self.paths_below = tuple(p if p.endswith("/") else p + "/" for p in s.paths)
        self.server_timing = s.server_timing
        self.upstream = Target(cfg.upstream)
        #: request headers (lower case) never forwarded from a client: see Plugin.guarded_headers
        self.guarded: frozenset[str] = frozenset()


class Runtime:
    def __init__(self, cfg: "GatewayConfig", services: "Services") -> None:
        self.cfg = cfg
        self.services = services
        self.settings = Settings(cfg)
        self.instances: list[Plugin] = []
        self.by_name: dict[str, Plugin] = {}
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

        def make(name: str, validated: Any) -> Plugin:
            cls = registry.get(name)
            assert cls is not None, name
            inst = cls(validated, services)
            # Known by the name the config gives it (its entry point's), whatever its class says: the
            # name its timings, spans, refusals and log lines carry (one class registered under
            # two names is two plugins; a class that sets none is still named).
            inst.name = name
            self.instances.append(inst)
            return inst

        base: list[tuple[str, Plugin, bool]] = []
        for spec in cfg.plugins:
            inst = make(spec.name, spec.validated)
            self.by_name[spec.name] = inst
            base.append((spec.name, inst, spec.enabled))
        self.default = Chain("default", [p for _, p, on in base if on])
        routes = []
        for i, rc in enumerate(cfg.routes):
            plugins = []
            for name, inst, on in base:
                ov = rc.plugins.get(name)
                if ov is not None and ov.enabled is not None:
                    on = ov.enabled
                if not on:
                    continue
                if ov is not None and ov.validated is not None:
                    inst = make(name, ov.validated)
                plugins.append(inst)
            rname = rc.name or f"{rc.path_prefix}" + (f" {','.join(rc.methods)}" if rc.methods else "")
            methods = set(rc.methods)
            if "GET" in methods and not any("HEAD" in o.methods for o in cfg.routes
                                            if o.path_prefix.lower() == rc.path_prefix.lower()):
                # HEAD is GET without the body (as HTTP servers answer it): the same limits and
                # checks, unless a route with this prefix names HEAD itself.
                methods.add("HEAD")
            routes.append(Route(rname, rc.path_prefix, frozenset(methods), Chain(rname, plugins, rc.max_body_size, rc.forward)))
        # Most specific first: longer prefixes, then routes that name methods.
        routes.sort(key=lambda r: (-len(r.prefix), 0 if r.methods else 1))
        self.routes = routes
        #: A path no route takes, under an API prefix a plugin answers itself (the caller's
        #: /gateway/conversations) while that plugin is off in the default chain and on for some
        #: routes: answered, not 404'd or forwarded upstream, by a chain of every plugin on in the
        #: default chain or on the most specific such route (not that route's chain alone, which
        #: may turn key_auth off, nor the default chain alone, which may have none).
        self.api_chains: list[Chain] = []
        placed: set[str] = set()
        for r in routes:
            for p in r.chain.plugins:
                name = p.name
                if name in placed or not p.public_prefixes() or any(
                        self.default.serves(x.rstrip("/")) for x in p.public_prefixes()):
                    continue
                placed.add(name)
                # Every plugin on in the default chain or on that route runs (the route's instance
                # where it has one): the stricter of the two, so that a key is needed if either
                # needs one.
                own = {x.name: x for x in r.chain.plugins}
                self.api_chains.append(Chain("default", [own.get(n, inst) for n, inst, on in base
                                                         if on or n in own]))
        # Every instance's headers, whichever routes it runs on: a client must not get a key or a
        # forged identity header to the upstream through a route that turns key_auth off.
        # Compared with '_' as '-' (as the request's names are: X_Gateway_Owner is X-Gateway-Owner
        # to a CGI/WSGI server), whichever way either is spelled.
        self.settings.guarded = frozenset(h.lower().replace("_", "-") for p in self.instances
                                          for h in p.guarded_headers())
        #: Plugins in some chain (a plugin with ``enabled: false`` everywhere is configured, not in use).
        self.in_use = frozenset(p.name for c in self.all_chains for p in c.plugins)
        #: Names of the plugins that read hook timings (a middleware may skip them for a request only
        #: when it speaks for all of these).
        self.timing_plugins = frozenset(p.name for p in self.instances if type(p).wants_timings)
        self.record_timings = bool(self.timing_plugins)
        self.started: list[Plugin] = []
        #: the chains in which the cors plugin answers browsers' preflights
        self.cors_chains = frozenset(c for c in self.all_chains if any(p.name == "cors" for p in c.plugins))

    def match_request(self, request: Any) -> Chain:
        """The chain for a request: a browser's CORS preflight (``OPTIONS`` with ``Origin`` and
        ``Access-Control-Request-Method``) takes the route of the request it asks about, so a
        route limited to some methods answers the preflights for them with its own settings."""
        asked = preflight_method(request) if self.cors_chains else None
        if asked:
            chain = self.match(asked, request.path)
            if chain in self.cors_chains:  # (else the OPTIONS's own route, as without cors)
                return chain
        return self.match(request.method, request.path)

    def match(self, method: str, path: str) -> Chain:
        if self.routes:
            low = path.lower()
            for r in self.routes:
                if (low.startswith(r.below) or low == r.low) and (not r.methods or method in r.methods):
                    return r.chain
        for chain in self.api_chains:  # (empty unless a plugin with an API is on for some routes only)
            if chain.serves(path) and not self.default.serves(path):
                return chain
        return self.default

    @property
    def all_chains(self) -> list[Chain]:
        return [self.default] + [r.chain for r in self.routes]

    async def startup(self) -> None:
        try:
            for p in self.instances:
                try:
                    limit = asyncio.timeout(PLUGIN_STARTUP_TIMEOUT)
                    try:
                        async with limit:
                            await p.startup()
                    except TimeoutError:
                        if not limit.expired():
                            raise  # (the plugin's own: a connect of its that timed out)
                        # (a plugin that never answers would hold a reload's answer, and every
                        # reload after it, for ever: cut off, its start-up is a failure)
                        raise PluginStartupTimeout(f"its startup() did not finish within "
                                                   f"{PLUGIN_STARTUP_TIMEOUT:g}s") from None
                except Exception as e:
                    # which plugin, for the message that reports it (start-up, a reload's answer)
                    with contextlib.suppress(Exception):
                        e.gateway_plugin = p.name  # type: ignore[attr-defined]
                    raise
                self.started.append(p)
        except BaseException:
            await self.shutdown(wait=0)
            raise

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, up to ``timeout`` seconds; False if some still are."""
        if not self.inflight:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def shutdown(self, wait: float | None = 30.0) -> None:
        """Shut the plugins down once no request is in flight, waiting up to ``wait`` seconds
        (None: as long as they last; a gateway stopping cuts them after its own drain time)."""
        if (wait is None or wait) and self.inflight:
            try:
                async with asyncio.timeout(wait):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("shutting plugins down with %d request(s) still in flight", self.inflight)
        # All at once: each plugin's shutdown is bounded on its own (a writer's final flush, a span
        # exporter's, the charges still pending), and in turn those bounds would add up, past what
        # a process manager waits before its SIGKILL (which loses records uncounted).
        async def shut(p: Plugin) -> None:
            try:
                await p.shutdown()
            except Exception:
                log.exception("plugin %s failed to shut down", p.name)

        started, self.started = list(reversed(self.started)), []
        await asyncio.gather(*(shut(p) for p in started))
