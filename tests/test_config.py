"""Configuration: one ConfigurationError naming every bad setting; which agents a configuration runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dspyrt.agents.example import ExampleAgent
from dspyrt.bus import ConfigurationError
from dspyrt.runtime.agent import Agent, AgentGroup
from dspyrt.runtime.config import IntegrationConfig, IntegrationMode, load_config
from dspyrt.runtime.registry import agents_for, available_agents
from dspyrt.runtime.system import SystemAgent

pytestmark = pytest.mark.timeout(30)


def test_defaults_without_settings() -> None:
    config = load_config()
    assert config.mode is IntegrationMode.FULL
    assert config.embedded
    assert config.subjects.prefix == "dspy"


def test_environment_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPYRT_MODE", "optimization_only")
    monkeypatch.setenv("DSPYRT_NATS_URLS", "nats://a:4222, tls://b:4222")
    monkeypatch.setenv("DSPYRT_AGENTS", "system,example")
    monkeypatch.setenv("DSPYRT_TASK_ACK_WAIT", "1.5")
    monkeypatch.setenv("DSPYRT_SUBJECT_PREFIX", "staging")
    config = load_config()
    assert config.mode is IntegrationMode.OPTIMIZATION_ONLY
    assert config.nats_urls == ["nats://a:4222", "tls://b:4222"]
    assert not config.embedded
    assert config.agents == ["system", "example"]
    assert config.task_ack_wait == 1.5
    assert config.subjects.task("optimize") == "staging.task.optimize"
    assert config.connection_options().servers == ["nats://a:4222", "tls://b:4222"]


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("DSPYRT_MODE", "bogus", "mode"),
        ("DSPYRT_NATS_URLS", "http://localhost:4222", "nats_urls"),
        ("DSPYRT_TASK_ACK_WAIT", "0", "task_ack_wait"),
        ("DSPYRT_SUBJECT_PREFIX", "a.b", "subject_prefix"),
        ("DSPYRT_NATS_PORT", "70000", "nats_port"),
    ],
)
def test_invalid_setting_names_itself(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        load_config()
    error = caught.value
    assert error.code == "invalid_config"
    assert f"{named}:" in error.message
    assert isinstance(error.__cause__, ValidationError)


def test_every_bad_setting_in_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPYRT_MODE", "bogus")
    monkeypatch.setenv("DSPYRT_NATS_URLS", "nats://good:4222,redis://bad:6379")
    with pytest.raises(ConfigurationError) as caught:
        load_config()
    message = caught.value.message
    assert "mode:" in message
    assert "nats_urls:" in message
    assert "redis://bad:6379" in message
    assert "nats://good" not in message


def test_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the fixture runs each test in its own empty directory: dspyrt.toml there is the default file
    Path("dspyrt.toml").write_text('mode = "monitoring_only"\nsubject_prefix = "fromfile"\n')
    assert load_config().mode is IntegrationMode.MONITORING_ONLY
    monkeypatch.setenv("DSPYRT_SUBJECT_PREFIX", "fromenv")  # the environment wins over the file
    assert load_config().subject_prefix == "fromenv"

    Path("dspyrt.toml").write_text('mode = "monitoring_only"\nunknown_setting = 1\n')
    with pytest.raises(ConfigurationError, match="unknown_setting"):
        load_config()

    Path("dspyrt.toml").write_text("mode = \n")
    with pytest.raises(ConfigurationError, match="invalid configuration file"):
        load_config()

    monkeypatch.setenv("DSPYRT_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError, match=r"missing\.toml"):
        load_config()


def _agent(name: str, group: AgentGroup) -> type[Agent]:
    return type(f"Agent_{name}", (Agent,), {"name": name, "group": group})


AVAILABLE = {
    cls.name: cls
    for cls in [
        _agent("system", "system"),
        _agent("switcher", "models"),
        _agent("optimizer", "optimizers"),
        _agent("validator", "validators"),
        _agent("loop", "loop"),
        _agent("dashboard", "monitoring"),
        _agent("roles", "roles"),
        _agent("example", "example"),
    ]
}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, ["dashboard", "example", "loop", "optimizer", "roles", "switcher", "system", "validator"]),
        ({"mode": "optimization_only"}, ["loop", "optimizer", "switcher", "validator"]),
        ({"mode": "monitoring_only"}, ["dashboard", "system"]),
        ({"mode": "optimization_only", "enable_optimizers": False}, ["loop", "switcher", "validator"]),
        (
            {"enable_assertions": False, "enable_metrics": False},
            ["example", "loop", "optimizer", "roles", "switcher", "system"],
        ),
        ({"mode": "monitoring_only", "enable_metrics": False}, ["system"]),
        ({"agents": ["validator", "system"]}, ["validator", "system"]),
    ],
)
def test_agents_for_mode_and_flags(settings: dict[str, object], expected: list[str]) -> None:
    config = IntegrationConfig(**settings)  # type: ignore[arg-type]
    assert [cls.name for cls in agents_for(config, AVAILABLE)] == expected


def test_unknown_agent_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        agents_for(IntegrationConfig(agents=["system", "nosuch"]), AVAILABLE)
    assert "nosuch" in caught.value.message
    assert "known: dashboard, example" in caught.value.message


def test_installed_agents_come_from_entry_points() -> None:
    available = available_agents()
    assert available["system"] is SystemAgent
    assert available["example"] is ExampleAgent
