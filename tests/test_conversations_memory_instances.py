"""conversations: memory mode with the turns of one conversation spread over two instances.

Two gateways on one database (SQLite file and PostgreSQL, ``db`` fixture), memory on, ``cache_ttl: 0``,
writers that only write when flushed (a long ``flush_interval``): a turn answered on one instance is
still queued there when the next turn of the conversation arrives at the other. Every turn is stored
in the one conversation the client was told, in the order the instances wrote them; no fork."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select

from gateway.plugins.conversations.store import C, T, row_message

from . import test_conversations
from .test_conversations import chat, start, stored

db = test_conversations.db  # the fixture: a SQLite file and a PostgreSQL database

MEMORY = {"memory": {"enabled": True}, "cache_ttl": 0, "flush_interval": 30.0}


async def _turn(g: Any, text: str, cid: str) -> str:
    """One memory-mode turn (the new message only); the answer's text."""
    st, h, body = await chat(g, [{"role": "user", "content": text}], cid)
    assert st == 200, body
    assert h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
    return body["choices"][0]["message"]["content"]


async def _write(g: Any) -> None:
    """Write what this instance has queued, now (its writer would wait flush_interval for more)."""
    w = g.plugin("conversations").shared.writer
    assert await w.settled_through(w.accepted, 10.0)


async def _forks(g: Any, cid: str) -> list[Any]:
    async with g.gw.db.engine.connect() as conn:
        return list((await conn.execute(select(C.c.id).where(C.c.parent_id == cid))).all())


async def test_memory_turns_alternating_between_instances_stay_in_the_conversation(
        make_gateway: Any, db: dict[str, Any], upstream: Any) -> None:
    """Turns alternate between A and B, each sent while the other's turn is still queued; the
    writers run in either order. No turn goes to a fork the client is never told of (the old
    write-time fork), and a repeated question with the same answer is a turn of its own."""
    a = await start(make_gateway, db, MEMORY)
    b = await make_gateway([{"name": "conversations", "config": MEMORY}], database=db, name="b.yaml")
    st, h, body = await chat(a, [{"role": "user", "content": "one"}])
    cid = h["X-Conversation-ID"]
    a1 = body["choices"][0]["message"]["content"]
    await _write(a)

    # Turn 2 on A, queued; turn 3 on B, which reads a history without turn 2. Then the same short
    # question on each (the demo backend answers it the same way both times): two turns, not one.
    a2 = await _turn(a, "two", cid)
    a3 = await _turn(b, "three", cid)
    await _write(a)
    await _write(b)
    a4 = await _turn(a, "yes", cid)
    a5 = await _turn(b, "yes", cid)
    assert a4 == a5
    await _write(b)  # B's written first this time
    await _write(a)
    a6 = await _turn(b, "six", cid)  # B's history has every turn again (cache_ttl 0)
    await _write(b)

    rows = await stored(a, cid)
    assert [(r.role, row_message(r)["content"]) for r in rows] == [
        ("user", "one"), ("assistant", a1), ("user", "two"), ("assistant", a2), ("user", "three"),
        ("assistant", a3), ("user", "yes"), ("assistant", a5), ("user", "yes"), ("assistant", a4),
        ("user", "six"), ("assistant", a6)]
    assert [r.position for r in rows] == list(range(12))
    assert all(r.status == "complete" for r in rows if r.role == "assistant")
    assert await _forks(a, cid) == []
    async with a.gw.db.engine.connect() as conn:
        assert (await conn.execute(select(T.c.conversation_id).where(T.c.conversation_id != cid))).all() == []
        t = (await conn.execute(select(T.c.first_position, T.c.messages_stored).where(
            T.c.conversation_id == cid).order_by(T.c.first_position))).all()
        row = (await conn.execute(select(C.c.message_count, C.c.turn_count).where(C.c.id == cid))).one()
    assert [(x.first_position, x.messages_stored) for x in t] == [(p, 2) for p in range(0, 12, 2)]
    assert (row.message_count, row.turn_count) == (12, 6)
    # the last turn, on B, was forwarded with the whole stored history, in that order
    forwarded = [m["content"] for m in upstream.requests[-1]["body"]["messages"]]
    assert forwarded == [row_message(r)["content"] for r in rows[:10]] + ["six"]


async def test_a_memory_client_resending_what_another_instance_stored_is_not_doubled(
        make_gateway: Any, db: dict[str, Any]) -> None:
    """With memory on, a client that resends the history (including a turn B has not seen yet,
    queued on A) is still recognised: the messages another instance stored meanwhile are not
    stored twice."""
    a = await start(make_gateway, db, MEMORY)
    b = await make_gateway([{"name": "conversations", "config": MEMORY}], database=db, name="b.yaml")
    st, h, body = await chat(a, [{"role": "user", "content": "one"}])
    cid = h["X-Conversation-ID"]
    hist = [{"role": "user", "content": "one"}, body["choices"][0]["message"]]
    await _write(a)
    st, h, body = await chat(a, hist + [{"role": "user", "content": "two"}], cid)
    hist += [{"role": "user", "content": "two"}, body["choices"][0]["message"]]
    st, h, body = await chat(b, hist + [{"role": "user", "content": "three"}], cid)
    assert st == 200 and h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
    hist += [{"role": "user", "content": "three"}, body["choices"][0]["message"]]
    await _write(a)
    await _write(b)
    rows = await stored(a, cid)
    assert [row_message(r)["content"] for r in rows] == [m["content"] for m in hist]
    assert await _forks(a, cid) == []


async def test_a_turn_on_another_instance_waits_for_a_first_turn_stored_late(
        make_gateway: Any, db: dict[str, Any], upstream: Any) -> None:
    """A conversation made on A, whose write is late (a busy machine, a slow database), and its
    next turn sent to B at once: B looks for it for a few seconds (the id says it was made a
    moment ago) instead of answering 404 after two flush intervals, and the turn goes through
    once A has written it. An id that is not new still gets the 404."""
    import asyncio

    late = {"cache_ttl": 0, "flush_interval": 30.0}
    a = await start(make_gateway, db, late)
    b = await make_gateway([{"name": "conversations", "config": {"cache_ttl": 0}}], database=db, name="b.yaml")
    first = [{"role": "user", "content": "one"}]
    st, h, body = await chat(a, first)
    cid = h["X-Conversation-ID"]
    turn2 = first + [body["choices"][0]["message"], {"role": "user", "content": "two"}]

    async def write_late() -> None:
        await asyncio.sleep(1.2)  # (B alone would have answered 404 after 0.2 s)
        await _write(a)

    writing = asyncio.create_task(write_late())
    st, h, body = await chat(b, turn2, cid)
    await writing
    assert st == 200 and h["X-Conversation-ID"] == cid, body
    st, h, body = await chat(b, turn2, "conv_000001" + cid[11:])  # made in 1970: not a late write
    assert st == 404 and body["error"]["code"] == "conversation_not_found"
