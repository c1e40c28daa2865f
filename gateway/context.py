"""The per-request context: cheap to create, points at the shared runtime.

This is the contract between the core and the plugins (plugins never import each other; what they
share goes through here). Fields are set by the core unless noted.
"""
from __future__ import annotations

import re

import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from .errors import BadRequest
from .fastjson import JSON_ERRORS, NonFiniteNumber, dumps_bytes, loads, strict_loads

if TYPE_CHECKING:
    from .observe import Completion
    from .runtime import Settings

log = logging.getLogger("gateway")

#: Request key a middleware sets when no plugin will read this request's hook timings (tracing sets
#: it on requests that are not sampled, when it is the only plugin that reads them), so the core does
#: not record them.
SKIP_TIMINGS = web.RequestKey("gateway.skip_timings", bool)
#: Request key a middleware sets when the plugins' aiohttp TraceConfigs need not see this request's
#: upstream call (tracing sets it on requests that are not sampled, when the TraceConfigs are all its
#: own): the call skips them.
PLAIN_UPSTREAM = web.RequestKey("gateway.plain_upstream", bool)


def other_encoding(body: bytes) -> bool:
    """Does this body start like JSON with a byte order mark, or in UTF-16/32 (a NUL among the
    first bytes of what must begin with an ASCII character)?"""
    return body[:3] == b"\xef\xbb\xbf" or b"\x00" in body[:4] or body[:2] in (b"\xff\xfe", b"\xfe\xff")


_TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})


#: The owner of requests made without an API key (routes without key_auth): conversations
#: keeps theirs under it, and no key may be given it.
ANONYMOUS = "anonymous"

def caller_key_id(key_id: str | None, refusal: dict[str, Any] | None) -> str | None:
    """The admitted key's id, else the id of the key a refusal named (revoked, expired, out of
    scope ...; a refusal holds the key's id only, never the key)."""
    if not key_id and refusal:
        rk = refusal.get("key_id")
        return rk if isinstance(rk, str) else None
    return key_id


def truthy(v: Any) -> bool:
    """A JSON flag as the backends read it (pydantic's lax booleans: vLLM, many Python servers):
    ``true``, ``1``, ``"true"``, ``"yes"`` ... A client sending ``"stream": 1`` gets a stream from
    them, so the gateway must take it for one (its usage asked for and counted) too."""
    if v is True:
        return True
    if type(v) in (int, float):
        return v == 1
    return isinstance(v, str) and v.strip().lower() in _TRUE_WORDS


def about_stored(method: str, lpath: str) -> bool:
    """A request that reads, streams again, cancels, updates or deletes a stored answer, rather than
    one that generates: the usage in what comes back is the stored answer's, which its own request
    was charged, so the core does not give it to the plugins as this request's (``ctx.completion``
    stays None). Only a POST generates, and of POSTs these do not: cancelling a response
    (``/v1/responses/{id}/cancel``) and updating a stored chat completion's metadata
    (``/v1/chat/completions/{id}``). Other POSTs under ``/responses/`` generate
    (``/v1/responses/compact``) or count (``/input_tokens``); a trailing slash names no answer."""
    if method != "POST":
        return True
    p = lpath.rstrip("/")
    i = p.find("/chat/completions/")
    if i >= 0 and "/" not in p[i + 18:]:
        return True
    return p.endswith("/cancel") and "/responses/" in p


#: POSTs that generate nothing: counting a prompt's tokens (vLLM's /tokenize and /detokenize too),
#: cancelling a job (a batch, a fine-tuning job, a run, an upload, a response).
NOT_GENERATING = ("/count_tokens", "/input_tokens", "/cancel", "/tokenize", "/detokenize")

#: POSTs that read their input and write no text: no completion tokens to expect (embeddings,
#: Ollama's /api/embed, vLLM's pooling models: rerank, score, classify, pooling; moderations).
NO_COMPLETION = ("/embeddings", "/embed", "/rerank", "/score", "/classify", "/pooling", "/moderations")


def generates(method: str, lpath: str) -> bool:
    """A request that may make the upstream generate: a POST, not about a stored answer
    (``about_stored``), not counting a prompt's tokens, not cancelling a job."""
    return method == "POST" and not lpath.rstrip("/").endswith(NOT_GENERATING) and not about_stored(method, lpath)


def preflight_method(request: Any) -> str | None:
    """A browser's CORS preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``):
    the method it asks about; None for any other request."""
    if request.method != "OPTIONS":
        return None
    h = request.headers
    asked = h.get("Access-Control-Request-Method")
    return asked.strip().upper() if asked is not None and "Origin" in h else None


def cut_while_sent(ctx: "RequestContext") -> bool:
    """The exchange was cut while the upstream had the request (the client left, a shutdown's drain
    ran out, no answer within timeouts.first_byte), not before it was sent."""
    return (ctx.outcome in ("client_disconnected", "gateway_shutdown") or ctx.error == "upstream_timeout") \
        and not ctx.unsent


_DEPLOYMENTS = "/openai/deployments/"
_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]*)", re.I | re.A)


def deployment(path: str) -> str | None:
    """The deployment an Azure OpenAI path names (``/openai/deployments/{name}/chat/completions``;
    the prefix matched without regard to (ASCII) case, the name as written), None on other paths."""
    m = _DEPLOYMENT.search(path)
    return (m.group(1) or None) if m else None


class RequestContext:
    __slots__ = (
        "request", "request_id", "method", "path", "route", "t_start", "body", "_json", "_client_ip",
        "upstream_headers", "identity", "conversation_id", "state", "status", "source",
        "outcome", "error", "refusal", "streamed", "bytes_in", "bytes_out", "t_upstream", "t_headers",
        "t_first_byte", "t_end", "timings", "observe", "completion", "client_wants_usage",
        "strip_usage_chunk", "response_headers", "usage_original", "non_finite", "settings",
        "upstream_request_id", "lpath", "max_body", "_json_filter", "unsent", "cut_estimate",
    )

    def __init__(self, request: "web.Request", request_id: str, route: str, settings: "Settings") -> None:
        self.request = request
        self.settings = settings                # the server and upstream settings of the request's config
        self.request_id = request_id
        self.method: str = request.method
        self.path: str = request.path
        #: The path in lower case, for telling endpoints apart: routes match without regard to case
        #: (many backends serve /v1/Chat/completions as /v1/chat/completions), so the plugins do too.
        self.lpath: str = self.path if self.path.islower() else self.path.lower()
        self.route = route                      # name of the matched route ("default" if none)
        self.t_start = time.perf_counter()
        self.body: bytes = b""                  # the request body, read in full (bounded by max_body)
        #: The largest body this request may send, and so be forwarded with (its route's
        #: max_body_size, else server.max_body_size).
        self.max_body: int = settings.max_body
        self._json: Any = None
        self._client_ip: str | None = None
        self.upstream_headers: dict[str, str] = {}   # plugins add headers for the upstream request here
        #: Set by key_auth: {"key_id", "owner", "name", "team", "scopes", "limits": {...}, "metadata"}.
        self.identity: dict[str, Any] | None = None
        self.conversation_id: str | None = None  # set by the conversations plugin
        self.state: dict[str, Any] = {}          # private per-plugin state, keyed by plugin name
        self.status = 0                          # status sent to the client
        self.source = "gateway"                  # "upstream" (proxied) or "gateway" (reply / error)
        #: How the exchange ended: "ok", "refused", "error", "client_disconnected", "gateway_shutdown"
        #: (cut when the shutdown drain time ran out), "upstream_error",
        #: "upstream_timeout", "upstream_disconnected".
        self.outcome = "ok"
        self.error: str | None = None            # error code when the gateway produced an error
        #: Set by a plugin that refused the request: {"plugin", "reason", ...} (e.g. auth reason, limit).
        self.refusal: dict[str, Any] | None = None
        self.streamed = False                    # response was text/event-stream
        self.bytes_in = 0
        self.bytes_out = 0
        #: The upstream's own X-Request-ID for this exchange (OpenAI's req_..., what its support asks
        #: for), when it sent one other than the gateway's.
        self.upstream_request_id: str | None = None
        self.t_upstream: float | None = None     # upstream request sent
        #: The upstream never got the request: no connection to it came within timeouts.connect (a
        #: full pool, a connect timeout), so it read no prompt (a 504 all the same).
        self.unsent = False
        #: Set by the core for a request cut before the response head once the upstream had it (the
        #: client left, a shutdown's drain ran out, no head within timeouts.first_byte): the
        #: gateway's estimate of its prompt, which the upstream was reading, and every ledger records.
        self.cut_estimate: int | None = None
        self.t_headers: float | None = None      # upstream response head received
        self.t_first_byte: float | None = None   # first body byte sent to the client
        self.t_end: float | None = None
        #: (plugin, phase, start, end) perf_counter seconds, recorded when timings are on.
        self.timings: list[tuple[str, str, float, float]] | None = None
        self.observe = False                     # a plugin wants ctx.completion filled
        self.completion: "Completion | None" = None
        self.client_wants_usage = False
        self.strip_usage_chunk = False
        #: (body, parsed) before the gateway added stream_options: sent again if the upstream refuses it.
        self.usage_original: tuple[bytes, Any] | None = None
        self.response_headers: dict[str, str] = {}  # set on the client response, before on_response hooks run
        #: the JSON body holds NaN, Infinity or a number beyond a double's range (so ``json`` is None)
        self.non_finite = False
        self._json_filter: Callable[[Any], Any] | None = None

    @property
    def json_filter(self) -> Callable[[Any], Any] | None:
        """Set by a plugin (key_auth, for a key limited to some models, on a model list): what a
        successful answer's JSON becomes before the client gets it. The core reads the whole body
        (bounded), and answers 502 if it cannot be read as JSON: it never relays it unchanged.
        Setting it again adds a filter, applied after those set before (a plugin's filter never
        replaces another's, such as the one that limits a model list to a key's scope)."""
        return self._json_filter

    @json_filter.setter
    def json_filter(self, f: Callable[[Any], Any]) -> None:
        if not callable(f):
            raise TypeError("ctx.json_filter takes a function of the answer's JSON (filters cannot be removed)")
        first = self._json_filter
        self._json_filter = f if first is None else (lambda j: f(first(j)))

    # -- request body ---------------------------------------------------------------------------
    @property
    def json(self) -> Any:
        """The request body parsed as JSON (a dict for OpenAI requests), or None."""
        if self._json is None and self.body:
            try:
                self._json = loads(self.body)
            except NonFiniteNumber:
                self._json = False
                self.non_finite = True
            except JSON_ERRORS:
                self._json = False
                self._other_encoding()
        return self._json or None

    def _other_encoding(self) -> None:
        """A body with a byte order mark, or in UTF-16/32: JSON that Python backends accept
        (``json.loads`` on bytes detects these), so the gateway reads it too, and forwards it
        re-encoded as plain UTF-8: what its plugins checked is exactly what the upstream gets."""
        b = self.body
        if not other_encoding(b):
            return  # (the proxy reads such bodies at once, so they are forwarded as UTF-8 whatever the chain)
        try:
            data = strict_loads(b, any_encoding=True)
        except NonFiniteNumber:
            self.non_finite = True
            return
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if isinstance(data, (dict, list)):
            self.set_json(data)
            self.upstream_headers["Content-Type"] = "application/json"  # not a charset it no longer has

    @property
    def json_exact(self) -> Any:
        """``json``, or the body parsed again by the standard library when ``json`` may have read an
        integer beyond 64 bits as a float (orjson does). For code that re-serialises the body, so
        what the upstream gets keeps the client's numbers exactly."""
        j = self.json
        if j is not None and _maybe_big_int(j):
            try:
                return strict_loads(self.body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                pass
        return j

    def set_json(self, data: Any) -> None:
        """Replace the body sent upstream (e.g. history prepended, stream_options added), as UTF-8
        (text is not escaped to \\uXXXX, which would make it up to six times larger)."""
        self._json = data
        try:
            # orjson (a history of megabytes took the standard library a quarter of a second on
            # the event loop); a lone surrogate escape from the client is kept escaped
            self.body = dumps_bytes(data)
        except RecursionError:
            raise BadRequest("The request body is nested too deeply.") from None
        except ValueError:  # (a body is parsed strictly: no NaN or infinity gets here)
            raise BadRequest("The request body holds a number JSON cannot carry.") from None

    @property
    def model(self) -> str | None:
        """The model the request asks for: the body's ``model``, or, on an Azure OpenAI path
        (``/openai/deployments/{name}/...``), the deployment the path names, which is what that
        API serves whatever the body says (its clients often send no ``model`` at all)."""
        if _DEPLOYMENTS in self.lpath:
            dep = deployment(self.path)
            if dep is not None:
                return dep
        j = self.json
        m = j.get("model") if isinstance(j, dict) else None
        return m if isinstance(m, str) else None

    @property
    def stream_requested(self) -> bool:
        j = self.json
        return isinstance(j, dict) and truthy(j.get("stream"))

    def want_usage(self) -> None:
        """Ask the core to fill ``ctx.completion`` and, for streamed chat/completions, to request the
        upstream's usage chunk (hidden from a client that did not ask for it)."""
        self.observe = True

    # -- identity of the caller -----------------------------------------------------------------
    @property
    def key_id(self) -> str | None:
        return self.identity.get("key_id") if self.identity else None

    @property
    def owner(self) -> str | None:
        return self.identity.get("owner") if self.identity else None

    @property
    def client_ip(self) -> str:
        """The socket peer, or, when the peer is a trusted proxy, the right-most untrusted
        address of X-Forwarded-For; in canonical form, an IPv4-mapped address as IPv4."""
        if self._client_ip is None:
            self._client_ip = resolve_client_ip(self.request, self.settings.trusted)
        return self._client_ip

    # -- timing ---------------------------------------------------------------------------------
    def elapsed_ms(self, since: float | None = None, until: float | None = None) -> float | None:
        if since is None:
            return None
        return round(((until or self.t_end or time.perf_counter()) - since) * 1000, 3)


def _maybe_big_int(v: Any, depth: int = 0) -> bool:
    """Does a parsed body hold a float that could be an integer literal orjson could not keep exact?"""
    t = type(v)
    if t is float:
        return v.is_integer() and abs(v) >= 9.2e18
    if depth > 64:
        return True  # absurdly deep: let the standard library decide
    if t is dict:
        return any(_maybe_big_int(x, depth + 1) for x in v.values())
    if t is list:
        return any(_maybe_big_int(x, depth + 1) for x in v)
    return False


def _peer(request: "web.Request") -> str:
    t = request.transport
    peer = t.get_extra_info("peername") if t is not None else None
    if isinstance(peer, (tuple, list)) and peer:
        p = str(peer[0])
        if p.startswith("::ffff:") or "%" in p:
            # A dual-stack listener shows IPv4 peers as ::ffff:a.b.c.d, a link-local one its zone:
            # the same client must be the same address whichever socket it came in on.
            ip = parse_address(p)
            return str(ip) if ip is not None else p
        return p
    return request.remote or ""


_Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(addr: str) -> _Addr | None:
    """An address as proxies write it into X-Forwarded-For, normalised: a port (``a.b.c.d:1234``,
    ``[v6]:4711``), brackets and an IPv6 zone (``fe80::1%eth0``) dropped, an IPv4-mapped IPv6
    address (``::ffff:a.b.c.d``) as the IPv4 address, so one client is one address (one counter)
    however its hops spell it. None for what is no address (``unknown``, ``_hidden``, garbage)."""
    try:
        ip: _Addr = ipaddress.ip_address(addr)
    except ValueError:
        a = addr
        if a.startswith("["):  # [v6] or [v6]:port
            end = a.find("]")
            rest = a[end + 1:] if end > 0 else "?"
            if rest and not (rest[0] == ":" and rest[1:].isdigit()):
                return None
            a = a[1:end]
        elif a.count(":") == 1:  # a.b.c.d:port (an IPv6 address has at least two colons)
            a, _, port = a.partition(":")
            if not port.isdigit():
                return None
        try:
            ip = ipaddress.ip_address(a.partition("%")[0])
        except ValueError:
            return None
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:  # (parsed with its zone: the address without it)
            return ipaddress.IPv6Address(ip.packed)
    return ip


#: Peers whose ignored X-Forwarded-For was said in the log (once each, a few at most).
_XFF_TOLD: set[str] = set()


def _ignored_forwarded_for(peer: str) -> None:
    """A peer not in trusted_proxies sent X-Forwarded-For: most likely a reverse proxy nobody
    listed, behind which every client now has the proxy's address (one per-IP budget for all
    of them, the proxy's address in the audit trail). Said once per address, for a few."""
    if peer in _XFF_TOLD or len(_XFF_TOLD) >= 8:
        return
    _XFF_TOLD.add(peer)
    log.warning("requests from %s carry X-Forwarded-For, which is ignored: %s is not in server.trusted_proxies. "
                "If it is a reverse proxy or load balancer, list its address there; until then every client "
                "behind it has its address (audit client_ip, rate limits keyed by ip). Said once per address.",
                peer[:64], peer[:64])


def resolve_client_ip(request: "web.Request", trusted: list[Any]) -> str:
    peer = _peer(request)
    if not trusted:
        if "X-Forwarded-For" in request.headers:
            _ignored_forwarded_for(peer)
        return peer
    ip = parse_address(peer)
    if ip is None or not any(ip in n for n in trusted):
        if "X-Forwarded-For" in request.headers:
            _ignored_forwarded_for(peer)
        return peer
    hops = []
    for h in request.headers.getall("X-Forwarded-For", []):
        hops += [p.strip() for p in h.split(",") if p.strip()]
    for addr in reversed(hops):
        ip = parse_address(addr)
        if ip is None:
            return peer  # no address (unknown, an obfuscated _id, garbage): the proxy itself
        if not any(ip in n for n in trusted):
            return str(ip)
    # Every hop is a trusted proxy: the left-most one (it parsed: it is trusted), normalised.
    return str(parse_address(hops[0])) if hops else peer
