"""``gateway audit tail [-f] | query [filters] | top | verify | export`` on the configured database."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from typing import Any

from gateway import cli as core_cli

from . import store
from .api import FILTERS, MAX_HEADS, parse_filters
from .chain import ChainKeys, parse_head
from .sinks import jsonl


#: ``gateway audit verify`` exit code when the chain could not be checked at all (no database, an
#: unreachable server ...): distinct from 1, "checked and broken", so an alert can tell them apart.
EXIT_VERIFY_ERROR = 3


def _interval(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None
    if not 0.1 <= x <= 86400:  # (less would busy-poll the database; nan fails this too)
        raise argparse.ArgumentTypeError(f"must be 0.1..86400 seconds: {v!r}")
    return x


def add_cli(subparsers: Any) -> None:
    from gateway.cli import add_config_arg

    p = subparsers.add_parser("audit", help="read and verify the audit trail")
    sub = p.add_subparsers(dest="audit_command", required=True)

    t = sub.add_parser("tail", help="the latest events, oldest first (-f: keep printing new ones)")
    add_config_arg(t)
    t.add_argument("-n", "--lines", type=core_cli.whole_number(), default=20, help="how many events (default 20)")
    t.add_argument("-f", "--follow", action="store_true", help="keep polling for new events")
    t.add_argument("--interval", type=_interval, default=1.0, help="poll interval for -f, seconds (at least 0.1)")

    q = sub.add_parser("query", help="events matching filters, newest first, as JSON lines")
    add_config_arg(q)
    _filter_args(q)
    q.add_argument("--limit", type=core_cli.whole_number(), default=100, help="at most this many events (default 100)")
    q.add_argument("--asc", action="store_true", help="oldest first")

    v = sub.add_parser("verify", help="check the hash chain; exit 1 and report the first broken link, "
                                      f"{EXIT_VERIFY_ERROR} if it could not be checked")
    add_config_arg(v)
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.add_argument("--head", action="append", default=[], metavar="SEQ:HASH",
                   help="a head recorded earlier (this command's last_seq:head_hash, or the gateway's `audit head` "
                        "log line): the trail must still hold that row with that hash, unless retention deleted "
                        "it; catches rows removed from the end, which the chain alone cannot (repeatable)")

    tp = sub.add_parser("top", help="who is busy: requests and refusals grouped by key, owner, client address, "
                                    "team or model (default: the last 15 minutes), the busiest first")
    add_config_arg(tp)
    _filter_args(tp)
    tp.add_argument("--by", choices=sorted(store.TOP_BY), default="key", help="group by key id (default), owner, ip, team (the key's team when the request was made) or "
                         "model (as the client asked for it)")
    tp.add_argument("--sort", choices=store.TOP_SORT, default="events",
                    help="order by events (default), tokens (in + out), refused (auth and rate-limit refusals) or "
                         "errors (5xx)")
    tp.add_argument("--limit", type=core_cli.whole_number(), default=20, help="at most this many groups (default 20)")
    tp.add_argument("--json", action="store_true", help="one JSON object per group")

    e = sub.add_parser("export", help="every event (or the filtered ones) in seq order")
    add_config_arg(e)
    _filter_args(e)
    e.add_argument("--format", choices=["jsonl", "json"], default="jsonl", help="jsonl (default) or a JSON array")
    e.add_argument("-o", "--output", help="write to this file instead of stdout")
    e.add_argument("--with-chain", action="store_true", help="include prev_hash and hash (re-verifiable offline)")
    p.set_defaults(func=cmd_audit)


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", help="ISO 8601 time, Unix seconds or an age like 24h")
    p.add_argument("--until", help="same formats; exclusive")
    p.add_argument("--type", help="event type(s), comma-separated")
    p.add_argument("--key-id", dest="key_id")
    p.add_argument("--owner")
    p.add_argument("--ip")
    p.add_argument("--status", help="429 or 4xx")


def config_keys(cfg: Any) -> tuple[bytes, ...]:
    """The chain keys the config gives the audit plugin (current first); none without one."""
    for spec in cfg.plugins:
        if spec.name == "audit" and spec.validated is not None:
            return ChainKeys.of(spec.validated).keys
    return ()


def cmd_audit(args: argparse.Namespace) -> int:
    from gateway.cli import load

    cfg = load(args)
    try:
        f = parse_filters(lambda k: getattr(args, k, None)) if any(hasattr(args, k) for k in FILTERS) else {}
        args.heads = [parse_head(h) for h in getattr(args, "head", None) or []]
        if len(args.heads) > MAX_HEADS:
            raise ValueError(f"--head: at most {MAX_HEADS} at once")
    except ValueError as e:
        msg = str(e)
        name = msg.split(":", 1)[0]
        if name in FILTERS:  # (the API's parameter names: the command line's are its flags)
            msg = f"--{name.replace('_', '-')}{msg[len(name):]}"
        print(f"gateway audit: {msg}", file=sys.stderr)
        return 2
    # (Ctrl-C, SIGTERM and a closed pipe are gateway.cli.main's: exit 130 / 143, or 0 for `| head`)
    try:
        return asyncio.run(_run(cfg, args, f))
    except Exception as e:
        if args.audit_command != "verify" or isinstance(e, BrokenPipeError):
            raise  # (gateway.cli.main: one line, exit 1)
        return _verify_failed(args, e)


def _verify_failed(args: argparse.Namespace, e: Exception) -> int:
    """``verify`` could not check the chain (a missing database, an unreachable server ...): not
    "broken" (exit 1) but "unknown", exit 3; with --json an object scripts can tell apart."""
    from gateway.cli import redact_url
    from gateway.db import sqlite_hint

    first = (str(e).strip().splitlines() or [""])[0][:300]
    msg = redact_url(f"{type(e).__name__}: {first}" if first else type(e).__name__) + sqlite_hint(e)
    if args.json:
        _report(json.dumps({"ok": None, "error": msg}, indent=2))
    print(f"gateway audit verify: could not verify: {msg}", file=sys.stderr)
    return EXIT_VERIFY_ERROR


def _report(text: str) -> str | None:
    """Print ``text`` to stdout now (flushed, so a failure shows here): None, or why it could
    not be written. After a failure stdout is not written to again."""
    import contextlib
    import os

    try:
        if sys.stdout is None:
            return "stdout is closed"
        print(text)
        sys.stdout.flush()
        return None
    except (OSError, ValueError) as e:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # (the interpreter flushes stdout at exit)
        return "closed pipe" if isinstance(e, BrokenPipeError) else str(e)


def _verify_exit(ok: bool, failure: str | None) -> int:
    """The exit code of a verify whose verdict is ``ok`` and whose report failed as ``failure``
    says: a broken chain is 1 whatever became of the report (an alert must not miss it); an
    intact one whose report was lost is 3, "could not verify", as nobody saw the verdict; a
    closed pipe (`| grep -q`, `| true`) keeps the verdict, like any command's output to `head`."""
    if not ok:
        return 1
    if failure is None or failure == "closed pipe":
        return 0
    print(f"gateway audit verify: could not verify: the report could not be written: {failure}", file=sys.stderr)
    return EXIT_VERIFY_ERROR


async def _run(cfg: Any, args: argparse.Namespace, f: dict[str, Any]) -> int:
    from gateway.cli import cli_services

    services = await cli_services(cfg, writes=False)  # (every audit command only reads)
    db = services.db
    try:
        cmd = args.audit_command
        if cmd == "verify":
            res = await store.verify(db, config_keys(cfg), args.heads)  # (the verdict first: the report may fail to be written)
            failure = _report(json.dumps({**res.as_dict(), "message": res.message()}, indent=2) if args.json
                              else res.message())
            return _verify_exit(res.ok, failure)
        if cmd == "query":
            data, more = await store.query(db, f, limit=args.limit, order="asc" if args.asc else "desc")
            _emit(data)
            if more is not None:  # (a total summed from these lines would be short: said, as keys list does)
                print(f"gateway audit: more events match than --limit {args.limit} (a larger --limit, or "
                      "`gateway audit export` with the same filters, has them all)", file=sys.stderr)
            return 0
        if cmd == "top":
            if not f.get("since"):  # (the 15 minutes before --until, or before now)
                end = dt.datetime.fromisoformat(f["until"].replace("Z", "+00:00")).timestamp() if f.get("until") \
                    else time.time()
                f["since"] = store.iso(end - TOP_DEFAULT_SINCE)
            f.setdefault("type", "request,auth_failure,rate_limited")  # (traffic, not admin actions)
            rows = await store.top(db, f, args.by, args.sort, args.limit + 1)
            if len(rows) > args.limit:
                rows = rows[:args.limit]
                print(f"gateway audit: more {args.by} groups than --limit {args.limit}: these are the first by "
                      f"{args.sort}", file=sys.stderr)
            if args.json:
                _emit(rows)
            else:
                sys.stdout.write(_top_table(rows, args.by))
                sys.stdout.flush()
            return 0
        if cmd == "tail":
            data, _ = await store.query(db, {}, limit=args.lines, order="desc")
            data.reverse()
            _emit(data)
            last = data[-1]["seq"] if data else (await store.head(db))[0]
            while args.follow:
                await asyncio.sleep(args.interval)
                async for r in store.iter_rows(db, after=last):
                    _emit([store._out(r)])
                    last = int(r.seq)
            return 0
        if cmd == "export":
            if not args.output:
                await _export(db, args, f, sys.stdout, [0])
                return 0
            # -o: a temporary file replaces the file only when complete (an export cut short
            # must not leave a partial file, or invalid JSON, where a complete one was).
            count = [0]
            try:
                with core_cli.atomic_output(args.output, "ascii") as out:
                    await _export(db, args, f, out, count)
            except (KeyboardInterrupt, asyncio.CancelledError):
                print(f"export interrupted after {count[0]} records; {args.output} left unchanged", file=sys.stderr)
                raise
            return 0
        return 2
    finally:
        await services.close()
        await db.close()


async def _export(db: Any, args: argparse.Namespace, f: dict[str, Any], out: Any, count: list[int]) -> None:
    """Every matching event to ``out``; ``count[0]`` says how many were written so far."""
    first = True
    if args.format == "json":
        out.write("[")
    async with store.snapshot(db) as conn:  # (a purge meanwhile leaves no gap in it)
        async for r in store.iter_rows(db, f=f or None, conn=conn):
            ev = json.loads(r.data)
            if args.with_chain:
                # the hashed text itself: a re-check needs no re-serialisation
                ev["prev_hash"], ev["hash"], ev["record"] = r.prev_hash, r.hash, r.data
            if args.format == "json":
                out.write(("\n" if first else ",\n") + jsonl(ev))
            else:
                out.write(jsonl(ev) + "\n")
            first = False
            count[0] += 1
    if args.format == "json":
        out.write("\n]\n")


#: The window ``audit top`` looks at without --since, seconds.
TOP_DEFAULT_SINCE = 900


def _top_table(rows: list[dict[str, Any]], by: str) -> str:
    width = {"key": 12, "owner": 24, "ip": 39, "team": 24, "model": 32}[by]
    other = "KEYS" if by in store.TOP_KEYS else "IPS"
    lines = [f"{by.upper():<{width}} {'EVENTS':>7} {'REQS':>7} {'REFUSED':>7} {'5XX':>6} {'TOKENS_IN':>10} "
             f"{'TOKENS_OUT':>10} {other:>5}  LAST"]
    for r in rows:
        name = core_cli.terminal_text(str(r[by]))
        if len(name) > width:
            name = name[:width - 1] + "…"
        lines.append(f"{name:<{width}} {r['events']:>7} {r['requests']:>7} {r['refused']:>7} {r['errors_5xx']:>6} "
                     f"{r['tokens_in']:>10} {r['tokens_out']:>10} {r['keys' if by in store.TOP_KEYS else 'ips']:>5}  {r['last']}")
    if not rows:
        lines.append("(no events)")
    return "\n".join(lines) + "\n"


def _emit(events: list[dict[str, Any]]) -> None:
    for ev in events:
        sys.stdout.write(jsonl(ev) + "\n")
    sys.stdout.flush()
