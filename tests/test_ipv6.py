"""IPv6 and dual-stack settings: a listener on both families, IPv6 values in YAML and in
variables, a listener that cannot start naming its setting, a trusted proxy written with a prefix
length, IPv6 origins for CORS."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config.loader import ConfigError, load_config_text

from .helpers import base_config, clear_of_a_minute_boundary, free_port, write_config

BASE = 'upstream: {url: "http://127.0.0.1:9"}\nadmin: {token: "0123456789abcdef0123"}\n'


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_a_star_host_listens_on_ipv4_and_ipv6(make_gateway: Any) -> None:
    port = free_port()
    g = await make_gateway(server={"host": "*", "port": port})
    assert g.gw.cfg.server.host == ""
    async with aiohttp.ClientSession() as s:
        for url in (f"http://127.0.0.1:{port}/v1/models", f"http://[::1]:{port}/v1/models"):
            async with s.get(url) as r:
                assert r.status == 200, url


def test_an_unquoted_ipv6_address_in_yaml_gets_a_hint() -> None:
    for text in ("server:\n  host: ::\n", "server:\n  trusted_proxies: [::1/128]\n"):
        with pytest.raises(ConfigError) as e:
            load_config_text(text + BASE)
        assert 'an IPv6 address starting with ":" must be quoted' in str(e.value), str(e.value)
    assert load_config_text('server:\n  host: "::"\n' + BASE).server.host == "::"


def test_a_variable_that_is_no_valid_yaml_list_is_said() -> None:
    text = "server:\n  trusted_proxies: ${PROXIES:-[10.0.0.0/8]}\n" + BASE
    with pytest.raises(ConfigError) as e:
        load_config_text(text, env={"PROXIES": "[::1/128, fd00::/8]"})
    msg = str(e.value)
    assert "server.trusted_proxies" in msg and "from the environment" in msg and "must be quoted" in msg, msg
    cfg = load_config_text(text, env={"PROXIES": '["::1/128", "fd00::/8"]'})
    assert cfg.server.trusted_proxies == ["::1/128", "fd00::/8"]


def test_a_trusted_proxy_written_with_its_prefix_length_is_warned_about() -> None:
    cfg = load_config_text('server:\n  trusted_proxies: ["fd00::2/64", "10.0.0.0/8", "::1", "fe80::%eth0/64", '
                           '"fe80::1%eth0/128", "::ffff:10.0.0.0/104"]\n' + BASE)
    warned = [w for w in cfg.warnings() if "an address with a prefix length" in w]
    assert len(warned) == 1 and "trusts all of fd00::/64; write fd00::2 for one proxy" in warned[0]


def test_a_listener_that_cannot_start_names_its_setting(tmp_path: Path) -> None:
    cfg = base_config("http://127.0.0.1:9", tmp_path, [], admin={"host": "192.0.2.1", "port": free_port()})
    path = write_config(tmp_path / "g.yaml", cfg)
    r = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert "start-up failed: [Errno 99] admin.host '192.0.2.1': " in r.stderr, r.stderr[-2000:]


def test_ipv6_in_a_url_is_written_as_browsers_write_it() -> None:
    """The URL standard's form, whatever Python's own (3.13 writes a mapped IPv4 address dotted)."""
    import ipaddress

    from gateway.plugins.cors import url_ipv6

    for given, url in (("::ffff:127.0.0.1", "::ffff:7f00:1"), ("::1", "::1"), ("::", "::"),
                       ("1:0:0:2:0:0:0:3", "1:0:0:2::3"), ("1:0:0:2:0:0:3:4", "1::2:0:0:3:4"),
                       ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"), ("FE80:0:0:0:0:0:0:1", "fe80::1")):
        assert url_ipv6(ipaddress.IPv6Address(given)) == url, given


def test_yaml_hints_are_given_where_they_apply() -> None:
    with pytest.raises(ConfigError) as e:
        load_config_text("server:\n  host: *\n" + BASE)
    assert 'a bare * is YAML\'s alias sign: quote it, "*"' in str(e.value)
    with pytest.raises(ConfigError) as e:  # ('::' inside a quoted string is text: no IPv6 hint)
        load_config_text('upstream:\n  headers: {X-Note: "see ::1 docs"}: x\n' + BASE)
    assert "must be quoted" not in str(e.value)
    # a secret from the environment that looks like a broken mapping stays the string it is
    cfg = load_config_text('upstream:\n  url: "http://127.0.0.1:9"\n  headers:\n    X-Secret: ${UPK}\n'
                           'admin: {token: "0123456789abcdef0123"}\n', env={"UPK": "{token ::x"})
    assert cfg.upstream.headers["X-Secret"] == "{token ::x"


def test_ipv6_origins_are_compared_as_browsers_write_them() -> None:
    from gateway.plugins.cors import CorsConfig

    c = CorsConfig(allow_origins=["http://[2001:DB8:0:0:0:0:0:2]:3000", "http://[::ffff:127.0.0.1]:8000",
                                  "http://[::1]:80"])
    assert c.allow_origins == ["http://[2001:db8::2]:3000", "http://[::ffff:7f00:1]:8000", "http://[::1]"]
    for bad in ("http://[:::]", "http://[1.2.3.4]", "https://*.[::1]"):
        with pytest.raises(ValueError):
            CorsConfig(allow_origins=[bad])


def test_ipv4_clients_behind_nat64_are_counted_apart() -> None:
    """Through NAT64 every IPv4 client arrives in one IPv6 /64: each keeps a counter of its own."""
    from gateway.plugins.rate_limit.rules import ip_key

    assert ip_key("64:ff9b::c633:6407") == "198.51.100.7"
    assert ip_key("64:ff9b::cb00:7109") == "203.0.113.9"
    assert ip_key("64:ff9b::c633:6407", 24, 64) == "198.51.100.0/24"
    assert ip_key("2001:db8::1") == ip_key("2001:db8::2") == "2001:db8::/64"


async def test_nat64_clients_get_their_own_per_ip_budget(make_gateway: Any) -> None:
    await clear_of_a_minute_boundary()  # (the third request must be counted in the first one's minute)
    g = await make_gateway([{"name": "rate_limit", "config": {"rules": [
        {"name": "per-ip", "limit": "1/minute", "key_by": ["ip"]}]}}], server={"trusted_proxies": ["127.0.0.1/32"]})
    got = []
    async with aiohttp.ClientSession() as s:
        for client in ("64:ff9b::c633:6407", "64:ff9b::cb00:7109", "64:ff9b::c633:6407"):
            async with s.get(g.url + "/v1/models", headers={"X-Forwarded-For": client}) as r:
                got.append(r.status)
    assert got == [200, 200, 429]


def test_an_upstream_zone_id_written_as_in_a_url_standard_is_taken() -> None:
    """RFC 6874's [fe80::1%25eth0] (curl takes it) was kept encoded: every request then failed to
    resolve 'fe80::1%25eth0'. It is read as the zone id itself."""
    for url, want in (("http://[fe80::1%25eth0]:8000", "http://[fe80::1%eth0]:8000"),
                      ("http://[fe80::1%eth0]:8000/api", "http://[fe80::1%eth0]:8000/api"),
                      ("http://[::1]:8000", "http://[::1]:8000")):
        cfg = load_config_text(f'upstream: {{url: "{url}"}}\nadmin: {{token: "0123456789abcdef0123"}}\n')
        assert cfg.upstream.url == want
