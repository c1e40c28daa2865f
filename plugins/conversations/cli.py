"""``gateway conversations list|show|export|delete|purge`` on the configured database."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import re
import sys
from typing import Any

from gateway import cli

from ..key_auth.keys import NOT_A_KEY_ID, key_id_of
from .store import ConversationStore, dumps, parse_time, utcnow

_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*$")


def _span(td: dt.timedelta) -> str:
    """A --older-than as it was given: 30d, 12h, 90m, 45s."""
    exact = td.total_seconds()
    secs = int(exact)
    if secs != exact:  # (a fraction of a day: 0.0001 is 8.64 seconds)
        return f"{exact:g}s"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs % n == 0:
            return f"{secs // n}{unit}"
    return f"{secs}s"


def parse_duration(s: str) -> dt.timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``; a bare number is days."""
    m = _DUR.match(s)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {s!r} (e.g. 30d, 12h, 90m)")
    n, unit = float(m.group(1)), m.group(2) or "d"
    try:
        td = dt.timedelta(**{{"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[unit]: n})
    except OverflowError:
        td = dt.timedelta.max
    if td > dt.timedelta(days=36500):
        raise argparse.ArgumentTypeError(f"duration too long: {s!r} (at most 36500d)")
    if td <= dt.timedelta(0):
        raise argparse.ArgumentTypeError(f"duration must be more than 0: {s!r} (0 would purge everything)")
    return td


def _moment(s: str) -> dt.datetime:
    """A --since/--until: an ISO 8601 time, or an age with its unit (``24h``, ``7d``: that long ago,
    as `gateway audit query` takes them)."""
    m = _DUR.match(s)
    if m and m.group(2):
        return utcnow() - parse_duration(s)
    return parse_time(s)


def add_cli(sub: Any) -> None:
    p = sub.add_parser("conversations", help="list, show, export, delete and purge stored conversations")
    cs = p.add_subparsers(dest="conv_command", required=True)

    def common(x: argparse.ArgumentParser) -> argparse.ArgumentParser:
        cli.add_config_arg(x)
        x.add_argument("--json", action="store_true", help="machine-readable output")
        x.set_defaults(func=run)
        return x

    x = common(cs.add_parser("list", help="list conversations, newest activity first"))
    x.add_argument("--owner")
    x.add_argument("--key-id")
    x.add_argument("--since", help="ISO 8601 time, or an age like 24h or 7d")
    x.add_argument("--until", help="ISO 8601 time, or an age like 24h or 7d")
    x.add_argument("-q", "--query", help="text search in message content")
    x.add_argument("--external-id", help="only the conversations of this client's own id (external_ids)")
    x.add_argument("--limit", type=cli.whole_number(1, 1000), default=50, help="page size, 1..1000 (default 50)")
    x.add_argument("--cursor")
    x = common(cs.add_parser("show", help="one conversation with its messages"))
    x.add_argument("id")
    x.add_argument("--limit", type=cli.whole_number(1, 1000), default=1000, help="at most this many messages, 1..1000 (default 1000)")
    x = common(cs.add_parser("export", help="JSONL, one line per message (stdout or -o FILE)"))
    x.add_argument("id", nargs="?")
    x.add_argument("--owner")
    x.add_argument("-o", "--output")
    x = common(cs.add_parser("delete", help="delete one conversation, or all of an owner's (--owner)"))
    x.add_argument("id", nargs="?")
    x.add_argument("--owner")
    x = common(cs.add_parser("purge", help="delete conversations with no activity for a while"))
    x.add_argument("--older-than", type=parse_duration, required=True, help="e.g. 30d, 12h")


def run(args: argparse.Namespace) -> int:
    cfg = cli.load(args)
    return asyncio.run(_run(args, cfg))


async def _run(args: argparse.Namespace, cfg: Any) -> int:
    services = await cli.cli_services(cfg, writes=args.conv_command in ("delete", "purge"),
                                      records=args.conv_command in ("delete", "purge", "export"))
    store = ConversationStore(services.db)
    try:
        return await _cmd(args, store, services)
    finally:
        await services.close()
        await services.db.close()


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    if args.json:
        cli.print_json(obj)
    else:
        print(text)


async def _cmd(args: argparse.Namespace, store: ConversationStore, services: Any) -> int:
    c = args.conv_command
    if c == "list":
        try:
            since = _moment(args.since) if args.since else None
            until = _moment(args.until) if args.until else None
        except (ValueError, argparse.ArgumentTypeError):
            print("--since/--until must be ISO 8601 times or ages like 24h", file=sys.stderr)
            return 2
        key_id = key_id_of(args.key_id) if args.key_id else None
        if args.key_id and key_id is None:
            print(f"--key-id: {NOT_A_KEY_ID}", file=sys.stderr)
            return 2
        try:
            data, nxt = await store.list(owner=args.owner, key_id=key_id, since=since, until=until,
                                         q=args.query, limit=args.limit, cursor=args.cursor,
                                         external_id=args.external_id)
        except ValueError as e:  # (only a --cursor that is not one of ours: a usage error)
            print(f"--cursor: {e}", file=sys.stderr)
            return 2
        lines = [f"{'ID':<28} {'OWNER':<20} {'MSGS':>5} {'TOKENS':>8}  UPDATED"]
        for d in data:
            lines.append(f"{d['id']:<28} {cli.terminal_text(d['owner'][:20]):<20} {d['message_count']:>5} "
                         f"{d['prompt_tokens'] + d['completion_tokens']:>8}  {d['updated_at']}")
        if nxt:
            lines.append(f"(more: --cursor {nxt})")
        _out(args, {"object": "list", "data": data, "has_more": nxt is not None, "next_cursor": nxt}, "\n".join(lines))
        return 0
    if c == "show":
        conv = await store.get(args.id)
        if conv is None:
            print(f"no conversation {cli.terminal_text(args.id)}", file=sys.stderr)
            return 1
        msgs, more = await store.messages(args.id, limit=args.limit, max_bytes=None)  # (no shared event loop here)
        lines = [f"{conv['id']}  owner={cli.terminal_text(conv['owner'])}  messages={conv['message_count']}"
                 + (f"  forked from {conv['parent_id']} at {conv['fork_position']}" if conv["parent_id"] else "")]
        for m in msgs:
            body = m["content"] if isinstance(m["content"], str) else dumps(m["content"])
            if m.get("tool_calls"):
                body = (body or "") + " tool_calls=" + dumps(m["tool_calls"])
            tok = "" if m["tokens"] is None else f" [{m['tokens']}{'~' if m['tokens_derived'] else ''} tok]"
            st = f" ({m['status']})" if m.get("status") and m["status"] != "complete" else ""
            role = cli.terminal_text(m["role"] if isinstance(m["role"], str) else dumps(m["role"]))
            lines.append(f"  {m['position']:>3} {role:<9}{tok}{st} {cli.terminal_text(body or '')}")
        _out(args, {**conv, "messages": msgs, "has_more": more}, "\n".join(lines))
        return 0
    if c == "export":
        if bool(args.id) == bool(args.owner):
            print("give a conversation id or --owner", file=sys.stderr)
            return 2
        if args.id and await store.get(args.id) is None:
            print(f"no conversation {cli.terminal_text(args.id)}", file=sys.stderr)
            return 1
        n = pending = 0  # lines handed to the OS / lines still in the file buffer
        complete = False
        # -o: a temporary file replaces the file only when complete (an export cut short must not
        # leave a partial file where a complete one was).
        target = cli.atomic_output(args.output, "utf-8") if args.output else contextlib.nullcontext(sys.stdout)
        try:
            with target as f:
                async for m in store.export(cid=args.id, owner=args.owner):
                    # (counted before the write: a signal right after it would leave it uncounted;
                    # a write that fails, a closed stdout, took nothing)
                    pending += 1
                    try:
                        f.write(dumps(m) + "\n")
                    except Exception:
                        pending -= 1
                        raise
                    if pending >= 200:
                        f.flush()
                        n, pending = n + pending, 0
                f.flush()
                n, pending, complete = n + pending, 0, True
        except (KeyboardInterrupt, asyncio.CancelledError):
            if args.output:
                print(f"export interrupted after {n + pending} records; {args.output} left unchanged", file=sys.stderr)
            raise
        finally:
            # An export cut short (`| head`, Ctrl-C, SIGTERM, a full disk) is recorded too, with
            # what was actually written, like the admin API's (an audit trail that only sees
            # finished exports misses the ones that leaked part of the data).
            # (cut short: the lines still in the buffer count too, as the ones the OS took may
            # have been flushed earlier than ours, in part: what may have left, not less)
            services.events.emit("conversation.exported", actor="cli", conversation_id=args.id,
                                 owner=args.owner, messages=n + pending, complete=complete)
        if args.output:
            print(f"exported {n} message(s) to {args.output}", file=sys.stderr)
        return 0
    if c == "delete":
        if bool(args.id) == bool(args.owner):
            print("give a conversation id or --owner", file=sys.stderr)
            return 2
        if args.id:
            conv = await store.get(args.id)  # (whose it was, for the record)
            if conv is None or not await store.delete(args.id):
                print(f"no conversation {cli.terminal_text(args.id)}", file=sys.stderr)
                return 1
            n = 1
            services.events.emit("conversation.deleted", actor="cli", conversation_id=args.id,
                                 owner=conv["owner"], deleted=n)
        else:  # (an event per committed part: a run cut short leaves a record of what it deleted)
            n = len(await store.delete_owner(args.owner, each=lambda k: services.events.emit(
                "conversation.deleted", actor="cli", owner=args.owner, deleted=k)))
        _out(args, {"deleted": n}, f"deleted {n} conversation(s)")
        return 0
    if c == "purge":
        td: dt.timedelta = args.older_than
        ids = await store.purge(utcnow() - td, each=lambda k: services.events.emit(
            "conversations.purged", actor="cli", older_than_days=td.total_seconds() / 86400, deleted=k))
        _out(args, {"deleted": len(ids)}, f"purged {len(ids)} conversation(s) with no activity for {_span(td)}")
        return 0
    return 2
