"""Rules compiled once: `limits` items, what they count and what they are keyed by; token estimates."""
from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute, parse_many
from limits.limits import safe_string

from gateway.context import RequestContext

from .config import KEY_PARTS, RuleConfig
from .headers import policy_item


@dataclass(frozen=True, slots=True)
class Limit:
    """One `limits` item of one rule (a rule "10/second; 1000/day" gives two)."""

    rule: str
    item: RateLimitItem
    counts: str                  # "requests" | "tokens"
    key_by: tuple[str, ...]      # () = global
    key_minute: bool             # keyed by the API key alone, per minute (a key's own rpm/tpm replaces it)
    max_tokens_default: int | None
    index: int                   # position within the rule
    policy_name: str = ""
    policy: str = ""             # its RateLimit-Policy item
    rule_id: str = ""            # the first counter identifier: the rule name, or ``counter``
    counter: str = ""            # count on another rule's counter (a key's own rpm/tpm: see below)
    ip_prefixes: tuple[int, int] = (32, 64)  # an address is keyed by its network (ipv4_prefix, ipv6_prefix)
    user_header: str | None = None  # key_by user: the header naming the end user (else the body's user)

    def __post_init__(self) -> None:
        name = self.rule if self.index == 0 else f"{self.rule}-{self.index}"
        object.__setattr__(self, "policy_name", name)
        object.__setattr__(self, "policy", policy_item(name, self.counts, self.item.amount, self.window))
        object.__setattr__(self, "rule_id", _safe(self.counter or self.rule))

    @property
    def label(self) -> str:
        return f"{self.rule} ({self.item.amount}/{_window_text(self.item)})"

    @property
    def window(self) -> int:
        return int(self.item.get_expiry())


def _window_text(item: RateLimitItem) -> str:
    g = item.GRANULARITY.name
    return g if item.multiples == 1 else f"{item.multiples} {g}s"


def _key_for(self: RateLimitItem, *identifiers: bytes | str | int | float) -> str:
    """`RateLimitItem.key_for` without the amount: the counter of a rule's window is the same
    whatever the limit, so a reload that lowers (or raises) a limit applies it to what was already
    counted, on every instance, instead of starting everyone afresh. A changed window (per minute ->
    per hour) is another counter; the window is its length in seconds ("1/minute" and "1 per 60
    seconds" share one). (A rule has one limit per window: the config refuses two.) The library
    asks for the key on every call (twice per request): the keys of recent callers are kept."""
    keys = self._keys  # type: ignore[attr-defined]
    key = keys.get(identifiers)
    if key is None:
        if len(keys) >= _KEYS_KEPT:
            keys.clear()
        remainder = "/".join([safe_string(k) for k in identifiers] + [f"{int(self.get_expiry())}s"])
        key = keys[identifiers] = f"{self.namespace}/{remainder}"
    return key


_KEYS_KEPT = 10_000


_AMOUNT_FREE: dict[type, type] = {}


def amount_free(item: RateLimitItem) -> RateLimitItem:
    """The same limit, its counters keyed without the amount (see :func:`_key_for`)."""
    cls = type(item)
    sub = _AMOUNT_FREE.get(cls)
    if sub is None:
        sub = _AMOUNT_FREE[cls] = type(cls.__name__, (cls,), {"key_for": _key_for, "__slots__": ("_keys",)})
    free = sub(item.amount, item.multiples, item.namespace)
    free._keys = {}  # type: ignore[attr-defined]
    return free  # type: ignore[no-any-return]


def compile_rules(rules: list[RuleConfig], ip_prefixes: tuple[int, int] = (32, 64),
                  user_header: str | None = None) -> list[Limit]:
    out = []
    for r in rules:
        # in one order whatever the YAML's ([ip, model] and [model, ip] are one counter)
        key_by = () if r.key_by == "global" else tuple(p for p in KEY_PARTS if p in r.key_by)
        for i, item in enumerate(parse_many(r.limit)):
            out.append(Limit(r.name, amount_free(item), r.counts, key_by, key_by == ("key",) and item.get_expiry() == 60,
                             r.estimate_default_max_tokens, i, ip_prefixes=ip_prefixes, user_header=user_header))
    return out


def override_limit(counts: str, amount: int, counter: str = "", ip_prefixes: tuple[int, int] = (32, 64)) -> Limit:
    """A key's own rpm / tpm, replacing the YAML limits per minute keyed by key alone. ``counter``: the
    YAML rule keyed by key alone with a one-minute window, if there is one: the override counts on
    its counter, so setting or clearing a key's own limit keeps what the key has already used."""
    name = "key-rpm" if counts == "requests" else "key-tpm"
    return Limit(name, amount_free(RateLimitItemPerMinute(amount)), counts, ("key",), True, None, 0,
                 counter=counter, ip_prefixes=ip_prefixes)


def shared_minute_counter(limits: list[Limit], counts: str) -> str:
    """The rule whose counter a key's own rpm (or tpm) shares: keyed by key alone, per minute."""
    for lim in limits:
        if lim.counts == counts and lim.key_by == ("key",) and lim.window == 60:
            return lim.rule
    return ""


def identifiers(limit: Limit, ctx: RequestContext) -> tuple[str, ...]:
    """The counter's identity: the rule name and the values of its key_by parts."""
    if limit.key_by == _IP:  # the common rule, without the general loop
        v = "ip:" + ip_key(ctx.client_ip, *limit.ip_prefixes)
        return (limit.rule_id, v if len(v) <= 200 and "%" not in v and "/" not in v else _safe(v))
    ids = [limit.counter or limit.rule]
    for part in limit.key_by:
        if part == "key":
            k = ctx.key_id
            ids.append(f"key:{k}" if k else f"ip:{ip_key(ctx.client_ip, *limit.ip_prefixes)}")
        elif part == "owner":
            o = ctx.owner
            ids.append(f"owner:{o}" if o else f"ip:{ip_key(ctx.client_ip, *limit.ip_prefixes)}")
        elif part == "team":
            # A key without a team is a team of its own (not one budget for every key without
            # one); no identity at all: the client IP, as for key and owner.
            t = ctx.identity.get("team") if ctx.identity else None
            k = ctx.key_id
            ids.append(f"team:{t}" if t else f"key:{k}" if k else f"ip:{ip_key(ctx.client_ip, *limit.ip_prefixes)}")
        elif part == "ip":
            ids.append(f"ip:{ip_key(ctx.client_ip, *limit.ip_prefixes)}")
        elif part == "route":
            ids.append(f"route:{ctx.route}")
        elif part == "model":
            # (Gemini's models/gemini-2.0-flash is gemini-2.0-flash: one model, one count)
            ids.append(f"model:{(ctx.model or '-').removeprefix('models/')}")
        elif part == "user":
            # (no identity: the other parts fell back to the client IP, and a client naming a new
            # user each time would get fresh counters: the users of no key share one)
            ids.append(f"user:{end_user(ctx, limit.user_header)}" if ctx.identity else "user:-")
    return tuple(_safe(i) for i in ids)


def end_user(ctx: RequestContext, header: str | None) -> str:
    """The end user a client names behind its key: ``header``'s value, else the body's ``user``
    (OpenAI's field for it); neither (or a blank): ``-``, the key's requests without a user."""
    u = ctx.request.headers.get(header) if header else None
    if not u or not u.strip():
        body = ctx.json
        u = body.get("user") if isinstance(body, dict) else None
        if not isinstance(u, str) or not u.strip():
            return "-"
    return u.strip()


def ip_key(ip: str, v4: int = 32, v6: int = 64) -> str:
    """What a client address is counted as: its network, ``2001:db8:1:2::/64``. An IPv6 client
    is usually given a whole /64 and may use a new address of it for every request, so keying the
    address would give it a fresh counter each time; IPv4 addresses are scarce and kept whole by
    default; an IPv4 client behind NAT64 (``64:ff9b::1.2.3.4``) as its IPv4 address. A prefix equal
    to the address length keys the address itself (no ``/``). Anything
    that is no address (a Unix socket peer) is kept as it is. Recent results are kept (this runs
    per rule per request)."""
    if v4 == 32 and ":" not in ip:
        return ip  # the common case: an IPv4 address kept whole
    k = (ip, v4, v6)
    key = _NETS.get(k)
    if key is None:
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if a.version == 6 and a in _NAT64:
            # an IPv4 client reaching an IPv6-only network through NAT64 (RFC 6052's well-known
            # prefix): counted as the IPv4 address it carries, not with every IPv4 client in a /64
            a = ipaddress.IPv4Address(int(a) & 0xFFFFFFFF)
        bits = v4 if a.version == 4 else v6
        key = str(a) if bits >= a.max_prefixlen else str(ipaddress.ip_network((a, bits), strict=False))
        if len(_NETS) >= _KEYS_KEPT:
            _NETS.clear()
        _NETS[k] = key
    return key


_NETS: dict[tuple[str, int, int], str] = {}
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


_IP = ("ip",)


def _safe(s: str) -> str:
    # limits joins identifiers with "/"; keep them from colliding and keep keys short. A long value
    # keeps a prefix and gets a digest of the whole, so two values sharing a prefix never share a counter.
    # A lone surrogate (JSON can carry one, "\udc80") cannot be encoded for Redis or hashed: written
    # as its escape, or one such value would fail the store for everyone.
    if not s.isascii():
        s = s.encode("utf-8", "backslashreplace").decode()
    s = s.replace("%", "%25").replace("/", "%2F")
    if len(s) > 200:
        s = s[:160] + "#" + hashlib.sha256(s.encode()).hexdigest()[:32]
    return s


def max_tokens(body: Any, default: int) -> int:
    """The completion size the request allows, per choice (``default`` when it sets none): of
    ``max_completion_tokens``, ``max_tokens``, ``max_output_tokens`` and Ollama's
    ``options.num_predict``, the largest given (backends differ in which they read, and some read
    ``max_completion_tokens or max_tokens``: a 0 in one lets the other through)."""
    if not isinstance(body, dict):
        return default
    found = [v for v in (_count(body.get(k)) for k in ("max_completion_tokens", "max_tokens", "max_output_tokens"))
             if v is not None and v >= 0]
    opts = body.get("options")
    if isinstance(opts, dict):
        v = _count(opts.get("num_predict"))
        if v is not None and v > 0:  # (-1: no limit, -2: fill the context: the default estimate)
            found.append(v)
    return min(max(found), TOKENS_CAP) if found else default


def choices(body: Any, best_of: bool = False) -> int:
    """How many completions the request asks the upstream to generate: ``n`` (chat and legacy
    completions, images), or, with ``best_of`` (a legacy ``/v1/completions`` request), its
    ``best_of`` when larger (the upstream generates that many and returns the best ``n``). The
    chat API has no ``best_of``: elsewhere the field is ignored, as the upstream ignores it. Each
    choice may use the whole ``max_tokens``, so the estimate multiplies by this. Missing, invalid
    or below 1: one. Capped at :data:`TOKENS_CAP` (a huge ``n`` then gives an estimate over any
    limit: a "too large" refusal)."""
    n = 1
    if isinstance(body, dict):
        for k in ("n", "best_of") if best_of else ("n",):
            v = _count(body.get(k))
            if v is not None and v > n:
                n = v
    return min(n, TOKENS_CAP)


def completion_estimate(body: Any, default: int, best_of: bool = False) -> int:
    """``max_tokens`` (or ``default``) for each of the request's choices, capped at :data:`TOKENS_CAP`."""
    return min(max_tokens(body, default) * choices(body, best_of), TOKENS_CAP)


#: The most tokens one estimate counts (what a reported usage count may be, too): a request asking
#: more is over any real limit anyway, and the numbers in messages and stores stay sane.
TOKENS_CAP = 2**31 - 1


def _count(v: Any) -> int | None:
    """A whole number as the upstreams read it: an int, a float without a fraction (20.0), or a
    string of digits ("20"; lax validators such as pydantic's take both), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    if isinstance(v, str) and 0 < len(v) <= 20:
        m = _WHOLE.fullmatch(v.strip())
        if m is not None:  # one optional sign, then ASCII digits: "--5" or "+-3" is no number
            return int(m.group())
    return None


_WHOLE = re.compile(r"[+-]?[0-9]{1,19}")
