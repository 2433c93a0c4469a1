"""The liveness guard (``dspyrt.runtime.liveness``): a process whose connection stops delivering while nats-py still
says "connected" reconnects by itself within seconds, or exits with the reason so that its supervisor restarts it.

The deafness is real in each test, never simulated: nats-py's own read loop ended by a poison message (the parsing
guard of ``dspyrt.bus.connection`` taken off that one connection, as nats-py 2.16 ships), or a TCP proxy between an
agent process and nats-server that stops passing the server's bytes on while the process's own still get through (a
half-open connection). No timing is asserted: how long the recovery took is printed (``-s``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.lowlevel
import nats
import pytest
from anyio.abc import SocketAttribute, SocketStream
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from dspyrt.bus import EmbeddedServer
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.liveness import ATTEMPTS
from dspyrt.runtime.registry import available_agents
from tests.helpers import AgentProcess, serving, wait_until
from tests.test_header_fuzz import RawNats

pytestmark = pytest.mark.timeout(45)

FAST = {"liveness_interval": 0.5, "liveness_timeout": 1.0, "shutdown_grace": 1.0}


async def answers_ping(nc: NatsClient, service: str, timeout: float = 0.5) -> bool:
    """One ``$SRV.PING`` to the service's instances: did one answer within ``timeout``?"""
    try:
        await nc.request(f"$SRV.PING.{service}", b"", timeout=timeout)
        return True
    except (NatsTimeoutError, NoRespondersError, TimeoutError):
        return False


# ----------------------------------------------------------------------------------------- a half-open proxy


@dataclass
class Link:
    deaf: bool = False


class HalfOpenProxy:
    """A TCP proxy in front of nats-server. ``deafen()``: the connections through it stop passing the server's
    bytes to the client (they are read and dropped) while the client's still reach the server: the server sees
    a healthy client, nats-py sees a quiet server and keeps saying "connected". ``deaf_after_handshake``: every
    new connection goes the same way right after the server's first ``PONG`` (the end of the handshake)."""

    def __init__(self, server: EmbeddedServer) -> None:
        self.server = server
        self.port = 0
        self.deaf_after_handshake = False
        self.links: list[Link] = []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def deafen(self) -> None:
        for link in self.links:
            link.deaf = True

    @asynccontextmanager
    async def running(self) -> AsyncIterator[HalfOpenProxy]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._link)
            yield self
            tg.cancel_scope.cancel()

    async def _link(self, client: SocketStream) -> None:
        link = Link()
        self.links.append(link)
        async with client, await anyio.connect_tcp(self.server.host, self.server.port) as upstream:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, upstream, None, tg.cancel_scope)
                tg.start_soon(self._pump, upstream, client, link, tg.cancel_scope)

    async def _pump(self, source: SocketStream, sink: SocketStream, link: Link | None, done: anyio.CancelScope) -> None:
        handshake = b""
        try:
            async for chunk in source:
                if link is not None and link.deaf:
                    continue
                await sink.send(chunk)
                if link is not None and self.deaf_after_handshake:
                    handshake += chunk
                    link.deaf = b"PONG\r\n" in handshake
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            pass
        done.cancel()  # one side is gone: close both


# ----------------------------------------------------------------------------------------- tests


async def test_a_read_loop_ended_by_a_poison_message_is_restarted_by_a_forced_reconnect(
    config: IntegrationConfig, nats_server: EmbeddedServer
) -> None:
    """The issue's failure itself: nats-py 2.16's parsing (the guard of bus.connection taken off the process's
    connection) meets ``NATS/1.0``; its read loop ends, the client still says "connected". The process's liveness
    guard hears nothing back, forces a reconnect, and the agent answers $SRV.PING again."""
    example = available_agents()["example"]
    async with serving(config.model_copy(update=FAST), [example]) as system:
        guard = system.supervisor.liveness
        assert guard is not None
        nc = system.bus.nc
        for name in ("_process_headers", "_build_message", "_process_msg"):
            vars(nc).pop(name)  # the instance's wrappers: nats-py's own methods answer again
        service = config.subjects.service_name("example")
        async with await nats.connect(nats_server.url) as probe:
            assert await answers_ping(probe, service)
            async with RawNats.connect(nats_server.host, nats_server.port) as raw:
                await raw.hpub(config.subjects.endpoint("example", "echo"), b"NATS/1.0", b"{}")
                await raw.flush()
            poisoned = anyio.current_time()
            await wait_until(lambda: answers_ping(probe, service), timeout=20, what="$SRV.PING answered again")
            print(f"\nanswering $SRV.PING again {anyio.current_time() - poisoned:.2f}s after the poison message")
        # The guard's own probe after the reconnect may come back a moment after the PING did.
        await wait_until(lambda: guard.recoveries > 0, timeout=10, what="recovery recorded")
        health = await system.supervisor.hosts["example"].refresh_health()
    assert guard.recoveries == 1 and system.bus.reconnects == 1, (guard, system.bus.reconnects)
    assert health.checks["liveness"].ok and "forced reconnect" in health.checks["liveness"].detail
    assert health.bus["liveness_recoveries"] == 1 and health.bus["reconnects"] == 1


async def test_a_half_open_connection_is_reconnected_and_the_process_answers_again(
    config: IntegrationConfig, nats_server: EmbeddedServer, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    """An agent process (``python -m tests.agent_proc``) connected through a proxy that stops passing the server's
    bytes on: nats-py would notice after ~4 minutes (two unanswered pings, 2 minutes apart). The liveness guard
    forces a reconnect (a new connection through the proxy, which passes again) and says why in the log."""
    async with HalfOpenProxy(nats_server).running() as proxy:
        through_proxy = config.model_copy(update={"nats_urls": [proxy.url]})
        process = AgentProcess(through_proxy, tmp_path / "agent", tmp_path / "markers", **FAST).start()
        processes.append(process)
        await process.ready()
        service = config.subjects.service_name("sleeper")
        async with await nats.connect(nats_server.url) as probe:
            assert await answers_ping(probe, service)
            proxy.deafen()
            deafened = anyio.current_time()
            await wait_until(lambda: answers_ping(probe, service), timeout=20, what="$SRV.PING answered again")
            took = anyio.current_time() - deafened
            # The guard's own probe after the reconnect may come back a moment after the PING did.
            await wait_until(lambda: "the connection answers again" in process.log, timeout=10, what="recovery logged")
            reply = await probe.request(config.subjects.endpoint("sleeper", "health"), b"{}", timeout=5)
        print(f"\nanswering $SRV.PING again {took:.2f}s after the connection went deaf")
    assert "forcing a reconnect to NATS: liveness: no message came back" in process.log, process.log
    health = json.loads(reply.data)
    assert health["bus"]["liveness_recoveries"] == 1, health
    assert len(proxy.links) == 2  # the deaf connection, and the one nats-py made when forced to


async def test_a_process_whose_connection_stays_deaf_exits_with_the_reason(
    config: IntegrationConfig, nats_server: EmbeddedServer, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    """Every connection through the proxy goes deaf right after its handshake: forced reconnects do not help, so
    the process gives its connection up and exits non-zero, saying why, for its process manager to restart it."""
    async with HalfOpenProxy(nats_server).running() as proxy:
        through_proxy = config.model_copy(update={"nats_urls": [proxy.url]})
        process = AgentProcess(through_proxy, tmp_path / "agent", tmp_path / "markers", **FAST).start()
        processes.append(process)
        await process.ready()
        proxy.deaf_after_handshake = True
        proxy.deafen()
        deafened = anyio.current_time()
        code = await process.wait(timeout=30)
        print(f"\nexited with {code} {anyio.current_time() - deafened:.2f}s after its connection went deaf")
    assert code != 0
    assert "this process gave the connection up for good (liveness: no message came back" in process.log
    assert f"still after {ATTEMPTS} forced reconnects" in process.log


async def test_a_busy_event_loop_is_not_taken_for_a_deaf_connection(config: IntegrationConfig) -> None:
    """A handler that blocks the event loop (sync DSPy work, say) past the probe's timeout delays the echo; the
    echo is then in the socket, unread, when the deadline fires. A forced reconnect would only add to the load:
    the guard takes the late echo for what it is."""
    example = available_agents()["example"]
    async with serving(
        config.model_copy(update={"liveness_interval": 0.2, "liveness_timeout": 0.3}), [example]
    ) as system:
        guard = system.supervisor.liveness
        assert guard is not None
        for _ in range(5):
            sent = guard.probes
            while guard.probes == sent:  # a probe is on its way: stall the loop now
                await anyio.lowlevel.checkpoint()
            time.sleep(0.5)  # noqa: ASYNC251  # the point: the whole loop stalls, the probe's wait included
    assert guard.recoveries == 0 and system.bus.reconnects == 0, (guard, system.bus.reconnects)
