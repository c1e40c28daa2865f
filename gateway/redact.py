"""Which query parameters carry a secret, for every place a URL is shown (logs, `gateway check`,
metric labels, span attributes).

A parameter is secret when its name, percent-decoded (``api%5Fkey`` is the ``api_key`` the
application reads, ``pass%77ord`` a password) and with ``-`` and ``_`` alike, is one of
:data:`SECRET_NAMES`, ends in the word ``key`` (``subscription-key``, ``x-goog-api-key``), has one of
:data:`SECRET_WORDS` as a word, or contains one of :data:`SECRET_PARTS` (``dbpassword``,
``accessToken``; ``max_tokens`` is a count, not a token).
"""
from __future__ import annotations

import re
from urllib.parse import unquote_plus

#: Whole parameter names that carry a credential (``?key=`` but not ``?monkey=``), compared with
#: separators removed (``session_id`` is ``sessionid``).
SECRET_NAMES = frozenset({"key", "apikey", "accesskey", "authkey", "hapikey", "auth", "authorization", "credential",
                          "credentials", "sig", "signature", "awsaccesskeyid", "pass", "pw", "passphrase", "jwt",
                          "assertion", "samlresponse", "ticket", "sessionid", "sessid", "jsessionid", "phpsessid",
                          "sid"})
#: Words (between ``-`` / ``_`` / ``.`` / brackets, or camelCase humps) that make a name a
#: credential wherever they are: ``x-goog-signature``, ``client_secret``, ``code_verifier``.
SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "pwd", "sig", "signature", "credential",
                          "credentials", "apikey", "passphrase", "assertion", "verifier", "jwt", "sid"})
#: Parts of a name that make it a credential wherever they appear in it (``dbpassword``,
#: ``accesstoken``, ``userpwd``): ``token`` but not ``tokens`` (``max_tokens`` is a count).
SECRET_PARTS = ("password", "passwd", "pwd", "secret", "token")
#: Secret only as a whole query parameter (an Azure Functions key), not as ``code=`` in free text.
QUERY_ONLY_NAMES = frozenset({"code"})
#: Names that look like credentials and are not: counts, kinds, URLs; pagination cursors
#: (``page_token``, ``nextToken``); keys that name a field (``sort_key``, ``key_id``).
_LAST_NOT_SECRET = frozenset({"count", "type", "url", "uri", "endpoint", "policy", "size", "limit"})
_PAGING = frozenset({"page", "continuation", "next"})
_FIELD_KEYS = frozenset({"sort", "partition", "cache", "idempotency", "public", "foreign"})

#: Where a parameter name starts (group 1: the separator before it; group 2: a quote that
#: encloses the whole pair, as in ``"api_key=..."``; group 3: the name).
_NAME = re.compile(r"""(^|[?&;#\s])(["']?)([^=&#?;\s"']+)=""")
_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_WORD_SPLIT = re.compile(r"[-_.\[\]]+")


def secret_param(name: str, query: bool = True) -> bool:
    if "%" in name or "+" in name:
        for _ in range(3):  # (encoded more than once, too)
            decoded = unquote_plus(name)
            if decoded == name:
                break
            name = decoded
    name = name.strip()
    n = name.lower().replace("-", "_")
    words = [w for w in _WORD_SPLIT.split(_HUMP.sub("_", name).lower()) if w]
    if not words:
        return False
    joined = "".join(words)
    if n in SECRET_NAMES or joined in SECRET_NAMES or joined.endswith(("sessionid", "sessid")) \
            or (query and n in QUERY_ONLY_NAMES):
        return True
    last = words[-1]
    if last in _LAST_NOT_SECRET or last == "tokenizer" or (last == "id" and len(words) > 1 and words[-2] == "key"):
        return False
    if last in ("token", "cursor") and len(words) > 1 and words[-2] in _PAGING:
        return False  # page_token, next_token, continuation_token: where a list goes on
    if last == "key":  # subscription-key, x-goog-api-key (not sort_key, not monkey)
        return len(words) < 2 or words[-2] not in _FIELD_KEYS
    if any(w in SECRET_WORDS or w in SECRET_NAMES for w in words):  # sessionToken, code_verifier
        return True
    flat = n.replace("tokens", "").replace("tokenizer", "")
    return any(p in flat for p in SECRET_PARTS)


def mask_params(text: str, mask: str = "***") -> str:
    """``text`` with the value of every secret parameter replaced by ``mask``: in a query string, a
    fragment, a connection string (``;``) or free text (``password='x' host=db``). A secret value
    runs to the next ``&`` or blank (a ``?``, ``;`` or ``'`` may be part of it), or is a whole
    quoted string; the value of a parameter that is not secret is read through, so a secret
    nested in it (``?next=/oauth?access_token=...``) is found."""
    if "=" not in text:
        return text
    out: list[str] = []
    done = i = 0
    while True:
        m = _NAME.search(text, i)
        if m is None:
            break
        if not secret_param(m.group(3), m.group(1) in "?&;#"):
            i = m.end()
            continue
        start = m.end()
        if start < len(text) and text[start] in "\"'":
            close = text.find(text[start], start + 1)
            end = len(text) if close < 0 else close + 1
        else:
            end = start
            stop = "&" + (m.group(2) or "")
            while end < len(text) and text[end] not in stop and not text[end].isspace():
                end += 1
        out.append(text[done:start])
        out.append(mask)
        done = i = end
    out.append(text[done:])
    return "".join(out)


#: A gateway key (``gw_<12-character id>_<secret>``, percent-encoded too): wherever a client put it
#: (a path, a query, a header), the secret is masked and the id kept.
GATEWAY_KEY = re.compile(r"(gw(?:_|%5[Ff])[0-9A-Za-z]{12})(?:_|%5[Ff])[0-9A-Za-z]{20,}")


def mask_gateway_keys(text: str) -> str:
    """``text`` with every gateway key's secret replaced by ``REDACTED`` (its id kept)."""
    return GATEWAY_KEY.sub(r"\1_REDACTED", text) if "gw" in text else text
