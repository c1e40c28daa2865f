"""Deletes and purges of the same conversations running at once (two admins, two instances, the
retention task): each conversation is reported deleted, and so audited, once."""
from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from .test_conversations import chat, db, start  # noqa: F401  (db is a fixture)


async def test_each_conversation_is_reported_deleted_once(make_gateway: Any, db: dict[str, Any]) -> None:  # noqa: F811
    a = await start(make_gateway, db)
    b = await start(make_gateway, db, name="b.yaml")
    ids = []
    for i in range(30):
        st, h, _ = await chat(a, [{"role": "user", "content": f"hello {i}"}])
        assert st == 200
        ids.append(h["X-Conversation-ID"])
    await a.plugin("conversations").flush()
    sa, sb = (g.plugin("conversations").shared.store for g in (a, b))
    for cid in ids[:10]:  # four deletes of one conversation at once, on both instances' stores
        res = await asyncio.gather(sa.delete(cid), sb.delete(cid), sa.delete(cid), sb.delete(cid))
        assert sorted(res) == [False, False, False, True], (cid, res)
    later = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(days=1)  # (naive UTC, as stored)
    purged = await asyncio.gather(sa.purge(later), sb.purge(later), sa.purge(later))
    assert sorted(x for p in purged for x in p) == sorted(ids[10:]), purged
