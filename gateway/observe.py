"""Watching a response go by: SSE framing, usage, model, finish reasons and the assistant message.

The core runs a :class:`ResponseObserver` only when a plugin asked for it (``ctx.want_usage()``).
It sees the body exactly as the client gets it, so what it assembles is what was delivered.
For streams where the core itself asked the upstream for usage (``stream_options.include_usage``),
the observer also removes that extra usage-only chunk so the client never sees it.

An upstream (or a reverse proxy in front of it) may compress its answer though the gateway asked
for none (``Accept-Encoding: identity``): the client still gets the compressed bytes as they came,
and the observer reads a decoded copy (gzip, deflate; zstd with its package), decoded
piece by piece within bounds (see :class:`Decoder`). A compressed stream's usage chunk cannot be
removed without encoding the stream again, which the gateway never does: it reaches the client.
"""
from __future__ import annotations

import json
import re
import time
import zlib
from typing import Any, Iterator

from .context import truthy
from .fastjson import JSON_ERRORS, loads

MAX_JSON_BODY = 16 * 2**20  # a non-streamed body larger than this is relayed but not parsed
#: An SSE event longer than this is relayed as it comes but not parsed (nor held back); an
#: upstream sending one without an event boundary cannot make the gateway buffer it whole.
MAX_EVENT = 2**20
#: Tool calls assembled from a stream: a delta naming a higher index is ignored.
MAX_TOOL_CALLS = 256
#: A stream's choice index beyond this (more than any ``n`` a backend allows) is not counted as a choice.
MAX_CHOICES = 1024
#: Of a body or an event too large to parse, this many last bytes are kept: the usage object comes
#: last in the API's answers (embeddings of a large batch, generated images, a Responses stream's
#: final event), so the tokens are still counted.
TAIL = 64 * 1024
#: Of a JSON body too large to parse, its top-level members within this many first bytes are read
#: too: vLLM puts the usage (and the model, id and choices) before a huge ``prompt_logprobs``.
HEAD = 2**20
#: A compressed body is decoded for the observer at most this many bytes at a time (what one piece
#: of it inflates to is bounded, however small the piece) ...
DECODE_STEP = 256 * 1024
#: ... and in all, past MAX_DECODED bytes, to at most DECODE_RATIO times its compressed bytes: JSON
#: and SSE compress far less, so a body inflating further is a decompression bomb (deflate itself
#: goes up to about 1032:1), and it is no longer read. Memory stays within the bounds a plain body
#: has either way (MAX_JSON_BODY, MAX_EVENT, TAIL); this bounds the work.
MAX_DECODED = 32 * 2**20
DECODE_RATIO = 64


class _Joined:
    """A text field kept as :class:`_Parts` while stream deltas come, joined the first time it is
    read (a setter stores a value as it is)."""

    __slots__ = ("attr",)

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        v = getattr(obj, self.attr)
        if type(v) is _Parts:
            v = "".join(v)
            setattr(obj, self.attr, v)
        return v

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj, self.attr, value)


#: A streamed tool call's slot as made for its index, before any delta filled it.
_UNUSED: dict[str, Any] = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}


class Completion:
    """What the upstream answered, as far as it was delivered."""

    __slots__ = ("usage", "model", "response_id", "finish_reasons", "finish_reason", "_content", "_tool_calls", "role",
                 "unread",
                 "deltas", "done", "message", "t_first_token", "kind", "raw", "error", "ended",
                 "_reasoning_field", "_reasoning", "_refusal", "_audio", "extra_content", "reasoning_details", "choices",
                 "deltas0",
                 "deltas_at_usage", "usage_on_output", "cut_mid_event", "prompt_estimate", "binary")

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None   # exactly as the upstream reported it
        self.model: str | None = None
        self.response_id: str | None = None
        self.finish_reasons: list[str] = []        # of every choice, in the order they came
        self.finish_reason: str | None = None      # of choice 0 (the one assembled here)
        # Choice 0's text and tool calls (streams: assembled from deltas; see the properties)
        self._content: str | _Parts | None = None
        self._tool_calls: list[dict[str, Any]] = []
        self.role: str | None = None
        self.deltas = 0        # deltas of output seen, all choices (roughly one per generated token)
        self.deltas0 = 0       # of those, the deltas of choice 0
        self.deltas_at_usage = 0  # deltas seen up to the (latest) usage report, its own event included
        #: the (latest) usage report came on a chunk of output (vLLM's continuous_usage_stats, a
        #: finish chunk), not on the stream's final usage-only chunk
        self.usage_on_output = False
        self.choices = 0       # choices in the answer (n > 1: more than one; streams: highest index + 1)
        self.done = False      # saw the end ([DONE], a finish_reason, or a complete JSON body)
        self.unread = 0        # SSE events over MAX_EVENT: relayed to the client, not read here
        self.message: dict[str, Any] | None = None  # the assistant message as an OpenAI message dict
        self.t_first_token: float | None = None
        self.kind = "json"     # "json" or "sse"
        self.raw: Any = None   # the parsed JSON body (non-streamed)
        #: The upstream reported an error inside a 2xx answer: an ``error`` object as a stream event
        #: (vLLM on an engine failure, then ``[DONE]``), an ``event: error``, an ``error:`` field line
        #: (older llama.cpp servers), or a JSON body that is an error object. The answer is then not
        #: a finished one, whatever [DONE] said.
        self.error = False
        self.ended = False     # saw the stream's terminating [DONE]
        #: The SSE body ended inside an event (a partial event left over), with no [DONE] and no
        #: finish reason: the upstream went away mid-answer, though a body delimited by the
        #: connection's close (HTTP/1.0, or no length) had no length to fall short of.
        self.cut_mid_event = False
        # A reasoning model's streamed thinking of choice 0: the field it came in, and its text.
        self._reasoning_field = ""
        self._reasoning: str | _Parts | None = None
        #: Choice 0's streamed refusal text and audio (id, transcript, data, expires_at): parts of the
        #: message the client's SDK assembles too, so they are stored with it.
        self._refusal: str | _Parts | None = None
        self._audio: dict[str, Any] | None = None  # its text fields as _Parts while they come
        #: Choice 0's streamed ``extra_content`` (a backend's own data for the message, Gemini's
        #: thought signature): its last value, stored with the message to be replayed with it.
        self.extra_content: Any = None
        #: Choice 0's streamed ``reasoning_details`` (OpenRouter), assembled per index.
        self.reasoning_details: list[dict[str, Any]] | None = None
        #: Set by the core when the exchange ends, for a stream that ended without reporting its
        #: prompt tokens (see ``input_tokens``): the gateway's estimate of the prompt it sent.
        self.prompt_estimate: int | None = None
        #: The answer is not JSON or text (audio, an image, a file): relayed, not read.
        self.binary = False

    # A long stream has tens of thousands of deltas: its text fields (content, refusal, reasoning,
    # tool call arguments) are kept as parts while they come and joined when read, once, not copied
    # into a growing string on every delta (quadratic work on the event loop).
    #: The assistant text of choice 0 (streams: assembled), and its streamed refusal.
    content = _Joined("_content")
    refusal = _Joined("_refusal")

    @property
    def reasoning(self) -> tuple[str, str] | None:
        """A reasoning model's streamed thinking of choice 0: (the field it came in, its text)."""
        v = self._reasoning
        if v is None:
            return None
        if type(v) is _Parts:
            v = self._reasoning = "".join(v)
        return self._reasoning_field, v

    @reasoning.setter
    def reasoning(self, value: tuple[str, str] | None) -> None:
        self._reasoning_field, self._reasoning = value if value is not None else ("", None)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """Choice 0's tool calls (streams: assembled from deltas, their arguments joined here; the
        slots of indexes no delta carried, when a stream skipped some, left out)."""
        tcs = self._tool_calls
        for tc in tcs:
            fn = tc.get("function") if type(tc) is dict else None
            if type(fn) is dict and type(fn.get("arguments")) is _Parts:
                fn["arguments"] = "".join(fn["arguments"])
        if _UNUSED in tcs:
            return [tc for tc in tcs if tc != _UNUSED]
        return tcs

    @tool_calls.setter
    def tool_calls(self, value: list[dict[str, Any]]) -> None:
        self._tool_calls = value

    @property
    def audio(self) -> dict[str, Any] | None:
        """Choice 0's streamed audio, its text fields joined. A stream of audio has thousands of
        base64 deltas of a few KB: they are kept as parts and joined here, once, not copied into a
        growing string on every delta (quadratic work on the event loop)."""
        a = self._audio
        if a is not None:
            for k, v in a.items():
                if type(v) is _Parts:
                    a[k] = "".join(v)
        return a

    @audio.setter
    def audio(self, value: dict[str, Any] | None) -> None:
        self._audio = value

    @property
    def prompt_tokens(self) -> int | None:
        return usage_tokens(self.usage)[0] if self.usage else None

    @property
    def input_tokens(self) -> int | None:
        """The prompt tokens every ledger records: the upstream's report, or for a stream that ended
        without one (``relayed_tokens``: cut short, or an upstream ignoring include_usage) the
        gateway's estimate of the prompt (``prompt_estimate``): the upstream read it all the same."""
        p = self.prompt_tokens
        return p if p is not None else self.prompt_estimate

    @property
    def usage_stale(self) -> bool:
        """A stream whose (latest) usage report does not count all of its output: it came before
        some of it (an upstream that reports at the start, the stream then cut short), or it came
        on a chunk of output and counts fewer tokens than the deltas delivered. The latter is a
        stream that ended without its final usage-only chunk under vLLM's continuous_usage_stats
        with n > 1: each chunk reports the count of its own choice only. A stream's final usage
        chunk (or a report on every chunk of one choice) covers what came, and is taken as it is."""
        if self.kind != "sse" or self.usage is None:
            return False
        if self.deltas > self.deltas_at_usage:
            return True
        return self.usage_on_output and self.deltas > (usage_tokens(self.usage)[1] or 0)

    @property
    def completion_tokens(self) -> int | None:
        if not self.usage:
            return None
        q = usage_tokens(self.usage)[1]
        if self.usage_stale:  # (at least what was relayed after it: one token per delta)
            return max(q or 0, self.deltas)
        return q

    @property
    def relayed_tokens(self) -> int | None:
        """Output tokens of a stream that ended without a usage report (cut short, or an upstream
        that ignores include_usage), or whose report has no valid output count (a negative or
        fractional ``completion_tokens``: as if not reported): the deltas relayed, one per token
        roughly. None otherwise."""
        if self.kind != "sse":
            return None
        return self.deltas if self.usage is None or usage_tokens(self.usage)[1] is None else None

    @property
    def total_tokens(self) -> int | None:
        if not self.usage:
            return None
        total = _int(self.usage.get("total_tokens"))
        if self.usage_stale:
            return max(total or 0, (self.prompt_tokens or 0) + (self.completion_tokens or 0))
        return total

    def assistant_message(self) -> dict[str, Any] | None:
        if self.message is not None:
            return self.message
        if self.content is None and not self.tool_calls and self.role is None and not self.refusal \
                and not self.audio and not self.reasoning_details:
            return None
        msg: dict[str, Any] = {"role": self.role or "assistant", "content": joined(self.content)}
        if self.refusal:
            msg["refusal"] = joined(self.refusal)
        if self.audio:
            msg["audio"] = {k: joined(v) for k, v in self.audio.items()}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
            for tc in self.tool_calls:
                fn = tc.get("function")
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    fn["arguments"] = joined(fn["arguments"])
        if self.reasoning is not None:
            msg[self.reasoning[0]] = joined(self.reasoning[1])
        if self.extra_content is not None:
            msg["extra_content"] = self.extra_content
        if self.reasoning_details:
            msg["reasoning_details"] = [{k: joined("".join(v) if type(v) is _Parts else v) for k, v in d.items()}
                                        for d in self.reasoning_details if d]
        return msg


class _Parts(list[str]):
    """The parts of a streamed text field, joined when read (no JSON value is one)."""

    __slots__ = ()


def _reasoning_details(c: "Completion", items: list[Any]) -> None:
    """OpenRouter's streamed ``reasoning_details`` (a reasoning model's thinking, with the signature
    its provider needs back with a tool call's result), assembled per ``index``: text and summary
    concatenated, anything else as it last came."""
    acc = c.reasoning_details
    if acc is None:
        acc = c.reasoning_details = []
    for item in items:
        if not isinstance(item, dict):
            continue
        i = item.get("index")
        if type(i) is not int or not 0 <= i < MAX_TOOL_CALLS:
            # (no index: the piece goes on the last item of its type, else starts one)
            i = len(acc) - 1 if acc and acc[-1].get("type") == item.get("type") else len(acc)
            if i >= MAX_TOOL_CALLS:
                continue
        while len(acc) <= i:
            acc.append({})
        slot = acc[i]
        for k, v in item.items():
            if k in ("text", "summary"):
                if isinstance(v, str):  # (parts, joined when read: no copy per piece)
                    cur = slot.get(k)
                    slot[k] = _cat(cur if isinstance(cur, (str, _Parts)) else None, v)
                elif k not in slot:
                    slot[k] = v
            elif v is not None or k not in slot:
                slot[k] = v


#: A streamed tool call's standard members (its other members are kept as they last came).
_TOOL_CALL_FIELDS = frozenset({"index", "id", "type", "function"})
_FUNCTION_FIELDS = frozenset({"name", "arguments"})


def _extras(slot: dict[str, Any], delta: dict[str, Any], standard: frozenset[str]) -> None:
    """The members of a tool call's delta beyond ``standard``, into its assembled slot: each as
    its last non-null value (as the OpenAI SDK's stream accumulator keeps a member it does not
    know; an object such as Gemini's ``extra_content`` usually comes whole in one delta)."""
    for k, v in delta.items():
        if k not in standard and (v is not None or k not in slot):
            slot[k] = v


def _cat(cur: "str | _Parts | None", v: str) -> "str | _Parts":
    """``cur`` with one more delta of text: the first kept as it is, the rest as parts."""
    if cur is None:
        return v
    if type(cur) is _Parts:
        cur.append(v)
        return cur
    return _Parts((cur, v))


def joined(s: Any) -> Any:
    """Text assembled from stream deltas, with each surrogate pair that an upstream split over two
    deltas (as two JSON escapes, ``"\\ud83d"`` then ``"\\ude00"``) joined into the one character a
    client's JSON parser makes of it when the text is sent back: stored, it is the same text."""
    if type(s) is not str or s.isascii():
        return s
    try:
        s.encode()
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")


#: A token count the upstream reports is believed up to here; beyond it (no response is two billion
#: tokens long) it is treated as not reported, so one bogus value cannot overflow a counter or a
#: column and take other records with it.
MAX_TOKENS = 2**31 - 1


def _int(v: Any) -> int | None:
    """A token count as reported, if it is one: an integer (not a bool) in 0..MAX_TOKENS."""
    return v if type(v) is int and 0 <= v <= MAX_TOKENS else None


token_count = _int


def usage_tokens(u: dict[str, Any]) -> tuple[int | None, int | None]:
    """(input, output) tokens of a reported usage: chat and completions name them prompt_tokens /
    completion_tokens, the Responses API and the Messages API input_tokens / output_tokens. Every
    plugin reads them here, so all count both alike. The Messages API reports the prompt it read
    from its cache or wrote to it apart from ``input_tokens`` (the OpenAI APIs count them in):
    they are input too. (A Responses API usage, which has a total and ``input_tokens_details``
    with the cached count in its input, is taken as it is, whatever else it carries.) A usage
    with a total alone (a rerank) is all input; a total above input plus output (a backend that
    counts a thinking model's thought tokens in the total alone, as Gemini's OpenAI endpoint may)
    has the difference counted as output, which is what it is billed as: every ledger then agrees
    with the total that token limits charge."""
    p, c = u.get("prompt_tokens"), u.get("completion_tokens")
    if p is not None and c is not None:  # (chat, completions: the common case)
        t = _int(u.get("total_tokens"))
        p, c = _int(p), _int(c)
        if t is not None and p is not None and c is not None and t > p + c:
            c = t - p
        return p, c
    if p is None:
        p = _int(u.get("input_tokens"))
        if p is not None and ("cache_read_input_tokens" in u or "cache_creation_input_tokens" in u) \
                and "total_tokens" not in u and "input_tokens_details" not in u:
            p = _int(p + (_int(u.get("cache_read_input_tokens")) or 0)
                     + (_int(u.get("cache_creation_input_tokens")) or 0))
    c = c if c is not None else u.get("output_tokens")
    if p is None and c is None:
        # a usage with a total alone (vLLM's /rerank: {"total_tokens": N}): all of it input, read
        p = u.get("total_tokens")
    return _int(p), _int(c)


try:  # zstd: Python 3.14's module, or its backport (the package aiohttp decodes zstd with)
    from compression.zstd import ZstdDecompressor as _Zstd  # type: ignore[import-not-found]
except ImportError:
    try:
        from backports.zstd import ZstdDecompressor as _Zstd  # type: ignore[import-not-found,no-redef]
    except ImportError:
        _Zstd = None

#: Response Content-Encodings the observer can read (a copy: the client gets the body as it came).
#: br is not among them: the brotli packages do not all bound what one call may inflate to.
DECODABLE = frozenset({"gzip", "x-gzip", "deflate"} | ({"zstd"} if _Zstd is not None else set()))


def content_coding(headers: Any) -> str | None:
    """A response's Content-Encoding as one coding, lower case (None: none, or identity). Several
    (``gzip, br``, or several header lines) are returned as they are, which no decoder takes."""
    if "Content-Encoding" not in headers:  # (nearly every answer: no list made)
        return None
    text = ",".join(headers.getall("Content-Encoding")).strip().lower()
    if not text or text == "identity":
        return None
    return text


class Undecodable(Exception):
    """A compressed body the observer stops reading: corrupt, or inflating beyond its bounds."""


#: The first bytes of a gzip member and of a zstd frame.
_MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}


class Decoder:
    """A compressed body decoded piece by piece: each piece fed yields what it inflates to, at
    most DECODE_STEP bytes at a time, and at most MAX_DECODED (or DECODE_RATIO times its compressed
    size) in all; past that, or on data that does not decode, :class:`Undecodable`. Gzip may hold
    several members one after the other; deflate comes zlib-wrapped (as HTTP says) or raw (as
    some servers send it), told apart by its first two bytes."""

    __slots__ = ("coding", "_z", "_lead", "total_in", "total_out", "ended")

    def __init__(self, coding: str) -> None:
        self.coding = "gzip" if coding == "x-gzip" else coding
        self._z: Any = None
        # bytes held for the next piece: deflate's first one (the second says which kind it is), or
        # the start of the magic number of a gzip member or zstd frame after the one that ended
        self._lead = b""
        self.total_in = 0
        self.total_out = 0
        self.ended = False     # the compressed stream's end was seen (its last member whole)

    def _new(self, data: bytes) -> Any:
        if self.coding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self.coding == "zstd":
            return _Zstd()
        wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0  # a zlib header (RFC 1950)
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """What ``data`` (the next bytes of the body; b"" at its end) inflates to, piece by piece."""
        self.total_in += len(data)
        if self._lead:
            data, self._lead = self._lead + data, b""
        z = self._z
        if z is None:
            if self.coding == "deflate" and len(data) < 2:
                self._lead = data
                return
            if not data:
                return
            z = self._z = self._new(data)
        zstd = self.coding == "zstd"
        while True:
            if z.eof:
                # A member is whole. Gzip and zstd may hold another after it (its magic number
                # may come split over two reads); anything else after the end (padding some
                # servers add) is not part of the body's text.
                magic = _MAGIC.get(self.coding)
                if not data or magic is None:
                    return
                if len(data) < len(magic) and magic.startswith(data):
                    self._lead = data
                    return
                if not data.startswith(magic):
                    return
                z = self._z = self._new(data)
                self.ended = False
            try:
                out = z.decompress(data, DECODE_STEP)
            except Exception:  # (zlib.error, zstd's ZstdError): corrupt, or not this coding at all
                raise Undecodable("corrupt") from None
            if zstd:  # (it keeps what it has not read yet itself: asked again with nothing)
                more = not z.eof and not z.needs_input
                data = z.unused_data if z.eof else b""
            else:
                data = z.unused_data if z.eof else z.unconsumed_tail
                more = len(out) == DECODE_STEP  # (the output may have stopped at the step)
            self.ended = z.eof
            if out:
                self.total_out += len(out)
                if self.total_out > MAX_DECODED and self.total_out > DECODE_RATIO * self.total_in:
                    raise Undecodable("bomb")
                yield out
            if not data and not more:
                return


def decoded(coding: str, data: bytes) -> bytes:
    """A whole body compressed with ``coding`` (one the observer reads), decoded within the
    observer's bounds; :class:`Undecodable` if it does not decode or inflates beyond them."""
    dec = Decoder(coding)
    return b"".join([*dec.pieces(data), *dec.pieces(b"")])


def decoded_head(coding: str, data: bytes, n: int = 64) -> bytes | None:
    """The first (up to ``n``) bytes that the start of a body compressed with ``coding`` decodes
    to; None if it does not decode (or ``coding`` is not one the observer reads)."""
    if coding not in DECODABLE:
        return None
    out = b""
    try:
        for piece in Decoder(coding).pieces(data):
            out += piece[:n - len(out)]
            if len(out) >= n:
                break
    except Undecodable:
        return None
    return out


class ResponseObserver:
    def __init__(self, streamed: bool, strip_usage_chunk: bool, readable: bool = True, tail: bool = True,
                 coding: str | None = None) -> None:
        self.c = Completion()
        self.c.kind = "sse" if streamed else "json"
        self.streamed = streamed
        #: the body's Content-Encoding (None: plain). A compressed body is read through a decoded
        #: copy, and relayed as it came: nothing is removed from it (see _feed_coded).
        self.coding = coding
        self._decoder: Decoder | None = None
        #: why a compressed body stopped being read ("corrupt", "bomb"), or that its coding is not
        #: one the observer can decode ("unknown"); None: read (or plain)
        self.unreadable: str | None = None
        self.strip = strip_usage_chunk and streamed and coding is None
        if coding is not None:
            # (the plain path's feed is left as it is: it runs for every chunk of every answer)
            self.feed = self._feed_coded  # type: ignore[method-assign]
            if coding not in DECODABLE:
                self.unreadable = "unknown"  # relayed, not read (as an audio or image answer is)
            elif readable or streamed:
                self._decoder = Decoder(coding)
        self._buf = bytearray()
        #: not read at all: a non-streamed body that is not JSON or text (audio, images, files)
        self._ignored = self.c.binary = not readable and not streamed
        self._too_big = False
        self._tail = bytearray()  # the last TAIL bytes of a body, or an event, too large to parse
        self._lead: dict[str, Any] = {}  # the top-level members in the first HEAD bytes of such a body
        #: read the usage at the end of what is too large to parse (an answer to a generation)
        self._tail_ok = tail
        self._passing = False  # inside an SSE event too long to parse: relayed until it ends
        self._scanned = 0      # the buffer's first bytes hold no event boundary (searched already)
        self._msg_index: Any = None  # Responses API streams: the output index of the message item
        # The stream's edges the parser looks at apart from its events (see _edge): its first bytes
        # (a byte order mark?), and the byte after an event that ended on a CR (the LF of a CRLF?).
        self._head = streamed
        self._cr = 0  # the last event ended on a CR at the buffer's end: 1 it was relayed, 2 dropped
        self._edges = streamed

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        """Observe one upstream chunk; returns what to pass on to the client."""
        if not self.streamed:
            if self._ignored:
                pass
            elif self._too_big:
                _keep_tail(self._tail, chunk)
            elif len(self._buf) + len(chunk) > MAX_JSON_BODY:
                self._too_big = True
                if self._tail_ok:  # (the first bytes are at hand: read now, not held)
                    head = bytes(self._buf[:HEAD])
                    self._lead = head_members(head + chunk[:HEAD - len(head)])
                _keep_tail(self._tail, self._buf)
                _keep_tail(self._tail, chunk)
                self._buf.clear()
            else:
                self._buf += chunk
            return chunk
        buf = self._buf
        buf += chunk
        out = bytearray() if self.strip else None
        if self._edges:
            self._edge(buf, out)
        while True:
            end, sep = _find_event_end(buf, self._scanned)
            # a boundary (up to 4 bytes) may straddle this chunk and the next: look again there
            self._scanned = max(0, len(buf) - 3) if end < 0 else 0
            if self._passing:
                # keep 3 bytes back: an event boundary may straddle two chunks
                n = end + sep if end >= 0 else max(0, len(buf) - 3)
                if out is not None:
                    out += buf[:n]
                _keep_tail(self._tail, buf[:n])
                if end >= 0 and n == len(buf) and buf[n - 1] == 13:
                    self._cr = 1
                    self._edges = True
                del buf[:n]
                self._scanned = 0
                if end < 0:
                    break
                self._passing = False
                self._tail_usage()
                continue
            if end < 0:
                if len(buf) <= MAX_EVENT or (len(buf) <= MAX_JSON_BODY and _final_response_event(buf)):
                    break
                self._passing = True
                self.c.unread += 1  # relayed, not read: what is assembled here lacks it
                self._generated()   # (it is output all the same)
                continue
            n = end + sep
            event = bytes(buf[:n])
            cr = n == len(buf) and buf[n - 1] == 13
            del buf[:n]
            try:
                keep = self._event(event)
            except Exception:  # an event of a shape nobody expected: relayed, not understood
                keep = True
            if out is not None and keep:
                out += event
            if cr:
                self._cr = 1 if keep else 2
                self._edges = True
        if out is None:
            return chunk
        return bytes(out)

    def _feed_coded(self, chunk: bytes) -> bytes:
        """Observe one chunk of a compressed body (``feed`` for one): what it decodes to is read
        as a plain body's chunks are, bounded alike; the chunk goes to the client as it came."""
        d = self._decoder
        if d is not None:
            try:
                for piece in d.pieces(chunk):
                    ResponseObserver.feed(self, piece)
            except Undecodable as e:
                self._stop(str(e))
        return chunk

    def _stop(self, why: str) -> None:
        """A compressed body that no longer decodes (corrupt, or a bomb) is not read further: the
        rest is relayed as it comes. A JSON body is then not parsed (it is not whole), save what
        its first bytes said when it was already too large to parse and then grew on (a bomb: its
        start decoded soundly); what a stream delivered before is kept, as an answer that lacks
        part of what the client got (as with an event too large to read)."""
        self.unreadable = why
        self._decoder = None
        self._buf.clear()
        self._tail.clear()  # (the last bytes decoded, not the body's end)
        if why != "bomb":
            self._lead = {}
        if self.streamed:
            self._passing = False
            self.c.unread += 1

    @property
    def body_whole(self) -> bool:
        """May the client's response end here without cutting its body short? Always for a plain
        body; a compressed one only once its end was seen (the client's decoder wants it: its last
        block and a gzip trailer come after the text's end)."""
        return self.coding is None or (self._decoder is not None and self._decoder.ended)

    def _edge(self, buf: bytearray, out: bytearray | None) -> None:
        """The bytes at the stream's edges, before its events are looked for: a UTF-8 byte order
        mark that starts the body (an SSE parser ignores it; read as a part of the first line, it
        would lose the first event) is not parsed; and an LF right after an event that ended on
        a CR is the second half of that CRLF (the event was not held back for it: an upstream
        with CR line ends that keeps its connection open sends none), so it goes with that event:
        relayed if it was, dropped if it was. Neither changes what the client gets."""
        if self._head:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                return  # (the first bytes of a BOM, or none yet: looked at again with more)
            self._head = False
            if buf.startswith(_BOM):
                del buf[:len(_BOM)]
                if out is not None:
                    out += _BOM
        elif self._cr and buf:
            if buf[0] == 10:
                del buf[:1]
                if out is not None and self._cr == 1:
                    out += b"\n"
            self._cr = 0
        self._edges = self._head or self._cr != 0

    @property
    def pending_lf(self) -> bool:
        """The last event was relayed ending on a CR at the end of a read: an LF may follow (the
        second half of a CRLF), which goes to the client with it."""
        return self._cr == 1

    def finish(self) -> bytes:
        """End of body: parse what is left; returns any bytes still to send."""
        if self.unreadable is not None:  # (a compressed body not read, or no longer)
            if not self.streamed and self._too_big:
                self._lead_members()
            self._buf.clear()
            return b""
        if not self.streamed:
            if self._buf and not self._too_big:
                try:
                    self._json(loads(self._buf))
                except JSON_ERRORS:
                    pass
                except Exception:  # valid JSON of a shape nobody expected: relayed, not understood
                    pass
            elif self._too_big:
                if self._tail_ok:  # (before the head's: of a key given twice, JSON takes the last)
                    self.c.model = tail_model(self._tail)
                self._tail_usage()
                self._lead_members()
            self._buf.clear()
            return b""
        rest = bytes(self._buf)
        self._buf.clear()
        if self._passing:
            _keep_tail(self._tail, rest)
            self._tail_usage()
            self._cut()
            return rest if self.strip else b""
        if rest.strip():
            try:
                keep = self._event(rest)
            except Exception:
                keep = True
            self._cut()
            if self.strip:
                return rest if keep else b""
        elif self.strip:
            return rest  # line ends left over: relayed as they came
        return b""

    def _cut(self) -> None:
        """The body ended inside an event: cut short, unless the answer was seen to end ([DONE], a
        finish reason; some servers end their last event without its blank line)."""
        c = self.c
        c.cut_mid_event = not c.ended and not c.done

    def _tail_usage(self) -> None:
        """The usage reported at the end of a body or event too large to parse, if there is one."""
        u = tail_usage(self._tail) if self._tail_ok else None
        self._tail.clear()
        if u is not None:
            self.c.usage = u

    def _lead_members(self) -> None:
        """What the first bytes of a JSON body too large to parse said: its usage if the end had
        none (vLLM reports it before ``prompt_logprobs``), its model if the end had none (OpenAI
        names it before the choices), its id and finish reasons."""
        lead, c = self._lead, self.c
        self._lead = {}
        if c.usage is None and _reports_tokens(lead.get("usage")):
            c.usage = lead["usage"]
        if c.model is None and isinstance(lead.get("model"), str):
            c.model = lead["model"]
        if isinstance(lead.get("id"), str):
            c.response_id = lead["id"]
        choices = lead.get("choices")
        if isinstance(choices, list):
            c.choices = len(choices)
            for ch in choices:
                fr = _finish(ch) if isinstance(ch, dict) else None
                if fr is not None:
                    c.finish_reasons.append(fr)
                    if ch.get("index", 0) == 0:
                        c.finish_reason = fr

    # -- parsing ---------------------------------------------------------------------------------
    def _event(self, event: bytes) -> bool:
        """Handle one SSE event; returns False if it must not reach the client."""
        body = event.rstrip(b"\r\n")  # (the blank line that ends it, whichever line ends it uses)
        if body.startswith(b"data: ") and b"\n" not in body and b"\r" not in body:
            data = body[6:]  # the common one-line event
        else:
            data_lines = []
            for line in event.splitlines():
                if line.startswith(b"data:"):
                    v = line[5:]
                    data_lines.append(v[1:] if v.startswith(b" ") else v)
                elif line.startswith(b"event:") and line[6:].strip() == b"error":
                    self.c.error = True
                elif line.startswith(b"error:"):
                    # a field named `error` (llama.cpp's server before its PR #16109 sent a failure
                    # mid-stream as `error: {...}`, then ended, maybe with [DONE]): an SSE parser
                    # ignores the field, but the answer is not a finished one
                    self.c.error = True
            if not data_lines:
                return True
            data = b"\n".join(data_lines)
        if data.strip() == b"[DONE]":
            self.c.done = True
            self.c.ended = True
            return True
        try:
            obj = loads(data)
        except JSON_ERRORS:
            return True
        if not isinstance(obj, dict):
            return True
        c = self.c
        kind = obj.get("type")
        if kind == "error":  # the Responses API's error event
            c.error = True
        if isinstance(kind, str):
            if kind.startswith("response."):
                self._response_event(kind, obj)  # the Responses API's typed events
                return True
            if kind in _MESSAGES_EVENTS:
                self._messages_event(kind, obj)  # the Messages API's (/v1/messages)
                return True
        self._named(obj)
        usage = obj.get("usage")
        choices = obj.get("choices")
        if not isinstance(choices, list):
            choices = []
            if _error_envelope(obj):
                c.error = True
        elif "error" in obj and isinstance(obj["error"], dict) and obj["error"]:
            # an error beside the choices (OpenRouter: a provider failing mid-stream, its chunk's
            # finish_reason "error"): the OpenAI SDKs raise it, and the answer is not a finished one
            c.error = True
        # (a usage with no count in it, "usage": {} or counts as strings, is no report: the deltas count)
        reported = usage is not None and _reports_tokens(usage)
        if reported:
            c.usage = usage
        elif usage is None and "x_groq" in obj:
            # Groq streams its usage in x_groq.usage, on the last chunk (with its choices): not a
            # usage-only chunk, so never taken out of the stream
            xg = obj["x_groq"]
            u = xg.get("usage") if isinstance(xg, dict) else None
            if u is not None and _reports_tokens(u):
                c.usage = u
                reported = True
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            index = ch.get("index", 0)
            if type(index) is int and c.choices <= index < MAX_CHOICES:
                c.choices = index + 1
            fr = ch.get("finish_reason")
            if fr and isinstance(fr, str):  # ("" is none: relays send it on every chunk but the last)
                c.finish_reasons.append(fr)
                if index == 0:
                    c.finish_reason = fr
                    c.done = True  # the answer is whole (a usage chunk or [DONE] may follow)
            delta = ch.get("delta")
            if index != 0:
                # other choices (n > 1) are not assembled, but what they generate is counted
                if (isinstance(delta, dict) and _generates(delta)) or (isinstance(ch.get("text"), str) and ch["text"]):
                    self._generated()
                continue
            if isinstance(delta, dict):
                self._delta(delta)
            elif isinstance(ch.get("text"), str):  # legacy /v1/completions stream
                self._text(ch["text"])
        if reported:  # (after its own event's deltas: a report on every chunk covers them)
            c.deltas_at_usage = c.deltas
            c.usage_on_output = bool(choices)
        if self.strip and isinstance(usage, dict) and not choices:
            return False  # the usage-only chunk the gateway asked for
        return True

    def _response_event(self, kind: str, obj: dict[str, Any]) -> None:
        """One event of a Responses API stream (``/v1/responses``): deltas of output text, function
        call arguments or reasoning count as generated output (and the text is assembled); the
        final ``response.completed`` / ``.incomplete`` / ``.failed`` event carries the usage."""
        c = self.c
        if kind.endswith(".delta"):
            d = obj.get("delta")
            if isinstance(d, str) and d:
                self._generated()
                if kind == "response.output_text.delta" and obj.get("content_index", 0) == 0:
                    # the text of the first message item (a reasoning item may come before it)
                    i = obj.get("output_index", 0)
                    if self._msg_index is None:
                        self._msg_index = i
                    if i == self._msg_index:
                        c._content = _cat(c._content, d)
                        c.role = "assistant"
            return
        if kind == "response.output_item.added" and self._msg_index is None:
            item = obj.get("item")
            if isinstance(item, dict) and item.get("type") == "message":
                self._msg_index = obj.get("output_index")
            return
        r = obj.get("response")
        if not isinstance(r, dict):
            return
        self._named(r)
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            if _reports_tokens(r.get("usage")):
                c.usage = r["usage"]
                c.deltas_at_usage = c.deltas
                c.usage_on_output = False
            reason = _response_status(r)
            if reason is not None:
                c.finish_reasons.append(reason)
                c.finish_reason = reason
            c.done = True
            if kind == "response.failed" or r.get("status") == "failed":
                c.error = True

    def _messages_event(self, kind: str, obj: dict[str, Any]) -> None:
        """One event of a Messages API stream (``/v1/messages``, which vLLM, Ollama, llama.cpp's
        server and others serve beside the OpenAI API): ``message_start`` names the model and
        reports the input tokens, each ``content_block_delta`` carries generated output (text,
        thinking, a tool call's input), ``message_delta`` the stop reason and the output tokens so
        far. The usage is the reports merged, the later counts over the earlier: the input tokens
        of the first with the output tokens of the last."""
        c = self.c
        if kind == "content_block_delta":
            d = obj.get("delta")
            if isinstance(d, dict):
                t = d.get("type")
                v = d.get(_MESSAGES_DELTA_TEXT.get(t, "")) if isinstance(t, str) else None
                if isinstance(v, str) and v:
                    self._generated()
                    if t == "text_delta":
                        c.deltas0 += 1
                        c._content = _cat(c._content, v)
                        c.role = "assistant"
            return
        if kind == "message_start":
            m = obj.get("message")
            if not isinstance(m, dict):
                return
            self._named(m)
            usage = m.get("usage")
        elif kind == "message_delta":
            d = obj.get("delta")
            reason = d.get("stop_reason") if isinstance(d, dict) else None
            if reason and isinstance(reason, str):
                c.finish_reasons.append(reason)
                c.finish_reason = reason
                c.done = True
            usage = obj.get("usage")
        else:
            if kind == "message_stop":
                c.done = True
            return
        if _reports_tokens(usage):
            merged = dict(c.usage) if c.usage else {}
            merged.update((k, v) for k, v in usage.items() if v is not None)
            c.usage = merged
            c.deltas_at_usage = c.deltas
            c.usage_on_output = False

    def _named(self, o: dict[str, Any]) -> None:
        """The answer's model and id, from the first object of it that names them."""
        c = self.c
        if not c.model and isinstance(o.get("model"), str):
            c.model = o["model"]
        if not c.response_id and isinstance(o.get("id"), str):
            c.response_id = o["id"]

    def _generated(self) -> None:
        """One delta of generated output (roughly one token): counted, and the first one timed."""
        c = self.c
        if c.t_first_token is None:
            c.t_first_token = time.perf_counter()
        c.deltas += 1

    def _text(self, text: str) -> None:
        if text:
            self._generated()
            self.c.deltas0 += 1
        self.c._content = _cat(self.c._content, text)

    def _delta(self, d: dict[str, Any]) -> None:
        c = self.c
        if isinstance(d.get("role"), str):
            c.role = d["role"]
        if _generates(d):
            self._generated()  # once per delta, whatever it carries (text, tool calls, refusal, audio, reasoning)
            c.deltas0 += 1
        v = d.get("content")
        if isinstance(v, str):  # (_cat, inlined: this runs for every delta of every stream)
            cur = c._content
            if type(cur) is _Parts:
                cur.append(v)
            elif cur is None:
                c._content = v
            else:
                c._content = _Parts((cur, v))
        v = d.get("refusal")
        if isinstance(v, str):
            c._refusal = _cat(c._refusal, v)
        a = d.get("audio")
        if isinstance(a, dict):
            # merged as the OpenAI SDK's stream accumulator does: the id as it first came, text
            # (transcript, base64 data) concatenated, anything else (expires_at) its last value
            acc = c._audio
            if acc is None:
                acc = c._audio = {}
            for k, v in a.items():
                cur = acc.get(k)
                if k == "id" and isinstance(cur, (str, _Parts)):
                    continue
                if isinstance(v, str) and isinstance(cur, (str, _Parts)):
                    if type(cur) is _Parts:
                        cur.append(v)
                    else:
                        acc[k] = _Parts((cur, v))  # joined when read (Completion.audio)
                elif v is not None or k not in acc:
                    acc[k] = v
        for field in ("reasoning_content", "reasoning"):
            r = d.get(field)
            if isinstance(r, str) and r:
                c._reasoning_field = field
                c._reasoning = _cat(c._reasoning, r)
                break
        tcs = d.get("tool_calls")
        if isinstance(tcs, list):
            calls = c._tool_calls
            for tc in tcs:
                if not isinstance(tc, dict):
                    continue
                i = tc.get("index")
                if i is None:
                    i = _unindexed(calls, tc)
                if type(i) is not int or not 0 <= i < MAX_TOOL_CALLS:
                    continue
                while len(calls) <= i:  # (a slot no delta fills stays equal to _UNUSED: left out)
                    calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                slot = calls[i]
                tid = tc.get("id")
                again = isinstance(tid, str) and tid == slot["id"]  # (the call's id repeated)
                if isinstance(tid, str):
                    slot["id"] = tid
                if isinstance(tc.get("type"), str):
                    slot["type"] = tc["type"]
                fn = tc.get("function")
                if isinstance(fn, dict):
                    name = fn.get("name")
                    if isinstance(name, str) and not (again and name == slot["function"]["name"]):
                        slot["function"]["name"] += name  # (a server repeating id and whole name: once)
                    if isinstance(fn.get("arguments"), str):
                        f = slot["function"]
                        f["arguments"] = _cat(f["arguments"] or None, fn["arguments"])
                    if not fn.keys() <= _FUNCTION_FIELDS:
                        _extras(slot["function"], fn, _FUNCTION_FIELDS)
                if not tc.keys() <= _TOOL_CALL_FIELDS:
                    # members of the call beyond the standard ones, which the backend needs back when
                    # the call is replayed (Gemini's extra_content.google.thought_signature)
                    _extras(slot, tc, _TOOL_CALL_FIELDS)
        v = d.get("extra_content")
        if v is not None:
            c.extra_content = v
        v = d.get("reasoning_details")
        if isinstance(v, list) and v:
            _reasoning_details(c, v)

    def _json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        c = self.c
        c.raw = obj
        c.done = True
        c.model = obj.get("model") if isinstance(obj.get("model"), str) else None
        c.response_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        if _reports_tokens(obj.get("usage")):
            c.usage = obj["usage"]
        if obj.get("object") == "response" and isinstance(obj.get("output"), list):
            self._response_json(obj)  # the Responses API's answer
            return
        choices = obj.get("choices")
        if not isinstance(choices, list) and _error_envelope(obj):
            c.error = True  # a 2xx body that is an error object
        c.choices = len(choices) if isinstance(choices, list) else 0
        for ch in choices if isinstance(choices, list) else ():
            if not isinstance(ch, dict):
                continue
            fr = _finish(ch)
            if fr is not None:
                c.finish_reasons.append(fr)
            if ch.get("index", 0) != 0:
                continue
            c.finish_reason = fr
            msg = ch.get("message")
            if isinstance(msg, dict):
                c.message = msg
                c.role = msg.get("role") if isinstance(msg.get("role"), str) else None
                c.content = msg.get("content") if isinstance(msg.get("content"), str) else None
                tcs = msg.get("tool_calls")
                c.tool_calls = tcs if isinstance(tcs, list) else []
            elif isinstance(ch.get("text"), str):
                c.content = ch["text"]
                c.role = "assistant"


    def _response_json(self, obj: dict[str, Any]) -> None:
        c = self.c
        if obj.get("status") == "failed":
            c.error = True
        reason = _response_status(obj)
        if reason is not None:
            c.finish_reasons.append(reason)
            c.finish_reason = reason
        for item in obj["output"]:
            if isinstance(item, dict) and item.get("type") == "message":
                parts = item.get("content")
                text = [p["text"] for p in parts if isinstance(p, dict) and p.get("type") == "output_text"
                        and isinstance(p.get("text"), str)] if isinstance(parts, list) else []
                c.content = "".join(text)
                c.role = "assistant"
                break


def _unindexed(calls: list[dict[str, Any]], tc: dict[str, Any]) -> int:
    """The slot of a streamed tool-call delta without ``index`` (some backends leave it out): the
    last call goes on unless the delta starts another (an id of its own, or a name and no id):
    a call streamed in pieces stays one call."""
    if calls:
        last = calls[-1]
        tid = tc.get("id")
        fn = tc.get("function")
        if tid is None or tid == "":
            # (a name after a delta that gave the id alone is that call's name)
            if not (isinstance(fn, dict) and fn.get("name")) or not last["function"]["name"]:
                return len(calls) - 1
        elif tid == last["id"]:
            return len(calls) - 1
    return len(calls)


def _finish(ch: dict[str, Any]) -> str | None:
    """A choice's finish reason; an empty string is none (some relays send ``""`` until the end)."""
    fr = ch.get("finish_reason")
    return fr if fr and isinstance(fr, str) else None


def _response_status(r: dict[str, Any]) -> str | None:
    """A Responses API answer's outcome as a finish reason: why it is incomplete (e.g.
    ``max_output_tokens``), else its status (``completed``, ``failed``)."""
    det = r.get("incomplete_details")
    if isinstance(det, dict) and isinstance(det.get("reason"), str):
        return det["reason"]
    return r["status"] if isinstance(r.get("status"), str) else None


#: The event types of a Messages API stream (``error`` is the Responses API's too, and handled so).
_MESSAGES_EVENTS = frozenset(("message_start", "content_block_start", "content_block_delta", "content_block_stop",
                              "message_delta", "message_stop", "ping"))
#: A Messages API delta's type -> the field with its generated text (a signature is not output).
_MESSAGES_DELTA_TEXT = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


def _generates(d: dict[str, Any]) -> bool:
    """Does this stream delta carry generated output: text, tool calls, a refusal, audio (its
    transcript or data), or reasoning (the ``reasoning_content`` / ``reasoning`` fields some
    backends stream before the answer)?"""
    a = d.get("audio")
    return bool((isinstance(d.get("content"), str) and d["content"]) or isinstance(d.get("tool_calls"), list)
                or (isinstance(d.get("refusal"), str) and d["refusal"])
                or (isinstance(a, dict) and ((isinstance(a.get("transcript"), str) and a["transcript"])
                                             or (isinstance(a.get("data"), str) and a["data"])))
                or (isinstance(d.get("reasoning_content"), str) and d["reasoning_content"])
                or (isinstance(d.get("reasoning"), str) and d["reasoning"]))


def _final_response_event(buf: bytearray) -> bool:
    """Is this the final event of a Responses API stream? It repeats the whole output, so it can
    be larger than MAX_EVENT, and it alone carries the usage: it is read whole, up to
    MAX_JSON_BODY (the bound on a JSON answer), rather than relayed unread."""
    head = bytes(buf[:300])
    return b"response.completed" in head or b"response.incomplete" in head or b"response.failed" in head


def _keep_tail(tail: bytearray, data: bytes | bytearray) -> None:
    tail += data[-TAIL:]
    if len(tail) > TAIL:
        del tail[:len(tail) - TAIL]


_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
_raw_decode = json.JSONDecoder().raw_decode


def tail_usage(tail: bytes | bytearray) -> dict[str, Any] | None:
    """The answer's own ``"usage": {...}`` from the end of a JSON text, if it reports tokens.

    Inside a JSON string a quote is always escaped, so ``"usage":`` followed by an object can
    only be a key. It is the answer's own when what follows it only closes objects, at most two
    (the answer, or the ``response`` of a Responses API event), with members of any value in
    between: the usage of an embeddings list, an image answer or a streamed final event, which
    comes after their large data. A usage inside an item of a list (stored answers) is followed
    by the list's end, and is not taken."""
    for m in reversed(list(_USAGE_KEY.finditer(tail))):
        text = bytes(tail[m.end() - 1:]).decode("utf-8", "replace")
        try:
            obj, end = _raw_decode(text)
        except (ValueError, RecursionError):
            continue
        if not _closes_the_text(text, end):
            return None  # the last usage is not the answer's own: none is
        return obj if _reports_tokens(obj) else None
    return None


#: A key is preceded by its object's ``{`` or a ``,`` (or by nothing: the window's start), never by
#: a backslash (an escaped quote: ``\"model": ...`` ending a key or a text).
_MODEL_KEY = re.compile(r'(?:^|[{,])[ \t\r\n]*"model"[ \t\r\n]*:')
#: Of the ``"model"`` keys at the end of a body, at most this many last ones are tried: each try
#: reads the rest of the window, so a window full of nested ones (a list of objects each naming a
#: model) costs a bounded amount of work, not one read of the window per key.
TAIL_MODEL_TRIES = 16


def tail_model(tail: bytes | bytearray) -> str | None:
    """The answer's own top-level ``"model"`` from the end of a JSON text too large to parse, if
    it is a string: a backend may name it after a huge ``choices`` (or ``data``).

    As for :func:`tail_usage`, a quote inside a JSON string is always escaped, so the text of a
    message or of tool arguments that says ``"model": ...`` is never a key here. A ``"model"`` key
    is the answer's own when what follows its value only closes one object, the answer, with
    members of any value in between, up to the end; one in an object nested in the answer (a
    choice, a message, an item of a list) is followed by that object's end and then more, and is
    not taken."""
    text = bytes(tail).decode("utf-8", "replace")
    for m in list(_MODEL_KEY.finditer(text))[::-1][:TAIL_MODEL_TRIES]:
        try:
            value, end = _raw_decode(text, _WS.match(text, m.end()).end())  # type: ignore[union-attr]
        except (ValueError, RecursionError):
            continue
        if _closes_the_text(text, end, levels=1):
            return value if type(value) is str else None
    return None


def _reports_tokens(u: Any) -> bool:
    """Is this a usage object that reports a token count?"""
    return isinstance(u, dict) and (any(x is not None for x in usage_tokens(u))
                                    or _int(u.get("total_tokens")) is not None)


def head_members(head: bytes | bytearray) -> dict[str, Any]:
    """The top-level members of a JSON object whose first bytes these are, as far as each is whole
    (followed by a ``,`` within them). Only members of the object itself are read, one after the
    other, so a ``"usage"`` inside a message's content or a nested object is never taken for the
    answer's own. Nothing if the object ends within them (the body, too large to parse, then holds
    more than one JSON value: JSON lines)."""
    text = bytes(head).decode("utf-8", "replace")
    i = _WS.match(text, 1 if text.startswith("\ufeff") else 0).end()  # type: ignore[union-attr]
    if text[i:i + 1] != "{":
        return {}
    out: dict[str, Any] = {}
    i += 1
    while True:
        try:
            key, i = _raw_decode(text, _WS.match(text, i).end())  # type: ignore[union-attr]
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if type(key) is not str or text[i:i + 1] != ":":
                return out
            value, i = _raw_decode(text, _WS.match(text, i + 1).end())  # type: ignore[union-attr]
        except (ValueError, RecursionError):  # (cut by the head's end, or not JSON)
            return out
        i = _WS.match(text, i).end()  # type: ignore[union-attr]
        sep = text[i:i + 1]
        if sep == "}":  # the whole object fitted: the body is more than one value
            return {}
        if sep != ",":
            return out  # (a value cut by the head's end may look whole: not taken)
        out[key] = value
        i += 1


_WS = re.compile(r"[ \t\r\n]*")


def _closes_the_text(text: str, i: int, levels: int = 2) -> bool:
    """Does ``text`` from ``i`` on only close objects (at most ``levels``), with members in between,
    up to its end?"""
    n, closed = len(text), 0
    while True:
        i = _WS.match(text, i).end()  # type: ignore[union-attr]
        if i >= n:
            return closed > 0
        c = text[i]
        if c == ",":
            try:
                key, i = _raw_decode(text, _WS.match(text, i + 1).end())  # type: ignore[union-attr]
                i = _WS.match(text, i).end()  # type: ignore[union-attr]
                if type(key) is not str or text[i:i + 1] != ":":
                    return False
                _, i = _raw_decode(text, _WS.match(text, i + 1).end())  # type: ignore[union-attr]
            except (ValueError, RecursionError):  # (a value nested deeper than the parser goes)
                return False
        elif c == "}" and closed < levels:
            closed += 1
            i += 1
        else:
            return False  # a list's end, or more than `levels` objects closed


def _find_event_end(buf: bytearray, start: int = 0) -> tuple[int, int]:
    """Index of the blank line ending the first event (searching from ``start``), and the
    separator length."""
    if buf.find(b"\r", start) < 0:  # the common case: LF line endings only
        return buf.find(b"\n\n", start), 2
    # Two line ends in a row, each CRLF, LF or CR (mixed too, as the SSE spec allows). A CR at the
    # end of the buffer counts as a line end: the blank line is whole then (the match holds two
    # line ends), even if it turns out to be the first half of a CRLF. It is not held back for the
    # next byte: a stream with CR line ends may send none for a while, or at all after [DONE]
    # (ResponseObserver._edge takes an LF that does follow as the end of this event).
    m = _BLANK_LINE.search(buf, start)
    if m is None:
        return -1, 0
    return m.start(), m.end() - m.start()


_BOM = b"\xef\xbb\xbf"
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


def _error_envelope(obj: dict[str, Any]) -> bool:
    """An error answer rather than a resource that carries an ``error`` field (a failed fine-tuning
    job): ``{"error": ...}`` with no ``object`` of its own, or ``{"object": "error", ...}`` (vLLM)."""
    return obj.get("object") == "error" or (bool(obj.get("error")) and "object" not in obj)


def ask_for_usage(ctx: Any) -> None:
    """For a streamed chat/completions request, make the upstream report usage in a final chunk.

    Remembers whether the client asked for it itself, so the core can hide the chunk otherwise."""
    body = ctx.body
    if b'"stream"' not in body and b"\\u" not in body:  # not a streamed request (unless spelled
        return                                           # with escapes): no need to parse it here
    j = ctx.json
    if not isinstance(j, dict) or not truthy(j.get("stream")):
        return
    j = ctx.json_exact  # re-serialised below
    opts = j.get("stream_options")
    if isinstance(opts, dict) and truthy(opts.get("include_usage")):
        ctx.client_wants_usage = True
        return
    new = dict(j)
    new["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    ctx.usage_original = (ctx.body, ctx._json)
    ctx.set_json(new)
    ctx.strip_usage_chunk = True
