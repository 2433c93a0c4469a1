"""Configuration: one ConfigurationError naming every bad setting; which agents a configuration runs."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import pytest
from pydantic import ValidationError

from dspyrt.agents.example import ExampleAgent
from dspyrt.bus import ConfigurationError
from dspyrt.runtime.agent import Agent
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


FULL, OPTIMIZATION, MONITORING = (
    IntegrationMode.FULL,
    IntegrationMode.OPTIMIZATION_ONLY,
    IntegrationMode.MONITORING_ONLY,
)
LOOP = {"loop-create", "loop-evaluate", "evaluator", "loop-deploy", "cycle", "serving"}
VALIDATORS = {"assertions", *(f"validator-{kind}" for kind in ("code", "logic", "performance", "security", "custom"))}
# The installed agents each mode runs, and those each enable flag turns off: written down, not read from the agents.
MODE_AGENTS = {
    FULL: {"system", "gateway", "example", "switcher", "optimizer", "roles", "dashboard", *LOOP, *VALIDATORS},
    OPTIMIZATION: {"switcher", "optimizer", *LOOP, *VALIDATORS},
    MONITORING: {"system", "gateway", "dashboard"},
}
TURNED_OFF_BY = {"enable_optimizers": {"optimizer"}, "enable_assertions": VALIDATORS, "enable_metrics": {"dashboard"}}
FLAG_SETTINGS = [dict(zip(TURNED_OFF_BY, values, strict=True)) for values in product((True, False), repeat=3)]


@pytest.mark.parametrize("flags", FLAG_SETTINGS, ids=lambda f: ",".join(k for k, on in f.items() if not on) or "all")
@pytest.mark.parametrize("mode", list(IntegrationMode))
def test_the_installed_agents_each_mode_and_flag_runs(mode: IntegrationMode, flags: dict[str, bool]) -> None:
    installed = available_agents()
    assert MODE_AGENTS[FULL] <= set(installed)
    turned_off = set().union(*(TURNED_OFF_BY[flag] for flag, on in flags.items() if not on))
    config = IntegrationConfig(mode=mode, **flags)  # type: ignore[arg-type]
    selected = [cls.name for cls in agents_for(config, installed)]
    assert [name for name in selected if name in MODE_AGENTS[FULL]] == sorted(MODE_AGENTS[mode] - turned_off)


class NightlyReport(Agent):
    """A third party's agent: it runs beside the optimizers and in monitoring processes, unless metrics are off."""

    name = "nightly-report"
    modes = frozenset({OPTIMIZATION, MONITORING})
    switch = "enable_metrics"


class Plain(Agent):
    """An agent that declares nothing: the full system runs it, and no flag turns it off."""

    name = "plain"


def runs(cls: type[Agent], **settings: object) -> bool:
    installed = available_agents() | {cls.name: cls}
    return cls in agents_for(IntegrationConfig(**settings), installed)  # type: ignore[arg-type]


def test_a_third_party_agent_runs_where_it_declares() -> None:
    assert runs(NightlyReport, mode="optimization_only") and runs(NightlyReport, mode="monitoring_only")
    assert not runs(NightlyReport)  # the full system: not among its modes
    assert not runs(NightlyReport, mode="monitoring_only", enable_metrics=False)
    assert runs(NightlyReport, mode="monitoring_only", enable_optimizers=False, enable_assertions=False)


def test_an_agent_that_declares_nothing_runs_in_the_full_system_only() -> None:
    assert runs(Plain) and runs(Plain, enable_optimizers=False, enable_assertions=False, enable_metrics=False)
    assert not runs(Plain, mode="optimization_only") and not runs(Plain, mode="monitoring_only")


@pytest.mark.parametrize("switch", ["enable_everything", "nats_urls"])
def test_a_switch_that_is_no_on_off_setting_is_a_configuration_error(switch: str) -> None:
    """Whatever the mode (the agent would not even run in this one): a typo is found at the first start."""
    odd = type("Odd", (Agent,), {"name": "odd", "modes": frozenset({MONITORING}), "switch": switch})
    with pytest.raises(ConfigurationError) as caught:
        agents_for(IntegrationConfig(), {"odd": odd, "plain": Plain})
    assert f"agent 'odd' ({__name__}.Odd) is switched by {switch!r}" in caught.value.message
    assert "enable_metrics" in caught.value.message


def test_named_agents_run_whatever_their_modes() -> None:
    installed = {"nightly-report": NightlyReport, "plain": Plain}
    config = IntegrationConfig(agents=["plain", "nightly-report"])
    assert agents_for(config, installed) == [Plain, NightlyReport]  # in the order named
    with pytest.raises(ConfigurationError) as caught:
        agents_for(IntegrationConfig(agents=["plain", "nosuch"]), installed)
    assert "nosuch" in caught.value.message
    assert "known: nightly-report, plain" in caught.value.message


def test_installed_agents_come_from_entry_points() -> None:
    available = available_agents()
    assert available["system"] is SystemAgent
    assert available["example"] is ExampleAgent
