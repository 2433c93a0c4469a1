"""Property-based fuzzing (hypothesis) of every subject the installed agents listen on, against a real nats-server.

Every installed agent (``available_agents()``) runs in one ``serving(...)`` system for the module. Each endpoint
(``<prefix>.<agent>.<endpoint>``, the built-in ``health`` included) and each task kind (``<prefix>.task.<kind>``)
gets hostile input: valid JSON of the wrong shape, JSON shaped after the request model's own schema (to get past
validation into the handlers), random bytes and invalid UTF-8, missing headers, forged ``traceparent`` /
``tracestate`` and other headers, huge header values, payloads near the server's ``max_payload`` and publishes over
it. The properties:

- every request is answered within ``REQUEST_TIMEOUT`` with a micro error (``Nats-Service-Error`` and
  ``Nats-Service-Error-Code`` headers, JSON ``ErrorBody`` with ``code`` and ``message``) or a valid reply;
- every hostile task message ends ``failed`` with a dead letter (schema-shaped ones end in some terminal state);
- afterwards ``collect_status`` shows every agent with the same instance ids, the supervisor restarted nothing,
  and a valid request to each agent (and a task message to each task kind) is still served.

How hypothesis meets the event loop: the system runs in an anyio blocking portal (an event loop in a worker
thread, started once for the module). The ``@given`` tests are plain sync functions that draw inputs with
``st.data()`` and hand each batch to the portal (``portal.call``), so hypothesis keeps its own control flow and no
example touches pytest-asyncio's loop. Shrinking is left out of the phases: one failing example can cost a request
timeout, and shrinking would replay batches of ~60 requests; the failing requests are printed as sent. The task
messages are drawn by hypothesis first and sent afterwards (see ``hostile_task_batches``).

The counts are printed by ``test_every_agent_survived_the_fuzzing`` (``pytest tests/test_fuzz.py -rA`` or ``-s``)
and written to ``<pytest basetemp>/fuzz-counts.json``.

The tests at the end pin what the fuzzing found, each on a system of its own so it cannot disturb the others:
regressions for the bugs fixed since.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ValidationError

from dspyrt.bus import (
    Bus,
    DeadLetter,
    EmbeddedServer,
    Empty,
    ErrorBody,
    MessageValidationError,
    TaskEnvelope,
    TaskStatus,
    TaskStore,
    decode,
)
from dspyrt.bus.messages import ERROR_CODE_HEADER, ERROR_HEADER, MSG_ID_HEADER, RECORD_REV_HEADER, TASK_ID_HEADER
from dspyrt.runtime.agent import Agent
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.host import HEALTH_ENDPOINT, HealthReply
from dspyrt.runtime.registry import available_agents
from dspyrt.runtime.system import collect_status
from tests.helpers import ROOT, serving, wait_until

pytestmark = pytest.mark.timeout(120)

# Agents that need a service this machine does not have. Every installed agent works offline on the demo model,
# so none is left out. The dashboard (when installed) stays in with its web page switched off
# (DSPYRT_DASHBOARD_PORT=off): the fuzzing is about the bus, and a fixed port would collide between runs.
NEEDS_EXTERNAL_SERVICES: frozenset[str] = frozenset()

REQUEST_TIMEOUT = 10.0
TASK_TIMEOUT = 20.0
VALID, ERROR, TIMEOUT, NO_RESPONDERS, UNSTRUCTURED = "valid", "error", "timeout", "no_responders", "unstructured"

FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,
    ],
)


# ----------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Endpoint:
    agent: str
    name: str
    subject: str
    request: type[BaseModel]
    reply: type[BaseModel]

    def __str__(self) -> str:
        return f"{self.agent}.{self.name}"


@dataclass(frozen=True)
class TaskKind:
    agent: str
    kind: str
    subject: str
    input: type[BaseModel]


def fuzzed_agents() -> list[type[Agent]]:
    return [cls for name, cls in sorted(available_agents().items()) if name not in NEEDS_EXTERNAL_SERVICES]


def endpoints_of(config: IntegrationConfig, classes: list[type[Agent]]) -> list[Endpoint]:
    found = []
    for cls in classes:
        for spec in cls.endpoints():
            if spec.per_user:  # e.g. the gateway: one subject per NATS user, here a made-up one
                subject = config.subjects.user_endpoint(cls.name, spec.name, "fuzzer")
            else:
                subject = config.subjects.endpoint(cls.name, spec.name)
            found.append(Endpoint(cls.name, spec.name, subject, spec.request, spec.reply))
        subject = config.subjects.endpoint(cls.name, HEALTH_ENDPOINT)
        found.append(Endpoint(cls.name, HEALTH_ENDPOINT, subject, Empty, HealthReply))
    return found


def task_kinds_of(config: IntegrationConfig, classes: list[type[Agent]]) -> list[TaskKind]:
    return [
        TaskKind(cls.name, spec.kind, config.subjects.task(spec.kind), spec.input)
        for cls in classes
        for spec in cls.tasks()
    ]


# ----------------------------------------------------------------------------------------- the ledger


@dataclass
class Ledger:
    """What the fuzzing sent and what came back, for the assertions and the closing counts."""

    counts: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    internal: dict[str, str] = field(default_factory=dict)  # endpoint -> one message of an ``internal`` error
    task_ends: Counter[str] = field(default_factory=Counter)
    followups: list[tuple[TaskKind, str]] = field(default_factory=list)  # schema-valid tasks, checked at the end
    timings: dict[str, float] = field(default_factory=dict)  # reported, never asserted

    def record(self, outcome: Outcome) -> None:
        self.counts["requests"] += 1
        key = {
            VALID: "valid_replies",
            ERROR: "structured_errors",
            TIMEOUT: "timeouts",
            NO_RESPONDERS: "no_responders",
            UNSTRUCTURED: "unstructured_replies",
        }[outcome.kind]
        self.counts[key] += 1
        if outcome.kind == ERROR:
            self.error_codes[outcome.detail] += 1
            if outcome.detail == "internal":
                self.internal.setdefault(str(outcome.target), outcome.message[:300])


LEDGER = Ledger()


class ErrorLog(logging.Handler):
    """Records dspyrt log records at WARNING and above (worker failures, crashes, unsent replies)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def matching(self, text: str) -> list[str]:
        return [r.getMessage() for r in self.records if text in r.getMessage()]


# ----------------------------------------------------------------------------------------- the system


@dataclass
class FuzzSystem:
    portal: BlockingPortal
    config: IntegrationConfig
    system: Any  # RunningSystem
    nc: NatsClient  # the fuzzer's own connection
    bus: Bus
    store: TaskStore
    endpoints: list[Endpoint]
    tasks: list[TaskKind]
    instances: dict[str, list[str]]
    max_payload: int
    log: ErrorLog
    letters: list[DeadLetter] = field(default_factory=list)

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return self.portal.call(fn, *args)

    def letters_of(self, kind: str, task_id: str) -> list[DeadLetter]:
        return [x for x in self.letters if x.kind == kind and x.task_id == task_id]


async def instance_ids(bus: Bus, config: IntegrationConfig) -> dict[str, list[str]]:
    status = await collect_status(bus, config, window=1.0)
    return {a.name: sorted(i.id for i in a.instances) for a in status.agents}


@pytest.fixture(scope="module")
def fuzz(nats_server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzSystem]:
    """All installed agents in one system, in a portal thread; the fuzzer's own connection beside them."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("DSPYRT_"):
                mp.delenv(key)
        mp.setenv("DSPYRT_DASHBOARD_PORT", "off")
        state = tmp_path_factory.mktemp("fuzz")
        config = IntegrationConfig(
            nats_urls=[nats_server.url],
            subject_prefix=f"fz{uuid.uuid4().hex[:10]}",
            state_dir=state / "state",
            task_ack_wait=3.0,
            task_max_deliver=3,
            event_stream_max_mb=16,
            shutdown_grace=3.0,
        )
        classes = fuzzed_agents()
        log = ErrorLog()
        logging.getLogger("dspyrt").addHandler(log)
        # OpenTelemetry logs a warning for every malformed traceparent/tracestate it is handed: thousands here.
        otel = logging.getLogger("opentelemetry")
        otel_level = otel.level
        otel.setLevel(logging.ERROR)
        try:
            with start_blocking_portal() as portal:
                with portal.wrap_async_context_manager(serving(config, classes)) as system:

                    async def connect() -> tuple[NatsClient, Bus, TaskStore]:
                        nc = await nats.connect(nats_server.url, name="fuzzer", allow_reconnect=False)
                        bus = await Bus(config.connection_options(name="fuzzer-bus"), config.subjects).connect()
                        return nc, bus, await TaskStore.open(bus)

                    nc, bus, store = portal.call(connect)
                    fs = FuzzSystem(
                        portal, config, system, nc, bus, store, endpoints_of(config, classes),
                        task_kinds_of(config, classes), {}, int(nc.max_payload), log,
                    )  # fmt: skip

                    async def follow_dead_letters() -> Any:
                        async def on_letter(msg: Msg) -> None:
                            fs.letters.append(DeadLetter.model_validate_json(msg.data))

                        return await bus.js.subscribe(
                            config.subjects.all_dlq,
                            ordered_consumer=True,
                            cb=on_letter,
                            stream=config.subjects.dlq_stream,
                        )

                    letters_sub = portal.call(follow_dead_letters)
                    fs.instances = portal.call(instance_ids, bus, config)
                    try:
                        yield fs
                    finally:

                        async def close() -> None:
                            await letters_sub.unsubscribe()
                            await bus.close()
                            await nc.close()

                        portal.call(close)
        finally:
            logging.getLogger("dspyrt").removeHandler(log)
            otel.setLevel(otel_level)


# ----------------------------------------------------------------------------------------- asking


@dataclass(frozen=True)
class Outcome:
    target: Endpoint
    kind: str
    detail: str = ""  # the error code, or what was wrong
    message: str = ""
    sent: bytes = b""
    headers: dict[str, str] | None = None

    def describe(self) -> str:
        hdrs = {k: v[:60] + ("..." if len(v) > 60 else "") for k, v in (self.headers or {}).items()}
        return f"{self.target}: {self.kind} {self.detail} {self.message[:200]!r} <- {self.sent[:160]!r} headers={hdrs}"


def classify(target: Endpoint, headers: dict[str, str], data: bytes) -> tuple[str, str, str]:
    if ERROR_CODE_HEADER in headers or ERROR_HEADER in headers:
        code = headers.get(ERROR_CODE_HEADER, "")
        try:
            body = ErrorBody.model_validate_json(data)
        except ValidationError:
            return UNSTRUCTURED, f"error {code} without a JSON ErrorBody", repr(data[:200])
        if not (len(code) == 3 and code.isdigit() and headers.get(ERROR_HEADER) and body.code and body.message):
            return UNSTRUCTURED, f"incomplete error reply (header code {code!r})", body.model_dump_json()[:200]
        return ERROR, body.code, body.message
    if headers.get("Status") == "503":
        return NO_RESPONDERS, "", ""
    try:
        target.reply.model_validate_json(data)
    except ValidationError as exc:
        return UNSTRUCTURED, f"reply is not a {target.reply.__name__}", str(exc)[:200]
    return VALID, "", ""


async def ask(nc: NatsClient, target: Endpoint, payload: bytes, headers: dict[str, str] | None) -> Outcome:
    try:
        msg = await nc.request(target.subject, payload, timeout=REQUEST_TIMEOUT, headers=headers)
    except NoRespondersError:
        return Outcome(target, NO_RESPONDERS, sent=payload, headers=headers)
    except (NatsTimeoutError, TimeoutError):
        return Outcome(target, TIMEOUT, sent=payload, headers=headers)
    kind, detail, message = classify(target, msg.headers or {}, msg.data)
    return Outcome(target, kind, detail, message, payload, headers)


async def ask_all(
    nc: NatsClient, batch: list[tuple[Endpoint, bytes, dict[str, str] | None]], limit: int = 64
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    gate = anyio.Semaphore(limit)

    async def one(target: Endpoint, payload: bytes, headers: dict[str, str] | None) -> None:
        async with gate:
            outcomes.append(await ask(nc, target, payload, headers))

    async with anyio.create_task_group() as tg:
        for target, payload, headers in batch:
            tg.start_soon(one, target, payload, headers)
    return outcomes


def check_outcomes(outcomes: list[Outcome], allowed: tuple[str, ...] = (VALID, ERROR)) -> None:
    for outcome in outcomes:
        LEDGER.record(outcome)
    bad = [o for o in outcomes if o.kind not in allowed]
    if bad:  # hypothesis may report a failing example as flaky: keep the real problem in the output
        print("\n".join(o.describe() for o in bad[:10]))
    assert not bad, f"{len(bad)} of {len(outcomes)} requests not answered properly:\n" + "\n".join(
        o.describe() for o in bad[:10]
    )


# ----------------------------------------------------------------------------------------- strategies

SURROGATES = st.sampled_from(["\ud800", "\udfff", "\udbff\udc00x"])  # lone surrogates: \\udXXX escapes in JSON
ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "null",
        "NaN",
        "{}",
        "[]",
        "\u202e",
        "%s%n",
        "../../etc/passwd",
        "$SRV.PING",
        "_INBOX.x",
        "*",
        ">",
    ]
)
TEXT = st.one_of(st.text(max_size=20), SURROGATES, ODD_TEXT)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63),
    st.floats(),  # NaN and infinities: json.dumps writes them, and they are not JSON
    TEXT,
)


def nested(depth: int) -> st.SearchStrategy[Any]:
    """JSON values nested up to ``depth`` levels. Not ``st.recursive``: with it, hypothesis 6.170 now and then
    raised FlakyStrategyDefinition ("the second run stopped drawing earlier") in these tests."""
    if depth == 0:
        return LEAVES
    inner = nested(depth - 1)
    return st.one_of(LEAVES, st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3))


JSON_VALUES = nested(3)
BAD_UTF8 = st.sampled_from(
    [
        *(b"\xff", b"\xfe\xff", b"\x80", b"\xa0\xa1"),  # stray continuation bytes, invalid bytes
        *(b"\xc3\x28", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc"),  # broken sequences
        *(b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\xa1\xa1\xa1\xa1", b"\xf4\x90\x80\x80"),  # surrogate, overlong, >U+10FFFF
    ]
)


def dump(value: Any, ascii_only: bool = True) -> bytes:
    # Without ensure_ascii a lone surrogate goes out raw (surrogatepass): one more kind of invalid UTF-8.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def dumped(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.builds(dump, values, st.booleans())


def from_schema(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped after a JSON schema (pydantic's), mostly inside its constraints and sometimes outside."""
    if depth > 8:
        return LEAVES
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, depth + 1)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, defs, depth + 1) for s in schema[key]])
    if "allOf" in schema:
        return from_schema(schema["allOf"][0], defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, defs, depth) for k in kind])
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        strategies = {k: from_schema(v, defs, depth + 1) for k, v in props.items()}
        fixed = st.fixed_dictionaries(
            {k: s for k, s in strategies.items() if k in required},
            optional={k: s for k, s in strategies.items() if k not in required},
        )
        extra = schema.get("additionalProperties", not props)
        if extra is False or props:
            return fixed
        values = from_schema(extra, defs, depth + 1) if isinstance(extra, dict) and extra else JSON_VALUES
        return st.dictionaries(TEXT, values, max_size=3)
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs, depth + 1)
        low = min(int(schema.get("minItems", 0)), 3)
        return st.lists(items, min_size=low, max_size=max(low, min(int(schema.get("maxItems", 3)), 3)))
    if kind == "string":
        options: list[st.SearchStrategy[Any]] = [st.text(max_size=min(int(schema.get("maxLength", 30)), 30))]
        pattern = schema.get("pattern")
        if pattern:
            try:
                re.compile(pattern)
                options.append(st.from_regex(pattern, fullmatch=True))
            except re.error:
                pass
        return st.one_of(options)
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        bounded = st.integers(
            None if low is None else int(low) + ("exclusiveMinimum" in schema),
            None if high is None else int(high) - ("exclusiveMaximum" in schema),
        )
        return st.one_of(bounded, st.integers())
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        exclusive = st.floats(
            low,
            high,
            allow_nan=False,
            allow_infinity=False,
            exclude_min=low is not None and "exclusiveMinimum" in schema,
            exclude_max=high is not None and "exclusiveMaximum" in schema,
        )
        return st.one_of(exclusive, st.floats())
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON_VALUES


_SCHEMAS: dict[type[BaseModel], st.SearchStrategy[Any]] = {}


def shaped(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    """Values shaped after ``model``'s JSON schema (cached per model)."""
    if model not in _SCHEMAS:
        schema = model.model_json_schema()
        _SCHEMAS[model] = from_schema(schema, schema.get("$defs", {}))
    return _SCHEMAS[model]


_WRONG: dict[type[BaseModel], st.SearchStrategy[Any]] = {}


def keyed_wrong_shape(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the model's own keys (and others) holding values of any type."""
    names = sorted(model.model_fields) or ["x"]
    return st.dictionaries(st.one_of(st.sampled_from(names), TEXT), JSON_VALUES, max_size=5)


def wrong_shape(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    """Valid JSON of the wrong shape: anything, or the model's own keys with values of any type (cached)."""
    if model not in _WRONG:
        _WRONG[model] = st.one_of(JSON_VALUES, keyed_wrong_shape(model))
    return _WRONG[model]


def with_bad_utf8(payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    def insert(args: tuple[bytes, int, bytes]) -> bytes:
        data, where, bad = args
        where %= len(data) + 1
        return data[:where] + bad + data[where:]

    return st.tuples(payloads, st.integers(0, 10**6), BAD_UTF8).map(insert)


def undecodable(model: type[BaseModel]) -> st.SearchStrategy[bytes]:
    """Random bytes, and JSON (well or wrongly shaped) with invalid UTF-8 somewhere inside."""
    return st.one_of(
        st.binary(max_size=300), with_bad_utf8(dumped(shaped(model))), with_bad_utf8(dumped(wrong_shape(model)))
    )


HEX = "0123456789abcdef"
HEADER_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,20}", fullmatch=True)
HUGE = st.integers(1_000, 12_000)
HEADER_VALUES = st.one_of(st.text(max_size=60), HUGE.map(lambda n: "v" * n))


def hexes(n: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=HEX, min_size=n, max_size=n)


TRACEPARENTS = st.one_of(
    st.text(max_size=80),
    st.builds("{}-{}-{}-{}".format, hexes(2), hexes(32), hexes(16), hexes(2)),
    st.sampled_from(
        [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # valid: a foreign trace to continue
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # upper case
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever",  # future version with more
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01,00-ab",
        ]
    ),
    HUGE.map(lambda n: "00-" + "f" * n),
)
TRACESTATES = st.one_of(
    st.text(max_size=80),
    st.lists(st.tuples(HEADER_NAMES, st.text(max_size=20)), max_size=40).map(
        lambda kvs: ",".join(f"{k}={v}" for k, v in kvs)
    ),
    HUGE.map(lambda n: "k=" + "v" * n),
    st.integers(33, 600).map(lambda n: ",".join(f"k{i}=v{i}" for i in range(n))),  # over the W3C limit of 32
)
FORGED = st.fixed_dictionaries(
    {},
    optional={
        "traceparent": TRACEPARENTS,
        "tracestate": TRACESTATES,
        MSG_ID_HEADER: HEADER_VALUES,
        ERROR_HEADER: HEADER_VALUES,
        ERROR_CODE_HEADER: HEADER_VALUES,
        TASK_ID_HEADER: HEADER_VALUES,
        "Dspyrt-Client": HEADER_VALUES,
        "Status": st.sampled_from(["100", "408", "409", "503", "abc"]),
        "Description": HEADER_VALUES,
    },
)
HOSTILE_HEADERS = st.one_of(
    st.none(),
    st.just({}),
    st.tuples(FORGED, st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3)).map(lambda t: {**t[1], **t[0]}),
)


def fit(headers: dict[str, str] | None, limit: int) -> dict[str, str] | None:
    """Cut header values so the block stays under ``limit`` bytes (JetStream refuses more than 64 KiB)."""
    if not headers:
        return headers
    share = max(limit // len(headers) - 64, 16)
    return {k: v[:share] for k, v in headers.items()}


# ----------------------------------------------------------------------------------------- endpoints


@settings(FUZZ_SETTINGS, max_examples=25)
@given(data=st.data())
def test_wrong_shaped_json_gets_a_structured_error(fuzz: FuzzSystem, data: st.DataObject) -> None:
    batch = [(t, data.draw(dumped(wrong_shape(t.request)), label=str(t)), None) for t in fuzz.endpoints]
    check_outcomes(fuzz.call(ask_all, fuzz.nc, batch))


@settings(FUZZ_SETTINGS, max_examples=20)
@given(data=st.data())
def test_schema_shaped_json_is_answered(fuzz: FuzzSystem, data: st.DataObject) -> None:
    """Payloads shaped after each request model get past validation into the handlers: any answer must be a
    valid reply or a structured error."""
    batch = [(t, data.draw(dumped(shaped(t.request)), label=str(t)), None) for t in fuzz.endpoints]
    check_outcomes(fuzz.call(ask_all, fuzz.nc, batch))


@settings(FUZZ_SETTINGS, max_examples=15)
@given(data=st.data())
def test_random_bytes_and_invalid_utf8_get_a_structured_error(fuzz: FuzzSystem, data: st.DataObject) -> None:
    batch = [(t, data.draw(undecodable(t.request), label=str(t)), None) for t in fuzz.endpoints]
    check_outcomes(fuzz.call(ask_all, fuzz.nc, batch))


@settings(FUZZ_SETTINGS, max_examples=12)
@given(data=st.data())
def test_missing_forged_and_huge_headers_are_answered(fuzz: FuzzSystem, data: st.DataObject) -> None:
    """Garbage ``traceparent``/``tracestate`` (malformed, zero ids, forbidden versions, 12 KB values, 600
    members), forged error, status and task headers, random extra headers, or none at all."""
    batch = []
    for t in fuzz.endpoints:
        payload = data.draw(st.one_of(dumped(shaped(t.request)), dumped(wrong_shape(t.request))), label=str(t))
        batch.append((t, payload, data.draw(HOSTILE_HEADERS, label=f"{t} headers")))
    check_outcomes(fuzz.call(ask_all, fuzz.nc, batch))


@settings(FUZZ_SETTINGS, max_examples=10)
@given(data=st.data())
def test_micro_discovery_subjects_survive_hostile_input(fuzz: FuzzSystem, data: st.DataObject) -> None:
    """``$SRV.PING|INFO|STATS.<service>`` ignore the payload and still answer with their JSON documents."""
    services = sorted({fuzz.config.subjects.service_name(t.agent) for t in fuzz.endpoints})
    batch = []
    for service in services:
        verb = data.draw(st.sampled_from(["PING", "INFO", "STATS"]), label=service)
        payload = data.draw(st.one_of(st.binary(max_size=200), dumped(JSON_VALUES)), label=f"{service} payload")
        target = Endpoint(service, verb, f"$SRV.{verb}.{service}", Empty, Empty)
        batch.append((target, payload, data.draw(HOSTILE_HEADERS, label=f"{service} headers")))

    async def discover() -> list[tuple[Endpoint, str]]:
        found: list[tuple[Endpoint, str]] = []

        async def one(target: Endpoint, payload: bytes, headers: dict[str, str] | None) -> None:
            # Not nc.request(): micro's PING/INFO/STATS handlers copy the request's headers into the reply, and
            # nats-py's request() reads a copied 'Status: 503' as "no responders".
            inbox = fuzz.nc.new_inbox()
            sub = await fuzz.nc.subscribe(inbox, max_msgs=1)
            try:
                await fuzz.nc.publish(target.subject, payload, reply=inbox, headers=headers)
                msg = await sub.next_msg(timeout=REQUEST_TIMEOUT)
                kind = json.loads(msg.data).get("type", "?")
            except (NatsTimeoutError, TimeoutError):
                kind = TIMEOUT
            finally:
                await sub.unsubscribe()
            found.append((target, kind))

        async with anyio.create_task_group() as tg:
            for target, payload, headers in batch:
                tg.start_soon(one, target, payload, headers)
        return found

    answers = fuzz.call(discover)
    for target, kind in answers:
        LEDGER.counts["requests"] += 1
        LEDGER.counts["valid_replies" if kind.startswith("io.nats.micro.v1.") else "timeouts"] += 1
        assert kind == f"io.nats.micro.v1.{target.name.lower()}_response", (str(target), kind)


def near_limit_payloads(max_payload: int) -> list[tuple[bytes, dict[str, str] | None]]:
    """Wrong-shaped payloads a few KiB under the server's limit, and one that spends 48 KiB of it on headers."""
    n = max_payload - 2048
    value = b"v" * ((n - 2) // 1000 - 16)
    members = b",".join(b'"k%04d": "%s"' % (i, value) for i in range(1000))
    payloads = [
        b'{"zz": "' + b"x" * (n - 10) + b'"}',  # one huge unknown field
        b"[" + b"0," * ((n - 3) // 2) + b"0]",  # a huge array
        b"{" + members + b"}",  # a huge object: 1000 unknown keys with long values
        b"\xff" * n,  # huge invalid UTF-8
    ]
    assert all(n - 8192 <= len(p) <= n for p in payloads), [len(p) for p in payloads]
    headers = {"traceparent": "0" * 24_000, "x-pad": "p" * 24_000}
    return [(p, None) for p in payloads] + [(b"\x00" * (n - 50_000), headers)]


def many_keys(max_payload: int) -> bytes:
    """Within 2 KiB of the limit: ~70,000 unknown keys, so ~70,000 validation errors."""
    n = max_payload - 2048
    return b"{" + b",".join(b'"k%07d": []' % i for i in range((n - 2) // 15)) + b"}"


def test_near_limit_payloads_get_a_structured_error(fuzz: FuzzSystem) -> None:
    payloads = near_limit_payloads(fuzz.max_payload)
    batch = [(t, payload, headers) for t in fuzz.endpoints for payload, headers in payloads]
    check_outcomes(fuzz.call(ask_all, fuzz.nc, batch, 8))
    # One payload that makes ~70,000 validation errors, to a few endpoints (it costs the agent's event loop
    # ~0.3 s each: pydantic builds every error although the reply keeps 50). Timed for the report, not asserted.
    echo = [t for t in fuzz.endpoints if t.name == HEALTH_ENDPOINT][:4]
    started = time.perf_counter()
    check_outcomes(fuzz.call(ask_all, fuzz.nc, [(t, many_keys(fuzz.max_payload), None) for t in echo], 1))
    LEDGER.timings["1 MB request with 70k unknown keys, answered in (ms, mean)"] = round(
        (time.perf_counter() - started) * 1000 / len(echo), 1
    )


def test_over_limit_publishes_are_refused_and_agents_survive(fuzz: FuzzSystem) -> None:
    """Over ``max_payload`` the client refuses the publish itself; a client that gets a message past its own check
    (headers do not count there) or speaks raw protocol is cut off by the server, and the agents never see it."""
    limit = fuzz.max_payload

    async def over_limit() -> dict[str, Any]:
        seen: dict[str, Any] = {"refused": 0}
        for t in fuzz.endpoints:
            with pytest.raises(MaxPayloadError):
                await fuzz.nc.publish(t.subject, b"x" * (limit + 1), reply=fuzz.nc.new_inbox())
            seen["refused"] += 1

        # Headers are not counted by nats-py's own check: the server sees hdr+payload over its limit.
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        sneaky = await nats.connect(fuzz.nc.connected_url.geturl(), allow_reconnect=False, error_cb=on_error)
        try:
            await sneaky.publish(fuzz.endpoints[0].subject, b"x" * (limit - 100), headers={"x-pad": "p" * 60_000})
            await sneaky.flush(timeout=2)
        except Exception as exc:
            errors.append(repr(exc))
        await wait_until(lambda: sneaky.is_closed, timeout=10, what="server cut the client off")
        seen["sneaky"] = [*errors, str(sneaky.last_error)]
        await sneaky.close()

        # Raw protocol: a PUB that announces more than max_payload is refused with -ERR and the connection closed.
        seen["raw"] = await raw_exchange(fuzz, f"PUB {fuzz.endpoints[0].subject} {limit + 1}\r\n".encode())
        return seen

    seen = fuzz.call(over_limit)
    assert seen["refused"] == len(fuzz.endpoints)
    assert any("payload" in e.lower() for e in seen["sneaky"]), seen["sneaky"]  # cut off for the payload
    assert b"-ERR" in seen["raw"] and b"Maximum Payload" in seen["raw"], seen["raw"][-200:]
    LEDGER.counts["over_limit_publishes_refused"] += seen["refused"] + 2
    # every agent still answers
    check_outcomes(fuzz.call(ask_all, fuzz.nc, [(t, b"", None) for t in fuzz.endpoints if t.name == HEALTH_ENDPOINT]))


RAW_CONNECT = b'CONNECT {"verbose": false, "pedantic": false, "headers": true, "no_responders": true, "protocol": 1}'
RAW_INBOX = "_INBOX.fuzzraw"


async def raw_exchange(fuzz: FuzzSystem, commands: bytes, *, replies: int = 0, wait: float = 2.0) -> bytes:
    """Speak the NATS protocol by hand: CONNECT, SUB to an inbox, ``commands``, PING; what comes back, once
    ``replies`` messages arrived on the inbox (or ``wait`` seconds passed, or the server closed)."""
    url = fuzz.nc.connected_url
    assert url is not None and url.hostname and url.port
    received = b""
    async with await anyio.connect_tcp(url.hostname, url.port) as sock:
        await sock.receive()  # INFO
        await sock.send(RAW_CONNECT + f"\r\nSUB {RAW_INBOX} 1\r\n".encode() + commands + b"PING\r\n")
        with anyio.move_on_after(wait):
            while True:
                try:
                    received += await sock.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                    break
                if b"PONG" in received and len(parse_frames(received)) >= replies:
                    break
    return received


def hpub(subject: str, header_block: bytes, payload: bytes) -> bytes:
    size = len(header_block) + len(payload)
    return f"HPUB {subject} {RAW_INBOX} {len(header_block)} {size}\r\n".encode() + header_block + payload + b"\r\n"


def parse_frames(data: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The complete MSG/HMSG frames in ``data``: (headers, payload) each."""
    frames = []
    at = 0
    while (start := data.find(b"MSG ", at)) >= 0:
        line_end = data.find(b"\r\n", start)
        if line_end < 0:
            break
        line = data[start:line_end].split()
        is_h = start > 0 and data[start - 1 : start] == b"H"
        header_len, total = (int(line[-2]), int(line[-1])) if is_h else (0, int(line[-1]))
        body_start = line_end + 2
        if len(data) < body_start + total:
            break
        block = data[body_start : body_start + header_len]
        headers = {}
        for raw in block.split(b"\r\n")[1:]:
            name, sep, value = raw.partition(b":")
            if sep:
                headers[name.strip().decode("ascii", "replace")] = value.strip().decode("utf-8", "replace")
        frames.append((headers, data[body_start + header_len : body_start + total]))
        at = body_start + total
    return frames


# Header blocks nats-py's high-level API cannot produce. A non-UTF-8 status line used to stop the receiver's read
# loop (see the regression test at the end); nats-py's guard-less decode is now wrapped by bus/connection.py.
RAW_HEADER_BLOCKS = [
    b"NATS/1.0\r\n\r\n",
    b"NATS/1.0\r\ntraceparent: \xff\xfe\xfd\r\ntracestate: \xc3\x28=\xa0\r\n\r\n",
    b"NATS/1.0\r\n\xc3\xa9t\xc3\xa9: non-ascii name\r\nno colon at all\r\n: empty name\r\n\r\n",
    b"NATS/1.0\r\ntraceparent: a\r\ntraceparent: b\r\nTRACEPARENT: c\r\n\r\n",
    b"NATS/1.0\r\ntraceparent:00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\n\r\n",
    b"NATS/1.0 abc\r\n\r\n",
    b"NATS/1.0   \r\n\r\n",
    b"NATS/1.0 \xff\xfe\r\n\r\n",
    b"NATS/1.0 \xc3\x28 Idle\r\ntraceparent: x\r\n\r\n",
]


def test_raw_protocol_header_blocks_are_answered(fuzz: FuzzSystem) -> None:
    """Header blocks only the raw protocol can send (non-UTF-8 values, non-ASCII names, lines without a colon,
    inline status lines), to every endpoint: each request is answered (replies carry no request id, so they are
    checked as a set: as many as requests, each a valid reply or a structured error)."""

    async def send_all() -> list[Outcome]:
        outcomes = []
        for t in fuzz.endpoints:
            commands = b"".join(hpub(t.subject, block, b"{}") for block in RAW_HEADER_BLOCKS)
            received = await raw_exchange(fuzz, commands, replies=len(RAW_HEADER_BLOCKS), wait=REQUEST_TIMEOUT)
            frames = parse_frames(received)
            for headers, data in frames:
                kind, detail, message = classify(t, headers, data)
                outcomes.append(Outcome(t, kind, detail, message, b"(raw header block)"))
            outcomes += [Outcome(t, TIMEOUT, sent=b"(raw header block)")] * (len(RAW_HEADER_BLOCKS) - len(frames))
        return outcomes

    check_outcomes(fuzz.call(send_all))


# ----------------------------------------------------------------------------------------- tasks


@dataclass
class SentTask:
    kind: TaskKind
    body: bytes
    headers: dict[str, str]
    seq: int
    expect: str  # "failed": hostile, must end failed with a dead letter; "any": schema-valid, any terminal state
    task_id: str

    def describe(self) -> str:
        return (
            f"{self.kind.kind} {self.task_id[:60]} ({self.expect}) <- {self.body[:160]!r} headers={list(self.headers)}"
        )


def plan_task(kind: TaskKind, body: bytes) -> tuple[bytes, str, str | None]:
    """(body to send, what to expect, the envelope's task id if the body is a valid envelope)."""
    try:
        envelope = decode(TaskEnvelope, body)
    except MessageValidationError:
        return body, "failed", None
    # A valid envelope: a fresh id, so no earlier example's record decides what happens to this one.
    envelope = envelope.model_copy(update={"id": uuid.uuid4().hex})
    try:
        kind.input.model_validate(envelope.input)
        expect = "any"
    except (ValidationError, MessageValidationError):  # some models' validators raise the latter themselves
        expect = "failed"
    except Exception:
        expect = "any"
    return envelope.model_dump_json().encode(), expect, envelope.id


async def publish_tasks(fuzz: FuzzSystem, batch: list[tuple[TaskKind, bytes, dict[str, str]]]) -> list[SentTask]:
    sent = []
    for kind, drawn, forged in batch:
        body, expect, envelope_id = plan_task(kind, drawn)
        # A valid envelope's message id is its task id (else the worker refuses it, id_mismatch).
        headers = {**(fit(forged, 48_000) or {}), MSG_ID_HEADER: envelope_id or uuid.uuid4().hex}
        ack = await fuzz.bus.js.publish(kind.subject, body, headers=headers)
        # A message that is no envelope is recorded as invalid-<stream seq>, whatever its Dspyrt-Task-Id claims.
        sent.append(SentTask(kind, body, headers, ack.seq, expect, envelope_id or f"invalid-{ack.seq}"))
    return sent


async def hostile_tasks_ended(fuzz: FuzzSystem, sent: list[SentTask]) -> list[str]:
    """Problems left once every hostile task failed with a dead letter (or the time ran out)."""

    async def problems() -> list[str]:
        found = []
        for task in sent:
            if task.expect != "failed":
                continue
            if not fuzz.letters_of(task.kind.kind, task.task_id):
                found.append(f"no dead letter: {task.describe()}")
                continue
            record = await fuzz.store.get(task.task_id)
            if record is None or record.status is not TaskStatus.FAILED:
                found.append(f"record {record and record.status}: {task.describe()}")
        return found

    left: list[str] = []
    with anyio.move_on_after(TASK_TIMEOUT):
        while left := await problems():
            await anyio.sleep(0.1)
    if left:  # hypothesis may report a failing example as flaky: keep the real problem in the output
        print("\n".join(left[:10]))
    return left


def task_bodies(kind: TaskKind) -> st.SearchStrategy[bytes]:
    envelope_like = st.fixed_dictionaries(
        {}, optional={"id": st.one_of(JSON_VALUES, st.uuids().map(lambda u: u.hex)), "kind": JSON_VALUES,
                      "input": JSON_VALUES, "submitted_at": JSON_VALUES, "extra": JSON_VALUES},
    )  # fmt: skip

    def envelope(input: Any) -> dict[str, Any]:
        return {"id": uuid.uuid4().hex, "kind": kind.kind, "input": input}

    return st.one_of(
        st.binary(max_size=200),
        with_bad_utf8(dumped(envelope_like)),
        dumped(JSON_VALUES),
        dumped(envelope_like),
        dumped(st.builds(envelope, st.dictionaries(TEXT, JSON_VALUES, max_size=4))),  # a valid envelope, hostile input
        dumped(st.builds(envelope, keyed_wrong_shape(kind.input))),
        dumped(st.builds(envelope, shaped(kind.input))),  # input shaped after the task's own model
    )


TASK_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "traceparent": TRACEPARENTS,
        "tracestate": TRACESTATES,
        TASK_ID_HEADER: st.one_of(st.text(max_size=40), st.uuids().map(lambda u: u.hex), HUGE.map(lambda n: "t" * n)),
        RECORD_REV_HEADER: st.one_of(
            st.text(alphabet="0123456789", min_size=1, max_size=30),
            st.text(max_size=10),
            st.sampled_from(["²", "١٢", "-1", " 7 ", "0x10", "1e3"]),  # isdigit() but not int(), other digits, ...
        ),
        "Dspyrt-Client": HEADER_VALUES,
    },
)


def hostile_task_batches(tasks: list[TaskKind], examples: int) -> list[list[tuple[TaskKind, bytes, dict[str, str]]]]:
    """``examples`` batches of one hostile message per task kind, drawn by hypothesis: generation only, the test
    sends them afterwards. (Drawing with the bus in the loop, as the endpoint tests do, made hypothesis 6.170 report
    FlakyStrategyDefinition - a passing run "stopped drawing earlier" - in ~1 run in 12 for these strategies;
    generation alone never did in thousands of examples.)"""
    batches: list[list[tuple[TaskKind, bytes, dict[str, str]]]] = []

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(data=st.data())
    def collect(data: st.DataObject) -> None:
        batches.append(
            [
                (k, data.draw(task_bodies(k), label=k.kind), data.draw(TASK_HEADERS, label=f"{k.kind} headers"))
                for k in tasks
            ]
        )

    collect()
    return batches


def test_hostile_task_messages_end_failed_and_dead_lettered(fuzz: FuzzSystem) -> None:
    batches = hostile_task_batches(fuzz.tasks, 15)
    sent = [task for batch in batches for task in fuzz.call(publish_tasks, fuzz, batch)]
    LEDGER.counts["task_messages"] += len(sent)
    LEDGER.followups.extend((t.kind, t.task_id) for t in sent if t.expect == "any")
    left = fuzz.call(hostile_tasks_ended, fuzz, sent)
    assert not left, "\n".join(left[:10])
    hostile = [t for t in sent if t.expect == "failed"]
    LEDGER.task_ends["failed + dead letter (hostile)"] += len(hostile)
    for task in hostile:
        codes = {x.reason.code for x in fuzz.letters_of(task.kind.kind, task.task_id)}
        LEDGER.error_codes.update(f"task:{c}" for c in codes)


def test_near_limit_task_messages_end_failed_and_dead_lettered(fuzz: FuzzSystem) -> None:
    """Invalid task messages near the limit, or whose invalid UTF-8 would triple in a decoded dead letter, with a
    20 KB traceparent and a 20 KB Dspyrt-Task-Id: each is dead-lettered (the letter cannot carry such a body)."""
    n = fuzz.max_payload - 48 * 1024
    bodies = [b'{"zz": "' + b"x" * n + b'"}', b"[" + b"0," * (n // 2) + b"0]", b"\xff" * (n // 2)]
    headers = {"traceparent": "f" * 20_000, TASK_ID_HEADER: "t" * 20_000}
    batch = [(k, body, headers) for k in fuzz.tasks for body in bodies]
    sent = fuzz.call(publish_tasks, fuzz, batch)
    LEDGER.counts["task_messages"] += len(sent)
    left = fuzz.call(hostile_tasks_ended, fuzz, sent)
    assert not left, "\n".join(left[:10])
    LEDGER.task_ends["failed + dead letter (hostile)"] += len(sent)


# ----------------------------------------------------------------------------------------- survival


def all_valid_requests(fuzz: FuzzSystem) -> list[tuple[Endpoint, bytes, None]]:
    """Health of every agent, and every endpoint whose request model accepts ``{}``."""
    batch = []
    for t in fuzz.endpoints:
        try:
            t.request.model_validate({})
        except ValidationError:
            continue
        batch.append((t, b"{}", None))
    return batch


def test_every_agent_survived_the_fuzzing(fuzz: FuzzSystem, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Schema-valid tasks (they may run real work, be retried, then fail or succeed) all reach an end.
    async def ends() -> Counter[str]:
        found: Counter[str] = Counter()
        deadline = time.monotonic() + TASK_TIMEOUT
        for _, task_id in LEDGER.followups:
            while True:
                record = await fuzz.store.get(task_id)
                if (record is not None and record.status.terminal) or time.monotonic() > deadline:
                    break
                await anyio.sleep(0.1)
            found[record.status.value if record is not None else "missing"] += 1
        return found

    followups = fuzz.call(ends)
    LEDGER.task_ends.update({f"{k} (schema-shaped input)": v for k, v in followups.items()})
    unfinished = {k: v for k, v in followups.items() if k not in ("succeeded", "failed", "dead")}
    assert not unfinished, f"schema-shaped tasks that did not end within {TASK_TIMEOUT}s: {unfinished}"

    # Same instances, nothing restarted, and every agent still answers valid requests.
    assert fuzz.call(instance_ids, fuzz.bus, fuzz.config) == fuzz.instances
    assert set(fuzz.instances) == {cls.name for cls in fuzzed_agents()}
    assert fuzz.system.supervisor.restarts == dict.fromkeys(fuzz.instances, 0)
    valid = fuzz.call(ask_all, fuzz.nc, all_valid_requests(fuzz))
    bad = [o for o in valid if o.kind != VALID]
    assert not bad, "\n".join(o.describe() for o in bad)
    for outcome in valid:
        LEDGER.record(outcome)
    # every task kind is still consumed: one more invalid message each ends failed with a dead letter
    sent = fuzz.call(publish_tasks, fuzz, [(k, b"still there?", {}) for k in fuzz.tasks])
    assert not fuzz.call(hostile_tasks_ended, fuzz, sent)

    # Per-message worker crashes (handled, but a bug) and replies that could not be sent.
    worker_failures = fuzz.log.matching("unexpected worker failure")
    unsent = fuzz.log.matching("error reply not sent")
    crashes = fuzz.log.matching("crashed; restarting")
    summary = {
        "agents": len(fuzz.instances),
        "endpoints": len(fuzz.endpoints),
        "task_kinds": len(fuzz.tasks),
        **{k: LEDGER.counts[k] for k in ("requests", "valid_replies", "structured_errors", "timeouts")},
        **{k: LEDGER.counts[k] for k in ("unstructured_replies", "no_responders", "task_messages")},
        "over_limit_publishes_refused": LEDGER.counts["over_limit_publishes_refused"],
        "error_codes": dict(LEDGER.error_codes.most_common()),
        "internal_errors_by_endpoint": LEDGER.internal,
        "task_ends": dict(LEDGER.task_ends),
        "timings": LEDGER.timings,
        "dead_letters_seen": len(fuzz.letters),
        "worker_failures_logged": len(worker_failures),
        "error_replies_not_sent": len(unsent),
        "agent_crashes": len(crashes),
        "supervisor_restarts": sum(fuzz.system.supervisor.restarts.values()),
    }
    path = tmp_path_factory.getbasetemp() / "fuzz-counts.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"\nfuzz counts ({path}):\n{json.dumps(summary, indent=2)}")
    assert LEDGER.counts["timeouts"] == 0 and LEDGER.counts["unstructured_replies"] == 0
    assert not crashes and not unsent, (crashes, unsent)
    assert not worker_failures, worker_failures[:5]


# ----------------------------------------------------------------------------------------- found by this fuzzing
# Each on a system of its own (function-scoped ``config``: its own subject prefix). The first five were bugs the
# fuzzing found (fixed in 09e5434); they stay as regressions. Background for the first two: nats-py checks only the
# body against max_payload (headers do not count), the server counts both, and on the server's "maximum payload
# violation" nats-py closes the connection for good (no reconnect): every agent of the process is then off the bus
# while the process runs on (``serve`` now also stops such a process, so its process manager restarts it: see
# test_supervisor). The last one was a nats-py bug, worked around in bus/connection.py.


def _agents(*names: str) -> list[type[Agent]]:
    known = available_agents()
    return [known[n] for n in names]


@pytest.mark.parametrize(
    ("agent", "endpoint", "payload"),
    [
        pytest.param("example", "echo", {"text": "hi", "k" * 360_000: 1}, id="example.echo-unknown-360KB-key"),
        pytest.param("switcher", "select", {"tags": ["x" * 600_000]}, id="switcher.select-600KB-tag"),
    ],
)
async def test_an_error_that_quotes_a_large_input_is_answered(
    config: IntegrationConfig, agent: str, endpoint: str, payload: dict[str, Any]
) -> None:
    """An error quoting the input went out unbounded, in the Nats-Service-Error header and again in the body
    (message and field_errors[].loc): an unknown key three times on any endpoint with a request model, a field in a
    handler's message (switcher: 'no model matches tags=[...]'). Over max_payload, the server refused the reply and
    nats-py closed the process's connection for good."""
    async with serving(config.model_copy(update={"shutdown_grace": 1.0}), _agents(agent)) as system:
        async with await nats.connect(config.nats_urls[0]) as nc:
            try:
                subject = config.subjects.endpoint(agent, endpoint)
                msg = await nc.request(subject, json.dumps(payload).encode(), timeout=2)
            except (NatsTimeoutError, TimeoutError):
                msg = None
        connected = system.bus.connected
    assert connected, "the agent process lost its connection to NATS (closed by nats-py, never reconnected)"
    assert msg is not None and msg.headers and ERROR_CODE_HEADER in msg.headers
    assert len(msg.data) + len(msg.headers.get(ERROR_HEADER, "")) < 64 * 1024


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(b"\xff" * 400_000, {}, id="400KB-invalid-utf8"),
        pytest.param(b'{"zz": "' + b"x" * (1024 * 1024 - 300) + b'"}', {}, id="near-limit"),
        pytest.param(b"g" * 940_000, {TASK_ID_HEADER: "t" * 60_000}, id="940KB-and-60KB-task-id-header"),
    ],
)
async def test_an_invalid_task_message_is_dead_lettered_on_its_first_delivery(
    config: IntegrationConfig, body: bytes, headers: dict[str, str]
) -> None:
    """The dead letter carried the body verbatim (decoded with 'replace': each invalid byte became 3) and the
    unchecked Dspyrt-Task-Id header (in its body and its headers). 400 KB of invalid UTF-8: MaxPayloadError,
    redelivery until max_deliver, the message left in the queue. Near the limit: the same until the
    max-deliveries watcher's shorter letter fit. 940 KB + a 60 KB id header (both within limits): the server
    refused the dead letter and nats-py closed the worker process's connection for good (a poison message)."""
    settings = {"task_ack_wait": 1.0, "shutdown_grace": 1.0}
    async with serving(config.model_copy(update=settings), _agents("example")) as system:
        async with await nats.connect(config.nats_urls[0]) as nc:
            ack = await nc.jetstream().publish(config.subjects.task("wordcount"), body, headers=headers)
            letters: list[DeadLetter] = []

            async def dead_lettered() -> bool:
                raw = await nc.jetstream().stream_info(config.subjects.dlq_stream)
                letters[:] = [
                    DeadLetter.model_validate_json((await nc.jetstream().get_msg(config.subjects.dlq_stream, seq)).data)
                    for seq in range(raw.state.first_seq, raw.state.last_seq + 1)
                    if raw.state.messages
                ]
                return bool(letters)

            try:
                await wait_until(dead_lettered, timeout=5, what=f"dead letter of task message {ack.seq}")
            finally:
                connected = system.bus.connected
    assert connected, "the worker process lost its connection to NATS (closed by nats-py, never reconnected)"
    assert [(x.task_id, x.deliveries) for x in letters] == [(f"invalid-{ack.seq}", 1)]


async def test_a_garbage_task_message_cannot_fail_another_task(config: IntegrationConfig) -> None:
    """An invalid task message was recorded under the id its Dspyrt-Task-Id header claimed, unchecked: garbage
    naming another task's id marked that task failed."""
    async with serving(config, _agents("example")) as system:
        victim = await system.client.submit("nobody-serves-this-kind", {"x": 1}, require_worker=False)
        ack = await system.bus.js.publish(
            config.subjects.task("wordcount"), b"garbage", headers={TASK_ID_HEADER: victim.task_id}
        )

        async def dead_lettered() -> bool:
            letters = [letter for _, letter in await system.client.dead_letters()]
            return any(x.task_id == f"invalid-{ack.seq}" for x in letters)

        await wait_until(dead_lettered, timeout=10, what=f"dead letter of message {ack.seq}")
        record = await system.client.task(victim.task_id)
        assert record.status is TaskStatus.PENDING, record


async def test_a_non_ascii_digit_revision_header_does_not_break_a_delivery(
    config: IntegrationConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Dspyrt-Record-Rev was checked with str.isdigit(), which accepts '²', and int('²') raised: the first delivery
    died with 'unexpected worker failure' and the task waited ack_wait to be retried."""
    async with serving(config.model_copy(update={"task_ack_wait": 1.0}), _agents("example")) as system:
        task_id = uuid.uuid4().hex
        body = json.dumps({"id": task_id, "kind": "wordcount", "input": {"text": "a b"}}).encode()
        headers = {RECORD_REV_HEADER: "²", MSG_ID_HEADER: task_id}
        await system.bus.js.publish(config.subjects.task("wordcount"), body, headers=headers)

        async def ended() -> bool:
            record = await system.client.store.get(task_id)
            return record is not None and record.status.terminal

        await wait_until(ended, timeout=20, what="task ended")
        record = await system.client.task(task_id)
        assert record.status is TaskStatus.SUCCEEDED
        assert record.attempts == 1, "the first delivery failed"
        assert "unexpected worker failure" not in caplog.text


def start_agent_process(name: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``dspyrt agent NAME`` as an operator runs it."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "dspyrt.runtime.cli", "agent", name], cwd=ROOT, env=env, stdout=log, stderr=log
        )


@pytest.mark.timeout(60)
async def test_a_non_utf8_status_line_does_not_deafen_an_agent_process(
    config: IntegrationConfig, tmp_path: Path
) -> None:
    """nats-py 2.16 (_process_headers: status.strip().decode()): one message whose header status line is not
    UTF-8 ('NATS/1.0 \\xff') raised in the read loop, which logged 'encountered error' and stopped; the connection
    stayed 'connected' (health said ok) but the process never read again. Any client that may publish to one
    agent subject could do it. bus/connection.py now drops that message's header block instead."""
    env = {
        **os.environ,
        "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
        "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
        "DSPYRT_EVENT_STREAM_MAX_MB": str(config.event_stream_max_mb),
        "DSPYRT_STATE_DIR": str(tmp_path / "state"),
        "DSPYRT_LOG_LEVEL": "WARNING",
    }
    subject = config.subjects.endpoint("example", "echo")
    process = start_agent_process("example", env, tmp_path / "agent.log")
    try:
        async with await nats.connect(config.nats_urls[0]) as nc:

            async def echoes() -> bool:
                try:
                    await nc.request(subject, b'{"text": "hi"}', timeout=0.5)
                    return True
                except (NatsTimeoutError, NoRespondersError, TimeoutError):
                    return False

            await wait_until(echoes, timeout=30, what="agent process serving")
            url = nc.connected_url
            assert url is not None and url.hostname and url.port
            async with await anyio.connect_tcp(url.hostname, url.port) as sock:
                await sock.receive()
                block = b"NATS/1.0 \xff\xfe\r\n\r\n"
                await sock.send(RAW_CONNECT + b"\r\n" + hpub(subject, block, b"{}") + b"PING\r\n")
                with anyio.move_on_after(1):
                    while b"PONG" not in await sock.receive():
                        pass
            answered = [await echoes() for _ in range(3)]
            assert any(answered), "the agent process no longer reads anything"
    finally:
        process.kill()
        process.wait(10)
