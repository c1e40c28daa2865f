"""Reading a file of keys to create (``gateway keys import FILE``): JSON Lines or CSV.

JSON Lines: one object per line, the body ``POST /keys`` takes (owner, name, team, metadata, scopes,
limits, expires_at, import_sha256, import_key). CSV: a header row, then one key per row; the
columns (case and ``-``/``_`` do not matter):

- ``owner`` (required), ``name``, ``team``;
- ``rpm``, ``tpm``, ``daily_tokens``, ``monthly_tokens``, ``max_parallel`` (whole numbers);
- ``expires_at`` (or ``expires``): what ``--expires`` takes (``90d``, ``2027-01-01``, an ISO time,
  ``never``);
- ``scope_paths``, ``scope_models``: entries separated by blanks, commas or semicolons;
- ``metadata`` (a JSON object) and/or ``metadata.<name>`` (or ``meta.<name>``) columns, one
  metadata entry each;
- ``import_sha256`` or ``import_key``: a key issued elsewhere.

An empty cell is "not set"; columns with no header (a spreadsheet's trailing empty columns) are
ignored while their cells are empty. A header without a comma but with semicolons (or tabs)
makes those the separator, as spreadsheets in some locales write CSV. Every row is checked by the admin API's rules before anything is
written; a problem is reported with its line number and never repeats a value that may be secret.
"""
from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

from .store import LIMIT_FIELDS

#: What separates a scope cell's entries (a spreadsheet writes lists with commas or semicolons).
_ENTRIES = re.compile(r"[\s,;]+")
#: Problems listed before "... and N more".
MAX_PROBLEMS = 20
_PLAIN = ("owner", "name", "team", "import_sha256", "import_key")


class BadFile(Exception):
    """The file as a whole cannot be read (no header, not UTF-8 ...)."""


def detect_format(path: str, text: str) -> str:
    """``csv`` or ``jsonl``, from the file's extension, else from its first character."""
    low = path.lower()
    if low.endswith(".csv"):
        return "csv"
    if low.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # (a spreadsheet's CSV often starts with a byte order mark)
    except UnicodeDecodeError as e:
        raise BadFile(f"not UTF-8 text (byte {e.start})") from None


def read_jsonl(text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, body) of each non-blank line, and the problems found."""
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    # (split on line feeds only: str.splitlines also splits on U+2028, U+0085 ..., which JSON
    # holds as they are in strings)
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            body = _json(line)
        except (ValueError, RecursionError):
            problems.append(f"line {n}: not JSON (one object per line)")  # (the line may hold a key)
            continue
        if not isinstance(body, dict):
            problems.append(f"line {n}: not a JSON object")
            continue
        rows.append((n, body))
    return rows, problems


def _column(name: str) -> str:
    name = name.strip()
    head, dot, rest = name.partition(".")
    if dot and head.lower() in ("metadata", "meta"):
        return f"{head.lower()}.{rest}"  # (a metadata entry's name is kept as written)
    return name.lower().replace("-", "_")


def read_csv(text: str, parse_when: Any) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, body) of each row, and the problems found. ``parse_when``: the CLI's parser
    of ``--expires`` values."""
    first = text.split("\n", 1)[0]
    sep = ";" if "," not in first and ";" in first else "\t" if "," not in first and "\t" in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    try:
        header = next(reader)
    except StopIteration:
        raise BadFile("empty: a header row (owner,name,...) is needed") from None
    except csv.Error as e:
        raise BadFile(f"line 1: {e}") from None
    cols = [_column(h) for h in header]
    known = set(_PLAIN) | set(LIMIT_FIELDS) | {"expires_at", "expires", "scope_paths", "scope_models", "metadata"}
    bad = [h for h, c in zip(header, cols) if c and c not in known and not c.startswith(("metadata.", "meta."))]
    if bad:
        raise BadFile(f"unknown column(s) {', '.join(repr(b) for b in bad)} (known: owner, name, team, "
                      f"{', '.join(LIMIT_FIELDS)}, expires_at, scope_paths, scope_models, metadata, metadata.<name>, "
                      "import_sha256, import_key)")
    seen = [c for c in cols if c and cols.count(c) > 1]
    if seen:
        raise BadFile(f"column {seen[0]!r} appears twice")
    if "owner" not in cols:
        raise BadFile("no 'owner' column")
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    while True:
        n = reader.line_num + 1  # (the record's first line: a quoted cell may hold line breaks)
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            problems.append(f"line {n}: {e}")
            break
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(cols):
            problems.append(f"line {n}: {len(cells)} cells for {len(cols)} columns")
            continue
        body: dict[str, Any] = {}
        try:
            for col, cell in zip(cols, cells):
                if not col and cell.strip():
                    raise ValueError("a value in a column with no header")
                _cell(body, col, cell, parse_when)
        except ValueError as e:
            problems.append(f"line {n}: {e}")
            continue
        rows.append((n, body))
    return rows, problems


def _cell(body: dict[str, Any], col: str, cell: str, parse_when: Any) -> None:
    if cell == "" or not col:
        return
    if col in _PLAIN:
        body[col] = cell
    elif col in LIMIT_FIELDS:
        try:
            body.setdefault("limits", {})[col] = int(cell.strip())
        except ValueError:
            raise ValueError(f"{col}: not a whole number") from None  # (not repeated: a column mix-up may put a key here)
    elif col in ("expires_at", "expires"):
        try:
            when = parse_when(cell)
        except Exception:  # (argparse's ArgumentTypeError; its message repeats the value, which may be a key)
            raise ValueError(f"{col}: not a time (use e.g. 30d, 12h, 2027-01-01, never)") from None
        body["expires_at"] = when.isoformat() if when is not None else None
    elif col in ("scope_paths", "scope_models"):
        body.setdefault("scopes", {})[col.removeprefix("scope_")] = [e for e in _ENTRIES.split(cell) if e]
    elif col == "metadata":
        try:
            meta = _json(cell)
        except (ValueError, RecursionError):
            raise ValueError("metadata: not JSON (a JSON object, or use metadata.<name> columns)") from None
        if not isinstance(meta, dict):
            raise ValueError("metadata: not a JSON object")
        body.setdefault("metadata", {}).update(meta)
    else:
        name = col.partition(".")[2]
        if not name:
            raise ValueError(f"column {col!r} names no metadata entry")
        body.setdefault("metadata", {})[name] = cell


def _json(text: str) -> Any:
    """JSON as the admin API reads it: NaN, Infinity and numbers out of a float's range refused."""
    from .admin import _finite, _no_constant

    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)


def numbered(problems: list[str]) -> str:
    shown = problems[:MAX_PROBLEMS]
    more = len(problems) - len(shown)
    return "\n".join(shown + ([f"... and {more} more"] if more else []))
