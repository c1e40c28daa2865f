"""rate_limit's counter store at its edges, against real redis-server processes and real gateways:
a strategy change on a shared Redis, foreign data under one counter, a reload that changes
``storage_timeout``, percent-encoded passwords (plain Redis and Sentinel), passwords kept out of
labels and config errors, token charges dropped while the store is down, and one probe (one
warning) after the back-off instead of one per waiting request."""
from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.config import ConfigError, load_config_text

from .helpers import ADMIN_TOKEN, base_config, clear_of_a_minute_boundary, write_config
from .test_rate_limit import _metric, chat_body, post, rl, sentinel

CHAT = "/v1/chat/completions"
T = aiohttp.ClientTimeout(total=15)


def redis_cmd(port: int, *args: str) -> Any:
    """One command over a raw socket (RESP): the reply's first line, decoded."""
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(out)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace")


def redis_keys(port: int, pattern: str) -> list[str]:
    reply = redis_cmd(port, "KEYS", pattern)
    return [line for line in reply.split("\r\n")[1:] if line and not line.startswith("$")]


async def metric(g: Any, name: str, kind: str) -> float:
    """One kind of gateway_ratelimit_store_errors_total (all storages)."""
    async with aiohttp.ClientSession() as s:
        async with s.get(g.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and f'kind="{kind}"' in line)


class Lines(logging.Handler):
    """The gateway.rate_limit log lines of the test (attached to that logger itself: the gateway
    may reset the root logger's handlers)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.logger = logging.getLogger("gateway.rate_limit")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "Lines":
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self)


async def reload_with(g: Any, tmp_path: Path, upstream: Any, plugins: list[dict[str, Any]], **sections: Any) -> None:
    write_config(Path(g.gw.cfg.path), base_config(upstream.url, tmp_path, plugins, **sections))
    ok, detail = await g.gw.reload(actor="test")
    assert ok, detail


# -- 1. strategies keep keys of their own -----------------------------------------------------------
async def test_instances_on_different_strategies_share_a_redis_without_wrongtype(make_gateway, redis_server,
                                                                                 upstream, tmp_path):
    """A fleet rolling out fixed -> moving: both run on one Redis at once. Each strategy counts on
    keys of its own (no WRONGTYPE turning the store "down" for everyone); the instance that
    switches by a reload then shares the moving-window counter of the other."""
    redis = redis_server()
    rules = [{"name": "r", "limit": "2/minute", "key_by": ["ip"]}]
    a = await make_gateway([rl(storage=redis.url, strategy="fixed", on_store_error="deny", rules=rules)],
                           name="a.yaml")
    async with aiohttp.ClientSession() as s:
        assert [(await post(s, a.url))[0] for _ in range(3)] == [200, 200, 429]
        # another instance, on the moving window, warming up and counting on the same Redis
        b = await make_gateway([rl(storage=redis.url, strategy="moving", on_store_error="deny", rules=rules)],
                               name="b.yaml")
        res = [(await post(s, b.url)) for _ in range(3)]
        assert [r[0] for r in res] == [200, 200, 429], res[-1][1]
        # a reload of the first to the moving window: counted afresh, on the moving window's counter
        await reload_with(a, tmp_path, upstream, [rl(storage=redis.url, strategy="moving",
                                                     on_store_error="deny", rules=rules)])
        st, body, _ = await post(s, a.url)
        assert st == 429 and body["error"]["code"] == "rate_limit_exceeded"
        # and back to the fixed window: its own counter again (still full this minute)
        await reload_with(a, tmp_path, upstream, [rl(storage=redis.url, strategy="fixed",
                                                     on_store_error="deny", rules=rules)])
        st, body, _ = await post(s, a.url)
        assert st == 429 and body["error"]["code"] == "rate_limit_exceeded"
    for g in (a, b):
        assert await _metric(g, "gateway_ratelimit_store_errors_total") == 0


async def test_foreign_data_under_one_counter_fails_that_caller_only(make_gateway, redis_server):
    """A counter key holding another type (foreign data, an old deployment): its caller gets
    on_store_error, everyone else's counters go on working (the store is not marked down)."""
    redis = redis_server()
    g = await make_gateway([rl(storage=redis.url, strategy="fixed", on_store_error="deny", storage_retry=30,
                               rules=[{"name": "per-ip", "limit": "5/minute", "key_by": ["ip"]}])],
                           server={"trusted_proxies": ["127.0.0.1/32"]})
    one, two = {"X-Forwarded-For": "198.51.100.1"}, {"X-Forwarded-For": "198.51.100.2"}
    async with aiohttp.ClientSession() as s:
        assert (await post(s, g.url, headers=one))[0] == 200
        keys = redis_keys(redis.port, "*198.51.100.1*")
        assert len(keys) == 1, keys
        redis_cmd(redis.port, "DEL", keys[0])
        assert redis_cmd(redis.port, "HSET", keys[0], "foreign", "data").startswith(":1")
        with Lines() as lines:
            res = [(await post(s, g.url, headers=h))[:2] for h in (one, two, one, two, two)]
    assert [st for st, _ in res] == [503, 200, 503, 200, 200], res
    assert res[0][1]["error"]["code"] == "rate_limit_unavailable"
    assert await metric(g, "gateway_ratelimit_store_errors_total", "key_error") == 2
    assert await metric(g, "gateway_ratelimit_store_errors_total", "error") == 0
    assert g.plugin("rate_limit").store.health.down_until == 0
    assert len([x for x in lines.lines if "foreign data" in x]) == 1, lines.lines  # throttled


class SlowRelay:
    """A TCP relay to a Redis whose connections, while ``slow``, start 0.7 s late (a busy host, a
    slow network): the kernel accepts them, the first answer comes late."""

    def __init__(self, port: int) -> None:
        self.port, self.slow, self.server = port, True, None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()

    async def _relay(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.slow:
            await asyncio.sleep(0.7)
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))


async def test_a_slow_first_connection_at_start_is_waited_for(make_gateway, redis_server):
    """The check at start is not held to the request deadline (0.25 s): a store whose first
    connection answers late (0.7 s, a busy machine or a slow network) is used once it answers,
    instead of being marked down and every request refused for ``storage_retry``."""
    redis = redis_server()
    async with SlowRelay(redis.port) as url:
        g = await make_gateway([rl(storage=url, on_store_error="deny", storage_retry=30,
                                   rules=[{"name": "r", "limit": "5/minute", "key_by": ["ip"]}])])
        async with aiohttp.ClientSession() as s:
            st, body, h = await post(s, g.url)
        assert st == 200, body
        assert h["x-ratelimit-remaining-requests"] == "4"
        assert await _metric(g, "gateway_ratelimit_store_errors_total") == 0
        await g.stop()


async def test_a_new_sliding_window_on_redis_resets_a_window_from_now(make_gateway, redis_server):
    """A caller's first request in a new sliding window on Redis: its reset is a window from now,
    not "now" (the library reads a window that began in the same millisecond as resetting at once,
    and a client scheduling on it is refused for an hour)."""
    redis = redis_server()
    # (a generous store timeout: the test is about resets, and 100 calls in a row on a busy machine
    # must not fail on the default one)
    g = await make_gateway([rl(storage=redis.url, storage_timeout=2, rules=[
        {"name": "hourly", "limit": "1/hour", "key_by": ["model"]},
        {"name": "five", "limit": "5/hour", "key_by": ["model"]}])])
    async with aiohttp.ClientSession() as s:
        for i in range(30):
            st, _, h = await post(s, g.url, chat_body(model=f"fresh-{i}"))
            assert st == 200
            assert int(h["X-RateLimit-Reset"]) >= 3599 and h["x-ratelimit-reset-requests"].startswith(("59m", "1h")), h
            cur = {p.split(";")[0]: p for p in h["RateLimit"].split(", ")}
            assert cur['"five"'].startswith('"five";r=4;t=') and int(cur['"five"'].rsplit("=", 1)[1]) >= 3599, cur
    # A window well under way after a busy one (150,000 of 200,000 tokens in the previous minute):
    # a unit frees every 0.4 ms, and the reset says so, not a whole window.
    store = g.plugin("rate_limit").store
    from gateway.plugins.rate_limit.rules import compile_rules
    from gateway.plugins.rate_limit.config import RuleConfig

    lim, = compile_rules([RuleConfig(name="tok", limit="200000/minute", counts="tokens", key_by=["ip"])])
    ids = ("tok", "ip:198.51.100.7")
    assert await store.hit(lim.item, ids, 150000)
    key, = [k for k in redis_keys(redis.port, "*198.51.100.7*") if not k.endswith("/-1")]
    redis_cmd(redis.port, "PEXPIRE", key, "60100")  # that window ends in 0.1 s: the next begins
    await asyncio.sleep(0.5)
    for _ in range(100):
        assert await store.hit(lim.item, ids, 1)
        reset, remaining = await store.stats(lim.item, ids)
        assert reset - time.time() < 1.0 and remaining < 200000, (reset - time.time(), remaining)


# -- 2. a reload's storage_timeout reaches the Redis client ---------------------------------------
async def test_reload_to_a_longer_storage_timeout_applies_to_the_redis_client(make_gateway, redis_server,
                                                                              upstream, tmp_path):
    redis = redis_server()
    await clear_of_a_minute_boundary()  # (two requests' exact count, a few seconds apart)
    rules = [{"name": "r", "limit": "5/minute", "key_by": ["ip"]}]
    g = await make_gateway([rl(storage=redis.url, storage_timeout=0.25, on_store_error="deny", rules=rules)])
    async with aiohttp.ClientSession() as s:
        assert (await post(s, g.url))[0] == 200
        await reload_with(g, tmp_path, upstream, [rl(storage=redis.url, storage_timeout=2.0,
                                                     on_store_error="deny", rules=rules)])
        redis.pause()  # a 0.7 s freeze: within the new timeout
        asyncio.get_running_loop().call_later(0.7, redis.resume)
        try:
            t0 = time.monotonic()
            st, body, h = await post(s, g.url)
            took = time.monotonic() - t0
        finally:
            redis.resume()
    assert st == 200, body
    assert h["x-ratelimit-remaining-requests"] == "3"  # counted: the second request of five
    assert took < 2.0 + 1.5
    assert await _metric(g, "gateway_ratelimit_store_errors_total") == 0


async def test_a_storage_timeout_change_keeps_in_memory_counters(make_gateway, upstream, tmp_path):
    rules = [{"name": "r", "limit": "3/minute", "key_by": ["ip"]}]
    g = await make_gateway([rl(storage_timeout=0.25, rules=rules)])
    async with aiohttp.ClientSession() as s:
        assert [(await post(s, g.url))[0] for _ in range(2)] == [200, 200]
        await reload_with(g, tmp_path, upstream, [rl(storage_timeout=2.0, rules=rules)])
        assert [(await post(s, g.url))[0] for _ in range(2)] == [200, 429]


# -- 3. percent-encoded user names and passwords --------------------------------------------------
USER, PASSWORD = "al@ice", "p@ss:w/rd%#x"
ENCODED = "al%40ice:p%40ss%3Aw%2Frd%25%23x"


async def test_percent_encoded_user_and_password_authenticate(make_gateway, redis_server):
    redis = redis_server()
    assert redis_cmd(redis.port, "ACL", "SETUSER", USER, "on", ">" + PASSWORD, "~*", "&*", "+@all").startswith("+OK")
    assert redis_cmd(redis.port, "ACL", "SETUSER", "default", "off").startswith("+OK")
    url = f"redis://{ENCODED}@127.0.0.1:{redis.port}/4"
    g = await make_gateway([rl(storage=url, on_store_error="deny",
                               rules=[{"name": "r", "limit": "2/minute", "key_by": ["ip"]}])])
    async with aiohttp.ClientSession() as s:
        res = [(await post(s, g.url)) for _ in range(3)]
    assert [r[0] for r in res] == [200, 200, 429], res[0][1]
    assert await _metric(g, "gateway_ratelimit_store_errors_total") == 0
    label = g.plugin("rate_limit").store.label
    assert "p%40ss" not in label and "al%40ice" not in label


async def test_percent_encoded_password_through_sentinel(make_gateway, redis_server, tmp_path):
    """limits hands a Sentinel URL's user and password to the sentinels and the primary as they are
    written: the plugin decodes them first."""
    primary = redis_server()
    assert redis_cmd(primary.port, "CONFIG", "SET", "requirepass", PASSWORD).startswith("+OK")
    with sentinel(tmp_path, primary.port, PASSWORD) as sport:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if "NOAUTH" in redis_cmd(sport, "PING") or "PONG" in redis_cmd(sport, "PING"):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        url = f"redis+sentinel://:p%40ss%3Aw%2Frd%25%23x@127.0.0.1:{sport}/mymaster"
        g = await make_gateway([rl(storage=url, storage_timeout=2, on_store_error="deny",
                                   rules=[{"name": "s", "limit": "2/minute", "key_by": ["ip"]}])])
        async with aiohttp.ClientSession() as s:
            res = [(await post(s, g.url)) for _ in range(3)]
        assert [r[0] for r in res] == [200, 200, 429], res[0][1]


# -- 4. passwords stay out of labels and messages -------------------------------------------------
def test_a_password_with_a_raw_slash_is_masked_in_the_label():
    from gateway.plugins.rate_limit.store import redacted
    for uri, shown in (("redis://carol:4821/Zsecret@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
                       ("redis://carol:x@y/Zsecret#1@127.0.0.1:6379/0?db=2", "redis://***@127.0.0.1:6379/0?db=2"),
                       ("redis+unix://:pw/Zsecret@/tmp/r.sock?db=1", "redis+unix://***@/tmp/r.sock?db=1"),
                       ("redis://:s3cret@10.0.0.1:6379/0", "redis://***@10.0.0.1:6379/0"),
                       ("redis://10.0.0.1:6379/0", "redis://10.0.0.1:6379/0"),
                       # an '@' in a query value or a socket path is no credential: the host stays shown
                       ("redis://cache:6379/0?client_name=gw@eu-1", "redis://cache:6379/0?client_name=gw@eu-1"),
                       ("redis+unix:///run/redis/redis@main.sock?db=0", "redis+unix:///run/redis/redis@main.sock?db=0"),
                       ("redis://h:6379/0?password=p@ss", "redis://h:6379/0?password=***")):
        assert redacted(uri) == shown


def test_an_at_sign_that_is_no_credential_is_accepted(tmp_path):
    """URLs that loaded before the check for unencoded passwords still load."""
    for uri in ("redis://cache:6379/0?client_name=gw@eu-1", "rediss://h:6379?ssl_ca_certs=/etc/ssl/ops@corp/ca.pem",
                "redis+unix:///run/redis/redis@main.sock?db=0", "redis+unix://:pw@/tmp/r.sock",
                "redis://u:p%40ss@h:6379/1"):
        load_config_text(yaml.safe_dump(base_config("http://127.0.0.1:9", tmp_path, [rl(storage=uri)])))


def test_a_storage_url_with_an_unencoded_password_is_refused_without_showing_it(tmp_path):
    for uri in ("redis://carol:x@y/Zsecret#1@127.0.0.1:6379/0", "redis://carol:4821/Zsecret@127.0.0.1:6379/0",
                "redis+sentinel://:a?Zsecret@127.0.0.1:26379/mymaster",
                # a '?' in the password with an '=' after it: read as a query, it still ends at host:port
                "redis://carol:4821?tok=Zsecret@127.0.0.1:6379/0", "redis://carol:#Zk=Zsecret@h:6379"):
        cfg = base_config("http://127.0.0.1:9", tmp_path, [rl(storage=uri)])
        with pytest.raises(ConfigError) as e:
            load_config_text(yaml.safe_dump(cfg))
        msg = str(e.value)
        assert "percent-encode" in msg and "Zsecret" not in msg and "carol" not in msg, msg
        # gateway check says the same, in one line, with a failing exit code
        path = write_config(tmp_path / "bad.yaml", cfg)
        p = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0
        out = p.stdout + p.stderr
        assert "percent-encode" in out and "Zsecret" not in out and "Traceback" not in out, out
    # encoded, it is fine
    cfg = base_config("http://127.0.0.1:9", tmp_path, [rl(storage="redis://carol:4821%2FZsecret@127.0.0.1:6379/0")])
    load_config_text(yaml.safe_dump(cfg))


# -- 5. token charges the store could not take ----------------------------------------------------
async def test_token_charges_dropped_while_the_store_is_down_are_counted_and_logged(make_gateway, redis_server,
                                                                                    upstream):
    redis = redis_server()
    g = await make_gateway([rl(storage=redis.url, strategy="fixed", storage_retry=30, rules=[
        {"name": "tpm", "limit": "100000/minute", "counts": "tokens", "key_by": ["ip"]}])])
    slow = {"X-Demo-Head-Delay": "1.5"}
    async with aiohttp.ClientSession() as s:
        pending = [asyncio.create_task(post(s, g.url, chat_body(max_tokens=5), headers=slow)) for _ in range(2)]
        deadline = time.monotonic() + 10
        while len([r for r in upstream.requests if r["path"] == CHAT]) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # both passed the pre-check and are at the upstream
        redis.stop()
        with Lines() as lines:
            res = await asyncio.gather(*pending)
            await g.plugin("rate_limit").drain()
    assert [r[0] for r in res] == [200, 200]
    # one charge failed on the store, the other found it marked down: both are said
    assert await metric(g, "gateway_ratelimit_store_errors_total", "charge_dropped") == 2
    dropped = [x for x in lines.lines if "token charge(s) dropped" in x]
    assert len(dropped) == 1, lines.lines  # the second one is held back for the next summary line


# -- 6. one probe after the back-off --------------------------------------------------------------
async def test_after_the_back_off_one_request_probes_a_frozen_store(make_gateway, redis_server):
    redis = redis_server()
    timeout = 0.3
    g = await make_gateway([rl(storage=redis.url, storage_timeout=timeout, storage_retry=0.5, on_store_error="deny",
                               rules=[{"name": "r", "limit": "100/minute", "key_by": ["ip"]}])])
    n = 20
    async with aiohttp.ClientSession() as s:
        assert (await post(s, g.url))[0] == 200

        async def timed() -> tuple[int, float]:
            t0 = time.monotonic()
            st, _, _ = await post(s, g.url)
            return st, time.monotonic() - t0

        redis.pause()
        try:
            with Lines() as lines:
                first = await asyncio.gather(*[timed() for _ in range(n)])  # in flight together
                await asyncio.sleep(0.7)  # the back-off is over: the store is tried again
                second = await asyncio.gather(*[timed() for _ in range(n)])  # one probes, the others wait
        finally:
            redis.resume()
        # the outage's end is said too, once (on-call reads when it was over)
        with Lines() as after:
            deadline = time.monotonic() + 20
            while True:  # (a busy machine can miss the 0.3 s deadline once more: the next back-off ends)
                await asyncio.sleep(0.7)
                if (await post(s, g.url))[0] == 200:
                    break
                assert time.monotonic() < deadline, "the store never answered again"
            assert (await post(s, g.url))[0] == 200
    assert [st for st, _ in first + second] == [503] * (2 * n)
    assert all(t < timeout + 1.5 for _, t in first + second)
    warnings = [x for x in lines.lines if "timed out" in x or "failed" in x]
    print(f"{len(warnings)} warning(s) for {2 * n} requests on a frozen store")
    assert 1 <= len(warnings) <= 3, warnings
    again = [x for x in after.lines if "answers again" in x]
    assert len(again) == 1 and "s of failures" in again[0], after.lines


async def test_counts_held_back_are_logged_at_shutdown(make_gateway, caplog):
    """Failed calls and lost charges are logged once per 10 s with a count; those of the last
    seconds before a stop are logged by the stop, not lost with the process."""
    import logging

    from gateway.plugins.rate_limit.store import STORE_LOG
    g = await make_gateway([rl(rules=[{"name": "r", "limit": "10/minute", "key_by": ["ip"]}])])
    with caplog.at_level(logging.WARNING, logger="gateway.rate_limit"):
        for _ in range(3):
            STORE_LOG.event("charge:test-store", 2, "rate-limit store test-store: %d token charge(s) lost")
        assert [r.getMessage() for r in caplog.records if "test-store" in r.getMessage()] == [
            "rate-limit store test-store: 2 token charge(s) lost"]
        await g.stop()
    assert [r.getMessage() for r in caplog.records if "test-store" in r.getMessage()][1:] == [
        "rate-limit store test-store: 4 token charge(s) lost since the last line"]


async def test_quota_reads_failing_in_an_outage_are_logged_once_with_a_count(make_gateway, caplog):
    """The database down: every request's quota read fails (on_store_error applies); the log says
    so once per 10 s with a count, not once per request."""
    import logging
    g = await make_gateway([rl(rules=[], quotas={"daily_tokens": 1000})])
    plugin = g.plugin("rate_limit")

    async def down(*_: Any) -> int:
        raise ConnectionRefusedError("database down")

    plugin._quota.used = down
    with caplog.at_level(logging.WARNING, logger="gateway.rate_limit"):
        async with aiohttp.ClientSession() as s:
            statuses = [(await post(s, g.url))[0] for _ in range(5)]
    assert statuses == [200] * 5  # on_store_error: allow
    lines = [r.getMessage() for r in caplog.records if "quota read" in r.getMessage()]
    assert lines == ["rate_limit: 1 quota read(s) failed (ConnectionRefusedError)"]


async def test_requests_let_through_while_the_quota_read_fails_are_charged_to_every_period(make_gateway,
                                                                                           tmp_path):
    """on_store_error: allow lets them through with the database down; each is charged to the day
    and to the month alike once the database is back (the monthly quota lost them when the daily
    read failed first)."""
    import sqlite3
    g = await make_gateway([rl(rules=[], quotas={"daily_tokens": 100000, "monthly_tokens": 1000000})])
    plugin = g.plugin("rate_limit")
    up = plugin._quota.used

    async def down(*_: Any) -> int:
        raise ConnectionRefusedError("database down")

    async with aiohttp.ClientSession() as s:
        assert (await post(s, g.url))[0] == 200
        plugin._quota.used = down
        assert [(await post(s, g.url))[0] for _ in range(3)] == [200] * 3
        plugin._quota.used = up
    await plugin._quota.writer.flush()
    with sqlite3.connect(tmp_path / "gateway.db") as c:
        rows = dict(c.execute("SELECT period, tokens FROM rate_limit_quota_usage").fetchall())
    day, month = sorted(rows, key=lambda p: p[0])  # d:..., m:...
    assert rows[day] == rows[month] and rows[day] > 0, rows
