"""The published protocol: docs/asyncapi.yaml is what ``dspyrt asyncapi`` generates from the installed agents now,
it is a valid AsyncAPI 3.0 document (the official JSON Schema when ``npm ci --prefix tests/node`` installed it, and
our own structural checks always), it describes every contract the agents declare, and real messages fit it."""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import pytest
import yaml
from pydantic import BaseModel
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from dspyrt.bus import DeadLetter, ErrorBody, Event, EventData, Message, TaskEnvelope, TaskRecord, TaskStatus
from dspyrt.bus.subjects import Subjects
from dspyrt.bus.tasks import new_task_id
from dspyrt.runtime.agent import Agent, TaskContext, endpoint, on_event, task
from dspyrt.runtime.asyncapi import DOCUMENT_PATH, REGENERATE, build_document, generate
from dspyrt.runtime.events import TaskProgress
from dspyrt.runtime.registry import available_agents
from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(60)

DOCUMENT = ROOT / DOCUMENT_PATH
OFFICIAL_SCHEMA = (
    ROOT / "tests" / "node" / "node_modules" / "@asyncapi" / "specs" / "schemas" / "3.0.0-without-$id.json"
)
EXAMPLE = json.loads((ROOT / "examples" / "optimize.json").read_text())["input"]
COMPONENT_KEY = re.compile(r"^[\w\d.\-_]+$")  # the AsyncAPI 3.0 schema's pattern for component names
DOCUMENT_URI = "urn:dspyrt:asyncapi"


@pytest.fixture(scope="module")
def generated() -> str:
    return generate()


@pytest.fixture(scope="module")
def document(generated: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(generated)
    return loaded


# ------------------------------------------------------------------------------------------- helpers


def _pointer(document: dict[str, Any], ref: str) -> Any:
    """What a local ``$ref`` points at; KeyError when it points nowhere."""
    if not ref.startswith("#/"):
        raise KeyError(ref)
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise KeyError(ref)
        node = node[part]
    return node


def _deref(document: dict[str, Any], ref: str) -> Any:
    """What ``ref`` points at, following references to references."""
    node = _pointer(document, ref)
    while isinstance(node, dict) and set(node) == {"$ref"}:
        node = _pointer(document, node["$ref"])
    return node


def _refs(node: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ``$ref`` in the document with where it is."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            found.append((path, node["$ref"]))
        for key, value in node.items():
            found.extend(_refs(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_refs(value, f"{path}/{i}"))
    return found


def structural_problems(document: dict[str, Any]) -> list[str]:
    """What makes ``document`` an invalid AsyncAPI 3.0 document, checked without the official schema: required
    keys, every ``$ref`` resolving, operations on channels that exist and on those channels' messages, channel
    parameters matching their addresses, component names, and every schema a valid draft-07 JSON Schema."""
    problems: list[str] = []
    if document.get("asyncapi") != "3.0.0":
        problems.append(f"asyncapi is {document.get('asyncapi')!r}, not '3.0.0'")
    info = document.get("info") or {}
    problems += [f"info.{key} is missing" for key in ("title", "version") if not info.get(key)]
    channels: dict[str, Any] = document.get("channels") or {}
    operations: dict[str, Any] = document.get("operations") or {}
    components: dict[str, Any] = document.get("components") or {}
    if not channels or not operations:
        problems.append("no channels or no operations")

    for where, ref in _refs(document):
        try:
            _pointer(document, ref)
        except KeyError:
            problems.append(f"{where}: $ref {ref} resolves to nothing")

    used: set[str] = set()
    for op_id, op in operations.items():
        if op.get("action") not in ("send", "receive"):
            problems.append(f"operation {op_id}: action {op.get('action')!r}")
        channel_ref = (op.get("channel") or {}).get("$ref", "")
        channel_id = channel_ref.removeprefix("#/channels/")
        if not channel_ref.startswith("#/channels/") or channel_id not in channels:
            problems.append(f"operation {op_id}: its channel {channel_ref or '(none)'} does not exist")
            continue
        used.add(channel_id)
        for message in op.get("messages", []):
            if not message.get("$ref", "").startswith(f"#/channels/{channel_id}/messages/"):
                problems.append(f"operation {op_id}: message {message} is not one of its channel's")
        reply = op.get("reply")
        if reply is not None:
            reply_id = (reply.get("channel") or {}).get("$ref", "").removeprefix("#/channels/")
            if reply_id not in channels:
                problems.append(f"operation {op_id}: its reply channel {reply_id!r} does not exist")
                continue
            used.add(reply_id)
            for message in reply.get("messages", []):
                if not message.get("$ref", "").startswith(f"#/channels/{reply_id}/messages/"):
                    problems.append(f"operation {op_id}: reply message {message} is not one of its reply channel's")

    for channel_id, channel in channels.items():
        if channel_id not in used:
            problems.append(f"channel {channel_id}: no operation uses it")
        address = channel.get("address")
        named = set(re.findall(r"\{(\w+)\}", address or ""))
        declared = set(channel.get("parameters") or {})
        if named != declared:
            problems.append(
                f"channel {channel_id}: address {address!r} names {sorted(named)}, declared {sorted(declared)}"
            )
        for message_id, message in (channel.get("messages") or {}).items():
            if not message.get("$ref", "").startswith("#/components/messages/"):
                problems.append(f"channel {channel_id}: message {message_id} is not a reference to a component")

    for section, entries in components.items():
        problems += [f"components.{section}.{key}: not a valid name" for key in entries if not COMPONENT_KEY.match(key)]
    schemas = [(f"components.schemas.{k}", v) for k, v in (components.get("schemas") or {}).items()]
    for message_id, message in (components.get("messages") or {}).items():
        schemas += [
            (f"components.messages.{message_id}.{part}", message[part])
            for part in ("payload", "headers")
            if part in message
        ]
    for where, schema in schemas:
        try:
            jsonschema.Draft7Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            problems.append(f"{where}: not a JSON Schema ({exc.message})")
    return problems


def payload_errors(document: dict[str, Any], message_id: str, data: Any) -> list[str]:
    """Why ``data`` does not fit the payload of ``components.messages.<message_id>`` ([] when it does)."""
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT7)
    )
    validator = jsonschema.Draft7Validator(
        {"$ref": f"{DOCUMENT_URI}#/components/messages/{message_id}/payload"}, registry=registry
    )
    return [f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}" for e in validator.iter_errors(data)]


def wire(model: BaseModel) -> Any:
    """A model as it travels: its JSON, parsed."""
    return json.loads(model.model_dump_json())


# ----------------------------------------------------------------------------------------- the document


def test_the_committed_document_is_the_generated_one(generated: str) -> None:
    committed = DOCUMENT.read_text(encoding="utf-8") if DOCUMENT.exists() else ""
    if committed != generated:
        diff = difflib.unified_diff(
            committed.splitlines(keepends=True), generated.splitlines(keepends=True), DOCUMENT_PATH, "generated"
        )
        shown = "".join(list(diff)[:60])
        pytest.fail(f"{DOCUMENT_PATH} is stale: regenerate it with `{REGENERATE}`\n{shown}", pytrace=False)


def test_the_output_is_the_same_in_another_process(generated: str) -> None:
    # Another hash seed: nothing may come out in set or dict-of-set order.
    code = "from dspyrt.runtime.asyncapi import generate; import sys; sys.stdout.write(generate())"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == generated


def test_the_document_is_structurally_valid_asyncapi_3(document: dict[str, Any]) -> None:
    assert structural_problems(document) == []


def test_the_structural_checks_find_what_is_broken(document: dict[str, Any]) -> None:
    broken = copy.deepcopy(document)
    del broken["components"]["schemas"]["TaskRecord"]
    broken["operations"]["optimizer.list"]["channel"] = {"$ref": "#/channels/endpoint.optimizer.gone"}
    broken["operations"]["optimizer.task.optimize"]["messages"] = [
        {"$ref": "#/channels/task.cycle/messages/task.cycle"}
    ]
    broken["channels"]["dlq"]["address"] = "{prefix}.dlq.{kind}.{extra}"
    broken["components"]["schemas"]["ErrorBody"]["type"] = "objekt"
    problems = "\n".join(structural_problems(broken))
    assert "$ref #/components/schemas/TaskRecord resolves to nothing" in problems
    assert "operation optimizer.list: its channel #/channels/endpoint.optimizer.gone does not exist" in problems
    assert "operation optimizer.task.optimize: message" in problems
    assert "channel dlq: address '{prefix}.dlq.{kind}.{extra}' names" in problems
    assert "components.schemas.ErrorBody: not a JSON Schema" in problems


def test_the_document_validates_against_the_official_asyncapi_3_schema(document: dict[str, Any]) -> None:
    if not OFFICIAL_SCHEMA.exists():
        pytest.skip("the official AsyncAPI schema is not installed: npm ci --prefix tests/node")
    validator = jsonschema.Draft7Validator(json.loads(OFFICIAL_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(document)]
    assert errors == []
    broken = copy.deepcopy(document)
    broken["operations"]["optimizer.list"]["action"] = "publish"  # AsyncAPI 2's word: refused by 3.0
    assert any(list(e.absolute_path)[:2] == ["operations", "optimizer.list"] for e in validator.iter_errors(broken))


# ---------------------------------------------------------------------------- what the agents declare


def test_every_installed_contract_is_in_the_document(document: dict[str, Any]) -> None:
    channels, operations, messages = document["channels"], document["operations"], document["components"]["messages"]
    s = Subjects()
    for name, cls in available_agents().items():
        for spec in cls.endpoints():
            channel = channels[f"endpoint.{name}.{spec.name}"]
            subject = s.user_endpoint(name, spec.name) if spec.per_user else s.endpoint(name, spec.name)
            assert channel["address"].replace("{prefix}", s.prefix) == subject.replace("*", "{user}")
            (request_ref,) = channel["messages"].values()
            request = _deref(document, request_ref["$ref"])
            assert _pointer(document, request["payload"]["$ref"])["title"] == spec.request.__name__
            replies = [_deref(document, r["$ref"]) for r in operations[f"{name}.{spec.name}"]["reply"]["messages"]]
            assert [r["title"] for r in replies] == [spec.reply.__name__, "ErrorBody"]
        for task_spec in cls.tasks():
            assert channels[f"task.{task_spec.kind}"]["address"] == "{prefix}.task." + task_spec.kind
            payload = messages[f"task.{task_spec.kind}"]["payload"]
            assert _pointer(document, payload["properties"]["input"]["$ref"])["title"] == task_spec.input.__name__
            assert operations[f"{name}.task.{task_spec.kind}"]["action"] == "receive"
            assert (
                channels[f"record.{task_spec.kind}"]["address"] == "$KV.{PREFIX}_tasks." + task_spec.kind + ".{task_id}"
            )
        for event_type in cls.publishes:
            if event_type is not TaskProgress:
                assert operations[f"{name}.publish.{event_type.topic}"]["action"] == "send"
    assert channels["task.progress"]["address"] == "{prefix}.event.task.progress.{kind}.{task_id}"
    assert channels["health"]["address"] == "{prefix}.{agent}.health"
    assert document["components"]["parameters"]["agent"]["enum"] == sorted(available_agents())
    assert channels["srv.info"]["address"] == "$SRV.INFO"
    task_headers = document["components"]["schemas"]["headers.task"]
    assert task_headers["required"] == ["Nats-Msg-Id"]


class ProbeRequest(Message):
    question: str


class ProbeReply(Message):
    answer: str


class ProbeJob(Message):
    size: int


class ProbeResult(BaseModel):
    words: int


class ProbeHappened(EventData):
    """Something happened to a probe."""

    topic: ClassVar[str] = "probe.happened"
    what: str


class ProbeAlert(EventData):
    """A probe's alert changed state."""

    topic: ClassVar[str] = "probe.alert.*"
    level: int


class ProbeAgent(Agent):
    name = "probe"
    publishes = (ProbeHappened, ProbeAlert, TaskProgress)

    @endpoint("ask", per_user=True)
    async def ask(self, request: ProbeRequest) -> ProbeReply:
        """Answer a probe's question."""
        return ProbeReply(answer=request.question)

    @task("probe-job")
    async def job(self, job: ProbeJob, ctx: TaskContext) -> ProbeResult:
        return ProbeResult(words=job.size)

    @on_event("probe.>", replay=True)
    async def on_probe(self, event: Event) -> None:
        pass

    @on_event("elsewhere.*")
    async def on_elsewhere(self, event: Event) -> None:
        pass


class SilentAgent(Agent):
    name = "silent"  # declares nothing: only the runtime's own channels


def test_an_agent_declaring_every_kind_of_contract_is_described() -> None:
    document = build_document({"probe": ProbeAgent, "silent": SilentAgent})
    assert structural_problems(document) == []
    channels, operations = document["channels"], document["operations"]

    ask = channels["endpoint.probe.ask"]
    assert ask["address"] == "{prefix}.probe.{user}.ask"
    assert set(ask["parameters"]) == {"prefix", "user"}
    assert operations["probe.ask"]["summary"] == "Answer a probe's question"

    assert channels["event.probe.happened"]["address"] == "{prefix}.event.probe.happened"
    alert = channels["event.probe.alert.*"]
    assert alert["address"] == "{prefix}.event.probe.alert.{token}"
    assert alert["parameters"]["token"] == {"$ref": "#/components/parameters/token"}
    # Progress is the runtime's channel, whoever declares it: no channel of its own for the probe.
    assert "event.task.progress.*.*" not in channels
    assert "probe.publish.task.progress.*.*" not in operations

    # A subscription lists the declared event types it can receive; one that matches none, any event.
    assert set(channels["event.probe.>"]["messages"]) == {"event.ProbeAlert", "event.ProbeHappened"}
    assert channels["event.probe.>"]["address"] == "{prefix}.event.probe.{rest}"
    assert operations["probe.on.on_probe"]["action"] == "receive"
    assert set(channels["event.elsewhere.*"]["messages"]) == {"event"}

    alert_event = {"topic": "probe.alert.firing", "source": "probe", "time": 1.0, "data": {"level": 2}}
    assert payload_errors(document, "event.ProbeAlert", alert_event) == []
    assert payload_errors(document, "event.ProbeAlert", {**alert_event, "topic": "probe.alert"}) != []
    assert payload_errors(document, "event.ProbeAlert", {**alert_event, "data": {"level": "high"}}) != []

    assert not any(op_id.startswith("silent.") for op_id in operations)
    assert "silent" in document["components"]["parameters"]["agent"]["enum"]


# ----------------------------------------------------------------------------------- real messages fit


def test_real_messages_fit_their_schemas_and_wrong_ones_do_not(document: dict[str, Any]) -> None:
    task_id = new_task_id()
    envelope = wire(TaskEnvelope(id=task_id, kind="optimize", input=EXAMPLE, submitted_by="someone"))
    assert payload_errors(document, "task.optimize", envelope) == []
    assert payload_errors(document, "task.optimize", {**envelope, "kind": "cycle"}) != []
    assert payload_errors(document, "task.optimize", {**envelope, "input": {"program": EXAMPLE["program"]}}) != []
    assert payload_errors(document, "task.optimize", {**envelope, "priority": 1}) != []  # unknown fields refused

    record = wire(TaskRecord(id=task_id, kind="optimize", status=TaskStatus.PENDING))
    assert payload_errors(document, "record.optimize", record) == []
    assert payload_errors(document, "record.optimize", {**record, "status": "queued"}) != []

    error = ErrorBody(code="invalid_message", message="SetActive payload is invalid")
    assert payload_errors(document, "error", wire(error)) == []
    letter = DeadLetter(task_id=task_id, kind="optimize", reason=error, deliveries=1, envelope=json.dumps(envelope))
    assert payload_errors(document, "deadLetter", wire(letter)) == []

    progress = Event(topic=f"task.progress.optimize.{task_id}", source="optimizer", data={"task_id": task_id,
                     "phase": "baseline", "step": 1, "total": 3, "lm_calls": 20})  # fmt: skip
    assert payload_errors(document, "event.TaskProgress", wire(progress)) == []
    assert payload_errors(document, "event.TaskProgress", {**wire(progress), "data": {"phase": "x"}}) != []


def test_the_cli_writes_the_document(tmp_path: Path, generated: str) -> None:
    from typer.testing import CliRunner

    from dspyrt.runtime.cli import app

    target = tmp_path / "asyncapi.yaml"
    done = CliRunner().invoke(app, ["asyncapi", "--output", str(target)])
    assert done.exit_code == 0, done.output
    assert target.read_text(encoding="utf-8") == generated
    printed = CliRunner().invoke(app, ["asyncapi"])
    assert printed.exit_code == 0 and printed.stdout == generated
    refused = CliRunner().invoke(app, ["asyncapi", "--output", str(tmp_path / "missing" / "a.yaml")])
    assert refused.exit_code == 2
    assert "error unwritable_file:" in refused.output
