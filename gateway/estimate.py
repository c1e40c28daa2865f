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
    instructions, or the Messages API's system prompt), plus the tool definitions as JSON text
    (every backend puts them in the prompt)."""
    if not isinstance(body, dict):
        return 0
    chars = 0
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict):
                chars += _chars(m.get("content"))
    for k in ("prompt", "input", "instructions", "system"):
        if k in body:
            chars += _chars(body[k])
    for k in ("tools", "functions"):
        v = body.get(k)
        if isinstance(v, list) and v:
            chars += len(dumps_bytes(v))
    return (chars + 3) // 4


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
        return n
    return 0
