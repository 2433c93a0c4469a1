"""Typed events: every event type is a model with a topic, its fields typed and described (the AsyncAPI document
reads them); a type is published only on its own topics; readers check values strictly and keep unknown fields;
a task's progress is a ``TaskProgress`` with the handler's own figures beside it."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, Field, ValidationError

from dspyrt.agents.dashboard.handlers import READS
from dspyrt.agents.loop.models import CycleCompleted, FeedbackRecorded
from dspyrt.agents.switcher.models import LmCall
from dspyrt.bus import Bus, publish_event
from dspyrt.bus.events import EventData, event_type_of
from dspyrt.bus.subjects import check_dotted
from dspyrt.runtime.agent import Agent, TaskContext, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.events import TaskProgress
from dspyrt.runtime.registry import available_agents
from tests.dashboard.common import stream_events
from tests.helpers import hosting

pytestmark = pytest.mark.timeout(30)


class Status(EventData):
    topic: ClassVar[str] = "thing.*"

    state: str = Field(description="the thing's state")


class Failed(EventData):
    topic: ClassVar[str] = "thing.failed"

    reason: str = Field(description="why")


def declared_types() -> set[type[EventData]]:
    """Every event type an installed agent declares, the runtime's own, and those the dashboard reads."""
    return {t for cls in available_agents().values() for t in cls.publishes} | {TaskProgress, *READS}


def test_a_type_matches_its_topics_token_by_token() -> None:
    assert Status.matches("thing.done") and Failed.matches("thing.failed")
    assert not Status.matches("thing") and not Status.matches("thing.done.twice") and not Status.matches("other.done")
    assert not EventData.matches("thing.done")  # the base has no topic
    # The exact topic wins over a pattern, whatever the order they are given in.
    assert event_type_of("thing.failed", [Status, Failed]) is Failed
    assert event_type_of("thing.failed", [Failed, Status]) is Failed
    assert event_type_of("thing.done", [Failed, Status]) is Status
    assert event_type_of("other.done", [Failed, Status]) is None
    assert TaskProgress.matches("task.progress.optimize.t-1") and not TaskProgress.matches("task.progress.t-1")


def test_every_declared_event_type_has_a_topic_and_describes_its_fields() -> None:
    types = declared_types()
    assert {LmCall, CycleCompleted, FeedbackRecorded, TaskProgress} <= types
    for kind in types:
        check_dotted(kind.topic.replace("*", "x"), f"{kind.__name__}'s topic")
        assert kind.model_config.get("extra") == "allow" and kind.model_config.get("strict"), kind.__name__
        undescribed = [name for name, f in kind.model_fields.items() if not f.description]
        assert not undescribed, f"{kind.__name__}: no description for {undescribed}"
    for cls in available_agents().values():
        topics = [t.topic for t in cls.publishes]
        assert len(topics) == len(set(topics)), f"{cls.name} declares a topic twice: {topics}"


def test_values_are_checked_strictly_and_unknown_fields_kept() -> None:
    newer = LmCall.model_validate({"model": "m", "ok": True, "latency_ms": 12, "region": "eu-1"})
    assert newer.latency_ms == 12.0 and newer.model_extra == {"region": "eu-1"}
    assert newer.model_dump(mode="json")["region"] == "eu-1"  # a relay passes it on
    for wrong in (
        {"model": "m", "ok": "yes"},  # not a bool
        {"model": "m", "ok": True, "input_tokens": "12"},  # a number in a string
        {"model": "m", "ok": True, "input_tokens": True},  # a bool for a count
        {"model": "m", "ok": True, "latency_ms": float("nan")},
        {"ok": True},  # no model
    ):
        with pytest.raises(ValidationError):
            LmCall.model_validate(wrong)
    with pytest.raises(ValidationError, match="agreed"):
        FeedbackRecorded(program="p", version=1, count=2, agreed=3)


async def test_an_event_is_published_only_on_a_topic_its_type_declares(bus: Bus) -> None:
    call = LmCall(model="demo/x", ok=True, latency_ms=5.0, input_tokens=3, output_tokens=4, cost=0.0)
    with pytest.raises(ValueError, match=r"LmCall event is published on 'lm\.call', not on 'lm\.calls'"):
        await publish_event(bus, "lm.calls", call, source="test")
    with pytest.raises(ValueError, match="not on 'thing'"):
        await publish_event(bus, "thing", Status(state="x"), source="test")
    assert await stream_events(bus, ">") == []  # nothing went out
    await publish_event(bus, LmCall.topic, call, source="test")
    [event] = await stream_events(bus, ">")
    assert (event.topic, event.source) == ("lm.call", "test")
    assert LmCall.model_validate(event.data) == call


class Job(BaseModel):
    n: int


class Done(BaseModel):
    n: int


class Counter(Agent):
    name = "counter"

    @task("count")
    async def count(self, job: Job, ctx: TaskContext) -> Done:
        await ctx.progress("counting", step=1, total=job.n, unit="apples")
        return Done(n=job.n)


async def test_task_progress_is_a_typed_event_with_the_handlers_own_figures(
    config: IntegrationConfig, client: Client
) -> None:
    async with hosting(Counter(config)):
        record = await client.run("count", Job(n=3), timeout=20)
    [event] = await stream_events(client.bus, "task.progress.>")
    assert event.topic == config.subjects.task_progress_topic("count", record.id) and event.source == "counter"
    progress = TaskProgress.model_validate(event.data)
    assert (progress.task_id, progress.phase, progress.step, progress.total) == (record.id, "counting", 1, 3)
    assert progress.model_extra == {"unit": "apples"}


def test_a_progress_report_with_a_wrong_figure_is_refused_before_it_is_published() -> None:
    bad: dict[str, Any] = {"task_id": "t", "phase": "x", "step": "1"}
    with pytest.raises(ValidationError):
        TaskProgress.model_validate(bad)
    with pytest.raises(ValidationError):
        TaskProgress(task_id="t", phase="x", step=-1)
