"""Config validation: every problem names the key path and the YAML line; env interpolation."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_config, load_config_text

BASE = """\
server:
  host: 127.0.0.1
  port: 0
admin:
  enabled: false
upstream:
  url: http://127.0.0.1:9
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    seen = 0
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            seen += 1
            if seen == nth:
                return i
    raise AssertionError(f"{needle!r} not in config text")


def problems(text: str, env: dict[str, str] | None = None, source: str = "gateway.yaml") -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_config_text(text, source, env or {})
    msg = str(ei.value)
    assert msg.splitlines() == [f"{source}: {p}" for p in ei.value.problems]
    return ei.value.problems


def one(text: str, env: dict[str, str] | None = None) -> str:
    ps = problems(text, env)
    assert len(ps) == 1, ps
    return ps[0]


def test_valid_config_and_defaults() -> None:
    cfg = load_config_text(BASE + "plugins:\n  - name: headers\n", env={})
    assert cfg.server.port == 0 and cfg.server.max_body_size == 10 * 2**20
    assert cfg.upstream.timeouts.first_byte == 120
    assert cfg.plugins[0].validated.response == {}


def test_unknown_key() -> None:
    text = BASE.replace("  port: 0\n", "  port: 0\n  hots: 1.2.3.4\n")
    assert one(text) == f"server.hots -> line {line_of(text, 'hots')}: unknown key"
    text = BASE + "extra_section: {}\n"
    assert one(text) == f"extra_section -> line {line_of(text, 'extra_section')}: unknown key"
    text = BASE + "  timeouts:\n    conect: 1\n"
    assert one(text) == f"upstream.timeouts.conect -> line {line_of(text, 'conect')}: unknown key"


def test_wrong_type() -> None:
    text = BASE.replace("port: 0", "port: eighty")
    p = one(text)
    assert p.startswith(f"server.port -> line {line_of(text, 'eighty')}: ")
    assert "integer" in p
    text = BASE + "plugins: {name: headers}\n"
    assert one(text).startswith(f"plugins -> line {line_of(text, 'plugins:')}: ")


@pytest.mark.parametrize("replace,path,needle,words", [
    (("port: 0", "port: 70000"), "server.port", "70000", "less than or equal to 65535"),
    (("port: 0", "port: 0\n  max_body_size: 10XB"), "server.max_body_size", "10XB", "size"),
    (("port: 0", "port: 0\n  trusted_proxies: [10.0.0.0/8, nonsense]"), "server.trusted_proxies", "nonsense",
     "not a CIDR: 'nonsense'"),
    (("url: http://127.0.0.1:9", "url: ftp://example"), "upstream.url", "ftp://", "http:// or https://"),
    (("port: 0", "port: 0\n  shutdown_timeout: -1"), "server.shutdown_timeout", "shutdown_timeout",
     "greater than or equal to 0"),
])
def test_bad_value(replace: tuple[str, str], path: str, needle: str, words: str) -> None:
    text = BASE.replace(*replace)
    p = one(text)
    assert p.startswith(f"{path} -> line {line_of(text, needle)}: "), p
    assert words in p and "Value error" not in p  # (pydantic's prefix to a validator's message)


def test_bad_values_elsewhere() -> None:
    text = BASE + "database:\n  url: mysql://db/x\n"
    assert one(text).startswith(f"database.url -> line {line_of(text, 'mysql')}: ")
    text = BASE + "logging:\n  level: LOUD\n"
    assert one(text).startswith(f"logging.level -> line {line_of(text, 'LOUD')}: ")
    text = BASE.replace("  enabled: false\n", "  token: short\n")
    p = one(text)
    assert p.startswith(f"admin -> line {line_of(text, 'admin:')}: ") and "16 characters" in p
    assert "short" not in p.split(":", 1)[1]  # the (bad) token itself is not echoed
    text = BASE.replace("upstream:\n  url: http://127.0.0.1:9\n", "")
    assert one(text).startswith("upstream -> line ")


def test_several_problems_reported_together() -> None:
    text = BASE.replace("port: 0", "port: x").replace("host: 127.0.0.1", "host: 127.0.0.1\n  colour: red")
    ps = problems(text)
    assert len(ps) == 2
    assert any(p.startswith(f"server.port -> line {line_of(text, 'port: x')}") for p in ps)
    assert any(p == f"server.colour -> line {line_of(text, 'colour')}: unknown key" for p in ps)


def test_unknown_plugin() -> None:
    text = BASE + "plugins:\n  - name: headers\n  - name: no_such_plugin\n"
    p = one(text)
    assert p.startswith(f"plugins[1].name -> line {line_of(text, 'no_such_plugin')}: unknown plugin 'no_such_plugin'")
    assert "headers" in p  # lists the known ones


def test_bad_plugin_config() -> None:
    text = BASE + textwrap.dedent("""\
        plugins:
          - name: headers
            config:
              response: {X-A: "1"}
              request:
                X-Team: [not, a, string]
              colour: red
        """)
    ps = problems(text)
    assert f"plugins[0].config.request.X-Team -> line {line_of(text, 'X-Team')}: Input should be a valid string" in ps
    assert f"plugins[0].config.colour -> line {line_of(text, 'colour')}: unknown key" in ps
    assert len(ps) == 2


def test_plugin_listed_twice() -> None:
    text = BASE + "plugins:\n  - name: headers\n  - name: metrics\n  - name: headers\n"
    assert one(text).startswith(f"plugins[2].name -> line {text.count(chr(10)) }: plugin 'headers' is listed twice "
                                "(first as plugins[0])")


def test_missing_env_var() -> None:
    text = BASE.replace("url: http://127.0.0.1:9", "url: http://127.0.0.1:9\n  headers:\n"
                                                   "    Authorization: Bearer ${UPSTREAM_KEY}")
    p = one(text, env={})
    assert p == (f"upstream.headers.Authorization -> line {line_of(text, 'UPSTREAM_KEY')}: environment variable "
                 "UPSTREAM_KEY is not set (use ${UPSTREAM_KEY:-default} to give a default)")
    cfg = load_config_text(text, env={"UPSTREAM_KEY": "sk-up"})
    assert cfg.upstream.headers["Authorization"] == "Bearer sk-up"
    # An empty variable counts as unset.
    assert "UPSTREAM_KEY is not set" in one(text, env={"UPSTREAM_KEY": ""})


def test_env_defaults_and_types() -> None:
    text = BASE.replace("port: 0", "port: ${GW_PORT:-8089}").replace(
        "url: http://127.0.0.1:9", "url: ${UP_URL:-http://127.0.0.1:9}/\n"
        "  headers: {Authorization: 'Bearer ${KEY:-none}', X-Quoted: '${NUM:-42}'}\n"
        "  timeouts:\n    idle: ${IDLE:-7.5}")
    cfg = load_config_text(text, env={})
    assert cfg.server.port == 8089
    assert cfg.upstream.url == "http://127.0.0.1:9"
    assert cfg.upstream.headers == {"Authorization": "Bearer none", "X-Quoted": "42"}
    assert cfg.upstream.timeouts.idle == 7.5
    cfg = load_config_text(text, env={"GW_PORT": "9001", "UP_URL": "https://up.example", "KEY": "k", "IDLE": "3"})
    assert cfg.server.port == 9001 and cfg.upstream.url == "https://up.example"
    assert cfg.upstream.headers["Authorization"] == "Bearer k" and cfg.upstream.timeouts.idle == 3
    # A default of the wrong type is reported at its line like any value.
    bad = BASE.replace("port: 0", "port: ${GW_PORT:-lots}")
    assert one(bad).startswith(f"server.port -> line {line_of(bad, 'lots')}: ")


def test_bad_route_override() -> None:
    head = BASE + "plugins:\n  - name: headers\n    config: {response: {X-A: a}}\n"
    text = head + "routes:\n  - path_prefix: /v1/embeddings\n    plugins:\n      key_auth: {enabled: false}\n"
    p = one(text)
    assert p.startswith(f"routes[0].plugins.key_auth -> line {line_of(text, 'key_auth')}: ")
    assert "not in the plugins list" in p
    text = head + ("routes:\n  - path_prefix: /v1/embeddings\n    plugins:\n      headers:\n"
                   "        config:\n          response: {X-A: [1]}\n")
    p = one(text)
    assert p.startswith(f"routes[0].plugins.headers.config.response.X-A -> line {line_of(text, '[1]')}: ")
    text = head + "routes:\n  - path_prefix: v1\n"
    assert one(text).startswith(f"routes[0].path_prefix -> line {line_of(text, 'path_prefix')}: ")
    text = head + "routes:\n  - path_prefix: /v1\n    plugins:\n      headers: {enabled: maybe}\n"
    assert one(text).startswith(f"routes[0].plugins.headers.enabled -> line {line_of(text, 'maybe')}: ")
    text = head + "routes:\n  - path_prefix: /v1\n    method: [GET]\n"
    assert one(text) == f"routes[0].method -> line {line_of(text, 'method')}: unknown key"


def test_route_override_config_is_merged_and_validated() -> None:
    text = BASE + textwrap.dedent("""\
        plugins:
          - name: headers
            config: {response: {X-A: a}, request: {X-R: r}}
        routes:
          - path_prefix: /v1/embeddings
            methods: [post]
            plugins:
              headers: {config: {response: {X-B: b}}}
        """)
    cfg = load_config_text(text, env={})
    ov = cfg.routes[0].plugins["headers"].validated
    assert ov.response == {"X-A": "a", "X-B": "b"} and ov.request == {"X-R": "r"}
    assert cfg.routes[0].methods == ["POST"]


def test_yaml_syntax_and_duplicates() -> None:
    text = BASE + "plugins: [\n"
    assert one(text).startswith("line ")
    assert "invalid YAML" in one(text)
    text = BASE.replace("  port: 0\n", "  port: 0\n  port: 1\n")
    assert one(text) == f"server.port -> line {line_of(text, 'port: 1')}: duplicate key"
    assert one("- a\n- b\n") == "line 1: the top level must be a mapping"


def test_load_config_file(tmp_path: Path) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text(BASE.replace("port: 0", "port: [1]"))
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={})
    assert str(ei.value).startswith(f"{p}: server.port -> line 3: ")
    p.write_text(BASE)
    cfg = load_config(p, env={})
    assert cfg.path == str(p.resolve())
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "missing.yaml")
    assert "cannot read" in str(ei.value)


def test_shipped_configs_are_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    env: dict[str, Any] = {"GATEWAY_ADMIN_TOKEN": "x" * 24}
    for p in (root / "gateway.yaml", root / "config" / "profiles" / "default.yaml"):
        cfg = load_config(p, env=env)
        assert cfg.admin.token == "x" * 24
        assert [s.name for s in cfg.plugins][:1]


def test_files_and_values_an_operator_gets_wrong(tmp_path, monkeypatch):
    """Each gets one message with its line (or a clean refusal), never a traceback or a hang: bytes
    that are not UTF-8, a YAML alias bomb, a malformed ${...}; merge keys work; a secret that
    reads as a number stays the string it is; errors on fields of several types name the key as
    written."""
    from gateway.config import ConfigError, load_config

    base = "upstream:\n  url: http://127.0.0.1:9\nadmin:\n  token: ${TOK}\n"

    def problem(text: str | bytes) -> str:
        p = tmp_path / "g.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError) as e:
            load_config(p)
        return str(e.value)

    monkeypatch.setenv("TOK", "12345678901234567890")
    p = tmp_path / "ok.yaml"
    p.write_text(base + "plugins:\n  - {name: metrics}\n")
    assert load_config(p).admin.token == "12345678901234567890"
    assert "line 3: not UTF-8" in problem(b"upstream:\n  url: http://127.0.0.1:9\n  x: \xff\xfe\n")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefg", "bcdefgh"))
    assert "expands to more than" in problem(bomb)
    assert "a YAML alias contains itself" in problem(base + "plugins: &x [*x]\n")
    msg = problem(base.replace("${TOK}", "${TOK:fallback-token-0123456789}"))
    assert "admin.token -> line 4: malformed ${...}" in msg and "fallback" not in msg
    merged = (base + "plugins:\n  - name: rate_limit\n    config:\n      <<: {strategy: fixed, storage: 'memory://'}\n"
              "      strategy: moving\n")
    p.write_text(merged)
    rl = load_config(p).plugins[0].config
    assert rl["strategy"] == "moving" and rl["storage"] == "memory://"
    msg = problem(base + "plugins:\n  - name: rate_limit\n    config:\n      rules:\n"
                  "        - {name: r, limit: 1/second, key_by: [nope]}\n")
    assert "plugins[0].config.rules[0].key_by[0] -> line" in msg and "list[" not in msg and "literal[" not in msg
    assert "line 6: invalid YAML" in problem(base + "server:\n  host: 'unterminated\n  port: 1\n")  # where it opened


def test_settings_that_passed_the_check_but_broke_every_request(tmp_path):
    """Refused by the check, with the key and line, without echoing a password: a limit of 0, a
    route method that does not exist, an infinite timeout, credentials in the upstream URL, a redis
    URL whose port is not a number."""
    from gateway.config import ConfigError, load_config

    def problem(extra: str, upstream: str = "http://127.0.0.1:9") -> str:
        p = tmp_path / "g.yaml"
        p.write_text(f"upstream:\n  url: {upstream}\n" + extra)
        with pytest.raises(ConfigError) as e:
            load_config(p)
        return str(e.value)

    rl = "plugins:\n  - name: rate_limit\n    config:\n"
    assert "rules[0].limit -> line" in problem(rl + "      rules: [{name: r, limit: 0/minute}]\n")
    assert "two limits for the same window" in problem(rl + "      rules: [{name: r, limit: '10/minute; 20/minute'}]\n")
    # "5 per 0 seconds" read as 5/second, and a quota of 0 refused every request
    assert "a window of 0" in problem(rl + "      rules: [{name: r, limit: 5 per 0 seconds}]\n")
    assert "a window of 0" in problem(rl + "      rules: [{name: r, limit: '10/second; 1/0 minute'}]\n")
    # a bare number (a YAML int) says what is missing; a count beyond 2^53 - 1 failed every call to
    # Redis under the moving window (the store marked down: no limit at all, or 503s)
    assert 'a limit needs its window: write "60/minute"' in problem(rl + "      rules: [{name: r, limit: 60}]\n")
    assert "a limit over 9007199254740991 is no limit" in problem(
        rl + "      rules: [{name: r, limit: '10/second; 10000000000000000000/day'}]\n")
    assert "quotas.daily_tokens -> line" in problem(rl + "      quotas: {daily_tokens: 0}\n")
    assert "routes[0].methods -> line" in problem("plugins:\n  - name: metrics\nroutes:\n  - path_prefix: /v1\n"
                                                    "    methods: [GTE]\n    plugins: {metrics: {enabled: false}}\n")
    assert "upstream.timeouts.connect -> line" in problem("", "http://127.0.0.1:9\n  timeouts: {connect: .inf}")
    msg = problem("", "http://user:UPSTREAMPW@127.0.0.1:9\n  headers: {Authorization: Bearer x}")
    assert "upstream -> line" in msg and "keep one of them" in msg and "UPSTREAMPW" not in msg
    msg = problem("", "http://127.0.0.1:9\n  headers: {Authorization: Bearer A, authorization: Bearer B}")
    assert "upstream.headers -> line" in msg and "same header" in msg and "Bearer" not in msg
    msg = problem(rl + "      storage: 'redis://:REDISPW@127.0.0.1:notaport/0'\n")
    assert "plugins[0].config.storage -> line" in msg and "REDISPW" not in msg


def test_rate_limit_key_by_global_in_a_list():
    from gateway.plugins.rate_limit.config import RuleConfig

    assert RuleConfig(name="r", limit="1/second", key_by=["global"]).key_by == "global"
    assert RuleConfig(name="r", limit="1/second", key_by="global").key_by == "global"
    with pytest.raises(ValueError, match="cannot be combined"):
        RuleConfig(name="r", limit="1/second", key_by=["global", "ip"])


def test_settings_that_silently_did_nothing_useful_are_refused(tmp_path):
    """A path prefix without its '/' made every request 404; `key_by: []` meant one counter for
    everyone without saying so."""
    def problem(extra: str) -> str:
        p = tmp_path / "g.yaml"
        p.write_text("upstream:\n  url: http://127.0.0.1:9\n" + extra)
        with pytest.raises(ConfigError) as e:
            load_config(p)
        return str(e.value)

    assert "server.paths -> line 4" in problem("server:\n  paths:\n    - v1\n")
    assert "server.paths" in problem("server:\n  paths: []\n")
    assert "key_by -> line" in problem("plugins:\n  - name: rate_limit\n    config:\n"
                                       "      rules: [{name: r, limit: 1/second, key_by: []}]\n")


def test_shipped_configs_take_secrets_exactly_as_written(tmp_path):
    """A token or pepper that starts with '[' or '{' is a string, not a YAML list."""
    root = Path(__file__).resolve().parent.parent
    env = {"GATEWAY_ADMIN_TOKEN": "[0123456789abcdefgh]", "GATEWAY_KEY_PEPPER": "{pepper: x}",
           "UPSTREAM_URL": "http://127.0.0.1:9", "GATEWAY_DATABASE_URL": "sqlite+aiosqlite:///x.db",
           "GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0"}
    for name in ("gateway.yaml", "config/profiles/default.yaml", "config/profiles/scale-out.yaml"):
        cfg = load_config(root / name, env=env)
        assert cfg.admin.token == "[0123456789abcdefgh]"
        ka = next(p for p in cfg.plugins if p.name == "key_auth")
        assert ka.config["pepper"] == "{pepper: x}", name


async def test_a_config_without_an_admin_section_says_what_it_leaves_out(make_gateway, upstream, tmp_path, caplog):
    import yaml

    from .helpers import base_config

    cfg = base_config(upstream.url, tmp_path, [{"name": "key_auth"}, {"name": "metrics"}])
    del cfg["admin"]
    with caplog.at_level("WARNING", logger="gateway"):
        g = await make_gateway(raw=yaml.safe_dump(cfg))
    assert g.admin_url is None
    said = [r.getMessage() for r in caplog.records if "admin listener is off" in r.getMessage()]
    assert said and "key_auth, metrics have no admin API" in said[0], said


def test_sections_whose_settings_are_all_commented_out_take_their_defaults():
    """An ops habit: comment out every route (or every server setting) and leave the key. `plugins:`
    left empty was accepted; `routes:`, `server:` and the others were errors."""
    from gateway.config import load_config_text

    cfg = load_config_text("upstream:\n  url: http://127.0.0.1:9\nserver:\n#  port: 9000\nadmin:\nlogging:\n"
                           "database:\nroutes:\n#  - path_prefix: /v1\nplugins:\n")
    assert (cfg.server.port, cfg.admin.enabled, cfg.routes, cfg.plugins) == (8080, False, [], [])
    assert cfg.database.url == "sqlite+aiosqlite:///gateway.db" and cfg.logging.level == "INFO"


@pytest.mark.parametrize("text, where", [
    ("server: {drain_delay: true}", "server.drain_delay"),
    ("server: {keepalive_timeout: false}", "server.keepalive_timeout"),
    ("server: {port: true}", "server.port"),
    ("plugins: [{name: rate_limit, config: {estimate_default_max_tokens: true}}]",
     "plugins[0].config.estimate_default_max_tokens"),
])
def test_true_or_false_for_a_number_is_an_error(text: str, where: str) -> None:
    """YAML's true/false where a number is wanted is a mistake, not 1 and 0 (`drain_delay: true`
    was a one-second delay)."""
    with pytest.raises(ConfigError) as e:
        load_config_text("upstream: {url: 'http://127.0.0.1:9'}\n" + text)
    assert where in str(e.value) and "expected a number, not" in str(e.value), str(e.value)


def test_drain_delay_has_a_bound() -> None:
    with pytest.raises(ConfigError, match="server.drain_delay"):
        load_config_text("upstream: {url: 'http://127.0.0.1:9'}\nserver: {drain_delay: 1e9}")
    assert load_config_text("upstream: {url: 'http://127.0.0.1:9'}\nserver: {drain_delay: 5}").server.drain_delay == 5


async def test_an_upstream_header_left_empty_is_not_sent(make_gateway: Any, upstream: Any) -> None:
    """``OpenAI-Organization: ${OPENAI_ORG_ID:-}`` with the variable unset: an optional header,
    not sent (it was a config error, "Input should be a valid string")."""
    text = textwrap.dedent("""
        upstream:
          url: http://127.0.0.1:9
          headers:
            Authorization: Bearer upstream-key
            OpenAI-Organization: ${OPENAI_ORG_ID:-}
            X-Blank: ""
    """)
    cfg = load_config_text(text, "h.yaml", env={})
    assert cfg.upstream.headers == {"Authorization": "Bearer upstream-key"}
    assert load_config_text(text, "h.yaml", env={"OPENAI_ORG_ID": "org-1"}).upstream.headers["OpenAI-Organization"] == "org-1"
    import aiohttp

    g = await make_gateway([], upstream={"headers": {"X-Sent": "yes", "X-Optional": "${GW_TEST_UNSET_VAR:-}",
                                                     "X-Blank": ""}})
    async with aiohttp.ClientSession() as s:
        async with s.get(g.url + "/v1/models") as r:
            assert r.status == 200
    sent = {k.lower() for k in upstream.requests[-1]["headers"]}
    assert "x-sent" in sent and "x-optional" not in sent and "x-blank" not in sent


def test_a_plugin_setting_beside_its_name_is_told_to_go_under_config() -> None:
    text = textwrap.dedent("""
        upstream: {url: http://127.0.0.1:9}
        plugins:
          - name: rate_limit
            strategy: fixed
            colour: red
    """)
    with pytest.raises(ConfigError) as e:
        load_config_text(text, "g.yaml")
    msg = str(e.value)
    assert "plugins[0].strategy -> line 5: unknown key (a setting of rate_limit: put it under config:)" in msg, msg
    assert "plugins[0].colour -> line 6: unknown key" in msg and "colour -> line 6: unknown key (" not in msg, msg


def test_a_limit_unit_written_short_is_told_the_units() -> None:
    text = textwrap.dedent("""
        upstream: {url: http://127.0.0.1:9}
        plugins:
          - name: rate_limit
            config: {rules: [{name: r, limit: "120/min", key_by: [ip]}]}
    """)
    with pytest.raises(ConfigError) as e:
        load_config_text(text, "g.yaml")
    assert "the units are second, minute, hour, day, month and year, written in full" in str(e.value), str(e.value)


@pytest.mark.parametrize("text,line", [("upstream:\n  url: http://127.0.0.1:9\nplugins:\n  - name: rate_limit\n"
                                        "    config:\n\tstrategy: fixed\n", 6),
                                       ("upstream:\n\turl: http://127.0.0.1:9\n", 2)])
def test_a_tab_in_the_indentation_is_named(text: str, line: int) -> None:
    with pytest.raises(ConfigError) as e:
        load_config_text(text, "g.yaml")
    assert f"g.yaml: line {line}: invalid YAML: " in str(e.value) and \
        str(e.value).endswith("(a tab: YAML indents with spaces only)"), str(e.value)


def test_every_plugin_listed_twice_is_named_and_a_unions_noise_is_left_out() -> None:
    """One run says every mistake (two plugins listed twice: both), and key_by: [tenant] gets the
    one message about the part, not also the other branch's "Input should be 'global'"."""
    text = textwrap.dedent("""
        upstream: {url: http://127.0.0.1:9}
        plugins:
          - name: rate_limit
            config: {rules: [{name: r, limit: 5/minute, key_by: [tenant]}]}
          - name: key_auth
          - name: key_auth
          - name: audit
          - name: audit
    """)
    with pytest.raises(ConfigError) as e:
        load_config_text(text, "g.yaml")
    msgs = e.value.problems
    assert any(m.startswith("plugins[2].name -> line 7: plugin 'key_auth' is listed twice") for m in msgs), msgs
    assert any(m.startswith("plugins[4].name -> line 9: plugin 'audit' is listed twice") for m in msgs), msgs
    assert any(m.startswith("plugins[0].config.rules[0].key_by[0] -> line 5: Input should be 'key'") for m in msgs)
    assert not any("'global'" in m for m in msgs), msgs


@pytest.mark.parametrize("url", ["http://127.0.0.1:9 ", " http://127.0.0.1:9", "http://127.0.0.1:9/a b",
                                 "http://127.0.0.1:9\t"])
def test_a_blank_in_the_upstream_url_is_named(url: str) -> None:
    """UPSTREAM_URL exported with a blank at its end: "not a valid URL (check the host and port)"
    sent people looking at the host and port."""
    with pytest.raises(ConfigError) as e:
        load_config_text("upstream: {url: '${U}'}\n", "g.yaml", env={"U": url})
    assert "upstream.url -> line 1: the URL holds a blank" in str(e.value), str(e.value)


def test_plugins_that_read_the_identity_before_key_auth_are_warned_of() -> None:
    """rate_limit before key_auth with rules keyed by key counted per address and applied no key's
    own limits, and conversations there stored everything as 'anonymous': both silently."""
    def warned(plugins: str) -> list[str]:
        cfg = load_config_text(f"upstream: {{url: http://127.0.0.1:9}}\nadmin: {{enabled: false}}\nplugins:\n{plugins}")
        return [w for w in cfg.warnings() if "before key_auth" in w]

    got = warned("  - name: rate_limit\n    config: {rules: [{name: per-key, limit: 5/minute}]}\n"
                 "  - name: conversations\n  - name: key_auth\n")
    assert len(got) == 2 and "(per-key)" in got[0] and "'anonymous'" in got[1], got
    # a per-IP limit before key_auth (it counts refused attempts too) is a choice; after it, nothing to say
    assert warned("  - name: rate_limit\n    config: {rules: [{name: ip, limit: 5/minute, key_by: ip}]}\n"
                  "  - name: key_auth\n") == []
    assert warned("  - name: key_auth\n  - name: rate_limit\n    config: {rules: [{name: k, limit: 5/minute}]}\n"
                  "  - name: conversations\n") == []
