"""The upstream seam: one pooled ``aiohttp.ClientSession``, header hygiene, and the one place that
maps client errors to the gateway's error tree."""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config.model import upstream_tls
from .context import PLAIN_UPSTREAM
from .errors import InternalError, UpstreamAuthFailed, UpstreamTimeout, UpstreamUnavailable
from .logs import ThrottledLog
from .redact import mask_gateway_keys, secret_param

if TYPE_CHECKING:
    from gateway.config.model import UpstreamConfig

    from .context import RequestContext

log = logging.getLogger("gateway.upstream")

# RFC 9110 7.6.1 connection-specific fields, plus the legacy ones proxies also drop.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authenticate", "proxy-authorization"})
# Never copied from the client: framing is recomputed, Host is the upstream's, credentials come from
# the config, the gateway sets the forwarding headers itself (and drops the other spellings of
# them, which a client could fill with anything), and a compressed request body was already
# decoded by the server (so its Content-Encoding no longer applies). OpenAI-Organization and
# OpenAI-Project choose which organization and project a credential bills: the credential is the
# gateway's, so a client's choice (the SDKs send OPENAI_ORG_ID / OPENAI_PROJECT_ID) is not
# forwarded; an operator sets them in upstream.headers.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "content-encoding", "authorization", "expect", "x-request-id",
                             "x-forwarded-proto", "x-forwarded-host", "x-forwarded-for", "forwarded", "x-real-ip",
                             "openai-organization", "openai-project"}
#: The upstream's answer names the organization and project its credential bills (the
#: gateway's, an operator's identifiers): not for every client.
#: (the upstream's Server and X-Powered-By too: they name the backend's software and its version,
#: which clients need not learn; the gateway's answers say Server: gateway)
RESPONSE_DROP = HOP_BY_HOP | {"openai-organization", "openai-project", "server", "x-powered-by"}


#: Control characters a header or reason phrase cannot carry (tab aside), as aiohttp's writer
#: refuses them.
CTL_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]").search


_ctl_warned = [-1e9]
_pool_warned = [-1e9]


def failure(e: BaseException) -> str:
    """An upstream call's failure for the log: the error's kind, and its text only for a connection
    failure (host, port, the OS's reason). The text of a parse error quotes the upstream's bytes,
    which may be the answer itself (content the logs must not hold)."""
    if isinstance(e, (aiohttp.ClientConnectorError, OSError)) and not isinstance(e, aiohttp.ClientResponseError):
        text = f"{type(e).__name__}: {str(e)[:200]}"
        if isinstance(e, aiohttp.ClientConnectorCertificateError) or "CERTIFICATE_VERIFY_FAILED" in text:
            text += " (a certificate of a private CA: upstream.ca_file names the CA's PEM file)"
        return text
    if isinstance(e, aiohttp.ServerDisconnectedError):
        # (the typical first sign of http:// to a port that speaks TLS)
        return f"{type(e).__name__} (closed before answering: a backend restarting, or an https upstream written http://)"
    return type(e).__name__


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    vals = headers.getall("Connection", ())
    if not vals:
        return frozenset()
    return frozenset(t.strip().lower() for v in vals for t in v.split(",") if t.strip())


_PORTS = {"http": 80, "https": 443}


#: Request headers that carry a credential for the upstream.
CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "x-goog-api-key",
                                "ocp-apim-subscription-key"})  # (the last: Azure API Management)


def utf8(v: str) -> bool:
    """Was this header value UTF-8 on the wire (no undecodable bytes, kept as surrogates)?"""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: When the last 401 to the gateway's own credentials was logged (one line a minute).
_auth_warned = [-1e9]
_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


async def _error_code(resp: aiohttp.ClientResponse) -> str:
    """The ``code`` (else ``type``) of an OpenAI-style error body, for the operator's log: which
    credential the upstream refuses (``invalid_api_key``, ``invalid_organization``). Never its
    message, which can quote part of the key. Empty if there is none to read within a second."""
    import json

    try:
        async with asyncio.timeout(1.0):
            raw = await resp.content.read(16384)
        err = json.loads(raw).get("error")
    except Exception:
        return ""
    if not isinstance(err, dict):
        return ""
    for name in ("code", "type"):
        v = err.get(name)
        if isinstance(v, str) and _CODE.fullmatch(v):
            return v
    return ""


class Target:
    """Where and how one config calls the upstream. Each runtime keeps the one of its config: a
    request that began before a reload is sent where, and with the credentials and timeouts, its
    chain's config says (the connection pool is shared)."""
    __slots__ = ("base", "query", "query_names", "static_headers", "timeouts", "client_timeout", "stream_usage",
                 "tls", "credentials")

    def __init__(self, cfg: "UpstreamConfig") -> None:
        self.base = cfg.url
        #: A query string in the configured URL (``...?api-version=2024-02-01``) goes on every
        #: request, after the client's own (whose parameters of the same names it replaces); the
        #: request's path goes before it. (A fragment is never sent.)
        self.query = ""
        self.query_names: frozenset[str] = frozenset()
        u = urlsplit(cfg.url)
        if u.query or u.fragment or "?" in cfg.url or "#" in cfg.url:
            self.base = urlunsplit((u.scheme, u.netloc, u.path.rstrip("/"), "", ""))
            self.query = "&".join(p for p in u.query.split("&") if p)
            self.query_names = frozenset(unquote_plus(p.split("=", 1)[0]) for p in self.query.split("&") if p)
        self.stream_usage = cfg.stream_usage  # (as configured; see Upstream.asks_usage)
        self.static_headers = dict(cfg.headers)
        #: The gateway sends credentials of its own (a key header, a key in the query, user:password
        #: in the URL): a 401 is about them, not about the client (see Upstream.send).
        self.credentials = bool(u.username or u.password) or any(
            k.lower() in CREDENTIAL_HEADERS for k in cfg.headers) or any(
            secret_param(n) for n in self.query_names)
        #: an https upstream's TLS context: the system's CAs, and upstream.ca_file's if set
        self.tls: ssl.SSLContext | bool = upstream_tls(cfg.ca_file) if cfg.ca_file else True
        t = self.timeouts = cfg.timeouts
        # sock_read bounds the wait for the response head (first_byte); once the head is in,
        # send() switches the connection's read timeout to `idle` for the body.
        self.client_timeout = aiohttp.ClientTimeout(total=None, connect=t.connect, sock_connect=t.connect,
                                                    sock_read=t.first_byte)


    def location(self, loc: str) -> str:
        """A redirect's Location as the client must follow it: one into the upstream (its URL, with
        the path prefix upstream.url has) becomes the same path on the gateway, as a reverse
        proxy's default redirect rewrite does; one elsewhere is left as it is."""
        u = urlsplit(self.base)
        prefix = u.path.rstrip("/")
        if loc.startswith(("http://", "https://")):
            try:
                v = urlsplit(loc)
                same = (v.scheme, v.hostname, v.port or _PORTS[v.scheme]) == (u.scheme, u.hostname,
                                                                              u.port or _PORTS[u.scheme])
            except ValueError:  # (a port that is not a number)
                return loc
            if not same:
                return loc
            rest = urlunsplit(("", "", v.path or "/", v.query, v.fragment))
        elif loc.startswith("/") and not loc.startswith("//"):
            rest = loc
        else:
            return loc  # relative to the request's own path: the same through the gateway
        if prefix and not (rest == prefix or rest.startswith((prefix + "/", prefix + "?"))):
            return loc
        return rest[len(prefix):] or "/"

    def with_query(self, rel: URL) -> str:
        """``rel``'s path and query (as sent, encoded) with the configured query added."""
        q = rel.raw_query_string
        kept = [p for p in q.split("&") if p and unquote_plus(p.split("=", 1)[0]) not in self.query_names]
        return rel.raw_path + "?" + "&".join(kept + [self.query])


class Upstream:
    def __init__(self, cfg: "UpstreamConfig", trace_configs: list[Any] | None = None) -> None:
        #: URLs of upstreams that refused stream_options (learned from their answers)
        self.usage_refused: set[tuple[str, str | None]] = set()
        #: Requests sent (or being sent) to the upstream whose response head has not come yet, with
        #: when they were sent: a backend that hangs shows here while it hangs, not only once each
        #: request ends (gateway_upstream_waiting, gateway_upstream_oldest_wait_seconds).
        self.waiting: dict[Any, float] = {}
        self.configure(cfg)
        self._trace_configs = trace_configs or []
        self.session: aiohttp.ClientSession | None = None
        #: With the plugins' TraceConfigs, on the same connection pool (None when there are none).
        self.traced: aiohttp.ClientSession | None = None
        self.trace_owners: frozenset[str] = frozenset()  # names of the plugins those came from
        self._session_kw: dict[str, Any] = {}
        self._retired: list[aiohttp.ClientSession] = []  # traced sessions a reload replaced
        self._tls: ssl.SSLContext | None = None  # for the readiness probe of an https upstream

    def configure(self, cfg: "UpstreamConfig") -> None:
        """Where and how to call the upstream (at start, and from a config reload; the pool's size
        is fixed at start). Pooled connections to a previous URL's host idle out."""
        self.cfg = cfg
        self.target = Target(cfg)  # the current config's (requests use their runtime's)
        #: Failed and timed-out upstream calls: a backend down fails every request, so one line
        #: per kind per 10 s with the count and the last request's id, not one per request.
        self.failures = ThrottledLog(log, interval=10.0, level=logging.WARNING)
        u = urlsplit(cfg.url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if u.scheme == "https" else 80)
        # What was learned about an upstream refusing stream_options holds until a reload (as the
        # docs say): an upstream that was upgraded meanwhile is asked for usage again after one, and
        # one that still refuses it is learned again from its first answer.
        self.usage_refused.clear()
        #: /readyz: has this upstream (this URL) answered a probe since it was configured, and since
        #: when have its probes failed (monotonic; None: they have not). An upstream that answered
        #: before gets server.readiness_grace; one never reached is not ready at once (a rollout
        #: with a wrong upstream URL must not pass its readiness checks).
        if getattr(self, "ready_url", None) != cfg.url:
            self.ready_url = cfg.url
            self.ready_once = False
            self.ready_failing_since: float | None = None

    def readiness(self, ok: bool, grace: float) -> tuple[bool, float | None]:
        """A probe's result as readiness: (ready, seconds its probes have failed, None if they do
        not). A failure is ridden out for ``grace`` seconds once the upstream has answered a
        probe: a backend restarting must not take every instance out of the load balancer at once,
        each then answering nothing instead of the gateway's 502."""
        if ok:
            self.ready_once, self.ready_failing_since = True, None
            return True, None
        now = time.monotonic()
        if self.ready_failing_since is None:
            self.ready_failing_since = now
        failing_for = now - self.ready_failing_since
        return self.ready_once and failing_for < grace, failing_for

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting request has waited for the upstream's response head (0: none)."""
        w = self.waiting
        return max(0.0, time.monotonic() - min(w.values())) if w else 0.0

    def asks_usage(self, target: Target, rel: URL | None = None) -> bool:
        """Does the gateway ask ``target`` for usage on streams: configured so, and that upstream
        (its URL, and the API version the request is sent with) has not refused stream_options."""
        refused = self.usage_refused
        return target.stream_usage and (not refused or _usage_key(target, rel, refused) not in refused)

    def refused_usage(self, target: Target, rel: URL | None = None) -> None:
        """``target``'s upstream refused stream_options (for the API version ``rel`` is sent with):
        streams go to it as the client sent them (said in the log the first time)."""
        key = _usage_key(target, rel, self.usage_refused)
        if key in self.usage_refused:
            return
        self.usage_refused.add(key)
        version = ("" if key[1] is None or target.query == key[1] else " with an api-version of no known form"
                   if key[1] == "*" else f" with api-version {key[1]!r}")
        log.warning("the upstream refused stream_options%s: streams%s are now sent as the client sent them, and "
                    "their tokens are counted from a usage the upstream sends in them unasked, else from the "
                    "deltas relayed (set upstream.stream_usage: false to say so in the config)", version,
                    " with that version" if version else "")

    async def start(self) -> None:
        conn = aiohttp.TCPConnector(limit=self.cfg.max_connections, limit_per_host=self.cfg.max_connections,
                                    keepalive_timeout=self.cfg.keepalive_timeout, ttl_dns_cache=300)
        kw: dict[str, Any] = dict(
            connector=conn, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),  # relay, don't invent
            timeout=self.target.client_timeout, cookie_jar=aiohttp.DummyCookieJar())
        self.session = aiohttp.ClientSession(**kw)
        self._session_kw = kw
        # aiohttp runs a session's TraceConfig signals for every request it sends, recorded or not;
        # requests nobody traces take the plain session (one pool: the connector is shared).
        if self._trace_configs:
            self.traced = aiohttp.ClientSession(**kw, trace_configs=self._trace_configs, connector_owner=False)

    def add_trace_configs(self, trace_configs: list[Any], owners: set[str]) -> None:
        """TraceConfigs of plugins a config reload brought in. A new traced session (same pool)
        takes over; the one it replaces may still have requests in flight, so it is closed at stop."""
        assert self.session is not None
        self._trace_configs = self._trace_configs + list(trace_configs)
        if self.traced is not None:
            self._retired.append(self.traced)
        self.traced = aiohttp.ClientSession(**self._session_kw, trace_configs=self._trace_configs,
                                            connector_owner=False)
        self.trace_owners = self.trace_owners | frozenset(owners)

    async def close(self) -> None:
        self.failures.flush()
        for s in [*self._retired, self.traced]:
            if s is not None:
                await s.close()
        self._retired.clear()
        self.traced = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    def request_headers(self, ctx: "RequestContext", target: Target) -> CIMultiDict[str]:
        req = ctx.request
        src = req.headers
        drop = connection_tokens(src)
        if drop:  # (compared like the names below: '_' as '-')
            drop = frozenset(t.replace("_", "-") for t in drop)
        guarded = ctx.settings.guarded  # (plugins' credentials and identity headers: Plugin.guarded_headers)
        out: CIMultiDict[str] = CIMultiDict()
        for k, v in src.items():
            lk = k.lower()
            if "_" in lk:
                # X_Gateway_Owner, X-Forwarded_For: servers on CGI/WSGI conventions read them as
                # X-Gateway-Owner, X-Forwarded-For (HTTP_X_GATEWAY_OWNER): dropped with those.
                lk = lk.replace("_", "-")
            if lk in REQUEST_DROP or lk in drop or lk in guarded:
                continue
            # A gateway key in a header key_auth does not read (X-Api-Key, OpenAI-Api-Key ...): the
            # upstream (a third party, maybe, with logs of its own) never gets its secret.
            out.add(k, mask_gateway_keys(v) if "gw" in v else v)
        peer = req.remote or ""
        prior = ", ".join(src.getall("X-Forwarded-For", ()))  # several lines = one comma-joined list
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        out["X-Forwarded-Proto"] = req.scheme
        out["X-Forwarded-Host"] = req.host
        out["X-Request-ID"] = ctx.request_id
        for k, v in target.static_headers.items():
            out[k] = v
        for k, v in ctx.upstream_headers.items():
            if v is None:
                out.popall(k, None)
            else:
                out[k] = v
        if ctx.observe or ctx._json_filter is not None:
            out["Accept-Encoding"] = "identity"  # the observer reads usage from the body (a filter all of it)
        return out

    @staticmethod
    def _own_credentials_refused(ctx: "RequestContext", target: Target, sent: CIMultiDict[str]) -> bool:
        """Is a 401 about the gateway's own credentials? It sent some (upstream.headers, the URL,
        a plugin such as `headers` on this route) and none of the client's went along."""
        own = {k.lower() for k in target.static_headers}
        own.update(k.lower() for k, v in ctx.upstream_headers.items() if v is not None)
        mine = target.credentials or bool(own & CREDENTIAL_HEADERS)
        return mine and not any(k.lower() in CREDENTIAL_HEADERS and k.lower() not in own for k in sent)

    async def send(self, ctx: "RequestContext", target: Target) -> aiohttp.ClientResponse:
        """Send the request to ``target``; returns once the response head arrived. Maps failures
        to 502/504."""
        assert self.session is not None
        req = ctx.request
        # The request target exactly as the client sent it (re-quoting would change its bytes).
        path_qs = req.rel_url.raw_path_qs if not target.query else target.with_query(req.rel_url)
        if "gw" in path_qs:  # a gateway key a client put in the path or query: not for the upstream
            path_qs = mask_gateway_keys(path_qs)
        url = URL(target.base + path_qs, encoded=True)
        headers = self.request_headers(ctx, target)
        session = self.traced if self.traced is not None and PLAIN_UPSTREAM not in req else self.session
        waiting = self.waiting
        waiting[ctx] = time.monotonic()
        try:
            resp = await session.request(req.method, url, data=ctx.body or None, headers=headers,
                                              allow_redirects=False, compress=None,
                                              timeout=target.client_timeout, ssl=target.tls)
        except aiohttp.ConnectionTimeoutError:
            ctx.outcome = "upstream_timeout"
            ctx.unsent = True
            busy = self.pool_full()
            if busy:
                if time.monotonic() - _pool_warned[0] >= 10:  # (a burst of them: one line in ten seconds)
                    _pool_warned[0] = time.monotonic()
                    log.warning("upstream connection pool exhausted: all %d connections in use "
                                "(upstream.max_connections); requests waited timeouts.connect and got 504", busy)
                raise UpstreamTimeout("The gateway's connections to the upstream are all in use; "
                                      "try again shortly.") from None
            host = str(URL(target.base).host).replace("%", "%%")  # (an IPv6 zone id: fe80::1%eth0)
            self.failures.event("connect", 1, f"%d upstream request(s) timed out connecting to {host} "
                                              f"(upstream.timeouts.connect {target.timeouts.connect:g}s; the last: "
                                              f"request {ctx.request_id}): 504")
            raise UpstreamTimeout("Timed out connecting to the upstream.") from None
        except (aiohttp.ServerTimeoutError, TimeoutError):
            ctx.outcome = "upstream_timeout"
            self.failures.event("first_byte", 1, f"%d upstream request(s) got no response head within "
                                                 f"upstream.timeouts.first_byte ({target.timeouts.first_byte:g}s; "
                                                 f"the last: request {ctx.request_id}): 504")
            # (the upstream has the request and may still be working on it: the OpenAI SDKs would
            # send it twice more, each waiting first_byte again, for the same answer not coming)
            raise UpstreamTimeout("The upstream did not send a response in time.",
                                  headers={"x-should-retry": "false"}) from None
        except (aiohttp.ClientError, OSError) as e:
            ctx.outcome = "upstream_error"
            why = failure(e).replace("%", "%%")
            self.failures.event("failed", 1, f"%d upstream request(s) failed (the last: request {ctx.request_id}: "
                                             f"{why}): 502")
            if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)) or (
                    isinstance(e, (aiohttp.ClientOSError, ConnectionResetError))
                    and not isinstance(e, aiohttp.ClientConnectorError)):
                # (reached, then dropped: "could not be reached" would send people to the network)
                raise UpstreamUnavailable("The upstream closed the connection before answering.") from None
            raise UpstreamUnavailable() from None
        except Exception:  # e.g. a header value a plugin set that HTTP cannot carry
            ctx.outcome = "error"
            log.exception("building the upstream request failed (request %s)", ctx.request_id)
            raise InternalError() from None
        finally:
            waiting.pop(ctx, None)
        if resp.status == 401 and self._own_credentials_refused(ctx, target, headers):
            # The upstream refuses the gateway's own key (revoked, expired, rotated): relayed, its
            # answer would tell each client that its key is wrong (the OpenAI SDKs raise
            # AuthenticationError) and may quote part of the gateway's key.
            ctx.outcome = "upstream_error"
            now = time.monotonic()
            if now - _auth_warned[0] >= 60:
                _auth_warned[0] = now
                try:
                    code = await _error_code(resp)
                finally:
                    resp.close()
                log.error("the upstream answered 401 to the gateway's own credentials (upstream.headers, the key "
                          "in upstream.url)%s: a key wrong, expired or revoked, or another of those headers it "
                          "refuses (an organization, a project); clients get 502 upstream_auth_failed until they "
                          "are mended (request %s; said once a minute)",
                          f", its error code: {code}" if code else "", ctx.request_id)
            resp.close()
            raise UpstreamAuthFailed()
        if resp.status == 101:  # the gateway relays HTTP, not what a protocol switch leads to
            resp.close()
            ctx.outcome = "upstream_error"
            log.warning("upstream answered 101 Switching Protocols (request %s)", ctx.request_id)
            raise UpstreamUnavailable("The upstream switched protocols, which the gateway does not relay.")
        conn = resp.connection
        if conn is not None and conn.protocol is not None:
            # From here on, `idle` bounds each gap between body chunks, starting now (the protocol
            # re-arms its timer on each chunk; re-arm it here so the first gap counts too).
            conn.protocol.read_timeout = target.timeouts.idle
            rearm = getattr(conn.protocol, "_reschedule_timeout", None)
            if rearm is not None:
                rearm()
        return resp

    def pool_full(self) -> int:
        """The number of pooled connections in use when every one is (0 otherwise): a request then
        waits for one, and a connect timeout means that wait, not the upstream, ran out."""
        conn = self.session.connector if self.session is not None else None
        used = len(getattr(conn, "_acquired", ()))  # (aiohttp keeps no public count)
        return used if conn is not None and conn.limit and used >= conn.limit else 0

    def response_headers(self, resp: aiohttp.ClientResponse, keep_length: bool,
                         target: Target | None = None) -> CIMultiDict[str]:
        src = resp.headers
        drop = connection_tokens(src)
        out: CIMultiDict[str] = CIMultiDict()
        for k, v in src.items():
            lk = k.lower()
            if lk in RESPONSE_DROP or lk in drop or (lk == "content-length" and not keep_length):
                continue
            if (not v.isprintable() and (CTL_CHAR(v) or not utf8(v))) or (not k.isprintable() and CTL_CHAR(k)):
                # The client parser reads it, but it cannot be carried on as it came: a control
                # character (the response could not be sent at all), bytes that are not UTF-8 (the
                # writer would drop them, and send another value): dropped, said once a minute.
                now = time.monotonic()
                if now - _ctl_warned[0] >= 60:  # (an upstream that always sends one: once a minute)
                    _ctl_warned[0] = now
                    log.warning("upstream header %s dropped: it holds a control character or bytes that are not "
                                "UTF-8", ascii(k)[:80])
                continue
            out.add(k, v)
        if target is not None and 300 <= resp.status < 400 and "Location" in out:
            out["Location"] = target.location(out["Location"])
        return out

    async def ready(self, timeout: float = 2.0) -> tuple[bool, str]:
        """Readiness: a connect (with the TLS handshake, certificate checked, for https), or a GET
        of ``health_path`` when configured. Every address of the host is tried, as requests do
        (a first address that does not answer must not make a working upstream look down)."""
        try:
            async with asyncio.timeout(timeout):
                if self.cfg.health_path and self.session is not None:
                    t = self.target
                    async with self.session.get(t.base + (t.with_query(URL(self.cfg.health_path, encoded=True))
                                                          if t.query else self.cfg.health_path),
                                                headers=t.static_headers, ssl=t.tls,
                                                allow_redirects=False) as r:
                        return (r.status < 500, f"HTTP {r.status}")
                tls: ssl.SSLContext | None = None
                if self.target.base.startswith("https:"):
                    if isinstance(self.target.tls, ssl.SSLContext):  # (upstream.ca_file)
                        tls = self.target.tls
                    else:
                        tls = self._tls = self._tls or ssl.create_default_context()
                _, w = await asyncio.open_connection(self.host, self.port, family=socket.AF_UNSPEC,
                                                     happy_eyeballs_delay=0.25, ssl=tls)
                w.transport.abort()  # (a TLS close would wait for the peer's close_notify, up to 30 s)
                return True, "ok"
        except (TimeoutError, OSError, aiohttp.ClientError) as e:
            return False, type(e).__name__


def _usage_key(target: Target, rel: URL | None, known: set[tuple[str, str | None]] | None = None
               ) -> tuple[str, str | None]:
    """What a refusal of stream_options is learned for: the upstream's URL and the ``api-version``
    the request goes with (Azure OpenAI takes the field from some API versions on: one client on an
    older version must not stop the gateway asking for usage on everyone else's streams). Only a
    value written as a version is one (2024-10-21, 2024-10-01-preview, preview, latest, v1), and at
    most MAX_VERSIONS of an upstream's are told apart: any other value, and versions past those,
    share one entry, "*" (clients cannot grow this set, have each request sent twice, or turn the
    field off for the versions told apart)."""
    if "api-version" in target.query_names:
        return target.base, target.query
    if rel is None or "api-version" not in rel.raw_query_string:
        return target.base, None
    v = rel.query.get("api-version")
    if v is None or not _API_VERSION.fullmatch(v):
        return target.base, "*"
    if known is not None and (target.base, v) not in known \
            and sum(1 for b, x in known if b == target.base and x not in (None, "*")) >= MAX_VERSIONS:
        return target.base, "*"
    return target.base, v


_API_VERSION = re.compile(r"(?:\d{4}-\d{2}-\d{2}(?:-preview)?|preview|latest|v\d{1,2})", re.A)
#: API versions of one upstream whose refusals of stream_options are told apart.
MAX_VERSIONS = 16
