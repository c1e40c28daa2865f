"""The background batch writer: a record the store rejects is isolated, the rest of its batch lands."""
from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc

from gateway.writer import BatchWriter, WriterMetrics


async def test_a_rejected_record_is_dropped_alone_and_counted():
    stored: list[int] = []
    calls: list[int] = []

    async def write(batch: Sequence[int]) -> None:
        calls.append(len(batch))
        if 13 in batch:
            raise ValueError("the store cannot hold record 13")
        stored.extend(batch)

    reg = CollectorRegistry()
    w = BatchWriter("t", write, WriterMetrics(reg), batch_size=100, flush_interval=0.05, retry_for=5)
    w.start()
    for i in range(40):
        assert await w.put(i)
    await w.flush(timeout=10)
    await w.close()
    assert sorted(stored) == [i for i in range(40) if i != 13]
    assert stored == sorted(stored)  # order kept
    assert w.dropped == 1 and w.written == 39
    assert reg.get_sample_value("gateway_writer_dropped_total", {"writer": "t", "reason": "rejected"}) == 1
    assert calls[0] == 40 and len(calls) < 20  # halving, not one write per record


async def test_a_store_fault_that_rejects_everything_is_retried_whole(caplog):
    """Not one bad record: the database lacks a table. No halving; retried, then counted, and the
    line that gives up says how many attempts it made (one, when a single attempt took all of
    retry_for: no "after retries")."""
    calls: list[int] = []

    async def write(batch: Sequence[int]) -> None:
        calls.append(len(batch))
        raise sa_exc.ProgrammingError("INSERT", {}, Exception('relation "audit_events" does not exist'))

    w = BatchWriter("t", write, WriterMetrics(CollectorRegistry()), batch_size=100, flush_interval=0.05,
                    retry_for=0.3)
    w.start()
    for i in range(10):
        await w.put(i)
    with caplog.at_level(logging.ERROR, logger="gateway.writer"):
        await w.flush(timeout=10)
        await w.close()
    assert w.dropped == 10 and w.written == 0
    assert set(calls) == {10} and len(calls) <= 6
    gave_up = [r.getMessage() for r in caplog.records if "giving up" in r.getMessage()]
    assert len(gave_up) == 1 and f"after {len(calls)} attempt(s) in 0." in gave_up[0], gave_up


async def test_an_unavailable_store_is_retried_whole_not_split(caplog):
    caplog.set_level(logging.WARNING, logger="gateway.writer")
    calls: list[int] = []
    down = [True]

    async def write(batch: Sequence[int]) -> None:
        calls.append(len(batch))
        if down[0]:
            raise sa_exc.OperationalError("INSERT", {}, Exception("database is locked"))

    w = BatchWriter("t", write, WriterMetrics(CollectorRegistry()), batch_size=100, flush_interval=0.05,
                    retry_for=10)
    w.start()
    for i in range(10):
        await w.put(i)
    await asyncio.sleep(0.4)
    down[0] = False
    await w.flush(timeout=10)
    await w.close()
    assert w.written == 10 and w.dropped == 0
    assert set(calls) == {10}  # every attempt carried the whole batch
    # the end of the outage is logged once, with how long it lasted
    again = [r.getMessage() for r in caplog.records if "go through again" in r.getMessage()]
    assert len(again) == 1 and again[0].startswith("writer t: writes go through again, after 0."), again


async def test_a_value_sqlite_has_no_type_for_is_a_rejected_record(tmp_path):
    """A record carrying a value the driver cannot bind (a list, from an upstream answering in an odd
    shape) is the store refusing that record: the rest of its batch lands at once."""
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (v)"))

    async def write(batch: Sequence[object]) -> None:
        with engine.begin() as c:
            c.execute(text("INSERT INTO t (v) VALUES (:v)"), [{"v": v} for v in batch])

    w = BatchWriter("t", write, WriterMetrics(CollectorRegistry()), batch_size=100, flush_interval=0.05,
                    retry_for=30)
    w.start()
    for v in [1, 2, ["a"], 4]:
        await w.put(v)
    async with asyncio.timeout(10):  # not 30 s of retries
        await w.flush(timeout=10)
    await w.close()
    with engine.connect() as c:
        assert [r[0] for r in c.execute(text("SELECT v FROM t ORDER BY rowid"))] == [1, 2, 4]
    assert w.dropped == 1 and w.written == 3


async def test_a_hung_store_does_not_hold_a_shutdown():
    """A write that never returns (a frozen database) is abandoned at the retry budget: closing
    writers on such a store takes about one shutdown budget, all writers together, and every record
    is counted."""
    import time

    from gateway.services import Services

    async def hang(batch: Sequence[int]) -> None:
        await asyncio.Event().wait()

    services = Services(None, None)  # type: ignore[arg-type]  # only the resource registry is used
    writers = [services.resource(f"w{i}", lambda i=i: services.writer(
        f"w{i}", hang, batch_size=10, flush_interval=0.05, retry_for=60, shutdown_retry_for=1.0),
        close=lambda w: w.close()) for i in range(3)]
    for w in writers:
        w.start()
        for i in range(5):
            await w.put(i)
    await asyncio.sleep(0.2)  # the first attempts are under way (and hang)
    t0 = time.monotonic()
    async with asyncio.timeout(20):
        await services.close()
    took = time.monotonic() - t0
    assert took < 8, took  # bounds a hang: about one shutdown budget (1 s), not 3 writers x 10 s or more
    assert all(w.dropped == 5 and w.written == 0 for w in writers)


def test_driver_errors_that_refuse_one_record_are_recognised():
    """A store that calls sqlite3 directly (the conversations writer does) gets the driver's own
    exceptions: a constraint or an unbindable value is one refused record; a lock is not."""
    import sqlite3

    from gateway.writer import rejected

    c = sqlite3.connect(":memory:")
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v)")
    c.execute("INSERT INTO t VALUES (1, 1)")
    errors = []
    for sql, args in (("INSERT INTO t VALUES (1, 2)", ()), ("INSERT INTO t VALUES (2, ?)", (["x"],))):
        try:
            c.execute(sql, args)
        except sqlite3.Error as e:
            errors.append(e)
    assert len(errors) == 2 and all(rejected(e) for e in errors)
    assert not rejected(sqlite3.OperationalError("database is locked"))


async def test_drops_are_all_counted_but_logged_once_per_interval(caplog):
    """A full queue during an outage drops a record per request: every one is counted, and the log
    says it once at once, then once per interval with how many followed, then the rest at close."""
    import logging

    gate = asyncio.Event()

    async def write(batch: Sequence[int]) -> None:
        await gate.wait()  # the store hangs: the queue fills up

    reg = CollectorRegistry()
    w = BatchWriter("t", write, WriterMetrics(reg), max_queue=5, batch_size=5, flush_interval=0.01,
                    on_full="drop")
    w._log.interval = 0.3
    w.start()
    with caplog.at_level(logging.ERROR, logger="gateway.writer"):
        for i in range(15):
            w.put_nowait(i)
        await asyncio.sleep(0)
        lines = [r.getMessage() for r in caplog.records]
        dropped_now = w.dropped
        assert dropped_now >= 5 and len(lines) == 1 and lines[0] == "writer t: 1 record(s) not written (queue_full)"
        for i in range(100):
            w.put_nowait(i)
        await asyncio.sleep(0.5)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2
        assert lines[1] == f"writer t: {w.dropped - 1} record(s) not written (queue_full) in the last 0s"
        gate.set()
        w.put_nowait(1)
        await w.close()
    assert reg.get_sample_value("gateway_writer_dropped_total", {"writer": "t", "reason": "queue_full"}) == w.dropped


async def turns_of_leaving_clients(g, db_file, hold: float) -> list[str]:
    """Four one-shot clients, each posting a turn, reading the answer and leaving, while another
    process holds the SQLite file (the writer cannot write, its queue fills up); the hold ends
    ``hold`` seconds after the last one. Returns the conversation ids the clients were given."""
    import sqlite3

    import aiohttp

    holder = sqlite3.connect(db_file, timeout=1, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        ids = []
        for i in range(4):
            async with aiohttp.ClientSession() as s:
                async with s.post(g.url + "/v1/chat/completions", json={
                        "model": "demo-chat", "messages": [{"role": "user", "content": f"turn {i}"}]}) as r:
                    assert r.status == 200
                    ids.append(r.headers["X-Conversation-ID"])
                    await r.read()
            # the session is closed: the client has gone while the handler may still wait for room
        await asyncio.sleep(hold)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    return ids


async def test_a_client_leaving_while_its_record_waits_for_room_loses_no_record(make_gateway, tmp_path):
    """The conversations writer's queue is full (the database is held by another process), so a
    finished request waits in on_complete for room; its client leaves, and aiohttp cancels the
    handler. The turn is still queued, audit still records the exchange, and the gateway does not
    keep the connection counted as busy."""
    import aiohttp

    g = await make_gateway([{"name": "conversations", "config": {
        "queue_size": 1, "queue_full_wait": 10, "flush_interval": 0.05, "retry_for": 60}},
        {"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(tmp_path / "a.jsonl")}]}}])
    ids = await turns_of_leaving_clients(g, tmp_path / "gateway.db", hold=0.5)
    await g.plugin("conversations").flush()
    async with aiohttp.ClientSession() as s:
        for cid in ids:
            async with s.get(f"{g.url}/gateway/conversations/{cid}") as r:
                assert r.status == 200, cid
    assert g.gw.proxy.busy == set() and g.gw.runtime.inflight == 0
    await g.stop()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len([x for x in lines if '"type":"request"' in x]) >= 4


async def test_a_turn_dropped_after_its_client_left_does_not_stay_pending(make_gateway, tmp_path):
    """The queue stays full past queue_full_wait while the clients have gone: the turn that could not
    be queued is dropped (counted), and its conversation does not wait for it for ever (reads
    answer, not 503 after waiting for a write that will never come)."""
    import aiohttp

    g = await make_gateway([{"name": "conversations", "config": {
        "queue_size": 1, "queue_full_wait": 0.5, "flush_interval": 0.05, "retry_for": 60,
        "memory": {"enabled": True}}}])
    # past queue_full_wait: what could not be queued is dropped
    ids = await turns_of_leaving_clients(g, tmp_path / "gateway.db", hold=1.5)
    plugin = g.plugin("conversations")
    await plugin.flush()
    w = plugin.shared.writer
    statuses = []
    async with aiohttp.ClientSession() as s:
        for cid in ids:
            async with s.get(f"{g.url}/gateway/conversations/{cid}", timeout=aiohttp.ClientTimeout(total=20)) as r:
                statuses.append(r.status)
    assert set(statuses) <= {200, 404} and 404 in statuses, statuses
    assert all(not v.pending() for v in plugin.shared.views.values())
    assert statuses.count(404) == w.dropped


async def test_a_write_that_never_returns_is_reported(monkeypatch, caplog):
    """A database that does not answer fails nothing: the writer would wait without a word while
    /readyz said ready. A write under way longer than STALL_WARN is logged once and counted as
    failing (what /readyz reads); the first write that completes clears it."""
    import logging

    import gateway.services as services_mod
    import gateway.writer as writer_mod
    from gateway.services import Services

    monkeypatch.setattr(writer_mod, "STALL_WARN", 0.2, raising=False)
    monkeypatch.setattr(services_mod, "STALLED_READY", 0.2)
    caplog.set_level(logging.WARNING, logger="gateway.writer")
    release = asyncio.Event()
    stored: list[int] = []

    async def write(batch: Sequence[int]) -> None:
        await release.wait()
        stored.extend(batch)

    services = Services(None, None)
    w = services.writer("hung", write, batch_size=10, flush_interval=0.01)
    w.start()
    await w.put(1)
    await asyncio.sleep(0.05)
    assert services.failing_writers(5.0) == ([], [])  # under way, not for long yet
    assert services.failing_writers(0.0) == ([], [])  # (a write under way is no failure at once)
    await asyncio.sleep(0.4)
    assert services.failing_writers(0.2) == (["hung"], ["hung"])
    assert services.failing_writers(5.0) == (["hung"], [])  # failing, within the grace
    stalls = [r for r in caplog.records if "has been under way" in r.getMessage()]
    assert len(stalls) == 1 and "writer hung: a write of 1 record(s)" in stalls[0].getMessage()
    release.set()
    await w.flush(timeout=5)
    assert stored == [1] and services.failing_writers(0.2) == ([], [])
    await w.close()


async def test_a_queue_smaller_than_a_batch_is_written_when_full():
    """queue_size 10 under batch_size 500: a full queue is a batch worth writing at once (it used to
    wait flush_interval while every put waited for room)."""
    stored: list[int] = []

    async def write(batch: Sequence[int]) -> None:
        stored.extend(batch)

    w = BatchWriter("t", write, WriterMetrics(CollectorRegistry()), max_queue=10, batch_size=500,
                    flush_interval=30)
    w.start()
    for i in range(25):  # more than the queue holds: each put past 10 waits (full_wait 0.5 s) for room
        assert await w.put(i), i  # (flush_interval is 30 s: only a full queue wakes the writer in time)
    w.kick()
    await asyncio.wait_for(w.flush(), 10)
    await w.close()
    assert stored == list(range(25)) and w.dropped == 0


async def test_records_handed_over_after_the_shared_deadline_are_still_written():
    """The gateway sets one deadline on every writer before the plugins shut down; a plugin whose
    shutdown took longer then hands its last records (a usage tally) to a writer whose deadline
    has passed: with the database up they are written, not dropped unattempted."""
    import time

    stored: list[int] = []

    async def write(batch: Sequence[int]) -> None:
        stored.extend(batch)

    w = BatchWriter("late", write, WriterMetrics(CollectorRegistry()), flush_interval=5, shutdown_retry_for=2)
    w.start()
    w.close_by(time.monotonic() + 0.05)
    await asyncio.sleep(0.2)  # a plugin's shutdown outlasts the shared deadline
    assert await w.put(7)
    await w.close()
    assert (stored, w.written, w.dropped) == ([7], 1, 0)


async def test_a_queue_bounded_by_weight_waits_then_drops_past_it():
    """Besides the count, what is queued is bounded by its summed weight (a turn's message rows:
    one turn can hold 300,000): a record that would pass it waits for the batches ahead to settle
    (on_full: wait), or is dropped and counted when they do not in time. One alone always fits."""
    gate = asyncio.Event()
    stored: list[str] = []

    async def write(batch: Sequence[str]) -> None:
        await gate.wait()
        stored.extend(batch)

    reg = CollectorRegistry()
    w: BatchWriter[str] = BatchWriter("t", write, WriterMetrics(reg), batch_size=10, flush_interval=0.01,
                                      full_wait=1.0, weight=len, max_weight=10)
    w.start()
    assert await w.put("x" * 50)  # over the bound alone: it fits an empty queue
    await asyncio.sleep(0.05)  # (taken into a batch, whose write waits: still counted until settled)
    assert w.weight == 50
    assert not await w.put("y")  # waited 1 s, the batch ahead did not settle: dropped, counted
    assert reg.get_sample_value("gateway_writer_dropped_total", {"writer": "t", "reason": "queue_full"}) == 1
    later = asyncio.create_task(w.put("z" * 5))
    await asyncio.sleep(0.05)
    gate.set()  # the batch settles: the waiting record gets its room
    assert await later
    await w.flush(timeout=5)
    assert stored == ["x" * 50, "z" * 5] and w.weight == 0
    # one heavier than the bound does not wait for an empty queue (steady traffic never leaves
    # one): it fits once what is queued is at most half the bound
    gate.clear()
    assert await w.put("abcd")
    await asyncio.sleep(0.05)
    assert await w.put("h" * 40) and w.weight == 44
    gate.set()
    await w.flush(timeout=5)
    assert w.weight == 0 and stored[-2:] == ["abcd", "h" * 40]
    w.configure(max_queue=100, batch_size=10, flush_interval=0.01, on_full="drop", full_wait=0.3, retry_for=5,
                max_weight=4)
    gate.clear()
    assert await w.put("abc")
    await asyncio.sleep(0.05)
    assert not await w.put("de")  # on_full: drop, at once
    gate.set()
    await w.close()


async def test_conversations_turns_are_bounded_in_message_rows(make_gateway, tmp_path):
    """queue_messages: the writer holds at most so many message rows; a turn past it, while the
    database is held, is dropped (counted) with on_queue_full: drop instead of piling up in memory."""
    import sqlite3

    import aiohttp

    g = await make_gateway([{"name": "conversations", "config": {
        "queue_messages": 5, "on_queue_full": "drop", "flush_interval": 0.05, "retry_for": 60}}])
    big = [{"role": "user", "content": f"m{i}"} for i in range(4)]
    holder = sqlite3.connect(tmp_path / "gateway.db", timeout=1, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(g.url + "/v1/chat/completions",
                                  json={"model": "demo-chat", "messages": big}) as r:
                    assert r.status == 200
                    await r.read()
                await asyncio.sleep(0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    w = g.plugin("conversations").shared.writer
    await g.plugin("conversations").flush()
    assert w.dropped == 1 and w.written == 1 and w.weight == 0
