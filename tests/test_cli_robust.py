"""The command line under hostile conditions: out-of-range values, closed and full outputs,
SIGTERM / Ctrl-C during an export, IPv6 listeners in printed URLs, IPv4-mapped trusted proxies."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import ipaddress
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from .helpers import ADMIN_TOKEN, base_config, write_config

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PLUGINS = [{"name": "key_auth"}, {"name": "conversations"}, {"name": "audit"}]


def run_main(*args: str) -> tuple[int, str, str]:
    """gateway.cli.main in this process (subprocess start-up costs seconds): (exit code, stdout, stderr)."""
    from gateway.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def audit_rows(db: Path, type_: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    try:
        return [json.loads(d) for (d,) in con.execute("SELECT data FROM audit_events WHERE type = ? ORDER BY seq", (type_,))]
    finally:
        con.close()


async def _write_conversation(url: str, n: int) -> str:
    """One conversation of ``n`` messages of ~1 KB, written by the real store."""
    from gateway.db import Database
    from gateway.plugins.conversations import digest, new_id
    from gateway.plugins.conversations.store import ConversationStore, TurnRecord, message_row

    d = Database(url)
    try:
        t0 = dt.datetime(2026, 1, 2, 3, 4, 5)
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} " + "x" * 1000} for i in range(n)]
        rows = [message_row(m, digest(m), tokens=1, tokens_derived=True, created_at=t0, model="m", request_id="r",
                            key_id=None, owner="o") for m in msgs]
        cid = new_id()
        await ConversationStore(d).write([TurnRecord(cid, "o", None, True, None, None, 0, rows, {
            "model": "m", "request_id": "r", "key_id": None, "owner": "o", "status": "complete", "http_status": 200,
            "memory": False, "stream": False, "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
            "usage": None, "latency_ms": 1.0, "ttft_ms": None, "created_at": t0}, t0)])
        return cid
    finally:
        await d.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A config with a migrated SQLite database holding a few audit events and one conversation."""
    db = tmp_path / "gateway.db"
    cfg = write_config(tmp_path / "gateway.yaml", base_config("http://127.0.0.1:9", tmp_path, PLUGINS))
    assert run_main("db", "upgrade", "-c", str(cfg))[0] == 0
    for owner in ("alice", "bob", "carol"):
        rc, _, err = run_main("keys", "create", "--owner", owner, "-c", str(cfg))
        assert rc == 0, err
    cid = asyncio.run(_write_conversation(f"sqlite+aiosqlite:///{db}", 300))
    yield {"cfg": str(cfg), "db": db, "cid": cid, "dir": tmp_path}


def closed_pipe() -> Any:
    """A text stream on a pipe whose reader has gone (`| true` after it exited), written through
    at each line like stderr (and stdout under PYTHONUNBUFFERED)."""
    r, w = os.pipe()
    os.close(r)
    return open(w, "w", encoding="utf-8", buffering=1)


# -- 1. out-of-range times --------------------------------------------------------------------------
def test_out_of_range_times_are_value_errors_and_usage_errors(env: dict[str, Any]) -> None:
    from gateway.plugins.conversations.store import parse_time

    for bad in ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+14:00"):
        with pytest.raises(ValueError):
            parse_time(bad)
        rc, out, err = run_main("conversations", "list", "--since", bad, "-c", env["cfg"])
        assert rc == 2 and "ISO 8601" in err and "Overflow" not in err, err
        rc, out, err = run_main("conversations", "list", "--until", bad, "-c", env["cfg"])
        assert rc == 2, err
    assert parse_time("2026-01-02T03:04:05+01:00") == dt.datetime(2026, 1, 2, 2, 4, 5)


async def test_out_of_range_times_on_the_admin_api_are_400s(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "conversations"}])
    async with aiohttp.ClientSession() as s:
        for q in ("since=9999-12-31T23:59:59-05:00", "until=0001-01-01T00:00:00%2B14:00"):
            async with s.get(f"{g.admin_url}/conversations?{q}", headers=ADMIN) as r:
                body = await r.json()
                assert r.status == 400, body
                assert set(body["error"]) == {"message", "type", "code", "param"}


# -- 2. exit codes when the output cannot be written ----------------------------------------------------
def _break_chain(db: Path) -> None:
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE audit_events SET data = replace(data, 'alice', 'mallory') "
                    "WHERE seq = (SELECT MIN(seq) FROM audit_events)")
    con.close()


def test_verify_keeps_its_verdict_when_the_pipe_is_closed(env: dict[str, Any], monkeypatch: Any) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", closed_pipe())
    from gateway.cli import main

    assert main(["audit", "verify", "-c", env["cfg"]]) == 0  # intact, `| grep -q` left: still 0
    _break_chain(env["db"])
    monkeypatch.setattr(sys, "stdout", closed_pipe())
    assert main(["audit", "verify", "-c", env["cfg"]]) == 1  # broken, `| true`: still 1
    monkeypatch.setattr(sys, "stdout", closed_pipe())
    assert main(["audit", "verify", "--json", "-c", env["cfg"]]) == 1
    assert "Traceback" not in err.getvalue()


def test_verify_report_that_cannot_be_written_is_exit_3(env: dict[str, Any], monkeypatch: Any) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    full = open("/dev/full", "w", encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", full)
    from gateway.cli import main

    assert main(["audit", "verify", "--json", "-c", env["cfg"]]) == 3
    assert sys.stdout is not full  # (not written to again after it failed)
    assert "could not verify" in err.getvalue() and "Traceback" not in err.getvalue()
    _break_chain(env["db"])
    monkeypatch.setattr(sys, "stdout", open("/dev/full", "w", encoding="utf-8"))
    assert main(["audit", "verify", "--json", "-c", env["cfg"]]) == 1  # a broken chain stays 1


def test_an_error_keeps_its_exit_code_when_stderr_is_a_closed_pipe(env: dict[str, Any], monkeypatch: Any) -> None:
    """`gateway keys show AAAAAAAAAAAA 2>&1 | true`: 1, not the 0 of a `| head` cut short."""
    pipe = closed_pipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    monkeypatch.setattr(sys, "stderr", pipe)
    from gateway.cli import main

    assert main(["keys", "show", "AAAAAAAAAAAA", "-c", env["cfg"]]) == 1
    assert main(["conversations", "show", "conv_nope", "-c", env["cfg"]]) == 1
    monkeypatch.setattr(sys, "stdout", closed_pipe())
    assert main(["keys", "list", "-c", env["cfg"]]) == 0  # output to a reader that left: still 0


# -- 3. SIGTERM during an export ------------------------------------------------------------------------
def test_sigterm_during_export_is_audited_and_exits_143(env: dict[str, Any]) -> None:
    """The export writes ~300 KB to a pipe nobody reads beyond the first line: it cannot finish
    before the signal arrives."""
    p = subprocess.Popen([sys.executable, "-m", "gateway", "conversations", "export", env["cid"], "-c", env["cfg"]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "GATEWAY_CONFIG": ""})
    try:
        assert p.stdout is not None
        first = p.stdout.readline()
        assert json.loads(first)["position"] == 0
        # (the export is then blocked on the full pipe; a signal at its very first lines lost
        # the audit event twice in CI on a busy machine: see the known limitations)
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    assert b"Traceback" not in err
    (ev,) = audit_rows(env["db"], "conversation.exported")
    assert ev["complete"] is False and ev["actor"] == "cli" and 0 < ev["messages"] < 300


# -- 4. an interrupted export -o leaves the earlier file ---------------------------------------------------
def _signal_after(monkeypatch: Any, obj: Any, name: str, n: int, sig: int) -> None:
    """``obj.name`` (an async generator function) sends ``sig`` to this process after ``n`` items
    (the real signal path: gateway.cli.main's handler)."""
    orig = getattr(obj, name)

    def wrapped(*a: Any, **kw: Any) -> Any:
        async def gen() -> Any:
            i = 0
            async for x in orig(*a, **kw):
                yield x
                i += 1
                if i == n:
                    os.kill(os.getpid(), sig)
        return gen()
    monkeypatch.setattr(obj, name, wrapped)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_interrupted_conversation_export_leaves_the_file(env: dict[str, Any], monkeypatch: Any, sig: int, code: int) -> None:
    from gateway.plugins.conversations.store import ConversationStore

    out = env["dir"] / "conv.jsonl"
    rc, _, err = run_main("conversations", "export", env["cid"], "-o", str(out), "-c", env["cfg"])
    assert rc == 0, err
    complete = out.read_text()
    assert len(complete.splitlines()) == 300
    before = sorted(os.listdir(env["dir"]))
    _signal_after(monkeypatch, ConversationStore, "export", 50, sig)
    rc, _, err = run_main("conversations", "export", env["cid"], "-o", str(out), "-c", env["cfg"])
    assert rc == code
    # (the signal cancels the export at its next wait for the database: at least 50 lines are written)
    m = re.fullmatch(rf"export interrupted after (\d+) records; {re.escape(str(out))} left unchanged\n", err)
    assert m and 50 <= int(m.group(1)) <= 300, err
    assert out.read_text() == complete and sorted(os.listdir(env["dir"])) == before  # no temporary file left
    evs = audit_rows(env["db"], "conversation.exported")
    assert [(e["complete"], e["messages"]) for e in evs] == [(True, 300), (False, int(m.group(1)))]


def test_interrupted_audit_export_leaves_valid_json(env: dict[str, Any], monkeypatch: Any) -> None:
    from gateway.plugins.audit import store

    out = env["dir"] / "audit.json"
    rc, _, err = run_main("audit", "export", "--format", "json", "-o", str(out), "-c", env["cfg"])
    assert rc == 0, err
    complete = out.read_text()
    assert len(json.loads(complete)) >= 3
    before = sorted(os.listdir(env["dir"]))
    _signal_after(monkeypatch, store, "iter_rows", 2, signal.SIGTERM)
    rc, _, err = run_main("audit", "export", "--format", "json", "-o", str(out), "-c", env["cfg"])
    assert rc == 143
    m = re.fullmatch(rf"export interrupted after (\d+) records; {re.escape(str(out))} left unchanged\n", err)
    assert m and int(m.group(1)) >= 2, err
    assert out.read_text() == complete and sorted(os.listdir(env["dir"])) == before
    # a new file is its owner's only (it holds who asked what), whatever the umask; an existing
    # one keeps its mode
    new = env["dir"] / "new.jsonl"
    monkeypatch.undo()
    assert run_main("audit", "export", "-o", str(new), "-c", env["cfg"])[0] == 0
    assert (new.stat().st_mode & 0o777) == 0o600 and len(new.read_text().splitlines()) >= 3
    new.chmod(0o640)
    assert run_main("audit", "export", "-o", str(new), "-c", env["cfg"])[0] == 0
    assert (new.stat().st_mode & 0o777) == 0o640


# -- 5. huge counts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [("audit", "query", "--limit", "99999999999999999999999"),
                                  ("audit", "tail", "-n", "99999999999999999999999"),
                                  ("keys", "list", "--limit", "9223372036854775808"),
                                  ("audit", "query", "--limit", "2147483648")])
def test_huge_counts_are_usage_errors(env: dict[str, Any], args: tuple[str, ...]) -> None:
    rc, _, err = run_main(*args, "-c", env["cfg"])
    assert rc == 2 and "must be 1..2147483647" in err, err


def test_the_largest_count_works(env: dict[str, Any]) -> None:
    rc, out, err = run_main("audit", "query", "--limit", "2147483647", "-c", env["cfg"])
    assert rc == 0 and len(out.splitlines()) >= 3, err


# -- 6. stdout closed ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [("audit", "export"), ("keys", "list"), ("conversations", "list"),
                                  ("keys", "create", "--owner", "dave")])
def test_closed_stdout_is_an_error(env: dict[str, Any], monkeypatch: Any, args: tuple[str, ...]) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "stderr", err)
    from gateway.cli import main

    assert main([*args, "-c", env["cfg"]]) == 1
    assert err.getvalue().strip().endswith("stdout is closed")
    assert len(audit_rows(env["db"], "key.created")) == 3  # (no key made that nobody can see)


# -- 7. small ones ------------------------------------------------------------------------------------
def test_conversation_id_is_escaped_cursor_is_a_usage_error(env: dict[str, Any]) -> None:
    hostile = "conv_\x1b[31mred\nforged"
    for cmd in ("show", "delete", "export"):
        rc, _, err = run_main("conversations", cmd, hostile, "-c", env["cfg"])
        assert rc == 1 and "\x1b" not in err and "\\x1b[31mred\\nforged" in err, err
    rc, _, err = run_main("conversations", "list", "--cursor", "garbage!", "-c", env["cfg"])
    assert rc == 2 and "invalid cursor" in err and "ValueError" not in err


@pytest.mark.parametrize("args", [("-c", "CFG", "check"), ("keys", "-c", "CFG", "list"), ("--config=CFG", "keys", "list"),
                                  ("audit", "-c", "CFG", "verify"), ("db", "-c", "CFG", "current"),
                                  ("conversations", "--config", "CFG", "list"), ("db", "backup", "-c", "CFG", "OUT")])
def test_the_config_option_is_taken_before_the_command_too(env: dict[str, Any], args: tuple[str, ...]) -> None:
    """`-c FILE` works wherever it is put, as the docs say ("on any command"), not only last."""
    out = env["dir"] / "copy.db"
    rc, _, err = run_main(*(a.replace("CFG", env["cfg"]).replace("OUT", str(out)) for a in args))
    assert rc == 0, err
    assert out.exists() == ("backup" in args)


def test_config_options_keep_their_order_wherever_they_are() -> None:
    from gateway.cli import config_last

    assert config_last(["check", "-c", "a.yaml", "-c", "b.yaml"]) == ["check", "-c", "a.yaml", "-c", "b.yaml"]
    assert config_last(["-c", "a.yaml", "keys", "-cb.yaml", "list"]) == ["keys", "list", "-c", "a.yaml", "-cb.yaml"]
    assert config_last(["keys", "create", "--name", "-c", "--owner", "bob"]) == \
        ["keys", "create", "--name", "-c", "--owner", "bob"]  # (no value: argparse says what is wrong)
    assert config_last(["-c", "x", "keys", "list", "--", "-c", "y"]) == ["keys", "list", "-c", "x", "--", "-c", "y"]


def test_usage_errors_exit_2_and_durations_read_as_written(env: dict[str, Any]) -> None:
    rc, out, err = run_main("keys", "usage", "AAAAAAAAAAAA", "--from", "2026-02-02", "--to", "2026-02-01", "-c", env["cfg"])
    assert rc == 2 and "--to (2026-02-01) is before --from (2026-02-02)" in err, err
    rc, out, err = run_main("conversations", "purge", "--older-than", "30d", "-c", env["cfg"])
    assert rc == 0 and out.strip() == "purged 1 conversation(s) with no activity for 30d", out  # (from January)


def test_keys_create_refuses_a_past_expiry(env: dict[str, Any]) -> None:
    for when in ("2020-01-01", "2020-01-01T00:00:00+02:00", "0s"):
        rc, out, err = run_main("keys", "create", "--owner", "dave", "--expires", when, "-c", env["cfg"])
        assert rc == 2 and "in the past" in err and out == "", err
    assert len(audit_rows(env["db"], "key.created")) == 3
    rc, out, err = run_main("keys", "create", "--owner", "dave", "--expires", "30d", "-c", env["cfg"])
    assert rc == 0 and "API key" in out, err


# -- 8. IPv6 hosts in printed URLs ---------------------------------------------------------------------------
def test_url_host() -> None:
    from gateway.cli import url_host

    assert [url_host(h) for h in ("::1", "::", "0.0.0.0", "", "127.0.0.1", "fe80::1%eth0", "localhost")] == [
        "[::1]", "[::1]", "127.0.0.1", "127.0.0.1", "127.0.0.1", "[fe80::1%eth0]", "localhost"]


async def test_ipv6_listener_urls_are_callable(make_gateway: Any, caplog: Any) -> None:
    from gateway.cli import demo_instructions

    caplog.set_level(logging.INFO)
    g = await make_gateway([], server={"host": "::1"}, admin={"host": "::1"})
    port = g.gw.public_port
    (rec,) = [r for r in caplog.records if r.getMessage() == "gateway listening"]
    assert rec.fields["public"] == f"[::1]:{port}" and rec.fields["admin"] == f"[::1]:{g.gw.admin_port}"
    text = demo_instructions(g.gw, {}, "tok")
    assert f"curl -s http://[::1]:{port}/v1/chat/completions" in text
    assert f'base_url="http://[::1]:{port}/v1"' in text
    assert f"http://[::1]:{g.gw.admin_port}" in text
    async with aiohttp.ClientSession() as s:  # the printed URL answers
        async with s.post(f"http://[::1]:{port}/v1/chat/completions",
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200


# -- 9. IPv4-mapped trusted proxies ---------------------------------------------------------------------------
def test_ipv4_mapped_trusted_proxies_match_ipv4_clients() -> None:
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from gateway.config.model import ServerConfig
    from gateway.context import resolve_client_ip

    s = ServerConfig(trusted_proxies=["::ffff:10.0.0.0/104", "::ffff:192.0.2.7", "::1/128", "10.9.0.0/16"])
    assert s.networks == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32"),
                          ipaddress.ip_network("::1/128"), ipaddress.ip_network("10.9.0.0/16")]
    for peer in ("10.1.2.3", "::ffff:10.1.2.3"):
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda k, d=None, p=peer: (p, 4711) if k == "peername" else d
        req = make_mocked_request("GET", "/", headers={"X-Forwarded-For": "203.0.113.9"}, transport=transport)
        assert resolve_client_ip(req, s.networks) == "203.0.113.9"
