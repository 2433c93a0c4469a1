"""Connecting to NATS: options from configuration, reconnect forever, drain on close.

``Bus`` is the bus layer's one long-lived object: a connected client, its JetStream context, the subject
names of the deployment, and the traced publish/request primitives everything else uses.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from pydantic import BaseModel, Field, SecretStr

from dspyrt.bus import tracing
from dspyrt.bus.errors import BusUnavailableError, DspyrtError, ErrorBody, RemoteError
from dspyrt.bus.messages import ERROR_CODE_HEADER, ERROR_HEADER, check_size, decode, encode
from dspyrt.bus.subjects import Subjects

log = logging.getLogger("dspyrt.bus")
R = TypeVar("R", bound=BaseModel)

# Repaired or dropped inbound messages are logged at most once per this many seconds (with the totals).
LOG_EVERY = 10.0


@dataclass
class InboundRepairs:
    """Inbound messages nats-py could not process as sent, which the connection survived (``_InboundGuard``).

    ``headers_dropped``: delivered without their header block (nats-py could not parse it);
    ``statuses_removed``: stored messages (JetStream deliveries) whose publisher wrote a ``Status``, delivered
    without it; ``messages_dropped``: not delivered at all (a subject or reply subject that is not UTF-8: nobody
    could answer or acknowledge it); ``processing_errors``: nats-py failed on a message after parsing it (its
    JetStream bookkeeping); that message may be lost. ``last`` says what the latest one was.
    """

    headers_dropped: int = 0
    statuses_removed: int = 0
    messages_dropped: int = 0
    processing_errors: int = 0
    last: str = ""
    _logged_at: float = field(default=float("-inf"), repr=False)

    @property
    def total(self) -> int:
        return self.headers_dropped + self.statuses_removed + self.messages_dropped + self.processing_errors

    def as_dict(self) -> dict[str, int]:
        return {
            "headers_dropped": self.headers_dropped,
            "statuses_removed": self.statuses_removed,
            "messages_dropped": self.messages_dropped,
            "processing_errors": self.processing_errors,
        }

    def note(self, what: str) -> None:
        # A hostile publisher can send these in a loop: one warning per LOG_EVERY seconds, with the totals.
        self.last = what
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.warning("%s (so far: %s)", what, ", ".join(f"{k} {v}" for k, v in self.as_dict().items()))


# A JetStream delivery of a stored message: its reply subject is the ack subject.
STORED_REPLY_PREFIX = "$JS.ACK."
_STORED_REPLY = STORED_REPLY_PREFIX.encode()
# What nats-py reads as a server status (inline status line or header lines; it keys Description by an enum).
_STATUS_KEYS = ("Status", "Description")


class _InboundGuard:
    """Keeps hostile bytes from ending a connection's read loop; counts what was repaired or dropped.

    nats-py 2.16 runs its message parsing inside its read loop (``_read_loop`` → parser → ``_process_msg``), and
    an exception there ends the loop for good while the client still reports "connected": the process reads
    nothing more until a stale-connection reconnect minutes later. The server relays any header block and any
    subject bytes a publisher sends, so anyone allowed to publish on one subject an agent reads could do it:

    - ``_process_headers``: a header block shorter than ``NATS/1.0`` + one byte (``NATS/1.0`` alone, ``\\r\\n\\r\\n``,
      ``NAT``) raises IndexError; an inline status line or description that is not UTF-8, or whose first three
      bytes cut a UTF-8 character (``NATS/1.0 ééé``), raises UnicodeDecodeError. The message is delivered
      without headers instead.
    - ``_build_message``: a subject or reply subject that is not UTF-8 raises UnicodeDecodeError. The message
      is dropped instead (nats-py skips a message it could not build).
    - the rest of ``_process_msg`` (JetStream flow control, heartbeats, ordered consumers parse headers and reply
      subjects of messages that can be forged onto their delivery subjects): an error ends that message only.

    Not an exception, but the same trust: a stored message (JetStream delivery, ``$JS.ACK.`` reply) never
    carries a server status, yet nats-py's pull ``fetch`` reads a ``Status`` its publisher wrote as one: it
    raised APIError for the whole batch (the other tasks fetched with it went back only after ``ack_wait``, one
    delivery lost each) or skipped the message until ``max_deliver``. Such a status is removed.

    Each wrapper exists only where nats-py has the private method it wraps. The fix nats-py itself could take:
    ``deploy/upstream/nats-py-header-parsing.md``.
    """

    def __init__(self, nc: Client, repairs: InboundRepairs) -> None:
        self.repairs = repairs
        self._stored = False  # the message being processed is a JetStream delivery (the read loop is sequential)
        # nats-py's own methods (bound), or None where this nats-py has no such private method.
        self._process_headers: Any = getattr(nc, "_process_headers", None)
        self._build_message: Any = getattr(nc, "_build_message", None)
        self._process_msg: Any = getattr(nc, "_process_msg", None)
        if self._process_headers is not None:
            nc._process_headers = self.process_headers  # type: ignore[method-assign]
        if self._build_message is not None:
            nc._build_message = self.build_message  # type: ignore[method-assign]
        if self._process_msg is not None:
            nc._process_msg = self.process_msg  # type: ignore[method-assign]

    async def process_headers(self, headers: bytes | None) -> dict[str, str] | None:
        try:
            parsed: dict[str, str] | None = await self._process_headers(headers)
        except Exception as exc:
            self.repairs.headers_dropped += 1
            self.repairs.note(f"delivered a message without its header block {_preview(headers)}: {_why(exc)}")
            return None
        if parsed and self._stored and any(key in parsed for key in _STATUS_KEYS):
            self.repairs.statuses_removed += 1
            self.repairs.note(f"removed the status a publisher wrote into a stored message {_preview(headers)}")
            return {k: v for k, v in parsed.items() if k not in _STATUS_KEYS} or None
        return parsed

    def build_message(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> Msg | None:
        try:
            msg: Msg = self._build_message(sid, subject, reply, data, headers)
            return msg
        except UnicodeDecodeError as exc:
            self.repairs.messages_dropped += 1
            self.repairs.note(f"dropped a message to {_preview(subject)} (reply {_preview(reply)}): {_why(exc)}")
            return None

    async def process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self._stored = reply.startswith(_STORED_REPLY)
        try:
            await self._process_msg(sid, subject, reply, data, headers)
        except Exception as exc:
            self.repairs.processing_errors += 1
            self.repairs.note(f"nats-py failed on a message to {_preview(subject)}: {_why(exc)}")
        finally:
            self._stored = False


def _preview(raw: bytes | None, limit: int = 40) -> str:
    if raw is None:
        return "(none)"
    return repr(raw[:limit]) + (f"... ({len(raw)} bytes)" if len(raw) > limit else "")


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


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
    # Replies to this connection arrive under it (``dspyrt.bus.subjects.inbox_prefix``).
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
        # True when this process gave the connection up (``mark_lost``), not nats-py.
        self.gave_up = False
        self.reconnects = 0
        # Inbound messages nats-py could not process (hostile bytes); the connection lived on.
        self.inbound = InboundRepairs()

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
        _InboundGuard(self._nc, self.inbound)
        # nats-py reads this option on every reconnect; from now on the connection must never give up.
        self._nc.options["max_reconnect_attempts"] = opts.max_reconnect_attempts
        self._js = self._nc.jetstream()
        return self

    async def force_reconnect(self, reason: str) -> bool:
        """Drop the current connection and connect again (subscriptions are restored): for a connection that
        stopped delivering while nats-py still reports it connected. False when there was nothing to do
        (not connected: nats-py is already reconnecting, or the Bus is closed)."""
        nc = self._nc
        if self._closed or nc is None or not nc.is_connected or nc.is_draining:
            return False
        log.error("forcing a reconnect to NATS: %s", reason)
        await nc.force_reconnect()
        return True

    def mark_lost(self, reason: str) -> None:
        """Declare this connection lost for good (``wait_lost`` returns ``reason``): the process runs deaf
        otherwise. ``serve`` then stops, so that the process manager starts the process again."""
        if self._closed or self._lost is None or self._lost.is_set():
            return
        self.lost_reason, self.gave_up = reason, True
        log.error("giving the connection to NATS up: %s", reason)
        self._lost.set()

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
        if self.gave_up:  # deaf: a drain would wait drain_timeout for a PONG that cannot arrive
            await nc.close()
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
