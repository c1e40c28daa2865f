"""GET /audit answers bad query parameters with a 400 naming the parameter, never a 500."""
import aiohttp
import pytest

from .helpers import ADMIN_TOKEN


@pytest.mark.parametrize("query, param", [
    ("cursor=99999999999999999999999", "cursor"),
    ("cursor=zzz", "cursor"),
    ("until=99999999999999999", "until"),
    ("since=not-a-time", "since"),
    ("limit=abc", "limit"),
    ("limit=0", "limit"),
    ("limit=-5", "limit"),
    ("key_id=alice", "key_id"),
    ("order=sideways", "order"),
    ("status=abc", "status"),
    ("status=" + "9" * 40, "status"),
    ("status=4000", "status"),
])
async def test_bad_audit_query_is_a_400_naming_the_parameter(make_gateway, query, param):
    g = await make_gateway([{"name": "audit", "config": {"sinks": ["database"]}}])
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as s:
        async with s.get(f"{g.admin_url}/audit?{query}") as r:
            body = await r.json()
            assert r.status == 400, body
            assert body["error"]["code"] == "invalid_value"
            assert body["error"]["param"] == param
            assert "Traceback" not in body["error"]["message"]
            if query == "limit=-5":  # (it is an integer: the message says what is allowed)
                assert body["error"]["message"] == "limit: expected 1..1000"
        async with s.get(f"{g.admin_url}/audit?limit=5") as r:
            assert r.status == 200
