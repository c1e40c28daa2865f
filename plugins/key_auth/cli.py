"""``gateway keys create|import|list|show|update|rotate|revoke|usage``: key administration from the shell.

Works on the configured database directly, so it needs no running gateway and no admin token. A
running gateway sees a change made here within its ``cache_ttl``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import sys
from typing import Any

from gateway import cli as core_cli

from .keys import NO_KEY_NAMED, imported_token_hash, key_id_of

_UNSET: Any = object()  # an option not given (None means "clear it")
_REL = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(v: str) -> dt.datetime | None:
    """'never', a relative time ('30d', '12h'), a date or an ISO datetime (UTC if no offset)."""
    v = v.strip()
    if v.lower() in ("never", "none", ""):
        return None
    m = _REL.match(v)
    try:
        if m:
            return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=int(m.group(1)) * _UNIT[m.group(2)])
        d = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        if d.tzinfo is not None:
            d.astimezone(dt.timezone.utc)  # raises for a time UTC cannot hold
    except OverflowError:
        raise argparse.ArgumentTypeError(f"out of range: {v!r}") from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {v!r} (use e.g. 30d, 12h, 2027-01-01, never)") from None
    return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)


def _limit(field: str) -> Any:
    from .store import LIMIT_MAX

    def parse(v: str) -> int | None:
        if v.lower() in ("none", "default", ""):
            return None
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {v!r}") from None
        if not 1 <= n <= LIMIT_MAX[field]:
            raise argparse.ArgumentTypeError(f"must be 1..{LIMIT_MAX[field]} (or 'none' to use the YAML default)")
        return n

    parse.__name__ = "limit"
    return parse


def _kv(v: str) -> tuple[str, str] | None:
    if v == "":
        return None  # (`--meta ''`: no metadata)
    if "=" not in v:
        raise argparse.ArgumentTypeError("expected key=value")
    k, _, val = v.partition("=")
    return k, val


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("keys", help="manage API keys (works on the configured database directly)")
    sub = p.add_subparsers(dest="keys_command", required=True)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        core_cli.add_config_arg(c)
        c.add_argument("--json", action="store_true", help="print JSON for scripts")
        c.set_defaults(func=run)
        return c

    def attrs(c: argparse.ArgumentParser) -> None:
        c.add_argument("--name", help="a label for people")
        c.add_argument("--team")
        c.add_argument("--meta", action="append", type=_kv, metavar="KEY=VALUE", help="metadata (repeatable; on update replaces all of the key's metadata, '' clears it)")
        c.add_argument("--scope-path", action="append", metavar="PREFIX",
                       help="allowed path prefix (repeatable; on update replaces the list, '' clears it)")
        c.add_argument("--scope-model", action="append", metavar="MODEL",
                       help="allowed model or pattern (repeatable; on update replaces the list, '' clears it)")
        for f in ("rpm", "tpm", "daily-tokens", "monthly-tokens", "max-parallel"):
            c.add_argument(f"--{f}", type=_limit(f.replace("-", "_")), metavar="N", default=_UNSET, help=f"{f} override ('none' clears it)")
        c.add_argument("--expires", type=parse_when, metavar="WHEN", default=_UNSET,
                       help="expiry: 30d, 12h, 2027-01-01, an ISO time, or 'never'")

    c = cmd("create", "create a key and print it (shown once)")
    c.add_argument("--owner", required=True, help="user id the key belongs to")
    attrs(c)
    imp = c.add_mutually_exclusive_group()
    imp.add_argument("--import-sha256", metavar="HEX",
                     help="import a key issued elsewhere by the SHA-256 (hex) of the token its clients send: "
                          "it keeps working (with key_auth.imported_keys: true)")
    imp.add_argument("--import-key-stdin", action="store_true",
                     help="import a key issued elsewhere, read from standard input (one line; only its SHA-256 "
                          "is stored)")
    c = cmd("import", "create many keys from a CSV or JSON Lines file, all or none, and print them (shown once)")
    c.add_argument("file", metavar="FILE", help="the file ('-' for standard input): CSV with a header row, or JSON "
                                                "Lines of POST /keys bodies (see docs/key_auth.md)")
    c.add_argument("--format", choices=["csv", "jsonl"], help="default: from the file's extension, else its content")
    c.add_argument("--skip-existing", action="store_true",
                   help="leave out rows whose import hash is stored already, or whose owner has an active key of "
                        "the row's name (a file imported again creates only what is missing)")
    c.add_argument("--dry-run", action="store_true", help="check the file and say what would be done; create nothing")
    c = cmd("list", "list keys")
    c.add_argument("--owner")
    c.add_argument("--team")
    c.add_argument("--name", help="the key's name, matched exactly")
    c.add_argument("--status", choices=["active", "revoked", "expired"])
    c.add_argument("--limit", type=core_cli.whole_number(), default=1000,
                   help="at most this many keys, oldest first (default 1000; stderr says when more match)")
    c.add_argument("--offset", type=core_cli.whole_number(0), default=0, help="skip this many keys first (the next page)")
    c = cmd("show", "show one key")
    c.add_argument("key_id")
    c = cmd("update", "change a key's name, team, metadata, scopes, limits or expiry")
    c.add_argument("key_id")
    attrs(c)
    c = cmd("rotate", "issue a new secret (printed once); the old one works for the grace period")
    c.add_argument("key_id")
    c.add_argument("--grace", type=float, metavar="SECONDS", help="grace period (default: rotation_grace)")
    c = cmd("revoke", "revoke a key for good (or every key of an owner or a team: --owner / --team)")
    c.add_argument("key_id", nargs="?", help="the key (its id, the whole key, or an imported key's token)")
    c.add_argument("--owner", help="revoke every key of this owner (offboarding), in one statement")
    c.add_argument("--team", help="revoke every key of this team (with --owner: that owner's keys in it)")
    c.add_argument("--dry-run", action="store_true", help="with --owner / --team: list the keys, revoke nothing")
    c = cmd("usage", "usage per day and totals")
    c.add_argument("key_id")
    c.add_argument("--from", dest="start", type=dt.date.fromisoformat, help="first day (default: 1st of this month)")
    c.add_argument("--to", dest="end", type=dt.date.fromisoformat, help="last day (default: today)")


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    ch: dict[str, Any] = {}
    if args.name is not None:
        ch["name"] = args.name
    if args.team is not None:
        ch["team"] = args.team or None
    if args.meta:
        ch["metadata"] = dict(kv for kv in args.meta if kv is not None)
    if args.scope_path is not None or args.scope_model is not None:
        ch["scopes"] = {"paths": [p for p in args.scope_path or [] if p],
                        "models": [m for m in args.scope_model or [] if m]}
    from .store import LIMIT_FIELDS

    limits = {}
    for f in LIMIT_FIELDS:
        if getattr(args, f) is not _UNSET:
            limits[f] = getattr(args, f)
    if limits:
        ch["limits"] = limits
    if args.expires is not _UNSET:
        ch["expires_at"] = args.expires
    return ch


def run(args: argparse.Namespace) -> int:
    cfg = core_cli.load(args)
    return asyncio.run(_run(args, cfg))


async def _run(args: argparse.Namespace, cfg: Any) -> int:
    from . import config_from_settings
    from .admin import CreateKey, RotateKey, UpdateKey
    from .store import KeyImported, KeyRevoked, KeyStore, changed_values, created_fields, key_fields

    if args.keys_command == "import":
        rows = read_import(args)  # (before the database is opened: a file that cannot be taken changes nothing)
        if isinstance(rows, str):
            return _fail(rows, code=2)  # (a file the command cannot take: a usage error, as for create)
        args.rows = rows
    named = None
    if args.keys_command == "revoke" and (args.key_id is None) == (args.owner is None and args.team is None):
        _fail("give a key, or --owner and/or --team (not both)")
        return 2
    if args.keys_command == "revoke" and args.dry_run and args.key_id is not None:
        _fail("--dry-run goes with --owner / --team")
        return 2
    if getattr(args, "key_id", None) is not None:
        # (checked before the database is opened; a leaked imported token is found by its hash then)
        if key_id_of(args.key_id) is None and imported_token_hash(args.key_id) is None:
            _fail(NO_KEY_NAMED)  # (a usage error, as argparse's: exit 2)
            return 2
        named, args.key_id = args.key_id, None
    services = await core_cli.cli_services(cfg, create=args.keys_command == "create" or (
                                               args.keys_command == "import" and not args.dry_run),
                                           writes=args.keys_command not in ("list", "show", "usage"))
    store = KeyStore(services.db)
    kcfg = config_from_settings(cfg)
    try:
        c = args.keys_command
        if named is not None:
            args.key_id = await store.named_key_id(named)
            if args.key_id is None:
                return _fail(NO_KEY_NAMED, code=2)
        if c in ("create", "import", "rotate"):
            from .keys import pepper_fingerprint

            recorded = await store.setting("pepper")
            if recorded is not None and recorded != pepper_fingerprint(kcfg.pepper):
                # (a shell without the pepper's variable: its keys were refused, its rotations locked keys out)
                return _fail("key_auth.pepper in this config is not the one the gateway runs with (as it recorded "
                             "at its last start): a key made or rotated with it would be refused. Is the variable "
                             "the pepper reads (GATEWAY_KEY_PEPPER in the shipped config) set in this shell?",
                             code=2)

        if c == "create":
            ch = _changes(args)
            exp = ch.get("expires_at")
            if exp is not None and exp <= dt.datetime.now(dt.timezone.utc):
                # (a key that is expired when made is a typo, not a key anyone can use)
                print(f"gateway keys: --expires {exp.isoformat()} is in the past", file=sys.stderr)
                return 2
            body = {"owner": args.owner, "name": ch.get("name") or "", "team": ch.get("team"),
                    "metadata": ch.get("metadata") or {}, "scopes": ch.get("scopes") or {},
                    "limits": ch.get("limits") or {}, "expires_at": ch.get("expires_at")}
            if args.import_sha256 is not None:
                body["import_sha256"] = args.import_sha256.strip().lower()
            if args.import_key_stdin:
                body["import_key"] = sys.stdin.readline().rstrip("\r\n")
            problem = _invalid(CreateKey, body)
            if problem:
                return _fail(problem, code=2)  # (a value the command line got wrong: a usage error)
            try:
                rec, key = await store.create(pepper=kcfg.pepper, owner=args.owner, name=ch.get("name") or "",
                                              team=ch.get("team"), metadata=ch.get("metadata"),
                                              scopes=ch.get("scopes"), limits=ch.get("limits"),
                                              expires_at=ch.get("expires_at"),
                                              import_hash=CreateKey.model_validate(body).import_hash())
            except KeyImported:
                return _fail("a key with this import hash exists already")
            services.events.emit("key.created", actor="cli", **created_fields(rec))
            if rec["imported"] and not kcfg.imported_keys:
                print("gateway keys: warning: imported, but key_auth.imported_keys is false in this config: the "
                      "imported token is refused until it is set to true", file=sys.stderr)
            _warn_unapplied(cfg, ch.get("limits") or {})
            return _out(args, {**rec, "key": key}, secret=key, did="created")
        if c == "import":
            return await _import(args, cfg, kcfg, store, services)
        if c == "list":
            rows = await store.list(owner=args.owner, status=args.status, team=args.team, name=args.name,
                                    limit=args.limit + 1, offset=args.offset)
            if len(rows) > args.limit:  # (a script acting on "every key" must know it did not get them all)
                rows = rows[:args.limit]
                _fail(f"more keys match than --limit {args.limit}: the next ones with --offset "
                      f"{args.offset + args.limit} (a script that revokes or changes the keys it lists pages "
                      "from --offset 0 again, as the ones it changed no longer match)")
            if args.json:
                core_cli.print_json(rows)
            else:
                print(f"{'ID':<12}  {'STATUS':<8}  {'OWNER':<20}  {'TEAM':<16}  {'NAME':<20}  {'EXPIRES':<20}  "
                      "LAST USED")
                for r in rows:
                    owner, name = core_cli.terminal_text(r["owner"][:20]), core_cli.terminal_text(r["name"][:20])
                    team = core_cli.terminal_text((r["team"] or "-")[:16])
                    print(f"{r['id']:<12}  {r['status']:<8}  {owner:<20}  {team:<16}  {name:<20}  "
                          f"{_when(r['expires_at']):<20}  {_when(r['last_used_at'])}")
            return 0
        if c == "show":
            rec = await store.get(args.key_id)
            return _out(args, rec) if rec else _fail(f"no key with id {args.key_id!r}")
        if c == "update":
            ch = _changes(args)
            if not ch:
                return _fail("nothing to change (see gateway keys update --help)", code=2)
            problem = _invalid(UpdateKey, ch)
            if problem:
                return _fail(problem, code=2)  # (a value the command line got wrong: a usage error)
            if "scopes" in ch:
                # Only the list given on the command line is replaced; the other one is kept (as
                # stored when the change is written).
                given = {"paths": args.scope_path, "models": args.scope_model}
                ch["scopes"] = {k: v for k, v in ch["scopes"].items() if given[k] is not None}
            before: dict[str, Any] = {}
            rec = await store.update(args.key_id, ch, before)
            if rec is None:
                return _fail(f"no key with id {args.key_id!r}")
            services.events.emit("key.updated", actor="cli", **key_fields(rec), fields=sorted(ch),
                                 changes=changed_values(before, rec))
            _warn_unapplied(cfg, ch.get("limits") or {})
            return _out(args, rec)
        if c == "rotate":
            grace = kcfg.rotation_grace if args.grace is None else args.grace
            problem = _invalid(RotateKey, {"grace_seconds": grace})
            if problem:
                return _fail(problem.replace("grace_seconds", "--grace"), code=2)
            try:
                res = await store.rotate(args.key_id, pepper=kcfg.pepper, grace_seconds=grace)
            except KeyRevoked:
                return _fail("a revoked key cannot be rotated; create a new one")
            if res is None:
                return _fail(f"no key with id {args.key_id!r}")
            services.events.emit("key.rotated", actor="cli", **key_fields(res[0]), grace_seconds=grace)
            return _out(args, {**res[0], "key": res[1]}, secret=res[1], did="rotated")
        if c == "revoke" and args.key_id is None:
            return await _revoke_all(args, store, services)
        if c == "revoke":
            rec = await store.revoke(args.key_id)
            if rec is None:
                return _fail(f"no key with id {args.key_id!r}")
            services.events.emit("key.revoked", actor="cli", **key_fields(rec))
            return _out(args, rec)
        if c == "usage":
            today = dt.datetime.now(dt.timezone.utc).date()
            start, end = args.start or today.replace(day=1), args.end or today
            if end < start:  # the same rule as GET /keys/{id}/usage (400 "to is before from"): a usage error
                _fail(f"--to ({end}) is before --from ({start})")
                return 2
            if await store.get(args.key_id) is None:
                return _fail(f"no key with id {args.key_id!r}")
            u = await store.usage(args.key_id, start, end)
            if args.json:
                core_cli.print_json(u)
            else:
                print(f"{'DATE':<10}  {'REQUESTS':>10}  {'PROMPT':>12}  {'COMPLETION':>12}  {'TOTAL':>12}")
                for d in u["days"] + [{"date": "total", **u["totals"]}]:
                    print(f"{d['date']:<10}  {d['requests']:>10}  {d['prompt_tokens']:>12}  "
                          f"{d['completion_tokens']:>12}  {d['total_tokens']:>12}")
            return 0
        return _fail(f"unknown command {c}")
    finally:
        await services.close()  # flushes what the audit trail queued for the events above
        await services.db.close()


def read_import(args: argparse.Namespace) -> list[tuple[int, Any]] | str:
    """The rows of ``keys import``'s file as the admin API takes them (line number, CreateKey), or
    what is wrong with the file."""
    from . import bulk
    from .admin import CreateKey

    try:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
    except OSError as e:
        return f"cannot read {args.file}: {e.strerror or e}"
    try:
        text = bulk.decode(data)
        fmt = args.format or bulk.detect_format(args.file, text)
        rows, problems = bulk.read_csv(text, parse_when) if fmt == "csv" else bulk.read_jsonl(text)
    except bulk.BadFile as e:
        return f"{args.file}: {e}"
    seen: dict[str, int] = {}
    bodies: list[tuple[int, Any]] = []
    for n, body in rows:
        key, problem = _validated(CreateKey, body)
        if problem:
            problems.append(f"line {n}: {problem}")
            continue
        bodies.append((n, key))
        h = key.import_hash()
        if h is not None:
            if h in seen:
                problems.append(f"line {n}: imports the same key as line {seen[h]}")
            seen.setdefault(h, n)
    if problems:
        problems.sort(key=lambda p: int(p.split(":")[0].removeprefix("line ")))
        return f"{args.file}: nothing was created:\n{bulk.numbered(problems)}"
    if not bodies:
        return f"{args.file}: no keys in the file"
    return bodies


async def _import(args: argparse.Namespace, cfg: Any, kcfg: Any, store: Any, services: Any) -> int:
    from .store import KeyImported, KeysChanged, created_fields

    rows = args.rows
    items = [{"owner": b.owner, "name": b.name, "team": b.team, "metadata": b.metadata,
              "scopes": b.scopes.model_dump(), "limits": b.limits.model_dump(), "expires_at": b.expires_at,
              "import_hash": b.import_hash()} for _, b in rows]

    class DryRun(Exception):
        pass

    class NotPrinted(Exception):
        pass

    printed = False

    def hand_out(results: list[dict[str, Any]]) -> None:
        # Printed before anything is written: if the keys cannot be printed, none is created (a key
        # whose secret nobody saw would only be one more to revoke).
        nonlocal printed
        try:
            if sys.stdout is None:
                raise BrokenPipeError("no stdout")
            for (n, _), res in zip(rows, results):
                _print_imported(args, n, res)
            sys.stdout.flush()
        except (OSError, ValueError):
            raise NotPrinted() from None
        printed = True
        if args.dry_run:
            raise DryRun(sum("record" in r for r in results), sum("skipped" in r for r in results))

    try:
        results = await store.create_many(pepper=kcfg.pepper, items=items, skip_existing=args.skip_existing,
                                          before_commit=hand_out)
    except DryRun as e:
        print(f"gateway keys: dry run: {e.args[0]} would be created"
              + (f", {e.args[1]} skipped (exist already)" if e.args[1] else "") + "; nothing was written",
              file=sys.stderr)
        return 0
    except KeyImported as e:
        n = e.args[0] if e.args else None
        if isinstance(n, int):
            return _fail(f"line {rows[n][0]}: a key with this import hash exists already (--skip-existing leaves "
                         "such rows out); nothing was created")
        return _fail("a key of the file was imported by another import meanwhile: none of the keys printed above "
                     "was created; run the import again")
    except KeysChanged:
        return _fail("another import made keys of the file meanwhile: none of the keys printed above was created; "
                     "run the import again (--skip-existing then leaves those out)")
    except NotPrinted:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # (the interpreter flushes stdout at exit)
        return _fail("the keys could not be printed, so none was created")
    except BaseException:
        if printed:  # (the database refused the write: what was printed is no key)
            _fail("none of the keys printed above was created")
        raise
    made = [r["record"] for r in results if "record" in r]
    for i, rec in enumerate(made, 1):
        services.events.emit("key.created", actor="cli", **created_fields(rec))
        if i % EVENTS_AT_ONCE == 0:
            # (the audit trail's queue holds 10,000 events: past that, events of a large import
            # were dropped, and the command exited 1 though every key was made)
            await services.events.settle(60)
    skipped = len(results) - len(made)
    print(f"gateway keys: {len(made)} created" + (f", {skipped} skipped (exist already)" if skipped else ""),
          file=sys.stderr)
    if any(rec["imported"] for rec in made) and not kcfg.imported_keys:
        print("gateway keys: warning: keys imported, but key_auth.imported_keys is false in this config: the "
              "imported tokens are refused until it is set to true", file=sys.stderr)
    limits: dict[str, Any] = {}
    for item, res in zip(items, results):
        if "record" in res:
            limits.update({f: v for f, v in item["limits"].items() if v is not None})
    _warn_unapplied(cfg, limits, whose="the imported keys' limits", dash="")
    return 0


#: Events ``keys import`` hands to the audit trail before it waits for them to be written.
EVENTS_AT_ONCE = 1000


async def _revoke_all(args: argparse.Namespace, store: Any, services: Any) -> int:
    """``keys revoke --owner X / --team T``: every key not yet revoked, in one statement."""
    from .store import key_fields

    which = store.whose(args.owner, args.team)
    recs = await store.revoke_all(owner=args.owner, team=args.team, dry_run=args.dry_run)
    if not recs:  # (a typo in a name must not look like an offboarding done)
        return _fail(f"no key of {which} to revoke (none left, or a typo?)")
    if not args.dry_run:
        for rec in recs:
            services.events.emit("key.revoked", actor="cli", **key_fields(rec))
    if args.json:
        core_cli.print_json(recs)
    else:
        for rec in recs:
            name = core_cli.terminal_text(rec["name"])
            print(f"{rec['id']}  {core_cli.terminal_text(rec['owner'])}  {name}")
    print(f"gateway keys: {len(recs)} key(s) of {core_cli.terminal_text(which)} "
          + ("would be revoked (dry run)" if args.dry_run else "revoked"), file=sys.stderr)
    return 0


def _print_imported(args: argparse.Namespace, n: int, res: dict[str, Any]) -> None:
    """One line of ``keys import``'s output: the key made from line ``n`` (its secret, once), or the
    key that made the line skipped."""
    if "skipped" in res:
        if args.json:
            print(json.dumps({"line": n, "skipped": True, "id": res["skipped"]}))
        else:
            print(f"line {n}: exists        {res['skipped']}")
        return
    rec = res["record"]
    if args.json:
        out = {"line": n, "id": None if args.dry_run else rec["id"], "owner": rec["owner"], "name": rec["name"],
               "team": rec["team"], "imported": rec["imported"], **({} if args.dry_run else {"key": res["key"]})}
        print(json.dumps(out))
        return
    label = core_cli.terminal_text(f"{rec['owner']}/{rec['name']}" if rec["name"] else rec["owner"])
    if args.dry_run:
        print(f"line {n}: would create  {label}")
    else:
        print(f"line {n}: created       {rec['id']}  {label}  {res['key']}")


def _warn_unapplied(cfg: Any, limits: dict[str, Any], whose: str = "the key's limits", dash: str = "--") -> None:
    """One line on stderr when limits just set are enforced by nothing in this config (the exit code
    stays: the key and its limits are stored, and apply once rate_limit reads them)."""
    from . import limits_not_applied

    given = [f"{dash}{f.replace('_', '-') if dash else f}" for f, v in limits.items() if v is not None]
    why = limits_not_applied(cfg) if given else None
    if why:
        _fail(f"warning: {whose} ({', '.join(given)}) are stored but not applied by this config: {why} "
              "(rate_limit applies them with key_overrides: true)")


def _validated(model: Any, data: dict[str, Any]) -> tuple[Any, str | None]:
    """The values as the admin API takes them (one rule set for both), or None and the first
    problem it would report."""
    from pydantic import ValidationError

    from .admin import validation_message
    try:
        return model.model_validate(data), None
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "unknown field" if first["type"] == "extra_forbidden" else validation_message(first)
        return None, f"{loc}: {msg}" if loc else msg


def _invalid(model: Any, data: dict[str, Any]) -> str | None:
    """The first problem the admin API would report for the same values, or None."""
    return _validated(model, data)[1]


def _out(args: argparse.Namespace, rec: dict[str, Any], secret: str | None = None, did: str = "created") -> int:
    if secret:
        # The secret exists nowhere else: output that cannot be written (a closed pipe, a full
        # disk, no stdout at all) is an error that says which key to revoke, never a quiet exit 0.
        try:
            if sys.stdout is None:
                raise BrokenPipeError("no stdout")
            if args.json:
                core_cli.print_json(rec)
            else:
                print(f"API key (shown once, store it now): {secret}")
            sys.stdout.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # (the interpreter flushes stdout at exit)
            kid = rec.get("id")
            with contextlib.suppress(OSError, ValueError):
                print(f"gateway keys: key {kid} was {did} but its {'new ' if did == 'rotated' else ''}secret could "
                      f"not be printed; revoke it with `gateway keys revoke {kid}`", file=sys.stderr)
            return 1
        if args.json:
            return 0
    elif args.json:
        core_cli.print_json(rec)
        return 0
    for k, v in rec.items():
        if k == "key":
            continue
        text = json.dumps(v) if isinstance(v, (dict, list)) else ('-' if v is None else str(v))
        print(f"{k:<28} {core_cli.terminal_text(text)}")
    return 0


def _when(iso: str | None) -> str:
    """A stored time to the second, for the table (2027-02-25T08:27:03Z)."""
    if not iso:
        return "-"
    t = dt.datetime.fromisoformat(iso)
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _fail(msg: str, code: int = 1) -> int:
    print(f"gateway keys: {msg}", file=sys.stderr)
    return code
