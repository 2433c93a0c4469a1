"""A local OpenAI-compatible DEMO/TEST provider: an HTTP server on loopback that answers like the demo engine.

This is not a model and not a provider anyone should depend on. It exists so tests and benchmarks can drive
the real ``dspy.LM("openai/<name>", api_base=..., api_key=...)`` HTTP path, with real usage figures, latency
and faults, without the network. Every answer comes from :class:`dspyrt.agents.lm.demo.DemoFewShotEngine`: the
request body is read into a ``dspy.lm15.Request`` by lm15's own Chat Completions reader and answered with
the outputs of the nearest few-shot demo in the prompt (ChatAdapter or JSONAdapter format); usage is
counted in whitespace tokens, as the demo engine counts it.

The wire contract (HTTP/1.1 with keep-alive, ``Content-Length`` or chunked request bodies):

* ``POST /v1/chat/completions`` - non-streaming chat completions; ``"stream": true`` is refused with 400;
* ``GET /v1/models`` - the served model names;
* ``GET /stats`` - counters (:class:`ProviderStats`); ``POST /reset`` zeroes them and restarts the fault
  schedule; ``POST /control`` replaces the :class:`FaultSettings` (body: their JSON) and restarts the
  schedule. The three control endpoints take no key: the server listens on loopback for tests.

Errors have OpenAI's body shape ``{"error": {"message", "type", "param", "code"}}``. A wrong bearer key gets
401 ``invalid_api_key`` with a message that quotes the key received, as real providers do (so the caller's
redaction can be tested). With ``models`` configured, an unknown model gets 404 ``model_not_found``.

Faults (:class:`FaultSettings`), in order of precedence: ``fail_all`` answers every completion with one
status; ``every_nth_429`` / ``every_nth_500`` fail request number n (1-based, every completion request
counts); then one draw of a ``random.Random(seed)`` per request, in arrival order, picks a rate limit (429,
``Retry-After: retry_after``), a server error (500), a dropped connection (closed with no response) or
success. Rate limits and rejections answer at once; otherwise ``latency`` seconds pass (``anyio.sleep``)
before the answer, the 500 or the drop. The same seed and the same arrival order give the same outcomes.

Run it as a process (``python -m dspyrt.agents.lm.demo_provider --port 0 --api-key KEY``; it prints one line,
``listening on http://HOST:PORT``, then serves until SIGTERM/SIGINT), or from a test with
:func:`run_demo_provider`, which starts that process and stops it on exit::

    with run_demo_provider(latency=0.01, rate_limit_rate=0.1, seed=3) as provider:
        lm = dspy.LM("openai/demo-model", api_base=provider.url, api_key=provider.api_key, cache=False)
        ...
        provider.stats()["rate_limited"]

In-process, :func:`serve` runs the server in the caller's task group (``port = await tg.start(serve, ...)``).
"""

from __future__ import annotations

import argparse
import http
import json
import os
import random
import secrets
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from dspy.lm15 import LM15Error, Request, request_from_openai_chat
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dspyrt.agents.lm.demo import DemoFewShotEngine

__all__ = [
    "DEFAULT_MODEL",
    "Decision",
    "DemoProvider",
    "DemoProviderProcess",
    "FaultSchedule",
    "FaultSettings",
    "HttpReply",
    "HttpRequest",
    "Outcome",
    "ProviderOptions",
    "ProviderStats",
    "decide",
    "main",
    "run_demo_provider",
    "serve",
]

DEFAULT_MODEL = "demo-model"
"""The model ``GET /v1/models`` lists when no model list is configured (any model name is then accepted)."""

_MAX_HEAD = 64 * 1024
_MAX_BODY = 32 * 1024 * 1024
_IDLE_TIMEOUT = 75.0  # seconds a kept-alive connection may sit idle before the server closes it
_API_KEY_HELP = "You can find your API key at https://platform.openai.com/account/api-keys."


# --- faults --------------------------------------------------------------------------------------------------


class FaultSettings(BaseModel):
    """What the provider does wrong, replaceable at run time through ``POST /control``.

    ``rate_limit_rate``, ``error_rate`` and ``drop_rate`` are per-request probabilities (sum at most 1).
    ``fail_all`` is an HTTP status (400-599) that every completion request gets instead of an answer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    latency: float = Field(default=0.0, ge=0, description="seconds before each answer, 500 or drop")
    rate_limit_rate: float = Field(default=0.0, ge=0, le=1)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    drop_rate: float = Field(default=0.0, ge=0, le=1)
    retry_after: float = Field(default=0.05, ge=0, description="the Retry-After of a 429, in seconds")
    seed: int = 0
    fail_all: int | None = Field(default=None, ge=400, le=599)
    every_nth_429: int | None = Field(default=None, ge=1)
    every_nth_500: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _rates(self) -> FaultSettings:
        if self.rate_limit_rate + self.error_rate + self.drop_rate > 1:
            raise ValueError("rate_limit_rate + error_rate + drop_rate must be at most 1")
        return self


Outcome = Literal["ok", "rate_limited", "error", "dropped", "fail_all"]
"""A completion request's fate, decided on arrival."""


def decide(settings: FaultSettings, number: int, draw: float) -> Outcome:
    """The outcome of request ``number`` (1-based) given its uniform ``draw`` in [0, 1)."""
    if settings.fail_all is not None:
        return "fail_all"
    if settings.every_nth_429 is not None and number % settings.every_nth_429 == 0:
        return "rate_limited"
    if settings.every_nth_500 is not None and number % settings.every_nth_500 == 0:
        return "error"
    threshold = settings.rate_limit_rate
    if draw < threshold:
        return "rate_limited"
    threshold += settings.error_rate
    if draw < threshold:
        return "error"
    threshold += settings.drop_rate
    if draw < threshold:
        return "dropped"
    return "ok"


@dataclass(frozen=True)
class Decision:
    """One completion request's fate: its number (1-based), its outcome and the settings it was drawn under."""

    number: int
    outcome: Outcome
    settings: FaultSettings


class FaultSchedule:
    """The seeded sequence of outcomes: one draw per request, in arrival order, whatever the outcome."""

    def __init__(self, settings: FaultSettings) -> None:
        self.settings = settings
        self._rng = random.Random(settings.seed)
        self._number = 0

    def next(self) -> Decision:
        """The next request's decision."""
        self._number += 1
        draw = self._rng.random()  # drawn on every request, so the sequence never shifts
        return Decision(self._number, decide(self.settings, self._number, draw), self.settings)


# --- the provider, without sockets ----------------------------------------------------------------------------


class ProviderStats(BaseModel):
    """Counters since start or the last ``POST /reset``. ``requests`` counts completion requests received."""

    requests: int = 0
    ok: int = 0
    rate_limited: int = 0
    errors: int = 0
    dropped: int = 0
    fail_all: int = 0
    unauthorized: int = 0
    bad_requests: int = 0
    unknown_model: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


class ProviderOptions(BaseModel):
    """How the server is set up: where it listens, the key it expects, the models it serves, its faults."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    api_key: str = Field(min_length=1)
    models: tuple[str, ...] = Field(default=(), description="accepted model names; empty: accept any")
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    faults: FaultSettings = FaultSettings()


@dataclass(frozen=True)
class HttpRequest:
    """One parsed HTTP request (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class HttpReply:
    """One HTTP response with a JSON body."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


def _error(status: int, message: str, type_: str, code: str | None, *headers: tuple[str, str]) -> HttpReply:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return HttpReply(status, body, headers)


class DemoProvider:
    """The provider's behaviour, no sockets: ``handle`` answers one request, or ``None`` to drop the connection."""

    def __init__(self, options: ProviderOptions) -> None:
        self.options = options
        self.stats = ProviderStats()
        self._schedule = FaultSchedule(options.faults)
        self._engine = DemoFewShotEngine()

    @property
    def faults(self) -> FaultSettings:
        """The fault settings in force."""
        return self._schedule.settings

    def control(self, settings: FaultSettings) -> None:
        """Replace the fault settings; the schedule restarts from their seed at request number 1."""
        self._schedule = FaultSchedule(settings)

    def reset(self) -> None:
        """Zero the counters (requests still in flight stay counted there) and restart the schedule."""
        self.stats = ProviderStats(in_flight=self.stats.in_flight)
        self._schedule = FaultSchedule(self._schedule.settings)

    async def handle(self, request: HttpRequest) -> HttpReply | None:
        route = (request.method, request.path.split("?", 1)[0].rstrip("/"))
        if route == ("POST", "/v1/chat/completions"):
            return await self._chat(request)
        if route == ("GET", "/v1/models"):
            return self._authorize(request) or self._models()
        if route == ("GET", "/stats"):
            return HttpReply(200, self.stats.model_dump())
        if route == ("POST", "/reset"):
            self.reset()
            return HttpReply(200, self.stats.model_dump())
        if route == ("POST", "/control"):
            try:
                self.control(FaultSettings.model_validate_json(request.body or b"{}"))
            except ValidationError as exc:
                return _error(400, f"invalid fault settings: {exc}", "invalid_request_error", None)
            return HttpReply(200, self.faults.model_dump())
        if route[1] in {"/v1/chat/completions", "/v1/models", "/stats", "/reset", "/control"}:
            return _error(405, f"Method {request.method} not allowed on {route[1]}", "invalid_request_error", None)
        return _error(404, f"Unknown request URL: {request.method} {route[1]}", "invalid_request_error", "unknown_url")

    def _models(self) -> HttpReply:
        names = self.options.models or (DEFAULT_MODEL,)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "demo"} for name in names]
        return HttpReply(200, {"object": "list", "data": data})

    def _authorize(self, request: HttpRequest) -> HttpReply | None:
        received = _bearer(request)
        if secrets.compare_digest(received.encode(), self.options.api_key.encode()):
            return None
        return self._unauthorized(received)

    def _unauthorized(self, received: str) -> HttpReply:
        message = f"Incorrect API key provided: {received}. {_API_KEY_HELP}"
        return _error(401, message, "invalid_request_error", "invalid_api_key")

    async def _chat(self, request: HttpRequest) -> HttpReply | None:
        stats = self.stats
        stats.requests += 1
        decision = self._schedule.next()
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            reply = await self._complete(request, decision)
        finally:
            self.stats.in_flight -= 1
        if reply is None:
            return None
        return replace(reply, headers=(*reply.headers, ("x-request-id", f"req-demo-{decision.number}")))

    async def _complete(self, request: HttpRequest, decision: Decision) -> HttpReply | None:
        settings = decision.settings
        if decision.outcome == "fail_all" and settings.fail_all is not None:
            self.stats.fail_all += 1
            return self._failure(settings.fail_all, request, settings)
        denied = self._authorize(request)
        if denied is not None:
            self.stats.unauthorized += 1
            return denied
        parsed = self._parse(request)
        if isinstance(parsed, HttpReply):
            return parsed
        body, chat = parsed
        if decision.outcome == "rate_limited":  # providers answer a rate limit at once
            self.stats.rate_limited += 1
            return self._failure(429, request, settings)
        if settings.latency > 0:
            await anyio.sleep(settings.latency)
        if decision.outcome == "error":
            self.stats.errors += 1
            return self._failure(500, request, settings)
        if decision.outcome == "dropped":
            self.stats.dropped += 1
            return None
        response = self._engine.complete(chat)
        prompt_tokens, completion_tokens = response.usage.input_tokens, response.usage.output_tokens
        self.stats.ok += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        answer = {
            "id": f"chatcmpl-{decision.number}-{response.id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": response.text or "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "demo",
        }
        return HttpReply(200, answer)

    def _parse(self, request: HttpRequest) -> tuple[dict[str, Any], Request] | HttpReply:
        """The JSON body and its lm15 ``Request``, or the 400/404 reply that refuses it."""
        try:
            body = json.loads(request.body)
        except ValueError as exc:
            self.stats.bad_requests += 1
            return _error(400, f"The request body is not valid JSON: {exc}", "invalid_request_error", None)
        if not isinstance(body, dict):
            self.stats.bad_requests += 1
            return _error(400, "The request body must be a JSON object.", "invalid_request_error", None)
        if body.get("stream"):
            self.stats.bad_requests += 1
            return _error(400, "stream=true is not supported by the demo provider.", "invalid_request_error", None)
        try:
            chat = request_from_openai_chat(body)
        except (ValueError, TypeError, LM15Error) as exc:
            self.stats.bad_requests += 1
            return _error(400, f"Invalid request: {exc}", "invalid_request_error", None)
        if self.options.models and body["model"] not in self.options.models:
            self.stats.unknown_model += 1
            return self._failure(404, request, self.faults, model=str(body["model"]))
        return body, chat

    def _failure(self, status: int, request: HttpRequest, settings: FaultSettings, model: str = "") -> HttpReply:
        """The OpenAI-style reply for a failure status (a fault, ``fail_all`` or a refused model)."""
        if status == 401:
            return self._unauthorized(_bearer(request))
        if status == 429:
            hint = (
                ("retry-after", f"{settings.retry_after:g}"),
                ("retry-after-ms", f"{settings.retry_after * 1000:g}"),
            )
            message = "Rate limit reached for requests (demo provider). Please try again later."
            return _error(429, message, "rate_limit_error", "rate_limit_exceeded", *hint)
        if status == 404:
            model = model or _model_of(request)
            message = f"The model `{model}` does not exist or you do not have access to it."
            return _error(404, message, "invalid_request_error", "model_not_found")
        if status == 403:
            return _error(403, "You are not allowed to use this model.", "permission_error", "permission_denied")
        if status == 400:
            return _error(400, "Invalid request (injected by the demo provider).", "invalid_request_error", None)
        if status == 500:
            message = "The server had an error while processing your request (injected by the demo provider)."
            return _error(500, message, "server_error", "server_error")
        if status == 503:
            message = "The engine is currently overloaded, please try again later."
            return _error(503, message, "server_error", "service_unavailable")
        return _error(status, f"Injected HTTP {status} (demo provider).", "api_error", None)


def _bearer(request: HttpRequest) -> str:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else value


def _model_of(request: HttpRequest) -> str:
    try:
        body = json.loads(request.body)
    except ValueError:
        return ""
    return str(body.get("model", "")) if isinstance(body, dict) else ""


# --- HTTP/1.1 over anyio --------------------------------------------------------------------------------------


class _BadHttp(Exception):
    """The bytes received are not an HTTP/1.1 request this server reads."""


async def _read_request(reader: BufferedByteReceiveStream) -> tuple[HttpRequest, bool]:
    """One request and whether the connection stays open after it. Raises ``anyio.IncompleteRead`` at EOF."""
    head = await reader.receive_until(b"\r\n\r\n", _MAX_HEAD)
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError as exc:
        raise _BadHttp(f"malformed request line {lines[0]!r}") from exc
    if version not in {"HTTP/1.1", "HTTP/1.0"}:
        raise _BadHttp(f"unsupported HTTP version {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise _BadHttp(f"malformed header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    if headers.get("transfer-encoding", "identity").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError as exc:
            raise _BadHttp("malformed Content-Length") from exc
        if not 0 <= length <= _MAX_BODY:
            raise _BadHttp("Content-Length out of range")
        body = await reader.receive_exactly(length) if length else b""
    return HttpRequest(method, target, headers, body), keep_alive


async def _read_chunked(reader: BufferedByteReceiveStream) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.receive_until(b"\r\n", 1024)
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError as exc:
            raise _BadHttp("malformed chunk size") from exc
        if size == 0:
            while await reader.receive_until(b"\r\n", _MAX_HEAD):  # trailers, up to the empty line
                pass
            return bytes(body)
        if len(body) + size > _MAX_BODY:
            raise _BadHttp("chunked body too large")
        body += await reader.receive_exactly(size)
        await reader.receive_exactly(2)


def _encode(reply: HttpReply, keep_alive: bool) -> bytes:
    payload = json.dumps(reply.body, ensure_ascii=False).encode()
    try:
        phrase = http.HTTPStatus(reply.status).phrase
    except ValueError:
        phrase = "Error"
    head = [
        f"HTTP/1.1 {reply.status} {phrase}",
        "content-type: application/json",
        f"content-length: {len(payload)}",
        f"connection: {'keep-alive' if keep_alive else 'close'}",
        *(f"{name}: {value}" for name, value in reply.headers),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


async def _connection(provider: DemoProvider, stream: SocketStream) -> None:
    """Serve one TCP connection: requests one after another until the client closes, a drop or an error."""
    async with stream:
        reader = BufferedByteReceiveStream(stream)
        while True:
            try:
                with anyio.fail_after(_IDLE_TIMEOUT):  # idle keep-alive connections, stalled clients
                    request, keep_alive = await _read_request(reader)
            except (anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError, TimeoutError):
                return
            except (_BadHttp, anyio.DelimiterNotFound) as exc:
                reply = _error(400, f"Bad HTTP request: {exc}", "invalid_request_error", None)
                await stream.send(_encode(reply, keep_alive=False))
                return
            answer = await provider.handle(request)
            if answer is None:
                return  # the drop fault: close with no response at all
            await stream.send(_encode(answer, keep_alive))
            if not keep_alive:
                return


async def _guarded(provider: DemoProvider, stream: SocketStream) -> None:
    """A connection's failure ends that connection, never the server."""
    try:
        await _connection(provider, stream)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
        pass
    except Exception as exc:  # a bug in the provider: report it, keep serving the other connections
        print(f"demo provider: connection failed: {exc!r}", file=sys.stderr, flush=True)


async def serve(options: ProviderOptions, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; reports the bound port through ``task_status`` (``port = await tg.start(serve, o)``)."""
    provider = DemoProvider(options)
    listener = await anyio.create_tcp_listener(local_host=options.host, local_port=options.port)
    async with listener:
        task_status.started(int(listener.extra(SocketAttribute.local_port)))

        async def handler(stream: SocketStream) -> None:
            await _guarded(provider, stream)

        await listener.serve(handler)


# --- the process ----------------------------------------------------------------------------------------------


_FAULT_FLAGS = tuple(FaultSettings.model_fields)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dspyrt.agents.lm.demo_provider",
        description="A local OpenAI-compatible DEMO/TEST provider (answers like the offline demo engine).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--api-key", required=True, help="the bearer key requests must carry")
    parser.add_argument("--model", action="append", default=[], help="an accepted model name (repeat); none: any")
    for name, field in FaultSettings.model_fields.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=field.description)
    return parser


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _run(options: ProviderOptions) -> None:
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            port = await tg.start(serve, options)
            print(f"listening on http://{_url_host(options.host)}:{port}", flush=True)
            async for _ in signals:
                tg.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """The process: parse the flags, serve, exit 0 on SIGTERM/SIGINT (2 on invalid flags)."""
    parser = _parser()
    args = parser.parse_args(argv)
    faults = {name: getattr(args, name) for name in _FAULT_FLAGS if getattr(args, name) is not None}
    try:
        options = ProviderOptions(
            api_key=args.api_key,
            models=tuple(args.model),
            host=args.host,
            port=args.port,
            faults=FaultSettings.model_validate(faults),
        )
    except ValidationError as exc:
        parser.error(str(exc))
    anyio.run(_run, options)
    return 0


# --- the process, from a test ---------------------------------------------------------------------------------


class DemoProviderProcess:
    """A running provider process (``process``). ``url`` is the ``api_base`` to give ``dspy.LM`` (it ends in
    ``/v1``); ``root`` is the server's address, where ``/stats``, ``/control`` and ``/reset`` live."""

    def __init__(self, process: subprocess.Popen[bytes], root: str, api_key: str) -> None:
        self.process = process
        self.root = root
        self.url = root + "/v1"
        self.api_key = api_key

    @property
    def port(self) -> int:
        return int(self.root.rsplit(":", 1)[1])

    def stats(self) -> dict[str, Any]:
        """The provider's counters (``GET /stats``, see :class:`ProviderStats`)."""
        return self._call("GET", "/stats")

    def control(self, **settings: Any) -> dict[str, Any]:
        """Replace the fault settings (unnamed ones take their defaults); the new settings."""
        return self._call("POST", "/control", FaultSettings(**settings).model_dump())

    def reset(self) -> dict[str, Any]:
        """Zero the counters and restart the fault schedule; the zeroed counters."""
        return self._call("POST", "/reset", {})

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process and wait for it (killed if it outlives ``timeout``); safe to call twice."""
        _terminate(self.process, timeout)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.root + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"demo provider {method} {path}: HTTP {exc.code}: {exc.read().decode()}") from exc
        return answer


@contextmanager
def run_demo_provider(
    *,
    api_key: str | None = None,
    models: Sequence[str] = (),
    host: str = "127.0.0.1",
    startup_timeout: float = 30.0,
    **faults: Any,
) -> Iterator[DemoProviderProcess]:
    """Start the provider as a subprocess on a free port; stop it when the block ends.

    ``faults`` are :class:`FaultSettings` fields (validated here, before anything starts). ``api_key``
    defaults to a fresh random key. The process's stderr is this process's.
    """
    settings = FaultSettings(**faults)
    key = api_key if api_key is not None else "sk-demo-" + secrets.token_hex(12)
    argv = [sys.executable, "-m", "dspyrt.agents.lm.demo_provider", "--host", host, "--port", "0", "--api-key", key]
    argv += [arg for model in models for arg in ("--model", model)]
    for name, value in settings.model_dump(exclude_defaults=True).items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, bufsize=0)
    try:
        running = DemoProviderProcess(process, _listening_root(process, startup_timeout), key)
        yield running
    finally:
        _terminate(process)


def _terminate(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    if process.stdout is not None and not process.stdout.closed:
        process.stdout.close()


def _listening_root(process: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait for the ``listening on URL`` line; the URL."""
    if process.stdout is None:
        raise RuntimeError("the provider's stdout is not a pipe")
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    received = b""
    while b"\n" not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the demo provider did not report listening within {timeout:g}s")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the demo provider exited before listening (exit code {process.wait(5)})")
            received += chunk
    line = received.split(b"\n", 1)[0].decode().strip()
    prefix = "listening on "
    if not line.startswith(prefix):
        raise RuntimeError(f"unexpected first line from the demo provider: {line!r}")
    return line[len(prefix) :]


if __name__ == "__main__":
    sys.exit(main())
