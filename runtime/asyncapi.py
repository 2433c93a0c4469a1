"""The wire protocol as an AsyncAPI 3.0 document, generated from the agents' own declarations (never by hand).

Every installed agent class (entry-point group ``dspyrt.agents``) contributes its request/reply endpoints
(``Agent.endpoints()``, plus the ``health`` endpoint every agent has), its durable task kinds (``Agent.tasks()``:
the envelope on ``<prefix>.task.<kind>`` carrying the input model, the task record carrying the result model), the
events it publishes (``Agent.publishes``) and the events it subscribes to (``Agent.events()``). The runtime adds
what every deployment has: task progress events, dead letters, the micro service discovery subjects, and the
protocol models of ``dspyrt.bus`` (task envelope, task record, dead letter, error body, event wrapper, headers).

Payload schemas are the pydantic models' JSON Schemas (requests and task inputs as they are validated, replies and
results as they are serialized). Subject, stream and bucket names come from :class:`~dspyrt.bus.subjects.Subjects`,
built with placeholder tokens that become the channel parameters ``{prefix}`` (``dspy`` by default), ``{PREFIX}``
(the prefix as stream and bucket names spell it, ``DSPY``), ``{kind}``, ``{task_id}`` and ``{user}``.

Operations are the agents' side: ``receive`` is what a client sends (a request, a task), ``send`` what it reads
(events, task records, dead letters).

The output is deterministic (sorted, no timestamps), so ``docs/asyncapi.yaml`` is this module's output and a test
compares the two; ``dspyrt asyncapi --output docs/asyncapi.yaml`` regenerates it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import yaml
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats
from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from dspyrt.bus import DeadLetter, Empty, ErrorBody, Event, EventData, TaskEnvelope, TaskRecord
from dspyrt.bus.claims import RESULTS_STORE
from dspyrt.bus.messages import (
    CLIENT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    MSG_ID_HEADER,
    RECORD_REV_HEADER,
    TASK_ID_HEADER,
)
from dspyrt.bus.subjects import SERVICE_INFO, SERVICE_PING, SERVICE_STATS, Subjects
from dspyrt.bus.tasks import INLINE_RESULT_LIMIT, task_key
from dspyrt.bus.tracing import TRACEPARENT, TRACESTATE
from dspyrt.runtime.agent import Agent
from dspyrt.runtime.events import TaskProgress
from dspyrt.runtime.host import HEALTH_ENDPOINT, HealthReply, http_code
from dspyrt.runtime.registry import available_agents

ASYNCAPI_VERSION = "3.0.0"
DOCUMENT_PATH = "docs/asyncapi.yaml"
REGENERATE = f"dspyrt asyncapi --output {DOCUMENT_PATH}"
SCHEMA_REF = "#/components/schemas/{model}"

# Subject tokens that Subjects accepts (letters only), replaced by channel parameters in the addresses it builds.
_PLACEHOLDERS = {
    "prefix": "zqprefixzq",
    "PREFIX": "ZQPREFIXZQ",  # what Subjects makes of the prefix placeholder in stream and bucket names
    "kind": "zqkindzq",
    "task_id": "zqtaskidzq",
    "user": "zquserzq",
    "agent": "zqagentzq",  # the health channel, and the service name in descriptions
}
SUBJECTS = Subjects(_PLACEHOLDERS["prefix"])
DEFAULT = Subjects()

PARAMETERS: dict[str, dict[str, Any]] = {
    "prefix": {
        "description": "the deployment's subject prefix (setting `subject_prefix`)",
        "default": DEFAULT.prefix,
    },
    "PREFIX": {
        "description": "the subject prefix as stream, bucket and object-store names spell it (upper case, '-' as '_')",
        "default": DEFAULT.task_stream.removesuffix("_TASKS"),
    },
    "kind": {"description": "a task kind (one subject token)", "examples": ["optimize"]},
    "task_id": {"description": "a task id: 1-128 letters, digits, '_' or '-'"},
    "user": {"description": "the NATS user the request comes from (the server's permissions vouch for it)"},
    "token": {"description": "a subject token the publisher fills in (a `*` in the event type's topic)"},
    "rest": {"description": "one or more subject tokens (a `>` in the subscription's pattern)"},
}


def _address(subject: str) -> str:
    for name, token in _PLACEHOLDERS.items():
        subject = subject.replace(token, "{" + name + "}")
    return subject


def _wildcards(subject: str) -> str:
    """``*`` tokens as ``{token}`` / ``{token2}``... parameters, a final ``>`` as ``{rest}``."""
    parts, stars = [], 0
    for part in subject.split("."):
        if part == "*":
            stars += 1
            part = "{token}" if stars == 1 else "{token" + str(stars) + "}"
        elif part == ">":
            part = "{rest}"
        parts.append(part)
    return ".".join(parts)


def _parameters(address: str) -> dict[str, Any]:
    """The address's parameters, each a reference to its definition (``{token2}`` shares ``token``'s)."""
    names = sorted(set(re.findall(r"\{(\w+)\}", address)))
    return {name: _ref("components", "parameters", re.sub(r"^token\d+$", "token", name)) for name in names}


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


def _header(description: str, *, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "description": description}
    if pattern is not None:
        schema["pattern"] = pattern
    return schema


_TRACE_HEADERS = {
    TRACEPARENT: _header(
        "W3C trace context: the sender's span, continued by the receiver (every publish and request carries it)",
        pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
    ),
    TRACESTATE: _header("W3C trace state, when the sender has one"),
}
_CLIENT = _header("who asks or submits, as the client names itself (audit records, logs); optional")

HEADERS: dict[str, dict[str, Any]] = {
    "headers.request": {
        "type": "object",
        "description": "headers of a request to an endpoint",
        "properties": {CLIENT_HEADER: _CLIENT, **_TRACE_HEADERS},
    },
    "headers.reply": {
        "type": "object",
        "description": "headers of a successful reply (none required)",
        "properties": dict(_TRACE_HEADERS),
    },
    "headers.error": {
        "type": "object",
        "description": "headers of an error reply (the NATS micro protocol's); the body is an ErrorBody",
        "required": [ERROR_HEADER, ERROR_CODE_HEADER],
        "properties": {
            ERROR_HEADER: _header("the error's message"),
            ERROR_CODE_HEADER: _header(
                "an HTTP-like status: "
                + ", ".join(f"{http_code(code)} {code}" for code in ("invalid_message", "not_found", "conflict"))
                + ", ...; 500 for any other code (the body's `code` is the stable one)",
                pattern=r"^[0-9]{3}$",
            ),
        },
    },
    "headers.task": {
        "type": "object",
        "description": "headers of a task message",
        "required": [MSG_ID_HEADER],
        "properties": {
            MSG_ID_HEADER: _header(
                "the task id, equal to the envelope's `id`: JetStream drops a second message with the same id "
                "inside the stream's duplicate window, and the worker dead-letters an envelope whose id differs"
            ),
            TASK_ID_HEADER: _header("the task id again (optional; the dead letter of a task carries it too)"),
            RECORD_REV_HEADER: _header(
                "the revision of the `pending` task record the submitter created (optional: saves the worker a read)",
                pattern=r"^[0-9]+$",
            ),
            CLIENT_HEADER: _CLIENT,
            **_TRACE_HEADERS,
        },
    },
    "headers.event": {
        "type": "object",
        "description": "headers of an event",
        "properties": dict(_TRACE_HEADERS),
    },
    "headers.deadLetter": {
        "type": "object",
        "description": "headers of a dead letter",
        "properties": {TASK_ID_HEADER: _header("the dead task's id"), **_TRACE_HEADERS},
    },
}


@dataclass
class _Schemas:
    """Every model the document names, turned into JSON Schemas at once so shared models are defined once."""

    wanted: dict[tuple[Any, JsonSchemaMode], TypeAdapter[Any]] = field(default_factory=dict)
    refs: dict[tuple[Any, JsonSchemaMode], dict[str, Any]] = field(default_factory=dict)
    definitions: dict[str, Any] = field(default_factory=dict)

    def want(self, model: Any, mode: JsonSchemaMode) -> tuple[Any, JsonSchemaMode]:
        key = (model, mode)
        if key not in self.wanted:
            self.wanted[key] = TypeAdapter(model)
        return key

    def build(self) -> None:
        # Sorted inputs: pydantic resolves name clashes (two models of one name) in the order it meets them.
        inputs = sorted(self.wanted.items(), key=lambda item: (_qualname(item[0][0]), item[0][1]))
        refs, definitions = TypeAdapter.json_schemas(
            [(model, mode, adapter) for (model, mode), adapter in inputs], ref_template=SCHEMA_REF
        )
        self.refs = dict(refs)
        self.definitions = {name: _draft7(schema) for name, schema in sorted(definitions.get("$defs", {}).items())}

    def ref(self, model: Any, mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(self.refs[(model, mode)])


def _draft7(schema: Any) -> Any:
    """A pydantic (JSON Schema 2020-12) schema in the draft-07 terms of AsyncAPI's default schema format: tuples'
    ``prefixItems`` become ``items`` lists, and a ``$ref`` with siblings (a default, a description) is wrapped in
    ``allOf``, since draft-07 ignores the siblings of a ``$ref``."""
    if isinstance(schema, list):
        return [_draft7(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: _draft7(value) for key, value in schema.items()}
    if "prefixItems" in converted:
        converted["items"] = converted.pop("prefixItems")
    if "$ref" in converted and len(converted) > 1:
        converted = {"allOf": [{"$ref": converted.pop("$ref")}], **converted}
    return converted


def _qualname(model: Any) -> str:
    return f"{model.__module__}.{model.__qualname__}"


def _schema_name(ref: dict[str, Any]) -> str:
    return str(ref["$ref"]).rsplit("/", 1)[-1]


def _topic_matches(pattern: str, topic: str) -> bool:
    """Whether a subscription pattern may receive events of ``topic`` (a ``*`` in the topic is any token)."""
    wanted, given = pattern.split("."), topic.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(given) > i
        if i >= len(given) or (token != "*" and given[i] != "*" and token != given[i]):
            return False
    return len(wanted) == len(given)


def _summary(text: str) -> str:
    """A docstring's first sentence."""
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]


class _Document:
    def __init__(self, agents: Mapping[str, type[Agent]]) -> None:
        self.agents = dict(sorted(agents.items()))
        self.schemas = _Schemas()
        self.channels: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, dict[str, str]] = {}  # the reply channel's messages

    # --- building blocks ---------------------------------------------------------------------------------

    def channel(self, channel_id: str, address: str | None, description: str, messages: Iterable[str]) -> None:
        channel = self.channels.setdefault(channel_id, {"address": address, "description": description})
        if address is not None and "{" in address:
            channel["parameters"] = _parameters(address)
        listed = channel.setdefault("messages", {})
        for message_id in messages:
            listed[message_id] = _ref("components", "messages", message_id)

    def message(
        self, message_id: str, payload: dict[str, Any], headers: str | None, *, title: str, summary: str
    ) -> str:
        message: dict[str, Any] = {"name": message_id, "title": title, "summary": summary}
        if headers is not None:
            message["headers"] = _ref("components", "schemas", headers)
        message["payload"] = payload
        self.messages.setdefault(message_id, message)
        return message_id

    def operation(
        self,
        operation_id: str,
        action: str,
        channel_id: str,
        summary: str,
        *,
        replies: Iterable[str] = (),
        tag: str,
        queue: str | None = None,
    ) -> None:
        """An operation on every message of its channel."""
        messages = self.channels[channel_id]["messages"]
        operation: dict[str, Any] = {
            "action": action,
            "channel": _ref("channels", channel_id),
            "summary": summary,
            "messages": [_ref("channels", channel_id, "messages", m) for m in messages],
            "tags": [{"name": tag}],
        }
        if queue is not None:
            operation["bindings"] = {"nats": {"queue": queue, "bindingVersion": "0.1.0"}}
        reply_ids = list(replies)
        if reply_ids:
            for message_id in reply_ids:
                self.replies[message_id] = _ref("components", "messages", message_id)
            operation["reply"] = {
                "channel": _ref("channels", "reply"),
                "messages": [_ref("channels", "reply", "messages", m) for m in reply_ids],
            }
        self.operations[operation_id] = operation

    def model_message(self, role: str, model: Any, mode: JsonSchemaMode, headers: str) -> str:
        """The message of a request or reply model: ``request.<schema name>`` / ``reply.<schema name>``."""
        name = _schema_name(self.schemas.ref(model, mode))
        summary = _summary(getattr(model, "__doc__", None) or "") or name
        return self.message(f"{role}.{name}", self.schemas.ref(model, mode), headers, title=name, summary=summary)

    # --- the document --------------------------------------------------------------------------------------

    def build(self) -> dict[str, Any]:
        self.want_models()
        self.schemas.build()
        self.runtime_channels()
        for name, cls in self.agents.items():
            self.endpoints(name, cls)
            self.tasks(name, cls)
            self.published(name, cls)
        for name, cls in self.agents.items():  # after every published event type is known
            self.subscriptions(name, cls)
        self.discovery()
        self.channels["reply"] = {
            "address": None,
            "description": "the request's reply subject: an inbox of the requester (`_INBOX.<user>.…` under the "
            "deploy's permissions); one reply, or one error reply, arrives there",
            "messages": dict(sorted(self.replies.items())),
        }
        parameters = {name: dict(value) for name, value in PARAMETERS.items()}
        parameters["agent"] = {"description": "an agent's name", "enum": list(self.agents)}
        return {
            "asyncapi": ASYNCAPI_VERSION,
            "info": self.info(),
            "defaultContentType": "application/json",
            "servers": {
                "nats": {
                    "host": "localhost:4222",
                    "protocol": "nats",
                    "description": "the nats-server `dspyrt up` starts (setting `nats_port`), or any NATS server "
                    "or cluster with JetStream (setting `nats_urls`)",
                }
            },
            "channels": dict(sorted(self.channels.items())),
            "operations": dict(sorted(self.operations.items())),
            "components": {
                "schemas": {**HEADERS, **self.schemas.definitions},
                "messages": dict(sorted(self.messages.items())),
                "parameters": dict(sorted(parameters.items())),
            },
        }

    def info(self) -> dict[str, Any]:
        try:
            version = package_version("dspyrt")
        except PackageNotFoundError:  # run from a source tree that is not installed
            version = "0.0.0"
        return {
            "title": "dspyrt",
            "version": version,
            "description": (
                "DSPy program optimization as a service: agents on a NATS bus. Generated from the installed "
                f"agents' declarations by `{REGENERATE}`; do not edit it by hand. Operations are the agents' "
                "side: `receive` is what a client sends (requests, tasks), `send` what a client reads (events, "
                "task records, dead letters). The README's Protocol section tells how to write a client."
            ),
        }

    def want_models(self) -> None:
        s = self.schemas
        inputs: tuple[Any, ...] = (TaskEnvelope, ErrorBody, Empty)
        outputs: tuple[Any, ...] = (TaskRecord, DeadLetter, Event, ErrorBody, HealthReply, TaskProgress)
        for model in inputs:
            s.want(model, "validation")
        for model in (*outputs, ServicePing, ServiceInfo, ServiceStats):
            s.want(model, "serialization")
        for cls in self.agents.values():
            for spec in cls.endpoints():
                s.want(spec.request, "validation")
                s.want(spec.reply, "serialization")
            for task in cls.tasks():
                s.want(task.input, "validation")
                if task.output is not None:
                    s.want(task.output, "serialization")
            for event_type in cls.publishes:
                s.want(event_type, "serialization")

    def runtime_channels(self) -> None:
        """What every deployment has whatever its agents: error replies, dead letters, progress, health."""
        s = self.schemas
        self.message(
            "error",
            s.ref(ErrorBody, "serialization"),
            "headers.error",
            title="ErrorBody",
            summary="an error reply: a stable `code`, a human `message` and, for invalid input, `field_errors`",
        )
        self.message(
            "deadLetter",
            s.ref(DeadLetter, "serialization"),
            "headers.deadLetter",
            title="DeadLetter",
            summary="a task that will not run again by itself: why, after how many deliveries, its envelope",
        )
        self.channel(
            "dlq",
            _address(SUBJECTS.dlq(_PLACEHOLDERS["kind"])),
            f"dead letters, kept in stream `{_address(SUBJECTS.dlq_stream)}`: a task failed for good (its record "
            "says `failed` or `dead`), or a message on a task subject that was not a valid envelope of that kind "
            "(`task_id` `invalid-<stream sequence>`)",
            ["deadLetter"],
        )
        self.operation("runtime.deadLetter", "send", "dlq", "a worker dead-letters a task", tag="runtime")

        topic = SUBJECTS.task_progress_topic(_PLACEHOLDERS["kind"], _PLACEHOLDERS["task_id"])
        self.channel(
            "task.progress",
            _address(SUBJECTS.event(topic)),
            f"a task's progress events (stream `{_address(SUBJECTS.event_stream)}` keeps them): subscribe before "
            "submitting, or read the stream filtered on this subject",
            [self.event_message(TaskProgress)],
        )
        self.operation("runtime.progress", "send", "task.progress", "a task reports its progress", tag="runtime")

        request = self.model_message("request", Empty, "validation", "headers.request")
        reply = self.model_message("reply", HealthReply, "serialization", "headers.reply")
        self.channel(
            "health",
            _address(SUBJECTS.endpoint(_PLACEHOLDERS["agent"], HEALTH_ENDPOINT)),
            "every agent's own endpoint: one instance's health and dependency checks",
            [request],
        )
        self.operation(
            "runtime.health",
            "receive",
            "health",
            "health and dependency checks of one instance",
            replies=[reply, "error"],
            tag="runtime",
            queue=_address(SUBJECTS.queue_group),
        )

    def endpoints(self, agent: str, cls: type[Agent]) -> None:
        for spec in cls.endpoints():
            if spec.per_user:
                subject = SUBJECTS.user_endpoint(agent, spec.name, _PLACEHOLDERS["user"])
                per_user = "; one subject per NATS user, so the server's permissions vouch for who asks"
            else:
                subject, per_user = SUBJECTS.endpoint(agent, spec.name), ""
            summary = spec.description.rstrip(".") or spec.name
            request = self.model_message("request", spec.request, "validation", "headers.request")
            reply = self.model_message("reply", spec.reply, "serialization", "headers.reply")
            channel_id = f"endpoint.{agent}.{spec.name}"
            self.channel(channel_id, _address(subject), f"{summary} (`{agent}`{per_user})", [request])
            self.operation(
                f"{agent}.{spec.name}",
                "receive",
                channel_id,
                summary,
                replies=[reply, "error"],
                tag=agent,
                queue=_address(SUBJECTS.queue_group),
            )

    def tasks(self, agent: str, cls: type[Agent]) -> None:
        s = self.schemas
        for spec in cls.tasks():
            kind = spec.kind
            input_ref = s.ref(spec.input, "validation")
            envelope = {
                "allOf": [s.ref(TaskEnvelope, "validation")],
                "properties": {"kind": {"const": kind}, "input": input_ref},
                "description": f"the envelope of a task of kind `{kind}`; `input` holds its {_schema_name(input_ref)}",
            }
            task_message = self.message(
                f"task.{kind}",
                envelope,
                "headers.task",
                title=f"{kind} task",
                summary=f"a task of kind `{kind}`: publish it to JetStream with {MSG_ID_HEADER} = its id",
            )
            self.channel(
                f"task.{kind}",
                _address(SUBJECTS.task(kind)),
                f"durable tasks of kind `{kind}`: work-queue stream `{_address(SUBJECTS.task_stream)}`, one durable "
                f"consumer (`{SUBJECTS.task_consumer(kind)}`) shared by the workers",
                [task_message],
            )
            self.operation(
                f"{agent}.task.{kind}", "receive", f"task.{kind}", f"`{agent}` runs `{kind}` tasks", tag=agent
            )

            result: dict[str, Any] = {
                "description": "the result: the whole of it, or, when `result_ref` is set, its summary (or null)"
            }
            if spec.output is not None:
                result["anyOf"] = [s.ref(spec.output, "serialization"), {"type": "object"}, {"type": "null"}]
                result["description"] += f"; the whole result is a {_schema_name(s.ref(spec.output, 'serialization'))}"
            record = {
                "allOf": [s.ref(TaskRecord, "serialization")],
                "properties": {"kind": {"const": kind}, "result": result},
                "description": f"the record of a task of kind `{kind}`",
            }
            record_message = self.message(
                f"record.{kind}",
                record,
                None,
                title=f"{kind} task record",
                summary=f"a `{kind}` task's state: pending -> running -> succeeded | failed | dead",
            )
            bucket = _address(SUBJECTS.task_bucket)
            key = _address(task_key(kind, _PLACEHOLDERS["task_id"]))
            results = _address(SUBJECTS.object_store(RESULTS_STORE))
            self.channel(
                f"record.{kind}",
                f"$KV.{bucket}.{key}",  # the subject on which the KV protocol announces each write of the key
                f"the record of a `{kind}` task: KV bucket `{bucket}`, key `{key}`; watch the key for its updates. "
                f"A result over {INLINE_RESULT_LIMIT // 1024} KiB (or near the server's max_payload) is kept in "
                f"object store `{results}`: `result_ref` names the object and its sha256",
                [record_message],
            )
            self.operation(
                f"{agent}.record.{kind}",
                "send",
                f"record.{kind}",
                f"`{agent}` stores the state and outcome of `{kind}` tasks",
                tag=agent,
            )

    def event_message(self, event_type: type[EventData]) -> str:
        """``event.<schema name>``: the Event wrapper with this type's topic and ``data``."""
        data_ref = self.schemas.ref(event_type, "serialization")
        topic: dict[str, Any] = {"type": "string"}
        if "*" in event_type.topic:
            topic["pattern"] = "^" + re.escape(event_type.topic).replace(r"\*", "[A-Za-z0-9_-]+") + "$"
        else:
            topic["const"] = event_type.topic
        name = _schema_name(data_ref)
        payload = {
            "allOf": [self.schemas.ref(Event, "serialization")],
            "properties": {"topic": topic, "data": data_ref},
            "description": f"an event of topic `{event_type.topic}`; `data` holds its {name}",
        }
        summary = _summary(event_type.__doc__ or "") or name
        return self.message(f"event.{name}", payload, "headers.event", title=name, summary=summary)

    def published(self, agent: str, cls: type[Agent]) -> None:
        for event_type in cls.publishes:
            if event_type is TaskProgress:  # the runtime's own channel, whoever declares it
                continue
            channel_id = f"event.{event_type.topic}"
            self.channel(
                channel_id,
                _wildcards(_address(SUBJECTS.event_pattern(event_type.topic))),
                f"events of topic `{event_type.topic}` (stream `{_address(SUBJECTS.event_stream)}` keeps them)",
                [self.event_message(event_type)],
            )
            self.operation(
                f"{agent}.publish.{event_type.topic}",
                "send",
                channel_id,
                f"`{agent}` publishes `{event_type.topic}` events",
                tag=agent,
            )

    def subscriptions(self, agent: str, cls: type[Agent]) -> None:
        for spec in cls.events():
            channel_id = f"event.{spec.pattern}"
            if channel_id not in self.channels:
                matching = [
                    self.event_message(t)
                    for other in self.agents.values()
                    for t in other.publishes
                    if _topic_matches(spec.pattern, t.topic)
                ]
                if not matching:
                    matching = [self.any_event()]
                self.channel(
                    channel_id,
                    _wildcards(_address(SUBJECTS.event_pattern(spec.pattern))),
                    f"events matching `{spec.pattern}`",
                    sorted(set(matching)),
                )
            replay = ", replaying the stream from its start when it first subscribes" if spec.replay else ""
            self.operation(
                f"{agent}.on.{spec.method}",
                "receive",
                channel_id,
                f"`{agent}` handles events matching `{spec.pattern}`, once across its replicas{replay}",
                tag=agent,
            )

    def any_event(self) -> str:
        return self.message(
            "event",
            self.schemas.ref(Event, "serialization"),
            "headers.event",
            title="Event",
            summary="an event of a type no installed agent declares: `data` is the topic's own payload",
        )

    def discovery(self) -> None:
        request = self.message(
            "srv.request",
            {"type": "string", "maxLength": 0, "description": "an empty body"},
            None,
            title="discovery request",
            summary="an empty request: every instance of every service answers",
        )
        service = _address(SUBJECTS.service_name(_PLACEHOLDERS["agent"]))
        answers = {
            SERVICE_PING: (ServicePing, "every instance's name, id, version and metadata"),
            SERVICE_INFO: (ServiceInfo, "every instance's endpoints: name, subject, queue group, metadata"),
            SERVICE_STATS: (ServiceStats, "every instance's request, error and latency counts"),
        }
        for subject, (model, what) in answers.items():
            verb = subject.rsplit(".", 1)[-1].lower()
            reply = self.message(
                f"srv.{verb}", self.schemas.ref(model, "serialization"), None, title=model.__name__, summary=what
            )
            self.channel(
                f"srv.{verb}",
                subject,
                f"NATS micro discovery: {what}. Scatter-gather: publish with a reply inbox and read the answers "
                f"until a short silence; `{subject}.<service>` asks one service only. An agent is service "
                f"`{service}`; its metadata `agent`, `group` and `prefix` name the agent and its deployment, each "
                "endpoint's metadata its `request` and `reply` models",
                [request],
            )
            self.operation(
                f"discovery.{verb}", "receive", f"srv.{verb}", f"answer {subject}", replies=[reply], tag="discovery"
            )


def build_document(agents: Mapping[str, type[Agent]] | None = None) -> dict[str, Any]:
    """The AsyncAPI document of ``agents`` (by default every installed agent class)."""
    return _Document(available_agents() if agents is None else agents).build()


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # (pyyaml ships no type hints)
    """Block style, multi-line strings as literal blocks, and no anchors: a reader sees every schema in place."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render(document: Mapping[str, Any]) -> str:
    """The document as YAML, keys in the order built (deterministic), a header saying how it was made."""
    body = yaml.dump(dict(document), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
    return f"# Generated by `{REGENERATE}` from the agents' declarations: do not edit.\n{body}"


def generate() -> str:
    """The AsyncAPI document of the installed agents, as YAML."""
    return render(build_document())
