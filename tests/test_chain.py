"""The plugin chain: YAML order, reverse order on the way back, short-circuit replies, on_complete
exactly once whatever happens, per-route overrides, entry-point discovery, response observation."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import Field

from gateway.plugin import ENTRY_POINT_GROUP, Plugin, PluginConfig, Registry, Reply, registry

from .helpers import write_config

T = aiohttp.ClientTimeout(total=20)
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "one two"}]}
CALLS: list[tuple[str, str, str, Any]] = []   # (plugin, tag, hook, detail)
CTXS: list[Any] = []                           # contexts seen by on_complete (plugin "a" only)


class RecConfig(PluginConfig):
    tag: str = Field("default", description="Recorded with every call (to see reconfiguration).")
    fail_complete: bool = Field(False, description="Raise in on_complete.")


class Rec(Plugin):
    Config = RecConfig

    async def startup(self) -> None:
        CALLS.append((self.name, self.config.tag, "startup", None))

    async def shutdown(self) -> None:
        CALLS.append((self.name, self.config.tag, "shutdown", None))

    async def on_request(self, ctx: Any) -> Reply | None:
        CALLS.append((self.name, self.config.tag, "request", ctx.request_id))
        if ctx.request.headers.get("X-Reply-From") == self.name:
            return Reply.error(403, f"refused by {self.name}", "permission_error", "test_refusal",
                               headers={"X-Refused-By": self.name})
        return None

    async def on_response(self, ctx: Any, head: Any) -> None:
        CALLS.append((self.name, self.config.tag, "response", head.source))
        head.headers.add("X-Chain", self.name)

    async def on_chunk(self, ctx: Any, chunk: bytes, last: bool) -> bytes:
        CALLS.append((self.name, self.config.tag, "chunk", last))
        if last and ctx.request.headers.get("X-Tail"):
            return chunk + f"[{self.name}]".encode()
        return chunk

    async def on_complete(self, ctx: Any) -> None:
        CALLS.append((self.name, self.config.tag, "complete", ctx.request_id))
        if self.name == "t_chain_a":
            CTXS.append(ctx)
        if self.config.fail_complete:
            raise RuntimeError("on_complete failed on purpose")


def _rec(name: str) -> type[Rec]:
    cls = type(f"Rec_{name}", (Rec,), {"name": name})
    registry.register(cls)
    return cls


for _n in ("t_chain_a", "t_chain_b", "t_chain_c", "t_chain_d"):
    _rec(_n)


class Observer(Plugin):
    name = "t_chain_observer"
    observes_response = True
    seen: list[Any] = []

    async def on_complete(self, ctx: Any) -> None:
        type(self).seen.append(ctx.completion)


registry.register(Observer)


@pytest.fixture(autouse=True)
def _clear() -> None:
    CALLS.clear()
    CTXS.clear()
    Observer.seen.clear()


def hooks(rid: str | None = None, hook: str | None = None) -> list[tuple[str, str, str, Any]]:
    return [c for c in CALLS if (hook is None or c[2] == hook)
            and (rid is None or c[2] not in ("request", "complete") or c[3] == rid)]


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


ABC = [{"name": "t_chain_a"}, {"name": "t_chain_b"}, {"name": "t_chain_c"}]


async def test_order_yaml_then_reverse(make_gateway: Any) -> None:
    g = await make_gateway(ABC)
    assert [c[0] for c in CALLS if c[2] == "startup"] == ["t_chain_a", "t_chain_b", "t_chain_c"]
    CALLS.clear()
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"X-Demo-Words": "3", "X-Tail": "1"}) as r:
            assert r.status == 200
            # on_response ran c, b, a: each added its name in that order
            assert r.headers.getall("X-Chain") == ["t_chain_c", "t_chain_b", "t_chain_a"]
            text = (await r.read()).decode()
    # the tail appended by on_chunk(last=True): c first, a last
    assert text.endswith("data: [DONE]\n\n[t_chain_c][t_chain_b][t_chain_a]")
    await wait_for(lambda: len(hooks(hook="complete")) == 3)
    names = lambda hook: [c[0] for c in CALLS if c[2] == hook]  # noqa: E731
    assert names("request") == ["t_chain_a", "t_chain_b", "t_chain_c"]
    assert names("response") == ["t_chain_c", "t_chain_b", "t_chain_a"]
    chunks = [(c[0], c[3]) for c in CALLS if c[2] == "chunk"]
    # at the end, each plugin's last call (with an empty chunk); what one flushed there goes to the
    # next as an ordinary piece first
    end = [("t_chain_c", True), ("t_chain_b", False), ("t_chain_b", True), ("t_chain_a", False), ("t_chain_a", True)]
    body, tail = chunks[:-5], chunks[-5:]
    assert tail == end, chunks
    assert len(body) % 3 == 0 and len(body) >= 3
    for i in range(0, len(body), 3):  # every chunk went c -> b -> a
        assert body[i:i + 3] == [("t_chain_c", False), ("t_chain_b", False), ("t_chain_a", False)]
    assert names("complete") == ["t_chain_a", "t_chain_b", "t_chain_c"]
    # complete ran after everything else
    assert [c[2] for c in CALLS[-3:]] == ["complete"] * 3
    await g.stop()
    assert [c[0] for c in CALLS if c[2] == "shutdown"] == ["t_chain_c", "t_chain_b", "t_chain_a"]


async def test_reply_short_circuits(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway(ABC)
    CALLS.clear()
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT, headers={"X-Reply-From": "t_chain_b"}) as r:
            assert r.status == 403
            assert r.headers["X-Refused-By"] == "t_chain_b"
            assert r.headers["Content-Type"] == "application/json"
            rid = r.headers["X-Request-ID"]
            assert r.headers.getall("X-Chain") == ["t_chain_c", "t_chain_b", "t_chain_a"]
            body = await r.json()
    assert body == {"error": {"message": "refused by t_chain_b", "type": "permission_error",
                              "code": "test_refusal", "param": None}}
    assert len(upstream.requests) == 0
    await wait_for(lambda: len(hooks(hook="complete")) == 3)
    assert [c[0] for c in CALLS if c[2] == "request"] == ["t_chain_a", "t_chain_b"]
    assert [(c[0], c[3]) for c in CALLS if c[2] == "response"] == [
        ("t_chain_c", "gateway"), ("t_chain_b", "gateway"), ("t_chain_a", "gateway")]
    assert not [c for c in CALLS if c[2] == "chunk"]
    assert [c[3] for c in CALLS if c[2] == "complete"] == [rid] * 3
    ctx = CTXS[0]
    assert ctx.outcome == "refused" and ctx.status == 403 and ctx.source == "gateway"
    assert ctx.refusal == {"plugin": "t_chain_b", "reason": "refused"}
    # The first plugin refusing stops everything after it.
    CALLS.clear()
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models", headers={"X-Reply-From": "t_chain_a"}) as r:
            assert r.status == 403
    await wait_for(lambda: len(hooks(hook="complete")) == 3)
    assert [c[0] for c in CALLS if c[2] == "request"] == ["t_chain_a"]


async def test_on_complete_exactly_once(make_gateway: Any, upstream: Any, caplog: Any) -> None:
    g = await make_gateway([{"name": "t_chain_a"}, {"name": "t_chain_b", "config": {"fail_complete": True}},
                            {"name": "t_chain_c"}],
                           server={"paths": ["/v1"], "max_body_size": 500},
                           upstream={"timeouts": {"connect": 2, "first_byte": 5, "idle": 5}})
    CALLS.clear()
    rids: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:          # proxied
            assert r.status == 200
            rids["ok"] = r.headers["X-Request-ID"]
        async with s.get(g.url + "/v1/models", headers={"X-Reply-From": "t_chain_c"}) as r:  # refused
            assert r.status == 403
            rids["refused"] = r.headers["X-Request-ID"]
        async with s.get(g.url + "/v1/models", headers={"X-Demo-Status": "500"}) as r:  # upstream error, relayed
            assert r.status == 500
            rids["upstream_500"] = r.headers["X-Request-ID"]
        async with s.post(g.url + "/v1/embeddings", data=b"x" * 600) as r:           # 413
            assert r.status == 413
            rids["too_large"] = r.headers["X-Request-ID"]
        async with s.get(g.url + "/nowhere") as r:                                   # 404
            assert r.status == 404
            rids["not_found"] = r.headers["X-Request-ID"]
        # client aborts mid-stream
        r = await s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"X-Demo-Delay": "0.2", "X-Demo-Words": "50"})
        rids["aborted_stream"] = r.headers["X-Request-ID"]
        await r.content.readuntil(b"\n\n")
        r.close()
        # client aborts while waiting for the response head
        task = asyncio.create_task(s.get(g.url + "/v1/models", headers={"X-Demo-Head-Delay": "1.5",
                                                                        "X-Request-ID": "abort-head"}))
        await wait_for(lambda: any(c[3] == "abort-head" for c in CALLS if c[2] == "request"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        rids["aborted_head"] = "abort-head"
    await wait_for(lambda: len(hooks(hook="complete")) >= 3 * len(rids))
    await asyncio.sleep(0.2)  # nothing more arrives
    per = Counter((c[0], c[3]) for c in CALLS if c[2] == "complete")
    for kind, rid in rids.items():
        for p in ("t_chain_a", "t_chain_b", "t_chain_c"):
            assert per[(p, rid)] == 1, (kind, p)
    assert sum(per.values()) == 3 * len(rids)
    outcome = {c.request_id: c.outcome for c in CTXS}
    assert outcome[rids["ok"]] == "ok"
    assert outcome[rids["refused"]] == "refused"
    assert outcome[rids["upstream_500"]] == "ok"  # the upstream answered; its status is relayed
    assert outcome[rids["too_large"]] == "error"
    assert outcome[rids["not_found"]] == "error"
    assert outcome[rids["aborted_stream"]] == "client_disconnected"
    assert outcome[rids["aborted_head"]] == "client_disconnected"
    # A plugin failing in on_complete is logged and does not stop the others.
    assert "on_complete failed on purpose" in caplog.text


async def test_route_overrides(make_gateway: Any) -> None:
    g = await make_gateway(
        [{"name": "t_chain_a"}, {"name": "t_chain_b"}, {"name": "t_chain_c", "config": {"tag": "global"}},
         {"name": "t_chain_d", "enabled": False},
         {"name": "headers", "config": {"response": {"X-Where": "default"}}}],
        routes=[
            {"path_prefix": "/v1/embeddings", "plugins": {"t_chain_b": {"enabled": False}}},
            {"name": "models-get", "path_prefix": "/v1/models", "methods": ["get"],
             "plugins": {"t_chain_c": {"config": {"tag": "models"}},
                         "headers": {"config": {"response": {"X-Where": "models"}}}}},
            {"path_prefix": "/v1/special", "plugins": {"t_chain_d": {"enabled": True}, "headers": {"enabled": False}}},
            {"path_prefix": "/v1/special/deeper", "plugins": {"t_chain_a": {"enabled": False}}},
        ])
    CALLS.clear()

    async def run(method: str, path: str, **kw: Any) -> tuple[list[tuple[str, str]], Any, str]:
        CALLS.clear()
        CTXS.clear()
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.request(method, g.url + path, **kw) as r:
                await r.read()
                where = r.headers.get("X-Where")
        await wait_for(lambda: any(c[2] == "complete" for c in CALLS))
        route = CTXS[0].route if CTXS else None
        return [(c[0], c[1]) for c in CALLS if c[2] == "request"], where, route

    calls, where, route = await run("POST", "/v1/chat/completions", json=CHAT)
    assert calls == [("t_chain_a", "default"), ("t_chain_b", "default"), ("t_chain_c", "global")]
    assert where == "default" and route == "default"
    calls, where, _ = await run("POST", "/v1/embeddings", json={"model": "demo-embed", "input": "x"})
    assert calls == [("t_chain_a", "default"), ("t_chain_c", "global")]
    calls, where, route = await run("GET", "/v1/models")
    assert calls == [("t_chain_a", "default"), ("t_chain_b", "default"), ("t_chain_c", "models")]
    assert where == "models" and route == "models-get"
    calls, where, _ = await run("POST", "/v1/models")  # method not in the route: default chain
    assert calls == [("t_chain_a", "default"), ("t_chain_b", "default"), ("t_chain_c", "global")]
    assert where == "default"
    calls, where, _ = await run("GET", "/v1/special/x")
    assert calls == [("t_chain_a", "default"), ("t_chain_b", "default"), ("t_chain_c", "global"),
                     ("t_chain_d", "default")]
    assert where is None
    calls, _, _ = await run("GET", "/v1/special/deeper/x")  # the longest prefix wins
    assert [c[0] for c in calls] == ["t_chain_b", "t_chain_c"]
    # the reconfigured instance was started like any other
    await g.stop()
    assert ("t_chain_c", "models", "shutdown", None) in CALLS


async def test_observed_completion_and_hidden_usage_chunk(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway([{"name": "t_chain_observer"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"X-Demo-Words": "4"}) as r:
            text = (await r.read()).decode()
        assert '"usage"' not in text and text.endswith("data: [DONE]\n\n")
        assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
        async with s.post(g.url + "/v1/chat/completions",
                          json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                          headers={"X-Demo-Words": "4"}) as r:
            text2 = (await r.read()).decode()
        assert '"usage"' in text2
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            plain = await r.json()
    await wait_for(lambda: len(Observer.seen) == 3)
    c1, c2, c3 = Observer.seen
    assert c1.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert c1.kind == "sse" and c1.done and c1.finish_reasons == ["stop"] and c1.deltas == 4
    assert c1.content == "Hello Hello Hello Hello" or len(c1.content.split()) == 4
    assert c2.usage == c1.usage
    assert c3.kind == "json" and c3.usage == plain["usage"]
    assert c3.assistant_message() == plain["choices"][0]["message"]


async def test_server_timing(make_gateway: Any) -> None:
    g = await make_gateway(ABC, server={"server_timing": True})
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models") as r:
            st = r.headers["Server-Timing"]
    names = [p.split(";")[0].strip() for p in st.split(",")]
    assert names == ["t_chain_a", "t_chain_b", "t_chain_c", "upstream"]


# -- discovery -------------------------------------------------------------------------------------
def test_builtin_plugin_comes_from_entry_point() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert eps["headers"] == "gateway.plugins.headers:Headers"
    from gateway.plugins.headers import Headers

    fresh = Registry()  # nothing registered by hand: only what the entry points provide
    assert fresh.get("headers") is Headers
    assert registry.get("headers") is Headers
    assert "headers" in fresh.names()


def _third_party(tmp_path: Path, broken: bool = False) -> Path:
    """An installed-looking distribution (dist-info with entry_points.txt) on a PYTHONPATH entry."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "acme_gateway_plugin.py").write_text(textwrap.dedent("""\
        from gateway.plugin import Plugin, PluginConfig
        %s

        class AcmeConfig(PluginConfig):
            greeting: str = "hi"

        class Acme(Plugin):
            name = "acme"
            Config = AcmeConfig

            async def on_response(self, ctx, head):
                head.headers["X-Acme"] = self.config.greeting
        """ % ("import no_such_dependency_xyz" if broken else "")))
    di = site / "acme_gateway_plugin-1.0.dist-info"
    di.mkdir()
    (di / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-gateway-plugin\nVersion: 1.0\n")
    (di / "entry_points.txt").write_text("[gateway.plugins]\nacme = acme_gateway_plugin:Acme\n")
    return site


def _check(tmp_path: Path, site: Path, plugins: str) -> subprocess.CompletedProcess[str]:
    cfg = write_config(tmp_path / "acme.yaml", "admin: {enabled: false}\nupstream: {url: http://127.0.0.1:9}\n"
                                               f"plugins:\n{plugins}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(cfg)], capture_output=True,
                          text=True, env=env, timeout=60, cwd=tmp_path)


def test_third_party_plugin_installed_by_entry_point(tmp_path: Path) -> None:
    site = _third_party(tmp_path)
    r = _check(tmp_path, site, "  - name: acme\n    config: {greeting: hello}\n")
    assert r.returncode == 0, r.stderr
    assert "acme" in r.stdout
    r = _check(tmp_path, site, "  - name: acme\n    config: {greting: hello}\n")
    assert r.returncode == 2
    assert "plugins[0].config.greting -> line 5: unknown key" in r.stderr


def test_broken_third_party_plugin_is_reported(tmp_path: Path) -> None:
    site = _third_party(tmp_path, broken=True)
    r = _check(tmp_path, site, "  - name: headers\n  - name: acme\n")
    assert r.returncode == 2
    assert "plugins[1].name -> line 5" in r.stderr
    assert "no_such_dependency_xyz" in r.stderr  # the real cause, not just "unknown"
    assert "Traceback" not in r.stderr
    r = _check(tmp_path, site, "  - name: headers\n")  # a broken plugin nobody uses stops nothing
    assert r.returncode == 0, r.stderr


class ClientIp(Plugin):
    name = "t_chain_client_ip"
    seen: list[str] = []

    async def on_request(self, ctx: Any) -> Reply | None:
        type(self).seen.append(ctx.client_ip)
        return None


registry.register(ClientIp)


@pytest.mark.parametrize("trusted,xff,want", [
    ([], ["203.0.113.9"], "127.0.0.1"),                                  # untrusted peer: XFF ignored
    (["127.0.0.0/8"], ["203.0.113.9, 10.0.0.1"], "10.0.0.1"),            # right-most untrusted hop
    (["127.0.0.0/8", "10.0.0.0/8"], ["203.0.113.9, 10.0.0.1"], "203.0.113.9"),
    (["127.0.0.0/8", "10.0.0.0/8"], ["203.0.113.9", "10.0.0.1"], "203.0.113.9"),  # several lines
    (["127.0.0.0/8"], [], "127.0.0.1"),
    (["127.0.0.0/8"], ["not-an-ip"], "127.0.0.1"),
])
async def test_client_ip_and_trusted_proxies(make_gateway: Any, trusted: list[str], xff: list[str], want: str) -> None:
    ClientIp.seen.clear()
    g = await make_gateway([{"name": "t_chain_client_ip"}], server={"trusted_proxies": trusted})
    headers = [("X-Forwarded-For", v) for v in xff]
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.url + "/v1/models", headers=headers) as r:
            assert r.status == 200
    assert ClientIp.seen == [want]
