"""conversations' external_ids: a client (a chat front-end) names its chats with ids of its own and
resends the whole history each turn, with side requests (titles, follow-ups) under the same id.
Each chat is stored once, continued across restarts, forked on a regenerate or an edit; a name is
the caller's own. On SQLite and PostgreSQL."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import aiohttp
from sqlalchemy import func, select

from gateway.plugins.conversations.store import C, M

from .helpers import ADMIN_TOKEN
from .test_conversations import db  # noqa: F401  (the fixture: SQLite and PostgreSQL)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
UI = {"external_ids": True, "external_id_header": "X-OpenWebUI-Chat-Id"}


async def start(make_gateway: Any, db: dict[str, Any], conv: dict[str, Any], name: str = "gateway.yaml") -> Any:
    return await make_gateway([{"name": "key_auth"}, {"name": "conversations", "config": conv}], database=db,
                              name=name)


async def new_key(g: Any, owner: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", json={"owner": owner}, headers=ADMIN) as r:
            assert r.status == 201, await r.text()
            return str((await r.json())["key"])


async def chat(g: Any, key: str, messages: list[dict[str, Any]], headers: dict[str, str]
               ) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json={"model": "demo-chat", "messages": messages},
                          headers={"Authorization": f"Bearer {key}", **headers},
                          timeout=aiohttp.ClientTimeout(total=20)) as r:
            return r.status, dict(r.headers), await r.json()


async def raw_chat(g: Any, key: str, conversation_id: bytes) -> tuple[int, Any]:
    body = json.dumps({"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
    port = int(g.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode() +
                 b"\r\nX-Conversation-ID: " + conversation_id + b"\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    answer = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


async def rows(g: Any) -> list[Any]:
    await g.plugin("conversations").flush()
    async with g.gw.db.engine.connect() as conn:
        return list((await conn.execute(select(C).order_by(C.c.created_at))).all())


async def message_rows(g: Any) -> int:
    async with g.gw.db.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(M))).scalar())


async def ui_turns(g: Any, key: str, chat_id: str, msgs: list[dict[str, Any]], n: int, start: int = 0) -> str:
    """``n`` turns as a chat front-end sends them: the whole history, then a side request (a title)
    with the history pasted into one message, both under the chat's id. The main turns' id."""
    cid = ""
    for t in range(start, start + n):
        msgs.append({"role": "user", "content": f"question {t}"})
        st, h, b = await chat(g, key, msgs, {"X-OpenWebUI-Chat-Id": chat_id})
        assert st == 200, b
        assert not cid or h["X-Conversation-ID"] == cid, "a turn of the chat started another conversation"
        cid = h["X-Conversation-ID"]
        msgs.append(b["choices"][0]["message"])
        side = [{"role": "user", "content": "### Task: a title for this chat\n" + json.dumps(msgs)}]
        st, h, b = await chat(g, key, side, {"X-OpenWebUI-Chat-Id": chat_id})
        assert st == 200 and h["X-Conversation-ID"] != cid
    return cid


async def test_a_named_chat_is_stored_once_and_continued_after_a_restart(make_gateway: Any,
                                                                          db: dict[str, Any]) -> None:
    g = await start(make_gateway, db, UI)
    key = await new_key(g, "alice")
    msgs: list[dict[str, Any]] = []
    cid = await ui_turns(g, key, "chat-7f3e", msgs, 10)
    got = await rows(g)
    # one conversation for the chat (20 messages), one per side request (2 each): 40 rows in all,
    # where a new conversation per request stored 2 + 4 + ... + 20 = 110 rows for the chat alone
    assert [r.message_count for r in got if r.id == cid] == [20]
    assert len(got) == 11 and sorted(r.message_count for r in got if r.id != cid) == [2] * 10
    assert {r.external_id for r in got} == {"chat-7f3e"}
    assert await message_rows(g) == 40
    await g.stop()
    # A new process (nothing cached): the name is found in the database
    g2 = await start(make_gateway, db, UI, name="again.yaml")
    assert await ui_turns(g2, key, "chat-7f3e", msgs, 2, start=10) == cid
    got = await rows(g2)
    assert [r.message_count for r in got if r.id == cid] == [24] and len(got) == 13
    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as s:  # the caller API shows the client's id, and finds by it
        async with s.get(f"{g2.url}/gateway/conversations/{cid}", headers=auth) as r:
            assert (await r.json())["external_id"] == "chat-7f3e"
        async with s.get(f"{g2.url}/gateway/conversations?external_id=chat-7f3e&limit=100", headers=auth) as r:
            assert len((await r.json())["data"]) == 13
        async with s.get(f"{g2.url}/gateway/conversations?external_id=other", headers=auth) as r:
            assert (await r.json())["data"] == []
        async with s.get(f"{g2.admin_url}/conversations?external_id=chat-7f3e&limit=100", headers=ADMIN) as r:
            assert len((await r.json())["data"]) == 13
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "conversations", "list",
                                                 "--external-id", "chat-7f3e", "--limit", "100", "--json",
                                                 "-c", str(g2.gw.cfg.path)], capture_output=True, text=True,
                                timeout=60)
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)["data"]
    assert len(listed) == 13 and {c["external_id"] for c in listed} == {"chat-7f3e"}


async def test_regenerate_and_edit_fork_once_and_later_turns_continue_the_fork(make_gateway: Any,
                                                                                 db: dict[str, Any]) -> None:
    g = await start(make_gateway, db, UI)
    key = await new_key(g, "alice")
    msgs: list[dict[str, Any]] = []
    cid = await ui_turns(g, key, "c1", msgs, 3)
    # regenerate the last answer: the history without it (a fork of the 5 messages before it)
    st, h, b = await chat(g, key, msgs[:-1], {"X-OpenWebUI-Chat-Id": "c1"})
    fork = h["X-Conversation-ID"]
    assert fork != cid and h["X-Conversation-Parent-ID"] == cid
    msgs = msgs[:-1] + [b["choices"][0]["message"], {"role": "user", "content": "after the regenerate"}]
    st, h, b = await chat(g, key, msgs, {"X-OpenWebUI-Chat-Id": "c1"})
    assert h["X-Conversation-ID"] == fork and "X-Conversation-Parent-ID" not in h
    # edit the first question: shares no message with any stored one, a new conversation of the name
    st, h, b = await chat(g, key, [{"role": "user", "content": "question 0, edited"}], {"X-OpenWebUI-Chat-Id": "c1"})
    edited = h["X-Conversation-ID"]
    st, h, _ = await chat(g, key, [{"role": "user", "content": "question 0, edited"}, b["choices"][0]["message"],
                                   {"role": "user", "content": "and then"}], {"X-OpenWebUI-Chat-Id": "c1"})
    assert h["X-Conversation-ID"] == edited
    by_id = {r.id: r for r in await rows(g)}
    assert by_id[cid].message_count == 6 and by_id[fork].message_count == 8 and by_id[edited].message_count == 4
    assert by_id[fork].external_id == by_id[edited].external_id == "c1"


async def test_a_name_is_each_owners_own_and_x_conversation_id_takes_client_ids(make_gateway: Any,
                                                                                db: dict[str, Any]) -> None:
    g = await start(make_gateway, db, {"external_ids": True})
    alice, bob = await new_key(g, "alice"), await new_key(g, "bob")
    first = [{"role": "user", "content": "alice's secret"}]
    st, h, b = await chat(g, alice, first, {"X-Conversation-ID": "shared-name"})
    assert st == 200
    a_cid = h["X-Conversation-ID"]
    assert a_cid != "shared-name" and a_cid.startswith("conv_")
    # bob with the same name and the same history: a conversation of his own
    st, h, _ = await chat(g, bob, first + [b["choices"][0]["message"], {"role": "user", "content": "more"}],
                          {"X-Conversation-ID": "shared-name"})
    assert st == 200 and h["X-Conversation-ID"] != a_cid
    async with aiohttp.ClientSession() as s:
        async with s.get(g.url + "/gateway/conversations", headers={"Authorization": f"Bearer {bob}"}) as r:
            listed = (await r.json())["data"]
    assert [c["id"] for c in listed] == [h["X-Conversation-ID"]] and listed[0]["message_count"] == 4
    # alice continues hers by name, and by the gateway's id too
    st, h, _ = await chat(g, alice, first + [b["choices"][0]["message"], {"role": "user", "content": "next"}],
                          {"X-Conversation-ID": "shared-name"})
    assert h["X-Conversation-ID"] == a_cid
    st, h, _ = await chat(g, alice, [{"role": "user", "content": "x"}], {"X-Conversation-ID": a_cid})
    assert st == 200  # (a fork of it: the history differs)
    # a gateway-format id nobody made is still unknown, and names are checked
    st, _, b = await chat(g, alice, first, {"X-Conversation-ID": "conv_doesnotexist0000000000"})
    assert st == 404 and b["error"]["code"] == "conversation_not_found"
    for bad in (b"a\tb", b"x" * 201):  # (raw: a tab is the one control character HTTP lets through)
        st, b = await raw_chat(g, alice, bad)
        assert st == 400 and b["error"]["param"] == "X-Conversation-ID", b


async def test_without_external_ids_a_client_value_is_unknown(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db, {})
    key = await new_key(g, "alice")
    st, _, b = await chat(g, key, [{"role": "user", "content": "hi"}], {"X-Conversation-ID": "my-chat"})
    assert st == 404 and b["error"]["code"] == "conversation_not_found"


async def test_memory_continues_the_name_s_latest_conversation(make_gateway: Any, db: dict[str, Any],
                                                              upstream: Any) -> None:
    g = await start(make_gateway, db, {**UI, "memory": {"enabled": True}})
    key = await new_key(g, "alice")
    st, h, b = await chat(g, key, [{"role": "user", "content": "my name is Ada"}], {"X-OpenWebUI-Chat-Id": "m1"})
    cid = h["X-Conversation-ID"]
    st, h, b = await chat(g, key, [{"role": "user", "content": "what is my name?"}], {"X-OpenWebUI-Chat-Id": "m1"})
    assert st == 200 and h["X-Conversation-ID"] == cid
    sent = upstream.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["my name is Ada", "what is my name?"]


async def test_memory_a_regenerate_of_a_whole_history_forks_instead_of_doubling_it(
        make_gateway: Any, db: dict[str, Any], upstream: Any) -> None:
    """A front-end with memory on still sends its whole history: a regenerated answer resends it
    without the last answer. The upstream gets it as sent (not the stored history with it again),
    the new answer is a fork, and the next turn, under the chat's name, continues the fork."""
    g = await start(make_gateway, db, {**UI, "memory": {"enabled": True}})
    key = await new_key(g, "alice")
    msgs: list[dict[str, Any]] = []
    cid = ""
    for t in range(3):
        msgs.append({"role": "user", "content": f"question {t}"})
        st, h, b = await chat(g, key, msgs, {"X-OpenWebUI-Chat-Id": "r1"})
        assert st == 200 and (not cid or h["X-Conversation-ID"] == cid)
        cid = h["X-Conversation-ID"]
        assert len(upstream.requests[-1]["body"]["messages"]) == len(msgs)  # the resent history dropped
        msgs.append(b["choices"][0]["message"])
    st, h, b = await chat(g, key, msgs[:-1], {"X-OpenWebUI-Chat-Id": "r1"})
    assert st == 200 and h["X-Conversation-Parent-ID"] == cid
    fork = h["X-Conversation-ID"]
    assert [m["content"] for m in upstream.requests[-1]["body"]["messages"]] == \
        [m["content"] for m in msgs[:-1]]
    msgs = msgs[:-1] + [b["choices"][0]["message"], {"role": "user", "content": "question 3"}]
    st, h, b = await chat(g, key, msgs, {"X-OpenWebUI-Chat-Id": "r1"})
    assert st == 200 and h["X-Conversation-ID"] == fork
    assert [m["content"] for m in upstream.requests[-1]["body"]["messages"]] == [m["content"] for m in msgs]
    by_id = {r.id: r for r in await rows(g)}
    assert by_id[cid].message_count == 6 and by_id[fork].message_count == 8


async def test_many_side_requests_and_memory_keep_the_chat_apart(make_gateway: Any, db: dict[str, Any],
                                                                 upstream: Any) -> None:
    """A front-end's side requests (10 a turn here) never push its chat out of the conversations a
    name looks at, and with memory on they are not taken for the chat's next turns once the client
    has resent its history (from its second turn: a first turn alone does not tell)."""
    for memory in (False, True):
        g = await start(make_gateway, db, {**UI, "memory": {"enabled": memory}}, name=f"m{memory}.yaml")
        key = await new_key(g, f"owner-{memory}")
        msgs: list[dict[str, Any]] = []
        cid = ""
        for t in range(3):
            msgs.append({"role": "user", "content": f"question {t}"})
            st, h, b = await chat(g, key, msgs, {"X-OpenWebUI-Chat-Id": "busy"})
            assert st == 200 and (not cid or h["X-Conversation-ID"] == cid), (memory, t)
            cid = h["X-Conversation-ID"]
            # what the upstream got is what the client sent: no side request in it, nothing twice
            assert [m["content"] for m in upstream.requests[-1]["body"]["messages"]] == \
                [m["content"] for m in msgs], memory
            msgs.append(b["choices"][0]["message"])
            for n in range(10 if t or not memory else 0):
                side = [{"role": "user", "content": f"### Task {n}: about this chat\n" + json.dumps(msgs)}]
                st, h, _ = await chat(g, key, side, {"X-OpenWebUI-Chat-Id": "busy"})
                assert st == 200 and h["X-Conversation-ID"] != cid
        by_id = {r.id: r for r in await rows(g) if r.owner == f"owner-{memory}"}
        assert by_id[cid].message_count == 6 and len(by_id) == (21 if memory else 31), memory
        await g.stop()


async def test_a_mistyped_gateway_id_is_unknown_not_a_name(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db, {"external_ids": True})
    key = await new_key(g, "alice")
    st, h, _ = await chat(g, key, [{"role": "user", "content": "hi"}], {})
    st, _, b = await chat(g, key, [{"role": "user", "content": "hi"}], {"X-Conversation-ID": h["X-Conversation-ID"][:-1]})
    assert st == 404 and b["error"]["code"] == "conversation_not_found"
