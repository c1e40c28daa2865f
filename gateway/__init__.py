"""gateway: API keys, rate limits, conversation history, audit and traces in front of an
OpenAI-compatible chat backend."""

__version__ = "0.1.0"

#: Signals received before the gateway's own handlers were in (see run); serve() acts on them.
early_signals: list[int] = []


def run() -> int:
    """The ``gateway`` command. Its imports and config take a moment (seconds on a busy machine)
    before the command's own signal handlers are in; meanwhile a SIGHUP (a deploy tool reloading
    right after a start) would kill it (exit 129, no log line), and a SIGTERM sent to it as PID 1
    in a container would do nothing (PID 1 has no default action), leaving the stop to SIGKILL.
    So for ``serve`` and ``demo`` they are noted at once (an exception raised from a handler
    can be lost in the middle of an import) and acted on as soon as the gateway can: a SIGTERM or
    SIGINT ends the start-up (exit 0), a SIGHUP reloads once started. Other commands set their
    handlers as soon as their arguments are read."""
    import signal
    import sys

    imported = [False]

    def noted(signum: int, _frame: object) -> None:
        early_signals.append(signum)
        if imported[0] and signum != signal.SIGHUP:
            # (past the imports: a config read that blocks, `-c /dev/fd/N` whose writer has not
            # written, ends here; serve() takes over with its own handlers)
            raise SystemExit(0)

    if _command(sys.argv[1:]) in ("serve", "demo"):
        try:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, noted)
        except (ValueError, AttributeError):  # (not the main thread; no SIGHUP on this platform)
            pass
    from .cli import main

    if stop_requested():
        return 0
    imported[0] = True
    return main()


def stop_requested() -> bool:
    """A SIGTERM or SIGINT came before the gateway's own handlers were in."""
    import signal

    return signal.SIGTERM in early_signals or signal.SIGINT in early_signals


def _command(args: list[str]) -> str | None:
    """The command named on a command line (``-c FILE`` may come first)."""
    it = iter(args)
    for a in it:
        if a in ("-c", "--config"):
            next(it, None)
        elif not a.startswith("-"):
            return a
    return None
