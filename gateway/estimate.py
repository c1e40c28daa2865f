"""The gateway's estimate of a prompt's tokens, for what a backend did not report.

The rate limiter admits a request on it (before the upstream has counted anything), and every
ledger (key usage, the audit event, metrics, the trace, a conversation's turn) records it for a
stream that ended without a usage report (the client went away, the upstream dropped, or it
ignored ``stream_options.include_usage``), marked as estimated: the prompt was read by the
upstream all the same.
"""
from __future__ import annotations

from typing import Any

from .fastjson import dumps_bytes


def prompt_estimate(body: Any) -> int:
    """Prompt tokens estimated as characters / 4 of the message contents (or prompt / input /
    instructions, or the Messages API's system prompt, or a rerank's query with each of its
    documents, a score's texts with each other), of an assistant message's tool calls and of
    the Responses API's function-call items (their arguments and outputs), plus the tool
    definitions as JSON text (every backend puts them in the prompt). A prompt or input given as
    token ids (the completions and embeddings APIs take lists of integers) counts one per id."""
    if not isinstance(body, dict):
        return 0
    chars = tokens = 0
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict):
                chars += _chars(m.get("content"))
                calls = m.get("tool_calls")
                if isinstance(calls, list) and calls:
                    chars += len(dumps_bytes(calls))
    for k in ("prompt", "input", "instructions", "system"):
        if k in body:
            v = body[k]
            ids = _token_ids(v)
            if ids is None:
                chars += _chars(v)
            else:
                tokens += ids
    # vLLM's pooling APIs: a rerank reads the query beside each document; a score, each pair
    docs = body.get("documents")
    if isinstance(docs, list) and docs:
        chars += _chars(docs) + len(docs) * (_chars(body.get("query")) + _chars(body.get("queries")))
    for k in ("text_1", "text_2", "data_1", "data_2"):
        if k in body:
            chars += _chars(body[k])
    pairs = max(_count(body.get("text_1")), _count(body.get("data_1")))
    if pairs == 1:  # one text scored against each of a list: read with each
        chars += (_chars(body.get("text_1")) + _chars(body.get("data_1"))) * \
            (max(_count(body.get("text_2")), _count(body.get("data_2"))) - 1)
    return (chars + definitions_chars(body) + 3) // 4 + tokens


def definitions_chars(body: dict[str, Any]) -> int:
    """Characters of the tool definitions (``tools``, or the older ``functions``) as JSON text: a
    part of the prompt that is no message."""
    chars = 0
    for k in ("tools", "functions"):
        v = body.get(k)
        if isinstance(v, list) and v:
            chars += len(dumps_bytes(v))
    return chars


def _count(v: Any) -> int:
    """Texts in a field that holds one or a list of them."""
    return len(v) if isinstance(v, list) else 1 if isinstance(v, str) else 0


def _chars(v: Any) -> int:
    if isinstance(v, str):
        return len(v)
    if isinstance(v, list):
        n = 0
        for p in v:
            if isinstance(p, str):
                n += len(p)
            elif isinstance(p, dict):
                if isinstance(p.get("text"), str):
                    n += len(p["text"])
                elif "content" in p:  # a Responses API input item: {"role": ..., "content": ...}
                    n += _chars(p["content"])
                else:  # a Responses API function call ("arguments") or its result ("output")
                    for f in ("arguments", "output"):
                        if isinstance(p.get(f), str):
                            n += len(p[f])
        return n
    return 0


def _token_ids(v: Any) -> int | None:
    """Token ids in a prompt or input given as a list of integers, or a list of such lists, by its
    first item (a list of millions of ids is not walked: its length is the count); None for text."""
    if not isinstance(v, list) or not v:
        return None
    first = v[0]
    if type(first) is int:
        return len(v)
    if isinstance(first, list) and (not first or type(first[0]) is int):
        return sum(len(x) for x in v if isinstance(x, list))
    return None
