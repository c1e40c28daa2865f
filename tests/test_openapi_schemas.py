"""The admin API's OpenAPI document types every success response: real responses of a real gateway
(conversations, audit, key_auth) are checked against the schemas the document gives for them, with a
small validator for the part of JSON Schema the document uses (no jsonschema dependency)."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look something up",
                                           "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
_TYPES: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (type(v) is int) or (type(v) is float and v.is_integer()),
    "number": lambda v: type(v) in (int, float),
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _same(a: Any, b: Any) -> bool:
    """JSON equality (true is not 1)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def errors(schema: dict[str, Any], v: Any, doc: dict[str, Any], at: str = "$") -> list[str]:
    """Where ``v`` breaks ``schema``: type (one or a list), enum, const, properties, required,
    additionalProperties, items, oneOf, anyOf, allOf, $ref (#/...), format date-time / date."""
    if "$ref" in schema:
        target: Any = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return errors(target, v, doc, at)
    out: list[str] = []
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_TYPES[x](v) for x in types):
            return [f"{at}: {v!r} is not of type {t}"]
    if "enum" in schema and not any(_same(v, e) for e in schema["enum"]):
        out.append(f"{at}: {v!r} not in {schema['enum']}")
    if "const" in schema and not _same(v, schema["const"]):
        out.append(f"{at}: {v!r} is not {schema['const']!r}")
    fmt = schema.get("format")
    if isinstance(v, str) and fmt in ("date-time", "date"):
        try:
            parsed = dt.datetime.fromisoformat(v.replace("Z", "+00:00")) if fmt == "date-time" \
                else dt.date.fromisoformat(v)
            if fmt == "date-time" and parsed.tzinfo is None:
                out.append(f"{at}: {v!r} has no UTC offset")
        except ValueError:
            out.append(f"{at}: {v!r} is not a {fmt}")
    if isinstance(v, dict):
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            if k not in v:
                out.append(f"{at}: missing {k!r}")
        extra = schema.get("additionalProperties", True)
        for k, x in v.items():
            if k in props:
                out += errors(props[k], x, doc, f"{at}.{k}")
            elif extra is False:
                out.append(f"{at}: unexpected {k!r}")
            elif isinstance(extra, dict):
                out += errors(extra, x, doc, f"{at}.{k}")
    if isinstance(v, list) and "items" in schema:
        for i, x in enumerate(v):
            out += errors(schema["items"], x, doc, f"{at}[{i}]")
    for s in schema.get("allOf", []):
        out += errors(s, v, doc, at)
    if "anyOf" in schema and all(errors(s, v, doc, at) for s in schema["anyOf"]):
        out.append(f"{at}: matches none of anyOf")
    if "oneOf" in schema:
        n = sum(not errors(s, v, doc, at) for s in schema["oneOf"])
        if n != 1:
            out.append(f"{at}: matches {n} of oneOf, not 1: "
                       + "; ".join(e for s in schema["oneOf"] for e in errors(s, v, doc, at)[:3]))
    return out


def test_the_validator_refuses_what_breaks_a_schema() -> None:
    """(So a response that passes it was really checked.)"""
    s = {"type": "object", "required": ["a", "n"], "additionalProperties": False, "properties": {
        "a": {"type": ["string", "null"]}, "n": {"type": "integer"}, "k": {"const": "list"},
        "e": {"enum": ["x", "y"]}, "l": {"type": "array", "items": {"type": "boolean"}},
        "t": {"type": "string", "format": "date-time"}, "o": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}
    assert errors(s, {"a": None, "n": 1, "k": "list", "e": "x", "l": [True], "t": "2026-01-31T00:00:00.000001Z",
                      "o": 3}, {}) == []
    for bad in ({"n": 1}, {"a": 1, "n": 1}, {"a": "", "n": True}, {"a": "", "n": "1"}, {"a": "", "n": 1, "z": 0},
                {"a": "", "n": 1, "k": "lists"}, {"a": "", "n": 1, "e": "z"}, {"a": "", "n": 1, "l": [1]},
                {"a": "", "n": 1, "t": "yesterday"}, {"a": "", "n": 1, "o": 1.5}, [], None):
        assert errors(s, bad, {}), bad
    assert errors({"const": True}, 1, {}) and errors({"type": "number"}, False, {})


class Admin:
    """Admin API calls, each answer checked against the document's schema for its status."""

    def __init__(self, s: aiohttp.ClientSession, url: str, doc: dict[str, Any]) -> None:
        self.s, self.url, self.doc = s, url, doc
        self.called: set[tuple[str, str]] = set()

    async def __call__(self, method: str, doc_path: str, url_path: str | None = None, *, status: int = 200,
                       body: Any = None, **params: Any) -> Any:
        async with self.s.request(method, self.url + (url_path or doc_path), params=params, json=body) as r:
            text = await r.text()
            assert r.status == status, text
            media = r.headers["Content-Type"].split(";")[0]
        content = self.doc["paths"][doc_path][method.lower()]["responses"][str(status)]["content"]
        assert media in content, (doc_path, media, list(content))
        schema = content[media]["schema"]
        if media == "application/x-ndjson":  # the schema is one line's
            out = [json.loads(line) for line in text.splitlines()]
            assert out, (doc_path, "an export of nothing checks nothing")
        elif media.startswith("text/"):
            out = text
        else:
            out = json.loads(text)
        for i, value in enumerate(out if media == "application/x-ndjson" else [out]):
            problems = errors(schema, value, self.doc)
            assert problems == [], (method, url_path or doc_path, params, i, problems[:10])
        self.called.add((method.lower(), doc_path))
        return out


async def chat(g: Any, key: str, messages: list[dict[str, Any]], cid: str | None = None,
               **body: Any) -> tuple[int, dict[str, str], str]:
    h = {"Authorization": f"Bearer {key}"}
    if cid:
        h["X-Conversation-ID"] = cid
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", headers=h,
                          json={"model": "demo-chat", "messages": messages, **body}) as r:
            return r.status, dict(r.headers), await r.text()


async def test_every_success_response_matches_its_documented_schema(make_gateway: Any, tmp_path: Path) -> None:
    """Real data (plain, streamed and tool-call turns, a refused request, admin actions, a purge, a
    tampered row), then every conversations and audit operation: each answer fits its schema."""
    g = await make_gateway([{"name": "key_auth"}, {"name": "conversations"},
                            {"name": "audit", "config": {"flush_interval": 0.05}}])
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.get(g.admin_url + "/openapi.json") as r:
            doc = await r.json()
        # Every operation a client can be generated for has typed success responses, a stable
        # operationId and a tag.
        for path, item in doc["paths"].items():
            for method, op in item.items():
                assert op["operationId"] and op["tags"], (method, path)
                ok = {st: resp for st, resp in op["responses"].items() if st.startswith("2")}
                assert ok, (method, path)
                for st, resp in ok.items():
                    content = resp.get("content") or {}
                    assert content and all("schema" in m for m in content.values()), (method, path, st)
        admin = Admin(s, g.admin_url, doc)

        alice = await admin("POST", "/keys", status=201, body={"owner": "alice", "name": "a"})
        bob = await admin("POST", "/keys", status=201, body={"owner": "bob"})
        await admin("GET", "/keys")
        await admin("GET", "/keys/{key_id}", f"/keys/{alice['id']}")

        # plain, then a tool call and its result in the same conversation, then a streamed turn
        msgs: list[dict[str, Any]] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        st, h, text = await chat(g, alice["key"], msgs)
        assert st == 200, text
        cid = h["X-Conversation-ID"]
        msgs += [json.loads(text)["choices"][0]["message"], {"role": "user", "content": "look up zebras"}]
        st, h, text = await chat(g, alice["key"], msgs, cid, tools=TOOLS)
        call = json.loads(text)["choices"][0]["message"]
        assert st == 200 and call["tool_calls"], text
        msgs += [call, {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "striped"}]
        st, h, text = await chat(g, alice["key"], msgs, cid, stream=True, tools=TOOLS)
        assert st == 200 and "data: [DONE]" in text
        st, h, _ = await chat(g, alice["key"], [{"role": "user", "content": "second one"}], stream=True)
        other = h["X-Conversation-ID"]
        st, h, _ = await chat(g, bob["key"], [{"role": "user", "content": "bob here"}])
        bobs = h["X-Conversation-ID"]
        st, _, _ = await chat(g, "gw_not-a-key", [{"role": "user", "content": "x"}])
        assert st == 401
        await admin("GET", "/keys/{key_id}/usage", f"/keys/{alice['id']}/usage")

        # conversations
        page = await admin("GET", "/conversations")
        assert {c["id"] for c in page["data"]} == {cid, other, bobs} and page["next_cursor"] is None
        page = await admin("GET", "/conversations", limit=1)
        assert page["has_more"] and page["next_cursor"]
        await admin("GET", "/conversations", limit=1, cursor=page["next_cursor"], owner="alice", q="zebra")
        one = await admin("GET", "/conversations/{cid}", f"/conversations/{cid}", turns="true")
        roles = [m["role"] for m in one["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant", "tool", "assistant"], roles
        assert any(m.get("tool_calls") for m in one["messages"]) and len(one["turns"]) == 3
        assert {t["stream"] for t in one["turns"]} == {True, False} and one["next_after"] is None
        part = await admin("GET", "/conversations/{cid}", f"/conversations/{cid}", limit=2, after=0)
        assert part["has_more"] and part["next_after"] == 2 and "turns" not in part
        lines = await admin("GET", "/conversations/{cid}/export", f"/conversations/{cid}/export")
        assert [m["position"] for m in lines] == list(range(7))
        lines = await admin("GET", "/conversations/export", owner="alice")
        assert {m["conversation_id"] for m in lines} == {cid, other}
        assert (await admin("POST", "/conversations/purge", older_than_days="30"))["deleted"] == 0
        assert (await admin("DELETE", "/conversations/{cid}", f"/conversations/{other}"))["deleted"] is True
        assert (await admin("DELETE", "/conversations", owner="bob"))["deleted"] == 1

        # audit: request events (proxied, refused), admin events; then a purge, its anchor, a broken link
        deadline = time.monotonic() + 15
        while True:
            reqs = await admin("GET", "/audit", type="request,auth_failure")
            if len(reqs["data"]) >= 6 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert {e["type"] for e in reqs["data"]} == {"request", "auth_failure"}, reqs
        assert any(e.get("tokens_in") for e in reqs["data"]) and any(e["streamed"] for e in reqs["data"])
        events = (await admin("GET", "/audit", order="asc", limit=1000))["data"]
        assert {"key.created", "conversation.exported", "conversation.deleted"} <= {e["type"] for e in events}
        page = await admin("GET", "/audit", limit=2)
        assert page["next_cursor"]
        await admin("GET", "/audit", limit=2, cursor=page["next_cursor"])
        v = await admin("GET", "/audit/verify")
        assert v["ok"] and v["anchor"] is None and v["broken"] is None

        from gateway.plugins.audit import store as audit_store
        await audit_store.purge(g.gw.db, audit_store.iso(time.time() + 1))
        purged = (await admin("GET", "/audit"))["data"]
        assert [e["type"] for e in purged] == ["audit.purged"] and purged[0]["anchor"]
        v = await admin("GET", "/audit/verify")
        assert v["ok"] and v["anchor"] is not None
        with sqlite3.connect(tmp_path / "gateway.db") as c:
            c.execute("UPDATE audit_events SET data = replace(data, 'retention', 'someone') "
                      "WHERE type = 'audit.purged'")
        v = await admin("GET", "/audit/verify")
        assert not v["ok"] and v["broken"]["problem"] == "edited"

        # the gateway's own routes
        assert (await admin("GET", "/healthz"))["status"] == "ok"
        ready = await admin("GET", "/readyz")
        assert ready["status"] == "ready" and ready["checks"]["upstream"]["ok"]
        assert "gateway_config_reloads_total" in await admin("GET", "/metrics")
        assert (await admin("POST", "/config/reload"))["plugins"] == ["key_auth", "conversations", "audit"]
        assert (await admin("GET", "/openapi.json"))["paths"] == doc["paths"]

    documented = {(m, p) for p, item in doc["paths"].items() for m in item if not p.startswith("/keys")}
    assert documented <= admin.called, documented - admin.called
