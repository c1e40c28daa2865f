"""GenAI semantic-convention attributes from what the gateway saw of an exchange.

Only counts, names and ids by default. Message text (``gen_ai.input.messages``,
``gen_ai.output.messages``, in the semantic conventions' parts format, each text part cut at
``max_chars``) is added only when the config opts in with ``record_content: true``.
"""
from __future__ import annotations

import json
from typing import Any

from gateway.fastjson import utf8_safe
from gateway.observe import Completion, token_count, usage_tokens

#: A model name in a span name (``chat <model>``) is cut to this many characters.
MAX_NAME_CHARS = 128
#: Client- or upstream-supplied names and ids on a span are cut to this many characters (the
#: provider's SpanLimits cut every attribute too, at ``max_attribute_chars``).
MAX_VALUE_CHARS = 1024

#: Operation by path suffix, most specific first (``/chat/completions`` also ends in ``/completions``).
OPERATIONS = (("/chat/completions", "chat"), ("/completions", "text_completion"), ("/embeddings", "embeddings"),
              ("/responses", "chat"), ("/v1/messages", "chat"))

_REQUEST_PARAMS = (("max_tokens", "gen_ai.request.max_tokens"),
                   ("max_completion_tokens", "gen_ai.request.max_tokens"),
                   ("max_output_tokens", "gen_ai.request.max_tokens"),
                   ("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
                   ("frequency_penalty", "gen_ai.request.frequency_penalty"),
                   ("presence_penalty", "gen_ai.request.presence_penalty"), ("seed", "gen_ai.request.seed"))



#: A Responses API answer's status (or why it is incomplete) as the GenAI conventions' finish
#: reasons (stop, length, content_filter, error).
_RESPONSES_REASONS = {"completed": "stop", "max_output_tokens": "length", "failed": "error"}

def operation(path: str) -> str | None:
    for suffix, op in OPERATIONS:
        if path.endswith(suffix):
            return op
    return None


def text(v: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """A string from a client or the upstream as a span can carry it: cut to ``limit`` characters and
    valid UTF-8. One lone surrogate (valid in a JSON string) would make the OTLP exporter fail to
    encode, and drop, the whole batch of spans it is in, other requests' too."""
    s = v if type(v) is str else str(v)
    if len(s) > limit:
        s = s[:limit]
    return utf8_safe(s)


def attributes(op: str, ctx: Any, provider: str, record_content: bool, max_chars: int) -> dict[str, Any]:
    a: dict[str, Any] = {"gen_ai.operation.name": op}
    if provider:
        a["gen_ai.provider.name"] = provider
    model = ctx.model  # (the body's; on an Azure OpenAI path, the deployment it names)
    if model is not None:
        a["gen_ai.request.model"] = text(model)
    body = ctx.json
    if isinstance(body, dict):
        for key, attr in _REQUEST_PARAMS:
            v = body.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                a[attr] = v
        stop = body.get("stop")
        if isinstance(stop, str):
            a["gen_ai.request.stop_sequences"] = [text(stop)]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            a["gen_ai.request.stop_sequences"] = [text(s) for s in stop[:16]]
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n != 1:
            a["gen_ai.request.choice.count"] = n
        if op == "embeddings" and isinstance(body.get("encoding_format"), str):
            a["gen_ai.request.encoding_formats"] = [text(body["encoding_format"])]
    if ctx.conversation_id:
        a["gen_ai.conversation.id"] = text(ctx.conversation_id)
    c = ctx.completion
    if c is not None:
        if c.model:
            a["gen_ai.response.model"] = text(c.model)
        if c.response_id:
            a["gen_ai.response.id"] = text(c.response_id)
        if c.finish_reasons:
            reasons = c.finish_reasons
            if ctx.lpath.endswith("/responses"):  # the answer's status, as the conventions name reasons
                reasons = [_RESPONSES_REASONS.get(f, f) for f in reasons]
            a["gen_ai.response.finish_reasons"] = [text(f) for f in reasons]
        _usage(a, c)
    elif ctx.cut_estimate is not None:  # cut before the head: the prompt the upstream was reading
        a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"] = ctx.cut_estimate, 0
        a["gateway.tokens_estimated"] = True
    if record_content:
        _content(a, op, body, c, max_chars, ctx.lpath.endswith("/responses"))
    return a


def _usage(a: dict[str, Any], c: Completion) -> None:
    """Token counts as the audit event, metrics, key usage and the conversation turn have them (see
    plugins/audit/events.py): the upstream's report, except for a stream it does not cover (cut
    before its usage chunk, or reported before some of its output), whose output tokens are the
    deltas relayed, one per token roughly, and whose input tokens, when the upstream reported none,
    are the gateway's estimate of the prompt; marked ``gateway.tokens_estimated``."""
    u = c.usage
    # a stream without a usage report, or a valid output count in it (None for a JSON body)
    est = c.relayed_tokens
    if est is None and u is not None and c.usage_stale:
        est = c.completion_tokens
    it = ot = None
    if u:
        it, ot = usage_tokens(u)
        # (the chat API's prompt_tokens_details, the Responses API's input_tokens_details)
        details = u.get("prompt_tokens_details") or u.get("input_tokens_details")
        if isinstance(details, dict) and _is_int(details.get("cached_tokens")):
            a["gen_ai.usage.cache_read.input_tokens"] = details["cached_tokens"]
        # (the Messages API's, which its input_tokens does not count, and usage_tokens adds)
        for k, attr in (("cache_read_input_tokens", "gen_ai.usage.cache_read.input_tokens"),
                        ("cache_creation_input_tokens", "gen_ai.usage.cache_creation.input_tokens")):
            if _is_int(u.get(k)):
                a[attr] = u[k]
    if est is not None:
        ot = est
        a["gateway.tokens_estimated"] = True
        if it is None:  # (nor its prompt's tokens: the gateway's estimate)
            it = c.prompt_estimate
    if it is not None:
        a["gen_ai.usage.input_tokens"] = it
    if ot is not None:
        a["gen_ai.usage.output_tokens"] = ot


def _is_int(v: Any) -> bool:
    return token_count(v) is not None  # a believable token count (see gateway.observe)


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + "…"


def _parts(content: Any, max_chars: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": _cut(content, max_chars)}]
    out: list[dict[str, Any]] = []
    if isinstance(content, list):
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                out.append({"type": "text", "content": _cut(p["text"], max_chars)})
            elif isinstance(p, dict):
                out.append({"type": str(p.get("type", "unknown"))})  # images, audio: the kind only
    return out


def _message(m: dict[str, Any], max_chars: int) -> dict[str, Any]:
    parts = _parts(m.get("content"), max_chars)
    for tc in m.get("tool_calls") or []:
        if isinstance(tc, dict):
            fn = tc.get("function") or {}
            parts.append({"type": "tool_call", "id": tc.get("id"), "name": fn.get("name"),
                          "arguments": _cut(str(fn.get("arguments") or ""), max_chars)})
    if m.get("role") == "tool":
        parts = [{"type": "tool_call_response", "id": m.get("tool_call_id"),
                  "response": _cut(str(m.get("content") or ""), max_chars)}]
    return {"role": m.get("role"), "parts": parts}


def _responses_input(inp: Any, max_chars: int) -> list[dict[str, Any]]:
    """A Responses API ``input`` (a string, or a list of items: messages, the model's function
    calls and their outputs) as the conventions' messages."""
    if isinstance(inp, str):
        return [{"role": "user", "parts": _parts(inp, max_chars)}]
    msgs: list[dict[str, Any]] = []
    for item in inp if isinstance(inp, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "function_call":
            msgs.append({"role": "assistant", "parts": [{
                "type": "tool_call", "id": item.get("call_id"), "name": item.get("name"),
                "arguments": _cut(str(item.get("arguments") or ""), max_chars)}]})
        elif kind == "function_call_output":
            msgs.append({"role": "tool", "parts": [{"type": "tool_call_response", "id": item.get("call_id"),
                                                   "response": _cut(str(item.get("output") or ""), max_chars)}]})
        elif isinstance(item.get("role"), str):  # a message (type "message", or none)
            msgs.append({"role": item["role"], "parts": _parts(item.get("content"), max_chars)})
    return msgs


def _json(v: Any) -> str:
    """Message JSON for a span attribute: non-ASCII kept, a lone surrogate as '?' (see :func:`text`)."""
    return utf8_safe(json.dumps(v, ensure_ascii=False, default=str))


def _content(a: dict[str, Any], op: str, body: Any, c: Any, max_chars: int, responses: bool) -> None:
    if not isinstance(body, dict):
        return
    if op == "chat" and isinstance(body.get("messages"), list):
        msgs = [_message(m, max_chars) for m in body["messages"] if isinstance(m, dict)]
        a["gen_ai.input.messages"] = _json(msgs)
        if body.get("system"):  # the Messages API's system prompt (a text, or text blocks)
            a["gen_ai.system_instructions"] = _json(_parts(body["system"], max_chars))
    elif op == "chat" and "input" in body:  # the Responses API: `instructions` + `input` items
        if isinstance(body.get("instructions"), str):
            a["gen_ai.system_instructions"] = _json(_parts(body["instructions"], max_chars))
        msgs = _responses_input(body["input"], max_chars)
        if msgs:
            a["gen_ai.input.messages"] = _json(msgs)
    elif op == "text_completion" and isinstance(body.get("prompt"), str):
        a["gen_ai.input.messages"] = _json([{"role": "user", "parts": _parts(body["prompt"], max_chars)}])
    elif op == "embeddings":
        inp = body.get("input")
        if isinstance(inp, str):
            texts = [inp]
        else:
            texts = [t for t in inp if isinstance(t, str)] if isinstance(inp, list) else []
        if texts:
            a["gen_ai.input.messages"] = _json(
                [{"role": "user", "parts": [{"type": "text", "content": _cut(t, max_chars)} for t in texts]}])
    if c is not None and op in ("chat", "text_completion"):
        msg = c.assistant_message()
        if msg is not None:
            out = _message(msg, max_chars)
            out["role"] = out["role"] or "assistant"
            if c.finish_reason is not None:
                out["finish_reason"] = _RESPONSES_REASONS.get(c.finish_reason, c.finish_reason) if responses \
                    else c.finish_reason
            a["gen_ai.output.messages"] = _json([out])
