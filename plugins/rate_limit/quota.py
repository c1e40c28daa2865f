"""Token quotas per key per UTC day / month, persisted in the database.

One row per (subject, period) with the tokens used. Reads at request time come from a small
in-memory cache (refreshed every ``cache_ttl`` seconds); charges are added to the cache at once and
written in batches by a background writer (an upsert that adds), so the request path never waits on
a write and the usage survives a restart.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any, Sequence

from sqlalchemy import BigInteger, DateTime, String, delete, select, tuple_
from sqlalchemy.orm import Mapped, mapped_column

from gateway.clock import deletions_allowed
from gateway.db import Base

log = logging.getLogger("gateway.rate_limit")

#: Seconds between two deletions of the quota rows of past periods, and rows per transaction.
PRUNE_EVERY = 3600.0
PRUNE_ROWS = 5000


class QuotaUsage(Base):
    __tablename__ = "rate_limit_quota_usage"

    subject: Mapped[str] = mapped_column(String(200), primary_key=True)  # "key:<id>" or "ip:<addr>"
    period: Mapped[str] = mapped_column(String(16), primary_key=True)    # "d:2026-11-25" or "m:2026-11"
    tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)


def periods(now: dt.datetime | None = None) -> tuple[tuple[str, float], tuple[str, float]]:
    """((day period, seconds to its end), (month period, seconds to its end)) in UTC."""
    now = now or dt.datetime.now(dt.timezone.utc)
    tomorrow = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    next_month = (first + dt.timedelta(days=32)).replace(day=1)
    return ((f"d:{now:%Y-%m-%d}", (tomorrow - now).total_seconds()),
            (f"m:{now:%Y-%m}", (next_month - now).total_seconds()))


class _Entry:
    __slots__ = ("db", "pending", "inflight", "loaded", "writes")

    def __init__(self) -> None:
        self.db = 0          # tokens in the database as last read (plus our writes since)
        self.pending = 0     # charged here, not yet written
        self.inflight = 0    # charged here, being written (committed or not: unknown until it returns)
        self.loaded = 0.0    # monotonic time of the last read (0 = never)
        self.writes = 0      # our batches committed for this entry (to spot one racing a read)


class QuotaStore:
    """Shared by plugin instances and reloads (a process-wide resource)."""

    def __init__(self, services: Any, cache_ttl: float) -> None:
        self.db = services.db
        self.cache_ttl = cache_ttl
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.writer = services.writer("rate_limit_quota", self._write, batch_size=500, flush_interval=0.2)
        self.writer.start()
        self._pruning = asyncio.create_task(self._prune_periods_every(PRUNE_EVERY), name="rate_limit:quota-prune")

    async def used(self, subject: str, period: str, timeout: float) -> int:
        """Tokens used in the period (database + not yet written here)."""
        k = (subject, period)
        e = self._cache.get(k)
        if e is None or time.monotonic() - e.loaded > self.cache_ttl:
            lock = self._locks.setdefault(k, asyncio.Lock())
            async with lock:
                e = self._cache.get(k)
                if e is None or time.monotonic() - e.loaded > self.cache_ttl:
                    if e is None:
                        e = self._cache[k] = _Entry()
                    writes, inflight = e.writes, e.inflight
                    async with asyncio.timeout(timeout):
                        async with self.db.session() as s:
                            v = int((await s.execute(select(QuotaUsage.tokens).where(
                                QuotaUsage.subject == subject, QuotaUsage.period == period))).scalar() or 0)
                    if e.writes == writes and not inflight and not e.inflight:
                        e.db = v
                        e.loaded = time.monotonic()
                    else:
                        # One of our batches was being written while this read ran: the value read
                        # may or may not hold it. Batches that finished are in e.db already; one
                        # still being written is counted in e.inflight, so take it off what was
                        # read. Both are lower bounds of what the database holds without the
                        # batch in flight: keep the larger, never count a batch twice, and read
                        # again on the next request.
                        e.db = max(e.db, v - e.inflight)
                        e.loaded = 0.0
                    self._prune()
        return e.db + e.inflight + e.pending

    def charge(self, subject: str, period: str, tokens: int) -> None:
        if tokens <= 0:
            return
        k = (subject, period)
        e = self._cache.get(k)
        if e is None:
            e = self._cache[k] = _Entry()
        e.pending += tokens
        if not self.writer.put_nowait((subject, period, tokens)):
            e.pending -= tokens

    async def _write(self, batch: Sequence[tuple[str, str, int]]) -> None:
        sums: dict[tuple[str, str], int] = {}
        for subject, period, n in batch:
            sums[(subject, period)] = sums.get((subject, period), 0) + n
        now = dt.datetime.now(dt.timezone.utc)
        if self.db.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        rows = [{"subject": s, "period": p, "tokens": n, "updated_at": now} for (s, p), n in sums.items()]
        stmt = insert(QuotaUsage).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=[QuotaUsage.subject, QuotaUsage.period],
            set_={"tokens": QuotaUsage.tokens + stmt.excluded.tokens, "updated_at": stmt.excluded.updated_at})
        # From here until the outcome is known, a read of these rows may or may not see the batch:
        # its tokens move from pending to inflight, and a read that overlaps knows it.
        moved: list[tuple[_Entry, int]] = []
        for k, n in sums.items():
            e = self._cache.get(k)
            if e is None:
                e = self._cache[k] = _Entry()
            m = min(n, e.pending)
            e.pending -= m
            e.inflight += m
            moved.append((e, m))
        done = False
        try:
            async with self.db.session() as s:
                await s.execute(stmt)
                await s.commit()
                done = True
                for (e, m), n in zip(moved, sums.values()):
                    e.inflight -= m
                    e.db += n
                    e.writes += 1
        finally:
            if not done:  # not written (the writer retries or counts it): charged here still
                for e, m in moved:
                    e.inflight -= m
                    e.pending += m

    def _prune(self) -> None:
        if len(self._cache) > 50000:
            cutoff = time.monotonic() - self.cache_ttl
            for k in [k for k, e in self._cache.items() if e.loaded < cutoff and not e.pending and not e.inflight]:
                self._cache.pop(k, None)
                self._locks.pop(k, None)

    async def _prune_periods_every(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            if not deletions_allowed("quota pruning"):
                continue
            try:
                n = await self.prune_periods()
                if n:
                    log.info("rate_limit: %d quota row(s) of past periods deleted", n)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # (the database down: the next run deletes them)
                log.warning("rate_limit: deleting the quota rows of past periods failed: %s: %s",
                            type(e).__name__, str(e)[:200])

    async def prune_periods(self, now: dt.datetime | None = None) -> int:
        """Delete the rows of periods that are over: days before yesterday, months before the last
        (a charge written late, just after midnight, still finds its row). At most PRUNE_ROWS rows
        per transaction, so a backlog of millions (a row per client address and day) does not hold
        the database's write lock for long. Returns how many were deleted."""
        now = now or dt.datetime.now(dt.timezone.utc)
        yesterday = now - dt.timedelta(days=1)
        last_month = (now.replace(day=1) - dt.timedelta(days=1))
        old = ((QuotaUsage.period.like("d:%") & (QuotaUsage.period < f"d:{yesterday:%Y-%m-%d}"))
               | (QuotaUsage.period.like("m:%") & (QuotaUsage.period < f"m:{last_month:%Y-%m}")))
        total = 0
        while True:
            async with self.db.engine.begin() as conn:
                keys = (await conn.execute(select(QuotaUsage.subject, QuotaUsage.period).where(old)
                                           .limit(PRUNE_ROWS))).all()
                if keys:
                    await conn.execute(delete(QuotaUsage).where(
                        tuple_(QuotaUsage.subject, QuotaUsage.period).in_([tuple(k) for k in keys])))
            total += len(keys)
            if len(keys) < PRUNE_ROWS:
                return total
            if self.db.is_sqlite:
                await asyncio.sleep(0.05)  # (the writers get the lock between two transactions)

    async def close(self) -> None:
        self._pruning.cancel()
        await self.writer.close()
