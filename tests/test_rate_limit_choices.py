"""rate_limit and requests for several choices (``n``, legacy ``best_of``): each choice may use the
whole ``max_tokens``, so the pre-check estimates prompt + max_tokens x n, and an answer without
usage is charged the text of every choice. A real gateway on a loopback socket in front of a small
real upstream that answers with as many choices as asked (with or without usage)."""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

CHAT = "/v1/chat/completions"
T = aiohttp.ClientTimeout(total=15)
PROMPT = "x"  # one token by the gateway's estimate (characters / 4, rounded up)


class ChoicesUpstream:
    """Answers n choices: choice i's text is TEXTS[i % 2]; usage 11 + 7 per choice unless the model
    is "nousage"."""

    TEXTS = ("a" * 40, "b" * 80)  # 10 and 20 tokens at four characters per token

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n", 0) > 0 else 1
        out: dict[str, Any] = {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body.get("model"),
            "choices": [{"index": i, "message": {"role": "assistant", "content": self.TEXTS[i % 2]},
                         "finish_reason": "stop"} for i in range(n)]}
        if body.get("model") != "nousage":
            out["usage"] = {"prompt_tokens": 11, "completion_tokens": 7 * n, "total_tokens": 11 + 7 * n}
        return web.json_response(out)

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "created": 1,
                                  "model": body.get("model"),
                                  "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    async def start(self) -> "ChoicesUpstream":
        app = web.Application()
        app.router.add_post(CHAT, self._chat)
        app.router.add_post("/v1/completions", self._completions)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self


@pytest.fixture
async def choices_upstream() -> AsyncIterator[ChoicesUpstream]:
    u = await ChoicesUpstream().start()
    yield u
    assert u.runner is not None
    await u.runner.cleanup()


async def gateway(make_gateway: Any, up: ChoicesUpstream, **config: Any) -> Any:
    config.setdefault("strategy", "fixed")
    config.setdefault("rules", [{"name": "tpm", "limit": "100/minute", "counts": "tokens", "key_by": ["ip"]}])
    return await make_gateway([{"name": "rate_limit", "config": config}], upstream={"url": up.url})


def body(model: str = "m", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **kw}


async def post(s: aiohttp.ClientSession, url: str, data: dict[str, Any],
               path: str = CHAT) -> tuple[int, Any, dict[str, str]]:
    async with s.post(url + path, json=data, timeout=T) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


async def settle(g: Any) -> None:
    """Until every request's on_complete ran and its token charge landed."""
    deadline = time.monotonic() + 5
    while g.gw.runtime.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await g.plugin("rate_limit").drain()


async def test_n_times_max_tokens_over_the_rule_is_refused_naming_the_estimate(make_gateway, choices_upstream):
    g = await gateway(make_gateway, choices_upstream)
    async with aiohttp.ClientSession() as s:
        st, data, h = await post(s, g.url, body(n=20, max_tokens=80))
        assert st == 429, data
        msg = data["error"]["message"]
        assert "Request too large for rule tpm (100/minute)" in msg
        assert "about 1601 tokens estimated" in msg and "max_tokens x 20 choices" in msg, msg
        assert data["error"]["code"] == "rate_limit_exceeded" and data["error"]["type"] == "tokens"
        assert h.get("x-should-retry") == "false"
        # Without max_tokens the configured default applies to each choice too: 1 + 256 x 2.
        st, data, _ = await post(s, g.url, body(n=2))
        assert st == 429 and "about 513 tokens estimated" in data["error"]["message"], data
    assert choices_upstream.requests == []  # refused before the upstream


async def test_n_within_budget_passes_and_is_charged_the_real_usage(make_gateway, choices_upstream):
    g = await gateway(make_gateway, choices_upstream)
    async with aiohttp.ClientSession() as s:
        st, data, h = await post(s, g.url, body(n=2, max_tokens=30))  # estimate 1 + 60
        assert st == 200 and len(data["choices"]) == 2, data
        assert h["x-ratelimit-remaining-tokens"] == "100"
        await settle(g)
        # Charged the upstream's usage, 11 + 7 x 2 = 25: 75 left, and n=2 x 40 (81) no longer fits.
        st, data, h = await post(s, g.url, body(n=2, max_tokens=40))
        assert st == 429, data
        assert h["x-ratelimit-remaining-tokens"] == "75"
        assert "remaining 75, requested 81" in data["error"]["message"], data
        st, data, _ = await post(s, g.url, body(n=1, max_tokens=40))  # 41 fits
        assert st == 200, data
    assert [r.get("n") for r in choices_upstream.requests] == [2, 1]


async def test_answer_without_usage_is_charged_the_text_of_every_choice(make_gateway, choices_upstream):
    g = await gateway(make_gateway, choices_upstream)
    async with aiohttp.ClientSession() as s:
        st, data, _ = await post(s, g.url, body("nousage", n=2, max_tokens=20))
        assert st == 200 and [c["message"]["content"] for c in data["choices"]] == list(ChoicesUpstream.TEXTS)
        await settle(g)
        # The prompt estimate (1) plus 40 + 80 characters at four per token (30): 31, not 11.
        _, _, h = await post(s, g.url, body(max_tokens=1))
        assert h["x-ratelimit-remaining-tokens"] == "69"


async def test_odd_n_values(make_gateway, choices_upstream):
    """n as the upstreams read it: "20" and 20.0 are twenty choices to a lax validator; a missing,
    non-positive or unreadable n is one; a huge one is refused as too large, not an error."""
    g = await gateway(make_gateway, choices_upstream)
    async with aiohttp.ClientSession() as s:
        for n in ("20", 20.0):
            st, data, _ = await post(s, g.url, body(n=n, max_tokens=80))
            assert st == 429 and "about 1601 tokens" in data["error"]["message"], (n, data)
        st, data, _ = await post(s, g.url, body(n=10**40, max_tokens=80))
        assert st == 429 and data["error"]["code"] == "rate_limit_exceeded", data
        assert f"about {2**31} tokens estimated" in data["error"]["message"], data
        for n in (0, -3, 2.5, "lots", True, None):
            st, data, _ = await post(s, g.url, body(n=n, max_tokens=5))
            assert st == 200, (n, data)


async def test_legacy_best_of_counts_the_completions_generated(make_gateway, choices_upstream):
    g = await gateway(make_gateway, choices_upstream)
    async with aiohttp.ClientSession() as s:
        st, data, _ = await post(s, g.url, {"model": "m", "prompt": PROMPT, "max_tokens": 30, "n": 1,
                                             "best_of": 5}, "/v1/completions")
        assert st == 429 and "about 151 tokens estimated" in data["error"]["message"], data
        st, data, _ = await post(s, g.url, {"model": "m", "prompt": PROMPT, "max_tokens": 30, "n": 2},
                                 "/v1/completions")
        assert st == 200, data
    assert len(choices_upstream.requests) == 1


async def test_quota_counts_every_choice(make_gateway, choices_upstream):
    g = await gateway(make_gateway, choices_upstream, rules=[], quotas={"daily_tokens": 100})
    async with aiohttp.ClientSession() as s:
        st, data, _ = await post(s, g.url, body(n=20, max_tokens=80))
        assert st == 429 and data["error"]["code"] == "insufficient_quota", data
        assert "about 1601 tokens estimated (prompt plus max_tokens x 20 choices)" in data["error"]["message"], data
    assert choices_upstream.requests == []


async def test_malformed_signed_counts_are_no_number(make_gateway, choices_upstream):
    """"--5", "+-3", "-+20" in n, best_of or a max_tokens field are no number to any upstream: the
    request is estimated as one choice / no max_tokens (the default), never a 500."""
    g = await gateway(make_gateway, choices_upstream, estimate_default_max_tokens=60,
                      rules=[{"name": "tpm", "limit": "100/minute", "counts": "tokens", "key_by": ["model"]}])
    async with aiohttp.ClientSession() as s:
        for i, v in enumerate(("--5", "+-3", "-+20", " +-7 ", "++1")):
            # n: one choice of max_tokens 80 (81 fits the 100, five or twenty would not)
            st, data, _ = await post(s, g.url, body(f"n{i}", n=v, max_tokens=80))
            assert st == 200, (v, data)
            st, data, _ = await post(s, g.url, {"model": f"b{i}", "prompt": PROMPT, "max_tokens": 80,
                                                 "best_of": v}, "/v1/completions")
            assert st == 200, (v, data)
            for f in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                # no max_tokens: the default 60 for each of two choices
                st, data, _ = await post(s, g.url, body(f"{f}{i}", n=2, **{f: v}))
                assert st == 429 and "about 121 tokens estimated" in data["error"]["message"], (f, v, data)
        st, data, _ = await post(s, g.url, body("signed", n="+2", max_tokens=" +70"))  # one sign still reads
        assert st == 429 and "about 141 tokens estimated" in data["error"]["message"], data


async def test_best_of_on_chat_is_ignored(make_gateway, choices_upstream):
    """The chat API has no best_of (the upstream ignores it): it does not multiply the estimate
    there, as it does for the legacy /v1/completions (see above)."""
    g = await gateway(make_gateway, choices_upstream)
    async with aiohttp.ClientSession() as s:
        st, data, _ = await post(s, g.url, body(best_of=7, max_tokens=80))  # 81, not 561
        assert st == 200, data
        st, data, _ = await post(s, g.url, body("m2", n=20, best_of=7, max_tokens=80))
        assert st == 429 and "max_tokens x 20 choices" in data["error"]["message"], data
    assert [r.get("best_of") for r in choices_upstream.requests] == [7]
