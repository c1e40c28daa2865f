"""Edges of the command line and the admin APIs: secrets that cannot be printed, exports cut short
or asked for with HEAD, paths and URLs that must not be created or printed, bad page sizes, NUL
characters on PostgreSQL, and the exit codes of ``audit verify``."""
from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .helpers import ADMIN_TOKEN, base_config, write_config

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
T = aiohttp.ClientTimeout(total=20)


def gw(*args: str, stdout: Any = subprocess.PIPE, env: dict[str, str] | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def gw_closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    """``gateway ... | (exec 0<&-; true)``: stdout is a pipe nobody reads any more."""
    r, w = os.pipe()
    os.close(r)
    try:
        return gw(*args, stdout=w)
    finally:
        os.close(w)


def run_main(*args: str) -> int:
    from gateway.cli import main

    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


def events(db_path: Path, type_: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(db_path)
    try:
        rows = [json.loads(d) for (d,) in con.execute("SELECT data FROM audit_events ORDER BY seq")]
    finally:
        con.close()
    return [e for e in rows if e["type"] == type_]


def cli_config(tmp_path: Path, *plugins: dict[str, Any], upstream: str = "http://127.0.0.1:9") -> Path:
    return write_config(tmp_path / "cli.yaml", base_config(upstream, tmp_path, list(plugins),
                                                           admin={"enabled": False}))


# -- 1. a secret that cannot be printed --------------------------------------------------------------
def test_keys_create_and_rotate_fail_when_the_secret_cannot_be_printed(tmp_path: Path) -> None:
    cfg = cli_config(tmp_path, {"name": "key_auth", "config": {"pepper": "edge-pepper"}})
    for extra in ((), ("--json",)):
        r = gw_closed_stdout("keys", "create", "--owner", "x", "-c", str(cfg), *extra)
        assert r.returncode == 1, r.stderr
        assert "could not be printed" in r.stderr and "gateway keys revoke" in r.stderr
        lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("created a new database: ")]
        assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    r = gw("keys", "list", "--json", "-c", str(cfg))
    created = json.loads(r.stdout)
    assert len(created) == 2
    kid = created[0]["id"]
    r = gw_closed_stdout("keys", "rotate", kid, "-c", str(cfg))
    assert r.returncode == 1 and f"key {kid} was rotated" in r.stderr and f"gateway keys revoke {kid}" in r.stderr
    # Output that only lists (no secret) may be cut short: `keys list | head` is not an error.
    r = gw_closed_stdout("keys", "list", "-c", str(cfg))
    assert r.returncode == 0 and "Traceback" not in r.stderr


# -- 2. an export cut short is recorded -------------------------------------------------------------
async def test_cli_export_cut_short_records_a_partial_export(make_gateway: Any, tmp_path: Path) -> None:
    from .test_conversations import chat

    g = await make_gateway([{"name": "conversations"}, {"name": "audit", "config": {"flush_interval": 0.05}}])
    for i in range(3):
        await chat(g, [{"role": "user", "content": f"hello {i}"}])
    await g.plugin("conversations").flush()
    await g.stop()
    cfg = tmp_path / "gateway.yaml"
    r = gw_closed_stdout("conversations", "export", "--owner", "anonymous", "-c", str(cfg))
    assert r.returncode == 0 and "Traceback" not in r.stderr
    (ev,) = events(tmp_path / "gateway.db", "conversation.exported")
    assert ev["actor"] == "cli" and ev["owner"] == "anonymous"
    assert ev["complete"] is False and ev["messages"] == 0
    r = gw("conversations", "export", "--owner", "anonymous", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    n = len(r.stdout.splitlines())
    assert n == 6  # 3 conversations x (user, assistant)
    last = events(tmp_path / "gateway.db", "conversation.exported")[-1]
    assert last["complete"] is True and last["messages"] == n


# -- 3. db current does not create the database -----------------------------------------------------
def test_db_current_on_a_missing_file_is_an_error(tmp_path: Path, capsys: Any) -> None:
    cfg = cli_config(tmp_path)
    db = tmp_path / "gateway.db"
    assert run_main("db", "current", "-c", str(cfg)) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not db.exists()
    db.touch()  # an empty file: a database with no migrations
    assert run_main("db", "current", "-c", str(cfg)) == 0
    assert "(no migrations applied)" in capsys.readouterr().out
    db.unlink()
    assert run_main("db", "upgrade", "-c", str(cfg)) == 0 and db.exists()  # upgrade still creates it
    capsys.readouterr()
    assert run_main("db", "current", "-c", str(cfg)) == 0
    out = capsys.readouterr().out
    assert out.strip() and "(no migrations applied)" not in out


# -- 4. credentials in the upstream query string ----------------------------------------------------
SECRET_URL = ("http://127.0.0.1:9/v1?api-key=S1&key=S2&api%5Fkey=S3&Sig=S4&client_secret=S5&accessKey=S6"
              "&credentials=S7&auth=S8&monkey=plain&keyword=plain2&token=S9"
              "&x-api-key=S10&pass%77ord=S11&%74oken=S12&db_password=S13&subscription-key=S14"
              "&x-goog-api-key=S15&code=S16&private_key=S17&max_tokens=plain3&accessToken=S18&dbpwd=S19"
              "&sessionToken=S20&key_id=plain4")


def test_check_and_listening_log_mask_query_credentials(tmp_path: Path, capsys: Any) -> None:
    from gateway.cli import redact_url

    masked = redact_url(SECRET_URL)
    for i in range(1, 21):
        assert f"S{i}" not in masked, masked
    assert "monkey=plain" in masked and "keyword=plain2" in masked and "api%5Fkey=***" in masked
    assert "max_tokens=plain3" in masked and "key_id=plain4" in masked
    cfg = write_config(tmp_path / "c.yaml", base_config(SECRET_URL, tmp_path, admin={"enabled": False}))
    assert run_main("check", "-c", str(cfg)) == 0
    out = capsys.readouterr().out
    assert "api-key=***" in out and not any(f"S{i}" in out for i in range(1, 21))


async def test_listening_log_line_masks_query_credentials(tmp_path: Path, caplog: Any) -> None:
    from .helpers import start_gateway

    cfg = write_config(tmp_path / "g.yaml", base_config(SECRET_URL, tmp_path))
    with caplog.at_level(logging.INFO, logger="gateway"):
        g = await start_gateway(cfg)
        await g.stop()
    (rec,) = [r for r in caplog.records if r.getMessage() == "gateway listening"]
    up = rec.fields["upstream"]
    assert "api-key=***" in up and not any(f"S{i}" in up for i in range(1, 21))


# -- 5. page sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [("list", "--limit", "0"), ("list", "--limit", "-2"), ("list", "--limit", "1001"),
                                  ("show", "conv_x", "--limit", "-1")])
def test_conversations_page_size_is_1_to_1000(tmp_path: Path, capsys: Any, args: tuple[str, ...]) -> None:
    cfg = cli_config(tmp_path, {"name": "conversations"})
    assert run_main("conversations", *args, "-c", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "--limit" in err and "1..1000" in err


# -- 6. demo with a config that cannot be read ------------------------------------------------------
def test_demo_with_a_missing_config_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    for args, env in ((("-c", missing), {}), ((), {"GATEWAY_CONFIG": missing})):
        try:
            r = gw("demo", *args, env=env, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("gateway demo ran (the packaged default) instead of refusing the missing config")
        assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


# -- 7, 8. NUL characters on PostgreSQL ---------------------------------------------------------------
async def test_postgres_nul_in_export_filters_and_cursor_is_a_400(make_gateway: Any, pg_url: str) -> None:
    from .test_conversations import chat

    g = await make_gateway([{"name": "conversations"}], database={"url": pg_url, "auto_migrate": True})
    seen: list[tuple[str, dict[str, Any]]] = []
    g.services.events.subscribe(lambda t, f: seen.append((t, f)))
    await chat(g, [{"role": "user", "content": "hello"}])
    await g.plugin("conversations").flush()
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.get(g.admin_url + "/conversations/export?owner=%00", headers=ADMIN) as r:
            assert r.status == 400
            body = await r.json()
        assert body["error"]["param"] == "owner" and body["error"]["code"] == "invalid_value"
        async with s.get(g.admin_url + "/conversations?key_id=a%00b", headers=ADMIN) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "key_id"
        async with s.get(g.admin_url + "/conversations/conv%00x/export", headers=ADMIN) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "conversation_not_found"
        async with s.get(g.admin_url + "/conversations/export?owner=anonymous", headers=ADMIN) as r:
            assert r.status == 200 and len((await r.text()).splitlines()) == 2
        cursor = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00Z", "conv\x00x"]).encode()).decode()
        async with s.get(g.url + "/gateway/conversations", params={"cursor": cursor}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "cursor"
    exported = [f for t, f in seen if t == "conversation.exported"]
    assert [f["owner"] for f in exported] == ["anonymous"] and exported[0]["complete"] is True


# -- 9. audit verify: broken (1) vs could not verify (3) ---------------------------------------------
def test_audit_verify_error_exit_code_and_json(tmp_path: Path, capsys: Any) -> None:
    cfg = cli_config(tmp_path, {"name": "audit"})
    assert run_main("audit", "verify", "-c", str(cfg)) == 3
    err = capsys.readouterr().err
    assert "could not verify" in err and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert run_main("audit", "verify", "--json", "-c", str(cfg)) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is None and "does not exist" in out["error"]
    assert not (tmp_path / "gateway.db").exists()
    assert run_main("db", "upgrade", "-c", str(cfg)) == 0
    capsys.readouterr()
    assert run_main("audit", "verify", "--json", "-c", str(cfg)) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


# -- 10, 11. HEAD on exports, Allow on 405 -----------------------------------------------------------
async def test_head_on_exports_is_405_with_allow_and_records_nothing(make_gateway: Any) -> None:
    from .test_conversations import chat

    g = await make_gateway([{"name": "conversations"}])
    seen: list[str] = []
    g.services.events.subscribe(lambda t, f: seen.append(t))
    _, h, _ = await chat(g, [{"role": "user", "content": "hello"}])
    cid = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    async with aiohttp.ClientSession(timeout=T, headers=ADMIN) as s:
        for path in ("/conversations/export?owner=anonymous", f"/conversations/{cid}/export"):
            async with s.head(g.admin_url + path) as r:
                assert r.status == 405, path
                assert "GET" in r.headers.get("Allow", "")
        async with s.put(g.admin_url + "/config/reload") as r:
            assert r.status == 405 and r.headers.get("Allow") == "POST"
            assert (await r.json())["error"]["code"] == "method_not_allowed"
        async with s.get(g.admin_url + f"/conversations/{cid}/export") as r:
            assert r.status == 200
            await r.read()
    assert seen.count("conversation.exported") == 1


# -- 12. small ones ------------------------------------------------------------------------------------
def test_keys_usage_refuses_to_before_from(tmp_path: Path, capsys: Any) -> None:
    cfg = cli_config(tmp_path, {"name": "key_auth", "config": {"pepper": "edge-pepper"}})
    assert run_main("keys", "create", "--owner", "x", "--json", "-c", str(cfg)) == 0
    kid = json.loads(capsys.readouterr().out)["id"]
    assert run_main("keys", "usage", kid, "--from", "2026-12-01", "--to", "2026-01-01", "-c", str(cfg)) == 2
    assert "before" in capsys.readouterr().err
    assert run_main("keys", "usage", kid, "--from", "2026-01-01", "--to", "2026-01-01", "-c", str(cfg)) == 0


@pytest.mark.parametrize("args", [("tail", "-n", "0"), ("query", "--limit", "0"), ("query", "--limit", "-3"),
                                  ("tail", "-f", "--interval", "0"), ("tail", "-f", "--interval", "-1"),
                                  ("tail", "-f", "--interval", "nan")])
def test_audit_counts_and_interval_are_checked(tmp_path: Path, capsys: Any, args: tuple[str, ...]) -> None:
    cfg = cli_config(tmp_path, {"name": "audit"})
    assert run_main("audit", *args, "-c", str(cfg)) == 2
    assert "must be" in capsys.readouterr().err


async def test_empty_patch_is_a_400_and_changes_nothing(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "key_auth"}])
    seen: list[str] = []
    g.services.events.subscribe(lambda t, f: seen.append(t))
    async with aiohttp.ClientSession(timeout=T, headers=ADMIN) as s:
        async with s.post(g.admin_url + "/keys", json={"owner": "x"}) as r:
            rec = await r.json()
        async with s.patch(g.admin_url + f"/keys/{rec['id']}", json={}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "nothing_to_change"
        async with s.get(g.admin_url + f"/keys/{rec['id']}") as r:
            assert (await r.json())["updated_at"] == rec["updated_at"]
        async with s.patch(g.admin_url + f"/keys/{rec['id']}", json={"name": "n"}) as r:
            assert r.status == 200
    assert seen.count("key.updated") == 1


@pytest.mark.parametrize("name", [
    "key", "api_key", "x-api-key", "subscription-key", "subscriptionKey", "x-goog-api-key", "private_key",
    "access_token", "accessToken", "sessionToken", "dbpwd", "client_secret", "pass%77ord", "db_password", "sig",
    "X-Amz-Signature", "code", "AWSAccessKeyId", "pass", "passphrase", "hapikey", "jwt", "client_assertion",
    "code_verifier", "SAMLResponse", "ticket", "JSESSIONID", "api_key[]", "credentials[key]", "api.key", "AccountKey"])
def test_secret_parameter_names(name: str) -> None:
    from gateway.redact import secret_param

    assert secret_param(name)


@pytest.mark.parametrize("name", [
    "monkey", "keyword", "max_tokens", "max_completion_tokens", "model", "key_id", "tokenizer", "pageToken",
    "next_page_token", "token_type", "token_count", "sort_key", "Idempotency-Key", "publicKey", "password_policy"])
def test_names_that_only_look_secret(name: str) -> None:
    from gateway.redact import secret_param

    assert not secret_param(name)


def test_secret_values_wherever_they_are() -> None:
    """A secret nested in another parameter's value, in a fragment, in a connection string, in
    free text, quoted or at the start is masked; a secret value runs to the next '&' or blank (a
    '?', ';' or quote may be part of it) or is a whole quoted string."""
    from gateway.redact import mask_params

    cases = {
        "https://app/login?next=/oauth?access_token=S1": "https://app/login?next=/oauth?access_token=***",
        "https://app/cb#access_token=S2&token_type=bearer": "https://app/cb#access_token=***&token_type=bearer",
        "AccountName=a;AccountKey=S3==": "AccountName=a;AccountKey=***",
        "host=db password='S4 x' dbname=y": "host=db password=*** dbname=y",
        'level=error password="S5" msg=x': "level=error password=*** msg=x",
        "error: 'password=S6'": "error: 'password=***'",
        "password=S7 host=db": "password=*** host=db",
        "?token=S8?more;and'quote&model=m": "?token=***&model=m",
        "?session_id=S9&ASP.NET_SessionId=S10&page_token=p1": "?session_id=***&ASP.NET_SessionId=***&page_token=p1",
        "exit code=3": "exit code=3",
    }
    for text, want in cases.items():
        assert mask_params(text) == want, text


async def test_admin_api_answers_503_for_a_driver_error_raised_while_connecting(make_gateway: Any, monkeypatch: Any,
                                                                               caplog: Any) -> None:
    """SQLAlchemy before 2.1 passes on what asyncpg raises while connecting (a database that no
    longer allows connections, too many clients) without wrapping it: the admin API still says
    the database is unavailable (503, one log line), not 500 with a traceback."""
    import asyncpg

    from gateway.plugins.key_auth.store import KeyStore

    async def refused(*_a: Any, **_k: Any) -> Any:
        raise asyncpg.exceptions.ObjectNotInPrerequisiteStateError('database "gw" is not currently accepting connections')

    g = await make_gateway([{"name": "key_auth"}])
    monkeypatch.setattr(KeyStore, "list", refused)
    async with aiohttp.ClientSession() as s:
        async with s.get(g.admin_url + "/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 503, await r.text()
            assert (await r.json())["error"]["code"] == "database_unavailable"
    assert "admin handler failed" not in caplog.text
