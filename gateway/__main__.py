from . import run

raise SystemExit(run())
