"""The validator agents over a real nats-server: the ``assertions`` agent fans out to the per-type agents."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from typing import Any

import pytest

from dspyrt.agents.assertions import ENTRY_POINT_GROUP, AssertionStats, AssertionType, CustomValidatorRegistry
from dspyrt.agents.assertions import ValidationReport as Report
from dspyrt.agents.assertions.agent import (
    AssertionsAgent,
    CodeValidatorAgent,
    CustomValidatorAgent,
    LogicValidatorAgent,
    PerformanceValidatorAgent,
    SecurityValidatorAgent,
)
from dspyrt.bus import Empty, RemoteError
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import serving

pytestmark = pytest.mark.timeout(60)


class PluginValidatorAgent(CustomValidatorAgent):
    """The custom agent with a plugin registered the way an installed package would register it."""

    registry = CustomValidatorRegistry(
        [EntryPoint(name="no-apologies", value="tests.assertions.test_framework:NoApologies", group=ENTRY_POINT_GROUP)]
    )


AGENTS = [
    AssertionsAgent,
    CodeValidatorAgent,
    LogicValidatorAgent,
    PerformanceValidatorAgent,
    SecurityValidatorAgent,
    PluginValidatorAgent,
]

PLANTED: dict[str, Any] = {
    "cases": [
        {
            "inputs": {"task": "list files"},
            "outputs": {"answer": 5, "code": "import os\n\n\ndef files():\n    return os.listdir('.')\n"},
            "latency_ms": 120,
        },
        {
            "inputs": {"task": "run a command"},
            "outputs": {
                "answer": 500,
                "code": "import subprocess\n\n\ndef run(cmd):\n    subprocess.run(cmd, shell=True)\n    return x\n",
                "note": "Sorry, the key is AKIAIOSFODNN7EXAMPLE",
            },
            "latency_ms": 2500,
        },
    ],
    "output_schema": {"answer": {"type": "int", "max": 100}, "code": "str"},
    "code_fields": ["code"],
    "objectives": {"max_latency_p95_ms": 1000},
}


async def test_assertions_fans_out_to_every_type_and_aggregates(config: IntegrationConfig) -> None:
    async with serving(config, AGENTS) as system:
        report = await system.client.request("assertions", "validate", PLANTED, Report, timeout=30)
        stats = await system.client.request("assertions", "stats", Empty(), AssertionStats)
        logic_stats = await system.client.request("validator-logic", "stats", Empty(), AssertionStats)
    assert not report.passed and report.cases == 2
    failed = {(r.type.value, r.check, r.example) for r in report.failures()}
    assert failed == {
        ("code_quality", "lint", 1),
        ("logic", "range", 1),
        ("performance", "latency_p95", None),
        ("security", "dangerous_code", 1),
        ("security", "secret", 1),
        ("custom", "no_apologies", 1),
    }
    assert set(report.counts) == set(AssertionType)
    messages = {r.check: r.message for r in report.failures()}
    assert messages["secret"] == "AWS Access Key in output 'note'"
    assert messages["latency_p95"] == "p95 latency is 2500 ms, over the 1000 ms objective (2 of 2 cases)"
    assert any("B602 subprocess call with shell=True" in r.message for r in report.failures())
    assert stats.validations == 1 and stats.by_type["security"].failed == 1
    assert stats.by_check["logic.present"].pass_rate == 1.0
    assert logic_stats.validations == 1 and logic_stats.by_check["logic.range"].failed == 1


async def test_each_type_agent_validates_alone(config: IntegrationConfig) -> None:
    clean = {"cases": [{"outputs": {"answer": 7}}], "output_schema": {"answer": "int"}}
    async with serving(config, [LogicValidatorAgent]) as system:
        report = await system.client.request("validator-logic", "validate", clean, Report)
        skipped = await system.client.request("validator-logic", "validate", {**clean, "types": ["security"]}, Report)
    assert report.passed and {r.check for r in report.results} == {"present", "type"}
    assert skipped.passed and skipped.results == []


async def test_a_type_without_its_agent_fails_as_unavailable(config: IntegrationConfig) -> None:
    request = {**PLANTED, "types": ["logic", "security"]}
    async with serving(config, [AssertionsAgent, LogicValidatorAgent]) as system:
        report = await system.client.request("assertions", "validate", request, Report, timeout=30)
    assert not report.passed
    [unavailable] = [r for r in report.failures() if r.check == "unavailable"]
    assert unavailable.type is AssertionType.SECURITY
    assert unavailable.message.startswith("validator-security did not validate: unavailable: no agent is serving")
    assert {r.type for r in report.results} == {AssertionType.LOGIC, AssertionType.SECURITY}


@pytest.mark.parametrize("agent", ["assertions", "validator-logic"])
async def test_a_malformed_request_gets_field_errors_and_the_agents_keep_serving(
    config: IntegrationConfig, agent: str
) -> None:
    malformed = {
        "cases": [{"outputs": {"answer": 1}, "latency_ms": -5}],
        "output_schema": {"answer": {"type": "int", "pattern": "("}},
        "invariants": [{"left": "a", "op": "contains", "right": "b"}],
        "objectives": {"max_latency_p95_ms": "fast"},
        "run_this": "import os",
    }
    async with serving(config, [AssertionsAgent, LogicValidatorAgent]) as system:
        with pytest.raises(RemoteError) as caught:
            await system.client.request(agent, "validate", malformed, Report)
        with pytest.raises(RemoteError) as empty:
            await system.client.request(agent, "validate", {}, Report)
        valid = {"cases": [{"outputs": {"answer": 1}}], "output_schema": {"answer": "int"}, "types": ["logic"]}
        report = await system.client.request(agent, "validate", valid, Report)
    error = caught.value
    assert error.code == "invalid_message"
    assert error.message.startswith("ValidationRequest payload is invalid: 5 error(s)")
    assert {e.loc for e in error.field_errors} == {
        "cases.0.latency_ms",
        "output_schema.answer.pattern",
        "invariants.0.comparison.op",
        "objectives.max_latency_p95_ms",
        "run_this",
    }
    assert empty.value.code == "invalid_message" and [e.loc for e in empty.value.field_errors] == ["cases"]
    assert report.passed and {r.check for r in report.results} == {"present", "type"}


async def test_a_request_near_the_message_limit_reaches_every_validator(config: IntegrationConfig) -> None:
    """The fan-out's per-type request is no larger than the request (5,000 cases near 1 MB: writing out each case's
    defaults once made it larger than the limit, and the validators 'unavailable')."""
    cases = [{"inputs": {"text": f"case number {i} " + "x" * 115}, "outputs": {"topic": "sports"}, "latency_ms": 5}
             for i in range(5000)]  # fmt: skip
    request = {"cases": cases, "output_schema": {"topic": "str"}, "types": ["logic", "performance"]}
    async with serving(config, [AssertionsAgent, LogicValidatorAgent, PerformanceValidatorAgent]) as system:
        size = len(json.dumps(request).encode())
        assert system.bus.max_payload - 64 * 1024 < size < system.bus.max_payload - 4096
        report = await system.client.request("assertions", "validate", request, Report, timeout=60)
    assert [r for r in report.results if r.check == "unavailable"] == []
    assert report.passed and report.cases == 5000
