"""The YAML loader at its edges, as ops people edit gateway.yaml: nesting that would crash libyaml,
values YAML cannot build, nested defaults and a literal ``${``, every problem in one run, an empty
file, ``${VAR}`` in a flow mapping, ``x-`` anchor keys."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, load_config, load_config_text

from .helpers import ADMIN_TOKEN
from .test_config import BASE, line_of, one, problems

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
T = aiohttp.ClientTimeout(total=30)


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    """``gateway check -c path``, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "GATEWAY_ADMIN_TOKEN": "x" * 24})


def test_deep_nesting_is_refused_with_its_line() -> None:
    """Past 100 levels the document is refused before it is composed (libyaml's composer recurses in
    C: 25,000 levels killed the process); 100 levels are still read."""
    for deep in ("[" * 150 + "]" * 150, "{a: " * 150 + "1" + "}" * 150):
        text = BASE + "x: " + deep + "\n"
        assert one(text) == f"line {line_of(text, 'x: ')}: the document nests too deeply (more than 100 levels)"
    block = BASE + "".join("  " * i + "a:\n" for i in range(120)) + "  " * 120 + "a: 1\n"
    assert one(block) == "line 108: the document nests too deeply (more than 100 levels)"
    # the top-level mapping is level 1: 99 brackets under it make 100 levels
    cfg = load_config_text(BASE + "x-deep: " + "[" * 99 + "]" * 99 + "\n", env={})
    assert cfg.server.port == 0
    assert "more than 100 levels" in one(BASE + "x-deep: " + "[" * 100 + "]" * 100 + "\n")


def test_check_refuses_a_30000_deep_file_without_crashing(tmp_path: Path) -> None:
    """`gateway check` segfaulted (exit 139) on a 60 KB file nested 30,000 deep; now it is a config
    error (exit 2) with its line."""
    p = tmp_path / "deep.yaml"
    p.write_text("upstream: {url: http://127.0.0.1:9}\nx: " + "[" * 30000 + "]" * 30000 + "\n")
    r = _check(p)
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert r.stderr == f"{p}: line 2: the document nests too deeply (more than 100 levels)\n"


async def test_reload_of_a_30000_deep_file_is_refused_and_the_gateway_keeps_running(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Version": "1"}}}])
    path = Path(g.gw.cfg.path)
    good = path.read_text()
    path.write_text(good + "x: " + "[" * 30000 + "]" * 30000 + "\n")
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 400
            err = (await r.json())["error"]
        assert err["code"] == "config_invalid"
        assert "the document nests too deeply (more than 100 levels)" in err["message"]
        async with s.get(g.url + "/v1/models") as r:
            assert r.status == 200 and r.headers.get("X-Version") == "1"
        path.write_text(good.replace("X-Version: '1'", "X-Version: '2'"))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 200, await r.text()
        async with s.get(g.url + "/v1/models") as r:
            assert r.headers.get("X-Version") == "2"


@pytest.mark.parametrize("value,why", [
    ("!vault sk-SECRET-1", "tag !vault is not supported"),
    ("!env SECRET_NAME", "tag !env is not supported"),
    ("!vault {path: sk-SECRET-1}", "tag !vault is not supported"),
    ("2020-13-45", "it reads as a date or time that does not exist; quote it if it is text"),
    ("!!int sk-SECRET-1", "not a valid !!int"),
    ("!!float sk-SECRET-1", "not a valid !!float"),
    ("9" * 5000, "a number with too many digits"),
], ids=["vault", "env", "vault-map", "timestamp", "int", "float", "5000-digits"])
def test_values_yaml_cannot_build_are_reported_by_key_and_line_without_the_value(value: str, why: str) -> None:
    text = BASE + "  headers:\n    X-T: " + value + "\n"
    p = one(text)
    assert p == f"upstream.headers.X-T -> line {line_of(text, 'X-T')}: not a value YAML can read here ({why})"
    assert "SECRET" not in p and "99999" not in p
    text = BASE.replace("port: 0", f"port: {value}")
    assert one(text).startswith(f"server.port -> line {line_of(text, 'port:')}: not a value YAML can read here")


def test_check_exit_code_for_an_unreadable_value_is_the_config_error_one(tmp_path: Path) -> None:
    p = tmp_path / "g.yaml"
    p.write_text("server: {port: 2020-13-45}\nupstream: {url: http://127.0.0.1:9, headers: {X-T: !!int sk-SECRET-9}}\n")
    r = _check(p)
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert r.stderr.splitlines() == [
        f"{p}: server.port -> line 1: not a value YAML can read here (it reads as a date or time that does not "
        "exist; quote it if it is text)",
        f"{p}: upstream.headers.X-T -> line 2: not a value YAML can read here (not a valid !!int)"]


async def test_reload_of_an_unreadable_value_names_it_and_does_not_repeat_it(make_gateway: Any, caplog: Any) -> None:
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Version": "1"}}}])
    path = Path(g.gw.cfg.path)
    path.write_text(path.read_text().replace("X-Version: '1'", "X-Version: !!int sk-SECRET-7"))
    with caplog.at_level("INFO", logger="gateway"):
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
                assert r.status == 400
                body = await r.text()
    assert "plugins[0].config.response.X-Version -> line" in body
    assert "not a value YAML can read here (not a valid !!int)" in body
    assert "sk-SECRET" not in body and "ValueError" not in body
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "config reload rejected" in logged and "sk-SECRET" not in logged


def test_nested_default_is_refused_and_a_literal_dollar_brace_is_written_twice() -> None:
    text = BASE + '  headers:\n    X-T: "Bearer ${A:-${B}}"\n'
    want = (f"upstream.headers.X-T -> line {line_of(text, 'X-T')}: a default cannot hold another ${{...}} "
            "(${A:-...}): write the default value itself, e.g. ${A:-value}")
    assert one(text, env={}) == want
    assert one(text, env={"A": "aval", "B": "bval"}) == want  # was `aval}` (set) or `${B}` (unset)
    text = BASE + '  headers:\n    X-T: "a$${B}c ${B} pa$$word ${C:-d$f}"\n'
    cfg = load_config_text(text, env={"B": "bval"})
    assert cfg.upstream.headers["X-T"] == "a${B}c bval pa$$word d$f"
    p = one(BASE + '  headers:\n    X-T: "a${b"\n')
    assert "malformed ${...}" in p and "$${ for a literal ${" in p


def test_all_stages_report_their_problems_in_one_run() -> None:
    """An unset variable, a plugin listed twice, an unknown core key and a bad plugin config: one
    run says all four (each used to need a run of its own)."""
    text = BASE.replace("port: 0", "port: ${NOPE_PORT}\n  prot: 1") + (
        "plugins:\n"
        "  - name: rate_limit\n"
        "    config:\n"
        "      rules: [{name: a, limit: 10/mnute}]\n"
        "  - name: rate_limit\n")
    ps = problems(text, env={})
    assert ps[0] == (f"server.port -> line {line_of(text, 'NOPE_PORT')}: environment variable NOPE_PORT is not set "
                     "(use ${NOPE_PORT:-default} to give a default)")
    assert ps[1].startswith(f"plugins[1].name -> line {line_of(text, 'name: rate_limit', 2)}: plugin 'rate_limit' "
                            "is listed twice")
    assert ps[2] == f"server.prot -> line {line_of(text, 'prot')}: unknown key"
    assert ps[3].startswith(f"plugins[0].config.rules[0].limit -> line {line_of(text, 'mnute')}: ")
    assert len(ps) == 4, ps  # no "port: Input should be a valid integer" for the unset variable
    # a section's own check does not repeat what an unset variable caused
    text = BASE.replace("  enabled: false\n", "  token: ${TOK}\n")
    assert one(text, env={}).startswith("admin.token -> line 5: environment variable TOK is not set")


@pytest.mark.parametrize("text", ["", "\n  \n", "# all commented out\n# upstream: x\n", "---\n"])
def test_an_empty_file_says_so(tmp_path: Path, text: str) -> None:
    p = tmp_path / "g.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={})
    assert ei.value.problems == ["the file is empty: it holds no settings"]


def test_unquoted_var_in_a_flow_mapping_gets_a_hint() -> None:
    text = BASE + "  headers: {X-T: ${B}}\n"
    assert one(text, env={"B": "b"}) == (f"line {line_of(text, 'X-T')}: invalid YAML: while parsing a flow mapping: "
                                         "did not find expected ',' or '}' (inside [...] or {...}, quote a ${VAR}: "
                                         '"${VAR}")')
    cfg = load_config_text(BASE + '  headers: {X-T: "${B}"}\n', env={"B": "b"})
    assert cfg.upstream.headers == {"X-T": "b"}
    assert "quote a ${VAR}" not in one(BASE + "  headers: {X-T: a b c\n")


def test_top_level_x_keys_hold_anchors_and_are_ignored() -> None:
    text = ("x-timeouts: &t {connect: 3, idle: 9}\n"
            "x-unused: {anything: !vault here, v: \"${UNSET_VAR}\"}\n"
            + BASE + "  timeouts: *t\n")
    cfg = load_config_text(text, env={})
    assert cfg.upstream.timeouts.connect == 3 and cfg.upstream.timeouts.idle == 9
    text = BASE.replace("  port: 0\n", "  port: 0\n  x-note: 1\n")  # only at the top level
    assert one(text) == f"server.x-note -> line {line_of(text, 'x-note')}: unknown key"


def test_the_existing_limits_still_hold(tmp_path: Path) -> None:
    p = tmp_path / "big.yaml"
    p.write_text(BASE + "# " + "x" * 2**20 + "\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(p, env={})
    bomb = BASE + "x-a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"x-{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefg", "bcdefgh"))
    assert "expands to more than 200000 values" in one(bomb + "server2: *h\n")
    assert "a YAML alias contains itself" in one(BASE + "plugins: &x [*x]\n")
