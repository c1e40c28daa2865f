"""An upload's model (a multipart/form-data field): a key limited to some models can transcribe
with its models and no other, and the audit trail names the model; a form that could read
differently upstream names none, and a limited key is refused."""
from __future__ import annotations

import io
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.forms import form_field

from .helpers import ADMIN_TOKEN, serve_handler, until

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
B = "----b0undary"
CT = f"multipart/form-data; boundary={B}"


def form(*parts: tuple[str, bytes], end: bool = True) -> bytes:
    out = b"".join(f"--{B}\r\n{head}\r\n\r\n".encode() + value + b"\r\n" for head, value in parts)
    return out + (f"--{B}--\r\n".encode() if end else b"")


MODEL = ('Content-Disposition: form-data; name="model"', b"whisper-1")
FILE = ('Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav',
        b"RIFF" + bytes(100) + b"\r\n--not-the-boundary\r\n")


def test_a_plain_model_field_is_read() -> None:
    assert form_field(form(MODEL, FILE), CT, "model") == "whisper-1"
    assert form_field(form(FILE, MODEL), f'multipart/form-data; boundary="{B}"', "model") == "whisper-1"
    assert form_field(form(FILE), CT, "model") is None  # none named


@pytest.mark.parametrize("body", [
    form(MODEL, ('Content-Disposition: form-data; name="model"', b"gpt-4o"), FILE),   # two
    form(MODEL, ('Content-Disposition: form-data; name="Model"', b"gpt-4o"), FILE),   # another case
    form(('Content-Disposition: form-data; name="model"; filename="m"', b"whisper-1"), FILE),  # a file
    form(("Content-Disposition: form-data; name*=utf-8''model", b"gpt-4o"), MODEL),  # RFC 2231
    form(('Content-Disposition: form-data; name=model', b"whisper-1")),              # unquoted
    form(('Content-Disposition: form-data; name="model"\r\nContent-Disposition: form-data; name="x"',
          b"whisper-1")),                                                                # two dispositions
    form(('Content-Disposition: form-data;\r\n name="model"', b"whisper-1")),          # folded
    form(('Content-Disposition: form-data; name="model"', b"whisper-1\r\ngpt-4o")),   # two lines
    b"preamble\r\n" + form(MODEL),                                                       # a preamble
    form(MODEL, end=False),                                                              # no closing
])
def test_a_form_that_could_read_differently_upstream_names_no_model(body: bytes) -> None:
    assert form_field(body, CT, "model") is None


async def transcribe(request: web.Request) -> web.Response:
    data = await request.post()  # (the upstream reads the form as aiohttp does)
    return web.json_response({"text": "hi", "model_seen": data.get("model"),
                              "usage": {"type": "tokens", "input_tokens": 30, "output_tokens": 5,
                                        "total_tokens": 35}})


async def test_a_key_limited_to_some_models_transcribes_with_those_alone(make_gateway: Any) -> None:
    runner, url = await serve_handler(transcribe)
    try:
        g = await make_gateway([{"name": "key_auth"}, {"name": "audit"}],
                               upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", headers=ADMIN,
                              json={"owner": "a", "scopes": {"models": ["whisper-*"]}}) as r:
                key = (await r.json())["key"]
            client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=10)
            audio = ("a.wav", io.BytesIO(b"RIFF" + bytes(2000)), "audio/wav")
            ok = await client.audio.transcriptions.create(model="whisper-1", file=audio)
            assert ok.text == "hi"
            with pytest.raises(openai.PermissionDeniedError) as e:
                await client.audio.transcriptions.create(model="gpt-4o-transcribe", file=audio)
            assert e.value.code == "key_scope_denied"
            await client.close()

            async def events() -> Any:
                async with s.get(g.admin_url + "/audit", headers=ADMIN) as r:  # (a 403 is an auth_failure)
                    evs = [e for e in (await r.json())["data"] if e.get("path") == "/v1/audio/transcriptions"]
                return evs if len(evs) == 2 else None

            evs = await until(events, what="two audit events")
    finally:
        await runner.cleanup()
    assert sorted((e["status"], e["model"]) for e in evs) == [(200, "whisper-1"), (403, "gpt-4o-transcribe")]
