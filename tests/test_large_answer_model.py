"""The model an answer too large to parse names: read from its first or its last bytes, where its
usage is read, so its tokens are labelled, audited and traced by the model the upstream says
answered, never by the one the client asked for (free client input), nor by a ``"model"`` nested
in a choice, a message's text or a tool call's arguments."""
from __future__ import annotations

import gzip
import json
from typing import Any

import aiohttp
from aiohttp import web

from gateway.observe import MAX_JSON_BODY, ResponseObserver

from .helpers import ADMIN_TOKEN
from .test_observe import backend

BIG = "x" * (MAX_JSON_BODY + 4096)
#: The decoys: a model named in a message's text, in a tool call's arguments and as the key of
#: objects nested in the answer, near its start (head) and near its end (tail).
TOOL_CALLS = [{"id": "call_1", "type": "function",
               "function": {"name": "pick", "arguments": json.dumps({"model": "evil-args"})}}]


def usage(n: int) -> dict[str, int]:
    return {"prompt_tokens": n, "completion_tokens": 2 * n, "total_tokens": 3 * n}


def choices() -> list[dict[str, Any]]:
    msg = {"role": "assistant", "meta": {"model": "nested-head"},
           "content": 'I say {"model": "evil-content"} ' + BIG + ' and, "model": "evil-content-end"',
           "tool_calls": TOOL_CALLS, "vendor": {"model": "nested-tail"}}
    return [{"index": 0, "message": msg, "finish_reason": "tool_calls", "extra": {"model": "nested-choice"}}]


def model_first() -> bytes:
    return json.dumps({"model": "up-first", "id": "chatcmpl-1", "object": "chat.completion",
                       "choices": choices(), "usage": usage(11)}).encode()


def model_last() -> bytes:
    return json.dumps({"id": "chatcmpl-2", "object": "chat.completion", "choices": choices(),
                       "model": "up-last", "system_fingerprint": "fp", "extra": {"model": "nested-after"},
                       "usage": usage(13)}).encode()


def no_model() -> bytes:
    """No top-level model at all: only the nested decoys, first and last."""
    return json.dumps({"id": "chatcmpl-3", "object": "chat.completion", "choices": choices(),
                       "usage": usage(17)}).encode()


def observe(raw: bytes, coding: str | None = None) -> Any:
    obs = ResponseObserver(False, False, coding=coding)
    out = b"".join(obs.feed(raw[i:i + 65536]) for i in range(0, len(raw), 65536))
    assert out == raw
    obs.finish()
    return obs.c


def test_the_observer_reads_the_top_level_model_of_a_large_answer_first_or_last() -> None:
    first, last, none = model_first(), model_last(), no_model()
    assert min(len(first), len(last), len(none)) > MAX_JSON_BODY
    c = observe(first)
    assert (c.model, c.usage, c.raw) == ("up-first", usage(11), None)
    c = observe(last)
    assert (c.model, c.usage, c.response_id) == ("up-last", usage(13), "chatcmpl-2")
    assert observe(none).model is None
    # a compressed answer is read through its decoded copy alike
    assert observe(gzip.compress(last, 1), "gzip").model == "up-last"
    # named twice (first and last), JSON takes the last
    twice = b'{"model": "a", "choices": ' + json.dumps(choices()).encode() + b', "model": "b"}'
    assert observe(twice).model == "b"


def test_the_model_at_the_end_is_only_the_answers_own() -> None:
    from gateway.observe import tail_model
    assert tail_model(b'x"}], "model": "m", "usage": {"total_tokens": 1}}\n') == "m"
    assert tail_model(b'x"}], "model": null, "usage": {"total_tokens": 1}}') is None
    # nested in a choice, a list item or an object after the answer's own: not taken
    assert tail_model(b'x", "model": "n"}], "usage": {"total_tokens": 1}}') is None
    assert tail_model(b'x"}, {"model": "n"}]}') is None
    assert tail_model(b'x", "model": "top", "x": {"model": "n"}, "y": [{"model": "n2"}]}') == "top"
    # quoted in a text (a message, tool arguments), or ending a key: never a key of its own
    assert tail_model(b'x", "content": "say \\"model\\": \\"evil\\"", "n": 1}') is None
    assert tail_model(b'x", "say \\"model": "evil", "n": 1}') is None
    # a window full of nested ones is tried a bounded number of times, and names none
    many = b'x", "data": [' + b", ".join([b'{"model": "n"}'] * 4000) + b"]}"
    assert tail_model(many) is None


async def test_large_answers_are_labelled_audited_and_traced_by_the_model_they_name(
        make_gateway: Any, tmp_path: Any) -> None:
    answers = {"asked-first": model_first(), "asked-last": model_last(), "asked-none": no_model()}

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return web.Response(body=answers[body["model"]], content_type="application/json")

    jl = tmp_path / "audit.jsonl"
    async with backend(chat) as url:
        g = await make_gateway([
            {"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}},
            {"name": "metrics"},
            {"name": "tracing", "config": {"exporter": {"type": "memory"}}}], upstream={"url": url})
        exp = g.plugin("tracing").memory_exporter
        spans: dict[str, Any] = {}
        async with aiohttp.ClientSession() as s:
            for asked, raw in answers.items():
                async with s.post(g.url + "/v1/chat/completions",
                                  json={"model": asked, "messages": [{"role": "user", "content": "hi"}]}) as r:
                    assert r.status == 200 and await r.read() == raw
            for sp in exp.get_finished_spans():
                spans[sp.name] = sp.attributes
            async with s.get(g.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                metrics = await r.text()
        await g.stop()
    tokens = sorted(line for line in metrics.splitlines() if line.startswith("gateway_tokens_total{"))
    assert tokens == [
        'gateway_tokens_total{direction="input",model="unknown"} 17.0',
        'gateway_tokens_total{direction="input",model="up-first"} 11.0',
        'gateway_tokens_total{direction="input",model="up-last"} 13.0',
        'gateway_tokens_total{direction="output",model="unknown"} 34.0',
        'gateway_tokens_total{direction="output",model="up-first"} 22.0',
        'gateway_tokens_total{direction="output",model="up-last"} 26.0',
    ], tokens
    events = [json.loads(x) for x in jl.read_text().splitlines()]
    seen = {e["model"]: (e["response_model"], e["tokens_in"]) for e in events if e.get("path") == "/v1/chat/completions"}
    assert seen == {"asked-first": ("up-first", 11), "asked-last": ("up-last", 13), "asked-none": (None, 17)}
    assert spans["chat asked-first"]["gen_ai.response.model"] == "up-first"
    assert spans["chat asked-last"]["gen_ai.response.model"] == "up-last"
    assert "gen_ai.response.model" not in spans["chat asked-none"]
    assert spans["chat asked-last"]["gen_ai.usage.input_tokens"] == 13
