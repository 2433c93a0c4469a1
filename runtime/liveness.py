"""Liveness of a process's NATS connection: it hears itself through the server, or it is made to reconnect.

A connection can stop delivering while nats-py still reports it connected: a read loop that ended on a hostile
message (issue 11), a half-open path through a proxy or a NAT. nats-py notices only at its stale-connection
check, ``ping_interval`` times ``max_outstanding_pings`` later (2 min, twice, by default); until then every agent of the
process answers nothing, and the tasks it holds run out of deliveries.

``LivenessGuard`` publishes a probe to a private inbox subject of its own connection every ``interval`` seconds and
waits ``timeout`` seconds for it to come back through the server. When it does not come back while nats-py still
says "connected", the guard forces a reconnect (nats-py restores the subscriptions); when the connection is still
deaf after ``attempts`` forced reconnects, it declares the bus lost (``Bus.mark_lost``), and ``serve`` stops the
process with that reason so that its process manager starts it again. While nats-py itself reports the connection
down (a server restart), the guard only waits: reconnecting is nats-py's job then.

The guard lives in the task group of ``liveness_guard(bus, ...)``, an async context manager: one per process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus
from nats.aio.subscription import Subscription

from dspyrt.bus import Bus
from dspyrt.runtime.agent import CheckResult

log = logging.getLogger("dspyrt.liveness")

# Forced reconnects that leave the connection deaf before the process gives up.
ATTEMPTS = 2
# One last look for a probe after its timeout (see ``LivenessGuard._probe``).
LATE_GRACE = 0.2


@dataclass
class LivenessGuard:
    """Probes ``bus`` through the server every ``interval`` s; acts after ``timeout`` s without an echo.

    Figures for health: ``probes`` sent, ``recoveries`` (forced reconnects that brought the connection back),
    ``last_recovery`` (why and how long it took), ``deaf_since`` (set while the guard is recovering).
    """

    bus: Bus
    interval: float = 5.0
    timeout: float = 3.0
    attempts: int = ATTEMPTS
    probes: int = 0
    recoveries: int = 0
    last_recovery: str = ""
    deaf_since: float | None = None
    last_echo: float | None = None
    _subject: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0 or self.attempts < 1:
            raise ValueError("liveness: interval and timeout must be positive, attempts at least 1")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        nc = self.bus.nc
        self._subject = nc.new_inbox()
        sub = await nc.subscribe(self._subject)
        try:
            task_status.started()
            while not self.bus.gave_up:  # given up: the process is stopping; forcing more reconnects only delays it
                await anyio.sleep(self.interval)
                # Not connected: nats-py is reconnecting by itself (a server restart); nothing to judge.
                if self.bus.connected and not await self._probe(sub) and self.bus.connected:
                    await self._recover(sub)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection is closing or gone
                    pass

    async def _probe(self, sub: Subscription) -> bool:
        """Publish a probe to our own subject; True once it came back within ``timeout``."""
        self.probes += 1
        token = str(self.probes).encode()
        try:
            await self.bus.nc.publish(self._subject, token)
        except Exception as exc:  # closing, or the outbound buffer is full while reconnecting
            log.debug("liveness probe not sent: %s", exc)
            return False
        with anyio.move_on_after(self.timeout):
            return await self._echo(sub, token)
        # After an event loop busy past the deadline, the timeout can fire before the read loop had its turn: a
        # late echo is a slow process, not a deaf connection (a forced reconnect would only add to its load).
        with anyio.move_on_after(LATE_GRACE):
            return await self._echo(sub, token)
        return False

    async def _echo(self, sub: Subscription, token: bytes) -> bool:
        while True:
            try:
                msg = await sub.next_msg(timeout=None)
            except Exception as exc:  # the connection closed
                log.debug("liveness probe: %s", exc)
                return False
            if msg.data == token:  # earlier probes that came back late, or anything else, are skipped
                self.last_echo = anyio.current_time()
                return True

    async def _recover(self, sub: Subscription) -> None:
        detected = self.deaf_since = anyio.current_time()
        reason = (
            f"no message came back through NATS within {self.timeout:g}s while nats-py reported the connection up "
            "(its reader stopped, or the connection is half-open)"
        )
        opts = self.bus.options
        reconnect_wait = opts.connect_timeout + opts.reconnect_wait + self.timeout
        try:
            for attempt in range(1, self.attempts + 1):
                if not await self.bus.force_reconnect(f"liveness: {reason}; attempt {attempt} of {self.attempts}"):
                    return  # nats-py is already reconnecting: its job
                with anyio.move_on_after(reconnect_wait):
                    while not self.bus.connected:
                        await anyio.sleep(0.02)
                if not self.bus.connected:
                    log.warning("liveness: not reconnected within %.1fs; nats-py keeps trying", reconnect_wait)
                    return
                if await self._probe(sub):
                    took = anyio.current_time() - detected
                    self.recoveries += 1
                    self.last_recovery = f"{reason}; answered again {took:.1f}s after detection (forced reconnect)"
                    log.warning("liveness: the connection answers again, %.1fs after it was found deaf", took)
                    return
            self.bus.mark_lost(f"liveness: {reason}, and still after {self.attempts} forced reconnects")
        finally:
            self.deaf_since = None

    def check(self) -> CheckResult:
        """The ``liveness`` health check."""
        now = anyio.current_time()
        if self.deaf_since is not None:
            return CheckResult(
                ok=False, detail=f"deaf for {now - self.deaf_since:.1f}s (nothing came back through NATS); reconnecting"
            )
        parts = [f"hears itself through NATS (probe every {self.interval:g}s, timeout {self.timeout:g}s)"]
        if self.last_echo is not None:
            parts.append(f"last echo {now - self.last_echo:.1f}s ago")
        if self.recoveries:
            parts.append(f"{self.recoveries} recovery(ies) by forced reconnect, last: {self.last_recovery}")
        return CheckResult(ok=True, detail="; ".join(parts))

    def figures(self) -> dict[str, int]:
        return {"liveness_probes": self.probes, "liveness_recoveries": self.recoveries}


@asynccontextmanager
async def liveness_guard(
    bus: Bus, *, interval: float = 5.0, timeout: float = 3.0, attempts: int = ATTEMPTS
) -> AsyncIterator[LivenessGuard]:
    """Watch ``bus`` for the block (its task group owns the probe loop); the guard for health figures."""
    guard = LivenessGuard(bus, interval, timeout, attempts)
    async with anyio.create_task_group() as tg:
        await tg.start(guard.run)
        try:
            yield guard
        finally:
            tg.cancel_scope.cancel()
