"""Changes to one key made at the same moment from two instances' admin APIs (two ops people, a
script): each is written on the row as it is then, none writes over another."""
from __future__ import annotations

import asyncio
from typing import Any

from .test_conversations import db  # noqa: F401  (a fixture: SQLite, then PostgreSQL)
from .test_key_auth import admin, raw_call

PLUGINS = [{"name": "key_auth", "config": {"cache_ttl": 0, "watch_interval": 0}}]


async def two_instances(make_gateway: Any, db: dict[str, Any]) -> tuple[Any, Any]:  # noqa: F811
    """Two gateways on one database."""
    return (await make_gateway(PLUGINS, name="a.yaml", database=db),
            await make_gateway(PLUGINS, name="b.yaml", database=db))


async def test_changes_to_different_fields_at_once_are_all_kept(make_gateway: Any, db: dict[str, Any]) -> None:  # noqa: F811
    a, b = await two_instances(make_gateway, db)
    changes = [{"scopes": {"paths": ["/v1/chat/"]}}, {"scopes": {"models": ["gpt-*"]}},
               {"limits": {"rpm": 7}}, {"limits": {"tpm": 700}}, {"metadata": {"team": "x"}}, {"name": "renamed"}]
    for _ in range(5):
        st, rec = await admin(a, "POST", "/keys", {"owner": "alice", "scopes": {"paths": ["/v1/"], "models": ["m0"]}})
        assert st == 201
        kid = rec["id"]
        res = await asyncio.gather(*(admin((a, b)[i % 2], "PATCH", f"/keys/{kid}", c) for i, c in enumerate(changes)))
        assert [r[0] for r in res] == [200] * len(changes), res
        st, final = await admin(b, "GET", f"/keys/{kid}")
        assert final["scopes"] == {"paths": ["/v1/chat/"], "models": ["gpt-*"]}, final["scopes"]
        assert (final["limits"]["rpm"], final["limits"]["tpm"]) == (7, 700)
        assert final["metadata"] == {"team": "x"} and final["name"] == "renamed"


async def test_rotations_at_once_hand_out_only_secrets_that_were_current(make_gateway: Any, db: dict[str, Any],  # noqa: F811
                                                                         monkeypatch: Any) -> None:
    """Six rotations at once, with a grace period: made one after the other, so the last secret
    works and the one before it (in its grace); the original, two rotations back, does not. No
    caller is handed a secret that never worked. (Each commit waits a moment, so that all six
    read the key before the first writes.)"""
    from sqlalchemy.ext.asyncio import AsyncSession

    commit = AsyncSession.commit

    async def slow_commit(self: AsyncSession) -> None:
        await asyncio.sleep(0.05)
        await commit(self)

    a, b = await two_instances(make_gateway, db)
    monkeypatch.setattr(AsyncSession, "commit", slow_commit)
    st, rec = await admin(a, "POST", "/keys", {"owner": "alice"})
    original = rec["key"]
    res = await asyncio.gather(*(admin((a, b)[i % 2], "POST", f"/keys/{rec['id']}/rotate", {"grace_seconds": 60})
                                 for i in range(6)))
    assert [r[0] for r in res] == [200] * 6, res
    keys = [r[1]["key"] for r in res]
    monkeypatch.setattr(AsyncSession, "commit", commit)
    c = await make_gateway(PLUGINS, name="c.yaml", database=db)  # a fresh instance: what the database holds
    works = [(await raw_call(c.url, {"Authorization": f"Bearer {k}"}))[0] == 200 for k in keys]
    assert sum(works) == 2, works
    assert (await raw_call(c.url, {"Authorization": f"Bearer {original}"}))[0] == 401


async def test_a_rotation_racing_a_revoke_never_leaves_a_live_secret(make_gateway: Any, db: dict[str, Any]) -> None:  # noqa: F811
    a, b = await two_instances(make_gateway, db)
    for _ in range(5):
        st, rec = await admin(a, "POST", "/keys", {"owner": "alice"})
        kid = rec["id"]
        rot, rev = await asyncio.gather(admin(a, "POST", f"/keys/{kid}/rotate", {"grace_seconds": 60}),
                                        admin(b, "POST", f"/keys/{kid}/revoke"))
        assert rev[0] == 200 and rot[0] in (200, 409), rot
        st, final = await admin(a, "GET", f"/keys/{kid}")
        assert final["status"] == "revoked" and final["previous_secret_valid_until"] is None, final
        if rot[0] == 409:
            assert rot[1]["error"]["code"] == "key_revoked"
