"""The caller's conversation list: what a chat UI shows as "your conversations"."""
from __future__ import annotations

from typing import Any

import aiohttp

from .helpers import ADMIN_TOKEN, until

CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}


async def test_failed_first_turns_leave_no_entry_in_the_callers_list(make_gateway: Any) -> None:
    """An upstream error on a new conversation's first turn (the OpenAI SDKs retry it twice, each a
    new conversation) stores no message: those conversations are readable by their id and listed
    on the admin API, but the caller's list shows only conversations holding messages."""
    g = await make_gateway([{"name": "conversations", "config": {"flush_interval": 0.05}}])
    failed: list[str] = []
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(g.url + "/v1/chat/completions", json=CHAT, headers={"X-Demo-Status": "502"}) as r:
                assert r.status == 502
                failed.append(r.headers["X-Conversation-ID"])
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            ok = r.headers["X-Conversation-ID"]
        async def all_four() -> Any:
            async with s.get(g.admin_url + "/conversations", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                got = await r.json()
            return got if len(got["data"]) == 4 else None

        admin = await until(all_four, what="the writer to store all four")
        async with s.get(g.url + "/gateway/conversations") as r:
            listed = await r.json()
        async with s.get(g.url + f"/gateway/conversations/{failed[0]}") as r:
            assert r.status == 200
            one = await r.json()
    assert [c["id"] for c in listed["data"]] == [ok] and listed["has_more"] is False
    assert sorted(c["id"] for c in admin["data"]) == sorted(failed + [ok])
    assert one["messages"] == [] and one["message_count"] == 0


async def test_empty_or_null_paging_parameters_are_absent(make_gateway: Any) -> None:
    """`?limit=&after=` (a form left empty) and `after=null` (a template filled with a null
    next_after) read as not given, as `cursor=` does; a value that is no integer is still a 400."""
    g = await make_gateway([{"name": "conversations", "config": {"flush_interval": 0.05}}])
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            cid = r.headers["X-Conversation-ID"]
        await g.plugin("conversations").flush()
        for query in ("?limit=&cursor=", "?limit=null&cursor=null"):
            async with s.get(g.url + "/gateway/conversations" + query) as r:
                assert r.status == 200, await r.text()
                assert [c["id"] for c in (await r.json())["data"]] == [cid]
        for query in ("?after=&limit=", "?after=null"):
            async with s.get(g.url + f"/gateway/conversations/{cid}" + query) as r:
                assert r.status == 200, await r.text()
                assert [m["position"] for m in (await r.json())["messages"]] == [0, 1]
        async with s.get(g.url + f"/gateway/conversations/{cid}?after=x") as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "after"
