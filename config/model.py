"""The validated model of ``gateway.yaml``.

Every section forbids unknown keys, so a typo stops start-up with the key path and line.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from urllib.parse import urlsplit
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024, "m": 10**6, "mb": 10**6,
          "mi": 2**20, "mib": 2**20, "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30}


def parse_size(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected a size such as 1048576 or '10MiB'")
    if isinstance(v, int):
        return v
    m = _SIZE.match(str(v))
    if not m:
        raise ValueError("expected a size such as 1048576 or '10MiB'")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


#: What a path prefix (server.paths, a route's path_prefix) must not hold: blanks and control
#: characters, and the glob / URL syntax people carry over from other proxies. Prefixes are compared
#: with the decoded request path, literally, on segment boundaries.
_PREFIX_BAD_CHAR = re.compile(r"[\s\x00-\x1f\x7f*?#]")


def prefix_problem(v: str) -> str | None:
    """Why ``v`` cannot be a path prefix (one that would never match, or match by accident), or None."""
    if not v.startswith("/"):
        return "a path prefix starts with '/' (e.g. /v1)"
    m = _PREFIX_BAD_CHAR.search(v)
    if m:
        c = m.group()
        if c == "*":
            return ("'*' is not a wildcard here: a prefix already covers every path below it "
                    "(write /v1/models, not /v1/models/*)")
        if c in "?#":
            return f"{c!r}: a prefix is matched against the path only, without query string or fragment"
        return f"{c!r}: a path prefix cannot hold blanks or control characters (check the quoting)"
    if re.search(r"%[0-9A-Fa-f]{2}", v):
        return ("a %XX escape: a prefix is compared with the decoded request path, so it would only match a "
                "path that escapes the '%' itself; write the character (e.g. /v1/a:b, not /v1/a%3Ab)")
    if "//" in v:
        return "an empty segment ('//'): request paths with one are refused, so it would never match"
    if any(seg in (".", "..") for seg in v.split("/")):
        return "a '.' or '..' segment: request paths with one are refused, so it would never match"
    return None


#: A host name as resolvers take it (an underscore too: Docker Compose names services so).
_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


def host_problem(v: str) -> str | None:
    """Why ``v`` cannot be a listener's address (an IP address or a host name; empty: every
    interface, as aiohttp takes it), or None."""
    if not v:
        return None
    if "://" in v:
        return "an address, not a URL: write the host alone (e.g. 0.0.0.0), the port in its own setting"
    if v.startswith("[") and v.endswith("]"):
        return f"an IPv6 address without brackets: {v[1:-1]}"
    try:
        ipaddress.ip_address(v)
        return None
    except ValueError:
        pass
    if ":" in v:
        return "an address without a port: the port is its own setting (port: ...)"
    if re.fullmatch(r"[\d.]+", v):
        try:
            socket.inet_aton(v)  # ("0", "127.1": shorthand the resolver takes)
            return None
        except OSError:
            return "not an IPv4 address (four numbers of 0-255, e.g. 127.0.0.1)"
    if not _HOSTNAME.match(v):
        return "not an IP address or a host name"
    return None


def _listen_host(v: str) -> str:
    v = v.strip()  # (a variable set with a blank at its end)
    if v == "*":  # every interface, IPv4 and IPv6 (as empty; a variable's default cannot be empty)
        return ""
    bad = host_problem(v)
    if bad:
        raise ValueError(bad)
    return v


#: A listener's address (server.host, admin.host).
ListenHost = Annotated[str, AfterValidator(_listen_host)]


def normal_prefix(v: str) -> str:
    """A valid prefix without its trailing '/' (``/v1/`` and ``/v1`` both cover ``/v1`` and
    ``/v1/...``, not ``/v10``); ``/`` stays ``/`` (every path)."""
    return v.rstrip("/") or "/"


def no_bool_numbers(model: type[BaseModel], v: Any, info: ValidationInfo) -> Any:
    """``true`` / ``false`` where a number is wanted is a mistake (pydantic would read 1 and 0:
    ``drain_delay: true`` a one-second delay): for a number field (``int``, ``float``, constrained
    ones such as ``PositiveInt``, optional or not), and for the values of a mapping or the items of
    a list of numbers (``per_owner: {alice: true}``)."""
    if info.field_name is None or not isinstance(v, (bool, dict, list, tuple)):
        return v
    field = model.model_fields.get(info.field_name)
    if field is None:
        return v
    ann = field.annotation
    if isinstance(v, bool):
        if _numeric(ann):
            raise PydanticCustomError("number_not_bool", "expected a number, not {value}", {"value": str(v).lower()})
    elif _inner_numbers(ann):
        for x in (v.values() if isinstance(v, dict) else v):
            if isinstance(x, bool):
                raise PydanticCustomError("number_not_bool", "expected numbers, not {value}", {"value": str(x).lower()})
    return v


def _numeric(ann: Any) -> bool:
    """Does this annotation take a number, and nothing a bool could be (int, float, PositiveInt,
    ``int | None``, ``Annotated[float, ...]``)?"""
    origin = get_origin(ann)
    if origin is Annotated:
        return _numeric(get_args(ann)[0])
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(ann) if a is not type(None)]
        return bool(args) and all(_numeric(a) for a in args)
    return ann is int or ann is float


def _inner_numbers(ann: Any) -> bool:
    """Is this a mapping to numbers or a list of numbers (optional or not)?"""
    origin = get_origin(ann)
    if origin is Annotated:
        return _inner_numbers(get_args(ann)[0])
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(ann) if a is not type(None)]
        return len(args) == 1 and _inner_numbers(args[0])
    args = get_args(ann)
    if origin in (dict, Mapping) and len(args) == 2:
        return _numeric(args[1])
    if origin in (list, tuple, set, frozenset, Sequence) and args:
        return all(_numeric(a) for a in args if a is not Ellipsis)
    return False


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        return no_bool_numbers(cls, v, info)


class ServerConfig(Model):
    host: ListenHost = Field("0.0.0.0", description="Address of the public listener: 0.0.0.0 every IPv4 "
                                                     "interface, :: every IPv6 one, * (or empty) both.")
    port: int = Field(8080, ge=0, le=65535, description="Port of the public listener (0 picks a free one).")
    max_body_size: int = Field(10 * 2**20, gt=0, description="Largest request body accepted; larger gets 413.")
    shutdown_timeout: float = Field(30.0, ge=0, description="Seconds in-flight requests get to finish on SIGTERM.")
    drain_delay: float = Field(0.0, ge=0, le=3600, description="Seconds the public listener keeps accepting and serving "
                               "after SIGTERM (answering with Connection: close) while /readyz already fails, "
                               "so a load balancer takes the instance out before it stops accepting; then "
                               "the shutdown_timeout drain begins. Set it to the load balancer's health-check "
                               "interval times its failure threshold (Kubernetes: the readiness probe's "
                               "periodSeconds x failureThreshold). A second SIGTERM skips the rest of it.")
    readiness_grace: float = Field(10.0, ge=0, le=3600, description="Seconds the database may fail to answer, "
                                   "or a background writer's writes may fail, before /readyz reports not ready "
                                   "(meanwhile it answers 200 and shows the failing check). A database every "
                                   "instance shares makes them all fail the probe together: a restart shorter "
                                   "than this keeps the fleet in the load balancer (cached keys are still "
                                   "checked, records wait in the writers' queues). 0: at the first failure.")
    reuse_port: bool = Field(False, description="Open the public and admin listeners with SO_REUSEPORT, so a "
                             "second gateway can listen on the same ports: start the new one, wait for its "
                             "/readyz, then SIGTERM the old one (a restart or upgrade that refuses no "
                             "connection). Every process on the ports must set it.")
    keepalive_timeout: float = Field(75.0, gt=0, description="Seconds a client connection may sit idle (or "
                                     "take to send a request head) before it is closed.")
    max_connections: int | None = Field(None, ge=1, le=10_000_000, description="Client connections the public "
                                        "listener keeps open at once; one more is answered 503 and closed. Default: "
                                        "what the open files limit leaves after upstream.max_connections, the listen "
                                        "backlog (1024) and 256 for the database, the admin listener and files, so "
                                        "that idle connections cannot take the descriptors the rest of the process "
                                        "needs.")
    body_timeout: float = Field(60.0, gt=0, description="Seconds a request body may stall (no bytes arriving) "
                                "before the request gets 408.")
    send_timeout: float = Field(60.0, gt=0, description="Seconds a response may wait for a client that reads "
                                "nothing before it is cut (its upstream connection is then freed).")
    trusted_proxies: list[str] = Field(default_factory=list,
                                       description="CIDRs whose X-Forwarded-For is believed (read right to left).")
    server_timing: bool = Field(False, description="Add a Server-Timing header with each plugin's duration.")
    paths: list[str] = Field(default_factory=lambda: ["/"], min_length=1,
                             description="Path prefixes proxied to the upstream; others get 404.")

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        out = []
        for i, p in enumerate(v):
            bad = prefix_problem(p)
            if bad:
                raise ValueError(f"{p!r} (entry {i}): {bad}")
            out.append(normal_prefix(p))
        return out

    _networks: list[Any] = PrivateAttr(default_factory=list)

    @field_validator("max_body_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for c in v:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"not a CIDR: {c!r}") from None
        return v

    def model_post_init(self, _: Any) -> None:
        self._networks = [_ipv4_unmapped(ipaddress.ip_network(c, strict=False)) for c in self.trusted_proxies]

    @property
    def networks(self) -> list[Any]:
        return self._networks


_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _ipv4_unmapped(net: Any) -> Any:
    """An IPv4-mapped network (``::ffff:10.0.0.0/104``) as the IPv4 network it maps
    (``10.0.0.0/8``): client addresses are compared in IPv4 form (a dual-stack socket's
    ``::ffff:10.1.2.3`` is ``10.1.2.3``), so the mapped form would match no client."""
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_IPV4_MAPPED):
        return ipaddress.ip_network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


class AdminConfig(Model):
    enabled: bool = Field(True, description="Run the admin listener.")
    host: ListenHost = Field("127.0.0.1", description="Address of the admin listener (loopback by default).")
    port: int = Field(8081, ge=0, le=65535)
    token: str | None = Field(None, description="Bearer token for the admin API (at least 16 characters).",
                              repr=False)

    @field_validator("token")
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        # A secret file or a Kubernetes secret often ends with a newline: no client can send it
        # (header values are stripped), so the admin API would be locked out. Taken without it.
        if not isinstance(v, str):
            return v
        v = v.strip()
        if not all(" " <= c < "\x7f" for c in v):
            raise ValueError("the token must be printable ASCII (a client sends it in an HTTP header; check for "
                             "typographic quotes)")
        return v

    @model_validator(mode="after")
    def _token(self) -> "AdminConfig":
        if self.enabled and (not self.token or len(self.token) < 16):
            raise ValueError("the admin listener needs a token of at least 16 characters, blanks at "
                             "either end aside (set admin.token, e.g. ${GATEWAY_ADMIN_TOKEN}, or admin.enabled: false)")
        return self


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class TimeoutsConfig(Model):
    connect: float = Field(5.0, gt=0, description="Seconds to connect to the upstream.")
    first_byte: float = Field(120.0, gt=0, description="Seconds from sending the request to the response head.")
    idle: float = Field(120.0, gt=0, description="Seconds allowed between two body chunks.")


def upstream_tls(ca_file: str) -> ssl.SSLContext:
    """The TLS context of an upstream with a CA file of its own: the system's CAs and the file's."""
    ctx = ssl.create_default_context()
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise ValueError(f"no such file: {ca_file}") from None
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load certificates from {ca_file}: {e.strerror or e}") from None
    return ctx


class UpstreamConfig(Model):
    url: str = Field(description="Base URL of the OpenAI-compatible backend, e.g. http://127.0.0.1:8000")
    headers: dict[str, str] = Field(default_factory=dict, repr=False,
                                    description="Headers added to every upstream request (its credentials).")
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    max_connections: int = Field(256, ge=1, description="Connection pool size to the upstream.")
    keepalive_timeout: float = Field(
        4.0, gt=0, le=3600,
        description="Seconds an idle pooled connection to the upstream is kept. Keep it below the "
                    "upstream's own keep-alive timeout (uvicorn, which serves vLLM and many others: 5 s), "
                    "or a request sent just as the upstream closes the connection fails with a 502.")
    stream_usage: bool = Field(
        True, description="Ask the upstream for usage on streamed chat/completions (stream_options."
                          "include_usage) when a plugin counts tokens. Turned off automatically for an "
                          "upstream that refuses the field; set false for one known to.")
    health_path: str | None = Field(None, description="GET this path for /readyz; default: TCP connect only.")
    ca_file: str | None = Field(
        None, description="PEM file of certificate authorities an https upstream's certificate is also checked "
                          "against (a private CA), besides the system's. Only the upstream connection uses it "
                          "(SSL_CERT_FILE would replace the system's store for every connection).")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v != v.strip() or any(c.isspace() for c in v):  # (a variable set with a blank at its end)
            raise ValueError("the URL holds a blank (a space, tab or line break, at its ends too): remove it")
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        # An IPv6 zone id as RFC 6874 writes it in a URL ([fe80::1%25eth0], as curl takes it): the
        # connection needs the zone itself (fe80::1%eth0), which the raw form gives
        v = re.sub(r"^(https?://(?:[^/@]*@)?\[[0-9A-Fa-f:.]+)%25([^\]/]+\])", r"\1%\2", v)
        try:
            u = urlsplit(v)
            u.port  # noqa: B018  (a port that is not a number only fails when read)
        except ValueError:
            raise ValueError("not a valid URL (check the host and port)") from None
        if not u.hostname:
            raise ValueError("the URL names no host (http://host:port)")
        return v.rstrip("/")

    @field_validator("health_path")
    @classmethod
    def _health_path(cls, v: str | None) -> str | None:
        if v == "":  # ("${UPSTREAM_HEALTH_PATH:-}" with the variable unset): connect only
            return None
        if v is not None and (not v.startswith("/") or any(c.isspace() for c in v)):
            raise ValueError("a path on the upstream, starting with '/' and without blanks (e.g. /health); "
                             "it is appended to upstream.url")
        return v

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, v: str | None) -> str | None:
        if v is not None:
            upstream_tls(v)  # a file that is missing or holds no certificate is an error now, not at the first request
        return v

    @field_validator("headers", mode="before")
    @classmethod
    def _empty_headers(cls, v: Any) -> Any:
        """A header left empty (``OpenAI-Organization: ${OPENAI_ORG_ID:-}`` with the variable unset)
        is not sent: an optional credential without a second config file."""
        if isinstance(v, dict):
            return {k: x for k, x in v.items() if x != ""}
        return v

    @field_validator("headers")
    @classmethod
    def _distinct_headers(cls, v: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for name in v:
            other = seen.setdefault(name.lower(), name)
            if other != name:  # HTTP header names are case-insensitive: one of them would be lost
                raise ValueError(f"{other!r} and {name!r} are the same header (names are case-insensitive); "
                                 "keep one")
        return v

    @model_validator(mode="after")
    def _one_credential(self) -> "UpstreamConfig":
        if "@" in urlsplit(self.url).netloc and any(h.lower() == "authorization" for h in self.headers):
            raise ValueError("url: the URL carries credentials and upstream.headers has an Authorization header; "
                             "keep one of them (the URL is not shown: it may hold a password)")
        return self


_HOST_PORT_AFTER_AT = re.compile(r"@[^/?#@=&]+:\d+(?:[/?#]|$)")


def split_uri(uri: str) -> tuple[str, str, str]:
    """``scheme://``, what comes before the query or fragment (credentials, hosts, path), and the
    ``?query#fragment`` (which may hold an ``@`` of its own: ``?client_name=gw@eu-1``)."""
    scheme, sep, rest = uri.partition("://")
    m = re.match(r"([^?#]*)(.*)", rest, re.DOTALL)
    assert m is not None
    return scheme + sep, m.group(1), m.group(2)


def uri_ambiguous(uri: str) -> bool:
    """A password written as it is instead of percent-encoded: a raw ``/`` in it puts an ``@`` in
    the path (``carol:4821/Zsecret@host``), a raw ``?`` or ``#`` one in the query before any
    ``=`` (``carol:pa?ss@host``). Parsers disagree on where such a URL's host is (one takes part of
    the password for it, and says so in its error), so it is refused rather than guessed. An
    ``@`` in a query value, or in a Unix socket's path, is no credential. (For the counter store's
    URL and the database's.)"""
    scheme, head, tail = split_uri(uri)
    netloc, _, path = head.partition("/")
    if "@" in path and (netloc or not scheme.removesuffix("://").endswith("unix")):
        return True
    if "@" not in tail:
        return False
    # An '@' in the query followed by host:port is a password's '?' or '#' (`u:4821?tok=x@h:6379/0`),
    # however many '=' come before it; `?client_name=gw@eu-1` is a query value.
    return "=" not in tail.partition("@")[0] or _HOST_PORT_AFTER_AT.search(tail) is not None


#: The query options a SQLite URL takes (the driver's, and SQLite's own URI parameters).
_SQLITE_QUERY = frozenset({"timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements",
                           "uri", "mode", "cache", "vfs", "immutable", "nolock", "psow", "modeof"})


class DatabaseConfig(Model):
    url: str = Field("sqlite+aiosqlite:///gateway.db", repr=False,
                     description="SQLAlchemy async URL: sqlite+aiosqlite:///file.db or postgresql+asyncpg://...")
    auto_migrate: bool | None = Field(None, description="Apply migrations at start (default: yes for SQLite).")
    busy_timeout_ms: int = Field(5000, ge=0, le=2**31 - 1, description="SQLite busy_timeout.")
    pool_size: int = Field(10, ge=1)
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("sqlite+aiosqlite://") or v.startswith("postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        from urllib.parse import parse_qs

        if v.startswith("sqlite"):
            name = v.split("://", 1)[1].split("?", 1)[0].lstrip("/")
            if name.startswith("~"):
                raise ValueError("'~' is not expanded in a database URL: write the full path "
                                 "(sqlite+aiosqlite:////home/...)")
            query = parse_qs(urlsplit(v).query, keep_blank_values=True)
            odd = sorted(set(query) - _SQLITE_QUERY)
            if odd:
                # (a raw '?' in the file's path starts the URL's query: the database went to another
                # file, and SQLAlchemy only warned, on stderr, of arguments it does not take)
                raise ValueError(f"{', '.join(repr(k) for k in odd[:3])} is no SQLite URL option: a '?' in the "
                                 "file's path starts the URL's query; percent-encode it there (%3F; '%' is %25)")
            mode = query.get("mode", [""])[0]
            if name in ("", ":memory:") or name.startswith("file::memory:") or mode == "memory":
                # (each pooled connection would get its own empty database, gone at exit)
                raise ValueError("in-memory SQLite databases are not supported (use a file, e.g. "
                                 "sqlite+aiosqlite:///gateway.db)")
        elif uri_ambiguous(v):
            # (SQLAlchemy would take part of the password for the host: shown in its errors, and
            # looked up in DNS)
            raise ValueError("the database URL has a '/', '?' or '#' before its last '@': percent-encode the "
                             "user name and password (RFC 3986: '/' is %2F, '?' %3F, '#' %23, '@' %40, ':' %3A, "
                             "'%' %25; the URL is not shown: it may hold a password)")
        elif "sslmode" in parse_qs(urlsplit(v).query):
            # asyncpg takes no sslmode argument: the connection would fail with a TypeError
            raise ValueError("sslmode= is libpq's parameter; the asyncpg driver takes ssl= instead "
                             "(e.g. ?ssl=require)")
        return v


class LoggingConfig(Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class PluginSpec(Model):
    name: str = Field(description="Registered plugin name.")
    enabled: bool = Field(True, description="Globally on; a route can turn it on or off.")
    config: dict[str, Any] = Field(default_factory=dict, description="The plugin's own settings.")

    _validated: Any = PrivateAttr(None)

    @property
    def validated(self) -> Any:
        """The plugin's config model instance, set by the loader."""
        return self._validated

    @field_validator("config", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return {} if v is None else v


def _needs_identity(p: "PluginSpec") -> str:
    """What a plugin placed before key_auth would silently get wrong, or "" (see ``warnings``)."""
    if p.name == "conversations":
        return "every conversation would belong to the owner 'anonymous'"
    cfg = p.validated
    if p.name == "rate_limit" and cfg is not None:
        parts = {"key", "owner", "team", "user"}
        keyed = [r.name for r in [*cfg.rules, *cfg.concurrency] if r.key_by != "global" and parts & set(r.key_by)]
        if keyed:
            return (f"its rules keyed by key, owner, team or user ({', '.join(keyed)}) would count per client address, "
                    "and keys' own limits would not apply")
    return ""


class PluginOverride(Model):
    enabled: bool | None = None
    config: dict[str, Any] = Field(default_factory=dict)

    _validated: Any = PrivateAttr(None)

    @property
    def validated(self) -> Any:
        """The plugin's config model instance, set by the loader."""
        return self._validated

    @field_validator("config", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return {} if v is None else v


class RouteConfig(Model):
    name: str | None = None
    path_prefix: str = Field(description="Applies to the request path equal to this prefix or below it "
                                         "(/v1/models: /v1/models and /v1/models/..., not /v1/modelsX); "
                                         "a trailing '/' makes no difference.")
    methods: list[str] = Field(default_factory=list, description="HTTP methods; empty means all. GET covers "
                               "HEAD too, unless another route with the same prefix names HEAD.")
    plugins: dict[str, PluginOverride] = Field(default_factory=dict)
    max_body_size: int | None = Field(None, gt=0, description="Largest request body on this route (say 25MiB "
                                      "for /v1/audio/transcriptions uploads); null: server.max_body_size. "
                                      "Bodies are read whole into memory.")
    forward: bool = Field(True, description="false: requests this route takes are not forwarded; the gateway "
                          "answers 404 not_found after the route's plugins ran (so the attempt is "
                          "authenticated, counted and audited). For upstream endpoints that must not be "
                          "reached through the gateway, e.g. the objects a hosted API stores per API key, "
                          "which every owner would share through the gateway's one credential.")

    @field_validator("max_body_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int | None:
        return None if v is None else parse_size(v)

    @field_validator("plugins", mode="before")
    @classmethod
    def _empty(cls, v: Any) -> Any:
        # `plugins:` with every entry commented out, `rate_limit:` with nothing under it: as if
        # they were not there (like any section left empty)
        if v is None:
            return {}
        if isinstance(v, dict):
            return {k: ({} if o is None else o) for k, o in v.items()}
        return v

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str, info: ValidationInfo) -> str:
        bad = prefix_problem(v)
        if bad:
            name = info.data.get("name")
            raise ValueError(f"{v!r}{f' (route {name!r})' if name else ''}: {bad}")
        return normal_prefix(v)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        out = [m.upper() for m in v]
        bad = [m for m in out if m not in HTTP_METHODS]
        if bad:
            raise ValueError(f"not an HTTP method: {', '.join(bad)} (one of {', '.join(sorted(HTTP_METHODS))})")
        return out


def _route_label(r: RouteConfig) -> str:
    return f" ({r.name!r})" if r.name else ""


def _same_address(a: str, b: str) -> bool:
    """Would listeners on hosts ``a`` and ``b`` (same port) clash? The same host, or a wildcard of
    the other's address family (``0.0.0.0`` takes every IPv4 address, ``::`` every IPv6 one: the
    server sets IPV6_V6ONLY, so ``::`` and an IPv4 address do not clash); ``""`` takes all."""
    import ipaddress

    def norm(h: str) -> tuple[str, int | None]:
        try:
            ip = ipaddress.ip_address(h.strip("[]"))
        except ValueError:
            return h.lower(), None  # a host name: its addresses are not known here
        return ("0.0.0.0" if ip.version == 4 and ip.is_unspecified else "::" if ip.is_unspecified
                else str(ip)), ip.version

    (a, fa), (b, fb) = norm(a), norm(b)
    if a == b or "" in (a, b):
        return True
    loopback = ("127.0.0.1", "::1")
    if (a == "localhost" and b in loopback) or (b == "localhost" and a in loopback):
        return True
    for (w, _), (other, fam) in (((a, fa), (b, fb)), ((b, fb), (a, fa))):
        # a wildcard clashes with an address of its family, and with a name (which may resolve to one)
        if (w == "0.0.0.0" and fam in (4, None)) or (w == "::" and fam in (6, None)):
            return True
    return False


class GatewayConfig(Model):
    server: ServerConfig = Field(default_factory=ServerConfig)
    admin: AdminConfig = Field(default_factory=lambda: AdminConfig(enabled=False))
    upstream: UpstreamConfig
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    plugins: list[PluginSpec] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)

    _source: str = PrivateAttr("gateway.yaml")
    _path: str | None = PrivateAttr(None)
    #: (inode, size, mtime) of the file as it was before it was read: a reload compares it with
    #: the file a moment later, to tell a file still being written (see file_state)
    _read_state: tuple[int, int, int] | None = PrivateAttr(None)

    @property
    def source(self) -> str:
        return self._source

    @property
    def path(self) -> str | None:
        """Absolute path of the file this was loaded from (used by reload)."""
        return self._path

    @field_validator("plugins", "routes", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return [] if v is None else v  # (every entry commented out)

    @field_validator("server", "database", "logging", "admin", mode="before")
    @classmethod
    def _defaults(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:  # every setting commented out: as if the section were not there
            return {"enabled": False} if info.field_name == "admin" else {}
        return v

    @model_validator(mode="after")
    def _unique(self) -> "GatewayConfig":
        seen = set()
        for p in self.plugins:
            if p.name in seen:
                raise ValueError(f"plugin {p.name!r} is listed twice")
            seen.add(p.name)
        a, s = self.admin, self.server
        if a.enabled and a.port == s.port and a.port != 0 and _same_address(a.host, s.host):
            raise ValueError(f"admin.port: the admin listener cannot share port {a.port} with the public one "
                             "(server.port) on the same address")
        return self

    @model_validator(mode="after")
    def _distinct_routes(self) -> "GatewayConfig":
        """Two routes with the same prefix that both take a method: the second would never be used
        for it (the first one listed wins), silently. Reported at the second, naming the first."""
        first: dict[tuple[str, str], int] = {}  # (prefix, method or "*") -> index of the route taking it
        errors = []
        for j, r in enumerate(self.routes):
            clash: dict[int, list[str]] = {}
            for m in r.methods or ["*"]:
                i = first.setdefault((r.path_prefix.lower(), m), j)  # (matched without regard to case)
                if i != j:
                    clash.setdefault(i, []).append(m)
            for i, ms in clash.items():
                what = "all methods" if ms == ["*"] else ", ".join(sorted(set(ms)))
                errors.append(InitErrorDetails(
                    type=PydanticCustomError(
                        "duplicate_route", "routes[{i}]{a} and routes[{j}]{b} both take {what} on {prefix}: "
                        "only the first one listed would ever serve them (merge the two, or give them "
                        "different methods)",
                        {"i": i, "j": j, "what": what, "prefix": r.path_prefix,
                         "a": _route_label(self.routes[i]), "b": _route_label(r)}),
                    loc=("routes", j, "path_prefix"), input=r.path_prefix))
        if errors:
            # (a ValidationError raised here keeps each error's location: the loader names its line)
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def fixed_settings(self) -> dict[str, Any]:
        """The settings a reload cannot change (they need a restart), by dotted path: the listeners,
        the admin API, the database and the upstream connection pool's size."""
        out: dict[str, Any] = {f"server.{k}": getattr(self.server, k)
                               for k in ("host", "port", "reuse_port", "shutdown_timeout", "keepalive_timeout")}
        out.update({f"admin.{k}": v for k, v in self.admin.model_dump().items()})
        out.update({f"database.{k}": v for k, v in self.database.model_dump().items()})
        out["upstream.max_connections"] = self.upstream.max_connections
        out["upstream.keepalive_timeout"] = self.upstream.keepalive_timeout
        return out

    def warnings(self) -> list[str]:
        """What is valid but most likely a mistake: said by ``gateway check``, at start and reload."""
        out = []
        wide = [c for c, n in zip(self.server.trusted_proxies, self.server.networks) if n.prefixlen < 8]
        if wide:
            # every client (or nearly) may then say what its address is: X-Forwarded-For is believed
            out.append(f"server.trusted_proxies holds {', '.join(wide)}: the X-Forwarded-For of any client in it is "
                       "believed, so those clients choose the address that per-IP limits, ip rules and the audit trail "
                       "see; list only the proxies' own addresses")
        for c in self.server.trusted_proxies:
            # `10.0.0.5/24`, `fd00::2/64` (how `ip addr` prints a proxy's address): the whole network
            # is trusted, not the one proxy
            if "/" not in c:
                continue
            net = ipaddress.ip_network(c, strict=False)
            if int(net.network_address) != int(ipaddress.ip_address(c.split("/", 1)[0].split("%", 1)[0])):
                out.append(f"server.trusted_proxies holds {c}, an address with a prefix length: it trusts all of "
                           f"{net}; write {c.split('/', 1)[0]} for one proxy, or {net} if the whole network is yours")
        base = urlsplit(str(self.upstream.url)).path.rstrip("/")
        for prefix in dict.fromkeys(["/v1", *(p.rstrip("/") for p in self.server.paths)]):
            if prefix and base.lower().endswith(prefix.lower()):
                # (the request keeps its whole path: /v1/chat/completions is sent to <base>/v1/...)
                out.append(f"upstream.url ends in {prefix}, and requests keep their path: {prefix}/chat/completions "
                           f"is sent to ...{prefix}{prefix}/chat/completions; drop {prefix} from upstream.url unless "
                           "the backend really serves that")
                break
        # (a preflight carries no key: a plugin before cors that checks requests refuses every
        # browser's preflight, and the page never gets to make its request; a route override that
        # turns cors on keeps the plugins' order)
        names = [p.name for p in self.plugins]
        if "cors" in names and (next(p for p in self.plugins if p.name == "cors").enabled
                                or any(r.plugins.get("cors", PluginOverride()).enabled for r in self.routes)):
            from gateway.plugin import registry

            def checks(name: str) -> bool:  # (a plugin that may refuse a request: it checks requests)
                cls = registry.get(name)
                return cls is not None and not cls.header_safe and (cls.overrides("on_request")
                                                                    or cls.overrides("on_headers"))

            before = [n for n in names[:names.index("cors")] if checks(n)]
            if before:
                out.append(f"plugins: cors comes after {', '.join(before)}; put it first, so that browsers' "
                           "preflights (which carry no API key) are answered before anything checks them")
        # (plugins read the caller's identity when their hooks run: one placed before key_auth sees
        # none. A per-IP rate limit before key_auth is a choice (it counts refused attempts too);
        # rules keyed by the key, or conversations, are not.)
        if "key_auth" in names:
            for p in self.plugins[:names.index("key_auth")]:
                why = _needs_identity(p)
                if why:
                    out.append(f"plugins: {p.name} comes before key_auth, so it sees no key: {why}; put key_auth "
                               "first")
        return out

    def restart_needed(self, new: "GatewayConfig") -> list[str]:
        """The fixed settings ``new`` changes (secrets are named, never shown)."""
        a, b = self.fixed_settings(), new.fixed_settings()
        return [k for k in a if a[k] != b[k]]
