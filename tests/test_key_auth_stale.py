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
