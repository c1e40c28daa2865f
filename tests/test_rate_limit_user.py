"""rate_limit keyed by the end user behind a shared key (a chat front-end's one key for all its
users): `key_by: [key, user]`, the user from `user_header` or the body's `user` field. A user alone
is refused: it is whatever the client says."""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, load_config_text

from .helpers import ADMIN_TOKEN, serve_handler
from .test_rate_limit_concurrency import slow

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def new_key(g: Any, owner: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", json={"owner": owner}, headers=ADMIN) as r:
            return str((await r.json())["key"])


async def post(g: Any, key: str, user: str | None = None, header: str | None = None, sleep: float = 0) -> int:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "sleep": sleep}
    if user is not None:
        body["user"] = user
    h = {"Authorization": f"Bearer {key}"}
    if header is not None:
        h["X-OpenWebUI-User-Id"] = header
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json=body, headers=h) as r:
            await r.read()
            return r.status


async def test_each_end_user_of_a_shared_key_has_its_own_counter(make_gateway: Any) -> None:
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([{"name": "key_auth"}, {"name": "rate_limit", "config": {
            "user_header": "X-OpenWebUI-User-Id",
            "rules": [{"name": "per-user", "limit": "2/minute", "key_by": ["key", "user"]}]}}],
            upstream={"url": url})
        ui, other = await new_key(g, "chat-ui"), await new_key(g, "batch")
        # users named in the body's user field: each gets the rule's 2
        assert [await post(g, ui, "ada") for _ in range(3)] == [200, 200, 429]
        assert [await post(g, ui, "bob") for _ in range(2)] == [200, 200]
        # the header decides over the body; another key's "ada" is another counter
        assert await post(g, ui, "ada", header="cy") == 200
        assert await post(g, ui, "cy") == 200 and await post(g, ui, "cy") == 429
        assert await post(g, other, "ada") == 200
        # no user at all: one counter for the key's requests without one
        assert [await post(g, ui) for _ in range(3)] == [200, 200, 429]
    finally:
        await runner.cleanup()


async def test_a_cap_per_end_user(make_gateway: Any) -> None:
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([{"name": "key_auth"}, {"name": "rate_limit", "config": {
            "concurrency": [{"name": "one-each", "max": 1, "key_by": ["key", "user"]}]}}], upstream={"url": url})
        ui = await new_key(g, "chat-ui")
        got = await asyncio.gather(*[post(g, ui, u, sleep=0.5) for u in ("ada", "ada", "bob")])
        assert sorted(got[:2]) == [200, 429] and got[2] == 200
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("key_by, ok", [("[user]", False), ("[ip, user]", False), ("[model, user]", False),
                                        ("[key, user]", True), ("[owner, user]", True), ("[team, user]", True)])
def test_user_only_with_key_owner_or_team(key_by: str, ok: bool) -> None:
    text = f"""
upstream: {{url: "http://127.0.0.1:9"}}
admin: {{enabled: false}}
plugins:
  - name: rate_limit
    config:
      rules: [{{name: r, limit: 5/minute, key_by: {key_by}}}]
      concurrency: [{{name: c, max: 2, key_by: {key_by}}}]
"""
    if ok:
        load_config_text(text)
        return
    with pytest.raises(ConfigError) as e:
        load_config_text(text)
    assert "combine it with key, owner or team" in str(e.value)


async def test_users_without_a_key_share_one_counter(make_gateway: Any) -> None:
    """On a route without key_auth, [key, user] would fall back to [ip, user]: a client naming a new
    user each time would never be limited. The users of no key share one counter (per address)."""
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([{"name": "rate_limit", "config": {
            "rules": [{"name": "per-user", "limit": "2/minute", "key_by": ["key", "user"]}]}}], upstream={"url": url})
        assert [await post(g, "none", f"user-{i}") for i in range(3)] == [200, 200, 429]
    finally:
        await runner.cleanup()


async def test_a_lone_surrogate_in_user_or_model_fails_no_store(make_gateway: Any, redis_server: Any) -> None:
    """JSON can carry a lone surrogate ("\\udc80"): as part of a counter's key it could not be
    encoded for Redis, and one such request marked the store down for everyone."""
    redis = redis_server()
    runner, url = await serve_handler(slow)
    try:
        g = await make_gateway([{"name": "key_auth"}, {"name": "rate_limit", "config": {
            "storage": redis.url + "/0", "on_store_error": "deny", "storage_timeout": 2,
            "rules": [{"name": "per-user", "limit": "3/minute", "key_by": ["key", "user"]},
                      {"name": "per-model", "limit": "50/minute", "key_by": ["model"]}]}}], upstream={"url": url})
        attacker, victim = await new_key(g, "eve"), await new_key(g, "ada")
        async with aiohttp.ClientSession() as s:
            for field in ("user", "model"):
                raw = ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "%s": "\\udc80x"}' % field)
                async with s.post(g.url + "/v1/chat/completions", data=raw.encode(),
                                  headers={"Authorization": f"Bearer {attacker}",
                                           "Content-Type": "application/json"}) as r:
                    assert r.status == 200, (field, await r.text())
        assert [await post(g, victim, "v") for _ in range(4)] == [200, 200, 200, 429]
    finally:
        await runner.cleanup()
