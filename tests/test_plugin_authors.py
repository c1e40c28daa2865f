"""What a third-party plugin can count on: what it changes in a streamed answer is what is stored,
it reads answers uncompressed, a response filter of its own never replaces key_auth's, it is
known by the name the config gives it, a failing start names it, a failure on a chunk ends a
stream with an error event, and its config refuses true/false for numbers in any form."""
from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import PositiveInt

from gateway.plugin import Plugin, PluginConfig, registry

from .helpers import ADMIN_TOKEN, serve_handler, until, write_config
from .test_memory_edges import chat, stored, user


class Redact(Plugin):
    """Masks the word "secret" in the request (so the upstream and the record never see it) and
    in answers, plain and streamed, as the client gets them."""

    name = "t_pa_redact"
    rewrites_body = True

    async def on_request(self, ctx: Any) -> None:
        j = ctx.json
        if isinstance(j, dict) and isinstance(j.get("messages"), list):
            ctx.set_json({**j, "messages": [
                {**m, "content": m["content"].replace("secret", "[masked]")}
                if isinstance(m, dict) and isinstance(m.get("content"), str) else m for m in j["messages"]]})
        return None

    async def on_chunk(self, ctx: Any, chunk: bytes, last: bool) -> bytes:
        type(self).seen.append(chunk)
        return chunk.replace(b"hidden", b"[gone]")

    seen: list[bytes] = []


registry.register(Redact)


class Filters(Plugin):
    """Sets a response filter of its own (it adds a field to a model list)."""

    name = "t_pa_filter"

    async def on_request(self, ctx: Any) -> None:
        if ctx.lpath.endswith("/models"):
            ctx.json_filter = lambda j: {**j, "filtered_by": "t_pa_filter"}
        return None


registry.register(Filters)


class Unnamed(Plugin):
    """A class that names itself nothing, registered under a name of the config's."""

    async def on_request(self, ctx: Any) -> Any:
        if ctx.request.headers.get("X-Refuse"):
            from gateway.plugin import Reply
            return Reply.error(403, "no", "permission_error", "t_pa_refused")
        return None


registry.register(Unnamed, "t_pa_unnamed")


class FailsToStart(Plugin):
    name = "t_pa_fails"

    async def startup(self) -> None:
        raise ConnectionError("cannot reach the PII service at 10.0.0.1:9999")


registry.register(FailsToStart)


class BreaksMidStream(Plugin):
    name = "t_pa_breaks"

    async def on_chunk(self, ctx: Any, chunk: bytes, last: bool) -> bytes:
        if b"three" in chunk:
            raise RuntimeError("broken on purpose")
        return chunk


registry.register(BreaksMidStream)


class BudgetConfig(PluginConfig):
    per_owner: dict[str, PositiveInt] = {}
    default: PositiveInt | None = None


class Budget(Plugin):
    name = "t_pa_budget"
    Config = BudgetConfig


registry.register(Budget)


CONV = {"name": "conversations"}


async def test_what_a_chunk_plugin_changes_in_a_stream_is_what_is_stored(make_gateway: Any) -> None:
    """The stored assistant message of a streamed turn is the text the client got, as a plugin's
    on_chunk made it (stored from the upstream's bytes, it kept what the plugin removed, and the
    client's next turn, resending what it got, no longer matched: every turn forked)."""
    g = await make_gateway([{"name": "t_pa_redact"}, CONV])
    for stream in (False, True):
        status, cid, _ = await chat(g, [user("the secret is hidden")], model="demo-chat", stream=stream)
        assert status == 200 and cid
        msgs = [m for m, _ in await stored(g, cid)]
        said = "Hello from the demo backend. You said: the [masked] is [gone]"
        assert msgs == [user("the [masked] is hidden"), {"role": "assistant", "content": said}], (stream, msgs)
        # the next turn, with the history as the client has it, continues the conversation
        status, cid2, _ = await chat(g, [user("the secret is hidden"), {"role": "assistant", "content": said},
                                         user("again")], cid=cid, model="demo-chat", stream=stream)
        assert status == 200 and cid2 == cid, stream
        assert len(await stored(g, cid)) == 4


async def test_chunk_plugins_read_an_answer_uncompressed(make_gateway: Any) -> None:
    """With a plugin reading chunks, the upstream is asked for no encoding, and an upstream that
    compresses all the same has its answer decoded for the plugin (and so for the client): a
    plugin that masks words never sees gzip bytes it cannot read."""
    asked: list[str | None] = []
    text = "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "the hidden word"}}]}) + "\n\n"
    body = gzip.compress((text + "data: [DONE]\n\n").encode())

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        asked.append(request.headers.get("Accept-Encoding"))
        return web.Response(body=body, headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"})

    runner, url = await serve_handler(handler)
    try:
        g = await make_gateway([{"name": "t_pa_redact"}], upstream={"url": url})
        Redact.seen.clear()
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.post(g.url + "/v1/chat/completions", headers={"Accept-Encoding": "gzip"},
                              json={"model": "m", "messages": [user("hi")], "stream": True}) as r:
                raw = await r.read()
                assert r.status == 200
                assert "Content-Encoding" not in r.headers
        assert asked == ["identity"]
        assert b"".join(Redact.seen).startswith(b"data: ")  # the plugin read text, not gzip
        assert b"the [gone] word" in raw and b"hidden" not in raw
    finally:
        await runner.cleanup()


async def test_a_plugin_response_filter_adds_to_the_key_scope_filter(make_gateway: Any, tmp_path: Path) -> None:
    """key_auth limits a model list to a key's models with a response filter; a later plugin
    setting one of its own used to replace it, and the key saw every model."""
    g = await make_gateway([{"name": "key_auth"}, {"name": "t_pa_filter"}])
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", headers=admin,
                          json={"owner": "o", "scopes": {"models": ["demo-chat"]}}) as r:
            key = (await r.json())["key"]
        async with s.get(g.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
            got = await r.json()
    assert [m["id"] for m in got["data"]] == ["demo-chat"]
    assert got["filtered_by"] == "t_pa_filter"


async def test_a_plugin_is_known_by_its_configured_name(make_gateway: Any) -> None:
    """Server-Timing, the refusal recorded and the audit event carry the name the config gives a
    plugin, also for a class that names itself nothing (which gave `;dur=` and an empty name)."""
    g = await make_gateway([{"name": "audit"}, {"name": "t_pa_unnamed"}], server={"server_timing": True})
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", headers={"X-Refuse": "1"},
                          json={"model": "demo-chat", "messages": [user("hi")]}) as r:
            assert r.status == 403
            timing = r.headers["Server-Timing"]

        async def refused() -> Any:
            async with s.get(g.admin_url + "/audit?type=request",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                return [e for e in (await r.json())["data"] if e.get("refusal")]

        events = await until(refused, what="the refusal's audit event")
    assert "t_pa_unnamed;dur=" in timing and not any(p.strip().startswith(";") for p in timing.split(","))
    assert events[0]["refusal"]["plugin"] == "t_pa_unnamed", events


async def test_a_plugin_that_fails_to_start_is_named(make_gateway: Any, tmp_path: Path) -> None:
    g = await make_gateway([])
    cfg_path = tmp_path / "gateway.yaml"
    cfg = cfg_path.read_text().replace("plugins: []", "plugins:\n- name: t_pa_fails")
    write_config(cfg_path, cfg)
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/config/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 400
            err = (await r.json())["error"]
    assert "plugin t_pa_fails failed to start" in err["message"], err
    assert "cannot reach the PII service" in err["message"]


async def test_a_plugin_failing_mid_stream_ends_it_with_an_error_event(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "t_pa_breaks"}])
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions",
                          json={"model": "demo-chat", "stream": True,
                                "messages": [user("one two three four five")]}) as r:
            assert r.status == 200
            raw = b""
            try:
                while chunk := await r.content.readany():
                    raw += chunk
            except aiohttp.ClientPayloadError:
                pass  # (the connection is then closed with no end of body: the client sees the cut)
    last = raw.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: ") and json.loads(last[6:])["error"]["code"] == "internal_error", raw[-300:]


def test_true_or_false_for_numbers_is_refused_in_any_form(tmp_path: Path) -> None:
    """``per_owner: {alice: true}`` (a mapping to PositiveInt) and ``default: true`` (an optional
    PositiveInt) were read as 1."""
    from gateway.config import load_config
    from gateway.config.loader import ConfigError

    path = tmp_path / "g.yaml"
    for bad in ({"per_owner": {"alice": True}}, {"default": True}):
        write_config(path, {"upstream": {"url": "http://127.0.0.1:9"},
                            "plugins": [{"name": "t_pa_budget", "config": bad}]})
        try:
            load_config(path)
        except ConfigError as e:
            assert "expected a number" in str(e) or "expected numbers" in str(e), str(e)
        else:
            raise AssertionError(f"{bad} accepted")
    write_config(path, {"upstream": {"url": "http://127.0.0.1:9"},
                        "plugins": [{"name": "t_pa_budget", "config": {"per_owner": {"alice": 5}, "default": 2}}]})
    load_config(path)


class HoldsBack(Plugin):
    """Holds the last 6 bytes of each piece back until the next (as a redactor waiting to see
    whether a word goes on), flushing them at the end."""

    name = "t_pa_holds"

    async def on_chunk(self, ctx: Any, chunk: bytes, last: bool) -> bytes:
        held = ctx.state.get(self.name, b"") + chunk
        if last:
            return held
        ctx.state[self.name] = held[-6:]
        return held[:-6]


registry.register(HoldsBack)


@pytest.mark.parametrize("observed", [True, False])
async def test_a_plugin_holding_a_tail_back_does_not_hide_the_end_of_a_stream(make_gateway: Any, observed: bool) -> None:
    """The upstream keeps the connection open after [DONE]: the end was read from the plugins'
    output, where [DONE] sat in the held-back tail, so the stream waited out the idle timeout and
    ended with an upstream_timeout error event (a finished answer, failed in every SDK); in a chain
    without a plugin that reads the answer (audit here), nothing read the end at all."""
    async def open_after_done(request: web.Request) -> web.StreamResponse:
        await request.read()
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(request)
        await r.write(b'data: {"choices": [{"index": 0, "delta": {"content": "all of it"}, "finish_reason": "stop"}]}'
                      b'\n\ndata: [DONE]\n\n')
        await asyncio.sleep(6)  # (the connection open past the gateway's idle timeout, 4 s)
        return r

    runner, url = await serve_handler(open_after_done)
    try:
        g = await make_gateway([{"name": "audit"}] * observed + [{"name": "t_pa_holds"}],
                               upstream={"url": url, "timeouts": {"connect": 2, "first_byte": 10, "idle": 4}})
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions",
                              json={"model": "m", "stream": True, "messages": [user("hi")]}) as r:
                raw = await r.read()
        assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw, raw
        if not observed:
            return

        async def outcome() -> Any:
            async with aiohttp.ClientSession() as s:
                async with s.get(g.admin_url + "/audit?type=request", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                    data = (await r.json())["data"]
            return data[0]["outcome"] if data else None

        assert await until(outcome, what="the audit event") == "ok"
    finally:
        await runner.cleanup()


async def test_an_error_answer_compressed_as_the_gateway_cannot_read_keeps_its_status(make_gateway: Any) -> None:
    """An upstream 429 in a coding the gateway does not decode (br) became a 502 in a chain with
    an on_chunk plugin; it is relayed as it came (its Retry-After too), without the plugins."""
    async def busy(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=429, body=b"\x8b\x02\x80{}\x03", headers={
            "Content-Encoding": "br", "Retry-After": "5", "Content-Type": "application/json"})

    runner, url = await serve_handler(busy)
    try:
        g = await make_gateway([{"name": "t_pa_redact"}], upstream={"url": url})
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.post(g.url + "/v1/chat/completions", json={"model": "m", "messages": [user("hi")]}) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "5"
                assert r.headers["Content-Encoding"] == "br" and await r.read() == b"\x8b\x02\x80{}\x03"
    finally:
        await runner.cleanup()


class Sloppy(Plugin):
    """Returns what a hook must not: a dict from on_request, a str from on_chunk, a filter whose
    answer JSON cannot carry."""

    name = "t_pa_sloppy"

    async def on_request(self, ctx: Any) -> Any:
        how = ctx.request.headers.get("X-Sloppy")
        if how == "request":
            return {"status": 403}
        if how == "filter":
            ctx.json_filter = lambda j: {1, 2}
        return None

    async def on_chunk(self, ctx: Any, chunk: bytes, last: bool) -> Any:
        return chunk.decode() if ctx.request.headers.get("X-Sloppy") == "chunk" else chunk


registry.register(Sloppy)


async def test_a_hook_returning_the_wrong_type_is_a_plugin_failure(make_gateway: Any,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A dict from on_request gave aiohttp's own 500 (no request id, no plugin named, audit status
    0); a str from on_chunk cut the answer silently; a filter's answer that JSON cannot carry gave
    a 500 rather than the 502 a failing filter gets."""
    g = await make_gateway([{"name": "t_pa_sloppy"}])
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", headers={"X-Sloppy": "request"},
                          json={"model": "demo-chat", "messages": [user("hi")]}) as r:
            assert r.status == 500 and (await r.json())["error"]["code"] == "internal_error"
            assert "X-Request-ID" in r.headers
        assert "plugin t_pa_sloppy failed in on_request" in caplog.text
        async with s.get(g.url + "/v1/models", headers={"X-Sloppy": "filter"}) as r:
            assert r.status == 502 and (await r.json())["error"]["code"] == "upstream_unreadable"
        async with s.post(g.url + "/v1/chat/completions", headers={"X-Sloppy": "chunk"},
                          json={"model": "demo-chat", "stream": True, "messages": [user("hi")]}) as r:
            raw = b""
            try:
                while chunk := await r.content.readany():
                    raw += chunk
            except aiohttp.ClientPayloadError:
                pass
        assert b'"code": "internal_error"' in raw, raw[-300:]
        assert "plugin t_pa_sloppy failed in on_chunk" in caplog.text


async def test_a_fault_after_the_response_head_is_logged(make_gateway: Any, monkeypatch: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected exception in the gateway after the head went out (here: ending the body)
    closed the connection with nothing logged: a bug there was invisible."""
    import gateway.proxy as proxy_module

    send = proxy_module._send

    async def failing_end(ctx: Any, out: Any, chunk: bytes | None) -> None:
        if chunk is None:
            raise RuntimeError("ending the body failed on purpose")
        await send(ctx, out, chunk)

    monkeypatch.setattr(proxy_module, "_send", failing_end)
    g = await make_gateway([])
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions",
                          json={"model": "demo-chat", "stream": True, "messages": [user("hi")]}) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    assert "request handling failed after the response began" in caplog.text
    assert "ending the body failed on purpose" in caplog.text
