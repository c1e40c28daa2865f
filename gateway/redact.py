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

#: Whole parameter names that carry a credential (``?key=`` but not ``?monkey=``).
SECRET_NAMES = frozenset({"key", "apikey", "accesskey", "authkey", "hapikey", "auth", "authorization", "credential",
                          "credentials", "sig", "signature", "awsaccesskeyid", "pass", "pw", "passphrase", "jwt",
                          "assertion", "samlresponse", "ticket", "sessionid", "sessid", "jsessionid", "phpsessid"})
#: Words (between ``-`` / ``_`` / ``.`` / brackets, or camelCase humps) that make a name a
#: credential wherever they are: ``x-goog-signature``, ``client_secret``, ``code_verifier``.
SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "pwd", "sig", "signature", "credential",
                          "credentials", "apikey", "passphrase", "assertion", "verifier", "jwt"})
#: Parts of a name that make it a credential wherever they appear in it (``dbpassword``,
#: ``accesstoken``, ``userpwd``): ``token`` but not ``tokens`` (``max_tokens`` is a count).
SECRET_PARTS = ("password", "passwd", "pwd", "secret", "token")
#: Secret only as a whole query parameter (an Azure Functions key), not as ``code=`` in free text.
QUERY_ONLY_NAMES = frozenset({"code"})
#: Names that look like credentials and are not: counts, kinds, URLs, pagination cursors, keys
#: that name a field.
_LAST_NOT_SECRET = frozenset({"count", "type", "url", "uri", "endpoint", "policy", "id", "name", "size", "limit"})
_PAGING = frozenset({"page", "continuation", "cursor", "next"})
_FIELD_KEYS = frozenset({"sort", "partition", "cache", "idempotency", "public", "primary", "foreign"})

#: One ``name=value`` in a query string, a fragment, a connection string or text quoting one
#: (group 2: the name as written). A value stops at the next separator or a quote.
QUERY_PARAM = re.compile(r"""([?&;#\s])([^=&#?;\s"']+)=([^&#?;\s"']*)""")


def secret_param(name: str, query: bool = True) -> bool:
    if "%" in name or "+" in name:
        for _ in range(3):  # (encoded more than once, too)
            decoded = unquote_plus(name)
            if decoded == name:
                break
            name = decoded
    name = name.strip()
    n = name.lower().replace("-", "_")
    if n in SECRET_NAMES or (query and n in QUERY_ONLY_NAMES):
        return True
    words = [w for w in _WORD_SPLIT.split(_HUMP.sub("_", name).lower()) if w]
    if not words or words[-1] in _LAST_NOT_SECRET or _PAGING.intersection(words) or words[-1] == "tokenizer":
        return False
    if words[-1] == "key":  # subscription-key, x-goog-api-key (not sort_key, not monkey)
        return len(words) < 2 or words[-2] not in _FIELD_KEYS
    if any(w in SECRET_WORDS or w in SECRET_NAMES for w in words):  # sessionToken, code_verifier
        return True
    flat = n.replace("tokens", "").replace("tokenizer", "")
    return any(p in flat for p in SECRET_PARTS)


_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_WORD_SPLIT = re.compile(r"[-_.\[\]]+")


def mask_params(text: str, mask: str = "***") -> str:
    """``text`` with the value of every secret query parameter replaced by ``mask``."""
    if "=" not in text:
        return text

    def one(m: "re.Match[str]") -> str:
        return f"{m.group(1)}{m.group(2)}={mask}" if secret_param(m.group(2), m.group(1) in "?&;#") else m.group(0)

    return QUERY_PARAM.sub(one, text)
