"""``gateway`` command line: serve, check, db, demo, and the subcommands plugins add
(``keys``, ``audit``, ``conversations`` ...)."""
from __future__ import annotations

import argparse
import asyncio
import json
import contextlib
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Callable, Any

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.redact import mask_params

def _packaged_default() -> Path:
    import gateway.config as c

    return Path(c.__file__).parent / "profiles" / "default.yaml"


def config_path(args: argparse.Namespace) -> str:
    """``-c``, else $GATEWAY_CONFIG, else ./gateway.yaml, else the packaged default profile (the
    same file ``gateway demo`` runs, so ops commands work where the demo ran)."""
    explicit = getattr(args, "config", None) or os.environ.get("GATEWAY_CONFIG")
    if explicit:
        return explicit
    if Path("gateway.yaml").exists():
        return "gateway.yaml"
    return str(_packaged_default())


def load(args: argparse.Namespace, env: dict[str, str] | None = None, *, serving: bool = False) -> GatewayConfig:
    """Load the config named by ``-c`` (or exit 2 with the problems, one per line).

    Commands that run no listener (keys, audit, conversations, db) do not need the admin token:
    if it is unset, a throwaway value satisfies the config so ops can use them with just the
    database settings."""
    if not serving:
        env = dict(os.environ if env is None else env)
        if not env.get("GATEWAY_ADMIN_TOKEN"):
            env["GATEWAY_ADMIN_TOKEN"] = secrets.token_urlsafe(24)
    try:
        return load_config(config_path(args), env=env)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(2) from None


def open_database(cfg: GatewayConfig, migrate: bool = True) -> Any:
    """For CLI commands that work on the configured database directly (no admin listener needed)."""
    from .db import Database

    d = cfg.database
    db = Database(d.url, busy_timeout_ms=d.busy_timeout_ms, pool_size=2)
    return db


#: The largest count a command line option takes (``--limit``, ``-n``) when it names none of its
#: own: more than any listing holds, and small enough for every database's integer (a bigger one
#: failed inside the driver with an OverflowError instead of a usage error).
MAX_WHOLE = 2**31 - 1


def whole_number(lo: int = 1, hi: int | None = None) -> "Callable[[str], int]":
    """An argparse type: a whole number in lo..hi (hi defaults to MAX_WHOLE)."""
    top = MAX_WHOLE if hi is None else hi

    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:  # (also a number of more digits than int() converts)
            raise argparse.ArgumentTypeError(f"not a whole number: {v!r}") from None
        if not lo <= n <= top:
            raise argparse.ArgumentTypeError(f"must be {lo}..{top}: {v!r}")
        return n
    return parse


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a CLI command (systemd stopping it, `timeout`, a closed terminal):
    raised like Ctrl-C's KeyboardInterrupt, so the same cleanup runs (an export cut short is
    audited, its temporary file removed); the exit code is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def atomic_output(path: str, encoding: str) -> Any:
    """A file to write ``path``'s new content to: a temporary file next to it that replaces it
    only when the block ends without an exception, so an export cut short (Ctrl-C, SIGTERM, a
    full disk) never replaces a complete earlier file with a partial one. Not a regular file
    (/dev/stdout, a FIFO): written directly, as there is nothing to replace."""
    import stat
    import tempfile

    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(path, "w", encoding=encoding) as f:
            yield f
        return
    folder, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as e:  # (named as given: the temporary file's name would say nothing)
        raise type(e)(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        # the existing file's mode, else its owner's only (what the gateway writes holds records
        # of who asked what: see db.create_private)
        os.chmod(tmp, stat.S_IMODE(st.st_mode) if st is not None else 0o600)
        with open(fd, "w", encoding=encoding) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class NoDatabase(Exception):
    """The configured SQLite file does not exist (a command that only reads or changes data)."""


def check_database_exists(cfg: GatewayConfig) -> None:
    """Raise NoDatabase when the configured SQLite file does not exist (opening it would create an
    empty one, and a mistyped path must not look like an empty, intact database)."""
    from sqlalchemy.engine import make_url

    if cfg.database.url.startswith("sqlite"):
        name = make_url(cfg.database.url).database
        if name and name != ":memory:" and not name.startswith("file:") and not Path(name).exists():
            raise NoDatabase(f"the database file {name} does not exist (check database.url; the gateway, "
                             "`gateway db upgrade` or `gateway keys create` make it)")


#: The Services CLI commands opened in this run (main() reads what their writers did not write).
_OPENED: list[Any] = []

_NOT_PRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def os_identity() -> dict[str, str]:
    """Who runs a CLI command, for its audit events (their actor is ``cli``): ``os_user``, the
    login name (``getpass.getuser()``: $LOGNAME, $USER ..., else the account of the user id), and
    under sudo ``sudo_user``, the one who ran sudo. Informative, not proof: the environment can
    say anything. At most 64 characters each, control characters replaced."""
    import getpass

    def clean(v: str) -> str:
        return _NOT_PRINTABLE.sub("\ufffd", v)[:64]

    try:
        user = getpass.getuser()
    except (KeyError, OSError, ImportError):  # (a user id without an account: a container's)
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else ""
    out = {"os_user": clean(user)} if user else {}
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        out["sudo_user"] = clean(sudo)
    return out


async def cli_services(cfg: GatewayConfig, create: bool = False, writes: bool = True,
                       records: bool | None = None) -> Any:
    """Database + Services for a CLI command. Unless ``create``, a SQLite file that does not exist
    is an error (a mistyped path must not show an empty, intact-looking database). A new, empty
    database is given its schema when the config says so and the command ``writes`` (`keys create`
    makes the first key). A schema behind this version is never migrated here: a command is no
    time to rebuild a table under gateways still serving the file (or lock an older one out); it
    asks for `gateway db upgrade`. ``records`` (default: ``writes``): the command records its
    action in the audit trail."""
    from .services import Events, Services

    if not create:
        check_database_exists(cfg)
    else:
        from .db import DatabaseError, sqlite_place_problem

        problem = sqlite_place_problem(cfg.database.url)
        if problem:
            raise DatabaseError(problem)
    db = open_database(cfg)
    auto = cfg.database.auto_migrate
    if auto is None:
        auto = db.is_sqlite
    new_database = False
    try:
        pending = await db.pending_migrations()
        empty = bool(pending) and not await db.applied_revisions()
        if empty and auto and writes:
            await db.upgrade()  # (a new database being made is what `keys create` is documented to do)
            new_database, pending = True, []
    except Exception:
        await db.close()
        raise
    if pending:
        await db.close()
        raise NoDatabase(("the database has no schema yet" if empty else
                          "the database schema is behind this version of the gateway") + ": run `gateway db upgrade "
                         "-c <config>` first (or start this version's `gateway serve`"
                         + (", which migrates at start)" if auto else " with database.auto_migrate: true)")
                         + ("" if empty else "; see Upgrading in docs/configuration.md for gateways of older "
                                             "versions still running on it"))
    services = Services(cfg, db, owns_db=True, events=Events(stamp=os_identity()))
    _OPENED.append(services)
    services.new_database = new_database  # (the audit trail's first chain key may come with it)
    if new_database and db.file:
        # (a relative database.url run from another directory makes a database of its own: a key
        # made there would be unknown to the gateway serving; said, so it is not a mystery 401)
        print(f"created a new database: {db.file}", file=sys.stderr)
    # Plugins that record the events CLI commands emit (the audit trail) attach to the bus here;
    # what they queue is flushed by services.close().
    from .plugin import registry

    for spec in cfg.plugins:
        attach = getattr(registry.get(spec.name), "cli_attach", None)
        if spec.enabled and attach is not None:
            await attach(spec.validated, services, records=writes if records is None else records)
    return services


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


_UNSAFE_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_TEXT_ESCAPES = {"\n": "\\n", "\r": "\\r"}


def terminal_text(s: str) -> str:
    """``s`` on one line, shown by a terminal as it is: line breaks, escape sequences and other
    control characters, bidirectional overrides and lone surrogates are written as escapes
    (``\\n``, ``\\x1b``, ``\\u202e``), so stored text cannot recolour the terminal, forge
    lines of the listing, or fail to print."""
    return _UNSAFE_TEXT.sub(_text_escape, s)


def _text_escape(m: "re.Match[str]") -> str:
    ch = m.group()
    return _TEXT_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="path to gateway.yaml (default: $GATEWAY_CONFIG, else ./gateway.yaml, else the packaged "
                                             "default profile)")


# -- commands ---------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from .app import serve
    from .logs import setup_logging

    cfg = load(args, serving=True)
    setup_logging(cfg.logging.level, cfg.logging.format)
    return asyncio.run(serve(cfg))


class _OFF:  # (a route that does not mention a plugin leaves it as the plugins list has it)
    enabled = None


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load(args, serving=True)
    enabled = [p.name if p.enabled else f"{p.name} (on some routes)" for p in cfg.plugins
               if p.enabled or any((r.plugins.get(p.name) or _OFF).enabled for r in cfg.routes)]
    print(f"{config_path(args)}: OK ({len(cfg.plugins)} plugin(s): {', '.join(enabled) or 'none'}; "
          f"{len(cfg.routes)} route override(s); upstream {redact_url(str(cfg.upstream.url))})")
    for w in cfg.warnings():
        print(f"warning: {w}", file=sys.stderr)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from .db import upgrade_sync

    cfg = load(args)
    if args.db_command == "backup":
        return _backup(cfg, args.target)
    if args.db_command == "copy":
        return _copy(cfg, args.to)
    if args.db_command == "upgrade":
        from .db import DatabaseError, sqlite_place_problem

        problem = sqlite_place_problem(cfg.database.url)
        if problem:
            raise DatabaseError(problem)
        # First what the database holds (an unreachable one is said to be so; another
        # application's revisions are an error): a schema a newer gateway migrated further is
        # not this version's to migrate, and Alembic would fail on the revisions it cannot find.
        newer = asyncio.run(_newer(cfg))
        if newer:
            print(f"database already migrated further by a newer gateway ({', '.join(sorted(newer))}): nothing to do")
            return 0
        heads = upgrade_sync(cfg.database.url)
        print(f"database at head: {', '.join(heads) or '(no migrations)'}")
    else:
        check_database_exists(cfg)  # `current` only reads: it must not create the file
        for line in asyncio.run(_current(cfg)):
            print(line)
    return 0


def _backup(cfg: GatewayConfig, target: str) -> int:
    """A consistent copy of the SQLite file while gateways run on it (VACUUM INTO: one read
    transaction, whatever the write-ahead log holds; compact). A plain copy of the file misses what
    is still in its -wal file (keys revoked or made lately, quota usage, recent events)."""
    import sqlite3
    from urllib.parse import quote

    from sqlalchemy.engine import make_url

    from .db import create_private, sqlite_hint

    if not cfg.database.url.startswith("sqlite"):
        print("gateway db backup: for a SQLite database; back up PostgreSQL with its own tools (pg_dump)",
              file=sys.stderr)
        return 2
    check_database_exists(cfg)
    out = Path(target)
    # made first, its owner's only (the copy holds what the database does), and never over a file
    if out.is_symlink() or not create_private(str(out)):
        print(f"gateway db backup: {target} exists or cannot be made; name a new file in a folder that can "
              "be written", file=sys.stderr)
        return 2
    name = make_url(cfg.database.url).database or ""
    # (quoted: a '#', '?' or '%' in the path would end it or be decoded in the URI)
    src = sqlite3.connect(f"file:{quote(str(Path(name).resolve()))}?mode=ro", uri=True, timeout=30)
    try:
        src.execute("VACUUM INTO ?", (str(out),))
    except sqlite3.Error as e:
        out.unlink(missing_ok=True)
        print(f"gateway db backup: {e}{sqlite_hint(e)}", file=sys.stderr)
        return 1
    finally:
        src.close()
    print(f"backup written: {target} ({out.stat().st_size} bytes). To restore it: stop the gateway, delete "
          f"{name}-wal and {name}-shm, copy the backup to {name}, start the gateway.")
    return 0


def _copy(cfg: GatewayConfig, target: str) -> int:
    """``db copy --to URL``: the target URL is checked as ``database.url`` is (never shown whole)."""
    from gateway.config.model import DatabaseConfig

    from .db import shown_url
    from .dbcopy import copy_database

    try:
        DatabaseConfig(url=target)
    except Exception as e:  # (pydantic's message names the problem, never the URL's password)
        errors = getattr(e, "errors", None)
        why = errors()[0]["msg"].removeprefix("Value error, ") if callable(errors) else type(e).__name__
        print(f"gateway db copy: --to: {why}", file=sys.stderr)
        return 2
    check_database_exists(cfg)
    import signal

    def cut(signum: int, _frame: Any) -> None:
        # The copy writes in one transaction the target rolls back when the connection drops, and
        # only reads the source: nothing to clean up. A graceful cancel could wait for ever on a
        # driver mid-statement (a rollback after half an INSERT), so the process ends here.
        with contextlib.suppress(Exception):
            print("gateway db copy: interrupted; nothing was committed to the target (run it again)",
                  file=sys.stderr, flush=True)
        os._exit(128 + signum)

    before = {sig: signal.signal(sig, cut) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        counts = asyncio.run(copy_database(cfg.database.url, target))
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    print(f"copied {sum(counts.values())} row(s) of {len(counts)} table(s) into {shown_url(target)}; point "
          "database.url at it (and stop writing to the old one)")
    return 0


async def _newer(cfg: GatewayConfig) -> set[str]:
    """The applied revisions of a newer gateway (raises for another application's)."""
    from .db import newer_revisions, revisions_sync

    db = open_database(cfg)
    try:
        applied = await db.applied_revisions()
    finally:
        await db.close()
    return newer_revisions(applied, revisions_sync(cfg.database.url)[1], cfg.database.url)


async def _current(cfg: GatewayConfig) -> list[str]:
    """The applied revisions, ``(head)`` marked; a revision this version does not know (a newer
    gateway migrated the database) is said to be one rather than failing."""
    from .db import current_sync, newer_revisions, revisions_sync

    db = open_database(cfg)
    try:
        applied = await db.applied_revisions()
    finally:
        await db.close()
    heads, known = revisions_sync(cfg.database.url)
    pending = sorted(set(heads) - applied)
    said = [f"pending: {', '.join(pending)} (run `gateway db upgrade`)"] if pending else []
    if not applied:
        return ["(no migrations applied)"] + said
    newer_revisions(applied, known, cfg.database.url)  # (another application's: an error)
    if applied <= known:
        return sorted(await asyncio.to_thread(current_sync, cfg.database.url)) + said
    return [r if r in known else f"{r} (not known to this version: a newer gateway applied it)" for r in sorted(applied)]


def cmd_demo(args: argparse.Namespace) -> int:
    from .app import serve
    from .demo import start_demo_upstream
    from .logs import setup_logging

    # The packaged default stands in only for a config nobody named: a -c or $GATEWAY_CONFIG that
    # cannot be read is an error (exit 2), not a silent switch to another file.
    path = Path(config_path(args))
    if not path.exists() and not (getattr(args, "config", None) or os.environ.get("GATEWAY_CONFIG")):
        path = _packaged_default()
    token = os.environ.get("GATEWAY_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    # The demo's values go into the process environment (not just a copy of it): SIGHUP and
    # POST /config/reload re-read the file with os.environ and must see the same token and upstream.
    os.environ["GATEWAY_ADMIN_TOKEN"] = token
    # A demo (with a key it prints) answers on loopback unless told otherwise.
    os.environ.setdefault("GATEWAY_HOST", "127.0.0.1")

    async def main() -> int:
        runner, port = await start_demo_upstream("127.0.0.1", args.upstream_port)
        os.environ["UPSTREAM_URL"] = f"http://127.0.0.1:{port}"
        try:
            cfg = load_config(path)
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return 2
        setup_logging(cfg.logging.level, cfg.logging.format)

        async def ready(gw: Any) -> None:
            found: dict[str, str] = {}
            for p in gw.runtime.instances:
                found.update(await p.demo_setup())
            # (the token the admin listener takes: the config's own, when it writes one itself)
            print(demo_instructions(gw, found, gw.cfg.admin.token or token), flush=True)

        try:
            return await serve(cfg, ready=ready)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def url_host(host: str) -> str:
    """``host`` as the host part of a URL a client can call: a wildcard address as the loopback
    address it also answers on (``::`` binds IPv6 only, so ``[::1]``), an IPv6 address in
    brackets (``http://::1:8080`` is not a URL curl takes)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def demo_instructions(gw: Any, found: dict[str, str], admin_token: str) -> str:
    base = f"http://{url_host(gw.cfg.server.host)}:{gw.public_port}"
    key = found.get("api_key")
    auth = f" \\\n  -H 'Authorization: Bearer {key}'" if key else ""
    lines = [
        "",
        "gateway demo is running",
        f"  public listener : {base}  ->  demo backend {gw.cfg.upstream.url}",
    ]
    if gw.admin_port:
        lines.append(f"  admin listener  : http://{url_host(gw.cfg.admin.host)}:{gw.admin_port}  (admin token: {admin_token})")
    if key:
        lines.append(f"  demo API key    : {key}   (shown once; only its hash is stored)")
    for k, v in found.items():
        if k != "api_key":
            lines.append(f"  {k:<16}: {v}")
    lines += [
        "",
        "Try it with curl:",
        f"  curl -s {base}/v1/chat/completions{auth} \\\n  -H 'Content-Type: application/json' \\\n"
        "  -d '{\"model\": \"demo-chat\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'",
        "",
        "Or with the OpenAI Python SDK (pip install openai):",
        "  python - <<'PY'",
        "from openai import OpenAI",
        f"client = OpenAI(base_url=\"{base}/v1\", api_key=\"{key or 'unused'}\")",
        "r = client.chat.completions.create(model=\"demo-chat\", messages=[{\"role\": \"user\", \"content\": \"Hello!\"}])",
        "print(r.choices[0].message.content)",
        "for chunk in client.chat.completions.create(model=\"demo-chat\", stream=True,",
        "        messages=[{\"role\": \"user\", \"content\": \"Stream please\"}]):",
        "    print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True) if chunk.choices else None",
        "print()",
        "PY",
    ]
    if gw.admin_port:  # the names the README's tour uses
        admin = f"http://{url_host(gw.cfg.admin.host)}:{gw.admin_port}"
        lines += ["", "For the README's tour, in another shell:",
                  f"  export GW={base} ADMIN={admin} TOKEN={admin_token}" + (f" KEY={key}" if key else "")]
    lines += [
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .plugin import registry

    parser = argparse.ArgumentParser(prog="gateway", description="A gateway for OpenAI-compatible chat backends.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gateway")
    add_config_arg(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check", help="validate the config and exit (non-zero on error)")
    add_config_arg(p)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("db", help="database schema, a consistent copy of a SQLite file (backup), a copy into "
                                   "another database (copy)")
    dsub = p.add_subparsers(dest="db_command", required=True)
    for name, text in (("upgrade", "apply the migrations the database has not had"),
                       ("current", "the applied migrations"),
                       ("backup", "write a consistent copy of the SQLite file, gateways running or not"),
                       ("copy", "copy every table into another, empty database (SQLite to PostgreSQL)")):
        d = dsub.add_parser(name, help=text)
        add_config_arg(d)
        if name == "backup":
            d.add_argument("target", help="the file to write (must not exist)")
        if name == "copy":
            d.add_argument("--to", dest="to", required=True, metavar="URL",
                           help="the target database's URL (empty; it is given the schema)")
    p.set_defaults(func=cmd_db)
    p = sub.add_parser("demo", help="run the gateway with a built-in demo backend and print a first call")
    add_config_arg(p)
    p.add_argument("--upstream-port", type=int, default=0, help="port for the demo backend (default: any free)")
    p.set_defaults(func=cmd_demo)
    for name in sorted(registry.names()):
        cls = registry.get(name)
        if cls is not None:
            try:
                cls.add_cli(sub)
            except Exception as e:  # one broken plugin must not take the whole command line down
                print(f"warning: plugin {name!r} could not add its commands: {type(e).__name__}: {e}",
                      file=sys.stderr)
    return parser


_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]{0,31}://[^/@\s:]*:)[^/\s]*@")


def mask_secret_params(text: str) -> str:
    """``text`` with the values of secret query parameters (``?password=...``, ``?api-key=...``,
    ``?api%5Fkey=...``: see :mod:`gateway.redact`) masked."""
    return mask_params(text)


def redact_url(url: str) -> str:
    """``url`` (or any text containing URLs) with the password part of ``user:password@`` and the
    values of password / token / secret parameters masked."""
    return mask_secret_params(_URL_USERINFO.sub(r"\1***@", url))


#: Commands that run listeners and handle their own signals (a graceful drain on SIGTERM, a
#: config reload on SIGHUP).
_SERVING = ("serve", "demo")


class _QuietStream:
    """stderr for a CLI command: a message that cannot be written (``2>&1 | head`` after the
    reader left) is lost, but does not turn the command's own exit code into another one."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        try:
            return self._stream.write(s)
        except (OSError, ValueError):
            return len(s)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _discard_stdout() -> None:
    """After a write to stdout failed: nothing more is written there (the interpreter's flush at
    exit would fail again, and print a traceback)."""
    with contextlib.suppress(OSError):
        sys.stdout = open(os.devnull, "w")


_received: list[int] = []  # SIGTERM / SIGHUP received during the command


def _on_signal(signum: int, frame: Any) -> None:
    """SIGTERM / SIGHUP as Ctrl-C. Inside asyncio.run, like asyncio's own SIGINT handling: the
    main task is cancelled (its ``finally`` blocks run and can still await: an export's audit
    event is flushed) and asyncio.run raises KeyboardInterrupt; a KeyboardInterrupt raised
    in the middle of the event loop would instead cancel every task at once, the audit writer's
    too. Outside an event loop: raised here."""
    import functools
    import signal

    _received.append(signum)
    h = signal.getsignal(signal.SIGINT)
    if isinstance(h, functools.partial) and isinstance(getattr(h.func, "__self__", None), asyncio.Runner):
        h(signal.SIGINT, frame)  # (a second signal raises KeyboardInterrupt there)
        return
    raise Interrupted(signum)


def config_last(argv: list[str]) -> list[str]:
    """``argv`` with its ``-c FILE`` options (``-cFILE``, ``--config FILE``, ``--config=FILE``) moved
    to the end, in order, where the command they name reads them: ``gateway -c g.yaml check`` and
    ``gateway keys -c g.yaml list`` then work like ``gateway keys list -c g.yaml`` (the last one
    given still wins)."""
    rest: list[str] = []
    moved: list[str] = []
    tail: list[str] = []  # from a "--" on: arguments, not options
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            tail = argv[i:]
            break
        if a in ("-c", "--config") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            moved += argv[i:i + 2]
            i += 2
            continue
        if a.startswith("--config=") or (a.startswith("-c") and len(a) > 2 and not a.startswith("--")):
            moved.append(a)
        else:
            rest.append(a)
        i += 1
    return rest + moved + tail


def _utf8_output() -> None:
    """Names, owners and message text are Unicode: a command's output is UTF-8 even where the
    locale says ASCII (``PYTHONIOENCODING=ascii``, or ``PYTHONUTF8=0`` with ``LC_ALL=C``), rather
    than failing on the first non-ASCII character."""
    import codecs

    for stream in (sys.stdout, sys.stderr):
        enc = getattr(stream, "encoding", None)
        reconfigure = getattr(stream, "reconfigure", None)
        if not enc or reconfigure is None:
            continue
        try:
            if codecs.lookup(enc).name == "ascii":
                reconfigure(encoding="utf-8", errors=stream.errors)
            elif stream.errors == "strict":  # (another encoding asked for is kept: what it cannot hold is escaped)
                reconfigure(errors="backslashreplace")
        except (LookupError, ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(config_last(sys.argv[1:] if argv is None else list(argv)))
    serving = args.command in _SERVING
    if not serving and sys.stdout is None and not getattr(args, "output", None):
        # (started with stdout closed, `>&-`: print() would drop everything and exit 0)
        if sys.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                print(f"gateway {args.command}: error: stdout is closed", file=sys.stderr)
        return 1
    import signal
    import threading

    handlers: dict[int, Any] = {}
    if not serving and threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None:
                handlers[sig] = signal.signal(sig, _on_signal)
    if not serving:
        _utf8_output()
    real_stderr = sys.stderr
    if not serving and real_stderr is not None:
        sys.stderr = _QuietStream(real_stderr)
    _received.clear()
    _OPENED.clear()
    try:
        try:
            rc = args.func(args)
        except KeyboardInterrupt:  # Ctrl-C 130, SIGTERM 143, SIGHUP 129
            rc = 128 + (_received[0] if _received else signal.SIGINT)
        except BrokenPipeError:
            # The output went to `head` or a pager that stopped reading before the command was
            # done: not an error (a command that failed says so with its own exit code first).
            _discard_stdout()
            rc = 0
        except Exception as e:  # one line, no traceback (an unreachable database, a read-only file ...)
            from .db import DatabaseError, sqlite_hint

            first = (str(e).strip().splitlines() or [""])[0][:300] + sqlite_hint(e)
            if "database is locked" in first:
                first += (" (another process held the SQLite file's write lock longer than "
                          "database.busy_timeout_ms: try again, or raise it)")
            # The gateway's own database errors say what failed (and which database) themselves.
            kind = "" if isinstance(e, DatabaseError) and first else f"{type(e).__name__}"
            print(f"gateway {args.command}: error: {kind}" + (": " if kind and first else "")
                  + (redact_url(first) if first else ""), file=sys.stderr)
            rc = 1
        lost = {name: n for s in _OPENED for name, n in s.unwritten.items()}
        if lost:
            # The command did what it did (a key revoked stays revoked), but the audit trail does
            # not show it: a script must not take that for a success.
            what = ", ".join(f"{n} by {name}" for name, n in sorted(lost.items()))
            print(f"gateway {args.command}: error: records of this command were not written ({what}; "
                  "the lines above say why): its changes were made, the audit trail does not show them",
                  file=sys.stderr)
            rc = rc or 1
        _OPENED.clear()
        # What is still buffered is written now, where a failure can keep the exit code: a closed
        # pipe leaves it as the command said, a full disk makes a success an error.
        try:
            if not serving and sys.stdout is not None:
                sys.stdout.flush()
        except BrokenPipeError:
            _discard_stdout()
        except (OSError, ValueError) as e:
            _discard_stdout()
            print(f"gateway {args.command}: error: cannot write the output: {e}", file=sys.stderr)
            rc = rc or 1
    finally:
        if isinstance(sys.stderr, _QuietStream):
            sys.stderr = real_stderr
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
