"""Values an operator plausibly types into gateway.yaml by mistake, which the check used to accept
and the gateway then got wrong: a token written as a shell variable (the token became the
variable's name), a health path without '/' (/readyz failed after a reload), a header that frames
the message (every request cut or refused), an identity header over the upstream's credential, a
listener address with a port in it, a Redis database that is not a number, bounds past what the
code can take. Each is refused by `gateway check` with its key path and line, and never echoes a
secret."""
from __future__ import annotations

from typing import Any

import pytest

from gateway.config import load_config_text

from .test_config import BASE, line_of, one, problems
from .test_config_loader_edges import _check

TOKEN = "t" * 24


def with_admin(token: str) -> str:
    return BASE.replace("admin:\n  enabled: false\n", f"admin:\n  token: {token}\n")


@pytest.mark.parametrize("token", ["$GATEWAY_ADMIN_TOKEN", "$(GATEWAY_ADMIN_TOKEN)", "'{{ .Values.adminToken }}'",
                                   "'%GATEWAY_ADMIN_TOKEN%'", "'${ADMIN_TOKEN_UNSET:-$GATEWAY_ADMIN_TOKEN}'"])
def test_an_admin_token_written_as_another_tools_variable_is_refused(token: str) -> None:
    text = with_admin(token)
    p = one(text)
    assert p.startswith(f"admin.token -> line {line_of(text, 'token:')}:") and "write ${NAME}" in p, p
    assert "GATEWAY_ADMIN_TOKEN" not in p and ".Values" not in p  # (nor the value itself)
    # ${NAME} is read from the environment, as before, whatever the secret looks like
    for secret in (TOKEN, "$Xk9vQ2mZ7pL4wR8tY3nB", "{{" + TOKEN + "}}"):
        assert load_config_text(with_admin("${GATEWAY_ADMIN_TOKEN}"),
                                env={"GATEWAY_ADMIN_TOKEN": secret}).admin.token == secret


def test_an_admin_token_no_client_can_send_is_refused() -> None:
    p = one(with_admin("“" + TOKEN + "”"))
    assert "printable ASCII" in p and TOKEN not in p, p
    assert load_config_text(with_admin("'" + TOKEN[:8] + " " + TOKEN[8:] + "'"), env={}).admin.token  # (a blank inside: sendable)


@pytest.mark.parametrize("section,host,why", [
    ("server", "0.0.0.0:8080", "without a port"), ("server", "'[::1]'", "without brackets: ::1"),
    ("server", "http://127.0.0.1", "not a URL"), ("server", "300.1.1.1", "not an IPv4 address"),
    ("server", "999.1.1.1", "not an IPv4 address"), ("admin", "my host", "not an IP address or a host name")])
def test_a_listener_address_that_cannot_be_listened_on_is_refused(section: str, host: str, why: str) -> None:
    text = BASE.replace("admin:\n  enabled: false\n", f"admin:\n  token: {TOKEN}\n")
    text = text.replace("  host: 127.0.0.1\n", f"  host: {host}\n") if section == "server" else \
        text.replace(f"  token: {TOKEN}\n", f"  token: {TOKEN}\n  host: {host}\n")
    p = one(text)
    assert p.startswith(f"{section}.host -> line ") and why in p, p
    for ok in ("0.0.0.0", "'::'", "'::1'", "localhost", "gw-1.internal.example.com", "llm_gateway", "'fe80::1%eth0'",
               "'localhost '", "''", "'0'"):  # ('': every interface; '0' is 0.0.0.0 to the resolver)
        assert load_config_text(BASE.replace("  host: 127.0.0.1\n", f"  host: {ok}\n"), env={})


def test_upstream_url_and_health_path_must_make_a_url() -> None:
    assert "names no host" in one(BASE.replace("http://127.0.0.1:9", "http://:23202"))
    for bad in ("health", "http://127.0.0.1:9/health", "'/he alth'"):
        p = one(BASE + f"  health_path: {bad}\n")
        assert p.startswith("upstream.health_path -> line ") and "starting with '/'" in p, p
    assert load_config_text(BASE + "  health_path: /health\n", env={}).upstream.health_path == "/health"
    # an optional variable left unset: connect only, as before
    assert load_config_text(BASE + "  health_path: '${UPSTREAM_HEALTH_PATH:-}'\n", env={}).upstream.health_path is None


@pytest.mark.parametrize("where,name", [("upstream", "Content-Length"), ("upstream", "transfer-encoding"),
                                        ("upstream", "TE"), ("headers.request", "Expect"),
                                        ("headers.response", "Content-Length"), ("key_auth", "Content-Length")])
def test_a_header_that_frames_the_message_cannot_be_configured(where: str, name: str) -> None:
    if where == "upstream":
        text = BASE + f"  headers: {{{name}: '20'}}\n"
    elif where.startswith("headers"):
        text = BASE + f"plugins:\n  - name: headers\n    config: {{{where.split('.')[1]}: {{{name}: '5'}}}}\n"
    else:
        text = BASE + f"plugins:\n  - name: key_auth\n    config: {{forward_identity_headers: {{{name}: owner}}}}\n"
    p = one(text)
    assert "frames the message" in p and "'20'" not in p, p
    # Host stays settable (an upstream behind a virtual host needs it), as do Connection and Keep-Alive
    assert load_config_text(BASE + "  headers: {Host: api.example.com, Connection: close}\n", env={}).upstream.headers
    assert load_config_text(BASE + "plugins:\n  - name: headers\n    config: {response: {Keep-Alive: timeout=55}}\n",
                            env={})


def test_an_identity_header_cannot_replace_the_upstreams_credential() -> None:
    secret = "Bearer sk-" + "u" * 30
    text = BASE + f"  headers: {{Authorization: '{secret}'}}\n" + \
        "plugins:\n  - name: key_auth\n    config:\n      forward_identity_headers: {authorization: key_id}\n"
    p = one(text)
    assert p.startswith("plugins[0].config.forward_identity_headers.authorization -> line ") and secret not in p, p
    text = BASE + "plugins:\n  - name: key_auth\n    config:\n      forward_identity_headers: {X-Owner: owner, x-owner: key_id}\n"
    assert "the same header" in one(text)


@pytest.mark.parametrize("db", ["/99x", "/-1", "/x", "/0/1", "?db=x", "/0?db=-1"])
def test_a_redis_database_that_is_not_a_number_is_refused(db: str) -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:6379{db}"
    p = one(BASE + f"plugins:\n  - name: rate_limit\n    config: {{storage: '{url}'}}\n")
    assert "the database of a redis:// URL is a number" in p and "hunter2" not in p, p
    for ok in ("", "/", "/0", "/15", "/1/", "?db=3"):
        assert load_config_text(BASE + f"plugins:\n  - name: rate_limit\n    config: {{storage: 'redis://h:6379{ok}'}}\n",
                                env={})


@pytest.mark.parametrize("text,where", [
    (BASE + "database:\n  busy_timeout_ms: 2147483648\n", "database.busy_timeout_ms"),
    (BASE + "plugins:\n  - name: key_auth\n    config: {rotation_grace: 8640000}\n", "plugins[0].config.rotation_grace"),
    (BASE + "plugins:\n  - name: tracing\n    config: {batch: {schedule_delay_ms: 100000000000000000}}\n",
     "plugins[0].config.batch.schedule_delay_ms"),
    (BASE + "plugins:\n  - name: tracing\n    config: {exporter: {type: otlp_http, timeout: 1e10}}\n",
     "plugins[0].config.exporter.timeout"),
])
def test_values_past_what_the_gateway_can_use_are_refused(text: str, where: str) -> None:
    p = one(text)
    assert p.startswith(where + " -> line ") and "less than or equal" in p, p


@pytest.mark.parametrize("sinks,why", [("[]", "at least one sink"), ("[database, syslog]", "none of database, stdout"),
                                       ("[jsonl]", "needs a path"), ("[Database]", "none of database, stdout")])
def test_audit_sinks_say_what_they_accept(sinks: str, why: str) -> None:
    p = one(BASE + f"plugins:\n  - name: audit\n    config: {{sinks: {sinks}}}\n")
    assert p.startswith("plugins[0].config.sinks -> line ") and why in p and "SinkSpec" not in p, p


@pytest.mark.parametrize("prefix", ["/V1/conversations", "'/my conv'", "/conv/*", "/a//b", "/a%41"])
def test_the_caller_api_prefix_is_checked_as_a_prefix(prefix: str) -> None:
    p = one(BASE + f"plugins:\n  - name: conversations\n    config: {{caller_api: true, api_prefix: {prefix}}}\n")
    assert p.startswith("plugins[0].config.api_prefix -> line "), p


def test_trusting_every_address_is_warned_of(tmp_path: Any) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(BASE.replace("  port: 0\n", "  port: 0\n  trusted_proxies: [0.0.0.0/0, 10.1.2.3/32]\n"))
    r = _check(path)
    assert r.returncode == 0, r.stderr
    assert "server.trusted_proxies holds 0.0.0.0/0" in r.stdout + r.stderr and "10.1.2.3" not in r.stdout + r.stderr
    path.write_text(BASE.replace("  port: 0\n", "  port: 0\n  trusted_proxies: [10.0.0.0/8, 192.168.0.0/16]\n"))
    assert "trusted_proxies" not in (r := _check(path)).stdout + r.stderr


def test_several_mistakes_come_together() -> None:
    ps = problems(BASE.replace("  host: 127.0.0.1\n", "  host: 0.0.0.0:80\n") + "  health_path: health\n")
    assert [p.split(" -> ")[0] for p in ps] == ["server.host", "upstream.health_path"], ps


def test_a_kubernetes_service_link_in_a_port_variable_is_explained() -> None:
    """A Service named `gateway` gives every pod GATEWAY_PORT=tcp://10.96.0.12:8080, which the
    shipped gateway.yaml reads for server.port: the message says where the value came from."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "gateway.yaml").read_text()
    ps = problems(text, env={"GATEWAY_PORT": "tcp://10.96.0.12:8080", "GATEWAY_ADMIN_TOKEN": TOKEN})
    assert len(ps) == 1 and ps[0].startswith(f"server.port -> line {line_of(text, 'port: ${GATEWAY_PORT')}:"), ps
    assert "GATEWAY_PORT is 'tcp://10.96.0.12:8080'" in ps[0] and "enableServiceLinks: false" in ps[0], ps
    # (only a service link's name gets the hint: Kubernetes sets NAME_PORT, NAME_PORT_<n>_TCP)
    ps = problems(BASE.replace("http://127.0.0.1:9", "${UPSTREAM_URL}"), env={"UPSTREAM_URL": "tcp://10.96.0.13:8000"})
    assert len(ps) == 1 and "Kubernetes" not in ps[0], ps
