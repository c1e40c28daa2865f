"""The command line: `gateway check` exit codes, and `gateway demo` whose printed curl command and
Python snippet are run exactly as printed."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from .helpers import free_port, write_config

ROOT = Path(__file__).resolve().parent.parent


def gateway(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def run_main(*args: str) -> int:
    """The same entry point in-process (fast): returns the exit code."""
    from gateway.cli import main

    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


def test_check_exit_codes(tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.yaml", "admin: {enabled: false}\nupstream: {url: http://127.0.0.1:9}\n"
                                                "plugins:\n  - name: headers\n")
    r = gateway("check", "-c", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{good}: OK (1 plugin(s): headers;")
    bad = write_config(tmp_path / "bad.yaml", "admin: {enabled: false}\nupstream:\n  url: http://127.0.0.1:9\n"
                                              "  timeout: 5\nserver: {port: x}\n")
    r = gateway("check", "-c", str(bad))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert f"{bad}: upstream.timeout -> line 4: unknown key" in lines
    assert any(ln.startswith(f"{bad}: server.port -> line 5: ") for ln in lines)
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("url,warned", [("http://127.0.0.1:11434/v1", "/v1"), ("http://127.0.0.1:11434/v1/", "/v1"),
                                        ("http://h/llm/V1", "/v1"), ("http://h/llm", None), ("http://h:8000", None),
                                        ("http://h/api/v1x", None)])
def test_check_warns_of_an_upstream_url_ending_in_v1(tmp_path: Path, url: str, warned: str | None) -> None:
    """The base URL a backend's docs give (http://host:11434/v1) is valid but doubles the /v1:
    every request would get the backend's bare 404. Said by check (still exit 0)."""
    cfg = write_config(tmp_path / "v1.yaml", f"admin: {{enabled: false}}\nupstream: {{url: '{url}'}}\n")
    r = gateway("check", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    if warned:
        assert f"warning: upstream.url ends in {warned}, and requests keep their path: " \
               f"{warned}/chat/completions is sent to ...{warned}{warned}/chat/completions; drop {warned} " \
               "from upstream.url" in r.stderr, r.stderr
    else:
        assert r.stderr == ""


async def test_the_v1_warning_is_logged_at_start(make_gateway: Any, caplog: Any) -> None:
    with caplog.at_level("WARNING", logger="gateway"):
        await make_gateway([], upstream={"url": "http://127.0.0.1:9/v1"})
    assert "upstream.url ends in /v1" in caplog.text


def test_a_cli_command_that_makes_a_new_database_says_where(tmp_path: Path) -> None:
    """keys create with a relative database.url, run from another directory than the gateway's,
    makes a database of its own there: its path is said (once), so a key unknown to the running
    gateway is no mystery."""
    cfg = write_config(tmp_path / "gw.yaml", "admin: {enabled: false}\nupstream: {url: http://127.0.0.1:9}\n"
                                             "database: {url: 'sqlite+aiosqlite:///rel.db'}\nplugins: [{name: key_auth}]\n")
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    r = gateway("keys", "create", "--owner", "a", "--json", "-c", str(cfg), cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert f"created a new database: {elsewhere / 'rel.db'}" in r.stderr and json.loads(r.stdout)["key"]
    r = gateway("keys", "create", "--owner", "a", "--json", "-c", str(cfg), cwd=elsewhere)
    assert r.returncode == 0 and "created a new database" not in r.stderr, r.stderr


def test_check_config_lookup(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    good = write_config(tmp_path / "good.yaml", "admin: {enabled: false}\nupstream: {url: http://127.0.0.1:9}\n")
    assert run_main("check", "-c", str(tmp_path / "missing.yaml")) == 2
    assert "cannot read" in capsys.readouterr().err
    monkeypatch.setenv("GATEWAY_CONFIG", str(good))
    assert run_main("check") == 0
    monkeypatch.delenv("GATEWAY_CONFIG")
    monkeypatch.chdir(tmp_path)
    assert run_main("check") == 2  # ./gateway.yaml does not exist here
    (tmp_path / "gateway.yaml").write_text(good.read_text())
    assert run_main("check") == 0
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "")
    capsys.readouterr()
    assert run_main("check", "-c", str(ROOT / "gateway.yaml")) == 2
    assert "GATEWAY_ADMIN_TOKEN is not set" in capsys.readouterr().err
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "t" * 32)
    assert run_main("check", "-c", str(ROOT / "gateway.yaml")) == 0


def test_usage(capsys: Any) -> None:
    assert run_main() == 2
    assert "usage:" in capsys.readouterr().err
    assert run_main("--help") == 0
    out = capsys.readouterr().out
    for cmd in ("serve", "check", "db", "demo"):
        assert cmd in out


class Demo:
    """`gateway demo` as a subprocess; collects stdout until the instructions are complete."""

    def __init__(self, tmp_path: Path, config: Path | None = None) -> None:
        self.port, self.admin_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
        env.update(GATEWAY_PORT=str(self.port), GATEWAY_ADMIN_PORT=str(self.admin_port), GATEWAY_HOST="127.0.0.1",
                   GATEWAY_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}", PYTHONUNBUFFERED="1")
        self.log = open(tmp_path / "demo.log", "wb")
        args = ["-c", str(config)] if config is not None else []
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines: list[str] = []
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl-C"):
                self.done.set()
        self.done.set()

    def instructions(self, timeout: float = 45) -> list[str]:
        if not self.done.wait(timeout) or not any(ln.startswith("Press Ctrl-C") for ln in self.lines):
            raise AssertionError("demo did not print its instructions:\n" + "\n".join(self.lines) +
                                 Path(self.log.name).read_text(errors="replace")[-3000:])
        return self.lines

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def curl_command(lines: list[str]) -> str:
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("curl "))
    cmd = []
    for ln in lines[start:]:
        cmd.append(ln)
        if not ln.rstrip().endswith("\\"):
            break
    return "\n".join(cmd)


def python_snippet(lines: list[str]) -> str:
    start = next(i for i, ln in enumerate(lines) if "<<'PY'" in ln)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "PY")
    return "\n".join(lines[start:end + 1])


def with_key_auth(tmp_path: Path) -> Path:
    """The shipped config with key_auth first in the chain (as a deployment would run it)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    names = [p["name"] for p in cfg.get("plugins") or []]
    if "key_auth" not in names:
        cfg["plugins"] = [{"name": "key_auth"}] + (cfg.get("plugins") or [])
    return write_config(tmp_path / "with_key_auth.yaml", (ROOT / "gateway.yaml").read_text().split("plugins:")[0]
                        + yaml.safe_dump({"plugins": cfg["plugins"]}, sort_keys=False))


@pytest.mark.parametrize("variant", ["shipped", "key_auth", "own_token"])
def test_demo_prints_commands_that_work(tmp_path: Path, variant: str) -> None:
    """(own_token: a config that writes its admin token itself: the demo prints that one)"""
    cfg = with_key_auth(tmp_path) if variant != "shipped" else None
    if variant == "own_token":
        assert cfg is not None
        text = cfg.read_text()
        assert "${GATEWAY_ADMIN_TOKEN" in text
        cfg.write_text(re.sub(r"\$\{GATEWAY_ADMIN_TOKEN[^}]*\}", "my-own-admin-token-0123456789", text, count=1))
    demo = Demo(tmp_path, cfg)
    try:
        lines = demo.instructions()
        text = "\n".join(lines)
        assert f"http://127.0.0.1:{demo.port}" in text
        curl = curl_command(lines)
        if variant != "shipped":
            assert "Authorization: Bearer gw_" in curl  # the demo made a key and put it in the command
        assert f"http://127.0.0.1:{demo.port}/v1/chat/completions" in curl
        r = subprocess.run(curl + " -w '\\n%{http_code}'", shell=True, executable="/bin/bash", capture_output=True,
                           text=True, timeout=30)
        body, _, code = r.stdout.rpartition("\n")
        assert code == "200", (curl, r.stdout, r.stderr)
        answer = json.loads(body)
        assert answer["choices"][0]["message"]["content"] == "Hello from the demo backend. You said: Hello!"
        assert answer["usage"]["total_tokens"] > 0
        # The SDK snippet, run with the same interpreter as `python`.
        bindir = tmp_path / "bin"
        bindir.mkdir()
        (bindir / "python").symlink_to(sys.executable)
        snippet = python_snippet(lines)
        r = subprocess.run(snippet, shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
        assert r.returncode == 0, (snippet, r.stderr)
        out = r.stdout.splitlines()
        assert out[0] == "Hello from the demo backend. You said: Hello!"
        assert out[1] == "Hello from the demo backend. You said: Stream please"
        # The admin listener works with the printed token.
        m = re.search(r"admin listener\s*:\s*(http://\S+)\s+\(admin token: (\S+)\)", text)
        assert m, text
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                            f"Authorization: Bearer {m.group(2)}", m.group(1) + "/metrics"],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout == "200"
        # The README tour's variables, from the export line it prints, in the tour's own commands.
        export = next(ln.strip() for ln in lines if ln.strip().startswith("export GW="))
        tour = (export + "\ncurl -s -o /dev/null -w '%{http_code} ' $ADMIN/metrics -H \"Authorization: Bearer $TOKEN\""
                "\ncurl -s -o /dev/null -w '%{http_code}' $GW/v1/chat/completions -H \"Authorization: Bearer $KEY\" "
                "-H 'Content-Type: application/json' "
                "-d '{\"model\": \"demo-chat\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'")
        r = subprocess.run(tour, shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=30)
        assert r.stdout == "200 200", (tour, r.stdout, r.stderr)
    finally:
        rc = demo.stop()
    assert rc == 0, Path(demo.log.name).read_text(errors="replace")[-3000:]


def test_ops_commands_without_a_config_file_use_the_packaged_default(tmp_path):
    """Where `gateway demo` ran (no gateway.yaml in the directory), `gateway audit verify` and
    `gateway keys list` work on the same default database, without the admin token."""
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_CONFIG", "GATEWAY_ADMIN_TOKEN")}
    r = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--owner", "ops", "--json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "gateway.db").exists()
    r = subprocess.run([sys.executable, "-m", "gateway", "keys", "list", "--owner", "ops"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ops" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_version(tmp_path: Path) -> None:
    """`gateway --version` names the release the package metadata has (one version, written once)."""
    from importlib.metadata import version

    import gateway

    r = subprocess.run([sys.executable, "-m", "gateway", "--version"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"gateway {gateway.__version__}" == f"gateway {version('gateway')}"


def test_cli_on_an_unmigrated_database_and_into_a_closed_pipe(tmp_path: Path, pg_url: str, monkeypatch: Any,
                                                              capsys: Any) -> None:
    """On a PostgreSQL database nobody migrated, a command says to run `gateway db upgrade` (not a
    driver error about a missing relation); output into a pipe that stopped reading (`| head`)
    is not an error."""
    from .helpers import base_config

    cfg = write_config(tmp_path / "pg.yaml", base_config("http://127.0.0.1:9", tmp_path, [{"name": "key_auth"}],
                                                         database={"url": pg_url}))
    r = gateway("keys", "list", "-c", str(cfg))
    assert r.returncode == 1 and "gateway db upgrade" in r.stderr and "relation" not in r.stderr, r.stderr
    r = gateway("keys", "create", "--owner", "o", "-c", str(cfg))  # (empty: not "behind")
    assert r.returncode == 1 and "the database has no schema yet: run `gateway db upgrade" in r.stderr, r.stderr
    r = gateway("db", "current", "-c", str(cfg))
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "(no migrations applied)"
    assert r.stdout.splitlines()[1].startswith("pending: audit_0003, ") and "run `gateway db upgrade`" in r.stdout

    class ClosedPipe:
        def write(self, _: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

    lite = write_config(tmp_path / "lite.yaml", base_config("http://127.0.0.1:9", tmp_path, []))
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert run_main("check", "-c", str(lite)) == 0
    assert "error" not in capsys.readouterr().err
