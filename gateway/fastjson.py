"""JSON parsing on the request path: orjson when it accepts the input, else the standard library.

orjson parses a typical chat request or response about four times faster than ``json``; that is
the single largest cost of any plugin that reads bodies (usage, model, messages). Where the two
disagree (integers beyond 64 bits, lone surrogate escapes), the standard library's answer is
used; both refuse NaN, Infinity and numbers beyond a double's range, so the gateway never writes
them on. UTF-8 only. One
difference remains: an integer beyond 64 bits reads as a float (as it does in JavaScript; RFC 8259
counts on no more than double precision between implementations). Code that re-serialises a body
for the upstream uses ``RequestContext.json_exact``, which parses such a body with ``json``.
"""
from __future__ import annotations

import json
from typing import Any

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency; stay correct without it
    _orjson = None  # type: ignore[assignment]

__all__ = ["dumps", "dumps_bytes", "loads", "strict_loads", "NonFiniteNumber", "JSON_ERRORS", "utf8_safe"]

#: What a caller catches: invalid JSON, invalid UTF-8, absurd nesting.
JSON_ERRORS = (ValueError, UnicodeDecodeError, RecursionError)


class NonFiniteNumber(ValueError):
    """JSON text with NaN, Infinity or a number beyond a double's range: no JSON can carry it on."""


def _finite(s: str) -> float:
    f = float(s)
    if f in (_INF, -_INF):
        raise NonFiniteNumber(f"number out of range: {s[:40]}")
    return f


def _no_constant(s: str) -> Any:
    raise NonFiniteNumber(f"{s} is not JSON")


_INF = float("inf")


def strict_loads(data: bytes | bytearray | memoryview | str, any_encoding: bool = False) -> Any:
    """The standard library's parser as JSON (RFC 8259) has it: ``NaN`` / ``Infinity`` and numbers
    beyond a double's range (``1e400``) are refused, not read as infinities that no JSON text can
    carry on (the gateway would forward or store ``Infinity``). UTF-8 only, unless
    ``any_encoding`` (then a byte order mark or UTF-16/32 is recognised, as ``json.loads`` does)."""
    if not isinstance(data, str):
        data = bytes(data)
        if not any_encoding:
            data = data.decode()
    return json.loads(data, parse_float=_finite, parse_constant=_no_constant)


_std = strict_loads


if _orjson is not None:
    _fast = _orjson.loads
    _FastError = _orjson.JSONDecodeError

    def loads(data: bytes | bytearray | memoryview | str) -> Any:
        """Parse a JSON document (UTF-8 bytes or str). Raises one of :data:`JSON_ERRORS`."""
        try:
            return _fast(data)
        except _FastError:
            return _std(data)
else:  # pragma: no cover
    loads = _std


def dumps(obj: Any, *, sort_keys: bool = False, default: Any = None) -> str:
    """Compact JSON text for storage, non-ASCII kept as is: orjson, or, where it refuses (a lone
    surrogate, valid in JSON text but not in UTF-8, so no database could store it raw; an integer
    beyond 64 bits), the standard library, with each lone surrogate written as its JSON escape
    (``\\ud800``) and everything else as orjson would. The text is always that of
    ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False)`` with lone surrogates escaped
    (``.encode("utf-8", "backslashreplace")`` in Python), except that orjson writes floats below
    1e-4 in plain decimal notation (``0.00001``, not ``1e-05``); the audit docs rely on this."""
    if _orjson is not None:
        try:
            return _orjson.dumps(obj, default=default, option=_orjson.OPT_SORT_KEYS if sort_keys else 0).decode()
        except TypeError:
            pass
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys, default=default)
    if text.isascii():
        return text
    try:
        text.encode()
        return text
    except UnicodeEncodeError:  # a lone surrogate: "\ud800" as Python's backslashreplace writes it, JSON's escape
        return text.encode("utf-8", "backslashreplace").decode()


def dumps_bytes(obj: Any) -> bytes:
    """:func:`dumps` as UTF-8 bytes (a request body): orjson's own output when it takes ``obj``."""
    if _orjson is not None:
        try:
            return _orjson.dumps(obj)
        except TypeError:  # (a lone surrogate, an integer beyond 64 bits, deeper than orjson goes)
            pass
    return dumps(obj).encode()


def utf8_safe(s: str) -> str:
    """``s`` as UTF-8 (and so any database) can store it: a lone surrogate becomes '?'. A client can
    send one as a JSON escape (``"\\ud800"``), and aiohttp maps undecodable header bytes to them."""
    if s.isascii():
        return s
    try:
        s.encode()
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode()
