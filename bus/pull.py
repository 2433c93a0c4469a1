"""Pulling work from a durable pull consumer: every message that is waiting, up to the free slots, in one request;
when none is waiting, a long poll for one.

Why not nats-py's ``fetch(n)``: when nothing is waiting, it long-polls for ``n`` and holds the first message that
arrives until ``n`` have arrived or its timeout passes (up to the whole timeout of added latency), so a worker had
to fetch one message per request: one round trip per task. Here the no-wait probe takes what is waiting at once,
and the long poll asks for one message, so neither a burst nor a lone task waits.

Only stored messages (their reply is a ``$JS.ACK.`` subject) are handed out; anything else published onto the
inbox is dropped and counted with the connection's other repaired inbound messages (``Bus.inbound``: its health
check shows them, and a flood logs one warning per interval).
"""

from __future__ import annotations

import json
import time

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError

from dspyrt.bus.connection import STORED_REPLY_PREFIX, Bus

# Server statuses that end a pull request normally: nothing waiting (no-wait probe), the long poll expired.
_END_STATUSES = frozenset({"404", "408"})
# 100 is an idle heartbeat; any other status is a refusal (400 bad request, 409 consumer deleted, leadership
# change, too many waiting requests, 503 no one serves the consumer): raised, so the caller backs off.
# The server ends a long poll this much before the client stops waiting for it, so that no message is delivered
# to a request the client has given up on.
_EXPIRY_MARGIN = 0.05


class PullRefusedError(Exception):
    """The server refused a pull request (the consumer is gone, a leader is changing, too many requests wait)."""


class Puller:
    """Pulls from one durable consumer through its ``$JS.API.CONSUMER.MSG.NEXT`` subject on an inbox of its own.

    ``await puller.start()`` before ``fetch``; ``await puller.close()`` stops deliveries to it (a request still
    open at the server would otherwise take messages nobody handles until their ``ack_wait``)."""

    def __init__(self, bus: Bus, next_subject: str) -> None:
        self.nc = bus.nc
        self.inbound = bus.inbound
        self.next_subject = next_subject
        self._sub: Subscription | None = None
        self._inbox = ""

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox)

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def fetch(self, n: int, timeout: float) -> list[Msg]:
        """Up to ``n`` messages: those waiting now, else the first to arrive within ``timeout`` (or none)."""
        try:
            msgs = await self._pull(n, no_wait=True, timeout=timeout)
        except PullRefusedError:
            if n == 1:
                raise
            msgs = []  # e.g. the consumer's max_request_batch is below n: one at a time still works
        if msgs:
            return msgs
        return await self._pull(1, no_wait=False, timeout=timeout)

    async def _pull(self, batch: int, *, no_wait: bool, timeout: float) -> list[Msg]:
        sub = self._sub
        if sub is None:
            raise RuntimeError("Puller.fetch before start (or after close)")
        request: dict[str, object] = {"batch": batch}
        if no_wait:
            request["no_wait"] = True
        else:
            request["expires"] = int(max(timeout - _EXPIRY_MARGIN, 0.01) * 1e9)
        await self.nc.publish(self.next_subject, json.dumps(request).encode(), reply=self._inbox)
        msgs: list[Msg] = []
        deadline = time.monotonic() + timeout
        while len(msgs) < batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=remaining)
            except NatsTimeoutError:
                break
            status = (msg.headers or {}).get("Status") if not msg.reply else None
            if status is not None:
                if status in _END_STATUSES:
                    break  # this request (or a late one's) is over
                if status == "100":
                    continue
                if msgs:
                    break  # hand out what came; the next pull meets the refusal again
                description = (msg.headers or {}).get("Description", "")
                raise PullRefusedError(f"{self.next_subject}: {status} {description}".strip())
            if not msg.reply.startswith(STORED_REPLY_PREFIX):
                self.inbound.messages_dropped += 1
                self.inbound.note(f"dropped a message on the pull inbox of {self.next_subject}: not a stored message")
                continue
            msgs.append(msg)
        return msgs
