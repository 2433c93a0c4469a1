"""Helpers of the dashboard tests: a dashboard agent with quick loops, and reading what the event stream holds."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any, cast

import anyio

from dspyrt.agents.dashboard.agent import DashboardAgent
from dspyrt.agents.dashboard.models import DashboardSnapshot, SnapshotQuery
from dspyrt.bus import Bus, Event, publish_event
from dspyrt.bus.events import follow_events
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import hosting, wait_until

QUICK_LOOPS = {"dashboard_poll": 0.3, "dashboard_eval_interval": 0.1, "dashboard_queue_interval": 0.2}
"""Evaluate alerts every 0.1 s, read queues every 0.2 s."""


def quick_config(config: IntegrationConfig, *, web: bool = False, **settings: Any) -> IntegrationConfig:
    """``config`` with the dashboard's loops quick, a web view on a free port only when asked (``web``), and
    ``settings`` (``alerts_file``, ``dashboard_*``) validated as the environment's values would be."""
    values = {**config.model_dump(), **QUICK_LOOPS, "dashboard_port": 0 if web else None, **settings}
    return IntegrationConfig.model_validate(values)


@asynccontextmanager
async def dashboard(config: IntegrationConfig, **settings: Any) -> AsyncIterator[DashboardAgent]:
    """A dashboard agent configured by ``quick_config(config, **settings)`` on its own connection for the block,
    once it has replayed the stream."""
    async with configured_dashboard(quick_config(config, **settings)) as agent:
        yield agent


@asynccontextmanager
async def configured_dashboard(config: IntegrationConfig) -> AsyncIterator[DashboardAgent]:
    """A dashboard agent with ``config`` as it is, for the block, once it has replayed the stream."""
    agent = DashboardAgent(config)
    async with hosting(agent):
        await wait_until(lambda: not agent.replaying, what="dashboard replayed the event stream")
        yield agent


async def emit(bus: Bus, topic: str, data: dict[str, Any], source: str = "test") -> None:
    await publish_event(bus, topic, data, source=source)


async def snapshot(client: Client, **query: Any) -> DashboardSnapshot:
    return await client.request("dashboard", "snapshot", SnapshotQuery(**query), DashboardSnapshot)


async def stream_events(bus: Bus, pattern: str) -> list[Event]:
    """Every event on ``pattern`` the stream holds now (flushed first, so nothing published before is missed)."""
    await bus.flush()
    s = bus.subjects
    info = await bus.js.stream_info(s.event_stream, subjects_filter=s.event_pattern(pattern))
    expected = sum((info.state.subjects or {}).values())
    events: list[Event] = []
    if expected:
        with anyio.fail_after(5):
            followed = cast(AsyncGenerator[Event, None], follow_events(bus, pattern, replay=True))
            async with aclosing(followed) as stream:
                async for event in stream:
                    events.append(event)
                    if len(events) >= expected:
                        break
    return events


async def wait_for_events(bus: Bus, pattern: str, count: int, *, what: str = "") -> list[Event]:
    found: list[Event] = []

    async def enough() -> bool:
        found[:] = await stream_events(bus, pattern)
        return len(found) >= count

    await wait_until(enough, what=what or f"{count} event(s) on {pattern}")
    return found
