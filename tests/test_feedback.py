"""Production feedback over a real nats-server: recording sampled predictions, listing them, corrections turned
into versions of the program's feedback dataset (also two batches at once), the dashboard's feedback figures, and
the loop closed: predictions v1 gets wrong, corrected through ``dspyrt feedback``, are answered right by v2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import dspy
import pytest
from typer.testing import CliRunner

from dspyrt.agents.artifacts import ArtifactStore
from dspyrt.agents.dashboard.core import MetricsDashboard
from dspyrt.agents.dashboard.models import DashboardSnapshot, MetricType
from dspyrt.agents.deployments import DeployedVersion, DeployRegistry
from dspyrt.agents.loop.feedback import (
    FeedbackStore,
    check_corrections,
    feedback_dataset,
    merge_rows,
    new_prediction_id,
)
from dspyrt.agents.loop.feedback_models import (
    FeedbackItem,
    FeedbackReply,
    FeedbackRequest,
    PredictionList,
    PredictionsRequest,
    RecordedPrediction,
    RecordRequest,
    RecordSettings,
)
from dspyrt.agents.loop.models import PredictReply, PredictRequest
from dspyrt.agents.programs import build_program, dump_program_state, parse_program_spec
from dspyrt.bus import Bus, Event, MessageValidationError, RemoteError, TaskStatus
from dspyrt.runtime.cli import app
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.datasets import DatasetNotFoundError
from dspyrt.runtime.registry import available_agents
from tests.dashboard.common import dashboard, snapshot, wait_for_events
from tests.helpers import serving, wait_until

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = "topics"
SPEC = {"signature": "text -> topic", "instructions": "Classify the text into one topic."}
BASE = [
    {"text": "simmer the tomato sauce with garlic for twenty minutes", "topic": "cooking"},
    {"text": "quarterly revenue beat analyst expectations", "topic": "finance"},
    {"text": "the boxer won the title fight by knockout", "topic": "sports"},
    {"text": "the forecast warns of thunderstorms this evening", "topic": "weather"},
    {"text": "the chip maker announced a smaller transistor", "topic": "technology"},
    {"text": "strong winds knocked down trees during the storm", "topic": "weather"},
]
# A topic the base data never names: v1 cannot answer it, whatever demo it picks.
GARDEN = [
    "prune the roses in early spring",
    "water the tomato seedlings every morning",
    "spread mulch around the young apple trees",
    "sow the carrot seeds in shallow rows",
    "repot the fern into a larger clay pot",
    "pull the weeds before they flower",
    "plant the tulip bulbs in the autumn",
    "compost the fallen leaves for next year",
    "dig a new bed for the strawberries",
    "cut the lawn short before the frost",
]
LOOP = ["switcher", "optimizer", "loop-create", "loop-evaluate", "evaluator", "loop-deploy", "cycle", "serving"]


def agents(*names: str) -> list[Any]:
    known = available_agents()
    return [known[n] for n in names]


async def deploy_directly(bus: Bus, rows: list[dict[str, Any]], version: int = 1) -> None:
    """A version of PROGRAM with ``rows`` as its demos, deployed without a cycle (the tests of recording)."""
    spec = parse_program_spec(SPEC)
    examples = [dspy.Example(**r).with_inputs("text") for r in rows]
    trained = dspy.LabeledFewShot(k=len(rows)).compile(build_program(spec), trainset=examples)
    ref = await (await ArtifactStore.open(bus)).put(
        f"{PROGRAM}/{version}.json", {"spec": SPEC, "state": dump_program_state(trained)}
    )
    await (await DeployRegistry.open(bus)).deploy(
        DeployedVersion(program=PROGRAM, version=version, artifact_store=ref.store, artifact_name=ref.name,
                        artifact_sha256=ref.sha256)
    )  # fmt: skip


async def predict(client: Client, text: str) -> PredictReply:
    return await client.request("serving", "predict", PredictRequest(program=PROGRAM, inputs={"text": text}),
                                PredictReply, timeout=30)  # fmt: skip


async def set_rate(client: Client, rate: float) -> RecordSettings:
    return await client.request("serving", "record", RecordRequest(program=PROGRAM, sample_rate=rate), RecordSettings)


async def recorded(client: Client, limit: int = 100, program: str = PROGRAM) -> PredictionList:
    return await client.request("serving", "predictions", PredictionsRequest(program=program, limit=limit),
                                PredictionList)  # fmt: skip


def corrections(replies: list[PredictReply], topic: str = "gardening") -> FeedbackRequest:
    return FeedbackRequest(
        items=[FeedbackItem(prediction_id=r.prediction_id or "", outputs={"topic": topic}) for r in replies]
    )


@pytest.fixture
def cli_env(config: IntegrationConfig, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """``dspyrt`` commands in this process against the test's deployment."""
    monkeypatch.setenv("DSPYRT_NATS_URLS", config.nats_urls[0])
    monkeypatch.setenv("DSPYRT_SUBJECT_PREFIX", config.subject_prefix)
    monkeypatch.setenv("DSPYRT_LOG_LEVEL", "WARNING")
    return CliRunner()


async def dspyrt(runner: CliRunner, *args: str) -> tuple[int, str]:
    # The command runs its own event loop (anyio.run), so it runs in a worker thread here.
    result = await anyio.to_thread.run_sync(runner.invoke, app, list(args))
    return result.exit_code, result.output


# ---------------------------------------------------------------------------------- no bus needed


def test_prediction_ids_sort_by_time_and_differ() -> None:
    ids = [new_prediction_id(1_800_000_000.0 + i / 1000) for i in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert len({new_prediction_id(1_800_000_000.0) for _ in range(100)}) == 100


def test_a_later_correction_of_the_same_inputs_replaces_the_earlier() -> None:
    base = [{"text": "a", "topic": "x"}, {"text": "b", "topic": "y"}, {"text": "c", "topic": "z"}]
    new = [({"text": "b"}, {"text": "b", "topic": "Y"}), ({"text": "d"}, {"text": "d", "topic": "w"}),
           ({"text": "b"}, {"text": "b", "topic": "YY"}), ({"text": "e"}, {"text": "e", "topic": "v"})]  # fmt: skip
    merged = merge_rows(base, new)
    assert merged == [
        {"text": "a", "topic": "x"}, {"text": "b", "topic": "YY"}, {"text": "c", "topic": "z"},
        {"text": "d", "topic": "w"}, {"text": "e", "topic": "v"},
    ]  # fmt: skip
    assert merge_rows(merged, new) == merged  # the same batch again: the same rows, the same order
    # Same values under other input fields are other inputs.
    assert merge_rows([{"question": "b", "answer": "1"}], new[:1]) == [
        {"question": "b", "answer": "1"}, {"text": "b", "topic": "Y"}
    ]  # fmt: skip


def test_an_unknown_output_field_is_named_with_the_valid_ones() -> None:
    record = RecordedPrediction(prediction_id=new_prediction_id(), program="p", version=1, model="m",
                                inputs={"text": "t"}, outputs={"topic": "a", "confidence": "high"})  # fmt: skip
    check_corrections(record, {"topic": "b"})
    with pytest.raises(MessageValidationError) as caught:
        check_corrections(record, {"topik": "b", "topic": "c"})
    assert "'topik' is not an output field" in caught.value.message
    assert "confidence, topic" in caught.value.message
    assert [e.loc for e in caught.value.field_errors] == ["outputs.topik"]


def test_the_dashboard_keeps_feedback_counts_and_the_agreeing_share_per_version() -> None:
    d = MetricsDashboard()
    for at, version, count, agreed in ((1.0, 1, 4, 1), (5.0, 1, 6, 4), (9.0, 2, 5, 5)):
        data = {"program": "p", "version": version, "count": count, "agreed": agreed, "dataset": "p-feedback@x"}
        assert d.record_event(Event(topic="feedback.recorded", source="serving", time=at, data=data))
    assert not d.record_event(Event(topic="feedback.recorded", time=10.0, data={"program": "p", "version": 1,
                                                                                 "count": 2, "agreed": 3}))  # fmt: skip

    def values(metric: str, version: str) -> list[float]:
        [series] = d.series(metric, {"program": "p", "version": version})
        return [p.value for p in series.points]

    assert values(MetricType.FEEDBACK, "1") == [4.0, 10.0] and values(MetricType.FEEDBACK, "2") == [5.0]
    assert values(MetricType.FEEDBACK_SCORE, "1") == [25.0, 50.0] and values(MetricType.FEEDBACK_SCORE, "2") == [100.0]
    summary = d.program_summary("p")
    assert (summary.feedback, summary.feedback_score) == (15, 100.0)
    assert d.get_stats()["malformed"] == 1


def test_the_commands_module_stays_out_of_agents_and_dspy() -> None:
    code = (
        "import sys, dspyrt.runtime.cli_feedback; "
        "print([m for m in sys.modules if m.startswith(('dspyrt.agents', 'dspy.'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- on the bus


async def test_recording_is_off_by_default_all_at_rate_one_and_nothing_at_zero(
    config: IntegrationConfig, bus: Bus
) -> None:
    async with serving(config, agents("switcher", "serving")) as system:
        client = system.client
        await deploy_directly(bus, BASE)
        assert (await predict(client, "rain and storm tonight")).prediction_id is None
        listing = await recorded(client)
        assert (listing.sample_rate, listing.predictions) == (0.0, [])

        assert (await set_rate(client, 1.0)).sample_rate == 1.0
        replies = [await predict(client, text) for text in GARDEN[:4]]
        ids = [r.prediction_id for r in replies]
        assert all(ids) and len(set(ids)) == 4
        listing = await recorded(client)
        assert listing.sample_rate == 1.0
        assert [p.prediction_id for p in listing.predictions] == ids[::-1]  # newest first
        first = listing.predictions[-1]
        assert (first.program, first.version, first.model, first.inputs) == (
            PROGRAM, 1, replies[0].model, {"text": GARDEN[0]}
        )  # fmt: skip
        assert first.outputs == replies[0].outputs and first.corrections is None and not first.canary
        assert first.trace_id is not None and len(first.trace_id) == 32
        assert [p.prediction_id for p in (await recorded(client, limit=2)).predictions] == ids[:1:-1]
        assert (await recorded(client, program="other")).predictions == []

        await set_rate(client, 0.0)
        assert [(await predict(client, text)).prediction_id for text in GARDEN[4:8]] == [None] * 4
        assert len((await recorded(client)).predictions) == 4


async def test_feedback_naming_an_unknown_field_or_prediction_is_refused_and_stores_nothing(
    config: IntegrationConfig, bus: Bus, cli_env: CliRunner
) -> None:
    async with serving(config, agents("switcher", "serving")) as system:
        client = system.client
        await deploy_directly(bus, BASE)
        await set_rate(client, 1.0)
        reply = await predict(client, GARDEN[0])
        bad = FeedbackRequest(items=[FeedbackItem(prediction_id=reply.prediction_id or "", outputs={"label": "x"})])
        with pytest.raises(RemoteError) as caught:
            await client.request("serving", "feedback", bad, FeedbackReply)
        assert caught.value.code == "invalid_message"
        assert "'label' is not an output field" in caught.value.message and "are: topic" in caught.value.message

        code, output = await dspyrt(cli_env, "feedback", reply.prediction_id or "", '{"label": "x"}')
        assert code == 1 and "'label' is not an output field" in output and len(output.strip().splitlines()) == 1
        unknown = "0" * 24
        code, output = await dspyrt(cli_env, "feedback", unknown, '{"topic": "x"}')
        assert code == 1 and f"no recorded prediction {unknown}" in output
        code, output = await dspyrt(cli_env, "feedback", reply.prediction_id or "")
        assert code == 1 and "has no corrections" in output

        with pytest.raises(DatasetNotFoundError):
            await (await client.datasets()).resolve(f"dataset:{feedback_dataset(PROGRAM)}")
        assert (await recorded(client)).predictions[0].corrections is None


async def test_two_feedback_batches_at_once_both_land(config: IntegrationConfig, bus: Bus) -> None:
    """Two replicas' batches race for the head: the loser builds again on the winner's version (forced here: the
    second batch lands after the first one read the head, before it writes its version, which lacks the second's
    rows). Then two batches through the endpoint at once, on two serving replicas."""
    async with serving(config, agents("switcher", "serving", "serving")) as system:
        client = system.client
        await deploy_directly(bus, BASE)
        await set_rate(client, 1.0)
        replies = [await predict(client, text) for text in GARDEN]

        first, second = await FeedbackStore.open(bus), await FeedbackStore.open(bus)
        put = first.datasets.put
        raced: list[FeedbackReply] = []

        async def race_then_put(name: str, rows: Any, **options: Any) -> Any:
            if not raced:
                raced.append(await second.apply(corrections(replies[2:4], "b")))
            return await put(name, rows, **options)

        first.datasets.put = race_then_put  # type: ignore[method-assign]
        reply = await first.apply(corrections(replies[:2], "a"))
        assert first.conflicts == 1 and second.conflicts == 0
        datasets = await client.datasets()
        ref = await datasets.resolve(f"dataset:{feedback_dataset(PROGRAM)}")
        assert reply.dataset == ref.label and reply.rows == 4
        rows = await datasets.rows(ref)
        assert sorted((r["text"], r["topic"]) for r in rows) == sorted(
            [(GARDEN[0], "a"), (GARDEN[1], "a"), (GARDEN[2], "b"), (GARDEN[3], "b")]
        )

        async def send(batch: FeedbackRequest) -> None:
            await client.request("serving", "feedback", batch, FeedbackReply, timeout=30)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send, corrections(replies[4:7], "c"))
            tg.start_soon(send, corrections(replies[7:], "d"))
        rows = await datasets.rows(await datasets.resolve(f"dataset:{feedback_dataset(PROGRAM)}"))
        assert sorted((r["text"], r["topic"]) for r in rows) == sorted(
            [(GARDEN[i], "a") for i in (0, 1)] + [(GARDEN[i], "b") for i in (2, 3)]
            + [(GARDEN[i], "c") for i in (4, 5, 6)] + [(GARDEN[i], "d") for i in (7, 8, 9)]
        )  # fmt: skip
        marked = {p.prediction_id: p.corrections for p in (await recorded(client)).predictions}
        assert marked[replies[0].prediction_id or ""] == {"topic": "a"}
        assert marked[replies[9].prediction_id or ""] == {"topic": "d"}

        # A batch sent again (a client's retry) changes nothing and counts nothing twice.
        newest = (await datasets.resolve(f"dataset:{feedback_dataset(PROGRAM)}")).label
        again = await client.request("serving", "feedback", corrections(replies[7:], "d"), FeedbackReply)
        assert (again.dataset, again.rows, again.count, again.repeated, again.versions) == (newest, 10, 0, 3, [])


async def test_a_version_put_by_hand_is_what_the_next_batch_builds_on(config: IntegrationConfig, bus: Bus) -> None:
    async with serving(config, agents("switcher", "serving")) as system:
        client = system.client
        await deploy_directly(bus, BASE)
        await set_rate(client, 1.0)
        replies = [await predict(client, text) for text in GARDEN[:3]]
        first = await client.request("serving", "feedback", corrections(replies[:2]), FeedbackReply)
        datasets = await client.datasets()
        rows = await datasets.rows(f"dataset:{first.dataset}")
        await client.put_dataset(feedback_dataset(PROGRAM), rows[1:], source="curated.jsonl")  # one dropped
        second = await client.request("serving", "feedback", corrections(replies[2:]), FeedbackReply)
        assert [r["text"] for r in await datasets.rows(f"dataset:{second.dataset}")] == [GARDEN[1], GARDEN[2]]


async def test_corrections_of_what_v1_got_wrong_teach_v2(
    config: IntegrationConfig, bus: Bus, cli_env: CliRunner
) -> None:
    """The loop: v1 (a cycle on a small base dataset) answers ten inputs wrongly; they are recorded, corrected
    with ``dspyrt feedback`` in one batch, and a cycle on base + feedback deploys v2, which answers them right."""
    loop_config = config.model_copy(update={"auto_validate": False})
    request = {
        "program_name": PROGRAM, "program": SPEC, "trainset": "dataset:base", "devset": "dataset:base",
        # With a valset no training row is held out; base (6) + feedback (10) rows, k=16: every one is a demo.
        "valset": "dataset:base", "optimizer": "labeled_fewshot", "params": {"k": 16},
        "include_feedback": True,
    }  # fmt: skip
    async with serving(loop_config, agents(*LOOP)) as system, dashboard(loop_config):
        client = system.client
        await client.put_dataset("base", BASE)
        first = await client.run("cycle", request, timeout=60)
        assert first.status is TaskStatus.SUCCEEDED, first.error
        assert first.result["verdict"]["deployed"] is True and first.result["verdict"]["version"] == 1

        code, output = await dspyrt(cli_env, "predictions", PROGRAM, "--record", "1")
        assert code == 0 and "recording 100%" in output, output
        replies = [await predict(client, text) for text in GARDEN]
        assert {r.version for r in replies} == {1}
        assert all(r.prediction_id and r.outputs["topic"] != "gardening" for r in replies)

        code, output = await dspyrt(cli_env, "predictions", PROGRAM, "--json", "--limit", "10")
        assert code == 0, output
        listed = json.loads(output)["predictions"]
        assert [p["prediction_id"] for p in listed] == [r.prediction_id for r in replies][::-1]

        pairs = [arg for r in replies for arg in (r.prediction_id or "", '{"topic": "gardening"}')]
        code, output = await dspyrt(cli_env, "feedback", *pairs)
        assert code == 0, output
        label = output.strip().splitlines()[0]
        assert label.startswith(f"{feedback_dataset(PROGRAM)}@"), output
        feedback_rows = await (await client.datasets()).rows(f"dataset:{label}")
        assert sorted(r["text"] for r in feedback_rows) == sorted(GARDEN)
        assert {r["topic"] for r in feedback_rows} == {"gardening"}

        second = await client.run("cycle", request, timeout=60)
        assert second.status is TaskStatus.SUCCEEDED, second.error
        assert second.result["verdict"]["deployed"] is True and second.result["verdict"]["version"] == 2
        answers = [await predict(client, text) for text in GARDEN]
        assert [(a.version, a.outputs["topic"]) for a in answers] == [(2, "gardening")] * 10

        # One feedback.recorded event for v1's ten corrections, none of which agreed; the dashboard shows it.
        [event] = await wait_for_events(bus, "feedback.recorded", 1)
        assert {k: event.data[k] for k in ("program", "version", "count", "agreed")} == {
            "program": PROGRAM, "version": 1, "count": 10, "agreed": 0
        }  # fmt: skip
        views: list[DashboardSnapshot] = []

        async def shown() -> bool:
            views[:] = [await snapshot(client, program=PROGRAM)]
            return any(s.metric == "feedback_score" for s in views[0].series)

        await wait_until(shown, what="the dashboard recorded the feedback")
        by_metric = {s.metric: s.last for s in views[0].series if s.labels.get("version") == "1"}
        assert (by_metric.get("feedback"), by_metric.get("feedback_score")) == (10.0, 0.0)
        [summary] = views[0].programs
        assert (summary.feedback, summary.feedback_score) == (10, 0.0)
