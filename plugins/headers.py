"""``headers``: add or remove headers on the upstream request and the client response.

The smallest useful plugin, and the proof of the chain::

    - name: headers
      config:
        request: {X-Team: search}       # added to the upstream request
        response: {X-Served-By: gateway} # added to the client response
        remove_response: [X-Powered-By]
"""
from __future__ import annotations

from pydantic import Field, field_validator

from gateway.context import RequestContext
from gateway.plugin import Plugin, PluginConfig, ResponseHead


class HeadersConfig(PluginConfig):
    request: dict[str, str] = Field(default_factory=dict, description="Headers set on the upstream request.")
    remove_request: list[str] = Field(default_factory=list, description="Headers removed before forwarding.")
    response: dict[str, str] = Field(default_factory=dict, description="Headers set on the client response.")
    remove_response: list[str] = Field(default_factory=list, description="Headers removed from the response.")

    @field_validator("request", "response")
    @classmethod
    def _sendable(cls, v: dict[str, str]) -> dict[str, str]:
        from gateway.config.loader import header_problem, shown_key

        for name, value in v.items():
            bad = header_problem(name, value)
            if bad:
                raise ValueError(f"{shown_key(name)}: {bad}")
        return v


class Headers(Plugin):
    name = "headers"
    Config = HeadersConfig
    header_safe = True  # it only sets headers: a key check after it may still run before the body

    async def on_request(self, ctx: RequestContext) -> None:
        for k in self.config.remove_request:
            ctx.upstream_headers[k] = None
        ctx.upstream_headers.update(self.config.request)
        return None

    async def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        for k in self.config.remove_response:
            head.headers.popall(k, None)
        for k, v in self.config.response.items():
            head.headers[k] = v
