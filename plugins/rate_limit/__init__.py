"""``rate_limit``: request and token limits on the `limits` library, plus persisted token quotas.

Rules count requests or tokens, keyed by key / owner / team / ip / route / model (or global); several apply
at once and the strictest decides. Counters live in a `limits` storage (memory, or Redis so several
instances share them); quotas (tokens per key per UTC day / month) live in the database. Every
response under a limit carries IETF ``RateLimit-Policy``/``RateLimit``, ``X-RateLimit-*`` and
OpenAI-style ``x-ratelimit-*`` headers; a refusal is a 429 with ``Retry-After``. See docs/rate_limit.md.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, ClassVar

from prometheus_client import Counter

from gateway.context import NO_COMPLETION, RequestContext, cut_while_sent, generates, truthy
from gateway.estimate import prompt_estimate
from gateway.plugin import Plugin, Reply

from . import headers as hdr
from .concurrency import PREFIX, Cap, Leases, compile_caps, give_memory, key_cap, take_memory
from .config import RateLimitConfig
from .quota import QuotaStore, periods
from .rules import (Limit, choices, compile_rules, completion_estimate, identifiers, ip_key, override_limit,
                    shared_minute_counter)
from .store import STORE_LOG, CounterStore, StoreDown, async_uri

log = logging.getLogger("gateway.rate_limit")

#: Counter stores whose eviction policy was warned about (once per process each).
_EVICTION_TOLD: set[str] = set()
NAME = "rate_limit"
#: The longest Retry-After the OpenAI SDKs wait for; a refusal with a longer wait says not to retry.
SDK_MAX_WAIT = 60.0
#: Retry-After (seconds) of a request that fits what is left but not beside the estimates held by
#: requests still running: they end (and give back what they did not use) at any moment.
BUSY_RETRY = 1.0
#: retry-after-ms of a request refused for a concurrency cap: a running request ends at any moment.
BUSY_RETRY_MS = 500


#: Token estimates of requests admitted and not yet ended, per token counter or quota period, for
#: the process (every plugin instance, across reloads): requests arriving together are admitted
#: against what is left less what the others may still use, so that concurrent requests cannot
#: pass a token limit or quota many times over. Released when each request ends, before its
#: real usage is charged.
IN_FLIGHT: dict[str, int] = {}


def _hold(held: list[tuple[str, int]], key: str, n: int) -> None:
    IN_FLIGHT[key] = IN_FLIGHT.get(key, 0) + n
    held.append((key, n))


def _held(s: hdr.Standing, key: str, need: int) -> None:
    """Take the estimates held against ``key`` off the standing; when they alone keep ``need`` from
    fitting, the wait is for running requests to end, not for the window or the period."""
    held = IN_FLIGHT.get(key, 0)
    if held:
        s.held = held
        s.remaining -= held
        if s.remaining < need <= s.remaining + held:
            s.reset_in = min(s.reset_in, BUSY_RETRY)


def _release(held: list[tuple[str, int]]) -> None:
    for key, n in held:
        v = IN_FLIGHT.get(key, 0) - n
        if v > 0:
            IN_FLIGHT[key] = v
        else:
            IN_FLIGHT.pop(key, None)
    held.clear()


class QuotaDown(StoreDown):
    """The quota database failed (not the counter store)."""


class _State:
    __slots__ = ("standings", "token_limits", "estimate", "prompt", "choices", "subject", "quota_periods",
                 "quota_shared", "held", "body", "generating", "grown", "unchecked", "slots")

    def __init__(self) -> None:
        self.standings: list[hdr.Standing] = []
        self.token_limits: list[tuple[Limit, tuple[str, ...]]] = []
        self.estimate = 0
        self.prompt = 0
        self.choices = 1       # completions the request asks for (n / legacy best_of): each may use max_tokens
        self.subject: str | None = None
        self.quota_periods: list[str] = []
        self.quota_shared: list[tuple[str, int]] = []  # (counter key, expiry) on a network store
        #: (IN_FLIGHT key, estimate) held while the request runs (taken as the check passes each
        #: counter, so requests checked together see each other's; given back if it is refused)
        self.held: list[tuple[str, int]] = []
        self.body: bytes | None = None  # the body the estimate is of
        self.generating = False  # a request that may generate (its prompt estimated)
        #: admitted again on a prompt a later plugin made larger (``on_forward``): "history" (a
        #: conversation's, memory on) or "plugin" (another one); "" not
        self.grown = ""
        #: let through without the counters (the store down, on_store_error: allow)
        self.unchecked = False
        #: concurrency slots taken: (counter key, lease id on Redis; "" in memory)
        self.slots: list[tuple[str, str]] = []


class RateLimit(Plugin):
    name = NAME
    Config = RateLimitConfig
    uses_database: ClassVar[bool] = True
    #: The quota cache is one for the process (activated(): the last instance would set it).
    route_fixed: ClassVar[tuple[str, ...]] = ("quotas.cache_ttl",)

    def __init__(self, config: RateLimitConfig, services: Any) -> None:
        super().__init__(config, services)
        c = config
        self.store = CounterStore(services, c.storage, c.strategy, c.storage_timeout, c.storage_retry)
        #: IN_FLIGHT keys of this instance's token counters: the store and strategy, then the counter's key
        self._flight = f"{self.store.label}/{c.strategy}/"
        self.ip_prefixes = (c.ipv4_prefix, c.ipv6_prefix)
        self.limits = compile_rules(c.rules, self.ip_prefixes, c.user_header)
        self.request_limits = [x for x in self.limits if x.counts == "requests"]
        self.token_limits = [x for x in self.limits if x.counts == "tokens"]
        self.caps = compile_caps(c.concurrency, self.ip_prefixes, c.user_header)
        self._key_caps: dict[int, Cap] = {}
        self._leases: Leases | None = None if self.store.memory else services.resource(
            f"rate_limit:leases:{async_uri(c.storage)}", Leases, lambda x: x.close())
        self.has_quotas = c.quotas.daily_tokens is not None or c.quotas.monthly_tokens is not None
        self._quota_amounts: dict[str, int | None] | None = (
            {"daily": c.quotas.daily_tokens, "monthly": c.quotas.monthly_tokens} if self.has_quotas else None)
        self._quota: QuotaStore | None = None
        self._overrides: dict[tuple[str, int], Limit] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = services.metric("rate_limit_refused", lambda reg: Counter(
            "gateway_ratelimit_refused_total", "Requests refused by the rate_limit plugin",
            ["rule", "reason"], registry=reg))
        # Each configured rule's series at 0 from the start, so that an ``increase(...) > 0`` alert
        # fires on the first refusal too (the labels as _refuse / _store_down give them).
        for rule in dict.fromkeys([lim.rule for lim in self.limits] + [cap.rule for cap in self.caps]):
            self.refused.labels(rule, "rate_limit_exceeded")
        for period, amount in (("daily-tokens", c.quotas.daily_tokens), ("monthly-tokens", c.quotas.monthly_tokens)):
            if amount is not None:
                self.refused.labels(period, "insufficient_quota")
        if c.on_store_error == "deny":
            self.refused.labels("-", "store_unavailable")
        self.unchecked = services.metric("rate_limit_unchecked", lambda reg: Counter(
            "gateway_ratelimit_unchecked_total", "Requests let through without their rate-limit counters "
            "(on_store_error: allow while the counter store failed or was marked down)", ["storage"],
            registry=reg))
        if c.on_store_error == "allow":
            self.unchecked.labels(self.store.label)
        if not (self.token_limits or self.has_quotas or c.key_overrides):
            self.unused_hooks = frozenset({"on_forward"})  # no token estimate to redo

    # -- lifecycle ---------------------------------------------------------------------------------
    async def startup(self) -> None:
        if not self.store.memory and not await self.store.check():
            gw = self.services.gateway
            rt = gw.runtime if gw is not None else None
            if rt is not None and self not in rt.instances and not any(
                    isinstance(p, RateLimit) and p.config.storage == self.config.storage for p in rt.instances):
                # A reload to a store that cannot be reached (a wrong host or password, or limits
                # added on a store that is down) is refused: the limits would silently not apply
                # (on_store_error: allow). At start, and for the store already in use, the policy
                # applies until it is back.
                raise RuntimeError(f"the counter store {self.store.label} cannot be used "
                                   f"({self.store.last_error}); the running config is kept")
            log.warning("rate_limit: counter store %s cannot be used at start (%s); on_store_error=%s applies "
                        "until it can", self.store.label, self.store.last_error, self.config.on_store_error)
        elif not self.store.memory and self.store.label not in _EVICTION_TOLD:
            evicts = await self.store.eviction()
            if evicts:
                _EVICTION_TOLD.add(self.store.label)
                log.warning("rate_limit: counter store %s evicts keys when full (%s): counters can vanish and the "
                            "limits stop holding, without an error anywhere; give the counters a Redis with "
                            "maxmemory-policy noeviction (or no maxmemory)", self.store.label, evicts)
        if self.has_quotas or self.config.key_overrides:
            self._quota = self.services.resource(
                "rate_limit:quota", lambda: QuotaStore(self.services, self.config.quotas.cache_ttl),
                lambda q: q.close())

    def activated(self) -> None:
        if self._quota is not None:  # shared by every instance: a reload's quota cache_ttl applies now
            self._quota.cache_ttl = self.config.quotas.cache_ttl

    async def shutdown(self) -> None:
        await self.drain(5.0)
        STORE_LOG.flush()  # counts of failed calls and lost charges still held back: said now

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for the token charges still running in the background."""
        if self._tasks:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*list(self._tasks), return_exceptions=True)
            except TimeoutError:
                log.warning("rate_limit: %d token charge(s) still pending at shutdown", len(self._tasks))

    # -- the request -------------------------------------------------------------------------------
    def _override(self, counts: str, amount: int) -> Limit:
        k = (counts, amount)
        lim = self._overrides.get(k)
        if lim is None:
            lim = self._overrides[k] = override_limit(counts, amount, shared_minute_counter(self.limits, counts),
                                                      self.ip_prefixes)
        return lim

    def _applicable(self, ctx: RequestContext) -> tuple[list[Limit], list[Limit], dict[str, int | None] | None]:
        """The request and token limits and the quotas (None: none) that apply to this caller."""
        req, tok, quota = self.request_limits, self.token_limits, self._quota_amounts
        ident = ctx.identity
        if not self.config.key_overrides or not ident:
            return req, tok, quota
        lim = ident.get("limits")
        if not lim or not ident.get("key_id"):
            return req, tok, quota
        rpm, tpm = lim.get("rpm"), lim.get("tpm")
        if isinstance(rpm, int):
            req = [x for x in req if not x.key_minute] + [self._override("requests", rpm)]
        if isinstance(tpm, int):
            tok = [x for x in tok if not x.key_minute] + [self._override("tokens", tpm)]
        daily, monthly = lim.get("daily_tokens"), lim.get("monthly_tokens")
        if isinstance(daily, int) or isinstance(monthly, int):
            quota = dict(quota or {"daily": None, "monthly": None})
            if isinstance(daily, int):
                quota["daily"] = daily
            if isinstance(monthly, int):
                quota["monthly"] = monthly
        return req, tok, quota

    def _caps(self, ctx: RequestContext) -> list[Cap]:
        """The concurrency caps that apply: a key's own ``max_parallel`` replaces the caps keyed by
        key alone (and counts on the first one's counter, so setting it keeps the running count)."""
        caps = self.caps
        ident = ctx.identity
        if self.config.key_overrides and ident and ident.get("key_id"):
            n = (ident.get("limits") or {}).get("max_parallel")
            if isinstance(n, int):
                cap = self._key_caps.get(n)
                if cap is None:
                    shared = next((c.rule for c in caps if c.key_by == ("key",)), "")
                    cap = self._key_caps[n] = key_cap(n, self.ip_prefixes, shared)
                caps = [c for c in caps if c.key_by != ("key",)] + [cap]
        return caps

    async def on_request(self, ctx: RequestContext) -> Reply | None:
        req, tok, quota = self._applicable(ctx)
        # (only requests that may make the upstream generate take slots: a model list or a stored
        # answer read while a key's streams run is not refused)
        caps = self._caps(ctx) if (self.caps or self.config.key_overrides) and generates(ctx.method, ctx.lpath) \
            else ()
        if not (req or tok or quota or caps):
            return None
        st = _State()
        ctx.state[NAME] = st
        try:
            reply = await self._take_slots(ctx, st, caps) if caps else None
            if reply is None:
                reply = await self._check(ctx, st, req, tok, quota)
        except StoreDown:
            _release(st.held)
            self._give_slots(st)
            reply = await self._store_down(ctx, st, quota)
        if reply is not None:
            _release(st.held)
            self._give_slots(st)
        # The headers go on whatever answers: the upstream's response, a refusal, an error.
        if st.standings and self.config.headers:
            ctx.response_headers.update(hdr.build(st.standings))
        return reply

    async def _take_slots(self, ctx: RequestContext, st: _State, caps: list[Cap]) -> Reply | None:
        """A slot of every cap that applies, or a refusal (the slots already taken given back)."""
        deadline = None if self.store.memory else time.monotonic() + self.store.timeout
        for cap in caps:
            key = "/".join(identifiers(cap, ctx))  # type: ignore[arg-type]
            if self._leases is None:
                ok, n = take_memory(key, cap.max)
                lease = ""
            else:
                key = PREFIX + key
                ok, n, lease = await self._leases.acquire(self.store, key, cap.max, deadline)
            if not ok:
                self._give_slots(st)
                return self._refuse_running(ctx, cap, n)
            st.slots.append((key, lease))
        return None

    def _give_slots(self, st: _State) -> None:
        if not st.slots:
            return
        if self._leases is None:
            for key, _ in st.slots:
                give_memory(key)
        else:
            for key, lease in st.slots:  # (in the background: the connection's next request does not wait)
                t = asyncio.create_task(self._leases.release(self.store, key, lease))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
        st.slots = []

    def _refuse_running(self, ctx: RequestContext, cap: Cap, running: int) -> Reply:
        ctx.refusal = {"plugin": NAME, "type": "rate_limit", "reason": "rate_limit_exceeded", "limit": cap.label}
        self.refused.labels(cap.rule, "rate_limit_exceeded").inc()
        msg = (f"Too many requests at once: rule {cap.rule} allows {cap.max} running at once, and {running} "
               f"{'is' if running == 1 else 'are'} running. Retry when one of them ends.")
        return Reply.error(429, msg, "requests", "rate_limit_exceeded",
                           headers={"Retry-After": "1", "retry-after-ms": str(BUSY_RETRY_MS)})

    async def _check(self, ctx: RequestContext, st: _State, req: list[Limit], tok: list[Limit],
                     quota: dict[str, int | None] | None) -> Reply | None:
        store = self.store
        deadline = None if store.memory else time.monotonic() + store.timeout
        if tok or quota:
            ctx.want_usage()
            reply = await self._admit(ctx, st, req, tok, quota, deadline)
            if reply is not None:
                return reply
        if req:
            if len(req) > 1:
                return await self._hit_in_turn(ctx, st, req, deadline)
            lim = req[0]
            ids = identifiers(lim, ctx)
            ok, s = self._hit_memory(lim, ids) if store.memory else await self._hit(lim, ids, deadline)
            if s is not None:  # (always, for a refusal)
                st.standings.append(s)
            if not ok:
                assert s is not None
                return self._refuse(ctx, lim, s, "rate_limit_exceeded", 1)
        return None

    async def _admit(self, ctx: RequestContext, st: _State, req: list[Limit], tok: list[Limit],
                     quota: dict[str, int | None] | None, deadline: float | None) -> Reply | None:
        """The token rules and quotas: does the request's estimate fit what is left (less what the
        requests still running hold)? Holds it while the request runs; a refusal otherwise."""
        store = self.store
        body = ctx.json
        st.body = ctx.body
        # GET /v1/models and the like generate nothing; nor does counting a prompt's tokens
        # (the Messages API's /v1/messages/count_tokens, the Responses API's /input_tokens), nor
        # reading or deleting a stored answer, cancelling a job (a response, a batch), nor a POST
        # without a body, nor storing a file (/files, /uploads): none of these is refused for
        # want of tokens. A POST with a JSON body may use tokens, and so may one with another
        # body (an audio or image upload, or JSON the gateway cannot read that a lax backend
        # may): with nothing to estimate, these need at least one token left.
        lp = ctx.lpath.rstrip("/")
        free = not generates(ctx.method, ctx.lpath)
        generating = not free and isinstance(body, dict)
        consumes = generating or (not free and bool(ctx.body) and not any(f in lp for f in _FILE_STORE))
        embeddings = lp.endswith(NO_COMPLETION)  # (read, not generated: no completion to allow for)
        # best_of is the legacy completions' alone (the chat API has none, and ignores it)
        legacy = lp.endswith("/completions") and not lp.endswith("/chat/completions")
        st.generating = generating
        if generating:
            st.prompt = prompt_estimate(body)
            st.choices = choices(body, legacy)

        def estimate(default: int) -> int:
            """Prompt plus the completion the request allows (``default`` when it sets none), for
            each of its choices: n=20 with max_tokens=80 may generate 1600 tokens."""
            return st.prompt + completion_estimate(body, 0 if embeddings else default, legacy) if generating else 0

        est = st.estimate = estimate(self.config.estimate_default_max_tokens)
        for lim in tok:
            st.token_limits.append((lim, identifiers(lim, ctx)))
        short: list[tuple[Limit, tuple[str, ...], hdr.Standing, int]] = []
        for lim, ids in st.token_limits:
            reset, remaining = await store.stats(lim.item, ids, deadline)
            key = self._flight + lim.item.key_for(*ids)
            s = self._standing(lim, remaining, reset)
            need = est if lim.max_tokens_default is None else estimate(lim.max_tokens_default)
            _held(s, key, need)  # (what requests still running may use is not left: headers say so)
            st.standings.append(s)
            if consumes and s.remaining < max(need, 1):
                short.append((lim, ids, s, need))
            elif need:
                _hold(st.held, key, need)
        if short:
            lim, s, need = await self._tokens_short(short, deadline)
            if need <= lim.item.amount and quota and self._quota is not None:
                # a quota that is used up too and frees later refuses instead (a client that
                # retries when a token rule frees would be refused by the quota then)
                try:
                    q = await self._check_quota(ctx, st, quota, est, deadline, consumes)
                except QuotaDown:  # (counted) the token rule's refusal stands
                    q = None
                if q is not None and (est > q.limit or q.reset_in > s.reset_in):
                    return await self._refuse_later(ctx, st, req, deadline, None, q, "insufficient_quota", est)
            return await self._refuse_later(ctx, st, req, deadline, lim, s, "rate_limit_exceeded", need)
        if quota and self._quota is not None:
            try:
                q = await self._check_quota(ctx, st, quota, est, deadline, consumes)
            except QuotaDown:
                if self.config.on_store_error != "allow":
                    raise
                # (counted in store_errors{storage="database"}) the counters' rules still apply
                st.standings = [s for s in st.standings if s.counts != "quota"]
                q = None
            if q is not None:
                return await self._refuse_later(ctx, st, req, deadline, None, q, "insufficient_quota", est)
        return None

    async def on_forward(self, ctx: RequestContext) -> Reply | None:
        """A plugin after this one in the chain made the prompt larger (conversations' memory adds
        the stored history): the token rules and quotas admit the request again, on the prompt as
        it goes upstream, and hold that estimate instead of the one of the client's own messages.
        (Its request rules counted it already, in ``on_request``.)"""
        st: _State | None = ctx.state.get(NAME)
        if st is None or not st.generating or st.body is ctx.body:
            return None
        body = ctx.json
        if not isinstance(body, dict) or prompt_estimate(body) <= st.prompt:
            return None
        _, tok, quota = self._applicable(ctx)
        if st.unchecked:  # (the counter store was down at on_request: let through without them, counted once)
            tok = []
        _release(st.held)
        old = st.standings
        for name in hdr.build(old):  # (rebuilt below: a header none of the new standings gives goes)
            ctx.response_headers.pop(name, None)
        requests = [s for s in old if s.counts == "requests"]
        st.standings, st.quota_periods, st.quota_shared = [], [], []
        if not st.unchecked:  # (let through unchecked, its token rules are still charged when it ends)
            st.token_limits = []
        plan = ctx.state.get("conversations")
        st.grown = "history" if getattr(plan, "replayed", False) else "plugin"
        deadline = None if self.store.memory else time.monotonic() + self.store.timeout
        try:
            reply = await self._admit(ctx, st, [], tok, quota, deadline)
        except StoreDown:
            _release(st.held)
            reply = None if st.unchecked else await self._store_down(ctx, st, quota)
        if reply is not None:
            _release(st.held)
        if ctx.state.get(NAME) is st:  # (not a 503 for a store down, with on_store_error: deny)
            st.standings.extend(requests)
        if st.standings and self.config.headers:
            ctx.response_headers.update(hdr.build(st.standings))
        return reply

    async def _refuse_later(self, ctx: RequestContext, st: _State, req: list[Limit], deadline: float | None,
                            lim: Limit | None, s: hdr.Standing, reason: str, need: int) -> Reply:
        """Refuse by a token rule or quota (``lim``, ``s``), unless a request rule is used up too and
        frees later: then by that one (a client that retries when the tokens free would be refused
        by it). A request it can never fit is refused as such. The request rules are read, not
        counted; their standings go in the headers."""
        never = need > (s.limit if lim is None else lim.item.amount)
        if req and not never:
            try:
                for r in req:
                    reset, remaining = await self.store.stats(r.item, identifiers(r, ctx), deadline)
                    rs = self._standing(r, remaining, reset)
                    st.standings.append(rs)
                    if remaining < 1 and rs.reset_in > s.reset_in:
                        lim, s, reason, need = r, rs, "rate_limit_exceeded", 1
            except StoreDown:  # (counted) the refusal found stands
                pass
        return self._refuse(ctx, lim, s, reason, need)

    async def _tokens_short(self, short: list[tuple[Limit, tuple[str, ...], hdr.Standing, int]],
                            deadline: float | None) -> tuple[Limit, hdr.Standing, int]:
        """Token rules this request does not fit: the one that refuses it is the one it fits last
        (a client retrying when told must fit them all); one it can never fit (the estimate over
        its limit) first. Returns that rule, its standing and what the request needs of it."""
        never = [x for x in short if x[3] > x[0].item.amount]
        if never:
            lim, _, s, need = never[0]
            return lim, s, need
        worst, worst_wait = short[0], -1.0
        for lim, ids, s, need in short:
            try:
                wait = await self.store.wait_for(lim.item, ids, need, deadline)
            except StoreDown:  # (a failed call is counted by the store) the window's reset time will do
                wait = None
            w = max(s.reset_in, wait if wait is not None else 0.0)
            if w > worst_wait:
                worst, worst_wait = (lim, ids, s, need), w
                if wait is not None and wait > s.reset_in:
                    s.reset_in = wait + 0.02  # (a little over: a client that retries right then must fit)
        lim, _, s, need = worst
        return lim, s, need

    async def _hit_in_turn(self, ctx: RequestContext, st: _State, req: list[Limit],
                           deadline: float | None) -> Reply | None:
        """Several rules: a request one of them refuses must not use up the others (a key over its
        own limit would eat the per-IP or per-model budget of everyone else). Read every rule's
        standing (together); refuse without counting if one has nothing left; otherwise count rule
        by rule, the one with the least left first, and stop at a refusal. In memory nothing runs
        in between, so no refused request is counted anywhere; on a shared store (Redis), where
        other instances count in between, requests arriving at once that a rule refuses are
        counted by no rule with less left."""
        keyed = [(lim, identifiers(lim, ctx)) for lim in req]
        stats = await asyncio.gather(*[self.store.stats(lim.item, ids, deadline) for lim, ids in keyed])
        standing = [self._standing(lim, remaining, reset) for (lim, _), (reset, remaining) in zip(keyed, stats)]
        short = [i for i, s in enumerate(standing) if s.remaining < 1]
        refused = max(short, key=lambda i: standing[i].reset_in) if short else None
        if refused is None:
            for i in sorted(range(len(keyed)), key=lambda i: standing[i].remaining):
                ok, s = await self._hit(*keyed[i], deadline)
                if s is not None:
                    standing[i] = s
                if not ok:
                    refused = i
                    break
        if refused is not None or self.config.headers:
            st.standings.extend(standing)
        if refused is None:
            return None
        return self._refuse(ctx, keyed[refused][0], standing[refused], "rate_limit_exceeded", 1)

    def _hit_memory(self, lim: Limit, ids: tuple[str, ...]) -> tuple[bool, hdr.Standing | None]:
        """In-process counters: straight to the library's synchronous strategy."""
        limiter = self.store.limiter
        ok = limiter.hit(lim.item, *ids)
        if ok and not self.config.headers:
            return ok, None
        ws = limiter.get_window_stats(lim.item, *ids)
        return ok, self._standing(lim, ws[1], ws[0])

    async def _hit(self, lim: Limit, ids: tuple[str, ...], deadline: float | None) -> tuple[bool, hdr.Standing | None]:
        store = self.store
        ok = await store.hit(lim.item, ids, 1, deadline)
        if ok and not self.config.headers:
            return ok, None  # no headers wanted: one store call instead of two
        reset, remaining = await store.stats(lim.item, ids, deadline)
        return ok, self._standing(lim, remaining, reset)

    @staticmethod
    def _standing(lim: Limit, remaining: int, reset: float) -> hdr.Standing:
        return hdr.Standing(lim.policy_name, lim.counts, lim.item.amount, remaining,
                            max(0.0, reset - time.time()), lim.window, lim.policy)

    async def _check_quota(self, ctx: RequestContext, st: _State, quota: dict[str, int | None],
                           est: int, deadline: float | None, consumes: bool = True) -> hdr.Standing | None:
        """The standing of the quota that refuses the request (None: they all let it through): of
        several, one it can never fit, else the one that frees last (a used-up daily quota on the
        last day of a used-up monthly one refuses until the month ends, not until midnight).

        The quotas' usage is the database's (read through a cache, plus this instance's charges
        not yet written). On a network store (Redis) every instance also adds its charges at once
        to a shared counter per quota period, so one instance sees another's usage at once, not
        after ``cache_ttl``: the larger of the two figures counts. The counter only adds to the
        database's record; if it is lost (a flushed or restarted Redis) or cannot be read, the
        database's figure stands."""
        assert self._quota is not None
        k = ctx.key_id
        st.subject = f"key:{k}" if k else f"ip:{ip_key(ctx.client_ip, *self.ip_prefixes)}"
        (day, day_left), (month, month_left) = periods()
        timeout = max(1.0, self.store.timeout)
        short: list[hdr.Standing] = []
        # (label, amount, period, seconds left in it, window, the period's key: the shared counter's
        # on a network store, and IN_FLIGHT's)
        applies = [(label, amount, period, left, window, f"quota/{st.subject}/{period}")
                   for label, amount, period, left, window in (
                       ("daily-tokens", quota["daily"], day, day_left, 86400),
                       ("monthly-tokens", quota["monthly"], month, month_left, 31 * 86400)) if amount is not None]
        # Every period is charged, whichever read fails (a request let through meanwhile, with
        # on_store_error: allow, is still the month's as much as the day's).
        st.quota_periods.extend(a[2] for a in applies)
        if not self.store.memory:  # (each gone a day after its period)
            st.quota_shared.extend((a[5], math.ceil(a[3]) + 86400) for a in applies)
        for label, amount, period, left, window, key in applies:
            try:
                used = await self._quota.used(st.subject, period, timeout)
            except Exception as e:  # the database is a store too: same policy
                self.store.errors.labels("database", "timeout" if isinstance(e, TimeoutError) else "error").inc()
                kind = type(e).__name__  # (an outage fails every request: one line per 10 s, with a count)
                STORE_LOG.event(f"quota:{kind}", 1, f"rate_limit: %d quota read(s) failed ({kind})")
                raise QuotaDown("quota read failed") from None
            if not self.store.memory:
                try:
                    used = max(used, await self.store.usage(key, deadline))
                except StoreDown:  # (counted by the store) the database's figure stands
                    pass
            s = hdr.Standing(label, "quota", amount, amount - used, left, window)
            _held(s, key, est)
            st.standings.append(s)
            if consumes and s.remaining < max(est, 1):
                short.append(s)
            elif est:
                _hold(st.held, key, est)
        if not short:
            return None
        never = [s for s in short if est > s.limit]
        return never[0] if never else max(short, key=lambda s: s.reset_in)

    def _refuse(self, ctx: RequestContext, lim: Limit | None, s: hdr.Standing, reason: str,
                needed: int) -> Reply:
        retry = max(1, math.ceil(s.reset_in))
        s.refuses = True  # (the headers show it)
        never = needed > (s.limit if lim is None else lim.item.amount)  # it would not fit an empty budget
        st: _State | None = ctx.state.get(NAME)
        n = st.choices if st is not None else 1
        per = f"max_tokens x {n} choices" if n > 1 else "max_tokens"
        prompt, shorten, added = "prompt", "shorten the prompt", ""
        if st is not None and st.grown == "history":  # (a memory turn: the history was not the client's to see)
            prompt = "prompt as forwarded, with the history the gateway added,"
            shorten = "send less history (conversations' memory.max_tokens)"
            added = " (with the history the gateway added to the prompt)"
        elif st is not None and st.grown:
            prompt = "prompt as forwarded, with what a plugin after rate_limit added,"
            added = " (with what a plugin after rate_limit added to the prompt)"
        if not never and s.remaining < needed <= s.remaining + s.held:
            # It fits what is left, not beside what requests still running may use: they end soon.
            what, limit = (f"your {s.name.replace('-', ' ')} quota", s.limit) if lim is None else \
                (f"rule {lim.label}", lim.item.amount)
            label = f"{s.name} quota ({s.limit} tokens)" if lim is None else lim.label
            reason, err_type = "rate_limit_exceeded", "tokens"
            msg = (f"Too many requests at once for {what}: limit {limit}, used {limit - s.remaining - s.held}, "
                   f"{s.held} held by requests still running, requested about {needed}{added}. Retry in {retry}s.")
        elif lim is None and never:
            label = f"{s.name} quota ({s.limit} tokens)"
            msg = (f"Request too large for your {s.name.replace('-', ' ')} quota: about {needed} tokens "
                   f"estimated ({prompt} plus {per}), more than the quota of {s.limit}. Lower max_tokens"
                   f"{' or n' if n > 1 else ''} or {shorten}, or ask for a larger quota.")
            err_type = "insufficient_quota"
        elif lim is None:
            label = f"{s.name} quota ({s.limit} tokens)"
            msg = (f"You exceeded your {s.name.replace('-', ' ')} quota: limit {s.limit}, used "
                   f"{s.limit - s.remaining}, requested about {needed}{added}. Retry in {retry}s or ask for a "
                   f"larger quota.")
            err_type = "insufficient_quota"
        elif never:
            label = lim.label
            err_type = "tokens"
            msg = (f"Request too large for rule {lim.label}: about {needed} tokens estimated ({prompt} plus "
                   f"{per}), more than the limit of {lim.item.amount}. Lower max_tokens"
                   f"{' or n' if n > 1 else ''} or {shorten}.")
        else:
            label = lim.label
            unit = "requests" if lim.counts == "requests" else "tokens"
            msg = (f"Rate limit reached for {unit} on rule {lim.label}: limit {lim.item.amount}, remaining "
                   f"{max(0, s.remaining)}, requested {needed}{added}. Retry in {retry}s.")
            err_type = unit
        ctx.refusal = {"plugin": NAME, "type": "rate_limit", "reason": reason, "limit": label}
        self.refused.labels(lim.rule if lim else s.name, reason).inc()
        if never:
            # It will never fit: no Retry-After, and the OpenAI SDKs are told not to retry it.
            return Reply.error(429, msg, err_type, reason, headers={"x-should-retry": "false"})
        # retry-after-ms lets the OpenAI SDKs wait exactly as long as needed (they prefer it).
        headers = {"Retry-After": str(retry), "retry-after-ms": str(max(1, math.ceil(s.reset_in * 1000)))}
        if s.reset_in > SDK_MAX_WAIT:
            # Longer than the SDKs wait: some would retry at once on their own back-off instead
            # (openai-node), and be refused again; the wait stays in Retry-After for the caller.
            headers["x-should-retry"] = "false"
        return Reply.error(429, msg, err_type, reason, headers=headers)

    async def _store_down(self, ctx: RequestContext, st: _State, quota: dict[str, int | None] | None) -> Reply | None:
        """The counter store failed (or is marked down). ``allow``: the request goes on without its
        counters (counted), but the quotas, which are the database's, still apply and are still
        charged, and its token charges are still tried afterwards (counted as dropped if the store
        is still down). ``deny``: 503, as for a quota read that fails (with ``allow``, such a
        failure leaves the counters' rules to decide: see ``_check``)."""
        if self.config.on_store_error == "allow":
            st.unchecked = True
            st.standings = [s for s in st.standings if s.counts == "quota"]
            if quota and self._quota is not None and not st.quota_periods:
                try:
                    q = await self._check_quota(ctx, st, quota, st.estimate, None)
                except QuotaDown:  # the database failed too (counted): the request goes on
                    st.standings, q = [], None
                if q is not None:
                    return self._refuse(ctx, None, q, "insufficient_quota", st.estimate)
            self.unchecked.labels(self.store.label).inc()
            return None
        self._give_slots(st)  # (on_forward: the request's slots were taken in on_request)
        ctx.state.pop(NAME, None)
        st.standings = []
        ctx.refusal = {"plugin": NAME, "type": "rate_limit", "reason": "store_unavailable", "limit": None}
        self.refused.labels("-", "store_unavailable").inc()
        return Reply.error(503, "Rate limiting is temporarily unavailable; retry shortly.", "server_error",
                           "rate_limit_unavailable", headers={"Retry-After": "1"})

    # -- the response ------------------------------------------------------------------------------
    async def on_complete(self, ctx: RequestContext) -> None:
        st: _State | None = ctx.state.get(NAME)
        if st is None:
            return
        if st.held:
            _release(st.held)
        if st.slots:
            self._give_slots(st)
        if ctx.t_upstream is None or not (st.token_limits or st.quota_periods):
            return
        tokens = used_tokens(ctx, st.prompt, st.estimate)
        if tokens <= 0:
            return
        if st.subject is not None and self._quota is not None:
            for period in st.quota_periods:
                self._quota.charge(st.subject, period, tokens)
        if st.token_limits or st.quota_shared:
            t = asyncio.create_task(self._charge(st.token_limits, tokens, st.quota_shared))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _charge(self, limits: list[tuple[Limit, tuple[str, ...]]], tokens: int,
                      quota_shared: list[tuple[str, int]]) -> None:
        deadline = time.monotonic() + self.store.timeout
        dropped, why = 0, ""
        for key, expiry in quota_shared:
            try:
                await self.store.add_usage(key, expiry, tokens, deadline)
            except StoreDown:  # (counted by the store) the database has these tokens all the same
                pass
        for lim, ids in limits:
            try:
                await self.store.charge(lim.item, ids, tokens, deadline)
            except StoreDown as e:  # (once the store is marked down, the next ones fail at once)
                dropped, why = dropped + 1, str(e)
        if dropped:  # those tokens go uncounted: said in a metric and a (throttled) log line
            self.store.dropped(dropped, why)


#: Where a POST stores a file (no model reads it then): not refused for want of tokens.
_FILE_STORE = ("/files", "/uploads")


def used_tokens(ctx: RequestContext, prompt_estimate: int, estimate: int | None = None) -> int:
    """Tokens the exchange cost: the upstream's usage when it reported one; without one, the prompt
    estimate plus what was delivered: one token per stream delta, or for a whole JSON answer its
    text (content and tool calls, of every choice) at four characters per token; a request the
    client gave up on before the response head, or whose head did not come in time (504
    upstream_timeout: the upstream had the prompt), the prompt estimate, unless the upstream never
    got it (no connection came in time: a full pool, a connect timeout); a 2xx answer the gateway could
    not read (a backend's own API, such as Ollama's NDJSON /api/chat), the whole ``estimate`` the
    request was admitted with (prompt plus the completion it allows), so that such answers cannot
    generate without limit for a token each (a stream, even one that said nothing or only an
    error, is read: its deltas); an answer that is audio, an image or a file, the prompt estimate;
    a Responses API job left running upstream (background mode), its whole ``estimate``. Error
    answers cost nothing."""
    c = ctx.completion
    if c is not None and c.prompt_estimate is not None:
        # (a stream that reported no prompt count: the estimate every ledger records, of the
        # prompt as it went upstream, a conversation's history included)
        prompt_estimate = c.prompt_estimate
    if c is None:  # no answer came: a request cut before the response head still cost the prefill
        if not cut_while_sent(ctx):
            return 0
        # (the estimate every ledger records, of the prompt as it went upstream)
        return ctx.cut_estimate if ctx.cut_estimate is not None else prompt_estimate
    if isinstance(c.usage, dict):
        total = c.total_tokens
        if total is not None:
            return total
        p, q = c.prompt_tokens, c.completion_tokens
        if p is not None or q is not None:  # what was reported, the estimate for what was not
            return (p if p is not None else prompt_estimate) + (q if q is not None else c.deltas)
    ok = ctx.status is not None and 200 <= ctx.status < 300
    if ok and ctx.lpath.rstrip("/").endswith("/responses"):
        j = ctx.json
        if isinstance(j, dict) and truthy(j.get("background")):
            # A Responses API job left to run upstream (background mode) without a usage report
            # here (answered "queued", or its stream cut: the job runs on to its end all the same):
            # what it generates never comes through this request (reading it later is not
            # charged): what it was admitted for, or what was relayed if more.
            return max(prompt_estimate + c.deltas, estimate or 0)
    if c.deltas or ctx.outcome in _CUT or (ok and c.kind == "sse"):  # (a stream is read: its deltas counted)
        return prompt_estimate + c.deltas
    if c.kind == "json" and c.done and ok:
        return prompt_estimate + (_answer_chars(c) + 3) // 4
    if ok:
        if c.error or c.binary:
            # an error the upstream answered with a success status: the prompt at most; audio, an
            # image or a file (speech from text, say): no text to count, the prompt was read
            return prompt_estimate
        # an answer in a shape the gateway could not read: what the request was admitted for
        return max(prompt_estimate, estimate or 0)
    return 0


def _answer_chars(c: Any) -> int:
    """Characters of a whole JSON answer's text (content and tool calls) over every choice: an
    answer to n=4 generated four texts, not one (``c.content`` is choice 0's alone)."""
    raw = c.raw
    chs = raw.get("choices") if isinstance(raw, dict) else None
    if not isinstance(chs, list):  # the Responses API's answer (no choices): its text
        return _text_chars(c.content, c.tool_calls)
    chars = 0
    for ch in chs:
        if not isinstance(ch, dict):
            continue
        msg = ch.get("message")
        if isinstance(msg, dict):
            tcs = msg.get("tool_calls")
            chars += _text_chars(msg.get("content"), tcs if isinstance(tcs, list) else [])
        else:  # legacy completions: {"text": ...}
            chars += _text_chars(ch.get("text"), [])
    return chars


def _text_chars(content: Any, tool_calls: list[Any]) -> int:
    chars = len(content) if isinstance(content, str) else 0
    for tc in tool_calls:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict):
            chars += len(str(fn.get("name") or "")) + len(str(fn.get("arguments") or ""))
    return chars


#: Outcomes of an exchange cut short: the upstream did (some of) the work.
_CUT = ("client_disconnected", "gateway_shutdown", "upstream_disconnected", "upstream_timeout")
