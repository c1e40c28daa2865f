"""The command line in ops scripts: a change whose audit record could not be written is not a
success, a list cut at --limit says so, --meta on update, a locked database's message, output in
an ASCII locale, ages for `conversations list`, and an -o into a missing folder."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from .helpers import base_config, write_config
from .test_cli_admin_edges import events, gw


def setup(tmp_path: Path, **database: Any) -> tuple[Path, Path]:
    path = tmp_path / "ops.db"
    cfg = write_config(tmp_path / "ops.yaml", base_config(
        "http://127.0.0.1:9", tmp_path,
        [{"name": "key_auth"}, {"name": "conversations"}, {"name": "audit", "config": {"sinks": ["database"]}}],
        admin={"enabled": False}, database={"url": f"sqlite+aiosqlite:///{path}", **database}))
    return cfg, path


def create(cfg: Path, owner: str, *args: str) -> str:
    r = gw("keys", "create", "--owner", owner, "--json", *args, "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["id"]


def test_a_change_whose_audit_record_is_refused_exits_1(tmp_path: Path) -> None:
    cfg, path = setup(tmp_path)
    kid = create(cfg, "alice")
    con = sqlite3.connect(path)
    con.execute("CREATE TRIGGER no_audit BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'refused'); END")
    con.commit()
    r = gw("keys", "revoke", kid, "--json", "-c", str(cfg))
    assert r.returncode == 1
    assert json.loads(r.stdout)["status"] == "revoked"  # the change was made, and is shown
    assert "records of this command were not written (1 by audit:database" in r.stderr
    con.execute("DROP TRIGGER no_audit")
    con.commit()
    con.close()
    assert [e["key_id"] for e in events(path, "key.created")] == [kid] and events(path, "key.revoked") == []
    r = gw("keys", "show", kid, "--json", "-c", str(cfg))  # (and a command that records nothing is not affected)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "revoked"


def test_keys_list_says_when_more_match_than_its_limit(tmp_path: Path) -> None:
    cfg, _ = setup(tmp_path)
    ids = [create(cfg, f"owner{i}") for i in range(3)]
    r = gw("keys", "list", "--limit", "2", "--json", "-c", str(cfg))
    assert r.returncode == 0 and [k["id"] for k in json.loads(r.stdout)] == ids[:2]
    assert "more keys match than --limit 2: the next ones with --offset 2" in r.stderr
    r = gw("keys", "list", "--limit", "2", "--offset", "2", "--json", "-c", str(cfg))
    assert r.returncode == 0 and [k["id"] for k in json.loads(r.stdout)] == ids[2:] and r.stderr == ""
    r = gw("keys", "list", "--limit", "3", "--json", "-c", str(cfg))
    assert len(json.loads(r.stdout)) == 3 and r.stderr == ""


def test_keys_update_meta_replaces_and_clears(tmp_path: Path) -> None:
    cfg, _ = setup(tmp_path)
    kid = create(cfg, "alice", "--meta", "env=prod", "--meta", "cost_center=42")
    r = gw("keys", "update", kid, "--meta", "ticket=OPS-1", "--json", "-c", str(cfg))
    assert r.returncode == 0 and json.loads(r.stdout)["metadata"] == {"ticket": "OPS-1"}
    r = gw("keys", "update", kid, "--meta", "", "--json", "-c", str(cfg))
    assert r.returncode == 0 and json.loads(r.stdout)["metadata"] == {}
    r = gw("keys", "update", kid, "-c", str(cfg))
    assert r.returncode == 2 and "nothing to change" in r.stderr
    assert "replaces all of the key's metadata" in " ".join(gw("keys", "update", "--help").stdout.split())


def test_a_locked_database_says_what_to_do(tmp_path: Path) -> None:
    cfg, path = setup(tmp_path, busy_timeout_ms=200)
    create(cfg, "alice")
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        r = gw("keys", "create", "--owner", "bob", "-c", str(cfg))
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert r.returncode == 1 and r.stdout == ""
    assert "database is locked" in r.stderr and "database.busy_timeout_ms" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_output_in_an_ascii_locale_is_utf8(tmp_path: Path) -> None:
    cfg, _ = setup(tmp_path)
    create(cfg, "zoë", "--name", "café")
    r = gw("keys", "list", "-c", str(cfg), env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and "zoë" in r.stdout and "café" in r.stdout, r.stderr
    # an encoding asked for is kept; what it cannot hold is escaped, never a failure after the change
    latin = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    for args in (("create", "--owner", "日本-é"), ("list",)):
        r = subprocess.run([sys.executable, "-m", "gateway", "keys", *args, "-c", str(cfg)], capture_output=True,
                           env=latin, timeout=60)
        assert r.returncode == 0, r.stderr
    assert "\\u65e5\\u672c-é" in r.stdout.decode("latin-1")


def test_conversations_list_takes_ages_and_an_output_folder_missing_is_named(tmp_path: Path) -> None:
    cfg, _ = setup(tmp_path)
    create(cfg, "alice")
    r = gw("conversations", "list", "--since", "24h", "--until", "1s", "--json", "-c", str(cfg))
    assert r.returncode == 0 and json.loads(r.stdout)["data"] == [], r.stderr
    r = gw("conversations", "list", "--since", "yesterday", "-c", str(cfg))
    assert r.returncode == 2 and "ages like 24h" in r.stderr
    target = tmp_path / "missing" / "out.jsonl"
    r = gw("audit", "export", "-o", str(target), "-c", str(cfg))
    assert r.returncode == 1 and f"cannot write {target}" in r.stderr and ".tmp" not in r.stderr
