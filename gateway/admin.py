"""The admin listener: health, readiness, metrics, config reload, the OpenAPI document, and the
routes plugins contribute. Everything but /healthz and /readyz needs the admin token."""
from __future__ import annotations

import gzip
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import asyncpg
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, PayloadEncodingError
from aiohttp.web_protocol import RequestPayloadError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import choose_encoder, gzip_accepted

from .db import DatabaseError, store_error
from .errors import UnsupportedMediaType, json_error
from .proxy import check_encoding, discard_unread_coded_body, undecodable_body_message, unsupported_encoding_message
from .writer import rejected
from .plugin import registry

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("gateway.admin")
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
ADMIN_IDENTITY = web.RequestKey("gateway.admin_identity", str)


def admin_identity(request: web.Request) -> str:
    """Who made an admin call (for the audit trail); never the token itself."""
    return request.get(ADMIN_IDENTITY, "admin")


def make_auth_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = token.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        h = request.headers.get("Authorization", "")
        # (surrogateescape: header bytes that are not UTF-8 compare as what they are, a wrong token)
        given = h[7:].strip().encode("utf-8", "surrogateescape") if h[:7].lower() == "bearer " else b""
        if not given:
            return json_error(401, "Admin token required (Authorization: Bearer <admin token>).",
                              "invalid_request_error", "admin_token_missing",
                              headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given, expected):
            return json_error(401, "Invalid admin token.", "invalid_request_error", "admin_token_invalid",
                              headers={"WWW-Authenticate": "Bearer"})
        request[ADMIN_IDENTITY] = "admin"
        if request.body_exists and "Content-Encoding" in request.headers:
            # as on the public listener: a coding aiohttp would pass through undecoded is refused,
            # not read as plain JSON
            check_encoding(request.headers.getall("Content-Encoding"))
        return await handler(request)

    return auth


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Admin errors in the same JSON shape as the public ones; never a traceback. A compressed body
    left unread (a refusal before it was read: a 401, a 413) is not decoded after the answer."""
    try:
        resp = await _answer(request, handler)
    except BaseException:
        discard_unread_coded_body(request)
        raise
    if discard_unread_coded_body(request) and not resp.prepared:
        resp.force_close()  # (Connection: close: the client's next request goes on a new connection)
    return resp


async def _answer(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 409: "conflict",
                413: "request_too_large", 422: "invalid_value"}.get(e.status, "error")
        msg = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        # A 405 says which methods the path takes (RFC 9110 requires Allow); the rebuilt body keeps it.
        keep = {h: e.headers[h] for h in ("Allow",) if h in e.headers}
        return json_error(e.status, msg, "invalid_request_error", code, headers=keep or None)
    except UnsupportedMediaType as e:
        return json_error(e.status, unsupported_encoding_message(), e.type, e.code)
    except (RequestPayloadError, ContentEncodingError, PayloadEncodingError):
        # a body that is not what its Content-Encoding says ("gzip" that is not): the caller's error
        return json_error(400, undecodable_body_message(), "invalid_request_error", "bad_request")
    except DBAPIError as e:
        if rejected(e):
            # a value the database cannot take (a NUL in a text, a number out of range): the caller's
            logging.getLogger("gateway.admin").info("admin %s %s: a value refused by the database",
                                                    request.method, request.path)
            return json_error(400, "A value in the request cannot be stored or searched for (e.g. it contains "
                                   "a NUL character, or a number is out of range).", "invalid_request_error",
                              "invalid_value")
        return _db_unavailable(request, e)
    except DB_UNAVAILABLE as e:
        # (SQLAlchemy before 2.1 passes on what asyncpg raises while connecting unwrapped: a
        # database refusing connections, too many clients, a password no longer accepted)
        return _db_unavailable(request, e)
    except Exception:
        logging.getLogger("gateway.admin").exception("admin handler failed: %s %s", request.method, request.path)
        return json_error(500, "The admin API failed to handle the request.", "server_error", "internal_error")


#: What a database that is down, frozen or refusing raises (past the DBAPIError cases above).
#: (SQLAlchemy before 2.1 passes on what asyncpg raises while connecting unwrapped: a database
#: refusing connections, too many clients, a password no longer accepted)
DB_UNAVAILABLE = (DBAPIError, SATimeoutError, DatabaseError, ConnectionError, TimeoutError, asyncpg.PostgresError,
                  asyncpg.InterfaceError)


def _db_unavailable(request: web.Request, e: BaseException) -> web.Response:
    """The database is down, frozen or refusing: the caller retries later. One line, no traceback
    (a driver's message can quote a connection URL)."""
    detail, refused = store_error(e)
    if refused:
        # SQLite refusing its file (read-only, disk full, a file size limit): "retry shortly" would
        # not help until someone fixes the file or the disk, so the answer says what it is.
        logging.getLogger("gateway.admin").error("admin %s %s: the database refuses the request (%s)",
                                                 request.method, request.path, detail)
        return json_error(503, f"The database refuses the request ({detail}); an operator must fix the "
                               "database file or its disk.", "server_error", "database_unavailable")
    logging.getLogger("gateway.admin").warning("admin %s %s: database unavailable (%s)", request.method,
                                               request.path, detail)
    return json_error(503, "The database is unavailable; retry shortly.", "server_error",
                      "database_unavailable", headers={"Retry-After": "5"})


#: Seconds an admin action's answer waits for its audit event to be written.
AUDIT_SETTLE_TIMEOUT = 5.0


def make_settle_middleware(gw: "Gateway") -> Callable[..., Awaitable[web.StreamResponse]]:
    """An admin action that changed something (a key revoked, conversations deleted, a reload) is
    answered once the audit events it emitted are written: an action confirmed to its caller is
    never lost from the trail by a crash right after. Reads are answered at once."""

    @web.middleware
    async def settle(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        resp = await handler(request)
        if request.method not in ("GET", "HEAD", "OPTIONS") and resp.status < 400 and not resp.prepared:
            if not await gw.services.events.settle(AUDIT_SETTLE_TIMEOUT):
                logging.getLogger("gateway.admin").warning(
                    "admin %s %s: answered before its audit event was written (the audit writer is behind "
                    "or failing)", request.method, request.path)
        return resp

    return settle


def build_admin_app(gw: "Gateway") -> web.Application:
    assert gw.cfg.admin.token
    app = web.Application(middlewares=[errors_middleware, make_auth_middleware(gw.cfg.admin.token),
                                       make_settle_middleware(gw)])

    async def server_header(_: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["Server"] = "gateway"  # not aiohttp's, which names its and Python's versions

    app.on_response_prepare.append(server_header)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if gw.stopping:  # stopping: drain_delay (still serving, so load balancers take it out), then draining
            return web.json_response({"status": "not_ready", "checks": {"shutdown": {"ok": False}}}, status=503)
        grace = gw.cfg.server.readiness_grace
        up_ok, up_detail = await gw.upstream.ready()
        up_ready, up_failing = gw.upstream.readiness(up_ok, grace)
        upstream: dict[str, Any] = {"ok": up_ok, "detail": up_detail}
        if up_failing is not None:
            upstream.update(failing_for=round(up_failing, 1), not_ready_after=grace if gw.upstream.ready_once else 0)
        database: dict[str, Any] = {"ok": True}
        db_ready = True
        if gw.db is not None and not await gw.db.answers():
            # Not ready once it has failed for server.readiness_grace: a database every instance
            # shares must not take the whole fleet out of the load balancer for a short restart.
            failing_for = gw.db.failing_for()
            db_ready = failing_for < grace
            database = {"ok": False, "failing_for": round(failing_for, 1), "not_ready_after": grace}
        # A database that answers a read but refuses writes (a full disk, a read-only file) shows
        # in the writers: one failing for a while makes the instance not ready, so a load balancer
        # sends traffic where its records are kept.
        failing, over = gw.services.failing_writers(grace)
        ok = up_ready and db_ready and not over
        writers: dict[str, Any] = {"ok": not failing, "failing": failing}
        if failing:
            writers["not_ready_after"] = grace
            # why (SQLite's error name and its meaning, or the error's class: nothing a driver's
            # message could carry, as this answer needs no token)
            why = {w.name: w.last_error for w in gw.services.writers() if w.name in failing and w.last_error}
            if why:
                writers["detail"] = "; ".join(f"{k}: {v}" for k, v in sorted(why.items()))
        body = {"status": "ready" if ok else "not_ready",
                "checks": {"upstream": upstream,
                           "database": database,
                           "writers": writers}}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        # The format the scraper asks for (Prometheus asks for OpenMetrics first), compressed when it
        # accepts gzip (Prometheus does; the text compresses several times over), as
        # prometheus-client's own exporters answer.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(gw.services.metrics)
        headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
        if gzip_accepted(request.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def reload(request: web.Request) -> web.Response:
        ok, detail = await gw.reload(actor=admin_identity(request))
        if ok:
            return web.json_response({"status": "reloaded", "plugins": [p.name for p in gw.cfg.plugins if p.enabled]})
        if gw.stopping:  # not the config's fault: nothing was read
            return json_error(503, f"Reload not applied: {detail}.", "server_error", "shutting_down")
        return json_error(400, f"Reload rejected, the running config is unchanged: {detail}",
                          "invalid_request_error", "config_invalid")

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(openapi_document(gw))

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/config/reload", reload)
    app.router.add_get("/openapi.json", openapi)
    # Every installed plugin's routes are mounted (the router is frozen once the listener runs), and
    # each answers only while its plugin is listed in the running config: a reload that adds or
    # removes a plugin adds or removes its admin API too, without a restart.
    seen = set()
    for name in sorted(registry.names()):
        cls = registry.get(name)
        if cls is None or cls in seen:
            continue
        seen.add(cls)
        try:
            defs = cls.admin_routes(gw.services)
        except Exception:
            if any(p.name == name for p in gw.cfg.plugins):
                raise
            log.exception("admin routes of the installed plugin %s are unavailable", name)
            continue
        app.router.add_routes([web.RouteDef(r.method, r.path, _while_configured(gw, name, r.handler), r.kwargs)
                               for r in defs])
    return app


def _while_configured(gw: "Gateway", name: str, handler: Any) -> Any:
    async def h(request: web.Request) -> web.StreamResponse:
        if not any(p.name == name for p in gw.cfg.plugins):
            return json_error(404, f"Not found: the {name} plugin is not in the running configuration.",
                              "invalid_request_error", "plugin_not_configured")
        return await handler(request)
    return h


_ERR = {"description": "Error (OpenAI error shape)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def operation_id(method: str, path: str) -> str:
    """``POST /keys/{key_id}/rotate`` -> ``postKeysKeyIdRotate``: derived from the route, so stable."""
    words = [method.lower()] + [w for part in path.strip("/").split("/")
                                for w in part.strip("{}").replace(".", "_").replace("-", "_").split("_") if w]
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:])


def _content(description: str, media: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


_CHECK = _obj(["ok"], ok={"type": "boolean"}, detail={"type": ["string", "null"]},
              failing={"type": "array", "items": {"type": "string"}},
              failing_for={"type": "number", "description": "seconds the database has failed to answer"},
              not_ready_after={"type": "number", "description": "server.readiness_grace"})
#: /readyz answers this shape with 200 (ready) and 503 (not ready, or draining: only the shutdown check)
_READY = _content("ready (200) or not (503), with each check", "application/json", _obj(
    ["status", "checks"], status={"enum": ["ready", "not_ready"]},
    checks={"type": "object", "additionalProperties": _CHECK}))


def openapi_document(gw: "Gateway") -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": _content(
            "alive", "application/json", _obj(["status"], status={"const": "ok"}))}}},
        "/readyz": {"get": {"summary": "Readiness: upstream and database reachable", "security": [],
                            "responses": {"200": _READY, "503": _READY}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": _content("Prometheus text format (OpenMetrics when Accept asks for "
                            "application/openmetrics-text; gzip with Accept-Encoding: gzip)",
                            CONTENT_TYPE_LATEST.split(";")[0], {"type": "string"}),
            "401": _ERR}}},
        "/config/reload": {"post": {"summary": "Validate gateway.yaml and swap it in atomically, or change nothing",
                                    "responses": {"200": _content("reloaded", "application/json", _obj(
                                        ["status", "plugins"], status={"const": "reloaded"},
                                        plugins={"type": "array", "items": {"type": "string"},
                                                 "description": "the enabled plugins, in chain order"})),
                                        "400": _ERR, "401": _ERR}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _content(
            "OpenAPI 3.1", "application/json", {"type": "object", "required": ["openapi", "paths"]})}}},
    }
    seen = set()
    for spec in gw.cfg.plugins:
        cls = registry.get(spec.name)
        if cls is None or cls in seen:
            continue
        seen.add(cls)
        paths.update(cls.openapi_paths())
    for path, ops in paths.items():
        tag = path.strip("/").split("/")[0] if path.startswith(("/keys", "/conversations", "/audit")) else "gateway"
        for method, op in ops.items():
            # For generated clients: a stable operationId and a tag on every operation, and the one
            # error shape as the answer for any status not listed (413, 500, 503 ...).
            op.setdefault("operationId", operation_id(method, path))
            op.setdefault("tags", [tag])
            op.setdefault("responses", {}).setdefault("default", _ERR)
    return {
        "openapi": "3.1.0",
        "info": {"title": "gateway admin API", "version": "1"},
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}}}}}},
        },
        "security": [{"adminToken": []}],
        "paths": paths,
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)
