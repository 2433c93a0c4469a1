"""One trace per task or request, across every hop: client → agent A → agent B.

The spans are read back from the JSONL file the process's telemetry writes (what ``dspyrt traces`` reads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bus import Message, TaskStatus
from runtime.agent import Agent, TaskContext, endpoint, task
from runtime.client import Client
from runtime.config import IntegrationConfig
from runtime.telemetry import Telemetry
from runtime.traces import SpanNode, read_spans, task_trees
from tests.helpers import hosting

pytestmark = pytest.mark.timeout(60)


class Text(Message):
    text: str


class Back(Agent):
    name = "back"

    @endpoint("shout")
    async def shout(self, request: Text) -> Text:
        return Text(text=request.text.upper())


class Front(Agent):
    name = "front"

    @endpoint("hop")
    async def hop(self, request: Text) -> Text:
        return await self.client.request("back", "shout", request, Text)

    @task("relay")
    async def relay(self, job: Text, ctx: TaskContext) -> Text:
        return await self.client.request("back", "shout", job, Text)


def spans_written(telemetry: Telemetry) -> list[dict[str, Any]]:
    telemetry.flush()
    return read_spans(Path(telemetry.span_destination).parent.parent)


def trace_roots(spans: list[dict[str, Any]], trace_id: str) -> list[SpanNode]:
    nodes = {x["span_id"]: SpanNode(x) for x in spans if x["trace_id"] == trace_id}
    roots: list[SpanNode] = []
    for node in nodes.values():
        parent = nodes.get(node.span["parent_id"] or "")
        (parent.children if parent else roots).append(node)
    return roots


def chain(root: SpanNode) -> list[SpanNode]:
    """The spans from ``root`` down, for a trace that is a single line of hops."""
    nodes = [root]
    while nodes[-1].children:
        assert len(nodes[-1].children) == 1, [c.span["name"] for c in nodes[-1].children]
        nodes.append(nodes[-1].children[0])
    return nodes


def check_messaging(span: dict[str, Any], operation: str, subject: str) -> None:
    assert span["name"] == f"{operation} {subject}"
    attributes = span["attributes"]
    assert attributes["messaging.system"] == "nats"
    assert attributes["messaging.destination.name"] == subject
    assert attributes["messaging.operation.type"] == operation


async def test_one_trace_across_two_agents(config: IntegrationConfig, client: Client, telemetry: Telemetry) -> None:
    s = config.subjects
    async with hosting(Back(config)), hosting(Front(config)):
        assert await client.request("front", "hop", Text(text="hi"), Text) == Text(text="HI")
        record = await client.run("relay", Text(text="yo"), timeout=20)
    assert record.status is TaskStatus.SUCCEEDED
    assert record.result == {"text": "YO"}
    spans = spans_written(telemetry)

    # request path: client → front.hop → back.shout, one trace, each span the child of the previous hop
    [sent] = [x for x in spans if x["name"] == f"send {s.endpoint('front', 'hop')}"]
    [root] = trace_roots(spans, sent["trace_id"])
    hops = chain(root)
    assert [(h.span["name"], h.span["kind"]) for h in hops] == [
        (f"send {s.endpoint('front', 'hop')}", "CLIENT"),
        (f"process {s.endpoint('front', 'hop')}", "SERVER"),
        (f"send {s.endpoint('back', 'shout')}", "CLIENT"),
        (f"process {s.endpoint('back', 'shout')}", "SERVER"),
    ]
    for hop, subject in zip(hops, [s.endpoint("front", "hop")] * 2 + [s.endpoint("back", "shout")] * 2, strict=True):
        check_messaging(hop.span, hop.span["name"].split(" ")[0], subject)

    # task path: the record carries the trace id, and `dspyrt traces` finds the same single chain
    [root] = task_trees(spans, record.id)
    hops = chain(root)
    assert {h.span["trace_id"] for h in hops} == {record.trace_id}
    assert [(h.span["name"], h.span["kind"]) for h in hops] == [
        (f"send {s.task('relay')}", "PRODUCER"),
        (f"process {s.task('relay')}", "CONSUMER"),
        (f"send {s.endpoint('back', 'shout')}", "CLIENT"),
        (f"process {s.endpoint('back', 'shout')}", "SERVER"),
    ]
    check_messaging(hops[0].span, "send", s.task("relay"))
    check_messaging(hops[1].span, "process", s.task("relay"))
    assert hops[0].span["attributes"]["messaging.message.id"] == record.id
    assert hops[1].span["attributes"]["dspyrt.task.id"] == record.id
    assert hops[1].span["attributes"]["messaging.consumer.group.name"] == s.task_consumer("relay")

    # reply inboxes never name a span, anywhere in this process's telemetry
    assert spans
    assert [x["name"] for x in spans if "_INBOX" in x["name"]] == []
