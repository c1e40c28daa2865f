"""The audit chain signed with a key held outside the database (``audit.chain_key``).

Someone who can write the table can recompute plain SHA-256 hashes after an edit; with a chain
key they cannot: a rewritten row, a row forged after signed ones, and cutting the trail back to
the rows written before the key are all reported by ``gateway audit verify``."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from gateway.plugins.audit.chain import key_id

from .helpers import ADMIN_TOKEN, base_config, write_config
from .test_audit import CHAT, T, post, rows, wait_for

KEY_A = "chain-key-A-" + "5f" * 20
KEY_B = "chain-key-B-" + "c3" * 20
ENV = "GW_TEST_CHAIN_KEY"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def audit(**config: Any) -> list[dict[str, Any]]:
    return [{"name": "audit", "config": {"flush_interval": 0.05, **config}}]


def stored(db: Path) -> list[tuple[int, str, str, str]]:
    con = sqlite3.connect(db)
    try:
        return list(con.execute("SELECT seq, prev_hash, hash, data FROM audit_events ORDER BY seq"))
    finally:
        con.close()


def verify_cli(cfg: Path, **env: str) -> tuple[int, dict[str, Any], str]:
    res = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "--json", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    return res.returncode, json.loads(res.stdout), res.stderr


def rechain_without_key(db: Path, seq: int, edit: Any) -> None:
    """What someone with write access but no key can do: edit row ``seq`` and recompute the plain
    SHA-256 chain from there on (the indexed columns made to agree with the records)."""
    con = sqlite3.connect(db)
    try:
        data = dict(con.execute("SELECT seq, data FROM audit_events WHERE seq >= ?", (seq,)).fetchall())
        prev = con.execute("SELECT prev_hash FROM audit_events WHERE seq = ?", (seq,)).fetchone()[0]
        for s in sorted(data):
            rec = json.loads(data[s])
            if s == seq:
                edit(rec)
            text = json.dumps(rec, separators=(",", ":"), ensure_ascii=False)
            h = hashlib.sha256((prev + text).encode()).hexdigest()
            con.execute("UPDATE audit_events SET data = ?, prev_hash = ?, hash = ?, status = ? WHERE seq = ?",
                        (text, prev, h, rec.get("status"), s))
            prev = h
        con.commit()
    finally:
        con.close()


async def purge_after(g: Any, db: Path, edit: str) -> str:
    """Run ``edit`` on the trail, then a purge: it must refuse (its message is returned)."""
    from gateway.plugins.audit.store import PurgeRefused

    con = sqlite3.connect(db)
    con.execute(edit)
    con.commit()
    con.close()
    try:
        await g.plugin("audit").purge_once(actor="test")
    except PurgeRefused as e:
        return str(e)
    raise AssertionError("the purge went ahead on rows that do not verify")


async def refused(url: str) -> None:
    """A request key_auth refuses (an auth_failure event)."""
    async with aiohttp.ClientSession(timeout=T) as s:
        assert (await post(s, url, CHAT))[0] == 401


async def traffic(url: str, n: int) -> None:
    async with aiohttp.ClientSession(timeout=T) as s:
        for _ in range(n):
            assert (await post(s, url, CHAT))[0] == 200


async def test_signed_rows_and_a_rewrite_without_the_key(make_gateway: Any, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv(ENV, KEY_A)
    db = tmp_path / "gateway.db"
    g = await make_gateway(audit(chain_key="${" + ENV + "}"))
    await traffic(g.url, 3)
    await wait_for(lambda: len(rows(db)) == 4, what="the key's event and 3 request events")
    await g.stop()
    events = rows(db)
    # The first start with a key records it (by its public id) in a row signed with it.
    assert events[0]["type"] == "audit.chain_key" and events[0]["previous_chain_key_id"] == "none"
    assert events[0]["chain_key_id"] == key_id(KEY_A.encode()) and len(events[0]["chain_key_id"]) == 16
    assert "key_id" not in events[0]  # (the indexed column of the API key a request used)
    for seq, prev, h, data in stored(db):
        assert h == hmac.new(KEY_A.encode(), (prev + data).encode(), "sha256").hexdigest(), seq
        assert h != hashlib.sha256((prev + data).encode()).hexdigest()
        assert KEY_A not in data
    cfg = tmp_path / "gateway.yaml"
    assert KEY_A not in cfg.read_text()  # (the key comes from the environment)

    code, rep, _ = verify_cli(cfg, **{ENV: KEY_A})
    assert code == 0 and rep["ok"] and rep["rows"] == 4 and rep["head_signed"] == "current"
    assert rep["signed_from"] == 1 and "every row signed with the chain key" in rep["message"]

    # An edit re-chained with plain hashes: what an unkeyed chain could not tell from the real thing.
    rechain_without_key(db, 3, lambda rec: rec.update(status=201))
    code, rep, _ = verify_cli(cfg, **{ENV: KEY_A})
    assert code == 1 and rep["broken"]["seq"] == 3 and rep["broken"]["problem"] == "edited"
    assert "rewritten or added by someone without the key" in rep["broken"]["detail"]
    # A wrong key cannot vouch for the rows either.
    code, rep, _ = verify_cli(cfg, **{ENV: KEY_B})
    assert code == 1 and rep["broken"]["seq"] == 1 and "previous_chain_keys" in rep["broken"]["detail"]


async def test_cutting_back_to_the_unsigned_rows_is_detected(make_gateway: Any, tmp_path: Path,
                                                             monkeypatch: Any) -> None:
    db = tmp_path / "gateway.db"
    g = await make_gateway(audit())
    await traffic(g.url, 2)
    await wait_for(lambda: len(rows(db)) == 2, what="2 unsigned events")
    await g.stop()
    monkeypatch.setenv(ENV, KEY_A)
    g = await make_gateway(audit(chain_key="${" + ENV + "}"), name="keyed.yaml")
    await traffic(g.url, 2)
    await wait_for(lambda: len(rows(db)) == 5, what="the key's event and 2 signed request events")
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.admin_url + "/audit/verify", headers=AUTH) as r:
            rep = await r.json()
    await g.stop()
    # The rows from before the key stay valid; signing starts at the key's event.
    assert rep["ok"] and rep["signed_from"] == 3 and rep["head_signed"] == "current", rep
    assert rows(db)[2]["type"] == "audit.chain_key"

    # Deleting every signed row leaves a chain that verifies without the key...
    con = sqlite3.connect(db)
    con.execute("DELETE FROM audit_events WHERE seq >= 3")
    con.commit()
    con.close()
    code, rep, _ = verify_cli(tmp_path / "gateway.yaml")
    assert code == 0 and rep["rows"] == 2
    # ...but not with it: the trail once had signed rows, so its newest row must be signed.
    code, rep, _ = verify_cli(tmp_path / "keyed.yaml", **{ENV: KEY_A})
    assert code == 1 and rep["broken"]["seq"] == 2 and "newest row is not signed" in rep["broken"]["detail"]


async def test_key_rotation_by_reload(make_gateway: Any, tmp_path: Path, monkeypatch: Any) -> None:
    db = tmp_path / "gateway.db"
    monkeypatch.setenv(ENV, KEY_A)
    monkeypatch.setenv(ENV + "_B", KEY_B)
    g = await make_gateway(audit(chain_key="${" + ENV + "}"))
    await traffic(g.url, 2)
    await wait_for(lambda: len(rows(db)) == 3, what="3 events")
    # Rotate: B signs from now on, A still vouches for the older rows.
    write_config(tmp_path / "gateway.yaml", base_config("http://unused", tmp_path, audit(
        chain_key="${" + ENV + "_B}", previous_chain_keys=["${" + ENV + "}"]), upstream=g.gw.cfg.upstream.model_dump(
            mode="json", exclude_none=True)))
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 200, await r.text()
        await traffic(g.url, 2)
        await wait_for(lambda: len(rows(db)) >= 7, what="reload, key and request events")
        async with s.get(g.admin_url + "/audit/verify", headers=AUTH) as r:
            rep = await r.json()
    await g.stop()
    assert rep["ok"] and rep["head_signed"] == "current", rep
    marks = [e for e in rows(db) if e["type"] == "audit.chain_key"]
    assert [m["previous_chain_key_id"] for m in marks] == ["none", key_id(KEY_A.encode())]
    assert marks[1]["chain_key_id"] == key_id(KEY_B.encode())
    signers = []
    for _, prev, h, data in stored(db):
        signers.append(next(k for k, key in (("A", KEY_A), ("B", KEY_B))
                            if hmac.new(key.encode(), (prev + data).encode(), "sha256").hexdigest() == h))
    assert signers == sorted(signers) and signers[0] == "A" and signers[-1] == "B"
    # the rotation is on record, signed with the new key
    assert [e["type"] for e in rows(db)][signers.index("B")] == "audit.chain_key"

    # Without the old key the older rows cannot be vouched for.
    alone = write_config(tmp_path / "b.yaml", base_config("http://127.0.0.1:9", tmp_path, audit(chain_key=KEY_B)))
    code, rep, _ = verify_cli(alone)
    assert code == 1 and rep["broken"]["seq"] == 1
    # Rolled out one instance at a time, a rotation interleaves the keys: any configured key is
    # accepted (an instance still on A after rows signed with B).
    con = sqlite3.connect(db)
    last, prev_h = con.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
    rec = {"seq": last + 1, "time": rows(db)[-1]["time"], "type": "key.revoked", "actor": "cli", "key_id": "k"}
    text = json.dumps(rec, separators=(",", ":"))
    h = hmac.new(KEY_A.encode(), (prev_h + text).encode(), "sha256").hexdigest()
    con.execute("INSERT INTO audit_events (seq, time, type, key_id, data, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
                (last + 1, rec["time"], rec["type"], "k", text, prev_h, h))
    con.commit()
    con.close()
    code, rep, _ = verify_cli(tmp_path / "gateway.yaml", **{ENV: KEY_A, ENV + "_B": KEY_B})
    assert code == 0 and rep["head_signed"] == "previous", rep


async def test_cli_events_and_purges_are_signed(make_gateway: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """Rows the CLI writes (a key created) and a retention purge's events are signed like the rest."""
    monkeypatch.setenv(ENV, KEY_A)
    db = tmp_path / "gateway.db"
    # (retention of under a second: every event is old a moment later)
    g = await make_gateway([{"name": "key_auth"}] + audit(chain_key="${" + ENV + "}", retention_days=1e-5))
    await wait_for(lambda: len(rows(db)) == 1, what="the key's event")
    cfg = tmp_path / "gateway.yaml"
    res = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "keys", "create", "--name", "k",
                                                   "--owner", "o", "-c", str(cfg)],
                                  capture_output=True, text=True, timeout=60, env={**os.environ, ENV: KEY_A})
    assert res.returncode == 0, res.stderr
    assert [e["type"] for e in rows(db)] == ["audit.chain_key", "key.created"]
    await asyncio.sleep(1.0)
    ev = await g.plugin("audit").purge_once(actor="test")
    assert ev is not None and ev["total"] == 2
    await g.stop()
    assert [e["type"] for e in rows(db)] == ["audit.purged"]
    for seq, prev, h, data in stored(db):
        assert h == hmac.new(KEY_A.encode(), (prev + data).encode(), "sha256").hexdigest(), (seq, data)
    code, rep, _ = verify_cli(cfg, **{ENV: KEY_A})
    assert code == 0 and rep["anchor"]["seq"] == 2 and rep["head_signed"] == "current", rep


def test_config_refuses_weak_keys_and_per_route_keys(tmp_path: Path) -> None:
    def check(plugins: Any, **sections: Any) -> subprocess.CompletedProcess[str]:
        cfg = write_config(tmp_path / "c.yaml", base_config("http://127.0.0.1:9", tmp_path, plugins, **sections))
        return subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60)

    short = "too-short-secret-123"
    res = check(audit(chain_key=short))
    assert res.returncode == 2 and "at least 32 bytes" in res.stderr and short not in res.stderr + res.stdout
    res = check(audit(previous_chain_keys=[KEY_A]))
    assert res.returncode == 2 and "previous_chain_keys needs a chain_key" in res.stderr
    res = check(audit(chain_key=KEY_A, previous_chain_keys=[KEY_A]))
    assert res.returncode == 2 and "listed twice" in res.stderr and KEY_A not in res.stderr
    res = check(audit(chain_key=KEY_A), routes=[{"path_prefix": "/v1/models", "plugins": {
        "audit": {"config": {"chain_key": KEY_B}}}}])
    assert res.returncode == 2 and "routes[0].plugins.audit.config.chain_key -> line" in res.stderr
    assert "cannot be set per route" in res.stderr and KEY_B not in res.stderr
    assert check(audit(chain_key=KEY_A, previous_chain_keys=[KEY_B])).returncode == 0


async def test_signed_rows_on_top_of_a_replaced_history_are_caught(make_gateway: Any, tmp_path: Path,
                                                                  monkeypatch: Any) -> None:
    """Someone without the key deletes the trail and writes an unsigned history of their own: the
    gateway's next signed row on top of it does not make it pass (the first signed row must be the
    event that introduced the key)."""
    monkeypatch.setenv(ENV, KEY_A)
    db = tmp_path / "gateway.db"
    g = await make_gateway(audit(chain_key="${" + ENV + "}"))
    await traffic(g.url, 2)
    await wait_for(lambda: len(rows(db)) == 3, what="3 events")
    con = sqlite3.connect(db)
    con.execute("DELETE FROM audit_events")
    prev = "0" * 64
    for seq in (1, 2):
        rec = {"seq": seq, "time": "2026-01-01T00:00:00.000000Z", "type": "key.created", "actor": "forged"}
        text = json.dumps(rec, separators=(",", ":"))
        h = hashlib.sha256((prev + text).encode()).hexdigest()
        con.execute("INSERT INTO audit_events (seq, time, type, data, prev_hash, hash) VALUES (?,?,?,?,?,?)",
                    (seq, rec["time"], rec["type"], text, prev, h))
        prev = h
    con.commit()
    con.close()
    await traffic(g.url, 1)
    await wait_for(lambda: len(rows(db)) == 3, what="the request signed on top")
    await g.stop()
    code, rep, _ = verify_cli(tmp_path / "gateway.yaml", **{ENV: KEY_A})
    assert code == 1 and rep["broken"]["seq"] == 3 and rep["broken"]["problem"] == "inserted", rep
    assert "not the audit.chain_key event" in rep["broken"]["detail"]


async def test_a_purge_does_not_erase_rows_that_do_not_verify(make_gateway: Any, tmp_path: Path,
                                                              monkeypatch: Any) -> None:
    """Back-dating rows (their time column) must not get them purged, with the purge's signed
    event then vouching for the gap."""
    monkeypatch.setenv(ENV, KEY_A)
    db = tmp_path / "gateway.db"
    g = await make_gateway(audit(chain_key="${" + ENV + "}", retention_days=30))
    await traffic(g.url, 3)
    await wait_for(lambda: len(rows(db)) == 4, what="4 events")
    refusal = await purge_after(g, db, "UPDATE audit_events SET time = '2000-01-01T00:00:00.000000Z' WHERE seq <= 3")
    assert "seq 1" in refusal and "time" in refusal
    await g.stop()
    assert len(stored(db)) == 4
    code, rep, _ = verify_cli(tmp_path / "gateway.yaml", **{ENV: KEY_A})
    assert code == 1 and rep["broken"]["seq"] == 1 and "'time'" in rep["broken"]["detail"]


async def test_nothing_without_the_key_writes_on_a_signed_trail(make_gateway: Any, tmp_path: Path,
                                                                monkeypatch: Any) -> None:
    db = tmp_path / "gateway.db"
    # An instance without a key runs on the trail when another one brings the key.
    g = await make_gateway([{"name": "key_auth"}] + audit(retry_for=0.5), name="plain.yaml")
    monkeypatch.setenv(ENV, KEY_A)
    k = await make_gateway([{"name": "key_auth"}] + audit(chain_key="${" + ENV + "}"), name="keyed.yaml")
    await wait_for(lambda: [e["type"] for e in rows(db)] == ["audit.chain_key"], what="the key's event")
    await k.stop()
    keyed = tmp_path / "keyed.yaml"
    env = {**os.environ, ENV: KEY_A}

    def keys(cfg: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "keys", *args, "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60, env={**env, **extra})

    res = await asyncio.to_thread(keys, keyed, "create", "--name", "k", "--owner", "o", "--json")
    assert res.returncode == 0, res.stderr
    assert [e["type"] for e in rows(db)] == ["audit.chain_key", "key.created"]
    api_key = json.loads(res.stdout)["key"]
    # The instance without the key does not append unsigned rows: its events are held, retried,
    # and then counted as dropped, not written.
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT,
                          headers={"Authorization": "Bearer " + api_key}) as r:
            assert r.status == 200

    def dropped() -> float:
        from prometheus_client import generate_latest

        text = generate_latest(g.services.metrics).decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("gateway_writer_dropped_total{") and 'writer="audit:database"' in line)

    await wait_for(lambda: dropped() >= 1, what="the unsigned event counted as dropped")
    await g.stop()
    assert len(rows(db)) == 2
    # Commands that record an action need the key; reading does not.
    plain = tmp_path / "plain.yaml"
    res = await asyncio.to_thread(keys, plain, "create", "--name", "k2", "--owner", "o")
    assert res.returncode != 0 and "audit trail is signed with a chain key" in res.stderr
    listed = await asyncio.to_thread(keys, plain, "list")
    assert listed.returncode == 0 and "k2" not in listed.stdout
    # A gateway started without it is refused, saying why.
    try:
        await make_gateway([{"name": "key_auth"}] + audit(), name="plain2.yaml")
        raise AssertionError("started without the key on a signed trail")
    except RuntimeError as e:
        assert "audit trail is signed with a chain key" in str(e)
    code, rep, _ = verify_cli(keyed, **{ENV: KEY_A})
    assert code == 0 and rep["rows"] == 2, rep


async def test_a_purged_key_event_leaves_the_trail_signed(make_gateway: Any, tmp_path: Path,
                                                          monkeypatch: Any) -> None:
    """Retention deletes the audit.chain_key event like any old row: the signed purge event names
    the key, so the trail is still known as signed (nothing without the key writes to it, verify
    without the key says it cannot check), and unsigned rows after the purge's anchor are caught."""
    monkeypatch.setenv(ENV, KEY_A)
    db = tmp_path / "gateway.db"
    g = await make_gateway(audit(chain_key="${" + ENV + "}", retention_days=1e-5))
    await traffic(g.url, 2)
    await wait_for(lambda: len(rows(db)) == 3, what="3 events")
    await asyncio.sleep(1.0)
    ev = await g.plugin("audit").purge_once(actor="test")
    assert ev["total"] == 3 and ev["anchor"]["signed"] is True, ev  # (unsigned rows may not follow it)
    await g.stop()
    events = rows(db)
    assert [e["type"] for e in events] == ["audit.purged"] and events[0]["chain_key_id"] == key_id(KEY_A.encode())
    plain = write_config(tmp_path / "plain.yaml", base_config("http://127.0.0.1:9", tmp_path,
                                                              [{"name": "key_auth"}] + audit()))
    res = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--name", "k", "--owner", "o", "-c",
                          str(plain)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "audit trail is signed with a chain key" in res.stderr
    res = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "-c", str(plain)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "set audit.chain_key" in res.stderr  # (cannot check: not "broken")
    # Unsigned rows appended while no gateway runs: a gateway that starts with the key does not
    # pass them off as a first key, and verify reports them.
    con = sqlite3.connect(db)
    seq, prev = con.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
    rec = {"seq": seq + 1, "time": "2099-01-01T00:00:00.000000Z", "type": "key.created", "actor": "forged"}
    text = json.dumps(rec, separators=(",", ":"))
    con.execute("INSERT INTO audit_events (seq, time, type, data, prev_hash, hash) VALUES (?,?,?,?,?,?)",
                (seq + 1, rec["time"], rec["type"], text, prev, hashlib.sha256((prev + text).encode()).hexdigest()))
    con.commit()
    con.close()
    g = await make_gateway(audit(chain_key="${" + ENV + "}"), name="again.yaml")
    await traffic(g.url, 1)
    await wait_for(lambda: len(rows(db)) == 3, what="the request on top")
    await g.stop()
    assert [e["type"] for e in rows(db)] == ["audit.purged", "key.created", "request"]  # (no new key event)
    code, rep, _ = verify_cli(tmp_path / "again.yaml", **{ENV: KEY_A})
    assert code == 1 and rep["broken"]["seq"] == seq + 1 and "not signed" in rep["broken"]["detail"], rep


async def test_a_rolling_rotation_records_one_key_event(make_gateway: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """Two instances on one database, one already on key B (A as previous), the other still on A,
    writing in turn: one audit.chain_key event for the rotation, not one per batch."""
    monkeypatch.setenv(ENV, KEY_A)
    monkeypatch.setenv(ENV + "_B", KEY_B)
    db = tmp_path / "gateway.db"
    old = await make_gateway(audit(chain_key="${" + ENV + "}"), name="old.yaml")
    await traffic(old.url, 1)
    new = await make_gateway(audit(chain_key="${" + ENV + "_B}", previous_chain_keys=["${" + ENV + "}"]),
                             name="new.yaml")
    for _ in range(4):
        await traffic(new.url, 1)
        await wait_for(lambda: rows(db)[-1]["type"] == "request", what="the new instance's row")
        await traffic(old.url, 1)
        n = len(rows(db))
        await wait_for(lambda: len(rows(db)) > n or rows(db)[-1]["type"] == "request", what="the old instance's row")
    await wait_for(lambda: sum(e["type"] == "request" for e in rows(db)) == 9, what="9 request events")
    await old.stop()
    await new.stop()
    marks = [e for e in rows(db) if e["type"] == "audit.chain_key"]
    assert [(m["chain_key_id"], m["previous_chain_key_id"]) for m in marks] == [
        (key_id(KEY_A.encode()), "none"), (key_id(KEY_B.encode()), key_id(KEY_A.encode()))], marks
    code, rep, _ = verify_cli(tmp_path / "new.yaml", **{ENV: KEY_A, ENV + "_B": KEY_B})
    assert code == 0, rep


async def test_a_time_column_moved_forward_is_reported_by_the_purge(make_gateway: Any, tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    g = await make_gateway(audit(retention_days=30))
    await traffic(g.url, 3)
    await wait_for(lambda: len(rows(db)) == 3, what="3 events")
    refusal = await purge_after(g, db, "UPDATE audit_events SET time = '2099-01-01T00:00:00.000000Z' WHERE seq = 1")
    assert "time column of seq 1" in refusal


async def test_a_first_key_on_a_trail_with_retention_stays_intact(make_gateway: Any, tmp_path: Path,
                                                                 monkeypatch: Any) -> None:
    """The honest path: rows from before the key, then the key, then retention purges the old
    unsigned rows. The purge's anchor is an unsigned row: unsigned rows may still follow it."""
    db = tmp_path / "gateway.db"
    g = await make_gateway(audit())
    await traffic(g.url, 4)
    await wait_for(lambda: len(rows(db)) == 4, what="4 unsigned events")
    await g.stop()
    con = sqlite3.connect(db)  # the first two made old enough to purge (re-chained: an honest past)
    data = con.execute("SELECT seq, data FROM audit_events ORDER BY seq").fetchall()
    prev = "0" * 64
    for seq, text in data:
        rec = json.loads(text)
        if seq <= 2:
            rec["time"] = "2000-01-01T00:00:00.000000Z"
        text = json.dumps(rec, separators=(",", ":"), ensure_ascii=False)
        h = hashlib.sha256((prev + text).encode()).hexdigest()
        con.execute("UPDATE audit_events SET data = ?, time = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                    (text, rec["time"], prev, h, seq))
        prev = h
    con.commit()
    con.close()
    monkeypatch.setenv(ENV, KEY_A)
    g = await make_gateway(audit(chain_key="${" + ENV + "}", retention_days=30), name="keyed.yaml")
    await traffic(g.url, 1)
    await wait_for(lambda: len(rows(db)) == 6, what="the key's event and a signed request")
    assert (await g.plugin("audit").purge_once(actor="test"))["total"] == 2
    await g.stop()
    code, rep, _ = verify_cli(tmp_path / "keyed.yaml", **{ENV: KEY_A})
    assert code == 0 and rep["anchor"]["seq"] == 2 and rep["signed_from"] == 5, rep


async def test_an_emptied_trail_is_not_signed_again_by_a_command(make_gateway: Any, tmp_path: Path,
                                                                 monkeypatch: Any) -> None:
    """Someone empties the trail (or replaces it) under a running gateway: a CLI command with the
    key does not vouch for what is left with a new first-key event; it refuses, saying a gateway
    signs first."""
    monkeypatch.setenv(ENV, KEY_A)
    db = tmp_path / "gateway.db"
    g = await make_gateway([{"name": "key_auth"}] + audit(chain_key="${" + ENV + "}"))
    await refused(g.url)
    await wait_for(lambda: len(rows(db)) == 2, what="2 events")
    con = sqlite3.connect(db)
    con.execute("DELETE FROM audit_events")
    con.commit()
    con.close()
    res = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "keys", "create", "--name", "k",
                                                   "--owner", "o", "-c", str(tmp_path / "gateway.yaml")],
                                  capture_output=True, text=True, timeout=60, env={**os.environ, ENV: KEY_A})
    assert res.returncode != 0 and "not signed with the chain key yet" in res.stderr
    # the running gateway's next row is signed, but is no first-key event: verify reports the gap
    await refused(g.url)
    await wait_for(lambda: len(rows(db)) == 1, what="the request on the emptied trail")
    await g.stop()
    assert rows(db)[0]["type"] == "auth_failure"
    code, rep, _ = verify_cli(tmp_path / "gateway.yaml", **{ENV: KEY_A})
    assert code == 1, rep


def test_the_key_events_are_found_by_index_on_a_large_trail(tmp_path: Path) -> None:
    """The audit writer looks for the newest key event on every batch: an index probe, also after
    ANALYZE on a trail where nearly every row is a request (an IN (...) ORDER BY seq DESC LIMIT n
    became a scan of the whole table)."""
    import asyncio as aio

    from gateway.db import Database
    from gateway.plugins.audit import store

    db_path = tmp_path / "big.db"
    con = sqlite3.connect(db_path)
    con.execute("CREATE TABLE audit_events (seq INTEGER PRIMARY KEY, time VARCHAR(32) NOT NULL, type VARCHAR(64) "
                "NOT NULL, request_id VARCHAR(128), key_id VARCHAR(128), owner VARCHAR(256), client_ip VARCHAR(64), "
                "status INTEGER, data TEXT NOT NULL, prev_hash VARCHAR(64) NOT NULL, hash VARCHAR(64) NOT NULL)")
    con.execute("CREATE INDEX ix_audit_events_type ON audit_events (type)")
    con.executemany("INSERT INTO audit_events VALUES (?, 't', ?, NULL, NULL, NULL, NULL, NULL, ?, 'p', 'h')",
                    [(i, "request" if i != 5 else "audit.chain_key",
                      '{"chain_key_id":"k1","previous_chain_key_id":"none"}' if i == 5 else "{}")
                     for i in range(1, 50001)])
    con.commit()
    con.execute("ANALYZE")
    con.close()
    statements: list[str] = []

    async def run() -> Any:
        from sqlalchemy import event

        db = Database(f"sqlite+aiosqlite:///{db_path}")
        event.listen(db.engine.sync_engine, "before_cursor_execute",
                     lambda conn, cur, stmt, params, ctx, many: statements.append(stmt))
        try:
            async with db.engine.connect() as conn:
                return await store._key_info(conn)
        finally:
            await db.close()

    assert aio.run(run()) == ("k1", "none")
    con = sqlite3.connect(db_path)
    try:
        for stmt in statements:
            plan = " ".join(str(r[-1]) for r in con.execute("EXPLAIN QUERY PLAN " + stmt,
                                                            ("audit.chain_key",) * stmt.count("?")))
            assert "SCAN audit_events" not in plan, (stmt, plan)
    finally:
        con.close()
