"""Which agents exist (entry-point group ``dspyrt.agents``) and which ones a configuration runs."""

from __future__ import annotations

from importlib.metadata import entry_points

from dspyrt.bus import ConfigurationError
from dspyrt.runtime.agent import Agent
from dspyrt.runtime.config import IntegrationConfig, IntegrationMode

ENTRY_POINT_GROUP = "dspyrt.agents"

# Agent groups each mode runs (the guide's IntegrationMode); the enable flags then switch groups off.
MODE_GROUPS: dict[IntegrationMode, frozenset[str]] = {
    IntegrationMode.FULL: frozenset(
        {"system", "models", "optimizers", "validators", "loop", "monitoring", "roles", "example"}
    ),
    IntegrationMode.OPTIMIZATION_ONLY: frozenset({"models", "optimizers", "validators", "loop"}),
    IntegrationMode.MONITORING_ONLY: frozenset({"monitoring", "system"}),
}


def available_agents() -> dict[str, type[Agent]]:
    """Every installed agent class, by agent name."""
    found: dict[str, type[Agent]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise ConfigurationError(f"entry point {ep.name} = {ep.value} is not an Agent subclass")
        found[cls.name] = cls
    return found


def agents_for(config: IntegrationConfig, available: dict[str, type[Agent]] | None = None) -> list[type[Agent]]:
    """The agent classes this configuration runs: ``config.agents`` if given, else by mode and enable flags."""
    available = available if available is not None else available_agents()
    if config.agents:
        unknown = [n for n in config.agents if n not in available]
        if unknown:
            raise ConfigurationError(f"unknown agent(s) {', '.join(unknown)}; known: {', '.join(sorted(available))}")
        return [available[n] for n in config.agents]
    groups = set(MODE_GROUPS[config.mode])
    if not config.enable_optimizers:
        groups.discard("optimizers")
    if not config.enable_assertions:
        groups.discard("validators")
    if not config.enable_metrics:
        groups.discard("monitoring")
    return [cls for name, cls in sorted(available.items()) if cls.group in groups]
