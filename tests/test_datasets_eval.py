"""Evaluations and cycles at real scale: devsets named by dataset reference (shards carry the reference, not the
rows), per-example results merged as they arrive and put in the results object store when many, cycle states
that stay small, the dataset versions a deployed version used, and the feedback dataset appended to a trainset.

The merge itself (any order, duplicates, the same figures as a list of results gives) is checked without a bus."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import dspy
import pytest

from dspyrt.agents.loop.core import FourPartOptimizationLoop
from dspyrt.agents.loop.cycle import DevsetRows, KvCycleStore
from dspyrt.agents.loop.evaluation import (
    INLINE_RESULTS,
    EvaluationAccumulator,
    merge_shards,
    read_example_results,
)
from dspyrt.agents.loop.models import (
    CreateResult,
    CycleRequest,
    CycleState,
    DeployRequest,
    DeployVerdict,
    EvaluateRequest,
    EvaluationResult,
    ProgramDetail,
    ProgramList,
    ProgramName,
    ShardRequest,
    ShardResult,
)
from dspyrt.agents.optimizers.models import OptimizationRequest, OptimizationResult
from dspyrt.agents.programs import build_program, dump_program_state, parse_program_spec
from dspyrt.agents.scoring import ExampleResult, summarize
from dspyrt.agents.switcher.models import SwitcherStats
from dspyrt.bus import Bus, Empty, PayloadTooLargeError, TaskEnvelope, TaskStatus
from dspyrt.bus.claims import ClaimStore, ObjectRef
from dspyrt.bus.streams import key_value
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.datasets import DatasetStore
from dspyrt.runtime.registry import available_agents
from dspyrt.runtime.stats import percentile
from tests.helpers import cycle, serving

ROOT = Path(__file__).resolve().parent.parent
CYCLE = json.loads((ROOT / "examples" / "cycle.json").read_text())["input"]
DEVSET: list[dict[str, Any]] = CYCLE["devset"]
TRAINSET: list[dict[str, Any]] = CYCLE["trainset"]
MODEL = "demo/fewshot"
LOOP = ["switcher", "optimizer", "loop-create", "loop-evaluate", "evaluator", "loop-deploy", "cycle"]
VALIDATORS = ["assertions", "validator-logic"]

pytestmark = pytest.mark.timeout(60)


def agents(*names: str) -> list[Any]:
    known = available_agents()
    return [known[n] for n in names]


def repeated(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` rows cycling through ``rows`` (a field beside input and label would count in exact_match)."""
    return [dict(rows[i % len(rows)]) for i in range(n)]


def trained_program() -> dict[str, Any]:
    """The cycle's program with few-shot demos from its trainset, so the demo model scores well above 0."""
    spec = parse_program_spec(CYCLE["program"])
    examples = [dspy.Example(**r).with_inputs("text") for r in TRAINSET]
    state = dump_program_state(dspy.LabeledFewShot(k=16).compile(build_program(spec), trainset=examples))
    return {"spec": CYCLE["program"], "state": state}


def evaluation(devset: Any, **changes: Any) -> dict[str, Any]:
    job = {"program": trained_program(), "devset": devset, "model": MODEL, "shard_size": 25}
    return {**job, **changes}


# ------------------------------------------------------------------------------- merging, no bus


def shard_results(total: int, size: int, seed: int = 7) -> list[ShardResult]:
    rng = random.Random(seed)
    shards = []
    for offset in range(0, total, size):
        results = []
        for i in range(offset, min(offset + size, total)):
            failed = rng.random() < 0.05
            errored = not failed and rng.random() < 0.05
            results.append(
                ExampleResult(
                    index=i,
                    score=0.0 if failed or errored else rng.choice([0.0, 0.5, 1.0]),
                    outputs={} if failed else {"topic": f"t{i}"},
                    latency_ms=round(rng.uniform(1, 100), 3),
                    error="boom" if failed or errored else None,
                    call_failed=failed,
                )
            )
        shards.append(
            ShardResult(offset=offset, results=results, lm_calls=len(results), input_tokens=3 * len(results),
                        cost=0.001 * len(results), models_used={MODEL: len(results)})
        )  # fmt: skip
    return shards


def test_shards_merged_in_any_order_with_repeats_give_the_figures_of_the_whole_list(tmp_path: Path) -> None:
    shards = shard_results(230, 25)
    every = [r for s in shards for r in s.results]
    arrival = list(enumerate(shards))
    random.Random(3).shuffle(arrival)
    with EvaluationAccumulator(230, tmp_path / "spool.jsonl") as accumulator:
        for number, shard in arrival + arrival[:3]:  # three shards reported twice: counted once
            accumulator.add(number, shard)
        result = accumulator.summary(model=MODEL, duration_s=1.0)
        results = accumulator.results()
    expected = summarize(every)
    assert (result.score, result.answered, result.errors, result.coverage) == (
        expected.score, expected.answered, expected.errors, expected.coverage
    )  # fmt: skip
    answered = [r.latency_ms for r in every if r.error is None]
    assert (result.latency_p50_ms, result.latency_p95_ms) == (percentile(answered, 50), percentile(answered, 95))
    assert result.shards == 10 and result.lm_calls == 230 and result.models_used == {MODEL: 230}
    assert result.cost == 0.23 and result.input_tokens == 690
    assert [r.index for r in results] == list(range(230)) and results == every
    # The in-memory merge is the same merge.
    merged = merge_shards(shards, total=230, model=MODEL, duration_s=1.0)
    assert merged.results == every and merged.score == result.score


def test_a_missing_example_makes_the_evaluation_incomplete(tmp_path: Path) -> None:
    shards = shard_results(50, 10)
    del shards[2].results[4]
    with pytest.raises(Exception, match=r"1 example\(s\) missing, e.g. \[24\]"):
        merge_shards(shards, total=50, model=MODEL, duration_s=0.0)


def test_a_shard_holds_rows_or_a_pinned_reference() -> None:
    common = {"program": {"spec": CYCLE["program"]}, "input_fields": ["text"], "metric": "exact_match",
              "model": MODEL, "offset": 0}  # fmt: skip
    ShardRequest.model_validate({**common, "examples": DEVSET[:2]})
    ShardRequest.model_validate({**common, "dataset": "dataset:dev@0123456789ab", "count": 5})
    for bad in (
        {},
        {"examples": DEVSET[:2], "dataset": "dataset:dev@0123456789ab", "count": 2},
        {"dataset": "dataset:dev", "count": 5},
        {"dataset": "dataset:dev@0123456789ab"},
        {"dataset": "not a reference", "count": 1},
    ):
        with pytest.raises(ValueError):
            ShardRequest.model_validate({**common, **bad})


# ------------------------------------------------------------------------------ evaluate by reference


async def test_an_evaluation_of_a_dataset_sends_references_to_its_shards(config: IntegrationConfig) -> None:
    rows = repeated(DEVSET, 10 * len(DEVSET))
    async with serving(config, agents("switcher", "loop-evaluate", "evaluator")) as system:
        manifest = await system.client.put_dataset("topics-dev", rows)
        envelopes: list[TaskEnvelope] = []

        async def seen(msg: Any) -> None:
            envelopes.append(TaskEnvelope.model_validate_json(msg.data))

        sub = await system.bus.nc.subscribe(system.bus.subjects.task("evaluate-shard"), cb=seen)
        record = await system.client.run("evaluate", evaluation("dataset:topics-dev"), timeout=45)
        await sub.unsubscribe()
    assert record.status is TaskStatus.SUCCEEDED, record.error
    result = EvaluationResult.model_validate(record.result)
    label = f"topics-dev@{manifest.version}"
    assert result.dataset == label and result.examples == 200 and result.shards == 8
    assert [r.index for r in result.results] == list(range(200)) and result.results_ref is None
    shards = sorted((ShardRequest.model_validate(e.input) for e in envelopes), key=lambda s: s.offset)
    assert [(s.dataset, s.examples, s.offset, s.count) for s in shards] == [
        (f"dataset:{label}", None, offset, 25) for offset in range(0, 200, 25)
    ]
    # The same rows inline score the same: the evaluator read exactly its shard's rows.
    async with serving(config, agents("switcher", "loop-evaluate", "evaluator")) as system:
        inline = await system.client.run("evaluate", evaluation(rows), timeout=45)
    assert inline.result["score"] == result.score > 0 and inline.result["dataset"] is None


async def test_a_large_evaluation_keeps_its_results_in_the_object_store(config: IntegrationConfig) -> None:
    total = INLINE_RESULTS + 50
    async with serving(config, agents("switcher", "loop-evaluate", "evaluator")) as system:
        record = await system.client.run(
            "evaluate", evaluation(repeated(DEVSET, total), shard_size=150, num_threads=16), timeout=50
        )
        stored = await system.client.store.get(record.id)
        claims = await ClaimStore.open(system.bus)
        assert record.status is TaskStatus.SUCCEEDED, record.error
        result = EvaluationResult.model_validate(record.result)
        assert result.results == [] and result.results_ref is not None and result.examples == total
        every = await read_example_results(claims, result.results_ref)
        first = await read_example_results(claims, result.results_ref, 0, 100)
        last = await read_example_results(claims, result.results_ref, 1000)
        middle = await read_example_results(claims, result.results_ref, 520, 7)
        bad = ObjectRef(**{**result.results_ref.model_dump(), "sha256": "0" * 64})
        with pytest.raises(Exception, match="does not match its sha256"):
            await read_example_results(claims, bad)
    assert [r.index for r in every] == list(range(total))
    assert first == every[:100] and last == every[1000:] and middle == every[520:527]
    assert summarize(every).score == result.score > 0 and summarize(every).answered == result.answered
    # The task record holds the summary itself, not a claim check of a huge result.
    assert stored is not None and stored.result_ref is None and len(json.dumps(stored.result)) < 4096


async def test_a_dataset_without_the_programs_input_fails_before_any_lm_call(config: IntegrationConfig) -> None:
    rows = [{"question": r["text"], "topic": r["topic"]} for r in DEVSET]
    async with serving(config, agents("switcher", "loop-evaluate", "evaluator")) as system:
        manifest = await system.client.put_dataset("questions", rows)
        record = await system.client.run("evaluate", evaluation("dataset:questions"), timeout=40)
        missing_label = await system.client.run(
            "evaluate", evaluation("dataset:questions", input_fields=["question"], metric_field="label"), timeout=40
        )
        shard = await system.client.store.get(f"{record.id}-s0")
        stats = await system.client.request("switcher", "stats", Empty(), SwitcherStats)
    assert record.status is TaskStatus.FAILED and record.attempts == 1, record
    assert record.error is not None and record.error.code == "invalid_message", record.error
    assert f"questions@{manifest.version}" in record.error.message and "'text'" in record.error.message
    assert missing_label.error is not None and "metric field 'label'" in missing_label.error.message
    assert shard is None and stats.instance_calls == 0


# ------------------------------------------------------------------------------------------- cycles


@pytest.mark.timeout(150)
async def test_a_cycle_on_a_large_dataset_deploys_and_its_state_stays_small(config: IntegrationConfig) -> None:
    rows = repeated(DEVSET, 1200)
    objectives = {"required_validators": [{"type": "logic", "severity": "error"}]}
    validation = {**CYCLE["validation"], "types": ["logic"]}
    async with serving(config, agents(*LOOP, *VALIDATORS)) as system:
        manifest = await system.client.put_dataset("topics-dev", rows)
        label = f"topics-dev@{manifest.version}"
        record = await system.client.run(
            "cycle",
            cycle(devset="dataset:topics-dev", shard_size=200, objectives=objectives, validation=validation),
            timeout=140,
        )
        assert record.status is TaskStatus.SUCCEEDED, record.error
        cycles = await key_value(system.bus, system.bus.subjects.bucket("cycles"))
        state = (await cycles.get(record.id)).value or b""
        listing = await system.client.request("loop-deploy", "list", Empty(), ProgramList)
        detail = await system.client.request(
            "loop-deploy", "show", ProgramName(program="topic-classifier"), ProgramDetail
        )
        claims = await ClaimStore.open(system.bus)
        result = record.result
        optimized = EvaluationResult.model_validate(result["optimized"])
        assert optimized.results_ref is not None
        first = await read_example_results(claims, optimized.results_ref, 0, 3)
    assert result["verdict"]["deployed"] is True, result["verdict"]
    assert result["datasets"] == {"devset": [label]}
    assert result["baseline"]["dataset"] == label and result["baseline"]["examples"] == 1200
    assert result["optimized"]["score"] > result["baseline"]["score"]
    assert [r.index for r in first] == [0, 1, 2]
    # The validators checked every answered example, their inputs read from the dataset.
    assert result["validation"]["passed"] is True and result["validation"]["cases"] == optimized.answered
    assert (optimized.answered or 0) > 1000
    assert len(state) < 64 * 1024, len(state)
    assert CycleState.model_validate_json(state).pinned == {"devset": f"dataset:{label}"}
    assert listing.programs[0].active is not None and listing.programs[0].active.datasets == [label]
    assert [v.datasets for v in detail.versions] == [[label]]


@pytest.mark.timeout(120)
async def test_include_feedback_appends_the_feedback_dataset_to_the_trainset(loop_config: IntegrationConfig) -> None:
    feedback = [{"text": f"the referee stopped match number {i}", "topic": "sports"} for i in range(10)]
    async with serving(loop_config, agents(*LOOP)) as system:
        fed = await system.client.put_dataset("topic-classifier-feedback", feedback)
        train = await system.client.put_dataset("topics-train", TRAINSET)
        fed_label, train_label = f"topic-classifier-feedback@{fed.version}", f"topics-train@{train.version}"
        inline = await system.client.run("cycle", cycle(include_feedback=True), timeout=50)
        referenced = await system.client.run(
            "cycle", cycle(trainset="dataset:topics-train", include_feedback=True), timeout=50
        )
        without = await system.client.run("cycle", cycle(program_name="no-feedback", include_feedback=True), timeout=50)
        plain = await system.client.run("cycle", cycle(program_name="plain"), timeout=50)
    for record in (inline, referenced, without, plain):
        assert record.status is TaskStatus.SUCCEEDED, record.error

    def examples(record: Any) -> int:
        return int(record.result["optimization"]["trainset_size"] + record.result["optimization"]["valset_size"])

    assert examples(inline) == examples(referenced) == len(TRAINSET) + len(feedback)
    assert inline.result["datasets"] == {"feedback": [fed_label]}
    assert referenced.result["datasets"] == {"trainset": [train_label], "feedback": [fed_label]}
    assert referenced.result["optimization"]["datasets"] == {"trainset": [train_label, fed_label]}
    assert without.result["datasets"] == {"feedback": []} and examples(without) == len(TRAINSET)
    assert plain.result["datasets"] == {} and examples(plain) == len(TRAINSET)


# ------------------------------------------------------------------------------- the cycle's state


class RecordingPhases:
    """Phases that answer at once and remember what they were asked."""

    def __init__(self) -> None:
        self.evaluations: list[EvaluateRequest] = []
        self.optimizations: list[OptimizationRequest] = []

    async def create(self, req: CycleRequest) -> CreateResult:
        return CreateResult(program_hash="h", module="Predict", predictors=[], input_fields=["text"],
                            output_fields=["topic"])  # fmt: skip

    async def evaluate(self, req: EvaluateRequest, key: str) -> EvaluationResult:
        self.evaluations.append(req)
        return EvaluationResult(score=50.0, examples=1, shards=1, model=MODEL)

    async def optimize(self, req: OptimizationRequest, key: str) -> OptimizationResult:
        self.optimizations.append(req)
        return OptimizationResult(program_name="p", program_hash="h", optimizer="o", model=MODEL, metric="m")

    async def validate(self, req: CycleRequest, evaluation: EvaluationResult) -> dict[str, Any] | None:
        return None

    async def deploy(self, req: DeployRequest) -> DeployVerdict:
        raise AssertionError("nothing to deploy without an artifact")


class MemoryStore:
    def __init__(self) -> None:
        self.states: dict[str, CycleState] = {}

    async def load(self, cycle_id: str) -> CycleState:
        return self.states.get(cycle_id, CycleState(cycle_id=cycle_id)).model_copy(deep=True)

    async def save(self, state: CycleState) -> None:
        self.states[state.cycle_id] = state.model_copy(deep=True)


async def test_a_resumed_cycle_runs_on_the_versions_pinned_at_its_start(bus: Bus) -> None:
    datasets = await DatasetStore.open(bus)
    first = await datasets.put("dev", DEVSET)
    phases, store = RecordingPhases(), MemoryStore()
    loop = FourPartOptimizationLoop(phases, store, datasets)
    req = CycleRequest.model_validate(cycle(devset="dataset:dev", include_feedback=True))
    await loop.arun_cycle(req, "c1")
    assert phases.evaluations[0].devset == f"dataset:dev@{first.version}"
    assert store.states["c1"].feedback == []
    # New data arrives; the cycle's coordinator dies before its baseline and the cycle resumes.
    await datasets.put("dev", DEVSET[:5])
    await datasets.put("topic-classifier-feedback", DEVSET[:3])
    store.states["c1"].phases = {k: v for k, v in store.states["c1"].phases.items() if k == "create"}
    result = await loop.arun_cycle(req, "c1")
    assert phases.evaluations[-1].devset == f"dataset:dev@{first.version}"
    assert phases.optimizations[-1].trainset == TRAINSET  # the feedback that did not exist at the start
    assert result.datasets == {"devset": [f"dev@{first.version}"], "feedback": []}


async def test_the_validate_phase_reads_rows_by_index_across_versions_and_chunks(bus: Bus) -> None:
    datasets = await DatasetStore.open(bus)
    first = [{"text": f"first {i}", "topic": "a"} for i in range(7)]
    second = [{"text": f"second {i}", "topic": "b"} for i in range(5)]
    a, b = await datasets.put("first", first), await datasets.put("second", second)
    rows = DevsetRows([str(a.ref), str(b.ref)], datasets)
    rows.CHUNK = 3
    assert [await rows.row(i) for i in (0, 2, 3, 6, 7, 11, 1, 8)] == [
        first[0], first[2], first[3], first[6], second[0], second[4], first[1], second[1]
    ]  # fmt: skip
    assert await DevsetRows(DEVSET, datasets).row(4) == DEVSET[4]
    with pytest.raises(IndexError):
        await rows.row(12)


async def test_a_cycle_state_too_large_to_save_is_a_named_permanent_error(bus: Bus) -> None:
    kv = await key_value(bus, bus.subjects.bucket("cycles"))
    state = CycleState(cycle_id="big-cycle", phases={"create": {"blob": "x" * 5000}})
    with pytest.raises(PayloadTooLargeError) as raised:
        await KvCycleStore(kv, 4096).save(state)
    assert raised.value.code == "payload_too_large"
    assert "the state of cycle big-cycle is" in raised.value.message and "4096" in raised.value.message
    # Over the server's own limit too (the store was told a limit above it).
    huge = CycleState(cycle_id="huge-cycle", phases={"create": {"blob": "x" * (bus.max_payload + 10)}})
    with pytest.raises(PayloadTooLargeError, match="the state of cycle huge-cycle"):
        await KvCycleStore(kv, 10 * bus.max_payload).save(huge)
