"""The request handler: read the body, run the chain, forward, stream the answer back.

Kept minimal on purpose: the empty-chain path does no more than a bare aiohttp pass-through
(request id, header hygiene, bounded body read). Everything optional is skipped when no plugin
asked for it.
"""
from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict

from .context import SKIP_TIMINGS, RequestContext, about_stored, cut_while_sent, generates, other_encoding
from .errors import (BadRequest, GatewayError, HeadersTooLarge, HttpVersionNotSupported, InternalError, NotFound,
                     PayloadTooLarge, RequestTimeout, ServiceUnavailable, TransferCodingNotImplemented,
                     UnsupportedMediaType, error_body)
from .estimate import prompt_estimate
from .fastjson import JSON_ERRORS, dumps_bytes, loads
from .observe import (DECODABLE, DECODE_RATIO, MAX_DECODED, Decoder, ResponseObserver, Undecodable, ask_for_usage,
                      content_coding, decoded, decoded_head)
from .plugin import Plugin, Reply, ResponseHead
from .redact import mask_gateway_keys
from .upstream import CTL_CHAR, utf8

if TYPE_CHECKING:
    from .app import Gateway
    from .runtime import Chain, Settings

log = logging.getLogger("gateway.proxy")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$").match
# "." / ".." path segments (request.path is decoded, so %2e%2e counts): what the chain matches must be
# what the upstream serves, and the upstream would resolve them.
_DOT_SEGMENT = re.compile(r"(?:^|/)\.\.?(?:/|$)").search
#: What upstreams read differently from the gateway in a (decoded) request path.
_AMBIGUOUS = re.compile(r"[;\\\x00-\x1f\x7f]").search
_USAGE_PATHS = ("/chat/completions", "/completions")
#: Request Content-Encodings the server decodes (aiohttp: br and zstd only with their packages
#: installed; without them its parser refuses those with a 400).
try:
    from aiohttp.compression_utils import HAS_BROTLI as _BR, HAS_ZSTD as _ZSTD
except ImportError:  # pragma: no cover - an aiohttp without these flags
    _BR = _ZSTD = False
_DECODED = frozenset({"gzip", "deflate", "identity"} | ({"br"} if _BR else set()) | ({"zstd"} if _ZSTD else set()))
_DECODED_TEXT = ", ".join(sorted(_DECODED - {"identity"}))


#: One complete gzip member, holding nothing.
_EMPTY_GZIP = gzip.compress(b"")


def _gzip_unfinished(decompressor: Any) -> bool:
    """Is this gzip decoder part-way through a member? (After a whole member it starts a fresh
    one, which takes a complete empty member; one part-way through does not.)"""
    inner = getattr(decompressor, "_decompressor", None)
    try:
        probe = inner.copy()  # type: ignore[union-attr]
    except Exception:  # (a backend without copy(): not checked)
        return False
    try:
        probe.decompress(_EMPTY_GZIP)
    except Exception:
        return True
    return not probe.eof


def _refuse_unfinished_gzip() -> None:
    """aiohttp's body decoder refuses a deflate stream that stops before its end, but not a gzip
    one (gzip may hold several members: after each it waits for the next): a gzip body cut short
    (a client killed mid-upload, a proxy timing out) reached the handler as a shorter plain body,
    and was forwarded upstream as if whole. Its end-of-body step now refuses a gzip stream that
    stops inside a member (a ContentEncodingError: the request is answered 400)."""
    from aiohttp import http_parser
    from aiohttp.http_exceptions import ContentEncodingError

    cls = getattr(http_parser, "DeflateBuffer", None)
    feed_eof = getattr(cls, "feed_eof", None)
    if cls is None or feed_eof is None or getattr(feed_eof, "_gateway_gzip_end", False):
        return

    def checked_feed_eof(self: Any) -> None:
        if getattr(self, "encoding", None) == "gzip" and getattr(self, "size", 0) > 0 \
                and _gzip_unfinished(self.decompressor):
            raise ContentEncodingError("gzip")
        feed_eof(self)

    checked_feed_eof._gateway_gzip_end = True  # type: ignore[attr-defined]
    cls.feed_eof = checked_feed_eof


_refuse_unfinished_gzip()


def check_encoding(values: list[str]) -> None:
    """aiohttp decodes one request Content-Encoding it knows and passes anything else through raw; the
    gateway sends plain bodies upstream (the header is not forwarded), so the upstream would get encoded
    bytes labelled as plain. Refused instead (415): several codings, several header lines (which one
    the parser takes is not the same in its C and Python versions), or an unknown one."""
    if len(values) > 1:
        codings = ["several"]
    else:
        codings = [c.strip().lower() for c in values[0].split(",") if c.strip()]
    if not codings or (len(codings) == 1 and codings[0] in _DECODED):
        return
    raise UnsupportedMediaType(unsupported_encoding_message())


def _readable(ctype: str) -> bool:
    """Is a non-streamed answer with this media type worth reading for usage? JSON, text, or none
    named; not audio, images or file downloads (which would be copied into memory for nothing)."""
    t = ctype.lower()
    return not t.strip() or "json" in t or t.startswith("text/")


def _one_json(ctype: str) -> bool:
    """One JSON document (not JSON lines, nor JSON text sequences)."""
    t = ctype.lower()
    return "json" in t and not any(x in t for x in ("jsonl", "ndjson", "json-seq", "jsonlines"))


def _too_large(max_body: int, route: str | None) -> PayloadTooLarge:
    """The 413 for a body over ``max_body``, naming the setting that decides it (a route's own
    ``max_body_size``, else ``server.max_body_size``): an operator reading a client's report then
    knows which one to raise."""
    setting = "server.max_body_size" if route is None else f"max_body_size of route {route!r}"
    return PayloadTooLarge(f"Request body exceeds the limit of {max_body} bytes ({setting}).")


def undecodable_body_message() -> str:
    return "The request body could not be decoded as its Content-Encoding says."


def unsupported_encoding_message() -> str:
    return ("This Content-Encoding is not supported for request bodies; send the body plain, or in one "
            f"of: {_DECODED_TEXT}.")
_perf = time.perf_counter
#: Sent when the upstream names no server (instead of aiohttp's default, which carries versions).
SERVER = "gateway"


def _shutdown_error() -> GatewayError:
    """What a request still unanswered when a shutdown's drain time runs out gets (the connection
    closes after it: the gateway is stopping)."""
    return ServiceUnavailable("The gateway is shutting down and the request was not answered before its drain time "
                              "(server.shutdown_timeout) ran out; send it again.", code="gateway_shutdown",
                              headers={"Retry-After": "1"})


class PluginFailed(Exception):
    def __init__(self, plugin: str, phase: str) -> None:
        super().__init__(f"plugin {plugin} failed in {phase}")
        self.plugin, self.phase = plugin, phase


class Proxy:
    def __init__(self, gw: "Gateway") -> None:
        self.gw = gw
        #: connections with a request in the gateway's hands (a stop closes the others at once)
        self.busy: set[Any] = set()
        #: the handlers' tasks running (cut when a shutdown's drain time is up), and those cut
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cutting: set[asyncio.Task[Any]] = set()

    def cut(self) -> int:
        """A shutdown's drain time is up: cancel every handler still running. One that has sent
        nothing yet answers 503 ``gateway_shutdown`` first (see ``handle``); a response under way
        is cut off. The number of handlers cut."""
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            self._cutting.add(t)
            t.cancel()
        return len(tasks)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rt = self.gw.runtime
        rid = request.headers.get("X-Request-ID")
        if rid is None or not _SAFE_ID(rid):
            rid = uuid.uuid4().hex
        chain = rt.match_request(request)
        ctx = RequestContext(request, rid, chain.name, rt.settings)
        if chain.max_body:
            ctx.max_body = chain.max_body
        if ctx.settings.server_timing or (rt.record_timings and SKIP_TIMINGS not in request):
            ctx.timings = []
        rt.enter()
        transport = request.transport
        self.busy.add(transport)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await self._handle(ctx, chain)
        except ConnectionResetError:  # the client went away while we were answering
            ctx.outcome = self._cut()
            return web.Response(status=499)
        except asyncio.CancelledError:
            # aiohttp cancels a handler when its client goes away, and the gateway (cut()) when a
            # shutdown's drain time (server.shutdown_timeout) runs out with the request in flight.
            if task in self._cutting:
                ctx.outcome = "gateway_shutdown"
                if not ctx.status and not request.writer.output_size and task.uncancel() == 0:
                    # Nothing sent yet (the upstream's answer not begun, say): the client gets an
                    # answer it can act on instead of a dropped connection.
                    return await self._send_error(ctx, chain, _shutdown_error())
            else:
                ctx.outcome = self._cut()
            raise
        finally:
            ctx.t_end = _perf()
            c = ctx.completion
            if c is not None and c.relayed_tokens is not None and c.prompt_tokens is None \
                    and (c.deltas or 200 <= ctx.status < 300):
                # A stream that ended without reporting its prompt's tokens (cut short, or an
                # upstream ignoring include_usage): every ledger records the gateway's estimate.
                # (An error answered as a stream, with no output, generated nothing.)
                try:
                    c.prompt_estimate = prompt_estimate(ctx.json)
                except Exception:
                    log.exception("prompt estimate failed (request %s)", rid)
            elif c is None and ctx.observe and ctx.t_upstream is not None and ctx.t_headers is None \
                    and cut_while_sent(ctx) and generates(ctx.method, ctx.lpath):
                # Cut before the response head, the upstream reading the prompt: its estimate.
                try:
                    ctx.cut_estimate = prompt_estimate(ctx.json) or None
                except Exception:
                    log.exception("prompt estimate failed (request %s)", rid)
            cancelled = False
            try:
                for p in chain.complete:
                    try:
                        await p.on_complete(ctx)
                    except asyncio.CancelledError:
                        # The client left (aiohttp cancels the handler) while this plugin was handing
                        # over its record: the others still record the exchange.
                        cancelled = True
                        task = asyncio.current_task()
                        if task is not None:
                            task.uncancel()
                    except Exception:
                        log.exception("plugin %s failed in on_complete (request %s)", p.name, rid)
            finally:
                if self.gw.stopping and (not request.body_exists or request.content.is_eof()):
                    # A response begun before the stop went out without Connection: close. Its
                    # connection must not take another request now (the drain may end before its
                    # answer, after the upstream did the work): nothing more is read from it. (One
                    # whose body was left unread was answered Connection: close, and is closed once
                    # the rest of that body is in.)
                    with contextlib.suppress(Exception):
                        request.protocol.close()
                self.busy.discard(transport)
                self._tasks.discard(task)
                self._cutting.discard(task)
                rt.leave()
            if cancelled:
                raise asyncio.CancelledError

    def _cut(self) -> str:
        """Why a response was cut off: its client left, or (once a shutdown's drain time,
        server.shutdown_timeout, has run out) the shutdown closed the connection."""
        d = self.gw.drain_deadline
        return "gateway_shutdown" if d is not None and time.monotonic() >= d else "client_disconnected"

    async def _handle(self, ctx: RequestContext, chain: "Chain") -> web.StreamResponse:
        request = ctx.request
        try:
            if request.version.major != 1:  # (an HTTP/2.0 or 0.9 request line over HTTP/1)
                raise HttpVersionNotSupported()
            if "." in request.path and _DOT_SEGMENT(request.path):
                raise BadRequest("The request path must not contain '.' or '..' segments.")
            if _AMBIGUOUS(request.path):
                # Read otherwise by some upstreams: ';' starts path parameters for Java servers
                # (Spring, Tomcat: /chat/completions;x is /chat/completions), '\' is a '/' to
                # others; the route (and its rules) must be the one the upstream serves.
                raise BadRequest("The request path must not contain ';', '\\' or control characters.")
            size = 0
            for name, value in request.headers.items():
                size += len(name) + len(value)
                if not value.isascii() and not utf8(value):
                    # (Latin-1 "Jos\xe9": aiohttp keeps such bytes as surrogates, which its writer
                    # drops: the upstream would get another value than the client sent, X-Forwarded-For
                    # and Host included, and a key with such a byte in it would not be masked first.
                    # Refused before the chain runs, so no plugin records a request not forwarded.)
                    raise BadRequest(f"The value of the header {name[:64]} is not UTF-8 text; it cannot be "
                                     "forwarded as sent.")
            if size > MAX_HEAD:
                # (the parser takes 128 lines of 8 KiB each: a 1 MB head, forwarded, is refused by most
                # upstreams with something less clear, after every plugin has run)
                raise HeadersTooLarge(f"The request's header fields add up to more than {MAX_HEAD} bytes.")
            if "//" in request.path:
                # An empty segment: routes would not match it (/v1//chat is not below /v1/chat) while
                # an upstream that merges slashes (nginx does by default) serves it as /v1/chat.
                raise BadRequest("The request path must not contain empty segments ('//').")
            settings = ctx.settings
            if not request.path.startswith(settings.paths_below) and request.path not in settings.paths \
                    and not chain.serves(request.path):
                v1 = "/v1" + request.path
                hint = (" The OpenAI API is under /v1: a client's base URL ends in /v1 (http://host:port/v1)."
                        if not request.path.startswith("/v1/") and (v1.startswith(settings.paths_below)
                                                                      or v1 in settings.paths) else "")
                raise NotFound(f"No route for {request.path}.{hint}")
            if chain.headers:
                reply = await self._run_request_hooks(ctx, chain.headers, "headers")
                if reply is not None:
                    return await self._send_reply(ctx, chain, reply)
            await self._read_body(ctx, chain)
            body = ctx.body
            reply = await self._run_request_hooks(ctx, chain.request, "request")
            if reply is not None:
                return await self._send_reply(ctx, chain, reply)
            if chain.before_forward and ctx.body is not body:  # (only for a body a plugin changed)
                reply = await self._run_request_hooks(ctx, chain.before_forward, "forward")
                if reply is not None:
                    return await self._send_reply(ctx, chain, reply)
            if chain.chunk:  # (the plugins that read or change the answer read it uncompressed)
                ctx.upstream_headers.setdefault("Accept-Encoding", "identity")
            if chain.observe or ctx.observe:
                ctx.observe = True
                if request.method == "POST" and ctx.lpath.endswith(_USAGE_PATHS) \
                        and self.gw.upstream.asks_usage(ctx.settings.upstream, ctx.request.rel_url):
                    ask_for_usage(ctx)
            if ctx.non_finite:
                # The plugins that read the body could not (limits by model, memory, recording):
                # refused rather than passed on around them.
                raise BadRequest("The request body holds a number JSON cannot carry (NaN, Infinity, or one "
                                 "beyond a double's range).", code="invalid_number")
            if not chain.forward:
                raise NotFound(f"The gateway does not forward {request.method} {request.path} (the route "
                               f"{chain.name!r} is closed).")
            return await self._forward(ctx, chain)
        except GatewayError as e:
            return await self._send_error(ctx, chain, e)
        except PluginFailed as e:
            # The 500 replaces the response; the response hooks run on it (it is what the client
            # gets: CORS, rate-limit headers ...), except the one that just failed in on_response.
            # After the upstream answered (a response hook failed), the OpenAI SDKs would retry the
            # 500 twice: the upstream would do the work again, for the same hook to fail.
            answered = e.phase in ("on_response", "on_chunk")
            return await self._send_error(ctx, chain, InternalError(headers={"x-should-retry": "false"} if answered
                                                                    else None),
                                          skip=e.plugin if e.phase == "on_response" else None)

    async def _run_request_hooks(self, ctx: RequestContext, plugins: list[Plugin], phase: str) -> Reply | None:
        """``on_headers``, ``on_request`` or ``on_forward`` of each plugin in chain order, up to the
        first reply."""
        timings = ctx.timings
        hook = "on_" + phase
        for p in plugins:
            try:
                if timings is None:
                    reply = await getattr(p, hook)(ctx)
                else:
                    t0 = _perf()
                    reply = await getattr(p, hook)(ctx)
                    timings.append((p.name, phase, t0, _perf()))
                if reply is not None and not isinstance(reply, Reply):
                    raise TypeError(f"{hook} returned {type(reply).__name__}, not a Reply or None")
            except GatewayError:
                raise
            except Exception:
                log.exception("plugin %s failed in %s (request %s)", p.name, hook, ctx.request_id)
                raise PluginFailed(p.name, hook) from None
            if reply is not None:
                if reply.status >= 400:  # a refusal; a 2xx/3xx reply is a plugin answering itself
                    ctx.outcome = "refused"
                    if ctx.refusal is None:
                        ctx.refusal = {"plugin": p.name, "reason": "refused"}
                    elif "plugin" not in ctx.refusal:
                        ctx.refusal["plugin"] = p.name
                return reply
        return None

    async def _read_body(self, ctx: RequestContext, chain: "Chain") -> None:
        request = ctx.request
        if not request.body_exists:
            return
        max_body = ctx.max_body
        route = chain.name if chain.max_body else None  # (whose max_body_size decides: None, the server's)
        cl = request.content_length
        if cl is not None and cl > max_body:
            raise _too_large(max_body, route)
        if "Content-Encoding" in request.headers:
            check_encoding(request.headers.getall("Content-Encoding"))
        if "Transfer-Encoding" in request.headers and \
                ",".join(request.headers.getall("Transfer-Encoding")).strip().lower() != "chunked":
            raise TransferCodingNotImplemented()  # e.g. "gzip, chunked": the parser undoes the chunking only
        if "Expect" in request.headers and request.headers["Expect"].lower() == "100-continue" \
                and request.version == aiohttp.HttpVersion11:
            # The client waits for this before sending the body: only once the size check passed.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        content = request.content
        if content.is_eof():  # the whole body is already in (the common case): no timer
            body = await self._read_payload(request, None, ctx.settings, max_body, route)
        else:
            wait = ctx.settings.body_timeout
            try:
                async with asyncio.timeout(wait) as stall:
                    body = await self._read_payload(request, stall, ctx.settings, max_body, route)
            except TimeoutError:
                raise RequestTimeout(f"No request body bytes arrived for {wait:g} seconds.") from None
        ctx.body = body
        ctx.bytes_in = len(body)
        if other_encoding(body) and "json" in request.headers.get("Content-Type", "json"):
            ctx.json  # JSON with a byte order mark or in UTF-16/32: read now, forwarded as UTF-8
            if len(ctx.body) > max_body:  # (UTF-8 can take more bytes than UTF-16 did)
                raise _too_large(max_body, route)
        if b"gw" in ctx.body or b"\\u" in ctx.body:  # (a key in the model, maybe JSON-escaped)
            _mask_key_as_model(ctx)

    async def _read_payload(self, request: web.BaseRequest, stall: asyncio.Timeout | None,
                            settings: "Settings", max_body: int, route: str | None) -> bytes:
        """The request body; each chunk that arrives pushes the ``stall`` deadline back."""
        content = request.content
        cl = request.content_length
        loop_time = asyncio.get_running_loop().time
        # With a Content-Encoding the server hands us the decoded body, whose size Content-Length
        # does not give: read it to the end, bounded like a chunked one.
        if cl is not None and "Content-Encoding" not in request.headers:
            body = await content.read(cl) if cl else b""
            if len(body) >= cl:
                return body
            got = bytearray(body)  # (a slow client's pieces: appended, not the whole copied each time)
            while len(got) < cl:  # read() may return short on a slow client
                if stall is not None:
                    stall.reschedule(loop_time() + settings.body_timeout)
                more = await content.read(cl - len(got))
                if not more:
                    break
                got += more
            return bytes(got)
        buf = bytearray()
        while True:
            try:
                chunk = await content.readany()
            except (RequestPayloadError, PayloadEncodingError):
                # e.g. a body labelled gzip that is not: the client's error, not the gateway's
                raise BadRequest(undecodable_body_message()) from None
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > max_body:
                raise _too_large(max_body, route)
            if stall is not None:
                stall.reschedule(loop_time() + settings.body_timeout)

    # -- responses the gateway makes itself -------------------------------------------------------
    async def _send_reply(self, ctx: RequestContext, chain: "Chain", reply: Reply) -> web.StreamResponse:
        headers: CIMultiDict[str] = CIMultiDict(reply.headers)
        headers["Content-Type"] = reply.content_type
        return await self._send_local(ctx, chain, reply.status, reply.body, headers)

    async def _send_error(self, ctx: RequestContext, chain: "Chain", err: GatewayError,
                          skip: str | None = None) -> web.StreamResponse:
        ctx.error = err.code
        if ctx.outcome in ("ok", "refused"):
            ctx.outcome = "error"
        headers: CIMultiDict[str] = CIMultiDict(err.headers)
        headers["Content-Type"] = "application/json"
        return await self._send_local(ctx, chain, err.status, err.body(), headers, skip)

    async def _send_local(self, ctx: RequestContext, chain: "Chain", status: int, body: bytes,
                          headers: CIMultiDict[str], skip: str | None = None) -> web.StreamResponse:
        ctx.source = "gateway"
        headers.setdefault("Server", SERVER)
        head = ResponseHead(status, headers, "gateway")
        try:
            await self._run_on_response(ctx, chain, head, skip)
        except PluginFailed:
            err = InternalError()
            ctx.error, ctx.outcome = err.code, "error"
            head = ResponseHead(err.status, CIMultiDict({"Content-Type": "application/json", "Server": SERVER}),
                                "gateway")
            body = err.body()
        head.headers["X-Request-ID"] = ctx.request_id
        resp = web.Response(status=head.status, body=body, headers=head.headers)
        request = ctx.request
        unread = request.body_exists and not request.content.is_eof()
        if self.gw.stopping or _must_close(request) or request.version.major != 1 or unread:
            # "Connection: close": the client sends its next request elsewhere (also when the body
            # was not read: an Expect: 100-continue client never sends it, so what comes next on
            # the connection would be read as that body)
            resp.force_close()
        if unread:
            discard_unread_coded_body(request)
        ctx.status = head.status
        try:
            # aiohttp's write waits while the client reads nothing (the answers to pipelined
            # requests it never reads pile up; a large reply): at most send_timeout, then cut.
            async with asyncio.timeout(ctx.settings.send_timeout):
                await resp.prepare(request)
                await resp.write_eof()
        except TimeoutError:
            ctx.outcome, ctx.error = "client_disconnected", "client_stalled"
            log.info("client read nothing for %gs; connection cut (request %s)", ctx.settings.send_timeout,
                     ctx.request_id)
            if request.transport is not None:
                request.transport.abort()
            return resp
        ctx.bytes_out = len(body)
        ctx.t_first_byte = _perf()
        if ctx.error == RequestTimeout.code and ctx.request.transport is not None:
            # aiohttp would wait (its lingering time) for the rest of a body that stopped coming
            ctx.request.transport.close()
        return resp

    async def _run_on_response(self, ctx: RequestContext, chain: "Chain", head: ResponseHead,
                               skip: str | None = None) -> None:
        timings = ctx.timings
        # Headers plugins set while handling the request go on first, so the response hooks see
        # (and may still change or remove) them. An upstream 429 that says why in rate-limit
        # headers of its own keeps them, and gets none of the gateway's (its
        # x-ratelimit-remaining-tokens: 0 beside the gateway's figures would contradict it).
        theirs = head.status == 429 and head.source == "upstream" and any(
            k.lower().startswith(_RATE_LIMIT_HEADERS) for k in head.headers)
        for k, v in ctx.response_headers.items():
            if not (theirs and k.lower().startswith(_RATE_LIMIT_HEADERS)):
                head.headers[k] = v
        for p in chain.response:
            if skip is not None and p.name == skip:
                continue
            try:
                if timings is None:
                    await p.on_response(ctx, head)
                else:
                    t0 = _perf()
                    await p.on_response(ctx, head)
                    timings.append((p.name, "response", t0, _perf()))
            except Exception:
                log.exception("plugin %s failed in on_response (request %s)", p.name, ctx.request_id)
                raise PluginFailed(p.name, "on_response") from None
        if ctx.settings.server_timing and timings is not None:
            st = server_timing(ctx)
            if st:  # nothing ran that took time (a request refused before the chain): no header
                head.headers["Server-Timing"] = st

    # -- forwarding --------------------------------------------------------------------------------
    async def _forward(self, ctx: RequestContext, chain: "Chain") -> web.StreamResponse:
        up = self.gw.upstream
        target = ctx.settings.upstream
        ctx.t_upstream = _perf()
        resp = await up.send(ctx, target)
        pending = b""
        original = ctx.usage_original
        if original is not None and ctx.strip_usage_chunk and resp.status in (400, 422) \
                and not (isinstance(original[1], dict) and "stream_options" in original[1]):
            # An upstream that refuses fields it does not know (an older server) may refuse the
            # stream_options the gateway added (the client sent none): ask again as the client
            # asked. Only an upstream that then accepts the request is taken to refuse the field
            # (a client's own mistake never changes what the gateway sends for everyone).
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                pending = await resp.content.read(_ERROR_PEEK)
            coding = content_coding(resp.headers)
            said = pending if coding is None else decoded_head(coding, pending, _ERROR_PEEK) or b""
            if b"stream_options" in said:  # (a compressed answer: in what it decodes to)
                resp.close()
                ctx.body, ctx._json = original
                ctx.usage_original = None
                ctx.strip_usage_chunk = False
                pending = b""
                resp = await up.send(ctx, target)
                if 200 <= resp.status < 300:
                    up.refused_usage(target, ctx.request.rel_url)
        ctx.t_headers = _perf()
        ctx.source = "upstream"
        try:
            return await self._relay(ctx, chain, resp, pending)
        finally:
            if resp not in DRAINING:
                resp.close()  # releases (or, if not fully read, drops) the upstream connection

    async def _relay(self, ctx: RequestContext, chain: "Chain", resp: aiohttp.ClientResponse,
                     pending: bytes = b"") -> web.StreamResponse:
        """Relay the upstream's response (``pending``: its first bytes, already read)."""
        request = ctx.request
        ctype = resp.headers.get("Content-Type", "")
        streamed = ctype[:17].lower() == "text/event-stream"  # media types are case-insensitive
        content = resp.content
        # The upstream may compress its answer though the gateway asked for none (a reverse proxy
        # in front of it, say): the client gets it as it came, and the observer reads a copy.
        coding = content_coding(resp.headers)
        if not streamed and not pending and ctx.observe and 200 <= resp.status < 300 and ctx.stream_requested \
                and (coding is None or coding in DECODABLE):
            # A streamed request answered without text/event-stream (a server that names no media
            # type, text/plain, or even application/json): if its first bytes are SSE, it is read
            # as SSE, so its usage is counted and the usage chunk the gateway asked for does not
            # reach the client. (JSON cannot start like an event: `data:`, `event:`, `:`.) The
            # first bytes of a compressed body are the first bytes it decodes to.
            verdict = None
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                # (a failure here shows again on the next read)
                while verdict is None and len(pending) < (64 if coding is None else _SNIFF_CODED):
                    more = await content.readany()
                    if not more:
                        break
                    pending += more
                    start = pending if coding is None else decoded_head(coding, pending)
                    verdict = _sse_start(start) if start is not None else False
            streamed = verdict is True
        filtered = ctx._json_filter is not None and 200 <= resp.status < 300
        if filtered:  # (an event stream is no JSON: a 502, as any other answer it cannot read)
            pending = await _filter_json(ctx, content, pending, coding)
            content, coding, streamed = _READ_ALL, None, False
        ctx.streamed = streamed
        chunk_plugins = chain.chunk
        decoder = None
        if chunk_plugins and coding is not None:
            # Compressed though the gateway asked for no encoding (a proxy in front of the upstream):
            # the plugins that read or change the body get it decoded, and so does the client.
            if coding in DECODABLE:
                decoder, coding = Decoder(coding), None
            elif 200 <= resp.status < 300 and resp.status != 204 and request.method != "HEAD":
                raise _unreadable(ctx, f"a plugin reads the answer (on_chunk), and its Content-Encoding "
                                       f"{coding[:40]} is not one the gateway decodes")
            else:  # (an error answer, or none with a body: relayed as it came, its status and headers kept)
                chunk_plugins = []
        observer = None
        if ctx.observe:
            strip = ctx.strip_usage_chunk and not ctx.client_wants_usage
            observer = ResponseObserver(streamed, strip, readable=_readable(ctype),
                                        tail=request.method == "POST" and (streamed or _one_json(ctype)),
                                        coding=coding)
            if not about_stored(request.method, ctx.lpath):
                ctx.completion = observer.c
            if coding is not None:
                _tell_coding(coding, observer, streamed and strip)
        # What tells the stream's end ([DONE]): the observer, or where plugins change the body (and
        # may hold a tail back until the end), a reader of the upstream's own events.
        ender = observer
        if chunk_plugins and streamed:
            ender = ResponseObserver(True, False, readable=_readable(ctype), tail=False)
        transform = bool(chunk_plugins) or (observer is not None and observer.strip)
        headers = self.gw.upstream.response_headers(resp, keep_length=not transform, target=ctx.settings.upstream)
        headers.setdefault("Server", SERVER)
        if filtered or decoder is not None:
            # (the upstream's validators name the body it sent, not this one)
            for h in ("Content-Encoding", "Content-Length", "ETag", "Content-MD5", "Digest", "Content-Digest"):
                headers.popall(h, None)
            if not transform:
                headers["Content-Length"] = str(len(pending))
        rid = headers.get("X-Request-ID")
        if rid is not None and rid != ctx.request_id and len(rid) <= 200:
            # The upstream's own id (what its support asks for) goes on under another name: the
            # client's X-Request-ID is the gateway's, which the audit trail and the logs know.
            ctx.upstream_request_id = rid
            headers["X-Upstream-Request-ID"] = rid
        if streamed or "ndjson" in ctype.lower():
            # A reverse proxy in front (nginx) would otherwise buffer the events (or an NDJSON
            # stream's lines: Ollama's own API) and deliver them in lumps: to an HTTP/1.0 hop,
            # with gzip on text/event-stream, under proxy_buffering.
            headers.setdefault("X-Accel-Buffering", "no")
        head = ResponseHead(resp.status, headers, "upstream")
        await self._run_on_response(ctx, chain, head)
        head.headers["X-Request-ID"] = ctx.request_id
        reason = resp.reason if resp.reason is None or not CTL_CHAR(resp.reason) else None  # (None: the standard one)
        out = web.StreamResponse(status=head.status, reason=reason, headers=head.headers)
        sized = "Content-Length" in head.headers
        if self.gw.stopping or _must_close(request) or (not sized and request.version < aiohttp.HttpVersion11):
            # (an HTTP/1.0 client reads a body without a length to the connection's end)
            out.force_close()
        ctx.status = head.status
        try:
            await out.prepare(request)
        except ValueError as e:  # a header a plugin set that HTTP cannot carry
            ctx.status = None
            log.error("plugin response headers cannot be sent (request %s): %s", ctx.request_id, e)
            raise InternalError() from None
        sent = 0
        last = b""  # the last chunk sent (does the client's stream end on an event's end?)
        complete = done_early = lf_grace = False
        try:
            while True:
                try:
                    if pending:
                        chunk, pending = pending, b""
                    elif lf_grace:
                        try:
                            # (a compressed stream's end is a block and a trailer: given longer)
                            async with asyncio.timeout(LF_GRACE if ender is None or ender.body_whole
                                                       else CODED_GRACE):
                                chunk = await content.readany()
                        except TimeoutError:  # no LF: a stream with CR line ends, ended at [DONE]
                            complete = done_early = True
                            break
                    else:
                        chunk = await content.readany()  # the connection's read timeout is `idle`
                except (aiohttp.ServerTimeoutError, TimeoutError):
                    ctx.outcome = "upstream_timeout"
                    log.warning("upstream idle timeout mid-response (request %s)", ctx.request_id)
                    break
                except (aiohttp.ClientError, OSError) as e:
                    ctx.outcome = "upstream_disconnected"
                    log.warning("upstream ended mid-response (request %s): %s", ctx.request_id, type(e).__name__)
                    break
                if not chunk:
                    complete = True
                    break
                if chunk_plugins:
                    # The plugins first, then the observer: what is recorded (the stored answer,
                    # its usage) is what the client gets, as a plugin made it.
                    if decoder is not None:
                        chunk = _decode(ctx, decoder, chunk)
                    if ender is not observer:
                        ender.feed(chunk)
                    for p in chunk_plugins:
                        if not chunk:  # (nothing decoded yet, or held back by the plugin before)
                            break
                        chunk = await self._on_chunk(ctx, p, chunk, False)
                if observer is not None:
                    chunk = observer.feed(chunk)
                if chunk:
                    if sent == 0:
                        ctx.t_first_byte = _perf()
                    await _send(ctx, out, chunk)
                    sent += len(chunk)
                    last = chunk
                if ender is not None and ender.c.ended and not sized:
                    # [DONE] is the stream's last event: the answer is whole even if the upstream
                    # keeps the connection open (the client would wait out the idle timeout). Not
                    # when a Content-Length is relayed: the client then waits for all those bytes.
                    if (ender.pending_lf and not lf_grace) or not ender.body_whole:
                        # It ended on a CR at the end of a read: the LF of a CRLF stream's last
                        # line end is a moment behind (the client gets every byte the upstream sent).
                        # A compressed stream's end (its last block, a gzip trailer) comes after
                        # [DONE]: read on while it comes, each read as briefly.
                        lf_grace = True
                        continue
                    complete = done_early = True
                    break
            tail = b""
            if chunk_plugins:
                if decoder is not None:
                    tail = _decode(ctx, decoder, b"")
                for p in chunk_plugins:
                    # (what the plugins before it flushed is a piece like any other; its own last
                    # call gets an empty chunk, as the contract says)
                    piece = await self._on_chunk(ctx, p, tail, False) if tail else b""
                    tail = piece + await self._on_chunk(ctx, p, b"", True)
            if observer is not None:
                tail = (observer.feed(tail) if tail else b"") + observer.finish()
            if observer is not None and observer.unreadable in ("corrupt", "bomb"):
                log.warning("upstream body (Content-Encoding: %s) %s; relayed as it came, not read for usage "
                            "(request %s)", (coding or "")[:40], "did not decode" if observer.unreadable == "corrupt"
                            else f"inflated beyond the observer's bounds ({MAX_DECODED} bytes, {DECODE_RATIO}:1)",
                            ctx.request_id)
            if observer is not None and observer.c.error and ctx.outcome == "ok" and request.method == "POST" \
                    and 200 <= resp.status < 300 and ctx.lpath.endswith(_GENERATION_PATHS):
                ctx.outcome = "upstream_error"  # a generation answered 2xx with an error in its body
            if observer is not None and observer.c.cut_mid_event and ctx.outcome == "ok" \
                    and "Content-Length" not in resp.headers \
                    and "chunked" not in resp.headers.get("Transfer-Encoding", "").lower():
                # A body delimited by the connection's close (HTTP/1.0, no length) ended inside an
                # event, with no [DONE] and no finish: the upstream went away mid-answer, and the
                # client must see the cut as such.
                ctx.outcome, complete = "upstream_disconnected", False
                log.warning("upstream ended mid-event (request %s)", ctx.request_id)
            if tail:
                await _send(ctx, out, tail)
                sent += len(tail)
                last = tail
            ctx.bytes_out = sent
            if not complete:
                # The upstream's body came up short (it went away, or went silent): the client must
                # see the connection drop (no final chunk), not a message that looks complete. A
                # stream of events says why first, as an error event (the OpenAI SDKs raise it as
                # an APIError), if what the client got ends on an event's end (and no length was
                # relayed: the event would fill the bytes missing, and the body look whole).
                if streamed and coding is None and not sized and (sent == 0 or last.endswith(_EVENT_END)):
                    event = _cut_event(ctx.outcome, ctx.lpath)
                    with contextlib.suppress(Exception):
                        await _send(ctx, out, event)
                        ctx.bytes_out = sent + len(event)
                        # (the gateway's error, in the event's code; and the client's first byte
                        # when nothing came before it)
                        ctx.error = _cut_code(ctx.outcome)
                        if sent == 0:
                            ctx.t_first_byte = _perf()
                if request.transport is not None:
                    request.transport.close()
                return out
            await _send(ctx, out, None)
            if sent == 0:  # an empty body (HEAD, 204...): the head, sent with the end, was the first byte
                ctx.t_first_byte = _perf()
            if done_early:
                DRAINING[resp] = asyncio.create_task(_drain(resp))
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            ctx.outcome = self._cut()
            ctx.bytes_out = sent
        except ClientStalled:
            # The client read nothing for send_timeout: cut, so the upstream connection it held
            # (the response's reading waits on the client) goes back to the pool.
            ctx.outcome, ctx.error = "client_disconnected", "client_stalled"
            ctx.bytes_out = sent
            log.info("client read nothing for %gs; response cut (request %s)", ctx.settings.send_timeout,
                     ctx.request_id)
            if request.transport is not None:
                request.transport.abort()
        except asyncio.CancelledError:  # the client went away (the server cancels the handler)
            ctx.bytes_out = sent
            if asyncio.current_task() in self._cutting and streamed and coding is None and not sized \
                    and (sent == 0 or last.endswith(_EVENT_END)):
                # A shutdown's drain time is up mid-stream: as for a cut by the upstream, an error
                # event says why (the OpenAI SDKs raise it), rather than a bare network error.
                event = _cut_event("gateway_shutdown", ctx.lpath)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(0.5):
                        await out.write(event)
                    ctx.bytes_out = sent + len(event)
                    ctx.error = "gateway_shutdown"
                    if sent == 0:
                        ctx.t_first_byte = _perf()
            raise
        except (PluginFailed, Undecodable) as e:
            ctx.outcome = "error" if isinstance(e, PluginFailed) else "upstream_error"
            ctx.error = "internal_error" if isinstance(e, PluginFailed) else "upstream_unreadable"
            ctx.bytes_out = sent
            if streamed and coding is None and not sized and (sent == 0 or last.endswith(_EVENT_END)):
                # (as for a stream the upstream cut: an error event says why, the SDKs raise it)
                event = _cut_event(ctx.outcome, ctx.lpath)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(0.5):
                        await out.write(event)
                    ctx.bytes_out = sent + len(event)
            if request.transport is not None:
                request.transport.close()
        return out

    async def _on_chunk(self, ctx: RequestContext, p: Any, chunk: bytes, last: bool) -> bytes:
        try:
            if ctx.timings is None:
                r = await p.on_chunk(ctx, chunk, last)
            else:
                t0 = _perf()
                r = await p.on_chunk(ctx, chunk, last)
                ctx.timings.append((p.name, "chunk", t0, _perf()))
            if type(r) is not bytes:
                if not isinstance(r, (bytes, bytearray, memoryview)):
                    raise TypeError(f"on_chunk returned {type(r).__name__}, not bytes")
                r = bytes(r)
            return r
        except Exception:
            log.exception("plugin %s failed in on_chunk (request %s)", p.name, ctx.request_id)
            raise PluginFailed(p.name, "on_chunk") from None


#: Requests that generate (their 2xx answer can still report an error in its body).
_GENERATION_PATHS = ("/chat/completions", "/completions", "/responses", "/v1/messages")
#: After [DONE]: how long (and how many bytes) the upstream's end of body is waited for, so its
#: connection goes back to the pool (otherwise it is closed: a new connection per stream).
_DRAIN_SECONDS = 0.5
_DRAIN_BYTES = 65536


#: Upstream responses being read to their end after the client's ended at [DONE] (in the
#: background: the exchange is over, and the client may go at once).
DRAINING: dict[aiohttp.ClientResponse, "asyncio.Task[None]"] = {}


class ClientStalled(Exception):
    """The client read nothing for ``server.send_timeout`` while its response waited to be sent."""


_EVENT_END = (b"\n\n", b"\r\r", b"\r\n\r\n")
#: Largest sum of a request's header names and values taken (as nginx's default buffers: 4 x 8 KiB)
MAX_HEAD = 32768
#: Rate-limit response headers (x-ratelimit-*, X-RateLimit-*, RateLimit, RateLimit-Policy), lower case.
_RATE_LIMIT_HEADERS = ("x-ratelimit-", "ratelimit")


def _cut_code(outcome: str) -> str:
    """The error code of the event a stream cut short ends with."""
    if outcome == "error":  # (a plugin failed on a chunk)
        return "internal_error"
    if outcome == "upstream_error":  # (a compressed answer that stopped decoding)
        return "upstream_unreadable"
    return outcome if outcome in ("gateway_shutdown", "upstream_timeout") else "upstream_disconnected"


def _cut_event(outcome: str, lpath: str) -> bytes:
    """The error event a stream cut short ends with (by the upstream, or a shutdown's drain time).
    A Messages API stream's (``/v1/messages``) is an ``error`` event in that API's shape, which its
    clients read (an event without a name they skip), with the gateway's message and code."""
    code = _cut_code(outcome)
    if code == "gateway_shutdown":
        message = ("The gateway is shutting down and its drain time (server.shutdown_timeout) ran out "
                   "mid-answer; the answer is incomplete: send the request again.")
    elif code == "upstream_timeout":
        message = "The upstream went silent mid-answer (idle timeout); the answer is incomplete."
    elif code == "internal_error":
        message = "The gateway failed while relaying the answer; the answer is incomplete."
    elif code == "upstream_unreadable":
        message = "The upstream's compressed answer stopped decoding; the answer is incomplete."
    else:
        message = "The upstream ended mid-answer; the answer is incomplete."
    if lpath.endswith("/v1/messages"):
        err = {"type": "api_error", "message": message, "code": code}
        return b"event: error\ndata: " + dumps_bytes({"type": "error", "error": err}) + b"\n\n"
    return b"data: " + error_body(message, "server_error", code) + b"\n\n"


async def _send(ctx: RequestContext, out: web.StreamResponse, chunk: bytes | None) -> None:
    """Write ``chunk`` (None: end the response). A write waits only when the client's socket
    buffers are full (it is not reading): the transport then holds more than its high-water mark
    (64 KiB), which a write can reach only if something is already held or the chunk is large.
    Such writes are bounded by send_timeout; the common one is not wrapped in a timer."""
    transport = ctx.request.transport
    if transport is None or not (transport.get_write_buffer_size() or (chunk is not None and len(chunk) > 16384)):
        await (out.write(chunk) if chunk is not None else out.write_eof())
        return
    try:
        async with asyncio.timeout(ctx.settings.send_timeout):
            await (out.write(chunk) if chunk is not None else out.write_eof())
    except TimeoutError:
        raise ClientStalled() from None


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read what an upstream sends after [DONE] (usually just the end of the body), briefly; the
    connection then goes back to the pool, or is closed if the end does not come."""
    left = _DRAIN_BYTES
    try:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_DRAIN_SECONDS):
                while left > 0:
                    chunk = await resp.content.readany()
                    if not chunk:
                        return
                    left -= len(chunk)
    finally:
        resp.close()
        DRAINING.pop(resp, None)


#: Bytes of an upstream's 4xx answer read to see whether it refused the stream_options the gateway added.
_ERROR_PEEK = 65536
#: The largest answer a ``ctx.json_filter`` is applied to (a model list is a few KiB).
MAX_FILTERED = 8 * 2**20


class _ReadAll:
    """The body of an answer already read in full (and filtered): nothing more to read."""

    @staticmethod
    async def readany() -> bytes:
        return b""


_READ_ALL = _ReadAll()


def _unreadable(ctx: RequestContext, why: str) -> GatewayError:
    log.warning("upstream answer to %s %s not relayed: %s (request %s)", ctx.method, ctx.path[:200], why,
                ctx.request_id)
    return GatewayError("The upstream's answer is compressed in a way the gateway cannot read.", status=502,
                        type="upstream_error", code="upstream_unreadable")


def _decode(ctx: RequestContext, decoder: Decoder, chunk: bytes) -> bytes:
    """The next bytes of a compressed answer, decoded for the chunk plugins (b"": its end)."""
    try:
        return b"".join(decoder.pieces(chunk))
    except Undecodable as e:
        log.warning("upstream body (Content-Encoding: %s) %s mid-answer; cut (request %s)", decoder.coding,
                    "did not decode" if str(e) == "corrupt" else "inflated beyond the gateway's bounds",
                    ctx.request_id)
        raise


def _unfiltered(ctx: RequestContext, why: str) -> GatewayError:
    log.warning("upstream answer to %s %s not relayed: %s, so the response filter a plugin set (key_auth's: a "
                "key's model scope) could not be applied (request %s)", ctx.method, ctx.path[:200], why,
                ctx.request_id)
    return GatewayError("The upstream's answer could not be read to filter it (as the gateway must before "
                        "relaying it to this caller).", status=502, type="upstream_error", code="upstream_unreadable")


async def _filter_json(ctx: RequestContext, content: Any, pending: bytes, coding: str | None) -> bytes:
    """The whole answer (at most MAX_FILTERED bytes, decoded if compressed), through
    ``ctx.json_filter``, as JSON. Anything that stops that is a 502: the answer is never relayed
    unfiltered."""
    data = bytearray(pending)
    try:
        while True:
            more = await content.readany()
            if not more:
                break
            data += more
            if len(data) > MAX_FILTERED:
                raise _unfiltered(ctx, f"over {MAX_FILTERED} bytes")
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise _unfiltered(ctx, f"the upstream ended it ({type(e).__name__})") from None
    body = bytes(data)
    if coding is not None:
        if coding not in DECODABLE:
            raise _unfiltered(ctx, f"Content-Encoding {coding[:40]} is not one the gateway decodes")
        try:
            body = decoded(coding, body)
        except Undecodable:
            raise _unfiltered(ctx, f"it did not decode as {coding[:40]}") from None
    try:
        j = loads(body)
    except JSON_ERRORS:
        raise _unfiltered(ctx, "it is not JSON") from None
    assert ctx.json_filter is not None
    try:
        return dumps_bytes(ctx.json_filter(j))
    except Exception:
        log.exception("response filter failed (request %s)", ctx.request_id)
        raise _unfiltered(ctx, "the filter failed (or gave what JSON cannot carry)") from None


#: The start of an SSE body: a field (data, event, id, retry) or a comment, after any blank lines.
_SSE_START = re.compile(rb"[\r\n]*(?:data|event|id|retry)?:")
_SSE_FIELDS = (b"data:", b"event:", b"id:", b"retry:")
#: Seconds to wait, after [DONE] ended on a CR at the end of a read, for the LF of a CRLF.
LF_GRACE = 0.25
#: Seconds to wait, after [DONE] in a compressed stream, for the rest of the compressed data (its
#: last block and trailer): ended without it, the client could not decode the stream's end.
CODED_GRACE = 2.0


def _sse_start(first: bytes) -> bool | None:
    """Do a body's first bytes start a server-sent event stream: True, False, or None while they
    could still be either (``da``: a read may end anywhere). A byte order mark and blank lines
    before the first field are allowed, as SSE parsers allow them."""
    s = first[3:] if first.startswith(b"\xef\xbb\xbf") else first
    if _SSE_START.match(s):
        return True
    s = s.lstrip(b"\r\n")
    if b"\xef\xbb\xbf".startswith(first) or any(f.startswith(s) for f in _SSE_FIELDS):
        return None
    return False


#: Compressed bytes of a streamed request's answer read to see whether it starts like SSE.
_SNIFF_CODED = 4096
#: Response codings already said in the log (once each per process: an upstream that compresses
#: does it on every answer).
_told: set[tuple[str, str]] = set()


def _tell_coding(coding: str, observer: ResponseObserver, strip: bool) -> None:
    """Say once that the upstream compresses though the gateway asks for no encoding, and what
    follows: a coding the observer cannot decode is not read (no usage: estimates are charged), and
    a compressed stream keeps the usage chunk the gateway asked for (removing it would mean
    encoding the stream again: the client gets the upstream's bytes as they came)."""
    coding = coding[:40]
    if observer.unreadable == "unknown":
        key = ("unknown", coding)
        msg = (f"the upstream answered with Content-Encoding {coding!r} though the gateway asked for none: "
               f"relayed as it came, not read (usage not counted, and a stream keeps the usage chunk the gateway "
               f"asked for; decoded: {', '.join(sorted(DECODABLE))})")
    elif strip:
        key = ("strip", coding)
        msg = (f"the upstream compresses its streams (Content-Encoding {coding!r}) though the gateway asked for "
               "none: they are relayed as they came and read decoded, and the usage chunk the gateway asked for "
               "(stream_options.include_usage) reaches the client (removing it would mean encoding the stream "
               "again)")
    else:
        return
    if key not in _told and len(_told) < 32:  # (an upstream naming ever other codings: not every one)
        _told.add(key)
        log.warning(msg)


def _mask_key_as_model(ctx: RequestContext) -> None:
    """A gateway key a client put in the body's ``model`` (arguments swapped): its secret is masked
    before anything records it (audit, spans, rate-limit counters by model, conversations) or
    forwards it; the upstream then answers for a model named ``gw_<id>_REDACTED``."""
    j = ctx.json
    m = j.get("model") if isinstance(j, dict) else None
    if isinstance(m, str) and "gw" in m:
        masked = mask_gateway_keys(m)
        if masked != m:
            data = dict(ctx.json_exact)
            data["model"] = masked
            ctx.set_json(data)


def discard_unread_coded_body(request: web.BaseRequest) -> bool:
    """Call once the answer is made to a request whose body was not read to its end (a refusal).
    After the answer aiohttp reads the rest of a body (for up to 10 s) so that the client gets the
    answer before the connection closes. A compressed body would be decoded meanwhile, on the
    event loop: a few MB of gzip are GBs of work, which stalls every other request; a chunked one
    parsed chunk by chunk (a body of one-byte chunks costs ten times the CPU of its bytes). Told
    to close, the connection discards what still arrives unparsed, and closes when the 10 s are
    up. Returns whether it did (the answer must then say Connection: close)."""
    if request.body_exists and not request.content.is_eof() and (
            request.headers.get("Content-Encoding", "identity").strip().lower() != "identity"
            or "Transfer-Encoding" in request.headers):
        request.protocol.close()
        return True
    return False


def _must_close(request: web.BaseRequest) -> bool:
    """The connection must close after the response: an HTTP/1.0 request with Transfer-Encoding
    (its framing is faulty, RFC 9112 6.1), or a request asking for a protocol upgrade, which the
    gateway never makes: the server's parser takes what follows such a request on the connection
    as the new protocol's bytes, so a request sent behind it would never be answered (curl's h2c
    offer reconnects for its next request)."""
    h = request.headers
    return ("Transfer-Encoding" in h and request.version < aiohttp.HttpVersion11) or "Upgrade" in h


def server_timing(ctx: RequestContext) -> str:
    total: dict[str, float] = {}
    for name, _phase, t0, t1 in ctx.timings or ():
        total[name] = total.get(name, 0.0) + (t1 - t0)
    parts = [f"{n};dur={d * 1000:.3f}" for n, d in total.items()]
    if ctx.t_upstream is not None and ctx.t_headers is not None:
        parts.append(f"upstream;dur={(ctx.t_headers - ctx.t_upstream) * 1000:.3f}")
    return ", ".join(parts)
