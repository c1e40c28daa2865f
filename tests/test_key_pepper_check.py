"""The pepper the keys are made with: the gateway records its fingerprint at start, and `gateway
keys create / import / rotate` refuse another. A shell without the pepper's variable made keys
the gateway refused (exit 0), and a rotation that way locked a live key out."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .helpers import start_gateway


async def cli(cfg: Path, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "keys", *args, "-c", str(cfg),
                                             stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE, env={**os.environ})
    out, err = await asyncio.wait_for(p.communicate(stdin), 60)
    return p.returncode or 0, out.decode(), err.decode()


async def chat(g: Any, key: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            return r.status


def with_pepper(src: Path, dst: Path, pepper: str) -> Path:
    cfg = yaml.safe_load(src.read_text())
    cfg["plugins"][0].setdefault("config", {})["pepper"] = pepper
    dst.write_text(yaml.safe_dump(cfg))
    return dst


async def test_keys_are_made_only_with_the_gateways_pepper(make_gateway: Any, tmp_path: Path, caplog: Any) -> None:
    g = await make_gateway([{"name": "key_auth", "config": {"pepper": "first-pepper-0123456789"}}])
    served = tmp_path / "gateway.yaml"
    shell = with_pepper(served, tmp_path / "no-pepper.yaml", "")  # (GATEWAY_KEY_PEPPER not set in this shell)
    rc, out, err = await cli(served, "create", "--owner", "alice", "--json")
    assert rc == 0, err
    good = json.loads(out)
    assert await chat(g, good["key"]) == 200
    for args, stdin in ((("create", "--owner", "bob"), b""), (("import", "-"), b'{"owner": "carol"}\n'),
                        (("rotate", good["id"], "--grace", "0"), b"")):
        rc, out, err = await cli(shell, *args, stdin=stdin)
        assert rc == 2 and "not the one the gateway runs with" in err and "gw_" not in out, (args, err)
    assert await chat(g, good["key"]) == 200  # (not rotated out)
    rc, out, _ = await cli(served, "list", "--json")
    assert [k["owner"] for k in json.loads(out)] == ["alice"]
    # the gateway started again with another pepper (a deliberate change): said, and recorded
    await g.stop()
    changed = with_pepper(served, tmp_path / "changed.yaml", "second-pepper-0123456789")
    with caplog.at_level(logging.WARNING):
        g2 = await start_gateway(changed)
    try:
        assert "key_auth.pepper is not the one the gateway last started with" in caplog.text
        assert await chat(g2, good["key"]) == 401
        rc, out, err = await cli(changed, "create", "--owner", "dan", "--json")
        assert rc == 0, err
        assert await chat(g2, json.loads(out)["key"]) == 200
        rc, _, err = await cli(served, "create", "--owner", "erin")
        assert rc == 2
    finally:
        await g2.stop()
