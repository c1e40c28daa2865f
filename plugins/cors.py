"""``cors``: let web pages on other origins call the gateway from a browser.

::

    - name: cors                  # first in the chain: a preflight carries no API key
      config:
        allow_origins: ["https://chat.example.com", "https://*.example.org"]

A browser asks first (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``): the
plugin answers that preflight itself, 204 for an allowed origin and method, a 403 error naming
what is not allowed otherwise; it is never forwarded, and never needs a key. Every other response
to an allowed origin (the upstream's, and the gateway's own errors and refusals: a 401, a 429)
gets ``Access-Control-Allow-Origin`` and ``Access-Control-Expose-Headers``, so the page can read
the answer, its rate-limit headers and ``X-Conversation-ID``. The upstream's own CORS headers are
replaced. A request from an origin not allowed is still served (CORS is read by browsers, not an
access control: keys are), without the headers a browser needs to hand it to the page. See
docs/configuration.md, "Browsers (CORS)".
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from gateway.context import RequestContext, preflight_method
from gateway.plugin import Plugin, PluginConfig, Reply, ResponseHead

#: What the gateway adds to responses, for a page to read: its request id, the conversation id,
#: the rate-limit headers in their three forms, Retry-After and Server-Timing.
EXPOSED = ("X-Request-ID", "X-Upstream-Request-ID", "X-Conversation-ID", "X-Conversation-Parent-ID", "Retry-After",
           "retry-after-ms", "x-should-retry", "RateLimit", "RateLimit-Policy", "X-RateLimit-Limit",
           "X-RateLimit-Remaining", "X-RateLimit-Reset", "x-ratelimit-limit-requests",
           "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
           "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "Server-Timing", "openai-processing-ms",
           "Content-Disposition")
_ORIGIN = re.compile(r"^(https?)://(\*\.)?([a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(:\d{1,5})?$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token: a header or method name


def url_ipv6(ip: ipaddress.IPv6Address) -> str:
    """An IPv6 address as the URL standard writes it in a host (and browsers in Origin): Python's
    compressed form, but never a dotted IPv4 tail (Python 3.13 writes ::ffff:127.0.0.1 where a
    browser has ::ffff:7f00:1)."""
    if ip.ipv4_mapped is None:
        return ip.compressed
    n = int(ip)
    return f"::ffff:{n >> 16 & 0xFFFF:x}:{n & 0xFFFF:x}"


class CorsConfig(PluginConfig):
    allow_origins: list[str] = Field(
        ..., min_length=1,
        description="Origins whose pages may call the gateway: https://chat.example.com, https://*.example.org "
                    "(any subdomain), or \"*\" (any page).")
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "POST", "DELETE"],
                                     min_length=1, description="Methods a page may use (a preflight asking another is refused); \"*\": any.")
    allow_headers: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Request headers a page may send; \"*\": whatever its preflight asks for (Authorization "
                    "included).")
    expose_headers: list[str] = Field(default_factory=lambda: list(EXPOSED),
                                      description="Response headers a page may read besides the simple ones.")
    allow_credentials: bool = Field(False, description="Let pages send cookies (API keys need no credentials).")
    max_age: int = Field(600, ge=0, le=86400, description="Seconds a browser may reuse a preflight's answer.")

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        out = []
        for o in v:
            o = o.strip().lower().rstrip("/")
            m = _ORIGIN.match(o)
            if o != "*" and o != "null" and not m:
                raise ValueError(f"{o!r} is not an origin: scheme://host[:port], such as https://chat.example.com "
                                 "or https://*.example.org, with no path (or \"*\")")
            if m:
                scheme, star, host, port = m.groups()
                if port and not 0 < int(port[1:]) <= 65535:
                    raise ValueError(f"{o!r}: a port is 1..65535")
                if port == {"https": ":443", "http": ":80"}[scheme]:
                    o = o[:-len(port)]  # (browsers leave a default port out of Origin)
                    port = None
                if star and ("." not in host or host.startswith("[")):
                    raise ValueError(f"{o!r} allows every site under .{host}: name the domain (https://*.example.org)")
                if host.startswith("["):
                    # an IPv6 literal as a browser writes it in Origin: compressed ([2001:db8::2])
                    try:
                        ip = ipaddress.IPv6Address(host[1:-1])
                    except ValueError:
                        raise ValueError(f"{o!r}: {host} is not an IPv6 address") from None
                    o = f"{scheme}://[{url_ipv6(ip)}]{port or ''}"
            out.append(o)
        return out

    @field_validator("allow_methods", "allow_headers", "expose_headers")
    @classmethod
    def _tokens(cls, v: list[str]) -> list[str]:
        for x in v:
            if x != "*" and not _TOKEN.match(x):
                raise ValueError(f"{x!r} is not a header or method name")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> "CorsConfig":
        if self.allow_credentials and ("*" in self.allow_origins or "null" in self.allow_origins):
            # (any site can make a "null" origin: a sandboxed iframe, a data: URL)
            raise ValueError("allow_credentials with allow_origins \"*\" or \"null\" would let every site make "
                             "requests with its visitors' cookies: list the origins")
        if self.allow_credentials and "*" in self.expose_headers:
            raise ValueError("expose_headers \"*\" exposes nothing with allow_credentials (browsers take it as a "
                             "header named *): list the headers")
        self.allow_methods = [m.upper() for m in self.allow_methods]
        return self


def _pattern(origin: str) -> "re.Pattern[str] | None":
    """``https://*.example.org``: any subdomain of it (not example.org itself), same scheme and port."""
    m = _ORIGIN.match(origin)
    if m is None or not m.group(2):
        return None
    return re.compile(f"^{m.group(1)}://([a-z0-9-]+\\.)+{re.escape(m.group(3))}{re.escape(m.group(4) or '')}$")


class Cors(Plugin):
    name = "cors"
    Config = CorsConfig

    def __init__(self, config: CorsConfig, services: Any) -> None:
        super().__init__(config, services)
        c = config
        self.any = "*" in c.allow_origins
        patterns = {o: _pattern(o) for o in c.allow_origins}
        self.exact = frozenset(o for o, p in patterns.items() if p is None)
        self.patterns = [p for p in patterns.values() if p is not None]
        self.any_method = "*" in c.allow_methods
        self.methods = frozenset(c.allow_methods)
        self.methods_text = ", ".join(m for m in c.allow_methods if m != "*")
        self.reflect = "*" in c.allow_headers
        self.headers_text = ", ".join(h for h in c.allow_headers if h != "*")
        self.expose_text = ", ".join(c.expose_headers)

    def allowed(self, origin: str) -> bool:
        if self.any:
            return True
        if not origin.isascii():  # (browsers send hosts in punycode; Unicode case rules must not match)
            return False
        o = origin.lower()
        return o in self.exact or any(p.match(o) for p in self.patterns)

    async def on_headers(self, ctx: RequestContext) -> Reply | None:
        return self._preflight(ctx)

    async def on_request(self, ctx: RequestContext) -> Reply | None:
        if "cors" in ctx.state:  # (seen in on_headers)
            return None
        return self._preflight(ctx)

    def _preflight(self, ctx: RequestContext) -> Reply | None:
        method = preflight_method(ctx.request)
        ctx.state["cors"] = method is not None  # a preflight: answered here, whatever the answer
        if method is None:
            return None  # (a plain OPTIONS is forwarded as any request is)
        h = ctx.request.headers
        origin = h["Origin"]
        vary = {"Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"}
        if not self.allowed(origin):
            ctx.refusal = {"plugin": self.name, "reason": "cors_origin_not_allowed"}
            return Reply.error(403, "This origin is not allowed to call the gateway from a browser (the cors "
                               "plugin's allow_origins).", "invalid_request_error", "cors_origin_not_allowed", vary)
        if not self.any_method and method not in self.methods and method != "OPTIONS":
            ctx.refusal = {"plugin": self.name, "reason": "cors_method_not_allowed"}
            return Reply.error(403, f"A browser may not send {method[:32]!r} requests here (the cors plugin's "
                               f"allow_methods: {self.methods_text}).", "invalid_request_error",
                               "cors_method_not_allowed", vary)
        ctx.refusal = {"plugin": self.name, "type": "served", "reason": "cors_preflight"}  # (answered, not an error)
        out = {**vary, **self._origin(origin),
               "Access-Control-Allow-Methods": method if self.any_method else self.methods_text,
               "Access-Control-Max-Age": str(self.config.max_age)}
        asked = h.get("Access-Control-Request-Headers", "").strip()
        allow = asked if self.reflect and asked else self.headers_text
        if allow:
            out["Access-Control-Allow-Headers"] = allow
        return Reply(204, b"", out, content_type="text/plain")

    def _origin(self, origin: str) -> dict[str, str]:
        if self.any and not self.config.allow_credentials:
            return {"Access-Control-Allow-Origin": "*"}
        out = {"Access-Control-Allow-Origin": origin}
        if self.config.allow_credentials:
            out["Access-Control-Allow-Credentials"] = "true"
        return out

    async def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        if ctx.state.get("cors"):
            return  # a preflight's answer: its headers are the reply's own
        hs = head.headers
        if head.source == "upstream":
            for k in [k for k in hs if k.lower().startswith("access-control-")]:
                hs.popall(k, None)
        if not self.any or self.config.allow_credentials:
            # the answer depends on Origin (also one without it, which a cache must not give a page)
            tokens = {t.strip().lower() for v in hs.getall("Vary", ()) for t in v.split(",")}
            if "origin" not in tokens and "*" not in tokens:
                hs.add("Vary", "Origin")
        origin = ctx.request.headers.get("Origin")
        if origin is None or not self.allowed(origin):
            return
        hs.update(self._origin(origin))
        if self.expose_text:
            hs["Access-Control-Expose-Headers"] = self.expose_text
