"""Request bodies sent with a Content-Encoding: one that stops before its end (a client killed
mid-upload, a proxy timing out) is refused, not forwarded as a shorter body."""
from __future__ import annotations

import json
import zlib
from typing import Any

import aiohttp
import pytest

BODY = json.dumps({"model": "demo-chat", "messages": [{"role": "user", "content": "word " * 2000}]}).encode()


def compressed(coding: str) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31 if coding == "gzip" else 15)
    return c.compress(BODY) + c.flush()


def cut(coding: str) -> bytes:
    """The stream flushed part-way (whole blocks that decode) and never finished."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31 if coding == "gzip" else 15)
    return c.compress(BODY[: len(BODY) // 2]) + c.flush(zlib.Z_SYNC_FLUSH)


async def post(g: Any, data: bytes, coding: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", data=data,
                          headers={"Content-Type": "application/json", "Content-Encoding": coding}) as r:
            return r.status, await r.json(content_type=None)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_body_cut_short_is_refused_as_undecodable(make_gateway: Any, upstream: Any, coding: str) -> None:
    g = await make_gateway([])
    before = len(upstream.requests)
    st, body = await post(g, cut(coding), coding)
    assert st == 400, body
    assert body["error"]["code"] == "bad_request" and "Content-Encoding" in body["error"]["message"]
    assert len(upstream.requests) == before  # nothing forwarded
    st, body = await post(g, compressed(coding), coding)  # the whole stream: decoded and forwarded
    assert st == 200, body
    assert len(upstream.requests) == before + 1


async def test_gzip_of_several_members_is_whole_only_if_its_last_member_is(make_gateway: Any, upstream: Any) -> None:
    """gzip may hold several members (concatenated files): two whole ones are one body; a second
    one cut short is refused like any gzip body that stops part-way."""
    g = await make_gateway([])
    half = len(BODY) // 2
    first, second = gzip_bytes(BODY[:half]), gzip_bytes(BODY[half:])
    st, body = await post(g, first + second, "gzip")
    assert st == 200, body
    assert upstream.requests[-1]["body"] == json.loads(BODY)
    st, body = await post(g, first + second[: len(second) // 2], "gzip")
    assert st == 400 and body["error"]["code"] == "bad_request", body


def gzip_bytes(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


async def test_the_rest_of_a_compressed_body_refused_as_too_large_is_not_decoded(
        make_gateway: Any, monkeypatch: Any) -> None:
    """A compressed body that decodes past server.max_body_size gets its 413; what it still sends is
    then discarded without being decoded: a few MB of gzip decode to GBs, on the event loop, where
    it would stall every other request (and anyone may send it: the body is read before key_auth)."""
    from aiohttp import compression_utils
    inflated = [0]
    real = compression_utils.ZLibDecompressor.decompress_sync

    def counting(self: Any, data: bytes, max_length: int = 0) -> bytes:
        out = real(self, data, max_length)
        inflated[0] += len(out)
        return out

    monkeypatch.setattr(compression_utils.ZLibDecompressor, "decompress_sync", counting)
    g = await make_gateway([], server={"max_body_size": 2**20})
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = c.compress(b" " * (64 * 2**20)) + c.flush()  # 64 KiB of gzip, 64 MiB decoded
    gz = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/embeddings", data=member * 8, headers=gz) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
        # the gateway still answers, and the connection it refused was not read to its end
        async with s.post(g.url + "/v1/chat/completions", data=compressed("gzip"), headers=gz) as r:
            assert r.status == 200
        assert inflated[0] < 16 * 2**20, inflated[0]  # of the 512 MiB the refused body decodes to
        # the admin listener: refused for its missing token before the body is read
        async with s.post(g.admin_url + "/keys", data=member * 8, headers=gz) as r:
            assert r.status == 401
            assert r.headers.get("Connection", "").lower() == "close"  # (its next request: a new connection)
        async with s.get(g.url + "/v1/models") as r:
            assert r.status == 200
    assert inflated[0] < 32 * 2**20, inflated[0]


async def test_the_admin_api_refuses_bodies_its_content_encoding_does_not_fit(make_gateway: Any, tmp_path: Any,
                                                                            caplog: Any) -> None:
    """The admin listener answers like the public one: a body that is not what its Content-Encoding
    says is a 400, an unknown coding a 415 (not read as plain JSON), both in the one error shape and
    without a traceback in the log; a key sent in real gzip is created."""
    import sqlite3

    from .helpers import ADMIN_TOKEN
    g = await make_gateway([{"name": "key_auth"}])
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    plain = json.dumps({"owner": "alice", "name": "n"}).encode()
    async with aiohttp.ClientSession() as s:
        for coding, data, status, code in (("gzip", plain, 400, "bad_request"),
                                           ("deflate", plain, 400, "bad_request"),
                                           ("bogus", plain, 415, "unsupported_content_encoding"),
                                           ("gzip, gzip", plain, 415, "unsupported_content_encoding")):
            async with s.post(g.admin_url + "/keys", data=data, headers={**auth, "Content-Encoding": coding}) as r:
                body = await r.json(content_type=None)
                assert (r.status, body["error"]["code"]) == (status, code), (coding, body)
        async with s.post(g.admin_url + "/keys", data=data, headers={"Content-Encoding": "bogus"}) as r:
            assert r.status == 401  # (the token is checked first)
        async with s.post(g.admin_url + "/keys", data=compressed_json({"owner": "bob"}),
                          headers={**auth, "Content-Encoding": "gzip"}) as r:
            assert r.status == 201, await r.text()
    await g.stop()
    con = sqlite3.connect(tmp_path / "gateway.db")
    try:
        assert [o for (o,) in con.execute("SELECT owner FROM api_keys")] == ["bob"]
    finally:
        con.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")]


def compressed_json(obj: Any) -> bytes:
    import gzip

    return gzip.compress(json.dumps(obj).encode())
