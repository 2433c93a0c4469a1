"""Connecting to NATS: options from configuration, reconnect forever, drain on close.

``Bus`` is the bus layer's one long-lived object: a connected client, its JetStream context, the subject
names of the deployment, and the traced publish/request primitives everything else uses.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from pydantic import BaseModel, Field, SecretStr

from bus import tracing
from bus.errors import BusUnavailableError, DspyrtError, ErrorBody, RemoteError
from bus.messages import ERROR_CODE_HEADER, ERROR_HEADER, check_size, decode, encode
from bus.subjects import Subjects

log = logging.getLogger("dspyrt.bus")
R = TypeVar("R", bound=BaseModel)


def _tolerate_undecodable_status_lines(nc: Client) -> None:
    """Drop the header block of a message whose inline status line is not UTF-8, instead of the read loop.

    nats-py 2.16 decodes that line without a guard (``_process_headers``); the error escapes into its read loop,
    which stops for good while the client still reports "connected": the process never reads again. Anyone who
    may publish to one agent subject can send such a message. The message itself is still delivered, headerless.
    """
    process_headers = getattr(nc, "_process_headers", None)
    if process_headers is None:  # a nats-py without this private method: nothing to wrap
        return

    async def tolerant(headers: bytes | None) -> dict[str, str] | None:
        try:
            parsed: dict[str, str] | None = await process_headers(headers)
            return parsed
        except UnicodeDecodeError:
            log.warning("dropped the header block of a message: its status line is not UTF-8")
            return None

    nc._process_headers = tolerant  # type: ignore[method-assign]


class TlsOptions(BaseModel):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    hostname: str | None = None
    handshake_first: bool = False

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.cert_file:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return ctx


class ConnectionOptions(BaseModel):
    """How to reach NATS. Secrets are ``SecretStr`` so they never print or land in spans."""

    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    name: str = "dspyrt"
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    credentials_file: Path | None = None
    nkey_seed_file: Path | None = None
    tls: TlsOptions | None = None
    # Replies to this connection arrive under it (``bus.subjects.inbox_prefix``).
    inbox_prefix: str = "_INBOX"
    connect_timeout: float = 2.0
    reconnect_wait: float = 0.5
    # -1: keep trying forever once connected; agents must survive a server restart by themselves.
    max_reconnect_attempts: int = -1
    # The first connect gives up after this many tries per server, so a missing system fails fast.
    initial_connect_attempts: int = 2
    drain_timeout: float = 10.0


class Bus:
    """A connection to NATS for one deployment (one subject prefix).

    States: unopened → open (``connect``) → closed (``close``); a closed Bus refuses reuse.
    """

    def __init__(self, options: ConnectionOptions, subjects: Subjects | None = None) -> None:
        self.options = options
        self.subjects = subjects or Subjects()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._closed = False
        self._lost: anyio.Event | None = None
        self.lost_reason = ""
        self.reconnects = 0

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise BusUnavailableError("the bus is not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusUnavailableError("the bus is not connected")
        return self._js

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    async def connect(self) -> Bus:
        if self._closed:
            raise BusUnavailableError("this Bus was closed; make a new one")
        if self._nc is not None:
            return self
        opts = self.options
        lost = self._lost = anyio.Event()
        # Errors before the first connect succeeds (a refused password) explain the failure: keep the last one.
        connect_errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            if self._nc is None:
                connect_errors.append(exc)
            else:
                log.warning("nats error: %s", exc)

        async def on_closed() -> None:
            # nats-py gives up for good on some server errors (a maximum payload violation, a revoked user):
            # every agent of the process would be off the bus while it runs on. ``serve`` waits on this.
            if not self._closed:
                nc = self._nc
                self.lost_reason = str(nc.last_error) if nc is not None and nc.last_error else "closed by nats-py"
                log.error("NATS closed the connection for good: %s", self.lost_reason)
                lost.set()

        async def on_disconnect() -> None:
            if not self._closed:
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            self.reconnects += 1
            url = self._nc.connected_url if self._nc else None
            log.info("reconnected to NATS at %s", url.netloc if url else "?")

        kwargs: dict[str, object] = {}
        if opts.user:
            kwargs["user"] = opts.user
        if opts.password:
            kwargs["password"] = opts.password.get_secret_value()
        if opts.token:
            kwargs["token"] = opts.token.get_secret_value()
        if opts.credentials_file:
            kwargs["user_credentials"] = str(opts.credentials_file)
        if opts.nkey_seed_file:
            kwargs["nkeys_seed"] = str(opts.nkey_seed_file)
        if opts.tls:
            kwargs["tls"] = opts.tls.context()
            if opts.tls.hostname:
                kwargs["tls_hostname"] = opts.tls.hostname
            kwargs["tls_handshake_first"] = opts.tls.handshake_first
        try:
            self._nc = await nats.connect(
                servers=opts.servers,
                name=opts.name,
                connect_timeout=int(max(1, opts.connect_timeout)),
                reconnect_time_wait=opts.reconnect_wait,  # type: ignore[arg-type]
                max_reconnect_attempts=opts.initial_connect_attempts,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                closed_cb=on_closed,
                drain_timeout=int(opts.drain_timeout),
                inbox_prefix=opts.inbox_prefix,
                **kwargs,  # type: ignore[arg-type]
            )
        except (NoServersError, OSError, TimeoutError) as exc:
            # nats-py reports a refused login as a plain Error naming the server's reason.
            refused = [e for e in connect_errors if "authorization violation" in str(e).lower()]
            if refused:
                who = f"user {opts.user!r}" if opts.user else "this client"
                raise BusUnavailableError(
                    f"NATS at {', '.join(opts.servers)} refused the credentials of {who} (Authorization Violation)"
                ) from exc
            raise BusUnavailableError(f"cannot reach NATS at {', '.join(opts.servers)}: {exc}") from exc
        _tolerate_undecodable_status_lines(self._nc)
        # nats-py reads this option on every reconnect; from now on the connection must never give up.
        self._nc.options["max_reconnect_attempts"] = opts.max_reconnect_attempts
        self._js = self._nc.jetstream()
        return self

    async def wait_lost(self) -> str:
        """Return, with the reason, once NATS has closed this connection for good (not by ``close``)."""
        if self._lost is None:
            raise BusUnavailableError("the bus is not connected")
        await self._lost.wait()
        return self.lost_reason

    async def flush(self, timeout: float = 5.0) -> None:
        """Return once the server has processed everything sent so far, subscriptions included.

        nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands still queued for its
        flusher task, so it can return before a subscription just made reaches the server. A message to
        ourselves travels the same queue as everything before it.
        """
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(inbox, b"")
            await sub.next_msg(timeout=timeout)
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def close(self) -> None:
        """Drain (finish in-flight callbacks, flush publishes) and close. Safe to call twice."""
        self._closed = True
        nc, self._nc, self._js = self._nc, None, None
        if nc is None or nc.is_closed:
            return
        try:
            await nc.drain()
        except Exception as exc:  # a dead server must not turn shutdown into a crash
            log.debug("drain failed (%s); closing", exc)
            await nc.close()

    async def __aenter__(self) -> Bus:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- traced primitives -------------------------------------------------------------------------

    async def publish(self, subject: str, payload: BaseModel | bytes, headers: dict[str, str] | None = None) -> None:
        """Core-NATS publish with trace context (fire and forget at the protocol level)."""
        data = payload if isinstance(payload, bytes) else encode(payload)
        check_size(data, self.max_payload, f"message to {subject}")
        hdrs = dict(headers) if headers else {}
        with tracing.send_span(subject, size=len(data)):
            tracing.inject(hdrs)
            await self.nc.publish(subject, data, headers=hdrs or None)

    async def request(
        self,
        subject: str,
        payload: BaseModel | bytes,
        reply_model: type[R],
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> R:
        """Request/reply with a typed answer; an error reply raises :class:`RemoteError`."""
        msg = await self.request_raw(subject, payload, timeout=timeout, headers=headers)
        return decode(reply_model, msg.data)

    async def request_raw(
        self,
        subject: str,
        payload: BaseModel | bytes,
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        data = payload if isinstance(payload, bytes) else encode(payload)
        check_size(data, self.max_payload, f"request to {subject}")
        hdrs = dict(headers) if headers else {}
        with tracing.send_span(subject, size=len(data), expects_reply=True) as span:
            tracing.inject(hdrs)
            try:
                msg = await self.nc.request(subject, data, timeout=timeout, headers=hdrs or None)
            except NoRespondersError as exc:
                tracing.mark_error(span, "no_responders", subject)
                raise BusUnavailableError(f"no agent is serving {subject}") from exc
            except (NatsTimeoutError, TimeoutError) as exc:
                tracing.mark_error(span, "timeout", subject)
                raise DspyrtError(f"no reply on {subject} within {timeout:g}s", code="timeout") from exc
            raise_for_error(msg)
            return msg

    async def gather(self, subject: str, *, window: float = 1.0, quiet: float = 0.25) -> list[Msg]:
        """Scatter-gather: one request, every reply that arrives within ``window`` (stops early after
        ``quiet`` seconds without a new one). Used for ``$SRV.*`` discovery, where every instance answers."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        replies: list[Msg] = []
        try:
            await self.nc.publish(subject, b"", reply=inbox, headers=tracing.inject({}) or None)
            deadline = anyio.current_time() + window
            while (left := deadline - anyio.current_time()) > 0:
                try:
                    replies.append(await sub.next_msg(timeout=min(left, quiet if replies else left)))
                except NatsTimeoutError:
                    if replies:
                        break
        finally:
            await sub.unsubscribe()
        return replies


def raise_for_error(msg: Msg) -> None:
    """Turn a micro error reply (``Nats-Service-Error`` headers, JSON body) into :class:`RemoteError`."""
    headers = msg.headers
    if not headers or ERROR_CODE_HEADER not in headers:
        return
    try:
        body = ErrorBody.model_validate_json(msg.data)
    except ValueError:
        body = ErrorBody(code=headers[ERROR_CODE_HEADER], message=headers.get(ERROR_HEADER, "error"))
    raise RemoteError(body)
