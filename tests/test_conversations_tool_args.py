"""A tool call's arguments sent back serialised another way (LangChain writes them with
``json.dumps``: blanks after the separators; the backend may have written them compactly, or the
other way round) are the same answer: the conversation goes on, it is not forked as an edit, and
memory does not send the question twice."""
from __future__ import annotations

import json
from typing import Any

from .test_conversations import TOOLS, chat, db, row_message, start, stored  # noqa: F401  (db: the fixture)


def respaced(call: dict[str, Any]) -> dict[str, Any]:
    """The assistant's tool-call message as a client that parsed the arguments sends it back."""
    args = json.loads(call["tool_calls"][0]["function"]["arguments"])
    again = json.dumps(args, separators=(",", ":")) if ": " in call["tool_calls"][0]["function"]["arguments"] \
        else json.dumps(args)
    assert again != call["tool_calls"][0]["function"]["arguments"]
    tc = {**call["tool_calls"][0], "function": {**call["tool_calls"][0]["function"], "arguments": again}}
    return {"role": "assistant", "content": None, "tool_calls": [tc]}


async def test_tool_call_arguments_written_another_way_continue_the_conversation(make_gateway: Any,
                                                                                 db: dict[str, Any]) -> None:
    g = await start(make_gateway, db)
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "Use tools."},
                                  {"role": "user", "content": "weather in Paris?"}]
    st, h, b = await chat(g, msgs, tools=TOOLS)
    cid, call = h["X-Conversation-ID"], b["choices"][0]["message"]
    assert st == 200 and call["tool_calls"]
    call0 = call
    for step in range(3):
        msgs += [respaced(call) if step == 0 else call,
                 {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": f"sunny {step}"}]
        st, h, b = await chat(g, msgs, cid)
        assert st == 200 and h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h, (step, h)
        msgs += [b["choices"][0]["message"], {"role": "user", "content": f"and tomorrow {step}?"}]
        st, h, b = await chat(g, msgs, cid, tools=TOOLS)
        assert h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
        call = b["choices"][0]["message"]
    rows = await stored(g, cid)
    assert len(rows) == len(msgs) + 1  # every message once
    # the stored call is the backend's own text, as the client got it
    assert row_message(rows[2])["tool_calls"][0]["function"] == call0["tool_calls"][0]["function"]


async def test_memory_with_a_resent_history_of_a_tool_call_sends_the_question_once(
        make_gateway: Any, db: dict[str, Any], upstream: Any) -> None:
    g = await start(make_gateway, db, {"memory": {"enabled": True}})
    system, q = {"role": "system", "content": "Use tools."}, {"role": "user", "content": "weather in Paris?"}
    st, h, b = await chat(g, [system, q], tools=TOOLS)
    cid, call = h["X-Conversation-ID"], b["choices"][0]["message"]
    result = {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "sunny"}
    st, h, b = await chat(g, [system, q, respaced(call), result], cid, tools=TOOLS)
    assert st == 200 and h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
    seen = upstream.requests[-1]["body"]["messages"]
    assert [m["role"] for m in seen] == ["system", "user", "assistant", "tool"], seen
    rows = await stored(g, cid)
    assert [r.role for r in rows] == ["system", "user", "assistant", "tool", "assistant"]
