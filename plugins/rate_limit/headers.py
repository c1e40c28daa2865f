"""Rate-limit response headers in the three forms clients read.

- IETF (draft-ietf-httpapi-ratelimit-headers): ``RateLimit-Policy: "per-key";q=60;w=60`` lists every
  policy that applied, ``RateLimit: "per-key";r=59;t=42`` the remaining quota and seconds to reset
  of each (token policies carry ``qu="tokens"``).
- ``X-RateLimit-Limit / -Remaining / -Reset`` (reset in seconds) for the most restrictive request
  limit (the one with the fewest left, then the sooner reset; of those with none left, the one
  that resets last), else the most restrictive token limit or quota.
- OpenAI style: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
  ``x-ratelimit-reset-requests`` (a duration such as ``1s`` or ``6m0s``) and the ``-tokens`` twins
  (token limits and daily/monthly token quotas alike).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class Standing:
    """Where the caller stands against one limit (or quota) for this request."""

    name: str          # policy name (rule, rule-1, daily-tokens ...)
    counts: str        # "requests" | "tokens" | "quota" (a daily/monthly token quota)
    limit: int
    remaining: int
    reset_in: float    # seconds until the window resets / a unit frees
    window: int        # window length in seconds
    policy: str = ""   # the RateLimit-Policy item, when precomputed
    refuses: bool = False  # the limit this request is refused by
    held: int = 0      # tokens held by requests still running (taken off ``remaining``)


def policy_item(name: str, counts: str, limit: int, window: int) -> str:
    qu = ';qu="tokens"' if counts in ("tokens", "quota") else ""
    return f'"{name}";q={limit}{qu};w={window}'


def duration(seconds: float) -> str:
    """A duration the way OpenAI's headers show it: 20ms, 1s, 1.5s, 6m0s, 1h2m3s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s = ms / 1000
    s_txt = (f"{s:.3f}".rstrip("0").rstrip(".")) + "s"
    if h:
        return f"{h}h{m}m{s_txt}"
    if m:
        return f"{m}m{s_txt}"
    return s_txt


def _strictest(items: list[Standing]) -> Standing | None:
    """The limit that refuses first: the least left (a 1,000,000-token daily quota barely used is
    not stricter than 500 tokens a minute), then the one that resets sooner. Of limits with
    nothing left, the one that resets last: the caller gets through only then (a 5-second burst
    limit used up says nothing when an hourly one is used up too). A refusal's own limit first."""
    if not items:
        return None
    for s in items:
        if s.refuses:  # (it may have some left, not enough for this request)
            return s
    spent = [s for s in items if s.remaining <= 0]
    if spent:
        return max(spent, key=lambda s: s.reset_in)
    return min(items, key=lambda s: (s.remaining, s.reset_in))


def _secs(x: float) -> int:
    return max(0, math.ceil(x))


_OPENAI = {k: (f"x-ratelimit-limit-{k}", f"x-ratelimit-remaining-{k}", f"x-ratelimit-reset-{k}")
           for k in ("requests", "tokens")}


def build(standings: list[Standing]) -> dict[str, str]:
    if not standings:
        return {}
    if len(standings) == 1:  # one limit applies (the common case): the same headers, built directly
        s = standings[0]
        limit, remaining, reset = str(s.limit), str(max(0, s.remaining)), _secs(s.reset_in)
        one = {"RateLimit-Policy": s.policy or policy_item(s.name, s.counts, s.limit, s.window),
               "RateLimit": f'"{s.name}";r={remaining};t={reset}',
               "X-RateLimit-Limit": limit, "X-RateLimit-Remaining": remaining, "X-RateLimit-Reset": str(reset)}
        names = _OPENAI["requests" if s.counts == "requests" else "tokens"]
        one[names[0]] = limit
        one[names[1]] = remaining
        one[names[2]] = duration(s.reset_in)
        return one
    h: dict[str, str] = {}
    pol, cur = [], []
    for s in standings:
        pol.append(s.policy or policy_item(s.name, s.counts, s.limit, s.window))
        cur.append(f'"{s.name}";r={max(0, s.remaining)};t={_secs(s.reset_in)}')
    h["RateLimit-Policy"] = ", ".join(pol)
    h["RateLimit"] = ", ".join(cur)
    req = _strictest([s for s in standings if s.counts == "requests"])
    # token limits and token quotas alike: the one closest to running out
    tok = _strictest([s for s in standings if s.counts != "requests"])
    main = req or tok
    assert main is not None
    h["X-RateLimit-Limit"] = str(main.limit)
    h["X-RateLimit-Remaining"] = str(max(0, main.remaining))
    h["X-RateLimit-Reset"] = str(_secs(main.reset_in))
    for kind, s in (("requests", req), ("tokens", tok)):
        if s is not None:
            h[f"x-ratelimit-limit-{kind}"] = str(s.limit)
            h[f"x-ratelimit-remaining-{kind}"] = str(max(0, s.remaining))
            h[f"x-ratelimit-reset-{kind}"] = duration(s.reset_in)
    return h
