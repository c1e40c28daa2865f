"""The plugin protocol, the short-circuit ``Reply`` and the registry.

A plugin is a class with a validated ``Config`` model and any of these hooks (the base class is a
pass-through, so a plugin overrides only what it needs; the chain skips hooks left as they are):

``on_request(ctx) -> Reply | None``
    In YAML order, after the request body is read. Returning a ``Reply`` stops the chain and sends it.
``on_forward(ctx) -> Reply | None``
    In YAML order, once every plugin's ``on_request`` let the request through, just before it is
    forwarded: the body is final here (a plugin further down the chain may have changed it, e.g.
    a conversation's history added). A ``Reply`` refuses it, as from ``on_request``. Runs only
    where a plugin after this one in the chain has ``rewrites_body``, and only for a request whose
    body an ``on_request`` changed.
``on_response(ctx, head)``
    In reverse order, before the response head is sent (upstream answers, replies and gateway errors);
    ``head.headers`` may be changed.
``on_chunk(ctx, chunk, last) -> bytes``
    In reverse order, for each piece of the response body as it comes (decoded if the upstream
    compressed it; pieces of any size: an event may be split over two), and once more at the end
    with ``last`` True and an empty chunk. Returns the bytes to send on (a small tail may be held
    back for the next piece; never the whole body). What the plugins return is what the client
    gets and what is recorded (the stored answer, its usage).
``on_complete(ctx)``
    Exactly once for every request that reached the chain: proxied, refused, failed or aborted.
    Runs after the client has the whole response, before its connection serves the next
    request: must be quick (enqueue, don't write).
``startup()`` / ``shutdown()``
    Once per plugin instance; shutdown flushes what the plugin buffered.

Plugins are found by name: built-ins and third-party packages register a class in the
``gateway.plugins`` entry-point group; an instance is known by that name. docs/plugins.md is the
guide to writing one.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from .config.model import no_bool_numbers
from .errors import error_body

if TYPE_CHECKING:
    from .context import RequestContext
    from .services import Services

log = logging.getLogger("gateway.plugin")

ENTRY_POINT_GROUP = "gateway.plugins"


class PluginConfig(BaseModel):
    """Base for plugin config models: unknown keys are errors; so is true/false for a number."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        return no_bool_numbers(cls, v, info)


@dataclass(slots=True)
class Reply:
    """A response a plugin sends instead of forwarding the request."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, data: Any, headers: Mapping[str, str] | None = None) -> "Reply":
        return cls(status, json.dumps(data, default=str).encode(), dict(headers or {}))

    @classmethod
    def error(cls, status: int, message: str, type: str, code: str | None,
              headers: Mapping[str, str] | None = None) -> "Reply":
        return cls(status, error_body(message, type, code), dict(headers or {}))


@dataclass(slots=True)
class ResponseHead:
    """The status and headers about to be sent to the client; ``on_response`` may change them."""

    status: int
    headers: CIMultiDict[str]
    source: str  # "upstream" | "gateway"


class Plugin:
    """Pass-through base class. Subclasses set ``name`` and ``Config`` and override hooks."""

    #: The plugin's name; an instance is known by the name the config gives it (its entry point's).
    name: str = ""
    Config: ClassVar[type[BaseModel]] = PluginConfig
    #: Set True if the plugin needs ``ctx.completion`` (usage, model, assembled assistant message).
    observes_response: ClassVar[bool] = False
    #: Set True if the plugin reads ``ctx.timings`` (per-plugin hook durations). A middleware can
    #: opt a request out (``request[context.SKIP_TIMINGS] = True``) when nobody will read them.
    wants_timings: ClassVar[bool] = False
    #: Config fields a route's override may not set (process-wide settings, such as a key that
    #: signs one shared record, or a shared writer's): the config loader refuses them there.
    #: Dotted for a nested field (``quotas.cache_ttl``).
    route_fixed: ClassVar[tuple[str, ...]] = ()
    #: Set True if the plugin's ``on_request`` never refuses and need not run before a later
    #: plugin's ``on_headers`` (it only sets upstream headers, asks for usage ...): it does not keep
    #: the plugins after it from checking a request before its body is read.
    header_safe: ClassVar[bool] = False
    #: Set True if the plugin's ``on_request`` may change the body sent upstream (``ctx.set_json``):
    #: the ``on_forward`` hooks of the plugins ahead of it in the chain run (they see what it made);
    #: in a chain with no such plugin after them they are left out, and cost nothing.
    rewrites_body: ClassVar[bool] = False

    #: Hooks this instance overrides but does not need with its config (set in ``__init__``): the
    #: core leaves them out of the chain, so they cost nothing per request.
    unused_hooks: frozenset[str] = frozenset()

    def __init__(self, config: Any, services: "Services") -> None:
        self.config = config
        self.services = services

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def activated(self) -> None:
        """Called once this instance's chain serves requests: after start-up, or after the swap of a
        config reload that succeeded. Settings the instance applies to process-wide objects it
        shares with earlier instances (a writer's queue, metric buckets) go here, not in
        ``startup()``: a reload can still be rejected after every ``startup()`` ran. Must not fail
        (an exception is logged)."""

    async def on_headers(self, ctx: "RequestContext") -> Reply | None:
        """Checks that need only the request head (a credential): run before the body is read,
        so a refused client's body is never taken in (and an ``Expect: 100-continue`` client is
        refused before it sends it). Runs only while every plugin ahead in the chain is
        ``header_safe`` or has an ``on_headers`` too; otherwise not at all, and ``on_request``
        must do the same checks (it can tell by what this hook leaves in ``ctx.state``)."""
        return None

    async def on_request(self, ctx: "RequestContext") -> Reply | None:
        return None

    async def on_forward(self, ctx: "RequestContext") -> Reply | None:
        return None

    async def on_response(self, ctx: "RequestContext", head: ResponseHead) -> None:
        return None

    async def on_chunk(self, ctx: "RequestContext", chunk: bytes, last: bool) -> bytes:
        return chunk

    async def on_complete(self, ctx: "RequestContext") -> None:
        return None

    # -- optional class-level extension points ---------------------------------------------------
    @classmethod
    def admin_routes(cls, services: "Services") -> list[Any]:
        """aiohttp ``RouteDef`` objects to mount on the admin listener (behind the admin token)."""
        return []

    @classmethod
    def openapi_paths(cls) -> dict[str, Any]:
        """OpenAPI ``paths`` entries describing :meth:`admin_routes`."""
        return {}

    @classmethod
    def add_cli(cls, subparsers: Any) -> None:
        """Add ``gateway <command>`` subcommands (argparse subparsers)."""

    def guarded_headers(self) -> tuple[str, ...]:
        """Request headers this plugin owns (a credential it reads, an identity it forwards): the
        core removes a client's copy of them from every request it forwards, on every route,
        including routes where the plugin is turned off, so that a client cannot send them past it
        there. (A header the upstream config sets itself is then set from the config.)"""
        return ()

    def public_prefixes(self) -> tuple[str, ...]:
        """Path prefixes this plugin answers itself on the public listener (never forwarded); they
        stay reachable when ``server.paths`` limits what is proxied."""
        return ()

    def middlewares(self) -> list[Any]:
        """aiohttp-style ``async (request, handler)`` middlewares around the public handler. Collected
        at start-up and after each successful config reload; the core mounts each middleware object
        once per process (wrapped around what is mounted already, never taken off), so return the
        same object every time and let it find the current instance per request. The public
        listener is aiohttp's low-level server: the request is a ``BaseRequest`` (no router, no
        ``match_info``)."""
        return []

    def trace_configs(self) -> list[Any]:
        """aiohttp ``TraceConfig`` objects for upstream requests, collected and mounted like
        ``middlewares()`` (each object once per process). They run on a second client session sharing the connection
        pool, which a request skips when a middleware set ``request[context.PLAIN_UPSTREAM]`` (nobody
        will read what they record)."""
        return []

    async def demo_setup(self) -> dict[str, str]:
        """For ``gateway demo``: create what a first call needs; returns values to print (e.g. api_key)."""
        return {}

    @classmethod
    def overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(Plugin, hook)


class Registry:
    """Plugin classes by name, from the ``gateway.plugins`` entry points plus explicit registrations."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Plugin]] = {}
        self._loaded = False
        self._errors: dict[str, str] = {}

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._classes:
                continue
            try:
                cls = ep.load()
            except Exception as e:  # a broken third-party plugin must not stop the others
                self._errors[ep.name] = f"{type(e).__name__}: {e}"
                log.debug("cannot load plugin %s: %s", ep.name, e)
                continue
            self._classes[ep.name] = cls

    def register(self, cls: type[Plugin], name: str | None = None) -> type[Plugin]:
        self._classes[name or cls.name] = cls
        return cls

    def get(self, name: str) -> type[Plugin] | None:
        self._load()
        return self._classes.get(name)

    def names(self) -> list[str]:
        self._load()
        return list(self._classes)

    def error(self, name: str) -> str | None:
        self._load()
        return self._errors.get(name)


registry = Registry()
