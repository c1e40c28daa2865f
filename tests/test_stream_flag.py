"""``"stream": 1`` / ``"stream": "true"``: backends built on pydantic (vLLM and many others) read
them as true and stream; the gateway takes them for a stream request too, so the usage is asked
for (and hidden from the client), and the prompt tokens are counted as for ``"stream": true``."""
from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.context import truthy

from .helpers import ADMIN_TOKEN, until


def test_flags_read_as_the_backends_read_them() -> None:
    assert all(truthy(v) for v in (True, 1, 1.0, "true", "True", " yes ", "1", "on", "t", "y"))
    assert not any(truthy(v) for v in (False, 0, 2, None, "", "false", "no", "0", "maybe", [], {}, [1]))


@pytest.mark.parametrize("flag", [True, 1, "true"])
async def test_a_stream_asked_for_with_any_true_value_is_counted_whole(make_gateway: Any, flag: Any) -> None:
    g = await make_gateway([{"name": "audit", "config": {"flush_interval": 0.05}}])
    body = {"model": "demo-chat", "stream": flag, "messages": [{"role": "user", "content": "one two three"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            text = await r.text()
        assert '"usage"' not in text  # the usage the gateway asked for: hidden from this client
        async def stored() -> list[Any]:
            async with s.get(g.admin_url + "/audit?type=request", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                return (await r.json())["data"]

        ev = (await until(stored, what="the audit event"))[0]
    assert ev["streamed"] is True and ev["tokens_in"] is not None and ev["tokens_in"] > 0, ev
    assert "tokens_estimated" not in ev
