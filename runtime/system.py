"""System status (the guide's SystemStatus / DSPySystemIntegration): every agent instance, found the standard way.

Instances are discovered with ``$SRV.STATS`` (every micro service answers); the figures are the runtime's own
per-endpoint counters and the instance's last health report, both carried in the stats ``data``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from dspyrt.bus import Bus, Empty
from dspyrt.bus.subjects import SERVICE_STATS
from dspyrt.runtime.agent import Agent, endpoint
from dspyrt.runtime.config import IntegrationConfig, IntegrationMode
from dspyrt.runtime.host import HEALTH_ENDPOINT


class InstanceStatus(BaseModel):
    id: str
    version: str
    started: str
    uptime_s: float = 0.0
    requests: int = 0
    errors: int = 0
    mean_latency_ms: float = 0.0
    healthy: bool = False
    checks: dict[str, Any] = Field(default_factory=dict)
    tasks: dict[str, Any] = Field(default_factory=dict)
    dropped_spans: int = 0


class AgentStatus(BaseModel):
    name: str
    group: str
    instances: list[InstanceStatus]

    @property
    def healthy(self) -> bool:
        return bool(self.instances) and all(i.healthy for i in self.instances)


class SystemStatus(BaseModel):
    """The whole system as seen from the bus."""

    mode: IntegrationMode
    enable_optimizers: bool
    enable_assertions: bool
    enable_metrics: bool
    auto_optimize: bool
    auto_validate: bool
    prefix: str
    agents: list[AgentStatus]
    healthy: bool


def _instance(stats: dict[str, Any]) -> InstanceStatus:
    requests = errors = 0
    latency_weighted = 0.0
    health: dict[str, Any] = {}
    for ep in stats.get("endpoints") or []:
        data = ep.get("data") or {}
        if ep.get("name") == HEALTH_ENDPOINT:
            health = data.get("health") or {}
            continue
        n = int(data.get("requests", ep.get("num_requests", 0)))
        requests += n
        errors += int(data.get("errors", ep.get("num_errors", 0)))
        latency_weighted += n * float(data.get("mean_latency_ms", 0.0))
    started = str(stats.get("started", ""))
    return InstanceStatus(
        id=stats.get("id", "?"),
        version=stats.get("version", "?"),
        started=started,
        uptime_s=_uptime(started) if started else float(health.get("uptime_s", 0.0)),
        requests=requests,
        errors=errors,
        mean_latency_ms=round(latency_weighted / requests, 3) if requests else 0.0,
        healthy=bool(health.get("healthy", False)),
        checks=health.get("checks", {}),
        tasks=health.get("tasks", {}),
        dropped_spans=int(health.get("dropped_spans", 0)),
    )


def _uptime(started: str) -> float:
    """Seconds since the micro service's ``started`` timestamp (RFC 3339, UTC)."""
    try:
        when = datetime.fromisoformat(started.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(max(0.0, (datetime.now(UTC) - when).total_seconds()), 1)


async def collect_status(bus: Bus, config: IntegrationConfig, *, window: float = 1.0) -> SystemStatus:
    """Ask every micro service for its stats; keep those of this deployment (subject prefix)."""
    by_agent: dict[str, AgentStatus] = {}
    for msg in await bus.gather(SERVICE_STATS, window=window):
        try:
            stats = json.loads(msg.data)
        except ValueError:
            continue
        meta = stats.get("metadata") or {}
        name = bus.subjects.agent_of_service(str(stats.get("name", "")))
        if name is None or meta.get("prefix") != bus.subjects.prefix:
            continue
        entry = by_agent.setdefault(name, AgentStatus(name=name, group=meta.get("group", "?"), instances=[]))
        entry.instances.append(_instance(stats))
    agents = sorted(by_agent.values(), key=lambda a: a.name)
    return SystemStatus(
        mode=config.mode,
        enable_optimizers=config.enable_optimizers,
        enable_assertions=config.enable_assertions,
        enable_metrics=config.enable_metrics,
        auto_optimize=config.auto_optimize,
        auto_validate=config.auto_validate,
        prefix=bus.subjects.prefix,
        agents=agents,
        healthy=bool(agents) and all(a.healthy for a in agents),
    )


class SystemAgent(Agent):
    """Aggregates every agent instance into one SystemStatus (``<prefix>.system.status``)."""

    name = "system"
    group = "system"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.MONITORING_ONLY})
    description = "system status and health of every agent instance"

    @endpoint("status")
    async def status(self, _: Empty) -> SystemStatus:
        return await collect_status(self.bus, self.config)
