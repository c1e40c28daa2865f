"""The ``rate_limit`` plugin's configuration model."""
from __future__ import annotations

import re
from typing import Literal

from limits import parse_many
from pydantic import Field, field_validator, model_validator

from gateway.config.model import uri_ambiguous
from gateway.plugin import PluginConfig

#: A window count of zero ("5/0 minute", "5 per 00 seconds")
_ZERO_WINDOW = re.compile(r"(?:/|\bper\b)\s*0+\s*[a-z]", re.I)

KEY_PARTS = ("key", "owner", "team", "ip", "route", "model", "user")

#: The largest count a limit may have: 2^53 - 1, the largest integer every client reads exactly
#: from a header (JavaScript), far under what a counter store holds.
MAX_AMOUNT = 2**53 - 1


#: Rule names a key's own limits use: their counters must stay their own.
RESERVED_NAMES = ("key-rpm", "key-tpm", "key-parallel")


def _key_by(v: object) -> object:
    if isinstance(v, str) and v != "global":
        return [v]
    if isinstance(v, list) and not v:  # one counter for everyone is said so, not left empty
        raise ValueError('list at least one part (key, owner, team, ip, route, model, user), or "global" for one '
                         'counter shared by everyone')
    if isinstance(v, list) and "global" in v:  # `key_by: [global]` as written in a list
        if len(set(v)) > 1:
            raise ValueError('"global" (one counter for everyone) cannot be combined with other parts')
        return "global"
    return v


class _Keyed(PluginConfig):
    name: str = Field(description="Rule name, shown in headers and refusal messages.",
                      pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key_by: list[Literal["key", "owner", "team", "ip", "route", "model", "user"]] | Literal["global"] = Field(
        default_factory=lambda: ["key"],
        description='What each counter is kept per: a list of key, owner, team, ip, route, model, user, or '
                    '"global". key/owner/team fall back to the client IP when no identity is set; team counts a '
                    "key without a team as a team of its own; user is the end user the client names (user_header, "
                    "else the body's user field), with key, owner or team.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v in RESERVED_NAMES:  # a key's own rpm / tpm / parallel
            raise ValueError(f"{v!r} is reserved for a key's own limit; choose another rule name")
        return v

    @field_validator("key_by", mode="before")
    @classmethod
    def _key_by(cls, v: object) -> object:
        return _key_by(v)

    @field_validator("key_by")
    @classmethod
    def _user_within(cls, v: object) -> object:
        if isinstance(v, list) and "user" in v and not {"key", "owner", "team"} & set(v):
            # (the end user is the client's word: alone, a client naming a new user each time would
            # get fresh counters, as one rotating X-Forwarded-For would)
            raise ValueError("user is whatever the client sends: combine it with key, owner or team "
                             "(key_by: [key, user]) so that each key's end users share its budget")
        return v


class ConcurrencyConfig(_Keyed):
    """Requests running at once (from admission to the end of the answer, streams included)."""

    max: int = Field(ge=1, le=1_000_000, description="Requests that may run at once per counter.")


class RuleConfig(_Keyed):
    limit: str = Field(description='Limit(s) in `limits` notation: "60/minute", "10/second; 1000/day".')
    counts: Literal["requests", "tokens"] = Field("requests", description="What the rule counts.")
    estimate_default_max_tokens: int | None = Field(
        None, ge=0, description="Token rules: completion tokens assumed when the request sets no max_tokens "
                                "(defaults to the plugin-wide value).")

    @field_validator("limit", mode="before")
    @classmethod
    def _limit_text(cls, v: object) -> object:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            raise ValueError(f'a limit needs its window: write "{v}/minute" (or per second, hour, day), in quotes')
        return v

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: str) -> str:
        try:
            items = parse_many(v)
        except ValueError as e:
            why = str(e)
            if "granularity" in why:  # ("no granularity matched for min")
                why += "; the units are second, minute, hour, day, month and year, written in full"
            raise ValueError(f"not a limit: {v!r} ({why})") from None
        if not items:
            raise ValueError(f"not a limit: {v!r}")
        if _ZERO_WINDOW.search(v):  # the library reads "5 per 0 seconds" as 5/second, silently
            raise ValueError(f"a window of 0 is no window: {v!r} (write 5/second, or 5 per 10 seconds)")
        if any(i.amount < 1 for i in items):
            raise ValueError(f"a limit of 0 refuses everything: {v!r} (remove the rule, or disable the plugin "
                             "for a route, instead)")
        if any(i.amount > MAX_AMOUNT for i in items):  # (Redis' moving window fails on such a count)
            raise ValueError(f"a limit over {MAX_AMOUNT} is no limit: {v!r} (remove the rule instead)")
        windows = [i.get_expiry() for i in items]  # in seconds: "1/minute" and "1 per 60 seconds" alike
        if len(set(windows)) < len(windows):
            raise ValueError(f"two limits for the same window in one rule: {v!r} (keep the stricter one)")
        return v



def storage_uri_ok(uri: str) -> bool:
    """Every host:port of a redis URL parses (several for a cluster or sentinel)."""
    from urllib.parse import urlsplit

    if uri_ambiguous(uri):
        return False
    if uri.removeprefix("async+").startswith(("memory", "redis+unix")):
        return True
    try:
        u = urlsplit(uri)
        hosts = u.netloc.rsplit("@", 1)[-1]
        for h in hosts.split(","):
            urlsplit("redis://" + h).port  # noqa: B018  (raises for a port that is not a number)
    except ValueError:
        return False
    return bool(hosts)


class QuotaConfig(PluginConfig):
    # (at least 1: a quota of 0 refuses everything, as a limit of 0 would; leave the quota out instead)
    daily_tokens: int | None = Field(None, ge=1, description="Tokens per key per UTC day (None: no daily quota).")
    monthly_tokens: int | None = Field(None, ge=1,
                                       description="Tokens per key per UTC month (None: no monthly quota).")
    cache_ttl: float = Field(5.0, gt=0, description="Seconds a quota's usage read from the database is reused "
                                                   "before it is read again (other instances' usage shows up "
                                                   "within this time).")


class RateLimitConfig(PluginConfig):
    strategy: Literal["sliding", "fixed", "moving"] = Field(
        "sliding", description="sliding: sliding-window counter; fixed: fixed window; moving: moving window.")
    storage: str = Field("memory://", description="Counter storage: memory://, redis://host:port/db, "
                                                  "rediss://..., redis+sentinel://host:port/service, "
                                                  "redis+cluster://host:port,host:port. A user name and "
                                                  "password (user:password@) are percent-encoded (RFC 3986).")
    storage_timeout: float = Field(0.25, gt=0, le=10,
                                   description="Seconds a request waits for the counter store at most.")
    storage_retry: float = Field(1.0, ge=0, description="After a store failure, seconds during which the store "
                                                         "is not tried again (on_store_error applies at once).")
    on_store_error: Literal["allow", "deny"] = Field(
        "allow", description="When the store fails or times out: let the request through, or refuse it (503).")
    rules: list[RuleConfig] = Field(default_factory=list, description="Limits that apply together; the "
                                                                        "strictest decides.")
    concurrency: list[ConcurrencyConfig] = Field(
        default_factory=list, description="Caps on requests running at once (each caps its own counter; "
                                          "all that apply must have room).")
    quotas: QuotaConfig = Field(default_factory=QuotaConfig, description="Daily/monthly token quotas per key, "
                                                                          "persisted in the database.")
    key_overrides: bool = Field(True, description="Apply per-key limits (rpm, tpm, daily_tokens, monthly_tokens) "
                                                  "from the caller's identity, set by key_auth.")
    estimate_default_max_tokens: int = Field(256, ge=0, description="Completion tokens assumed by the pre-check "
                                                                    "when a request sets no max_tokens.")
    headers: bool = Field(True, description="Add RateLimit / X-RateLimit / x-ratelimit-* headers to responses.")
    user_header: str | None = Field(None, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$",
                                    description="Rules keyed by user: the request header naming the end user behind "
                                                "a shared key (a chat front-end's X-OpenWebUI-User-Id); when it is "
                                                "not set or not sent, the body's user field; neither: one counter "
                                                "for the key's requests without a user.")
    ipv4_prefix: int = Field(32, ge=1, le=32, description="Rules keyed by the client IP count an IPv4 client by "
                                                          "its network of this prefix length (32: each address).")
    ipv6_prefix: int = Field(64, ge=1, le=128, description="Rules keyed by the client IP count an IPv6 client by "
                                                           "its network of this prefix length: 64, the block one "
                                                           "subscriber is usually given (128: each address).")

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        ok = ("memory://", "redis://", "rediss://", "redis+unix://", "redis+sentinel://", "redis+cluster://",
              "async+")
        if not v.startswith(ok):
            raise ValueError("must be memory://, redis://, rediss://, redis+unix://, redis+sentinel:// or "
                             "redis+cluster://")
        if uri_ambiguous(v):
            raise ValueError("the storage URL has a '/', '?' or '#' before its last '@': percent-encode the user "
                             "name and password (RFC 3986: '/' is %2F, '?' %3F, '#' %23, '@' %40, ':' %3A, "
                             "'%' %25; the URL is not shown: it may hold a password)")
        if not storage_uri_ok(v):
            raise ValueError("not a valid storage URL (check the hosts and ports; the URL is not shown: it may "
                             "hold a password)")
        from urllib.parse import parse_qs, urlsplit

        scheme = v.partition("://")[0]
        query = parse_qs(urlsplit(v).query)
        if scheme in ("redis", "rediss", "async+redis", "async+rediss") and (
                urlsplit(v).path not in ("", "/") and not re.fullmatch(r"/\d{1,5}/?", urlsplit(v).path)
                or any(not re.fullmatch(r"\d{1,5}", d) for d in query.get("db", []))):
            # (the client would take DB 0 for /x, a start with /-1 or ?db=-1 would go on without
            # limits, and one with ?db=x would fail)
            raise ValueError("the database of a redis:// URL is a number, in its path (/0) or as ?db=0: 0 to 15 on "
                             "a default server (the URL is not shown: it may hold a password)")
        if "unix" not in scheme and {"password", "username"} & set(query):
            # (the Redis client does not read them there: it would connect without the password)
            raise ValueError("a password or user name in the storage URL's query is not used: write them before "
                             "the host, redis://USER:PASSWORD@host:port/db (the URL is not shown: it may hold a "
                             "password)")
        return v

    @model_validator(mode="after")
    def _names(self) -> "RateLimitConfig":
        names = [r.name for r in self.rules] + [r.name for r in self.concurrency]
        dup = {n for n in names if names.count(n) > 1}
        if dup:  # (rules and concurrency caps share the refusals' metric label)
            raise ValueError(f"duplicate rule names: {sorted(dup)}")
        return self
