"""``gateway keys import FILE``: many keys from a CSV or JSON Lines file, checked row by row by the
admin API's rules, created all together or not at all, their secrets printed once; a file imported
again with --skip-existing creates only what is missing."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import ADMIN_TOKEN
from .test_conversations import db  # noqa: F401  (the fixture: SQLite and PostgreSQL)

LEGACY = "sk-legacy-0123456789abcdef"  # a key another gateway issued


async def keys(cfg: Path, *args: str, stdin: bytes = b"", stdout: Any = asyncio.subprocess.PIPE) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "keys", *args, "-c", str(cfg),
                                             stdin=asyncio.subprocess.PIPE, stdout=stdout,
                                             stderr=asyncio.subprocess.PIPE, env={**os.environ})
    out, err = await asyncio.wait_for(p.communicate(stdin), 60)
    return p.returncode or 0, (out or b"").decode(), err.decode()


async def count(g: Any) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(g.admin_url + "/keys?limit=1000", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 200
            return len((await r.json())["data"])


async def chat(g: Any, token: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            return r.status


CSV = ("\ufeffOwner,name,Team,rpm,expires,scope-models,metadata.Cost-Center,import_key\r\n"
       "alice,ci,ml,2,90d,demo-chat gpt-*,cc-1,\r\n"
       f'bob,,ml,,never,,"x, ""y""",{LEGACY}\r\n'
       "\r\n"
       "carol,batch,,,2030-01-01,,,\r\n")


async def test_a_csv_is_imported_once_and_its_keys_work_at_once(make_gateway: Any, tmp_path: Path) -> None:
    g = await make_gateway([{"name": "key_auth", "config": {"imported_keys": True, "cache_ttl": 0}},
                            {"name": "rate_limit", "config": {}}, {"name": "audit"}])
    cfg = tmp_path / "gateway.yaml"
    (tmp_path / "keys.csv").write_text(CSV, encoding="utf-8")
    rc, out, err = await keys(cfg, "import", str(tmp_path / "keys.csv"), "--json")
    assert rc == 0, err
    made = [json.loads(line) for line in out.splitlines()]
    assert [(m["line"], m["owner"], m["name"], m["imported"]) for m in made] == [
        (2, "alice", "ci", False), (3, "bob", "", True), (5, "carol", "batch", False)]
    assert "3 created" in err and LEGACY not in out + err
    by_owner = {m["owner"]: m for m in made}
    # every column landed where `keys create` would have put it
    rc, out, _ = await keys(cfg, "show", by_owner["alice"]["id"], "--json")
    alice = json.loads(out)
    assert alice["team"] == "ml" and alice["limits"]["rpm"] == 2 and alice["metadata"] == {"Cost-Center": "cc-1"}
    assert alice["scopes"]["models"] == ["demo-chat", "gpt-*"] and alice["expires_at"] is not None
    rc, out, _ = await keys(cfg, "show", by_owner["bob"]["id"], "--json")
    assert json.loads(out)["metadata"] == {"Cost-Center": 'x, "y"'} and json.loads(out)["expires_at"] is None
    rc, out, _ = await keys(cfg, "show", by_owner["carol"]["id"], "--json")
    assert json.loads(out)["expires_at"].startswith("2030-01-01T00:00:00")
    # the running gateway takes them at once: the printed keys, the imported token, the key's own rpm
    assert [await chat(g, by_owner["alice"]["key"]) for _ in range(3)] == [200, 200, 429]
    assert await chat(g, LEGACY) == 200 and await chat(g, by_owner["carol"]["key"]) == 200
    # imported again: refused as a whole, naming the line; with --skip-existing: nothing new
    rc, out, err = await keys(cfg, "import", str(tmp_path / "keys.csv"))
    assert rc == 1 and "line 3: a key with this import hash exists already" in err and "nothing was created" in err
    assert out == "" and await count(g) == 3
    rc, out, err = await keys(cfg, "import", str(tmp_path / "keys.csv"), "--skip-existing", "--json")
    assert rc == 0 and "0 created, 3 skipped" in err, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == [m["id"] for m in made]
    assert await count(g) == 3
    # a file with one new row more: only that one is made
    (tmp_path / "more.csv").write_text(CSV + "dan,new,,,,,,\n", encoding="utf-8")
    rc, out, err = await keys(cfg, "import", str(tmp_path / "more.csv"), "--skip-existing")
    assert rc == 0 and "1 created, 3 skipped" in err and out.count("gw_") == 1, (out, err)
    assert await count(g) == 4
    await g.stop()
    # each key made is in the audit trail, by the CLI, without its secret
    rc, out, err = await keys(cfg, "list", "--json")
    assert rc == 0
    data = b"".join(p.read_bytes() for p in tmp_path.glob("gateway.db*"))
    assert LEGACY.encode() not in data and by_owner["alice"]["key"].encode() not in data
    assert data.count(b"key.created") >= 4


async def test_a_file_with_any_bad_row_creates_nothing_and_names_every_problem(make_gateway: Any,
                                                                                tmp_path: Path) -> None:
    g = await make_gateway([{"name": "key_auth", "config": {"imported_keys": True}}])
    cfg = tmp_path / "gateway.yaml"
    jsonl = "\n".join([
        json.dumps({"owner": "ok-1"}),
        json.dumps({"owner": "bad-limit", "limits": {"rpm": 0}}),
        f"not json {LEGACY}",
        json.dumps({"owner": "dup-1", "import_key": LEGACY}),
        json.dumps({"owner": "dup-2", "import_key": LEGACY}),
        json.dumps({"owner": "typo", "nmae": "x"}),
        json.dumps({"owner": "past", "expires_at": "2020-01-01T00:00:00Z"}),
        json.dumps({"owner": "ok-2", "import_sha256": hashlib.sha256(b"another").hexdigest()}),
    ])
    (tmp_path / "keys.jsonl").write_text(jsonl + "\n")
    rc, out, err = await keys(cfg, "import", str(tmp_path / "keys.jsonl"))
    assert rc == 2 and out == ""
    lines = err.splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == ["line 2", "line 3", "line 5", "line 6", "line 7"], err
    assert "imports the same key as line 4" in lines[2] and "nmae: unknown field" in lines[3]
    assert LEGACY not in err
    # a CSV whose header has a column nobody knows: refused before any row is read
    (tmp_path / "k.csv").write_text("owner,nmae\nalice,x\n")
    rc, _, err = await keys(cfg, "import", str(tmp_path / "k.csv"))
    assert rc == 2 and "unknown column(s) 'nmae'" in err
    rc, _, err = await keys(cfg, "import", "-", "--format", "csv", stdin=b"owner,rpm\nalice,lots\n\xff\n")
    assert rc == 2 and "not UTF-8" in err
    # a dry run says what it would do and writes nothing
    rc, out, err = await keys(cfg, "import", "-", "--dry-run", stdin=b'{"owner": "x"}\n{"owner": "y", "name": "n"}\n')
    assert rc == 0 and "would create" in out and "gw_" not in out and "2 would be created" in err, (out, err)
    assert await count(g) == 0


async def test_keys_that_cannot_be_printed_are_not_created(make_gateway: Any, tmp_path: Path) -> None:
    g = await make_gateway([{"name": "key_auth"}])
    cfg = tmp_path / "gateway.yaml"
    r, w = os.pipe()
    os.close(r)  # (a reader that is gone: the secrets would be lost)
    try:
        rc, _, err = await keys(cfg, "import", "-", stdin=b'{"owner": "a"}\n{"owner": "b"}\n', stdout=w)
    finally:
        os.close(w)
    assert rc == 1 and "none was created" in err, err
    assert await count(g) == 0


async def test_all_or_none_on_postgresql(make_gateway: Any, tmp_path: Path, pg_url: str) -> None:
    g = await make_gateway([{"name": "key_auth", "config": {"imported_keys": True}}],
                           database={"url": pg_url, "auto_migrate": True})
    cfg = tmp_path / "gateway.yaml"
    rows = [{"owner": f"user{i}", "name": f"svc-{i}", "team": f"team{i % 7}", "limits": {"tpm": 1000 + i}}
            for i in range(300)]
    rows[150]["import_sha256"] = hashlib.sha256(LEGACY.encode()).hexdigest()
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    # the imported key exists already (made by another admin): the file is refused whole
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", json={"owner": "zed", "import_key": LEGACY},
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 201
    rc, out, err = await keys(cfg, "import", "-", stdin=body)
    assert rc == 1 and "line 151: a key with this import hash exists already" in err and out == "", err
    assert await count(g) == 1
    rc, out, err = await keys(cfg, "import", "-", "--skip-existing", "--json", stdin=body)
    assert rc == 0 and "299 created, 1 skipped" in err, err
    made = [json.loads(line) for line in out.splitlines()]
    assert len(made) == 300 and made[150]["skipped"] is True and await count(g) == 300
    assert await chat(g, made[0]["key"]) == 200 and await chat(g, made[299]["key"]) == 200
    rc, out, err = await keys(cfg, "import", "-", "--skip-existing", stdin=body)
    assert rc == 0 and "0 created, 300 skipped" in err and "gw_" not in out


async def test_a_slow_reader_holds_no_lock_and_imports_at_once_make_each_key_once(make_gateway: Any, tmp_path: Path,
                                                                                  db: dict[str, Any]) -> None:
    g = await make_gateway([{"name": "key_auth"}], database=db)
    cfg = tmp_path / "gateway.yaml"
    st, leaked = await admin(g, "POST", "/keys", {"owner": "mallory"})
    body = "".join(json.dumps({"owner": f"user{i}", "name": f"svc-{i}"}) + "\n" for i in range(2000)).encode()
    # the keys go to a reader that does not read yet (`| less`): more than a pipe holds
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "keys", "import", "-", "--json", "-c",
                                             str(cfg), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(body)
    await p.stdin.drain()
    p.stdin.close()
    async with asyncio.timeout(60):
        assert b'"line": 1' in await p.stdout.readline()  # (printing began; the rest waits for the reader)
    await asyncio.sleep(1.0)
    # meanwhile a leaked key is revoked at once (SQLite's write lock was held until the reader was done)
    async with asyncio.timeout(10):
        st, rec = await admin(g, "POST", f"/keys/{leaked['id']}/revoke")
    assert st == 200 and rec["status"] == "revoked", rec
    out, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode == 0 and len(out.splitlines()) == 1999, err
    # two imports of one file at once, with --skip-existing: each key made once
    body = "".join(json.dumps({"owner": f"team{i % 10}", "name": f"bot-{i}"}) + "\n" for i in range(1500)).encode()
    (a, out_a, err_a), (b, out_b, err_b) = await asyncio.gather(
        keys(cfg, "import", "-", "--skip-existing", "--json", stdin=body),
        keys(cfg, "import", "-", "--skip-existing", "--json", stdin=body))
    assert sorted([a, b]) in ([0, 0], [0, 1]), (err_a, err_b)
    for rc, err in ((a, err_a), (b, err_b)):
        assert rc == 0 or "none of the keys printed above was created" in err, err
    rc, out, err = await keys(cfg, "list", "--json", "--limit", "10000")
    bots = [k for k in json.loads(out) if k["name"].startswith("bot-")]
    assert len(bots) == 1500 and len({(k["owner"], k["name"]) for k in bots}) == 1500
    # a third run finds them all
    rc, out, err = await keys(cfg, "import", "-", "--skip-existing", stdin=body)
    assert rc == 0 and "0 created, 1500 skipped" in err, err


async def admin(g: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, g.admin_url + path, json=body,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            return r.status, await r.json()


def test_spreadsheet_csv_forms() -> None:
    """Semicolon-separated files (spreadsheets in some locales), trailing columns with no header,
    lists written with commas, and a quoted line break numbered from the record's first line."""
    from gateway.plugins.key_auth.bulk import read_csv
    from gateway.plugins.key_auth.cli import parse_when

    rows, problems = read_csv('owner;name;scope_models;;\r\nann;x;"gpt-4o, llama-*";;\r\n', parse_when)
    assert problems == [] and rows == [(2, {"owner": "ann", "name": "x", "scopes": {"models": ["gpt-4o", "llama-*"]}})]
    rows, problems = read_csv('owner,metadata.note,,\nbob,"two\nlines",,\ncarl,x,,oops\ndan,[1],,\n', parse_when)
    assert [n for n, _ in rows] == [2, 5] and rows[0][1]["metadata"] == {"note": "two\nlines"}
    assert problems == ["line 4: a value in a column with no header"]


def test_jsonl_and_cells_are_read_as_the_admin_api_reads_them() -> None:
    """Line separators inside JSON strings are not line ends; NaN and Infinity are refused by line;
    a value in the wrong column is not repeated (a key may have landed there); deep nesting is a
    problem of its line, not a crash."""
    from gateway.plugins.key_auth.bulk import read_csv, read_jsonl
    from gateway.plugins.key_auth.cli import parse_when

    rows, problems = read_jsonl('{"owner": "a", "metadata": {"n": "x\u2028y\u0085z"}}\r\n{"owner": "b"}\n'
                                '{"owner": "c", "metadata": {"x": NaN}}\n' + "[" * 100000 + "\n")
    assert [n for n, _ in rows] == [1, 2] and rows[0][1]["metadata"]["n"] == "x\u2028y\u0085z"
    assert problems == ["line 3: not JSON (one object per line)", "line 4: not JSON (one object per line)"]
    rows, problems = read_csv("owner,expires,rpm,metadata\nalice,sk-SECRET-123456,sk-SECRET-123456,\n"
                              'bob,,,"{""x"": Infinity}"\n', parse_when)
    assert rows == [] and "SECRET" not in " ".join(problems), problems
    assert problems[0].startswith("line 2: expires: not a time") and problems[1].startswith("line 3: metadata")


async def test_an_import_larger_than_the_audit_queue_records_every_key(tmp_path: Path) -> None:
    """The audit trail's queue holds 10,000 events: an import of more lost the rest of its
    key.created events and exited 1, though every key was made."""
    import sqlite3

    from .helpers import base_config, write_config

    cfg = write_config(tmp_path / "gw.yaml", base_config("http://127.0.0.1:9", tmp_path, [
        {"name": "key_auth"}, {"name": "audit"}], admin={"enabled": False}))
    body = "owner,name\n" + "".join(f"u{i},n{i}\n" for i in range(10_300))
    rc, out, err = await keys(cfg, "import", "-", "--format", "csv", stdin=body.encode())
    assert rc == 0 and "10300 created" in err, err[-500:]
    with sqlite3.connect(tmp_path / "gateway.db") as c:
        assert c.execute("SELECT count(*) FROM audit_events WHERE type = 'key.created'").fetchone()[0] == 10_300


async def test_every_key_of_an_owner_or_a_team_is_revoked_at_once(make_gateway: Any, tmp_path: Path) -> None:
    """Offboarding: `keys revoke --owner X` (or --team) revokes every key of theirs in one statement,
    each recorded; a running gateway refuses them within watch_interval; a name that matches no
    key is an error (a typo must not look like an offboarding done)."""
    g = await make_gateway([{"name": "key_auth", "config": {"watch_interval": 0.2}}, {"name": "audit"}])
    cfg = tmp_path / "gateway.yaml"
    rc, out, err = await keys(cfg, "import", "-", "--format", "csv", "--json",
                              stdin=b"owner,name,team\nalice,a1,red\nalice,a2,blue\nbob,b1,red\ncarol,c1,\n")
    made = {m["name"]: m for m in map(json.loads, out.splitlines())}
    assert all([await chat(g, m["key"]) == 200 for m in made.values()])
    rc, out, err = await keys(cfg, "revoke", "--owner", "alic")
    assert rc == 1 and "no key of owner 'alic' to revoke" in err
    rc, out, err = await keys(cfg, "revoke", "--team", "red", "--dry-run", "--json")
    assert rc == 0 and {k["name"] for k in json.loads(out)} == {"a1", "b1"} and "would be revoked" in err
    assert await chat(g, made["b1"]["key"]) == 200  # (a dry run revokes nothing)
    rc, out, err = await keys(cfg, "revoke", "--owner", "alice", "--json")
    assert rc == 0 and {k["name"] for k in json.loads(out)} == {"a1", "a2"} and "2 key(s)" in err
    await asyncio.sleep(1.0)
    assert [await chat(g, made[n]["key"]) for n in ("a1", "a2", "b1", "c1")] == [401, 401, 200, 200]
    rc, out, err = await keys(cfg, "revoke", "--team", "red", "--owner", "bob")
    assert rc == 0 and "1 key(s)" in err
    rc, _, err = await keys(cfg, "revoke", made["c1"]["id"], "--owner", "carol")
    assert rc == 2
    await g.stop()
    rc, out, err = await keys(cfg, "list", "--json")
    assert sorted(k["status"] for k in json.loads(out)) == ["active", "revoked", "revoked", "revoked"]
    from .test_audit import acli
    r = await acli(cfg, "query", "--type", "key.revoked", "--owner", "alice")
    assert len(r.stdout.splitlines()) == 2


async def test_the_admin_api_revokes_every_key_of_an_owner_or_a_team(make_gateway: Any, tmp_path: Path) -> None:
    """POST /keys/revoke: the CLI's offboarding on the admin API. The keys are refused by this
    instance at once (not after watch_interval), each is recorded with the admin as actor, a dry run
    revokes nothing, and a name that matches no key is a 404, not a success."""
    g = await make_gateway([{"name": "key_auth", "config": {"watch_interval": 0, "cache_ttl": 60}}, {"name": "audit"}])
    cfg = tmp_path / "gateway.yaml"
    rc, out, err = await keys(cfg, "import", "-", "--format", "csv", "--json",
                              stdin=b"owner,name,team\nalice,a1,red\nalice,a2,blue\nbob,b1,red\ncarol,c1,\n")
    made = {m["name"]: m for m in map(json.loads, out.splitlines())}
    assert all([await chat(g, m["key"]) == 200 for m in made.values()])  # (cached for 60 s, no watch)
    hdr = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def revoke(body: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys/revoke", headers=hdr,
                              **({"data": body} if isinstance(body, str) else {"json": body})) as r:
                return r.status, await r.json()

    st, b = await revoke({"owner": "alic"})
    assert st == 404 and b["error"]["code"] == "key_not_found" and "owner 'alic'" in b["error"]["message"]
    for bad, param in (({}, None), ({"owner": ""}, "owner"), ({"owner": "alice", "dry_run": "yes"}, "dry_run"),
                       ({"owner": "alice", "id": "x"}, "id")):
        st, b = await revoke(bad)
        assert st == 422 and b["error"]["param"] == param, (bad, b)
    st, b = await revoke("[")
    assert st == 400 and b["error"]["code"] == "invalid_json"
    st, b = await revoke({"team": "red", "dry_run": True})
    assert st == 200 and b["dry_run"] is True and b["revoked"] == 0
    assert sorted(k["name"] for k in b["data"]) == ["a1", "b1"] and {k["status"] for k in b["data"]} == {"active"}
    assert await chat(g, made["b1"]["key"]) == 200
    st, b = await revoke({"owner": "alice"})
    assert st == 200 and b["revoked"] == 2 and {k["status"] for k in b["data"]} == {"revoked"}
    assert all("key" not in k and "secret_hash" not in k for k in b["data"])
    # refused here at once: the cache entries were dropped (cache_ttl 60 s, no watch)
    assert [await chat(g, made[n]["key"]) for n in ("a1", "a2", "b1", "c1")] == [401, 401, 200, 200]
    st, b = await revoke({"owner": "alice"})
    assert st == 404  # (none left)
    st, b = await revoke({"owner": "bob", "team": "red"})
    assert st == 200 and [k["name"] for k in b["data"]] == ["b1"]
    assert await chat(g, made["b1"]["key"]) == 401
    await g.stop()
    from .test_audit import acli
    r = await acli(cfg, "query", "--type", "key.revoked")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(e["owner"] for e in events) == ["alice", "alice", "bob"]
    assert {e["actor"] for e in events} == {"admin"} and {e["team"] for e in events} == {"red", "blue"}


async def test_a_bulk_revoke_the_database_cannot_store_is_refused_here_at_once(make_gateway: Any, tmp_path: Path) -> None:
    """POST /keys/revoke while the database refuses the write (another process holds SQLite's write
    lock): as for one key, the keys found are refused by this instance at once and the answer says
    the revocation was not stored (they all kept working, with a generic 503)."""
    import sqlite3

    path = tmp_path / "gateway.db"
    g = await make_gateway([{"name": "key_auth", "config": {"watch_interval": 0, "cache_ttl": 60}}],
                           database={"url": f"sqlite+aiosqlite:///{path}", "busy_timeout_ms": 300})
    rc, out, err = await keys(tmp_path / "gateway.yaml", "import", "-", "--format", "csv", "--json",
                              stdin=b"owner,name\nalice,a1\nalice,a2\nbob,b1\n")
    made = {m["name"]: m for m in map(json.loads, out.splitlines())}
    assert [await chat(g, made[n]["key"]) for n in ("a1", "a2", "b1")] == [200, 200, 200]
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys/revoke", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                              json={"owner": "alice"}) as r:
                st, b = r.status, await r.json()
        assert st == 503 and b["error"]["code"] == "revocation_not_stored" and "2 key(s)" in b["error"]["message"]
        assert [await chat(g, made[n]["key"]) for n in ("a1", "a2", "b1")] == [401, 401, 200]
    finally:
        lock.execute("ROLLBACK")
        lock.close()
