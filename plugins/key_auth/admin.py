"""Admin API for keys (mounted on the admin listener, behind the admin token) and its OpenAPI paths.

Every change is emitted on ``services.events`` (``key.created`` / ``key.updated`` / ``key.rotated`` /
``key.revoked``) with the admin identity as actor and the key id, never the key, and invalidates this
process's validation cache at once.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
from typing import TYPE_CHECKING, Annotated, Any

from aiohttp import web
from pydantic import (AfterValidator, model_validator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator)

from gateway.admin import DB_UNAVAILABLE, admin_identity
from gateway.db import store_error
from gateway.config.model import prefix_problem
from gateway.context import ANONYMOUS
from gateway.errors import error_body

from . import current_config, key_cache, key_store, limits_not_applied
from .keys import KEY_ID, NO_KEY_NAMED
from .store import LIMIT_MAX, KeyImported, KeyRevoked, changed_values, created_fields, key_fields

if TYPE_CHECKING:
    from gateway.services import Services


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _no_control(v: Any) -> Any:
    """owner/name/team are labels that also travel in headers and are shown in terminals: no
    control characters (C0, DEL, C1), no line separators or bidirectional overrides, and no
    blanks at either end (a header value loses them: " alice" would reach the upstream as alice)."""
    if isinstance(v, str):
        if _UNSAFE_LABEL.search(v):
            raise ValueError("must not contain control characters (newlines, tabs, escape sequences, "
                             "bidirectional overrides ...)")
        if v != v.strip():
            raise ValueError("must not start or end with blanks")
    return v


#: What no database text column holds (a NUL, a lone surrogate): a filter with one matches nothing.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_UNSAFE_LABEL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2069\ufeff]")


#: Bounds of what a key carries (cached in every instance, and its model patterns are tried on each
#: request): entries per scope list, characters per entry, and the metadata's size as JSON.
MAX_SCOPES = 256
MAX_SCOPE_TEXT = 200
MAX_METADATA = 16384


def _scope_entry(v: str) -> str:
    """A path prefix or model pattern is compared with the request's, character for character: a
    control character or an end blank in one (``llama3\\r`` from a list exported on Windows) is stored
    and then matches nothing, and the key gets 403 for the model it was meant for."""
    if _UNSAFE_LABEL.search(v):
        raise ValueError(f"{v!r}: must not contain control characters (a carriage return or newline left by a "
                         "pasted or exported list, tabs, escape sequences, bidirectional overrides ...)")
    if v != v.strip():
        raise ValueError(f"{v!r}: must not start or end with blanks")
    return v


def _path_entry(v: str) -> str:
    bad = prefix_problem(v)  # (the rules of route prefixes: one that could never match is refused)
    if bad:
        raise ValueError(f"path prefix {v!r}: {bad}")
    return _scope_entry(v)  # (what prefix_problem lets through: C1 controls, bidirectional overrides)


_PathText = Annotated[str, Field(max_length=MAX_SCOPE_TEXT), AfterValidator(_path_entry)]
_ModelText = Annotated[str, Field(max_length=MAX_SCOPE_TEXT), AfterValidator(_scope_entry)]


def _metadata_size(v: Any) -> Any:
    if v is not None and len(json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()) > MAX_METADATA:
        raise ValueError(f"at most {MAX_METADATA} bytes as compact JSON (keep larger data elsewhere, under an id "
                         "kept here)")
    return v


class Scopes(_Body):
    paths: list[_PathText] = Field(default_factory=list, max_length=MAX_SCOPES,
                                   description="Allowed request path prefixes, e.g. /v1/chat/. Empty: any path.")
    models: list[_ModelText] = Field(default_factory=list, max_length=MAX_SCOPES,
                                    description="Allowed models (shell-style patterns such as gpt-4o*). Empty: any model.")


class Limits(_Body):
    # (strict: JSON true is not a limit of 1, nor "5" a number: a generated client's bug is refused)
    rpm: int | None = Field(None, ge=1, le=LIMIT_MAX["rpm"], strict=True,
                            description="Requests per minute for this key (overrides the YAML default).")
    tpm: int | None = Field(None, ge=1, le=LIMIT_MAX["tpm"], strict=True,
                            description="Tokens per minute for this key.")
    daily_tokens: int | None = Field(None, ge=1, le=LIMIT_MAX["daily_tokens"], strict=True,
                                     description="Token quota per UTC day.")
    monthly_tokens: int | None = Field(None, ge=1, le=LIMIT_MAX["monthly_tokens"], strict=True,
                                       description="Token quota per UTC month.")
    max_parallel: int | None = Field(None, ge=1, le=LIMIT_MAX["max_parallel"], strict=True,
                                     description="Requests of this key running at once (rate_limit's "
                                                 "concurrency cap keyed by key).")


def _in_range(v: Any) -> Any:
    """A time the store can keep (in UTC, between the years 1 and 9999)."""
    if isinstance(v, dt.datetime):
        try:
            v.astimezone(dt.timezone.utc)
        except OverflowError:
            raise ValueError("out of range") from None
    return v


def _timestamp_text(v: Any) -> Any:
    """``expires_at`` is a date-time string (or null): a number would be read as seconds or
    milliseconds since 1970, whichever its size suggests (253402300800 became 1978)."""
    if v is None or isinstance(v, (str, dt.datetime)):
        return v
    raise ValueError("must be an RFC 3339 date-time string with an offset, e.g. 2027-01-31T00:00:00Z")


#: A key's metadata as both bodies take it: free JSON, at most MAX_METADATA bytes written compactly.
Metadata = Annotated[dict[str, Any], AfterValidator(_metadata_size)]

#: An expiry time as both bodies take it: a date-time string with an offset, one the store can keep.
ExpiresAt = Annotated[AwareDatetime | None, BeforeValidator(_timestamp_text), AfterValidator(_in_range)]


class CreateKey(_Body):
    owner: str = Field(min_length=1, max_length=200, description="The user the key belongs to.")
    name: str = Field("", max_length=200, description="A label for people.")
    team: str | None = Field(None, max_length=200)
    metadata: Metadata = Field(default_factory=dict, description="Free-form JSON kept with the key.")
    scopes: Scopes = Field(default_factory=Scopes)
    limits: Limits = Field(default_factory=Limits)
    expires_at: ExpiresAt = Field(None, description="When the key stops working (RFC 3339 with offset).")
    import_sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$",
                                      description="Import a key issued elsewhere, by the SHA-256 (hex, lower case) "
                                                  "of the whole token its clients send: it works as it is (with "
                                                  "key_auth.imported_keys: true).")
    import_key: str | None = Field(None, min_length=8, max_length=1024, repr=False,
                                   description="Import a key issued elsewhere, the token itself (only its SHA-256 "
                                               "is stored).")

    @model_validator(mode="after")
    def _one_import(self) -> "CreateKey":
        if self.import_sha256 is not None and self.import_key is not None:
            raise ValueError("give import_sha256 or import_key, not both")
        k = self.import_key
        if k is not None:
            if k != k.strip() or not k.isprintable() or not k.isascii():
                raise ValueError("import_key must be the token as clients send it: printable ASCII, no blanks "
                                 "at either end (the value is not shown)")
            if k.startswith("gw_"):
                raise ValueError("import_key is a gateway key: it works already (the value is not shown)")
        return self

    def import_hash(self) -> str | None:
        if self.import_key is not None:
            return hashlib.sha256(self.import_key.encode()).hexdigest()
        return self.import_sha256

    @field_validator("owner", "name", "team")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        return _no_control(v)

    @field_validator("owner")
    @classmethod
    def _not_anonymous(cls, v: Any) -> Any:
        if v == ANONYMOUS:
            # (the owner of requests without a key, on routes without key_auth: such a key would
            # read and continue every keyless caller's conversations)
            raise ValueError(f"{ANONYMOUS!r} is the owner of requests made without a key; name another owner")
        return v

    @field_validator("expires_at")
    @classmethod
    def _future(cls, v: Any) -> Any:
        # (a key expired when made is a typo, not a key anyone can use: as `gateway keys create`)
        if v is not None and v <= dt.datetime.now(dt.timezone.utc):
            raise ValueError("is in the past")
        return v


class UpdateKey(_Body):
    name: str | None = Field(None, max_length=200)
    team: str | None = Field(None, max_length=200, description="null clears it.")
    metadata: Metadata | None = Field(None, description="Replaces the metadata.")
    scopes: Scopes | None = Field(None, description="Only the lists given change (paths, models); [] clears one.")
    limits: Limits | None = Field(None, description="Only the fields given change; null clears an override.")
    expires_at: ExpiresAt = Field(None, description="null: never expires.")

    @field_validator("name", "team")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        return _no_control(v)


class RotateKey(_Body):
    grace_seconds: float | None = Field(None, ge=0, le=90 * 86400, allow_inf_nan=False, strict=True,
                                        description="Seconds the old secret keeps working (default: the "
                                                    "plugin's rotation_grace).")


class RevokeKeys(_Body):
    owner: str | None = Field(None, min_length=1, max_length=200, description="Every key of this owner.")
    team: str | None = Field(None, min_length=1, max_length=200,
                             description="Every key of this team (with owner: that owner's keys in it).")
    dry_run: bool = Field(False, strict=True, description="List the keys that would be revoked; revoke none.")

    @model_validator(mode="after")
    def _whose(self) -> "RevokeKeys":
        if self.owner is None and self.team is None:
            raise ValueError("give owner, team or both: whose keys to revoke")
        return self


def _err(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message, "invalid_request_error", code, param),
                        content_type="application/json")


def _not_found(key_id: str) -> web.Response:
    if not KEY_ID.match(key_id):  # (never echoed: it may be a secret)
        return _err(404, f"No API key: {NO_KEY_NAMED}.", "key_not_found", "id")
    return _err(404, f"No API key with id {key_id!r}.", "key_not_found", "id")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: what a strict client cannot read back


def _finite(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")  # 1e400 reads as Infinity
    return v


async def _body(request: web.Request, model: type[BaseModel]) -> BaseModel | web.Response:
    raw = await request.read()
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
            return _err(400, "The request body is not valid JSON.", "invalid_json")
    if not isinstance(data, dict):
        return _err(400, "The request body must be a JSON object.", "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or None
        msg = "unknown field" if first["type"] == "extra_forbidden" else validation_message(first)
        return _err(422, f"{loc}: {msg}" if loc else msg, "invalid_value", loc)


def validation_message(error: Any) -> str:
    """A pydantic error's message, without the "Value error, " it puts before a validator's own."""
    return str(error["msg"]).removeprefix("Value error, ") if error["type"] == "value_error" else str(error["msg"])


async def _key_id(request: web.Request, store: Any) -> str | None:
    """The key the path names (see KeyStore.named_key_id); never echoed."""
    return await store.named_key_id(request.match_info["key_id"])


def _date(v: str | None, default: dt.date) -> dt.date:
    return dt.date.fromisoformat(v) if v else default


#: The query parameters of GET /keys: any other is refused (400), not ignored.
_LIST_PARAMS = ("owner", "team", "name", "status", "limit", "offset")
_PARAM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}").fullmatch


def _warn_unapplied(services: "Services", key_id: str, limits: dict[str, Any]) -> None:
    """Log that limits just set on a key are enforced by nothing in the running config (the answer
    stays as it is: the key and its limits are stored, and apply once rate_limit reads them)."""
    given = sorted(f for f, v in limits.items() if v is not None)
    why = limits_not_applied(services.settings) if given else None
    if why:
        logging.getLogger("gateway.key_auth").warning(
            "key %s: its limits (%s) are stored but not applied by this config: %s (rate_limit applies them "
            "with key_overrides: true)", key_id, ", ".join(given), why)


def routes(services: "Services") -> list[web.RouteDef]:
    store = key_store(services)
    cache = key_cache(services)
    events = services.events

    async def create(request: web.Request) -> web.Response:
        body = await _body(request, CreateKey)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, CreateKey)
        try:
            rec, key = await store.create(pepper=current_config(services).pepper, owner=body.owner, name=body.name,
                                          team=body.team, metadata=body.metadata, scopes=body.scopes.model_dump(),
                                          limits=body.limits.model_dump(), expires_at=body.expires_at,
                                          import_hash=body.import_hash())
        except KeyImported:
            return _err(409, "A key with this import hash exists already.", "key_already_imported",
                        "import_sha256" if body.import_sha256 is not None else "import_key")
        cache.invalidate(rec["id"])
        events.emit("key.created", actor=admin_identity(request), **created_fields(rec))
        if rec["imported"] and not current_config(services).imported_keys:
            logging.getLogger("gateway.key_auth").warning(
                "key %s: imported, but key_auth.imported_keys is false: the imported token is refused until it is "
                "set to true", rec["id"])
        _warn_unapplied(services, rec["id"], body.limits.model_dump())
        return web.json_response({**rec, "key": key}, status=201)

    async def list_keys(request: web.Request) -> web.Response:
        q = request.query
        for name in q:
            # (a filter not known here would be ignored: ?nme=svc-007 would list every key, and a
            # script revoking "the keys found" would revoke them all)
            if name not in _LIST_PARAMS:
                # (a name is echoed only when it cannot be a secret: a key pasted as a parameter is not)
                shown = name if _PARAM_NAME(name) and not name.startswith("gw_") else None
                return _err(400, f"Unknown query parameter{f' {shown!r}' if shown else ''}: GET /keys takes "
                                 f"{', '.join(_LIST_PARAMS)}.", "invalid_value", shown)
            if len(q.getall(name)) > 1:  # (one would be used and the others ignored)
                return _err(400, f"{name} is given more than once.", "invalid_value", name)
        status = q.get("status")
        if status not in (None, "active", "revoked", "expired"):
            return _err(400, "status must be one of active, revoked, expired.", "invalid_value", "status")
        bounds = {"limit": (q.get("limit", "100"), 1, 1000), "offset": (q.get("offset", "0"), 0, 2**62)}
        got: dict[str, int] = {}
        for name, (raw, lo, hi) in bounds.items():
            if not re.fullmatch(r"-?[0-9]{1,19}", raw):  # (int() also takes "1_0", " 5", "²")
                return _err(400, f"{name} must be an integer.", "invalid_value", name)
            got[name] = int(raw)
            if not lo <= got[name] <= hi:
                return _err(400, f"{name} must be {lo}..{hi}.", "invalid_value", name)
        limit, offset = got["limit"], got["offset"]
        for name in ("owner", "team", "name"):
            v = q.get(name)
            if v is not None and _UNSTORABLE.search(v):
                # (no stored label holds one: an empty list would read as "this owner has no key")
                return _err(400, f"{name} contains a character no key's {name} can hold (e.g. NUL).",
                            "invalid_value", name)
        data = await store.list(owner=q.get("owner"), status=status, team=q.get("team"), name=q.get("name"),
                                limit=limit, offset=offset)
        return web.json_response({"object": "list", "data": data, "limit": limit, "offset": offset})

    async def show(request: web.Request) -> web.Response:
        key_id = await _key_id(request, store)
        rec = await store.get(key_id) if key_id else None
        if rec is None:
            return _not_found(request.match_info["key_id"])
        if key_id in cache.revoked_here and rec.get("status") != "revoked":
            # (a revoke this instance applies but could not store: said, as it decides here)
            rec = {**rec, "revoked_here": True}
        return web.json_response(rec)

    async def patch(request: web.Request) -> web.Response:
        key_id = await _key_id(request, store)
        if key_id is None:
            return _not_found(request.match_info["key_id"])
        body = await _body(request, UpdateKey)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, UpdateKey)
        changes: dict[str, Any] = {}
        for f in body.model_fields_set:
            v = getattr(body, f)
            if f == "limits":
                changes["limits"] = {lf: getattr(v, lf) for lf in v.model_fields_set} if v is not None else {}
            elif f == "scopes":
                # the list not given is kept, as stored when the change is written (narrowing the
                # paths must not widen the models); null clears both
                changes["scopes"] = None if v is None else {
                    k: getattr(v, k) for k in ("paths", "models") if k in v.model_fields_set}
            elif f == "name" and v is None:
                return _err(422, "name: must be a string", "invalid_value", "name")
            else:
                changes[f] = v
        if not changes:  # (like `gateway keys update` with no option: no write, no updated_at, no event)
            if await store.get(key_id) is None:
                return _not_found(key_id)  # (an unknown key is still a 404, whatever the body)
            return _err(400, "Nothing to change: give at least one field.", "nothing_to_change")
        before: dict[str, Any] = {}
        rec = await store.update(key_id, changes, before)
        if rec is None:
            return _not_found(key_id)
        cache.invalidate(key_id)
        events.emit("key.updated", actor=admin_identity(request), **key_fields(rec), fields=sorted(changes),
                    changes=changed_values(before, rec))
        _warn_unapplied(services, key_id, changes.get("limits") or {})
        return web.json_response(rec)

    async def rotate(request: web.Request) -> web.Response:
        key_id = await _key_id(request, store)
        if key_id is None:
            return _not_found(request.match_info["key_id"])
        body = await _body(request, RotateKey)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, RotateKey)
        if key_id in cache.revoked_here:
            return _err(409, "This key was revoked on this instance, and the revocation could not be stored: send "
                             "the revoke again (a revoked key cannot be rotated; create a new one).",
                        "key_revoked", "id")
        cfg = current_config(services)
        grace = cfg.rotation_grace if body.grace_seconds is None else body.grace_seconds
        try:
            res = await store.rotate(key_id, pepper=cfg.pepper, grace_seconds=grace)
        except KeyRevoked:
            return _err(409, "A revoked key cannot be rotated; create a new one.", "key_revoked", "id")
        if res is None:
            return _not_found(key_id)
        rec, key = res
        cache.invalidate(key_id)
        events.emit("key.rotated", actor=admin_identity(request), **key_fields(rec), grace_seconds=grace)
        return web.json_response({**rec, "key": key})

    def not_stored(e: BaseException, ids: list[str], logged: str, said: str, which: str, todo: str) -> web.Response:
        """A revocation the database refused (a full disk, a lock held, an outage): the keys are
        refused by this process all the same, until it ends; the log and the answer say what was and
        was not done, and what to do (``todo``)."""
        for key_id in ids:
            cache.revoked_here.add(key_id)
            cache.invalidate(key_id)
        detail = store_error(e)[0]
        logging.getLogger("gateway.key_auth").error(
            "%s could not be stored (%s); this instance refuses %s until it restarts, other instances do not: %s",
            logged, detail, which, todo)
        return web.Response(status=503, content_type="application/json", body=error_body(
            f"{said} could not be stored ({detail}). This instance refuses {which} from now on, until it restarts; "
            f"other instances and the database do not: {todo}.", "server_error", "revocation_not_stored"))

    async def revoke(request: web.Request) -> web.Response:
        key_id = await _key_id(request, store)
        try:
            rec = await store.revoke(key_id) if key_id else None
        except DB_UNAVAILABLE as e:
            assert key_id is not None
            return not_stored(e, [key_id], f"key {key_id}: its revocation", "The revocation", "the key",
                              "retry the revoke, or add the key id to key_auth's deny_keys and reload every instance")
        if rec is None:
            return _not_found(request.match_info["key_id"])
        assert key_id is not None
        cache.invalidate(key_id)
        cache.revoked_here.discard(key_id)  # (stored now: the database says so everywhere)
        events.emit("key.revoked", actor=admin_identity(request), **key_fields(rec))
        return web.json_response(rec)

    async def revoke_all(request: web.Request) -> web.Response:
        body = await _body(request, RevokeKeys)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, RevokeKeys)
        try:
            recs = await store.revoke_all(owner=body.owner, team=body.team, dry_run=body.dry_run)
        except DB_UNAVAILABLE as e:
            if body.dry_run:
                raise
            # As for one key: the keys found are refused by this process from now on, and the
            # answer says what was and was not done (a read may work where the write did not:
            # SQLite's file locked by another writer). Nothing found: the database's own error.
            try:
                found = await store.revoke_all(owner=body.owner, team=body.team, dry_run=True)
            except DB_UNAVAILABLE:
                raise e from None
            if not found:
                raise
            return not_stored(e, [rec["id"] for rec in found], f"{len(found)} key(s): their revocation",
                              f"The revocation of {len(found)} key(s)", "them", "retry the revoke")
        if not recs:  # (a typo in a name must not look like an offboarding done: as the CLI)
            return _err(404, f"No key of {store.whose(body.owner, body.team)} to revoke (none left, or a typo?).", "key_not_found",
                        "owner" if body.owner is not None else "team")
        if not body.dry_run:
            actor = admin_identity(request)
            for rec in recs:
                cache.invalidate(rec["id"])
                cache.revoked_here.discard(rec["id"])
                events.emit("key.revoked", actor=actor, **key_fields(rec))
        return web.json_response({"object": "list", "data": recs, "revoked": 0 if body.dry_run else len(recs),
                                  "dry_run": body.dry_run})

    async def usage(request: web.Request) -> web.Response:
        key_id = await _key_id(request, store)
        if key_id is None or await store.get(key_id) is None:
            return _not_found(request.match_info["key_id"])
        today = dt.datetime.now(dt.timezone.utc).date()
        try:
            start = _date(request.query.get("from"), today.replace(day=1))
            end = _date(request.query.get("to"), today)
        except ValueError:
            return _err(400, "from and to must be dates (YYYY-MM-DD).", "invalid_value", "from")
        if end < start:
            return _err(400, "to is before from.", "invalid_value", "to")
        return web.json_response(await store.usage(key_id, start, end))

    return [
        web.post("/keys", create),
        web.get("/keys", list_keys),
        web.get("/keys/{key_id}", show),
        web.patch("/keys/{key_id}", patch),
        web.post("/keys/revoke", revoke_all),
        web.post("/keys/{key_id}/rotate", rotate),
        web.post("/keys/{key_id}/revoke", revoke),
        web.get("/keys/{key_id}/usage", usage),
    ]


# -- OpenAPI ------------------------------------------------------------------------------------------------
def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined (the paths must stand alone)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.split("/")[-1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


_ERR = {"description": "Error (OpenAI error shape)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_KEY = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "description": "Key id (not secret)."},
        "name": {"type": "string"}, "owner": {"type": "string"}, "team": {"type": ["string", "null"]},
        "metadata": {"type": "object"},
        "scopes": _inline(Scopes.model_json_schema()),
        "limits": _inline(Limits.model_json_schema()),
        "status": {"type": "string", "enum": ["active", "expired", "revoked"]},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "expires_at": {"type": ["string", "null"], "format": "date-time"},
        "revoked_at": {"type": ["string", "null"], "format": "date-time"},
        "rotated_at": {"type": ["string", "null"], "format": "date-time"},
        "previous_secret_valid_until": {"type": ["string", "null"], "format": "date-time",
                                        "description": "End of the grace period of the previous secret."},
        "last_used_at": {"type": ["string", "null"], "format": "date-time",
                         "description": "Written coarsely (see last_used_interval)."},
    },
}
_KEY_WITH_SECRET = {"allOf": [_KEY, {"type": "object", "properties": {"key": {
    "type": "string", "description": "The API key. Shown only in this response; only its hash is stored."}}}]}
_USAGE_ROW = {"type": "object", "properties": {f: {"type": "integer"} for f in
                                                 ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}}
_USAGE = {"type": "object", "properties": {
    "key_id": {"type": "string"}, "from": {"type": "string", "format": "date"}, "to": {"type": "string", "format": "date"},
    "days": {"type": "array", "items": {"allOf": [_USAGE_ROW, {"type": "object", "properties": {
        "date": {"type": "string", "format": "date"}}}]}},
    "totals": _USAGE_ROW}}
_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Key id."}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _req(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _inline(model.model_json_schema())}}}


def openapi_paths() -> dict[str, Any]:
    errs = {"400": _ERR, "401": _ERR, "422": _ERR}
    return {
        "/keys": {
            "post": {"summary": "Create an API key (the key is in the response, and only there)",
                     "tags": ["keys"], "requestBody": _req(CreateKey),
                     "responses": {"201": _json(_KEY_WITH_SECRET, "created"), **errs}},
            "get": {"summary": "List API keys", "tags": ["keys"],
                    "description": "Any other query parameter is refused (400 invalid_value), as is one given "
                                   "twice: an ignored filter would list every key.", "parameters": [
                {"name": "owner", "in": "query", "schema": {"type": "string"}},
                {"name": "team", "in": "query", "schema": {"type": "string"}},
                {"name": "name", "in": "query", "schema": {"type": "string"},
                 "description": "The key's name, matched exactly."},
                {"name": "status", "in": "query", "schema": {"type": "string", "enum": ["active", "revoked", "expired"]}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "object": {"const": "list"}, "data": {"type": "array", "items": _KEY},
                    "limit": {"type": "integer"}, "offset": {"type": "integer"}}}, "keys"), "400": _ERR, "401": _ERR}},
        },
        "/keys/revoke": {
            "post": {"summary": "Revoke every key of an owner and/or a team, in one statement (offboarding)",
                     "tags": ["keys"], "requestBody": _req(RevokeKeys),
                     "description": "Keys already revoked are left as they are. None to revoke is a 404 "
                                    "key_not_found (a typo in a name must not look like an offboarding done).",
                     "responses": {"200": _json({"type": "object", "properties": {
                         "object": {"const": "list"}, "data": {"type": "array", "items": _KEY},
                         "revoked": {"type": "integer", "description": "Keys revoked (0 with dry_run)."},
                         "dry_run": {"type": "boolean"}}}, "the keys revoked (with dry_run: that would be), "
                                                           "oldest first"), "404": _ERR, **errs}},
        },
        "/keys/{key_id}": {
            "get": {"summary": "Show an API key", "tags": ["keys"], "parameters": [_ID],
                    "responses": {"200": _json(_KEY, "the key"), "401": _ERR, "404": _ERR}},
            "patch": {"summary": "Change name, team, metadata, scopes, limits or expiry", "tags": ["keys"],
                      "parameters": [_ID], "requestBody": _req(UpdateKey),
                      "responses": {"200": _json(_KEY, "updated"), "404": _ERR, **errs}},
        },
        "/keys/{key_id}/rotate": {
            "post": {"summary": "Issue a new secret; the old one works for the grace period", "tags": ["keys"],
                     "parameters": [_ID], "requestBody": _req(RotateKey, required=False),
                     "responses": {"200": _json(_KEY_WITH_SECRET, "rotated"), "404": _ERR, "409": _ERR, **errs}},
        },
        "/keys/{key_id}/revoke": {
            "post": {"summary": "Revoke a key for good", "tags": ["keys"], "parameters": [_ID],
                     "responses": {"200": _json(_KEY, "revoked"), "401": _ERR, "404": _ERR}},
        },
        "/keys/{key_id}/usage": {
            "get": {"summary": "Usage per UTC day and totals", "tags": ["keys"], "parameters": [
                _ID,
                {"name": "from", "in": "query", "schema": {"type": "string", "format": "date"},
                 "description": "First day (default: first day of this month)."},
                {"name": "to", "in": "query", "schema": {"type": "string", "format": "date"},
                 "description": "Last day, inclusive (default: today)."}],
                "responses": {"200": _json(_USAGE, "usage"), "400": _ERR, "401": _ERR, "404": _ERR}},
        },
    }
