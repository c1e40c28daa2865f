"""API key format, parsing and hashing.

A key looks like ``gw_<key id>_<secret><checksum>``:

* ``gw_`` a fixed prefix, so secret scanners (and people) recognise a leaked gateway key;
* the key id: 12 base62 characters, not secret, the primary key of the stored record;
* the secret: 24 base62 characters from :mod:`secrets` (about 142 bits of randomness);
* the checksum: CRC32 of everything before it, as 6 base62 characters, so a mistyped or truncated
  key is rejected without touching the database.

Only ``HMAC-SHA-256(pepper, secret)`` is stored (plain SHA-256 when no pepper is configured). The
keys are long random strings, so a fast hash is enough: there is nothing to brute-force.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib

PREFIX = "gw_"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_LEN = 12
SECRET_LEN = 24
CHECKSUM_LEN = 6
KEY_LEN = len(PREFIX) + ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN

_ID_ONLY = re.compile(rf"^gw_([0-9A-Za-z]{{{ID_LEN}}})_")
KEY_ID = re.compile(rf"^[0-9A-Za-z]{{{ID_LEN}}}$")


def _random(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def _base62(n: int, width: int) -> str:
    out = [""] * width
    for i in range(width - 1, -1, -1):
        n, r = divmod(n, 62)
        out[i] = ALPHABET[r]
    return "".join(out)


def checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), CHECKSUM_LEN)


def new_key_id() -> str:
    return _random(ID_LEN)


def new_secret() -> str:
    return _random(SECRET_LEN)


def format_key(key_id: str, secret: str) -> str:
    body = f"{PREFIX}{key_id}_{secret}"
    return body + checksum(body)


_SEP = len(PREFIX) + ID_LEN  # index of the "_" between the key id and the secret


def parse_key(raw: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` for a well-formed key with a valid checksum, else None.

    On the hot path: plain string checks instead of a regex. The checksum is not secret (it is
    computed from the rest of what the caller sent), so an ordinary comparison is fine."""
    if len(raw) != KEY_LEN or not raw.startswith(PREFIX) or raw[_SEP] != "_" or not raw.isascii():
        return None
    key_id = raw[len(PREFIX):_SEP]
    rest = raw[_SEP + 1:]
    if not (key_id.isalnum() and rest.isalnum()):
        return None
    if raw[-CHECKSUM_LEN:] != checksum(raw[:-CHECKSUM_LEN]):
        return None
    return key_id, rest[:SECRET_LEN]


def loose_key_id(raw: str) -> str | None:
    """The key id of something that looks like a key but failed to parse (for the audit trail;
    the key id is not secret)."""
    m = _ID_ONLY.match(raw)
    return m.group(1) if m else None


def key_id_of(arg: str) -> str | None:
    """The key id an admin names: a key id, or a whole key (pasted to revoke a leaked one: its
    id is taken). None for anything else, which is never echoed back (it may be a secret)."""
    arg = arg.strip()
    if KEY_ID.match(arg):
        return arg
    parsed = parse_key(arg)
    return parsed[0] if parsed is not None else None


#: Why an argument names no key (the argument itself is not repeated: it may be a secret).
NOT_A_KEY_ID = "not a key id: an id is the 12 letters and digits after 'gw_' (a whole key is taken too)"
#: The same where an imported key's token names its key too (key administration).
NO_KEY_NAMED = ("not a key id, a whole key or the token of an imported key: an id is the 12 letters and digits "
                "after 'gw_'")


def imported_token_hash(arg: str) -> str | None:
    """The SHA-256 (hex) an imported key is stored by, for an argument that could be its token (a
    leaked one pasted to find and revoke its key); None for one that cannot (a gateway key, blanks)."""
    if not 8 <= len(arg) <= 1024 or arg != arg.strip() or not arg.isprintable() or not arg.isascii() \
            or arg.startswith(PREFIX):
        return None
    return hashlib.sha256(arg.encode()).hexdigest()


def hash_secret(pepper: str, secret: str) -> str:
    """Hex HMAC-SHA-256 of the secret with the server-side pepper (plain SHA-256 without one)."""
    if pepper:
        return hmac.digest(pepper.encode(), secret.encode(), "sha256").hex()  # one-shot, in C
    return hashlib.sha256(secret.encode()).hexdigest()


def pepper_fingerprint(pepper: str) -> str:
    """A short fingerprint of the pepper (an HMAC of a fixed text; it tells peppers apart and gives
    nothing a stored key's hash does not): recorded by the gateway, compared by the CLI."""
    return hmac.new(pepper.encode(), b"gateway key_auth pepper", "sha256").hexdigest()[:16]


def secrets_match(a: str, b: str | None) -> bool:
    """Constant-time comparison of two hex digests."""
    if b is None:
        return False
    return hmac.compare_digest(a, b)  # hex digests are ASCII, which compare_digest takes as str
