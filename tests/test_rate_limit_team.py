"""rate_limit keyed by the key's team: the keys of one team share a budget; a key without a team
is a team of its own; a request without an identity is counted by its client IP."""
from __future__ import annotations

import types
from typing import Any

import aiohttp
import pytest

from gateway.plugins.rate_limit.config import RateLimitConfig
from gateway.plugins.rate_limit.rules import compile_rules, identifiers

from .helpers import ADMIN_TOKEN, clear_of_a_minute_boundary

T = aiohttp.ClientTimeout(total=15)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}


async def test_keys_of_one_team_share_a_rules_counter(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "key_auth"}, {"name": "rate_limit", "config": {
        "rules": [{"name": "per-team", "limit": "3/minute", "key_by": ["team"]}]}}])
    keys = {}
    async with aiohttp.ClientSession(timeout=T) as s:
        for name, team in (("a1", "alpha"), ("a2", "alpha"), ("b1", "beta"), ("solo1", None), ("solo2", None)):
            async with s.post(g.admin_url + "/keys", json={"owner": name, "team": team}, headers=ADMIN) as r:
                assert r.status == 201, await r.text()
                keys[name] = (await r.json())["key"]

        async def calls(name: str, n: int) -> list[int]:
            out = []
            for _ in range(n):
                async with s.post(g.url + "/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": f"Bearer {keys[name]}"}) as r:
                    out.append(r.status)
                    if r.status == 429:
                        assert "per-team" in (await r.json())["error"]["message"]
            return out

        await clear_of_a_minute_boundary()  # (the counts compared must not straddle two minutes)
        assert await calls("a1", 2) == [200, 200]
        assert await calls("a2", 2) == [200, 429]  # alpha's third request, then over its 3
        assert await calls("a1", 1) == [429]
        assert await calls("b1", 3) == [200, 200, 200]  # another team: its own counter
        assert await calls("solo1", 4) == [200, 200, 200, 429]  # a key without a team: a team of one
        assert await calls("solo2", 3) == [200, 200, 200]  # not the budget of every key without a team


def _ctx(identity: dict[str, Any] | None, ip: str = "198.51.100.7") -> Any:
    return types.SimpleNamespace(identity=identity, client_ip=ip, route="default", model="m",
                                 key_id=identity.get("key_id") if identity else None,
                                 owner=identity.get("owner") if identity else None)


def test_team_identifiers_and_their_fallbacks() -> None:
    cfg = RateLimitConfig.model_validate({
        "rules": [{"name": "t", "limit": "5/minute", "key_by": ["team"]},
                  {"name": "tm", "limit": "5/minute", "key_by": ["model", "team"]}],
        "concurrency": [{"name": "c", "max": 2, "key_by": "team"}]})
    team, team_model = compile_rules(cfg.rules)[:2]
    assert team_model.key_by == ("team", "model")
    assert identifiers(team, _ctx({"key_id": "k1", "owner": "o", "team": "alpha"})) == ("t", "team:alpha")
    assert identifiers(team, _ctx({"key_id": "k2", "owner": "p", "team": "alpha"})) == ("t", "team:alpha")
    assert identifiers(team, _ctx({"key_id": "k3", "owner": "o", "team": None})) == ("t", "key:k3")
    assert identifiers(team, _ctx(None)) == ("t", "ip:198.51.100.7")
    assert identifiers(team_model, _ctx({"key_id": "k1", "team": "alpha"})) == ("tm", "team:alpha", "model:m")
    assert cfg.concurrency[0].key_by == ["team"]


@pytest.mark.parametrize("key_by", [["team", "global"], []])
def test_team_is_checked_like_the_other_parts(key_by: list[str]) -> None:
    with pytest.raises(ValueError):
        RateLimitConfig.model_validate({"rules": [{"name": "t", "limit": "5/minute", "key_by": key_by}]})
