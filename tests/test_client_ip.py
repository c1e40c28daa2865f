"""Client IP resolution behind trusted proxies, and per-IP limits keyed by the client's network:
real gateways on loopback sockets. The test client is 127.0.0.1, made a trusted proxy so that
X-Forwarded-For plays the clients; a test-only plugin echoes ``ctx.client_ip`` in a header."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import make_mocked_request

from gateway.config import ConfigError, load_config_text
from gateway.context import resolve_client_ip
from gateway.plugin import Plugin, PluginConfig, registry

from .helpers import base_config

CHAT = "/v1/chat/completions"
BODY = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
T = aiohttp.ClientTimeout(total=15)
PROXY = {"trusted_proxies": ["127.0.0.0/8"]}


class EchoIP(Plugin):
    """Test-only: puts the resolved client address into the X-Test-Client-IP response header."""

    name = "test_client_ip_echo"
    Config = PluginConfig

    async def on_request(self, ctx: Any) -> None:
        ctx.response_headers["X-Test-Client-IP"] = ctx.client_ip
        return None


EchoIP.__test__ = False  # type: ignore[attr-defined]
registry.register(EchoIP)
ECHO = {"name": "test_client_ip_echo"}


def rl(**config: Any) -> dict[str, Any]:
    return {"name": "rate_limit", "config": config}


async def call(s: aiohttp.ClientSession, url: str, *xff: str) -> tuple[int, str]:
    """One request with the given X-Forwarded-For lines: (status, the client_ip the gateway saw)."""
    headers = [("X-Forwarded-For", v) for v in xff]
    async with s.post(url + CHAT, json=BODY, headers=headers, timeout=T) as r:
        await r.read()
        return r.status, r.headers.get("X-Test-Client-IP", "")


async def seen(url: str, *xff: str) -> str:
    async with aiohttp.ClientSession() as s:
        return (await call(s, url, *xff))[1]


# -- finding 1: IPv6 clients rotating through their /64 -------------------------------------------
async def test_ipv6_clients_of_one_64_share_a_counter(make_gateway):
    rules = [{"name": "per-ip", "limit": "5/minute", "key_by": ["ip"]}]
    g = await make_gateway([ECHO, rl(rules=rules)], name="net.yaml", server=PROXY)
    async with aiohttp.ClientSession() as s:
        res = [await call(s, g.url, f"2001:db8:1:2::{i:x}") for i in range(1, 9)]
        other = await call(s, g.url, "2001:db8:1:3::1")  # the next /64: another subscriber
        v4 = [await call(s, g.url, f"203.0.113.{i}") for i in range(1, 7)]  # IPv4: each address its own
    assert [st for st, _ in res] == [200] * 5 + [429] * 3
    # Only the counter is keyed by the network: the client address stays the address.
    assert [ip for _, ip in res] == [f"2001:db8:1:2::{i:x}" for i in range(1, 9)]
    assert other == (200, "2001:db8:1:3::1")
    assert [st for st, _ in v4] == [200] * 6

    # ipv6_prefix: 128 keys each address; ipv4_prefix: 24 counts an IPv4 /24 together.
    each = await make_gateway([ECHO, rl(ipv6_prefix=128, ipv4_prefix=24, rules=rules)], name="each.yaml",
                              server=PROXY)
    async with aiohttp.ClientSession() as s:
        res = [await call(s, each.url, f"2001:db8:1:2::{i:x}") for i in range(1, 9)]
        v4 = [await call(s, each.url, f"198.51.100.{i}") for i in range(1, 8)]
    assert [st for st, _ in res] == [200] * 8
    assert [st for st, _ in v4] == [200] * 5 + [429] * 2


def test_prefix_settings_are_validated(tmp_path: Path):
    for bad in ({"ipv6_prefix": 0}, {"ipv6_prefix": 129}, {"ipv4_prefix": 33}, {"ipv4_prefix": "wide"}):
        cfg = base_config("http://127.0.0.1:9", tmp_path, [rl(**bad)])
        with pytest.raises(ConfigError):
            load_config_text(yaml.safe_dump(cfg))
    cfg = base_config("http://127.0.0.1:9", tmp_path, [rl(ipv6_prefix=128, ipv4_prefix=32)])
    load_config_text(yaml.safe_dump(cfg))


# -- finding 2: ports, brackets and zones written by a proxy --------------------------------------
async def test_forwarded_for_with_ports_brackets_and_zones(make_gateway):
    g = await make_gateway([ECHO], server=PROXY)
    cases = {
        "198.51.100.7:1234": "198.51.100.7",
        "[2001:db8::1]:4711": "2001:db8::1",
        "[2001:db8::1]": "2001:db8::1",
        "fe80::1%eth0": "fe80::1",
        "[fe80::1%eth0]:80": "fe80::1",
        "203.0.113.9:80, 127.0.0.2:8080": "203.0.113.9",  # a trusted hop with a port is still trusted
        # No address: the socket peer (the proxy that connected), as before.
        "unknown": "127.0.0.1",
        "_hidden": "127.0.0.1",
        "garbage!!": "127.0.0.1",
        "198.51.100.7:http": "127.0.0.1",
        "[2001:db8::1]junk": "127.0.0.1",
        "203.0.113.9, unknown": "127.0.0.1",
    }
    async with aiohttp.ClientSession() as s:
        got = {h: (await call(s, g.url, h))[1] for h in cases}
    assert got == cases


async def test_clients_behind_a_port_writing_proxy_get_their_own_counters(make_gateway):
    rules = [{"name": "per-ip", "limit": "2/minute", "key_by": ["ip"]}]
    g = await make_gateway([rl(rules=rules)], server=PROXY)
    async with aiohttp.ClientSession() as s:
        a = [(await call(s, g.url, f"198.51.100.7:{1000 + i}"))[0] for i in range(3)]
        b = [(await call(s, g.url, f"[2001:db8::9]:{2000 + i}"))[0] for i in range(3)]
        c = [(await call(s, g.url, "198.51.100.8:5"))[0] for _ in range(2)]
    assert a == [200, 200, 429]  # one client whatever its source port
    assert b == [200, 200, 429]
    assert c == [200, 200]      # not the proxy's (everyone's) bucket


# -- finding 3: IPv4-mapped IPv6 ------------------------------------------------------------------
async def test_ipv4_mapped_addresses_are_the_ipv4_client(make_gateway):
    rules = [{"name": "per-ip", "limit": "2/minute", "key_by": ["ip"]}]
    g = await make_gateway([ECHO, rl(rules=rules)], server={"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]})
    async with aiohttp.ClientSession() as s:
        first = await call(s, g.url, "::ffff:203.0.113.5")
        second = await call(s, g.url, "203.0.113.5")
        third = await call(s, g.url, "[::ffff:203.0.113.5]:443")
        # A trusted proxy that shows up mapped is still trusted: the client is the hop before it.
        behind = await call(s, g.url, "198.51.100.3, ::ffff:10.0.0.1")
    assert first == (200, "203.0.113.5")
    assert second == (200, "203.0.113.5")
    assert third == (429, "203.0.113.5")  # one client, one counter
    assert behind == (200, "198.51.100.3")


class _Transport:
    def __init__(self, peer: tuple[Any, ...]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return False


def test_a_mapped_or_zoned_peer_is_normalised():
    # A dual-stack listener (IPV6_V6ONLY off) shows IPv4 peers as ::ffff:a.b.c.d; the gateway's own
    # listener cannot be made one from here, so the peer is given to the resolver directly.
    import ipaddress
    nets = [ipaddress.ip_network("10.0.0.0/8")]
    for peer, trusted, xff, want in (
            (("::ffff:203.0.113.5", 5000, 0, 0), [], None, "203.0.113.5"),
            (("fe80::7%eth0", 5000, 0, 2), [], None, "fe80::7"),
            (("::ffff:10.0.0.1", 5000, 0, 0), nets, "198.51.100.3", "198.51.100.3"),
            (("127.0.0.1", 5000), [], "198.51.100.3", "127.0.0.1")):
        req = make_mocked_request("GET", "/", headers={"X-Forwarded-For": xff} if xff else {},
                                  transport=_Transport(peer))
        assert resolve_client_ip(req, trusted) == want, peer


# -- finding 4: every hop trusted -----------------------------------------------------------------
async def test_all_trusted_hops_give_the_normalised_left_most(make_gateway):
    rules = [{"name": "per-ip", "limit": "2/minute", "key_by": ["ip"]}]
    g = await make_gateway([ECHO, rl(ipv6_prefix=128, rules=rules)],
                           server={"trusted_proxies": ["127.0.0.0/8", "2001:db8:ffff::/48", "10.0.0.0/8"]})
    async with aiohttp.ClientSession() as s:
        res = [await call(s, g.url, h) for h in ("2001:DB8:FFFF::1", "2001:db8:ffff::1",
                                                 "2001:db8:ffff:0:0:0:0:1, 10.0.0.1")]
        mapped = await call(s, g.url, "::ffff:10.0.0.7")
    assert [ip for _, ip in res] == ["2001:db8:ffff::1"] * 3
    assert [st for st, _ in res] == [200, 200, 429]  # one address, one counter
    assert mapped == (200, "10.0.0.7")
