"""Secrets (API keys named by a models file, read from the environment) never reach spans, logs, events, KV
records, stored artifacts or replies.

The models file names real providers whose keys live in the environment (fake ``sk-test-...`` values made per
test) next to the offline demo model, which does the actual work: an ``optimize`` task and a full ``cycle``
(create, evaluate, optimize, validate, deploy) run through every installed agent, and a deployed program is
served. The real-provider path is exercised too, without the network: one provider's ``api_base`` is a closed
port on 127.0.0.1, so the switcher builds its ``dspy.LM`` with the key, calls it, and reports the failure.

Then everything the system wrote is scanned for the keys: the JSONL span file of this process (the session's
telemetry fixture, found through ``current_telemetry().span_destination``) and every file under the state dir,
every log record at DEBUG (caplog, root logger), every message with its headers in every stream of the
deployment — the event stream, tasks, dead letters, audit, every KV bucket (tasks, deployments, optcache,
cycles, roles, ...) and the artifacts object store — plus each artifact read back whole, the replies of every
endpoint that takes ``{}`` (``switcher.models`` among them), and ``ModelSpec`` repr/str/dump.

One more case is a provider that echoes the key in its own error message (some proxies and providers do): that text
is not the system's to produce, but the system must not pass it on (the switcher redacts configured keys).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.msg import Msg

from dspyrt.agents.lm.registry import ModelRegistry, ModelSpec, build_lm
from dspyrt.bus import Bus, TaskStatus
from dspyrt.bus.tasks import new_task_id
from dspyrt.runtime.agent import Agent
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.registry import available_agents
from dspyrt.runtime.telemetry import current_telemetry
from tests.helpers import echoing_provider, serving, wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
CYCLE = json.loads((ROOT / "examples" / "cycle.json").read_text())["input"]
OPTIMIZE = json.loads((ROOT / "examples" / "optimize.json").read_text())["input"]
DEMO = "demo/fewshot"
REAL = "openai/gpt-4o-mini"
OTHER = "openai/never-called"


class Secrets:
    """Fake keys, unique per test, and what to look for: each whole key and its random part alone."""

    def __init__(self) -> None:
        self.keys = {
            "OPENAI_API_KEY": f"sk-test-{uuid.uuid4().hex}",
            "DSPYRT_FAKE_PROVIDER_KEY": f"sk-test-{uuid.uuid4().hex}",
        }

    @property
    def needles(self) -> list[str]:
        return [n for key in self.keys.values() for n in (key, key.removeprefix("sk-test-"))]

    def found_in(self, text: str | bytes) -> list[str]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return [n for n in self.needles if n in text]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connections are refused at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def models_toml(real_base: str, other_base: str) -> str:
    return f"""
[[models]]
model = "{DEMO}"
max_concurrency = 64
tags = ["optimize", "evaluate", "predict", "demo"]

[[models]]
model = "{REAL}"
api_key_env = "OPENAI_API_KEY"
api_base = "{real_base}"
input_cost_per_million = 0.15
output_cost_per_million = 0.60
tags = ["planner"]

[[models]]
model = "{OTHER}"
api_key_env = "DSPYRT_FAKE_PROVIDER_KEY"
api_base = "{other_base}"
tags = ["reviewer"]
"""


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> Secrets:
    found = Secrets()
    for name, value in found.keys.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DSPYRT_DASHBOARD_PORT", "off")  # the dashboard (if installed) keeps to the bus
    return found


def all_agents() -> list[type[Agent]]:
    return list(available_agents().values())


# ----------------------------------------------------------------------------------------- scanning


async def stream_messages(bus: Bus, prefix: str) -> dict[str, list[tuple[dict[str, str], bytes]]]:
    """Every message (headers, data) of every stream of this deployment: its own streams (``<PREFIX>_*``), its
    KV buckets (``KV_<PREFIX>_*``) and object stores (``OBJ_<PREFIX>_*``)."""
    upper = prefix.upper()
    found: dict[str, list[tuple[dict[str, str], bytes]]] = {}
    for info in await bus.js.streams_info():
        name = info.config.name or ""
        if not name.removeprefix("KV_").removeprefix("OBJ_").startswith(f"{upper}_"):
            continue
        messages = found.setdefault(name, [])
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                raw = await bus.js.get_msg(name, seq)
            except Exception:  # deleted, purged or rolled up
                continue
            messages.append((dict(raw.headers or {}), raw.data or b""))
    return found


async def artifacts(bus: Bus) -> dict[str, bytes]:
    """Every object of the deployment's artifact store, read back whole (chunks joined)."""
    store = await bus.js.object_store(bus.subjects.object_store("artifacts"))
    names = [info.name for info in await store.list() if not info.deleted]
    return {name: (await store.get(name)).data or b"" for name in names}


@contextmanager
def every_log_record(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """caplog at DEBUG for every logger, dspy's too (dspy keeps its records to its own handler)."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="dspy")
    dspy_logger = logging.getLogger("dspy")
    attach = not dspy_logger.propagate
    if attach:
        dspy_logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        if attach:
            dspy_logger.removeHandler(caplog.handler)


def files_under(*folders: Path) -> list[tuple[Path, bytes]]:
    return [(f, f.read_bytes()) for folder in folders if folder.exists() for f in folder.rglob("*") if f.is_file()]


# ----------------------------------------------------------------------------------------- the run


@asynccontextmanager
async def secret_system(
    config: IntegrationConfig, tmp_path: Path, other_base: str, *, only_other: bool = False
) -> AsyncIterator[Any]:
    models = tmp_path / "models.toml"
    text = models_toml(f"http://127.0.0.1:{closed_port()}/v1", other_base)
    if only_other:  # no model to fall back to
        text = "[[models]]" + text.split("[[models]]")[-1]
    models.write_text(text)
    settings = {"models_file": models, "shutdown_grace": 1.0}
    async with serving(config.model_copy(update=settings), all_agents()) as system:
        yield system


async def run_everything(config: IntegrationConfig, tmp_path: Path) -> Any:
    """An optimize task and a cycle on the demo model, a served prediction, the real-provider path (offline),
    and every endpoint that takes ``{}``; then what the deployment stored."""
    optimize_id, cycle_id = new_task_id(), new_task_id()
    async with secret_system(config, tmp_path, f"http://127.0.0.1:{closed_port()}/v1") as system:
        client = system.client
        # the real work, on the demo model
        await client.submit(
            "optimize", {**OPTIMIZE, "model": DEMO, "program_name": "secrets-check"}, task_id=optimize_id
        )
        cycle = {**CYCLE, "model": DEMO, "objectives": {**CYCLE["objectives"], "required_validators": []}}
        await client.submit("cycle", cycle, task_id=cycle_id)
        for task_id in (optimize_id, cycle_id):
            record = await client.result(task_id, timeout=90)
            assert record.status is TaskStatus.SUCCEEDED, record.error
        served = await client.bus.request_raw(
            config.subjects.endpoint("serving", "predict"),
            json.dumps({"program": CYCLE["program_name"], "inputs": {"text": "the match went to extra time"}}).encode(),
            timeout=30,
        )

        # the real-provider path, offline: the key is read, handed to dspy.LM, the call fails (connection refused)
        failure = await system.bus.nc.request(
            config.subjects.endpoint("switcher", "complete"),
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": REAL, "fallback": False}).encode(),
            timeout=30,
        )
        assert failure.headers and failure.headers.get("Nats-Service-Error-Code"), failure.data
        assert b"127.0.0.1" in failure.data, failure.data  # it did try the provider's address
        selected = await system.bus.nc.request(
            config.subjects.endpoint("switcher", "select"), json.dumps({"role": "planner"}).encode(), timeout=10
        )
        assert json.loads(selected.data)["model"] == REAL

        # replies of every endpoint that takes {} (models, stats, status, health, lists, ...)
        replies: dict[str, bytes] = {"serving.predict": served.data, "switcher.complete (failed)": failure.data}
        replies["switcher.complete (failed) headers"] = json.dumps(failure.headers).encode()
        for cls in all_agents():
            for spec in [*cls.endpoints(), None]:
                if spec is not None:
                    try:
                        spec.request.model_validate({})
                    except ValueError:
                        continue
                name = spec.name if spec is not None else "health"
                subject = (
                    config.subjects.user_endpoint(cls.name, name, "someone")
                    if spec is not None and spec.per_user
                    else config.subjects.endpoint(cls.name, name)
                )
                msg = await system.bus.nc.request(subject, b"{}", timeout=10)
                replies[f"{cls.name}.{name}"] = msg.data
                replies[f"{cls.name}.{name} headers"] = json.dumps(msg.headers or {}).encode()
        models_reply = json.loads(replies["switcher.models"])
        assert {m["model"] for m in models_reply["models"]} == {DEMO, REAL, OTHER}

        streams = await stream_messages(system.bus, config.subject_prefix)
        stored_artifacts = await artifacts(system.bus)
        task_records = await client.store.list(limit=1000)

    return streams, stored_artifacts, task_records, replies, (optimize_id, cycle_id)


async def test_api_keys_never_reach_spans_logs_events_records_or_artifacts(
    config: IntegrationConfig, secrets: Secrets, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with every_log_record(caplog):
        found = await run_everything(config, tmp_path)
    streams, stored_artifacts, task_records, replies, (optimize_id, cycle_id) = found
    # Not vacuous: the run stored what is scanned below.
    assert {r.id for r in task_records} >= {optimize_id, cycle_id}
    assert stored_artifacts, "no artifact was stored"
    names = set(streams)
    upper = config.subject_prefix.upper()
    for expected in (f"{upper}_EVENTS", f"KV_{upper}_tasks", f"KV_{upper}_deployments", f"KV_{upper}_optcache"):
        assert streams.get(expected), f"{expected} is missing or empty: {sorted(names)}"
    events = streams[f"{upper}_EVENTS"]
    assert any(b'"lm.call"' in data for _, data in events)
    telemetry = current_telemetry()
    assert telemetry is not None
    telemetry.flush()
    span_file = Path(telemetry.span_destination)
    spans = await anyio.Path(span_file).read_text(encoding="utf-8")
    assert optimize_id in spans and cycle_id in spans, "this run's spans are not in the span file"
    assert caplog.records

    leaks: list[str] = []

    def scan(where: str, text: str | bytes) -> None:
        if hits := secrets.found_in(text):
            leaks.append(f"{where}: {hits[0][:12]}...")

    for i, line in enumerate(spans.splitlines()):
        scan(f"span file line {i + 1}", line)
    for file, data in files_under(config.state_dir, span_file.parent):
        scan(f"file {file}", data)
    for record in caplog.records:
        scan(f"log {record.name}:{record.levelname}", caplog.handler.format(record))
        scan(f"log {record.name} args", repr(record.args))
    for stream, messages in streams.items():
        for headers, data in messages:
            scan(f"stream {stream} data", data)
            scan(f"stream {stream} headers", json.dumps(headers))
    for name, data in stored_artifacts.items():
        scan(f"artifact {name}", data)
    for record in task_records:
        scan(f"task record {record.id}", record.model_dump_json())
    for where, data in replies.items():
        scan(f"reply {where}", data)
    assert not leaks, "\n".join(leaks[:20])
    print(
        f"\nscanned for 2 keys: {len(spans.splitlines())} span lines, {len(caplog.records)} log records, "
        f"{sum(len(m) for m in streams.values())} stream messages in {len(streams)} streams "
        f"({len(events)} events), {len(stored_artifacts)} artifacts, {len(task_records)} task records, "
        f"{len(replies)} replies: no key found"
    )


def test_model_specs_and_lms_never_show_the_key(secrets: Secrets, tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(models_toml("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"))
    registry = ModelRegistry.from_toml(path)
    real = registry.get(REAL)
    assert real.api_key_env == "OPENAI_API_KEY"
    for text in (repr(real), str(real), real.model_dump_json(), json.dumps(real.model_dump()), repr(registry)):
        assert not secrets.found_in(text), text
    lm = build_lm(real)  # reads the key from the environment
    assert getattr(lm, "kwargs", {}).get("api_key") == secrets.keys["OPENAI_API_KEY"]  # the key did arrive ...
    assert not secrets.found_in(repr(lm)) and not secrets.found_in(str(lm))  # ... and does not show
    assert not secrets.found_in(json.dumps(lm.dump_state(), default=str))
    # A key pasted into the file itself is refused, and the error does not echo it.
    with pytest.raises(Exception) as caught:
        ModelSpec.model_validate({"model": REAL, "api_key": secrets.keys["OPENAI_API_KEY"]})
    assert not secrets.found_in(str(caught.value))
    with pytest.raises(Exception) as caught:
        ModelSpec.model_validate({"model": REAL, "api_key_env": secrets.keys["OPENAI_API_KEY"]})
    assert not secrets.found_in(str(caught.value))


# ----------------------------------------------------------------------------------------- a provider that echoes


async def provider_echo_run(config: IntegrationConfig, tmp_path: Path) -> tuple[Msg, Any]:
    """A completion and an optimize task on a model whose provider quotes the key in its 401."""
    async with echoing_provider() as base, secret_system(config, tmp_path, base, only_other=True) as system:
        reply = await system.bus.nc.request(
            config.subjects.endpoint("switcher", "complete"),
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": OTHER}).encode(),
            timeout=30,
        )
        assert b"Incorrect API key" in reply.data and b"[redacted]" in reply.data, reply.data  # it did answer
        # an optimization on that model (the only one configured: nothing to fall back to) fails, and is retried
        submission = await system.client.submit("optimize", OPTIMIZE)

        async def failed_once() -> bool:
            record = await system.client.store.get(submission.task_id)
            return record is not None and record.error is not None

        await wait_until(failed_once, timeout=30, what="first failure of the optimize task")
        streams = await stream_messages(system.bus, config.subject_prefix)
    return reply, streams


async def test_a_provider_error_that_quotes_the_key_is_redacted(
    config: IntegrationConfig, secrets: Secrets, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A regression (fixed in 2b6cf63): the provider's text went verbatim into the switcher's AllModelsFailedError,
    so into the caller's error reply (header and body) and on into every DSPy program using the model (dspy's
    parallelizer logs each failed example at ERROR with it)."""
    with every_log_record(caplog):
        reply, streams = await provider_echo_run(config, tmp_path)
    telemetry = current_telemetry()
    assert telemetry is not None
    telemetry.flush()
    upper = config.subject_prefix.upper()
    places = {
        "switcher.complete error reply": reply.data + json.dumps(reply.headers or {}).encode(),
        **{
            f"stream {name}": b"\n".join(data + json.dumps(headers).encode() for headers, data in messages)
            for name, messages in streams.items()
        },
        "span file": await anyio.Path(telemetry.span_destination).read_bytes(),
        "logs": caplog.text,
    }
    assert f"stream KV_{upper}_tasks" in places and f"stream {upper}_EVENTS" in places
    leaked = [where for where, text in places.items() if secrets.found_in(text)]
    assert not leaked, f"the key is in: {', '.join(leaked)}"
