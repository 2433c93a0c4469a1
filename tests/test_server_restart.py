"""The server goes away: killed mid-run and started again (same port, same store), agents recover by themselves;
a connection nats-py closes for good stops the process, with the reason, so its process manager restarts it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from dspyrt.bus import Bus, BusUnavailableError, EmbeddedServer, TaskRecord, TaskStatus
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.registry import available_agents
from dspyrt.runtime.supervisor import RunningSystem, serve
from tests.agent_proc import Sleeper, SleepJob
from tests.helpers import restartable_server, serving, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    with restartable_server(tmp_path) as server:
        yield server


async def test_tasks_complete_across_a_server_crash(
    nats_server: EmbeddedServer,
    config: IntegrationConfig,
    bus: Bus,
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("TEST_AGENT_MARKERS", str(markers))
    config = config.model_copy(update={"agent_concurrency": 2, "task_ack_wait": 1.0})
    ids = [(await client.submit("sleep", SleepJob(seconds=0.3), require_worker=False)).task_id for _ in range(10)]

    records: dict[str, TaskRecord] = {}

    async def wait_for(task_id: str) -> None:
        records[task_id] = await client.result(task_id, timeout=30)

    async with serving(config, [Sleeper]) as system:
        host = system.supervisor.hosts["sleeper"]
        async with anyio.create_task_group() as waiting:  # the client waits across the crash too
            for task_id in ids:
                waiting.start_soon(wait_for, task_id)
            await wait_until(lambda: len(list(markers.glob("done-*"))) >= 2)

            nats_server.kill()  # SIGKILL: no goodbye to anyone
            await wait_until(lambda: not bus.connected and not host.bus.connected)
            await anyio.sleep(0.5)
            nats_server.start()

        assert [records[task_id].status for task_id in ids] == [TaskStatus.SUCCEEDED] * 10
        assert all(r.result is not None and r.result["attempt"] == r.attempts for r in records.values())
        # the same agent instance did it all, over a reconnected connection: no restart
        assert system.supervisor.hosts["sleeper"] is host
        assert system.supervisor.restarts == {"sleeper": 0}
        assert host.bus.reconnects >= 1
        assert host.workers[0].stats.dead == 0

        # and it keeps taking new work
        record = await client.run("sleep", SleepJob(seconds=0), timeout=30)
        assert record.status is TaskStatus.SUCCEEDED
    assert await client.dead_letters() == []


async def test_a_connection_closed_for_good_stops_the_process_with_the_reason(config: IntegrationConfig) -> None:
    """On some server errors nats-py closes the connection and never reconnects (here: a message whose headers
    take it over max_payload, which nats-py does not count). Before, the process ran on with every agent deaf."""

    async def violate_max_payload(system: RunningSystem) -> None:
        body = b"x" * (system.bus.max_payload - 10)
        # Again until it takes: when the server's reset reaches nats-py before its -ERR (a loaded machine),
        # nats-py reconnects as after any lost connection, and only the -ERR closes it for good.
        while True:
            with contextlib.suppress(Exception):
                await system.bus.nc.publish(config.subjects.endpoint("example", "echo"), body, headers={"h": "y" * 200})
            await anyio.sleep(1.0)

    with anyio.fail_after(20):
        with pytest.raises(BusUnavailableError, match=r"closed the connection for good .*maximum payload violation"):
            await serve(config, [available_agents()["example"]], on_ready=violate_max_payload, handle_signals=False)
