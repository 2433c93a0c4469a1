"""Which agents exist (entry-point group ``dspyrt.agents``) and which ones a configuration runs.

Each agent class says where it runs: the integration modes whose processes run it (``Agent.modes``) and the on/off
setting of IntegrationConfig that turns it off (``Agent.switch``, such as ``"enable_metrics"``). The runtime knows
no agent by name or group.
"""

from __future__ import annotations

from dspyrt.bus import ConfigurationError
from dspyrt.runtime.agent import Agent
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.plugins import EntryPointRegistry

ENTRY_POINT_GROUP = "dspyrt.agents"


def available_agents() -> dict[str, type[Agent]]:
    """Every installed agent class, by agent name (its ``name``, which is its entry point's name too)."""
    installed = EntryPointRegistry(ENTRY_POINT_GROUP, "agent", _agent_class)
    return {cls.name: cls for cls in installed.load_all().values()}


def _agent_class(loaded: object) -> type[Agent]:
    if not (isinstance(loaded, type) and issubclass(loaded, Agent)):
        raise TypeError("is not an Agent subclass")
    return loaded


def agents_for(config: IntegrationConfig, available: dict[str, type[Agent]] | None = None) -> list[type[Agent]]:
    """The agent classes this configuration runs: ``config.agents`` if given, else (by name) every agent whose
    ``modes`` hold the configured mode and whose ``switch``, if it has one, is on. A switch that is not an on/off
    setting is a ConfigurationError naming the agent, whatever the mode."""
    available = available if available is not None else available_agents()
    if config.agents:
        unknown = [n for n in config.agents if n not in available]
        if unknown:
            raise ConfigurationError(f"unknown agent(s) {', '.join(unknown)}; known: {', '.join(sorted(available))}")
        return [available[n] for n in config.agents]
    return [cls for _, cls in sorted(available.items()) if _switched_on(config, cls) and config.mode in cls.modes]


def _switched_on(config: IntegrationConfig, cls: type[Agent]) -> bool:
    if cls.switch is None:
        return True
    field = IntegrationConfig.model_fields.get(cls.switch)
    if field is None or field.annotation is not bool:
        switches = sorted(name for name, f in IntegrationConfig.model_fields.items() if f.annotation is bool)
        raise ConfigurationError(
            f"agent {cls.name!r} ({cls.__module__}.{cls.__qualname__}) is switched by {cls.switch!r}, which is not an "
            f"on/off setting; one of: {', '.join(switches)}"
        )
    return bool(getattr(config, cls.switch))
