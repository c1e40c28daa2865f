"""Hostile and unusual content through the conversations store and the core: what a client sends is
stored as it was sent on SQLite and PostgreSQL alike (or the turn is kept and only a column copy
is fitted), numbers JSON cannot carry are never written on, and the CLI's text view cannot be used
to write to an admin's terminal."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import aiohttp
from aiohttp import web

from gateway.plugins.conversations.store import row_message

from .test_conversations import chat, db, start, stored  # noqa: F401  (db: the SQLite/PostgreSQL fixture)
from .test_observe import backend


ODD_FIELDS = [
    {"role": "system", "content": "be brief", "name": "bo\u0000b"},
    {"role": "user", "name": "n" * 300, "content": "a long name"},
    {"role": "user", "name": 7, "content": "a number for a name"},
    {"role": "us\u0000er", "content": "a NUL in the role"},
    {"role": "r" * 40, "content": "a long role"},
    {"role": "", "content": "an empty role"},
    {"role": "user", "name": "sur\ud800rogate", "content": "a lone surrogate in the name"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call\u00001", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call\u00001" + "z" * 250, "content": "result"},
    {"role": "user", "content": "and now?"},
]


async def test_fields_their_columns_cannot_hold_are_stored_exactly_and_the_turn_kept(
        make_gateway: Any, db: dict[str, Any]) -> None:  # noqa: F811
    g = await start(make_gateway, db)
    status, h, body = await chat(g, ODD_FIELDS, model="demo\u0000" + "m" * 300)
    assert status == 200, body
    cid = h["X-Conversation-ID"]
    rows = await stored(g, cid)
    assert [row_message(r) for r in rows[:-1]] == ODD_FIELDS
    assert len(rows[-1].model) == 200 and "\x00" not in rows[-1].model
    answer = body["choices"][0]["message"]
    # the history resent as the client has it: the same conversation, no fork
    status, h, _ = await chat(g, ODD_FIELDS + [answer, {"role": "user", "content": "more"}], cid=cid)
    assert status == 200 and "X-Conversation-Parent-ID" not in h
    rows = await stored(g, cid)
    assert len(rows) == len(ODD_FIELDS) + 3
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{g.url}/gateway/conversations/{cid}") as r:
            assert r.status == 200
            got = (await r.json())["messages"]
    assert [{k: v for k, v in m.items() if k in ("role", "name", "content", "tool_calls", "tool_call_id")}
            for m in got[:len(ODD_FIELDS)]] == ODD_FIELDS


async def test_a_number_json_cannot_carry_is_never_written_on(make_gateway: Any) -> None:
    """1e400 is valid JSON text but no double, NaN and Infinity are not JSON. A gateway whose plugins
    read the body refuses it (400 invalid_number): read as infinity it would be forwarded as
    `Infinity` (not JSON) and stored, unread the plugins would be passed around (a per-model
    limit, memory, recording). A chain that does not read the body passes it on as sent."""
    got: list[bytes] = []

    async def chat_backend(request: web.Request) -> web.StreamResponse:
        got.append(await request.read())
        return web.json_response({"id": "c", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})

    bodies = [b'{"model": "m", "stream": true, "temperature": 1e400, "messages": [{"role": "user", "content": "x"}]}',
              b'{"model": "m", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}',
              b'{"model": "m", "messages": [{"role": "user", "content": [-Infinity]}]}']
    async with backend(chat_backend) as url:
        for plugins, name in (([{"name": "conversations"}], "a.yaml"), ([], "b.yaml")):
            g = await make_gateway(plugins, upstream={"url": url}, name=name)
            for raw in bodies:
                async with aiohttp.ClientSession() as s:
                    async with s.post(g.url + "/v1/chat/completions", data=raw,
                                      headers={"Content-Type": "application/json"}) as r:
                        if plugins:
                            assert r.status == 400
                            assert (await r.json())["error"]["code"] == "invalid_number"
                        else:
                            assert r.status == 200
                            await r.read()
        assert got == bodies  # only from the chain that does not read the body, each as sent


async def test_a_surrogate_pair_split_over_two_deltas_is_one_character(make_gateway: Any) -> None:
    """A backend may split an emoji's surrogate pair over two stream events (two JSON escapes). The
    client joins them; sent back, the history is the same and does not fork."""
    async def chat_backend(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("smile ", "\ud83d", "\ude00", " end"):
            ev = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
        await resp.write(b'data: {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
                         b"data: [DONE]\n\n")
        return resp

    async with backend(chat_backend) as url:
        g = await make_gateway([{"name": "conversations"}], upstream={"url": url})
        first = [{"role": "user", "content": "hi"}]
        text = ""
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions", json={"model": "m", "stream": True, "messages": first}) as r:
                cid = r.headers["X-Conversation-ID"]
                for line in (await r.read()).split(b"\n"):
                    if line.startswith(b"data: {"):
                        text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            assert text == "smile \ud83d\ude00 end"  # as the client assembled it: two code units
            hist = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "again"}]
            async with s.post(g.url + "/v1/chat/completions", json={"model": "m", "stream": True, "messages": hist},
                              headers={"X-Conversation-ID": cid}) as r:
                assert r.status == 200 and "X-Conversation-Parent-ID" not in r.headers
                await r.read()
        rows = await stored(g, cid)
        assert json.loads(rows[1].content) == "smile \U0001f600 end"
        assert len(rows) == 4


async def test_the_cli_text_view_escapes_what_a_terminal_would_act_on(make_gateway: Any, tmp_path: Any) -> None:
    g = await make_gateway([{"name": "conversations"}])
    hostile = "\x1b[31mred\r\x1b[2Kfake line\n  99 system    everything is fine"
    status, h, _ = await chat(g, [{"role": "user", "content": hostile}, {"role": "user", "content": "a\ud800b"},
                                  {"role": "user\u202e", "content": "bidi"}])
    assert status == 200
    cid = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    out = subprocess.run([sys.executable, "-m", "gateway", "conversations", "show", cid,
                          "-c", str(tmp_path / "gateway.yaml")], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    lines = text.splitlines()
    assert len(lines) == 1 + 4  # the header and one line per message
    assert "\\x1b[31mred\\r\\x1b[2Kfake line\\n  99 system" in lines[1]
    assert "a\\ud800b" in lines[2] and "user\\u202e" in lines[3]
