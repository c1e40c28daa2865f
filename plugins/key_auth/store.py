"""Key storage: the SQLAlchemy models and every query the plugin, the admin API and the CLI make.

Only this module knows SQL. Two tables:

``api_keys``
    One row per key id: attributes, the hash of the current secret and, during a rotation's grace
    period, the hash of the previous one with the time it stops working.
``api_key_usage_daily``
    Usage rolled up per key per UTC day (requests, prompt tokens, completion tokens); written in
    batches by an upsert, so "usage for key X this month" reads at most 31 small rows.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import (JSON, BigInteger, Date, DateTime, Index, Integer, String, TypeDecorator, func, or_, select, text,
                        update)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.orm.exc import StaleDataError

from gateway.db import Base, Database, DatabaseError, row_chunks

from .keys import format_key, hash_secret, imported_token_hash, key_id_of, new_key_id, new_secret

UTC = dt.timezone.utc
LIMIT_FIELDS = ("rpm", "tpm", "daily_tokens", "monthly_tokens", "max_parallel")
# Largest value each limit column holds (rpm/tpm are INTEGER, the token quotas BIGINT; max_parallel
# as rate_limit's concurrency caps).
LIMIT_MAX = {"rpm": 2**31 - 1, "tpm": 2**31 - 1, "daily_tokens": 2**63 - 1, "monthly_tokens": 2**63 - 1,
             "max_parallel": 1_000_000}


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    owner: Mapped[str] = mapped_column(String(200), index=True)
    team: Mapped[str | None] = mapped_column(String(200), nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    scopes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    daily_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    monthly_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_parallel: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: SHA-256 (hex) of a key issued elsewhere that its clients keep using (``import_hash``): the
    #: whole token, unsalted, as other gateways store theirs, so their hashes can be imported as
    #: they are. Unique; NULL for the gateway's own keys.
    import_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: When the imported token stops: set by the key's first rotation (the end of its grace; later
    #: rotations keep it), NULL until then (it works).
    import_valid_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    prev_secret_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    prev_valid_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rotated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    # Every change of a key (update, rotate, revoke) sets updated_at, and writes only if updated_at
    # is still what was read: two changes at once (two admins, instances, the CLI) cannot write
    # over each other (a scopes list narrowed by one put back by the other, two rotations each
    # handing out a secret of which one never worked). The one that finds the row changed reads
    # it again and reapplies (KeyStore._change). (last_used_at is moved by a statement of its own.)
    __mapper_args__ = {"version_id_col": updated_at, "version_id_generator": False}
    __table_args__ = (Index("ux_api_keys_import_hash", "import_hash", unique=True),)


class KeyUsageDaily(Base):
    __tablename__ = "api_key_usage_daily"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class KeyAuthSetting(Base):
    """What the stored keys were made with: ``pepper`` holds the fingerprint of the pepper the
    gateway last started with (see :func:`keys.pepper_fingerprint`), checked by the CLI."""

    __tablename__ = "key_auth_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


def status_of(row: ApiKey, now: dt.datetime | None = None) -> str:
    now = now or utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def public(row: ApiKey) -> dict[str, Any]:
    """The key as the admin API and the CLI show it: never a secret, never a hash."""
    now = utcnow()
    grace = row.prev_valid_until if row.prev_secret_hash and row.prev_valid_until and \
        row.prev_valid_until > now else None
    return {
        "id": row.id, "name": row.name, "owner": row.owner, "team": row.team, "metadata": row.meta or {},
        "scopes": normalise_scopes(row.scopes), "limits": {f: getattr(row, f) for f in LIMIT_FIELDS},
        "status": status_of(row, now), "created_at": _iso(row.created_at), "updated_at": _iso(row.updated_at),
        "expires_at": _iso(row.expires_at), "revoked_at": _iso(row.revoked_at), "rotated_at": _iso(row.rotated_at),
        "previous_secret_valid_until": _iso(grace), "last_used_at": _iso(row.last_used_at),
        "imported": row.import_hash is not None,
    }


def _new_row(key_id: str, pepper: str, secret: str, now: dt.datetime, *, owner: str, name: str = "",
             team: str | None = None, metadata: dict[str, Any] | None = None, scopes: Any = None,
             limits: dict[str, int | None] | None = None, expires_at: dt.datetime | None = None,
             import_hash: str | None = None) -> ApiKey:
    """A new key's row (only the secret's hash is kept)."""
    limits = limits or {}
    return ApiKey(id=key_id, name=name, owner=owner, team=team, meta=metadata or {},
                  scopes=normalise_scopes(scopes), secret_hash=hash_secret(pepper, secret), created_at=now,
                  updated_at=now, expires_at=expires_at, import_hash=import_hash,
                  **{f: limits.get(f) for f in LIMIT_FIELDS})


def key_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """Whose key an event is about (``key.updated``, ``key.rotated``, ``key.revoked``): so that the
    trail of an owner (``audit query --owner``) holds their offboarding too."""
    return {"key_id": rec["id"], "owner": rec["owner"], "team": rec["team"]}


def created_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """What a ``key.created`` event records of a new key (never its secret)."""
    return {"key_id": rec["id"], "owner": rec["owner"], "name": rec["name"], "team": rec["team"],
            **({"imported": True} if rec["imported"] else {})}


#: The fields whose values a ``key.updated`` event records, old and new (metadata and scopes: only
#: that they changed).
_VALUES_RECORDED = ("name", "team", "expires_at")


def changed_values(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{field: {"from": old, "to": new}}`` for the labels, expiry and limits an update changed
    (``limits.rpm`` ...): the audit trail then says which team a key was in when, and who raised
    a limit from what."""
    out: dict[str, dict[str, Any]] = {}
    for f in _VALUES_RECORDED:
        if before.get(f) != after.get(f):
            out[f] = {"from": before.get(f), "to": after.get(f)}
    old, new = before.get("limits") or {}, after.get("limits") or {}
    for f in LIMIT_FIELDS:
        if old.get(f) != new.get(f):
            out[f"limits.{f}"] = {"from": old.get(f), "to": new.get(f)}
    return out


def _iso(v: dt.datetime | None) -> str | None:
    return v.astimezone(UTC).isoformat().replace("+00:00", "Z") if v is not None else None


def normalise_scopes(s: Any) -> dict[str, list[str]]:
    s = s if isinstance(s, dict) else {}
    return {"paths": list(s.get("paths") or []), "models": list(s.get("models") or [])}


@dataclass(slots=True)
class UsageRecord:
    """Usage of one key on one UTC day since the last record: a delta added to the rollup row."""

    key_id: str
    day: dt.date
    requests: int
    prompt_tokens: int
    completion_tokens: int


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- lifecycle ----------------------------------------------------------------------------------
    async def create(self, *, pepper: str, owner: str, name: str = "", team: str | None = None,
                     metadata: dict[str, Any] | None = None, scopes: dict[str, Any] | None = None,
                     limits: dict[str, int | None] | None = None,
                     expires_at: dt.datetime | None = None,
                     import_hash: str | None = None) -> tuple[dict[str, Any], str]:
        """Create a key; returns its public record and the full key (the only time it exists).
        ``import_hash``: a key issued elsewhere (its SHA-256, hex), which works as it is; its record
        also gets a gateway key (returned), which works too. Raises :class:`KeyImported` when that
        hash is already imported."""
        now = utcnow()
        secret = new_secret()
        limits = limits or {}
        async with self.db.session() as s:
            if import_hash is not None and (await s.execute(
                    select(ApiKey.id).where(ApiKey.import_hash == import_hash))).first() is not None:
                raise KeyImported()
            for _ in range(5):  # a key id collision is astronomically unlikely; retry anyway
                key_id = new_key_id()
                if await s.get(ApiKey, key_id) is None:
                    break
            row = _new_row(key_id, pepper, secret, now, owner=owner, name=name, team=team, metadata=metadata,
                           scopes=scopes, limits=limits, expires_at=expires_at, import_hash=import_hash)
            s.add(row)
            try:
                await s.commit()
            except IntegrityError:
                if import_hash is None:
                    raise
                raise KeyImported() from None  # (imported at once by another instance or the CLI)
            return public(row), format_key(key_id, secret)

    async def create_many(self, *, pepper: str, items: Sequence[dict[str, Any]], skip_existing: bool = False,
                          before_commit: Callable[[list[dict[str, Any]]], None] | None = None
                          ) -> list[dict[str, Any]]:
        """Create many keys in one transaction: all of them or none. ``items``: :meth:`create`'s
        keyword arguments but ``pepper``. One result per item, in order: ``{"record": ..., "key":
        ...}`` for a key made, ``{"skipped": <id>}`` for one left out. An item whose ``import_hash``
        is stored already raises :class:`KeyImported` (its index as the argument), unless
        ``skip_existing``: then it is skipped, and so is an item with a name when its owner has an
        active key of that name, or an earlier item of the same owner and name (so a file can be
        imported again).

        ``before_commit`` gets the results before anything is written (to hand out the keys: if it
        raises, nothing is written), so no write lock is held while a slow reader takes them. The
        keys are then written in one transaction; imports at once are written one after the other
        (on PostgreSQL under an advisory lock; SQLite has one writer), and with ``skip_existing``
        one that finds a key of its own made meanwhile by another raises :class:`KeysChanged`, the
        keys it handed out never made."""
        now = utcnow()
        hashes = [it.get("import_hash") for it in items]
        async with self.db.session() as s:
            stored = await self._imported(s, hashes)
            named = await self._named(s, items, now) if skip_existing else {}
            results: list[dict[str, Any]] = []
            rows: list[ApiKey] = []
            planned: dict[tuple[str, str], ApiKey] = {}
            for n, it in enumerate(items):
                h = hashes[n]
                label = (it["owner"], it.get("name") or "")
                old: Any = stored.get(h) if h is not None else None
                if old is None and skip_existing and label[1]:
                    old = named.get(label) or planned.get(label)
                if old is not None:
                    if not skip_existing:
                        raise KeyImported(n)
                    results.append({"skipped": old})
                    continue
                secret = new_secret()
                row = _new_row(new_key_id(), pepper, secret, now, **{**it, "name": label[1], "import_hash": h})
                if label[1]:
                    planned.setdefault(label, row)
                rows.append(row)
                results.append({"row": row, "secret": secret})
            for _ in range(5):  # key id collisions (astronomically unlikely), in the file or with stored keys
                ids = [r.id for r in rows]
                taken = {i for i in ids if ids.count(i) > 1} if len(set(ids)) < len(ids) else set()
                for i in range(0, len(ids), 500):
                    taken.update(r[0] for r in await s.execute(select(ApiKey.id).where(ApiKey.id.in_(ids[i:i + 500]))))
                if not taken:
                    break
                for r in rows:
                    if r.id in taken:
                        r.id = new_key_id()
        for res in results:
            row = res.pop("row", None)
            if row is not None:
                res["record"], res["key"] = public(row), format_key(row.id, res.pop("secret"))
            elif isinstance(res["skipped"], ApiKey):
                res["skipped"] = res["skipped"].id  # (an earlier row of the file)
        if before_commit is not None:
            before_commit(results)
        async with self.db.session() as s:
            if not self.db.is_sqlite:
                await s.execute(text(f"SELECT pg_advisory_xact_lock({IMPORT_LOCK})"))
            s.add_all(rows)
            try:
                await s.flush()  # (SQLite: the write lock, from here to the commit)
            except IntegrityError:
                raise (KeysChanged() if skip_existing else KeyImported(None)) from None
            if skip_existing:
                ours = {r.id for r in rows}
                now_named = await self._named(s, items, now, every=True)
                if any(set(now_named.get((r.owner, r.name), ())) - ours for r in rows if r.name):
                    raise KeysChanged()
            try:
                await s.commit()
            except IntegrityError:
                raise (KeysChanged() if skip_existing else KeyImported(None)) from None
        return results

    async def _imported(self, s: Any, hashes: Sequence[str | None]) -> dict[str, str]:
        """import hash -> key id, of those stored."""
        stored: dict[str, str] = {}
        wanted = sorted({h for h in hashes if h is not None})
        for i in range(0, len(wanted), 500):
            stored.update((r[0], r[1]) for r in await s.execute(
                select(ApiKey.import_hash, ApiKey.id).where(ApiKey.import_hash.in_(wanted[i:i + 500]))))
        return stored

    async def _named(self, s: Any, items: Sequence[dict[str, Any]], now: dt.datetime, every: bool = False) -> Any:
        """(owner, name) -> the id of the oldest active key of that name of the items' owners (``every``:
        the ids of all of them)."""
        out: dict[tuple[str, str], Any] = {}
        owners = sorted({it["owner"] for it in items if it.get("name")})
        for i in range(0, len(owners), 500):
            for r in await s.execute(select(ApiKey.id, ApiKey.owner, ApiKey.name, ApiKey.expires_at).where(
                    ApiKey.owner.in_(owners[i:i + 500]), ApiKey.revoked_at.is_(None), ApiKey.name != "")
                    .order_by(ApiKey.created_at, ApiKey.id)):
                if r[3] is None or r[3] > now:
                    if every:
                        out.setdefault((r[1], r[2]), []).append(r[0])
                    else:
                        out.setdefault((r[1], r[2]), r[0])
        return out

    async def named_key_id(self, arg: str) -> str | None:
        """The key an admin names: by its id, a whole key, or the token of an imported key (a leaked
        one, pasted to find and revoke its key: looked up by its hash). None: no such key."""
        key_id = key_id_of(arg)
        if key_id is None:
            h = imported_token_hash(arg)
            if h is not None:
                key_id = await self.imported_id(h)
        return key_id

    async def imported_id(self, import_hash: str) -> str | None:
        """The id of the key imported with this hash, if any."""
        async with self.db.session() as s:
            return (await s.execute(select(ApiKey.id).where(ApiKey.import_hash == import_hash))).scalar()

    async def get_row(self, key_id: str) -> ApiKey | None:
        async with self.db.session() as s:
            return await s.get(ApiKey, key_id)

    async def changed_since(self, since: dt.datetime, limit: int) -> list[tuple[str, dt.datetime]]:
        """(id, updated_at) of the keys changed after ``since``: what other processes revoked,
        rotated or updated lately."""
        async with self.db.session() as s:
            rows = await s.execute(select(ApiKey.id, ApiKey.updated_at).where(ApiKey.updated_at > since)
                                   .limit(limit))
            return [(r[0], r[1]) for r in rows]

    async def get(self, key_id: str) -> dict[str, Any] | None:
        row = await self.get_row(key_id)
        return public(row) if row is not None else None

    async def list(self, *, owner: str | None = None, status: str | None = None, team: str | None = None,
                   name: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        now = utcnow()
        q = select(ApiKey)
        if owner is not None:
            q = q.where(ApiKey.owner == owner)
        if name is not None:
            q = q.where(ApiKey.name == name)
        if team is not None:
            q = q.where(ApiKey.team == team)
        if status == "revoked":
            q = q.where(ApiKey.revoked_at.is_not(None))
        elif status == "expired":
            q = q.where(ApiKey.revoked_at.is_(None), ApiKey.expires_at.is_not(None), ApiKey.expires_at <= now)
        elif status == "active":
            q = q.where(ApiKey.revoked_at.is_(None), or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now))
        q = q.order_by(ApiKey.created_at, ApiKey.id).limit(limit).offset(offset)
        async with self.db.session() as s:
            return [public(r) for r in (await s.execute(q)).scalars()]

    async def _change(self, key_id: str, apply: Callable[[ApiKey, dt.datetime], bool]) -> ApiKey | None:
        """Read the key, ``apply`` the change to it (False: nothing to write), write it if nobody
        changed the row since it was read (see ApiKey's version column); else read it again and
        reapply, so concurrent changes are made one after the other. None: no such key."""
        for _ in range(CHANGE_ATTEMPTS):
            async with self.db.session() as s:
                row = await s.get(ApiKey, key_id)
                if row is None:
                    return None
                now = utcnow()
                if not apply(row, now):
                    return row
                row.updated_at = now
                try:
                    await s.commit()
                except StaleDataError:
                    continue
                return row
        raise KeyBusy(key_id)

    async def update(self, key_id: str, changes: dict[str, Any],
                     before: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Apply ``changes`` (name, team, metadata, scopes, expires_at, and limit fields; a limit
        given as None clears the override). ``scopes`` holds the lists that change (paths,
        models; None clears both): the other one is kept as stored when the change is written.
        ``before``: filled with the key's record as it was when the change was written (for
        :func:`changed_values`)."""
        for k in changes:
            if k not in ("metadata", "scopes", "limits", "name", "team", "expires_at") and k not in LIMIT_FIELDS:
                raise ValueError(f"unknown field {k}")

        def apply(row: ApiKey, now: dt.datetime) -> bool:
            if before is not None:
                before.clear()
                before.update(public(row))
            for k, v in changes.items():
                if k == "metadata":
                    row.meta = v or {}
                elif k == "scopes":
                    cur = normalise_scopes(row.scopes)
                    row.scopes = normalise_scopes({f: v[f] if f in v else cur[f] for f in cur} if v is not None else {})
                elif k == "limits":
                    for f, lv in (v or {}).items():
                        if f in LIMIT_FIELDS:
                            setattr(row, f, lv)
                else:
                    setattr(row, k, v)
            return True

        row = await self._change(key_id, apply)
        return public(row) if row is not None else None

    async def rotate(self, key_id: str, *, pepper: str, grace_seconds: float) -> tuple[dict[str, Any], str] | None:
        """Issue a new secret for the same key id; the current one keeps working for
        ``grace_seconds`` (a secret from an earlier rotation still in its grace stops now).
        Rotations at once are made one after the other: each secret handed out is the current
        one when it is written (the one before it in its grace)."""
        secret = new_secret()

        def apply(row: ApiKey, now: dt.datetime) -> bool:
            if row.revoked_at is not None:
                raise KeyRevoked(key_id)
            if grace_seconds > 0:
                row.prev_secret_hash = row.secret_hash
                row.prev_valid_until = now + dt.timedelta(seconds=grace_seconds)
            else:
                row.prev_secret_hash = None
                row.prev_valid_until = None
            row.secret_hash = hash_secret(pepper, secret)
            if row.import_hash is not None and row.rotated_at is None and row.import_valid_until is None:
                # the first rotation of an imported key: the imported token is rotated out, for good
                row.import_valid_until = now + dt.timedelta(seconds=max(0.0, grace_seconds))
            row.rotated_at = now
            return True

        row = await self._change(key_id, apply)
        return (public(row), format_key(key_id, secret)) if row is not None else None

    async def revoke(self, key_id: str) -> dict[str, Any] | None:
        """Revoke for good (idempotent: a second revoke keeps the first time)."""

        def apply(row: ApiKey, now: dt.datetime) -> bool:
            if row.revoked_at is not None:
                return False
            row.revoked_at = now
            row.prev_secret_hash = None
            row.prev_valid_until = None
            return True

        row = await self._change(key_id, apply)
        return public(row) if row is not None else None

    @staticmethod
    def whose(owner: str | None, team: str | None) -> str:
        """What revoke_all's filters name, for messages: ``owner 'alice' and team 'red'``."""
        return " and ".join(f"{k} {v!r}" for k, v in (("owner", owner), ("team", team)) if v is not None)

    async def revoke_all(self, *, owner: str | None = None, team: str | None = None,
                         dry_run: bool = False) -> list[dict[str, Any]]:
        """Revoke every key not yet revoked of ``owner`` and/or ``team`` (one of them at least) in one
        statement: the keys made up to it included, all or none. Returns the keys revoked (with
        ``dry_run``, the ones that would be), oldest first."""
        assert owner is not None or team is not None
        cond = [ApiKey.revoked_at.is_(None)]
        if owner is not None:
            cond.append(ApiKey.owner == owner)
        if team is not None:
            cond.append(ApiKey.team == team)
        async with self.db.session() as s:
            if dry_run:
                rows = list((await s.execute(select(ApiKey).where(*cond)
                                             .order_by(ApiKey.created_at, ApiKey.id))).scalars())
                return [public(r) for r in rows]
            now = utcnow()
            ids = [r[0] for r in await s.execute(
                update(ApiKey).where(*cond).values(revoked_at=now, prev_secret_hash=None, prev_valid_until=None,
                                                   updated_at=now).returning(ApiKey.id)
                .execution_options(synchronize_session=False))]
            await s.commit()
            if not ids:
                return []
            rows = list((await s.execute(select(ApiKey).where(ApiKey.id.in_(ids))
                                         .order_by(ApiKey.created_at, ApiKey.id))).scalars())
            return [public(r) for r in rows]

    # -- usage ----------------------------------------------------------------------------------------
    async def record_usage(self, records: Sequence[UsageRecord], touch: Iterable[tuple[str, dt.datetime]] = ()) -> None:
        """Add a batch of usage deltas to the daily rollups (one upsert) and move
        ``last_used_at`` forward for the keys in ``touch``."""
        agg: dict[tuple[str, dt.date], list[int]] = {}
        for r in records:
            a = agg.setdefault((r.key_id, r.day), [0, 0, 0])
            a[0] += r.requests
            a[1] += r.prompt_tokens
            a[2] += r.completion_tokens
        t = KeyUsageDaily.__table__
        if self.db.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        async with self.db.session() as s:
            if agg:
                # (a record of nothing only carries its key's last use: see UsageTally.close)
                rows = [{"key_id": k, "day": d, "requests": v[0], "prompt_tokens": v[1], "completion_tokens": v[2]}
                        for (k, d), v in sorted(agg.items()) if any(v)]
                for i, n in row_chunks(len(rows)):  # a few statement sizes (see gateway.db.ROW_CHUNKS)
                    stmt = insert(t).values(rows[i:i + n])
                    ex = stmt.excluded
                    stmt = stmt.on_conflict_do_update(
                        index_elements=[t.c.key_id, t.c.day],
                        set_={"requests": t.c.requests + ex.requests,
                              "prompt_tokens": t.c.prompt_tokens + ex.prompt_tokens,
                              "completion_tokens": t.c.completion_tokens + ex.completion_tokens})
                    await s.execute(stmt)
            for key_id, at in touch:
                await s.execute(update(ApiKey).where(ApiKey.id == key_id, or_(
                    ApiKey.last_used_at.is_(None), ApiKey.last_used_at < at)).values(last_used_at=at))
            await s.commit()

    async def usage(self, key_id: str, start: dt.date, end: dt.date) -> dict[str, Any]:
        """Per-day rows and totals for ``start`` .. ``end`` (inclusive, UTC days)."""
        q = (select(KeyUsageDaily).where(KeyUsageDaily.key_id == key_id, KeyUsageDaily.day >= start,
                                         KeyUsageDaily.day <= end).order_by(KeyUsageDaily.day))
        async with self.db.session() as s:
            rows = list((await s.execute(q)).scalars())
        days = [{"date": r.day.isoformat(), "requests": r.requests, "prompt_tokens": r.prompt_tokens,
                 "completion_tokens": r.completion_tokens, "total_tokens": r.prompt_tokens + r.completion_tokens}
                for r in rows]
        totals = {f: sum(d[f] for d in days) for f in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
        return {"key_id": key_id, "from": start.isoformat(), "to": end.isoformat(), "days": days, "totals": totals}

    async def setting(self, name: str) -> str | None:
        async with self.db.session() as s:
            row = await s.get(KeyAuthSetting, name)
            return row.value if row is not None else None

    async def set_setting(self, name: str, value: str) -> str | None:
        """Store ``value`` under ``name``; returns the value it replaced (None: there was none)."""
        for _ in range(3):  # (two instances starting at once: the second one's insert finds the row)
            async with self.db.session() as s:
                row = await s.get(KeyAuthSetting, name)
                old = row.value if row is not None else None
                if row is None:
                    s.add(KeyAuthSetting(name=name, value=value, updated_at=utcnow()))
                elif old != value:
                    row.value, row.updated_at = value, utcnow()
                else:
                    return old
                try:
                    await s.commit()
                except IntegrityError:
                    continue
                return old
        return None

    async def count(self) -> int:
        async with self.db.session() as s:
            return int((await s.execute(select(func.count()).select_from(ApiKey))).scalar_one())


class KeyImported(Exception):
    """A key with this import hash exists already."""


class KeysChanged(Exception):
    """An import with skip_existing found, when it came to write, keys of its own made meanwhile
    (by another import at the same time): nothing was written."""


#: The PostgreSQL advisory lock imports of many keys take while they write (one at a time).
IMPORT_LOCK = 0x6B65797330  # "keys0"


class KeyRevoked(Exception):
    pass


class KeyBusy(DatabaseError):
    """The key kept changing under a change (CHANGE_ATTEMPTS reads in a row found it changed):
    answered like a busy database (503, retry shortly)."""


#: Times a change of a key is tried again when another change was written in between.
CHANGE_ATTEMPTS = 20
