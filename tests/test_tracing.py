"""One trace per task or request, across every hop: client → agent A → agent B.

The spans are read back from the JSONL file the process's telemetry writes (what ``dspyrt traces`` reads).
"""

from __future__ import annotations

import http.server
import os
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspyrt.bus import Bus, Message, TaskStatus, TaskStore
from dspyrt.runtime.agent import Agent, TaskContext, endpoint, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.telemetry import Telemetry
from dspyrt.runtime.traces import SpanNode, read_spans, task_trees
from tests.helpers import ROOT, hosting, serving

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


class OtlpReceiver:
    """A collector's OTLP/HTTP traces endpoint on 127.0.0.1, keeping what it is sent: (service, span) pairs."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        received = self.spans = []  # type: list[tuple[str, Any]]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope in resource_spans.scope_spans:
                        received.extend((attributes.get("service.name", ""), span) for span in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_a_task_submitted_with_the_cli_is_traced_from_its_submit(
    config: IntegrationConfig, telemetry: Telemetry, tmp_path: Path
) -> None:
    """With a collector configured, ``dspyrt submit`` sends its span there: the task's trace starts at the submit."""
    from dspyrt.agents.example import ExampleAgent

    s = config.subjects
    (tmp_path / "input.json").write_text('{"text": "a b a"}')
    with OtlpReceiver() as collector:
        env = {
            **os.environ,
            "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
            "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
            "DSPYRT_STATE_DIR": str(tmp_path / "cli"),
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        }
        async with serving(config, [ExampleAgent]):
            result = await anyio.run_process(
                [sys.executable, "-m", "dspyrt.runtime.cli", "submit", "wordcount", str(tmp_path / "input.json"),
                 "--id", "cli-traced", "--wait", "--timeout", "20"],
                env=env, check=False, cwd=ROOT,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr.decode()
            async with Bus(config.connection_options(name="test-reader"), config.subjects) as bus:
                record = await Client(bus, await TaskStore.open(bus)).task("cli-traced")
        sends = [(service, span) for service, span in collector.spans if span.name == f"send {s.task('wordcount')}"]
    [(service, send)] = sends
    assert service == "dspyrt-cli"
    assert send.trace_id.hex() == record.trace_id
    [process] = [x for x in spans_written(telemetry) if x["name"] == f"process {s.task('wordcount')}"
                 and x["trace_id"] == record.trace_id]  # fmt: skip
    assert process["parent_id"] == send.span_id.hex()
    assert not (tmp_path / "cli" / "traces").exists()  # spans went to the collector, not to files
