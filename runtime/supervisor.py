"""Running agents: one process with every configured agent (``dspyrt up``) or one agent (``dspyrt agent NAME``).

The supervisor restarts a crashed agent with exponential backoff, and SIGTERM/SIGINT drain the process:
requests in flight are answered, tasks in flight finish within the grace period or go back to JetStream.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskStatus

from dspyrt.bus import Bus, BusUnavailableError, EmbeddedServer, TaskStore, ensure_streams, free_port
from dspyrt.runtime.agent import Agent
from dspyrt.runtime.client import Client, system_file
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.host import AgentHost
from dspyrt.runtime.liveness import LivenessGuard, liveness_guard
from dspyrt.runtime.telemetry import Telemetry, setup_telemetry

log = logging.getLogger("dspyrt.supervisor")

MAX_BACKOFF = 30.0


@dataclass
class Supervisor:
    """Keeps each agent running; a crash restarts it after a growing delay (0.5 s doubling to 30 s)."""

    config: IntegrationConfig
    agent_classes: list[type[Agent]]
    bus: Bus
    store: TaskStore
    hosts: dict[str, AgentHost] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    liveness: LivenessGuard | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for cls in self.agent_classes:
                await tg.start(self._keep, cls)
            task_status.started()

    async def _keep(self, cls: type[Agent], *, task_status: TaskStatus[None]) -> None:
        delay, started = 0.5, False
        self.restarts.setdefault(cls.name, 0)
        while True:
            try:
                host = AgentHost(
                    cls(self.config),
                    self.bus,
                    self.store,
                    Client(self.bus, self.store, identity=cls.name),
                    liveness=self.liveness,
                )
                async with anyio.create_task_group() as tg:
                    await tg.start(host.run)
                    self.hosts[cls.name] = host
                    if not started:
                        task_status.started()
                        started = True
                    delay = 0.5
            except Exception:
                log.exception("agent %s crashed; restarting in %.1fs", cls.name, delay)
            self.restarts[cls.name] += 1
            if not started:
                task_status.started()
                started = True
            await anyio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)


@dataclass
class RunningSystem:
    """What ``serve`` hands to its caller once everything is up."""

    config: IntegrationConfig
    nats_url: str
    bus: Bus
    client: Client
    supervisor: Supervisor
    telemetry: Telemetry
    embedded: EmbeddedServer | None
    cancel_scope: CancelScope

    def stop(self) -> None:
        self.cancel_scope.cancel()


def _pick_port(preferred: int) -> int:
    if preferred:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    return free_port()


@asynccontextmanager
async def _embedded_server(config: IntegrationConfig) -> AsyncIterator[EmbeddedServer | None]:
    if not config.embedded:
        yield None
        return
    config.state_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedServer(
        config.state_dir / "nats", port=_pick_port(config.nats_port), log_file=config.state_dir / "nats-server.log"
    )
    server.start()
    path = system_file(config)
    path.write_text(json.dumps({"nats_url": server.url, "pid": os.getpid(), "prefix": config.subject_prefix}))
    try:
        yield server
    finally:
        path.unlink(missing_ok=True)
        server.stop()


async def _cancel_on_signal(scope: CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: draining", signal.Signals(signum).name)
            scope.cancel()
            return


async def _cancel_when_lost(bus: Bus, scope: CancelScope) -> None:
    # A process off the bus for good (closed by nats-py, or deaf in spite of forced reconnects: the liveness
    # guard) must not run on deaf: stop it (serve says why), so it is restarted.
    await bus.wait_lost()
    scope.cancel()


async def serve(
    config: IntegrationConfig,
    agent_classes: list[type[Agent]],
    *,
    on_ready: Callable[[RunningSystem], Coroutine[Any, Any, None]] | None = None,
    handle_signals: bool = True,
    process_name: str = "dspyrt",
) -> None:
    """Run ``agent_classes`` until cancelled or signalled; start the embedded NATS when no URL is configured.

    Raises ``BusUnavailableError`` when the connection is lost for good: NATS closed it (nats-py does not reconnect
    then), or it stayed deaf in spite of forced reconnects (``dspyrt.runtime.liveness``).
    """
    telemetry = setup_telemetry(config.state_dir, service_name=process_name, instrumentations=config.instrumentations)
    try:
        async with _embedded_server(config) as server:
            servers = [server.url] if server else config.nats_urls
            bus = Bus(config.connection_options(servers, name=process_name), config.subjects)
            await bus.connect()
            try:
                await ensure_streams(bus, config.stream_layout, update=config.manage_streams)
                store = await TaskStore.open(bus)
                async with (
                    liveness_guard(bus, interval=config.liveness_interval, timeout=config.liveness_timeout) as guard,
                    anyio.create_task_group() as tg,
                ):
                    supervisor = Supervisor(config, agent_classes, bus, store, liveness=guard)
                    if handle_signals:
                        tg.start_soon(_cancel_on_signal, tg.cancel_scope)
                    tg.start_soon(_cancel_when_lost, bus, tg.cancel_scope)
                    await tg.start(supervisor.run)
                    running = RunningSystem(
                        config, servers[0], bus, Client(bus, store, identity="dspyrt"), supervisor, telemetry,
                        server, tg.cancel_scope,
                    )  # fmt: skip
                    if on_ready is not None:
                        tg.start_soon(on_ready, running)
                if bus.lost_reason:
                    what = "this process gave the connection up" if bus.gave_up else "NATS closed the connection"
                    raise BusUnavailableError(
                        f"{what} for good ({bus.lost_reason}); this process stops so that its process manager "
                        "starts it again"
                    )
            finally:
                with anyio.CancelScope(shield=True):
                    await bus.close()
    finally:
        telemetry.flush()


@asynccontextmanager
async def serving(
    config: IntegrationConfig,
    agent_classes: list[type[Agent]],
    *,
    process_name: str = "dspyrt",
    ready_timeout: float = 30.0,
) -> AsyncIterator[RunningSystem]:
    """``serve`` for the block, in a program of one's own (tests, benchmarks, embedding): no signal handlers;
    the agents drain when the block ends."""
    ready = anyio.Event()
    systems: list[RunningSystem] = []

    async def on_ready(system: RunningSystem) -> None:
        systems.append(system)
        ready.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            partial(serve, config, agent_classes, on_ready=on_ready, handle_signals=False, process_name=process_name)
        )
        with anyio.fail_after(ready_timeout):
            await ready.wait()
        try:
            yield systems[0]
        finally:
            systems[0].stop()
