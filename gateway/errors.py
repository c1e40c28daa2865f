"""The gateway's error tree and its one JSON shape (the OpenAI error shape).

Every error the gateway itself produces is ``{"error": {"message", "type", "code", "param"}}`` so
OpenAI SDK clients surface it as an ``APIStatusError`` with the message intact.
"""
from __future__ import annotations

import json
from typing import Mapping

from aiohttp import web


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code, "param": param}}).encode()


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    message = "The gateway failed to handle the request."

    def __init__(self, message: str | None = None, *, status: int | None = None, type: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        if message is not None:
            self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)

    def response(self, extra_headers: Mapping[str, str] | None = None) -> web.Response:
        headers = {**self.headers, **(extra_headers or {})}
        return web.Response(status=self.status, body=self.body(), content_type="application/json",
                            headers=headers)


class BadRequest(GatewayError):
    status, type, code, message = 400, "invalid_request_error", "bad_request", "The request is malformed."


class NotFound(GatewayError):
    status, type, code, message = 404, "invalid_request_error", "not_found", "Not found."


class RequestTimeout(GatewayError):
    status, type, code = 408, "invalid_request_error", "request_timeout"
    message = "The request body stopped arriving."


class PayloadTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class HeadersTooLarge(GatewayError):
    status, type, code = 431, "invalid_request_error", "request_header_fields_too_large"


class UnsupportedMediaType(GatewayError):
    status, type, code = 415, "invalid_request_error", "unsupported_content_encoding"


class TransferCodingNotImplemented(GatewayError):
    status, type, code = 501, "invalid_request_error", "unsupported_transfer_encoding"
    message = "Only the chunked transfer coding is supported for request bodies."


class HttpVersionNotSupported(GatewayError):
    status, type, code = 505, "invalid_request_error", "http_version_not_supported"
    message = "Only HTTP/1.0 and HTTP/1.1 are served."


class UpstreamUnavailable(GatewayError):
    status, type, code, message = 502, "upstream_error", "upstream_unavailable", "The upstream could not be reached."


class UpstreamAuthFailed(GatewayError):
    status, type, code = 502, "upstream_error", "upstream_auth_failed"
    message = ("The upstream refused the gateway's own credentials for it; this is not about your API key. "
               "The gateway's operator has been told (its log says so).")

    def __init__(self) -> None:
        # a configuration fault a retry cannot mend: the OpenAI SDKs would retry a 502 twice
        super().__init__(headers={"x-should-retry": "false"})


class UpstreamTimeout(GatewayError):
    status, type, code, message = 504, "upstream_error", "upstream_timeout", "The upstream did not answer in time."


class ServiceUnavailable(GatewayError):
    status, type, code, message = 503, "server_error", "service_unavailable", "A service the gateway needs is unavailable."


class InternalError(GatewayError):
    pass


def json_error(status: int, message: str, type_: str, code: str | None,
               headers: Mapping[str, str] | None = None, param: str | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message, type_, code, param),
                        content_type="application/json", headers=headers)
