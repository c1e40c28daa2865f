"""key_auth while the key store cannot be reached: a key checked within cache_ttl + stale_if_error
keeps working (its cached record decides, revocation and wrong secrets included), a key not
checked that recently gets 503, and nobody waits for a store that does not answer."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from gateway.plugins.key_auth.keys import format_key, new_secret

from .test_conversations_ops import metric
from .test_key_auth import admin, bearer, ka, new_key, raw_call


def break_store(tmp_path: Path, away: bool) -> None:
    db = sqlite3.connect(tmp_path / "gateway.db")
    db.execute("ALTER TABLE api_keys RENAME TO api_keys_away" if away else "ALTER TABLE api_keys_away RENAME TO api_keys")
    db.commit()
    db.close()


async def test_keys_checked_lately_keep_working_through_a_key_store_outage(make_gateway: Any, tmp_path: Path) -> None:
    g = await make_gateway(ka(cache_ttl=0.3, stale_if_error=3, watch_interval=0))
    seen, unseen, revoked = await new_key(g), await new_key(g), await new_key(g)
    assert (await admin(g, "POST", f"/keys/{revoked['id']}/revoke"))[0] == 200
    assert (await raw_call(g.url, bearer(seen["key"])))[0] == 200
    assert (await raw_call(g.url, bearer(revoked["key"])))[0] == 401
    await asyncio.sleep(1.1)  # both records now older than cache_ttl (and than RECHECK_AFTER)
    break_store(tmp_path, away=True)
    t0 = time.monotonic()
    st, body = await raw_call(g.url, bearer(seen["key"]))
    assert st == 200, body  # checked 0.5 s ago: its record decides
    st, body = await raw_call(g.url, bearer(unseen["key"]))
    assert st == 503 and body["error"]["code"] == "key_store_unavailable"  # never checked: not trusted
    st, body = await raw_call(g.url, bearer(revoked["key"]))
    assert st == 401 and body["error"]["code"] == "revoked_api_key"  # the record says revoked
    # a well-formed key with the right id and another secret (a rotated one, or a guess): never
    # admitted, and its re-read of the record (which fails) does not drop the record
    wrong = format_key(seen["id"], new_secret())
    assert (await raw_call(g.url, bearer(wrong)))[0] == 401
    assert (await raw_call(g.url, bearer(seen["key"])))[0] == 200  # a wrong secret did not evict the record
    assert time.monotonic() - t0 < 2.5
    assert await metric(g, "gateway_auth_stale_lookups_total") >= 3
    await asyncio.sleep(max(0.0, 3.5 - (time.monotonic() - t0)))  # past cache_ttl + stale_if_error
    st, body = await raw_call(g.url, bearer(seen["key"]))
    assert st == 503 and body["error"]["code"] == "key_store_unavailable"
    break_store(tmp_path, away=False)
    assert (await raw_call(g.url, bearer(seen["key"])))[0] == 200
    assert (await raw_call(g.url, bearer(unseen["key"])))[0] == 200


async def test_stale_if_error_0_fails_closed_once_cache_ttl_is_over(make_gateway: Any, tmp_path: Path) -> None:
    g = await make_gateway(ka(cache_ttl=0.3, stale_if_error=0, watch_interval=0))
    rec = await new_key(g)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    await asyncio.sleep(0.5)
    break_store(tmp_path, away=True)
    st, body = await raw_call(g.url, bearer(rec["key"]))
    assert st == 503 and body["error"]["code"] == "key_store_unavailable"
    break_store(tmp_path, away=False)


async def test_a_store_that_does_not_answer_is_waited_for_once(make_gateway: Any, monkeypatch: Any) -> None:
    """A hung database: the first lookup waits store_timeout, then the cached record decides; the
    requests after it are answered at once while one lookup at a time probes in the background."""
    g = await make_gateway(ka(cache_ttl=0.2, stale_if_error=30, store_timeout=0.5, watch_interval=0))
    rec = await new_key(g)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    await asyncio.sleep(0.3)
    store = g.plugin("key_auth").store
    calls = []

    async def hung(key_id: str) -> Any:
        calls.append(key_id)
        await asyncio.sleep(60)

    monkeypatch.setattr(store, "get_row", hung)
    t0 = time.monotonic()
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    first = time.monotonic() - t0
    assert 0.4 < first < 5.0, first  # waited for the lookup to time out once
    t1 = time.monotonic()
    for _ in range(10):
        assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    assert time.monotonic() - t1 < 4.0, time.monotonic() - t1  # not ten timeouts (5 s)
    assert len(calls) <= 3, calls  # a probe per second at most, not one per request


async def test_a_revoke_racing_a_failed_re_read_stays_applied(make_gateway: Any, monkeypatch: Any) -> None:
    """A wrong secret for a cached key id re-reads the record; an admin revoke on this instance
    while that read waits, which then fails, must not be undone by the record read before."""
    g = await make_gateway(ka(cache_ttl=60, stale_if_error=0, store_timeout=5, watch_interval=0))
    rec = await new_key(g)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    await asyncio.sleep(1.1)  # the record is old enough to be read again for a secret it does not match
    store = g.plugin("key_auth").store
    orig, gate = store.get_row, asyncio.Event()

    async def slow_then_fail(key_id: str) -> Any:
        await gate.wait()
        raise ConnectionError("store hiccup")

    monkeypatch.setattr(store, "get_row", slow_then_fail)
    wrong = asyncio.create_task(raw_call(g.url, bearer(format_key(rec["id"], new_secret()))))
    await asyncio.sleep(0.3)
    assert (await admin(g, "POST", f"/keys/{rec['id']}/revoke"))[0] == 200
    gate.set()
    assert (await wrong)[0] == 401
    monkeypatch.setattr(store, "get_row", orig)  # the store answers again
    st, body = await raw_call(g.url, bearer(rec["key"]))
    assert st == 401 and body["error"]["code"] == "revoked_api_key", body


async def test_wrong_secrets_cannot_lock_a_key_out_during_an_outage(make_gateway: Any, monkeypatch: Any) -> None:
    """Key ids are not secret: requests with a known id and wrong secrets, sent while the store
    hangs, must not take the record away from the callers with the right secret."""
    g = await make_gateway(ka(cache_ttl=0.2, stale_if_error=30, store_timeout=1.0, watch_interval=0))
    rec = await new_key(g)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    await asyncio.sleep(1.1)

    async def hung(key_id: str) -> Any:
        await asyncio.sleep(60)

    monkeypatch.setattr(g.plugin("key_auth").store, "get_row", hung)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200  # waits for one lookup, then the record
    statuses = []
    for _ in range(3):
        attack = asyncio.create_task(raw_call(g.url, bearer(format_key(rec["id"], new_secret()))))
        await asyncio.sleep(0.2)
        statuses.append((await raw_call(g.url, bearer(rec["key"])))[0])
        assert (await attack)[0] == 401
        await asyncio.sleep(0.5)  # (past the store's retry second too)
    assert statuses == [200, 200, 200], statuses


async def test_a_watch_poll_that_fails_once_keeps_the_cached_keys(make_gateway: Any, monkeypatch: Any) -> None:
    """One check for changed keys slower than store_timeout (a busy database), then one that works:
    the changed-keys window covers the gap, so the cached keys stay (the whole cache was dropped, so
    the next slow lookups had no record to fall back on: 503 for keys checked seconds before)."""
    g = await make_gateway(ka(cache_ttl=60, stale_if_error=30, store_timeout=0.3, watch_interval=0.1))
    rec = await new_key(g)
    await asyncio.sleep(0.5)  # (the watch has seen the new key: its stamp drops nothing cached later)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200  # cached
    store = g.plugin("key_auth").store
    real, polls = store.changed_since, []

    async def slow_once(*a: Any) -> Any:
        polls.append(1)
        if len(polls) == 1:
            await asyncio.sleep(1)
        return await real(*a)

    monkeypatch.setattr(store, "changed_since", slow_once)
    for _ in range(200):
        if len(polls) >= 4:
            break
        await asyncio.sleep(0.05)
    assert len(polls) >= 4  # the slow one, then working ones

    async def down(key_id: str) -> Any:
        raise OSError("the key store is gone")

    monkeypatch.setattr(store, "get_row", down)
    st, body = await raw_call(g.url, bearer(rec["key"]))
    assert st == 200, body


async def test_after_a_long_watch_outage_only_the_keys_changed_meanwhile_are_dropped() -> None:
    """The watch's first poll after failing ones reads every change since its last poll that worked,
    however long ago: a key revoked 90 s ago (outside the usual window) is dropped, the other cached
    keys are kept."""
    import datetime as dt
    from types import SimpleNamespace

    from gateway.plugins.key_auth import KeyAuthConfig, KeyCache, KeyWatch

    now = dt.datetime.now(dt.UTC)
    changes = {"revoked": now - dt.timedelta(seconds=90)}

    class Store:
        async def changed_since(self, since: dt.datetime, limit: int) -> list[tuple[str, dt.datetime]]:
            return [(k, t) for k, t in changes.items() if t >= since]

    cache = KeyCache()
    for k in ("revoked", "kept"):
        cache.entries[k] = (SimpleNamespace(updated=None), time.monotonic())  # type: ignore[assignment]
    w = KeyWatch(None, cache, Store())  # type: ignore[arg-type]
    w.last_ok, w.failing = now - dt.timedelta(seconds=100), True  # polls failed for 100 s
    await w.poll(KeyAuthConfig(cache_ttl=5, watch_interval=1))
    assert set(cache.entries) == {"kept"} and not w.failing


async def test_a_key_made_lately_is_kept_cached_through_the_watch_and_an_outage(make_gateway: Any,
                                                                                 tmp_path: Path) -> None:
    """The watch's first sight of a key just created (or changed) dropped its cached record, though
    that record was already the new version: an outage right after then refused the key with 503
    while older keys were served from their records."""
    g = await make_gateway(ka(cache_ttl=0.3, stale_if_error=30, watch_interval=0.1))
    rec = await new_key(g)
    assert (await raw_call(g.url, bearer(rec["key"])))[0] == 200
    await asyncio.sleep(0.5)  # the watch has seen the key's stamp; the record is past cache_ttl
    break_store(tmp_path, away=True)
    try:
        st, body = await raw_call(g.url, bearer(rec["key"]))
        assert st == 200, body
    finally:
        break_store(tmp_path, away=False)
    # a change made while it is cached is still dropped at once (a revoke applies)
    other = await new_key(g)
    assert (await raw_call(g.url, bearer(other["key"])))[0] == 200
    assert (await admin(g, "POST", f"/keys/{other['id']}/revoke"))[0] == 200
    assert (await raw_call(g.url, bearer(other["key"])))[0] == 401
