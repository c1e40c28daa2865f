"""Which query parameters carry a secret, for every place a URL is shown (logs, `gateway check`,
metric labels, span attributes).

A parameter is secret when its name, percent-decoded (``api%5Fkey`` is the ``api_key`` the
application reads, ``pass%77ord`` a password) and with ``-`` and ``_`` alike, is one of
:data:`SECRET_NAMES`, has one of :data:`SECRET_WORDS` as a word (``subscription-key``,
``x-access-token``), or contains one of :data:`SECRET_PARTS` (``dbpassword``).
"""
from __future__ import annotations

import re
from urllib.parse import unquote_plus

#: Whole parameter names that carry a credential (``?key=`` but not ``?monkey=``).
SECRET_NAMES = frozenset(n.replace("-", "_") for n in (
    "apikey", "accesskey", "auth", "authorization", "credential", "credentials", "sig", "signature",
    "awsaccesskeyid", "code", "idtoken", "apitoken"))
#: Words (between ``-`` / ``_``) that make a name a credential: ``subscription-key``,
#: ``x-goog-api-key``, ``access_token``, ``client_secret`` (but not ``max_tokens`` or ``monkey``).
SECRET_WORDS = frozenset({"key", "token", "secret", "password", "passwd", "pwd", "sig", "signature",
                          "credential", "credentials", "apikey"})
#: Parts of a name that make it a credential wherever they appear in it (``dbpassword``).
SECRET_PARTS = ("password", "passwd", "secret")

#: One ``name=value`` in a query string or in text quoting one (group 2: the name as written).
QUERY_PARAM = re.compile(r"([?&;\s])([^=&#\s]+)=([^&#\s]*)")


def secret_param(name: str) -> bool:
    if "%" in name or "+" in name:
        for _ in range(3):  # (encoded more than once, too)
            decoded = unquote_plus(name)
            if decoded == name:
                break
            name = decoded
    n = name.strip().lower().replace("-", "_")
    return n in SECRET_NAMES or any(w in SECRET_WORDS for w in n.split("_")) or any(p in n for p in SECRET_PARTS)


def mask_params(text: str, mask: str = "***") -> str:
    """``text`` with the value of every secret query parameter replaced by ``mask``."""
    if "=" not in text:
        return text

    def one(m: "re.Match[str]") -> str:
        return f"{m.group(1)}{m.group(2)}={mask}" if secret_param(m.group(2)) else m.group(0)

    return QUERY_PARAM.sub(one, text)
