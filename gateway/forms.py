"""One plain field of a ``multipart/form-data`` body (an audio or image upload's ``model``).

A key limited to some models is checked against the model a request names; an upload names it
as a form field, not in JSON. The gateway reads that field only where the reading cannot differ
from the upstream's: the body starts at its first boundary (no preamble), every part has one
``Content-Disposition: form-data`` header with a plain quoted or token ``name``, and exactly one
part is named the field (none other named it in another case), with no ``filename``, a short
UTF-8 value without line breaks. Anything else reads as no value, and a key limited to some
models is refused as for a body it cannot read.
"""
from __future__ import annotations

import re
from email.message import Message

#: The value of a form field read here: a model name, not a file.
MAX_VALUE = 1024
#: Header bytes of one part read (its Content-Disposition and Content-Type).
MAX_PART_HEAD = 4096
_NAME = re.compile(rb'(?i)^form-data(?:;\s*(?:name="([^"\\\r\n]*)"|filename="[^"\\\r\n]*"))+\s*$')


def boundary(content_type: str) -> str | None:
    """The boundary of a ``multipart/form-data`` Content-Type, or None."""
    if not content_type[:19].lower() == "multipart/form-data":
        return None
    m = Message()
    m["Content-Type"] = content_type
    b = m.get_param("boundary")
    if not isinstance(b, str) or not 1 <= len(b) <= 70 or not b.isascii():
        return None
    return b


def form_field(body: bytes, content_type: str, field: str) -> str | None:
    """The value of ``field`` in a ``multipart/form-data`` body, or None (see the module's text)."""
    b = boundary(content_type)
    if b is None:
        return None
    start = b"--" + b.encode()
    delim = b"\r\n" + start
    if not body.startswith(start + b"\r\n"):
        return None
    pos = len(start) + 2
    want = field.encode()
    found: str | None = None
    seen = 0
    while True:
        head_end = body.find(b"\r\n\r\n", pos, pos + MAX_PART_HEAD)
        if head_end < 0:
            return None
        end = body.find(delim, head_end + 4)
        if end < 0:
            return None
        name, filename = _disposition(body[pos:head_end])
        if name is None:
            return None
        if name.lower() == want.lower():
            if name != want or filename:
                return None  # "Model" beside "model", or a file under the field's name
            seen += 1
            value = body[head_end + 4:end]
            if len(value) > MAX_VALUE or b"\r" in value or b"\n" in value:
                return None
            try:
                found = value.decode("utf-8")
            except UnicodeDecodeError:
                return None
        after = end + len(delim)
        if body.startswith(b"--", after):
            break  # the closing delimiter
        if not body.startswith(b"\r\n", after):
            return None
        pos = after + 2
    return found if seen == 1 else None


def _disposition(head: bytes) -> tuple[bytes | None, bool]:
    """A part's form field name (None: no single plain ``form-data`` disposition) and whether it
    names a file."""
    value = None
    for line in head.split(b"\r\n"):
        k, sep, v = line.partition(b":")
        if not sep or k != k.strip() or not k:
            return None, False  # (a folded or malformed header line)
        if k.lower() == b"content-disposition":
            if value is not None:
                return None, False  # two of them
            value = v.strip()
    if value is None:
        return None, False
    m = _NAME.match(value)
    if m is None or value.lower().count(b"name=") != 1 + value.lower().count(b"filename="):
        return None, False  # (name*=, a parameter repeated, or something else)
    names = re.findall(rb'(?i)(?<![a-z])name="([^"]*)"', value)
    if len(names) != 1:
        return None, False
    return names[0], b"filename=" in value.lower()
