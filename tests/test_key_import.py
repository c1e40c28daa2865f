"""key_auth's imported keys: a team moving from another gateway keeps the keys its clients hold,
imported by their SHA-256 (as such gateways store them) or as tokens (only the hash is kept). They
work with `imported_keys: true`, are revoked and rotated as gateway keys are, and the token itself
is never stored, logged or recorded."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import ADMIN_TOKEN, base_config, write_config

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LEGACY = "sk-1a2b3c4d5e6f7a8b9c0d"   # a key another gateway issued
OTHER = "sk-legacy-f00dfeedbeef42"


async def admin(g: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, g.admin_url + path, json=body, headers=ADMIN) as r:
            return r.status, await r.json()


async def call(g: Any, token: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            return r.status, await r.json()


async def test_imported_keys_work_as_they_are_and_are_never_stored_or_logged(make_gateway: Any, tmp_path: Path,
                                                                            caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    g = await make_gateway([{"name": "key_auth", "config": {"imported_keys": True}},
                            {"name": "rate_limit", "config": {}}, {"name": "audit"}])
    st, a = await admin(g, "POST", "/keys", {"owner": "alice", "name": "old-1", "limits": {"rpm": 2},
                                             "import_sha256": hashlib.sha256(LEGACY.encode()).hexdigest()})
    assert st == 201 and a["imported"] is True and a["key"].startswith("gw_"), a
    st, b = await admin(g, "POST", "/keys", {"owner": "bob", "import_key": OTHER})
    assert st == 201 and b["imported"] is True
    st, plain = await admin(g, "POST", "/keys", {"owner": "carol"})
    assert plain["imported"] is False
    # the tokens work as they are, as their keys (the key's own limits apply: rpm 2)
    assert [(await call(g, LEGACY))[0] for _ in range(3)] == [200, 200, 429]
    assert (await call(g, OTHER))[0] == 200
    assert (await call(g, b["key"]))[0] == 200  # (the record's gateway key works too)
    async with aiohttp.ClientSession() as s:  # the token put in model too (arguments swapped): masked
        async with s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {OTHER}"},
                          json={"model": OTHER, "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200 and OTHER not in await r.text()
    st, body = await call(g, "sk-1a2b3c4d5e6f7a8b9c0e")
    assert st == 401 and body["error"]["code"] == "invalid_api_key" and body["error"]["message"] == "Invalid API key."
    # refused: a second import of one token, a gateway key, both fields, a short or blank-ended token
    for bad, code in (({"import_key": LEGACY}, 409), ({"import_key": plain["key"]}, 422),
                      ({"import_key": OTHER + "x", "import_sha256": "0" * 64}, 422), ({"import_key": "sk-1"}, 422),
                      ({"import_key": " " + OTHER}, 422), ({"import_sha256": "ABC"}, 422)):
        st, e = await admin(g, "POST", "/keys", {"owner": "eve", **bad})
        assert st == code, (bad, e)
        assert LEGACY not in json.dumps(e) and OTHER not in json.dumps(e)
    # revoked: refused at once
    assert (await admin(g, "POST", f"/keys/{b['id']}/revoke"))[0] == 200
    st, body = await call(g, OTHER)
    assert st == 401 and body["error"]["code"] == "revoked_api_key"
    await g.stop()  # (the audit trail flushed)
    # the tokens are nowhere: not in the database file, not in a log line
    data = b"".join(p.read_bytes() for p in tmp_path.glob("gateway.db*"))
    for token in (LEGACY, OTHER):
        assert token.encode() not in data
        assert not [r for r in caplog.records if token in r.getMessage()]
    assert hashlib.sha256(OTHER.encode()).hexdigest().encode() in data  # (what is kept: the hash)


async def test_a_rotated_imported_key_works_for_the_grace_then_not(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "key_auth", "config": {"imported_keys": True}}])
    st, a = await admin(g, "POST", "/keys", {"owner": "alice", "import_key": LEGACY})
    st, b = await admin(g, "POST", "/keys", {"owner": "bob", "import_key": OTHER})
    st, rot = await admin(g, "POST", f"/keys/{a['id']}/rotate", {"grace_seconds": 1.5})
    assert st == 200
    assert (await call(g, LEGACY))[0] == 200 and (await call(g, rot["key"]))[0] == 200
    await asyncio.sleep(1.6)
    assert (await call(g, LEGACY))[0] == 401 and (await call(g, rot["key"]))[0] == 200
    st, _ = await admin(g, "POST", f"/keys/{b['id']}/rotate", {"grace_seconds": 0})
    assert (await call(g, OTHER))[0] == 401


async def test_without_imported_keys_an_imported_token_is_refused_as_malformed(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "key_auth"}])
    st, _ = await admin(g, "POST", "/keys", {"owner": "alice", "import_key": LEGACY})
    assert st == 201
    st, body = await call(g, LEGACY)
    assert st == 401 and body["error"]["message"].startswith("Malformed API key")


def test_cli_imports_a_key_from_stdin_or_by_its_hash(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "gw.yaml", base_config("http://127.0.0.1:9", tmp_path, [
        {"name": "key_auth", "config": {"imported_keys": True}}], admin={"enabled": False}))

    def keys(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "keys", *args, "-c", str(cfg)], input=stdin,
                              capture_output=True, text=True, timeout=60, env={**os.environ})

    r = keys("create", "--owner", "alice", "--import-key-stdin", "--json", stdin=LEGACY + "\n")
    assert r.returncode == 0 and json.loads(r.stdout)["imported"] is True, r.stderr
    assert LEGACY not in r.stdout + r.stderr
    r = keys("create", "--owner", "bob", "--import-sha256", hashlib.sha256(LEGACY.encode()).hexdigest().upper())
    assert r.returncode == 1 and "exists already" in r.stderr
    r = keys("create", "--owner", "bob", "--import-sha256", "xyz")
    assert r.returncode == 2 and "import_sha256" in r.stderr
    cfg2 = write_config(tmp_path / "off.yaml", base_config("http://127.0.0.1:9", tmp_path, [{"name": "key_auth"}],
                                                           admin={"enabled": False}))
    r = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--owner", "carol", "--import-key-stdin",
                        "-c", str(cfg2)], input=OTHER, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "imported_keys is false" in r.stderr


async def test_a_second_rotation_does_not_bring_the_imported_token_back(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "key_auth", "config": {"imported_keys": True}}])
    st, a = await admin(g, "POST", "/keys", {"owner": "alice", "import_key": LEGACY})
    await admin(g, "POST", f"/keys/{a['id']}/rotate", {"grace_seconds": 1.0})
    await asyncio.sleep(1.1)
    assert (await call(g, LEGACY))[0] == 401
    st, rot = await admin(g, "POST", f"/keys/{a['id']}/rotate", {"grace_seconds": 3600})
    assert (await call(g, LEGACY))[0] == 401 and (await call(g, rot["key"]))[0] == 200


async def test_lookups_of_tokens_are_shared_bounded_and_ride_out_a_store_failure(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "key_auth", "config": {"imported_keys": True, "cache_size": 10,
                                                            "cache_ttl": 0.5, "stale_if_error": 30}}])
    st, a = await admin(g, "POST", "/keys", {"owner": "alice", "import_key": LEGACY})
    ka = g.plugin("key_auth")
    looked: list[str] = []
    real = ka.store.imported_id

    async def counted(digest: str) -> Any:
        looked.append(digest)
        await asyncio.sleep(0.05)
        return await real(digest)

    ka.store.imported_id = counted
    # 30 requests at once with one token that is not imported: one lookup
    got = await asyncio.gather(*[call(g, "sk-junk-junk-junk-1") for _ in range(30)])
    assert {st for st, _ in got} == {401}
    assert looked.count(hashlib.sha256(b"sk-junk-junk-junk-1").hexdigest()) == 1
    assert (await call(g, LEGACY))[0] == 200
    # more junk than the cache holds (10): the imported key's lookup stays cached, the junk's are bounded
    for i in range(15):
        await call(g, f"sk-junk-flood-{i:04d}")
    assert hashlib.sha256(LEGACY.encode()).hexdigest() in ka.cache.imports
    assert len(ka.cache.not_imported) <= 10
    # the key store fails: the imported key's cached lookup still decides (stale_if_error)
    async def failing(digest: str) -> Any:
        raise OSError("database down")

    ka.store.imported_id = failing
    await asyncio.sleep(0.6)
    assert (await call(g, LEGACY))[0] == 200
    st, body = await call(g, "sk-never-seen-before-1")
    assert st == 503 and body["error"]["code"] == "key_store_unavailable"


async def test_a_leaked_imported_token_finds_and_revokes_its_key(make_gateway: Any, tmp_path: Path) -> None:
    """A legacy token pasted in public: the CLI and the admin API find its key by the token's hash
    (never echoing it), as they do for a whole gateway key; a token nobody imported is no key."""
    g = await make_gateway([{"name": "key_auth", "config": {"imported_keys": True, "cache_ttl": 0}}])
    st, a = await admin(g, "POST", "/keys", {"owner": "alice", "name": "legacy", "import_key": LEGACY})
    assert (await call(g, LEGACY))[0] == 200
    cfg = tmp_path / "gateway.yaml"
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "keys", "show", LEGACY, "--json",
                                                 "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == a["id"], r.stderr
    assert LEGACY not in r.stdout + r.stderr
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "keys", "show", OTHER, "-c",
                                                 str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a key id" in r.stderr and OTHER not in r.stdout + r.stderr
    st, rec = await admin(g, "POST", f"/keys/{LEGACY}/revoke")
    assert st == 200 and rec["id"] == a["id"] and rec["status"] == "revoked" and LEGACY not in json.dumps(rec)
    assert (await call(g, LEGACY))[0] == 401
    st, e = await admin(g, "GET", f"/keys/{OTHER}")
    assert st == 404 and OTHER not in json.dumps(e)
