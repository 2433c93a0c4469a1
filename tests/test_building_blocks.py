"""One home per building block: the percentile, the KV read-modify-CAS, the entry-point registry.

Each is attacked from outside: components that report a latency percentile must agree on the same measurements,
concurrent writers must not lose an update on a real nats-server, and a registry must refuse what its group does
not expect with a message naming the entry point.
"""

from __future__ import annotations

from collections import deque
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspyrt.agents.assertions import PerformanceValidator, ValidationRequest
from dspyrt.agents.dashboard import MetricsDashboard, MetricType
from dspyrt.agents.loop.evaluation import EvaluationAccumulator
from dspyrt.agents.loop.gate import check_objectives
from dspyrt.agents.loop.models import DeployRequest, EvaluationResult, ShardResult
from dspyrt.agents.scoring import ExampleResult
from dspyrt.agents.switcher.core import ModelStats
from dspyrt.bus import Bus, ConfigurationError, DspyrtError, NotFoundError
from dspyrt.bus.streams import key_value, kv_update
from dspyrt.runtime.plugins import EntryPointRegistry
from dspyrt.runtime.stats import percentile

pytestmark = pytest.mark.timeout(60)

# ------------------------------------------------------------------------------------------ percentile

LATENCIES = [10.0, 100.0]
OBJECTIVE_MS = 99.0


def test_percentile_is_an_observed_nearest_rank_value() -> None:
    assert percentile(LATENCIES, 95) == 100.0  # never 95.5, the interpolation between the two
    assert percentile(LATENCIES, 50) == 10.0
    hundred = [float(v) for v in range(100, 0, -1)]  # any order
    assert [percentile(hundred, q) for q in (0, 1, 50, 95, 99.9, 100)] == [1.0, 1.0, 50.0, 95.0, 100.0, 100.0]
    assert percentile(iter([7.0]), 95) == 7.0  # any iterable, read once


@pytest.mark.parametrize("q", [-1, 100.5, float("nan")])
def test_percentile_refuses_a_q_outside_0_to_100(q: float) -> None:
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile(LATENCIES, q)


def test_percentile_of_nothing_raises_rather_than_inventing_a_figure() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 95)
    with pytest.raises(ValueError, match="no values"):
        percentile(deque(), 50)


def evaluated(tmp_path: Path, results: list[ExampleResult]) -> EvaluationResult:
    with EvaluationAccumulator(len(results), tmp_path / "spool.jsonl") as accumulator:
        accumulator.add(0, ShardResult(offset=0, results=results, lm_calls=len(results)))
        return accumulator.summary(model="demo/m", duration_s=1.0)


def gate(latency_p95_ms: float | None) -> dict[str, bool]:
    request = DeployRequest.model_validate(
        {
            "program_name": "p",
            "program": {"signature": "text -> topic"},
            "artifact": {"store": "s", "name": "p/1.json", "version": "1", "sha256": "", "size": 0},
            "optimized_score": 90.0,
            "baseline_score": 10.0,
            "latency_p95_ms": latency_p95_ms,
            "objectives": {"max_latency_p95_ms": OBJECTIVE_MS},
        }
    )
    checks, _ = check_objectives(request)
    return checks


def test_the_gate_the_validator_the_dashboard_and_the_switcher_report_one_p95(tmp_path: Path) -> None:
    # The deploy gate judges the p95 the evaluation measured (the cycle passes it on unchanged).
    evaluation = evaluated(
        tmp_path, [ExampleResult(index=i, score=1.0, latency_ms=ms) for i, ms in enumerate(LATENCIES)]
    )
    assert evaluation.latency_p95_ms == 100.0
    assert gate(evaluation.latency_p95_ms)["max_latency_p95_ms"] is False

    cases = [{"outputs": {"topic": "x"}, "latency_ms": ms} for ms in LATENCIES]
    request = ValidationRequest.model_validate({"cases": cases, "objectives": {"max_latency_p95_ms": OBJECTIVE_MS}})
    [p95] = [r for r in PerformanceValidator().validate(request) if r.check == "latency_p95"]
    assert not p95.passed and "p95 latency is 100 ms" in p95.message

    dashboard = MetricsDashboard()
    for at, ms in enumerate(LATENCIES):
        dashboard.record(MetricType.LM_LATENCY, ms, {"model": "demo/m"}, 1000.0 + at)
    assert dashboard.model_summary("demo/m", now=1002.0).latency_p95_ms == 100.0

    assert ModelStats(recent_latency_ms=deque(LATENCIES)).p95_latency_ms == 100.0


def test_no_measured_latency_is_none_and_fails_a_latency_objective(tmp_path: Path) -> None:
    unanswered = [ExampleResult(index=i, score=0.0, error="timeout", call_failed=True) for i in range(2)]
    evaluation = evaluated(tmp_path, unanswered)
    assert (evaluation.latency_p50_ms, evaluation.latency_p95_ms) == (None, None)  # not 0 ms, which would pass
    assert gate(evaluation.latency_p95_ms)["max_latency_p95_ms"] is False
    assert MetricsDashboard().model_summary("demo/m", now=1.0).latency_p95_ms is None
    assert ModelStats().p95_latency_ms is None


# ------------------------------------------------------------------------------------------ kv_update


async def test_concurrent_updaters_lose_no_increment(bus: Bus, prefix: str) -> None:
    kv = await key_value(bus, f"{prefix}_counter")
    calls = 0

    async def increment(raw: bytes | None) -> bytes:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.01)  # every updater reads before any writes: the compare-and-swap must catch it
        return str(int(raw or b"0") + 1).encode()

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(kv_update, kv, "n", increment)
    entry = await kv.get("n")
    assert entry.value == b"20"
    assert calls > 20  # races did happen, and each lost one was applied again to the value stored


async def test_a_change_that_raises_leaves_the_value_untouched(bus: Bus, prefix: str) -> None:
    kv = await key_value(bus, f"{prefix}_refuse")
    revision = await kv.put("k", b"7")

    def refuse(raw: bytes | None) -> bytes:
        raise NotFoundError(f"refused at {raw!r}")

    with pytest.raises(NotFoundError, match="refused at b'7'"):
        await kv_update(kv, "k", refuse)
    entry = await kv.get("k")
    assert (entry.value, entry.revision) == (b"7", revision)

    kept = await kv_update(kv, "k", lambda raw: None)  # None: write nothing, and say what is stored
    assert (kept.value, kept.revision, kept.written) == (b"7", revision, False)


async def test_a_stale_known_value_costs_a_retry_not_an_update(bus: Bus, prefix: str) -> None:
    kv = await key_value(bus, f"{prefix}_stale")
    first = await kv.put("k", b"1")
    await kv.put("k", b"2")  # another writer, after the caller's read
    seen: list[bytes | None] = []

    def double(raw: bytes | None) -> bytes:
        seen.append(raw)
        return str(2 * int(raw or b"0")).encode()

    stored = await kv_update(kv, "k", double, known=(b"1", first))
    assert seen == [b"1", b"2"] and stored.value == b"4" and stored.written
    assert stored.revision == (await kv.get("k")).revision


async def test_a_key_that_never_stops_changing_is_a_conflict(bus: Bus, prefix: str) -> None:
    kv = await key_value(bus, f"{prefix}_busy")

    async def meanwhile(raw: bytes | None) -> bytes:
        await kv.put("k", b"someone else")  # another writer gets in between every read and write
        return b"mine"

    with pytest.raises(DspyrtError) as caught:
        await kv_update(kv, "k", meanwhile, attempts=3)
    assert caught.value.code == "conflict"
    assert (await kv.get("k")).value == b"someone else"


# --------------------------------------------------------------------------------- entry-point registry

GROUP = "dspyrt.tests"
accepted: list[Any] = []


class Plugin:
    """A plugin class for the registry tests."""


NOT_A_CLASS = "a string"


def plugin_class(loaded: Any) -> type[Plugin]:
    accepted.append(loaded)
    if not (isinstance(loaded, type) and issubclass(loaded, Plugin)):
        raise TypeError("is not a Plugin subclass")
    return loaded


def entry(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=GROUP)


def registry(*entries: EntryPoint, builtins: dict[str, type[Plugin]] | None = None) -> EntryPointRegistry[type[Plugin]]:
    return EntryPointRegistry(GROUP, "plugin", plugin_class, entries=entries, builtins=builtins)


def test_entry_points_are_listed_without_importing_and_loaded_once() -> None:
    plugins = registry(entry("good", f"{__name__}:Plugin"), entry("gone", "tests.no_such_module:Plugin"))
    assert plugins.names() == ["gone", "good"] and "gone" in plugins  # listing imports nothing
    accepted.clear()
    assert plugins.get("good") is Plugin and plugins.get("good") is Plugin
    assert accepted == [Plugin]  # loaded and accepted once
    assert plugins.label("good") == f"plugin 'good' ({__name__}:Plugin)"


def test_a_broken_or_wrong_entry_point_is_a_configuration_error_naming_it() -> None:
    plugins = registry(entry("gone", "tests.no_such_module:Plugin"), entry("text", f"{__name__}:NOT_A_CLASS"))
    with pytest.raises(ConfigurationError, match=r"plugin 'gone' \(tests.no_such_module:Plugin\) cannot be loaded"):
        plugins.get("gone")
    with pytest.raises(ConfigurationError) as wrong:
        plugins.get("text")
    assert wrong.value.message == f"plugin 'text' ({__name__}:NOT_A_CLASS) is not a Plugin subclass"
    with pytest.raises(NotFoundError, match="unknown plugin 'nope'; known: gone, text"):
        plugins.get("nope")
    with pytest.raises(NotFoundError, match="unknown plugin 'nope'; known: none installed"):
        registry().get("nope")


def test_names_are_unique_and_built_ins_are_not_replaced() -> None:
    with pytest.raises(ConfigurationError, match="'x' is registered twice: a:B and c:D"):
        registry(entry("x", "a:B"), entry("x", "c:D"))
    assert registry(entry("x", "a:B"), entry("x", "a:B")).names() == ["x"]  # one distribution seen twice
    with pytest.raises(ConfigurationError, match="may not replace the built-in 'base'"):
        registry(entry("base", "a:B"), builtins={"base": Plugin})
    plugins = registry(builtins={"base": Plugin})
    with pytest.raises(ConfigurationError, match="built-in"):
        plugins.register("base", Plugin)


def test_an_in_process_registration_wins_over_an_entry_point() -> None:
    class Mine(Plugin):
        pass

    plugins = registry(entry("p", "tests.no_such_module:Plugin"))
    plugins.register("p", Mine)
    plugins.register("extra", Mine)
    assert plugins.get("p") is Mine and plugins.names() == ["extra", "p"]
    assert plugins.label("p") == "plugin 'p' (registered in process)"
    assert plugins.load_all() == {"extra": Mine, "p": Mine}


def test_without_entries_the_installed_group_is_read() -> None:
    installed = EntryPointRegistry("dspyrt.metrics", "metric", lambda loaded: loaded)
    assert "role_refinement" in installed.names()
    assert callable(installed.get("role_refinement"))
