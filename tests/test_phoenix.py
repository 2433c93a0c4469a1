"""Arize Phoenix as the trace collector: one task's whole trace, found through Phoenix's own API.

Optional: needs the ``phoenix`` extra (``pip install -e '.[test,phoenix]'``, or ``make test-phoenix``); skipped
without it. It runs what a user runs: ``phoenix serve`` on loopback (no outside requests), a nats-server, the
switcher in one agent process and every other agent in a second (``dspyrt up``), both exporting over OTLP to
Phoenix with openinference's DSPy instrumentation on; ``dspyrt submit`` sends the example cycle task (create,
evaluate, optimize, validate, deploy). Then Phoenix's REST API (``/v1/projects/{project}/spans/otlpv1``) must hold
the task's trace whole: one root (the submit, ``send dspy.task.cycle``), every parent present, every request and
task hop as a send/process pair, DSPy's Predict/Module spans and one LLM span per LM call, each LM call's hop to the
switcher under its LLM span, and the switcher's span of each call naming the model that served it.

The switcher also serves a provider model whose endpoint (on 127.0.0.1) answers with a 401 quoting the key, and one
completion is sent to it (the switcher falls back to the demo model): no span in Phoenix may hold the key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import nats
import pytest

from dspyrt.bus import EmbeddedServer, free_port
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.registry import available_agents
from tests.helpers import echoing_provider, start_server, wait_until

pytest.importorskip("phoenix.server", reason="the phoenix extra is not installed")
pytest.importorskip("openinference.instrumentation.dspy", reason="the phoenix extra is not installed")

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
CYCLE = json.loads((ROOT / "examples" / "cycle.json").read_text())["input"]
PROVIDER_MODEL = "openai/echoes-the-key"
KEY = f"sk-test-{uuid.uuid4().hex}"


def start_cli(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``dspyrt ARGS`` as an operator runs it, output to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "dspyrt.runtime.cli", *args], cwd=ROOT, env=env,
            stdout=log, stderr=log)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``phoenix serve`` on loopback with a working dir of its own; yields its base URL."""
    workdir = tmp_path_factory.mktemp("phoenix")
    port = free_port()
    env = {
        **os.environ,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(free_port()),
        "PHOENIX_WORKING_DIR": str(workdir),
        "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",  # no fonts, pixels or downloads: tests run offline
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    phoenix_bin = Path(sys.executable).with_name("phoenix")
    with open(workdir / "phoenix.log", "ab") as log:
        process = subprocess.Popen([str(phoenix_bin), "serve"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"phoenix did not start: {(workdir / 'phoenix.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = start_server(tmp_path / "nats" / "jetstream")
    try:
        yield server
    finally:
        server.stop()


def models_toml(provider_base: str) -> str:
    return f"""
[[models]]
model = "demo/fewshot"
max_concurrency = 64
tags = ["optimize", "evaluate", "predict", "demo"]

[[models]]
model = "{PROVIDER_MODEL}"
api_key_env = "DSPYRT_PHOENIX_TEST_KEY"
api_base = "{provider_base}"
tags = ["reviewer"]
"""


class System:
    """Two agent processes exporting to Phoenix, and the environment to run the CLI against them."""

    def __init__(self, env: dict[str, str], config: IntegrationConfig, project: str) -> None:
        self.env = env
        self.config = config
        self.project = project

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "dspyrt.runtime.cli", *args], cwd=ROOT, env=self.env, capture_output=True,
                timeout=timeout
        )


@asynccontextmanager
async def running_system(
    phoenix: str, nats_server: EmbeddedServer, config: IntegrationConfig, tmp_path: Path
) -> AsyncIterator[System]:
    """(A context manager, not a fixture: the provider's task group must close in the task that opened it.)"""
    project = f"dspyrt-{uuid.uuid4().hex[:8]}"
    async with echoing_provider() as provider_base:
        models = tmp_path / "models.toml"
        models.write_text(models_toml(provider_base))
        env = {
            **os.environ,
            "DSPYRT_NATS_URLS": nats_server.url,
            "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
            "DSPYRT_EVENT_STREAM_MAX_MB": str(config.event_stream_max_mb),
            "DSPYRT_MODELS_FILE": str(models),
            "DSPYRT_DASHBOARD_PORT": "off",
            "DSPYRT_LOG_LEVEL": "WARNING",
            "DSPYRT_PHOENIX_TEST_KEY": KEY,
            "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            # Phoenix files spans under the project this resource attribute names.
            "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={project}",
        }
        others = ",".join(sorted(name for name in available_agents() if name not in ("switcher", "dashboard")))
        processes = []
        try:
            for name, args, extra in (
                ("switcher", ["agent", "switcher"], {}),
                ("others", ["up"], {"DSPYRT_AGENTS": others}),
            ):
                process_env = {**env, **extra, "DSPYRT_STATE_DIR": str(tmp_path / name)}
                processes.append(start_cli(args, process_env, tmp_path / f"{name}.log"))
            async with await nats.connect(nats_server.url) as nc:

                async def serving(agent: str) -> bool:
                    try:
                        await nc.request(config.subjects.endpoint(agent, "health"), b"{}", timeout=1)
                        return True
                    except Exception:
                        return False

                for agent in ("switcher", "cycle", "evaluator", "loop-deploy"):
                    await wait_until(lambda a=agent: serving(a), timeout=60, what=f"{agent} serving")
            yield System({**env, "DSPYRT_STATE_DIR": str(tmp_path / "cli")}, config, project)
        finally:
            for process in processes:
                _stop(process)  # SIGTERM: the processes drain and flush their spans


def phoenix_spans(base: str, project: str, trace_id: str | None = None) -> list[dict[str, Any]]:
    """Every span of ``project`` (of one trace if given), through Phoenix's span search, all pages."""
    spans: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 1000}
    if trace_id:
        params["trace_id"] = trace_id
    while True:
        reply = httpx.get(f"{base}/v1/projects/{project}/spans/otlpv1", params=params, timeout=10)
        if reply.status_code == 404:  # the project appears with its first span
            return spans
        reply.raise_for_status()
        body = reply.json()
        spans += body["data"]
        if not body.get("next_cursor"):
            return spans
        params["cursor"] = body["next_cursor"]


def attributes(span: dict[str, Any]) -> dict[str, Any]:
    found = {}
    for item in span.get("attributes") or []:
        value = item["value"]
        found[item["key"]] = next((v for v in value.values() if v is not None), None)
    return found


def kind_of(span: dict[str, Any]) -> str | None:
    return attributes(span).get("openinference.span.kind")


async def test_a_tasks_whole_trace_is_in_phoenix_and_no_key_is(
    phoenix: str, nats_server: EmbeddedServer, config: IntegrationConfig, tmp_path: Path
) -> None:
    """One system for both checks (it takes a while to start): the key scan covers the cycle's spans too."""
    async with running_system(phoenix, nats_server, config, tmp_path) as system:
        await check_whole_trace(phoenix, system)
        await check_key_not_exported(phoenix, system)


async def check_whole_trace(phoenix: str, system: System) -> None:
    task_id = f"phoenix-{uuid.uuid4().hex[:8]}"
    cycle_input = system.env["DSPYRT_STATE_DIR"] + ".cycle.json"
    await anyio.Path(cycle_input).write_text(json.dumps(CYCLE))
    submitted = await anyio.to_thread.run_sync(
        lambda: system.cli("submit", "cycle", cycle_input, "--id", task_id, "--wait", "--timeout", "150")
    )
    assert submitted.returncode == 0, submitted.stdout.decode() + submitted.stderr.decode()

    async with await nats.connect(system.env["DSPYRT_NATS_URLS"]) as nc:
        kv = await nc.jetstream().key_value(system.config.subjects.bucket("tasks"))
        record = json.loads((await kv.get(f"cycle.{task_id}")).value or b"{}")
    assert record["status"] == "succeeded"
    trace_id = record["trace_id"]

    spans: list[dict[str, Any]] = []

    def settled() -> bool:
        # export is batched per process: wait until two reads 1 s apart agree and the deploy hop is there
        before = len(spans)
        time.sleep(1)
        spans[:] = phoenix_spans(phoenix, system.project, trace_id)
        names = {s["name"] for s in spans}
        return bool(spans) and len(spans) == before and any(n.startswith("process") and "deploy" in n for n in names)

    await wait_until(lambda: anyio.to_thread.run_sync(settled), timeout=60, what="the trace in Phoenix")
    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if not s.get("parent_span_id")]
    orphans = [s["name"] for s in spans if s.get("parent_span_id") and s["parent_span_id"] not in by_id]
    assert [r["name"] for r in roots] == [f"send {system.config.subjects.task('cycle')}"], roots  # dspyrt submit
    assert not orphans, f"spans whose parent is not in the trace: {Counter(orphans)}"

    # every request and task hop: a send span and, under it, the process span of the agent that took it
    s = system.config.subjects
    sends = [x for x in spans if x["name"].startswith("send ") and ".event." not in x["name"]]
    unanswered = [
        x["name"]
        for x in sends
        if not any(c["name"] == "process " + x["name"][5:] and c.get("parent_span_id") == x["span_id"] for c in spans)
    ]
    assert not unanswered, Counter(unanswered)
    processed = {x["name"].removeprefix("process ") for x in spans if x["name"].startswith("process ")}
    hops = {
        s.task("cycle"),
        s.endpoint("loop-create", "create"),
        s.task("evaluate"),
        s.task("evaluate-shard"),
        s.task("optimize"),
        s.endpoint("switcher", "select"),
        s.endpoint("switcher", "complete"),
        s.endpoint("assertions", "validate"),
        s.endpoint("loop-deploy", "deploy"),
    }
    assert hops <= processed, hops - processed

    # DSPy's own spans (openinference): modules and predictors (CHAIN) and LM calls (LLM), each LM call with its
    # hop to the switcher beneath it
    kinds = Counter(kind_of(x) for x in spans)
    complete = s.endpoint("switcher", "complete")
    complete_sends = [x for x in spans if x["name"] == f"send {complete}"]
    # two LLM spans per LM call: DSPy's (openinference, the messages) and the switcher's, which Phoenix files as
    # LLM from its gen_ai.* attributes (the model that served the call, tokens; openinference records no tokens)
    dspy_llm = [x for x in spans if kind_of(x) == "LLM" and x["name"] == "LM.__call__"]
    switcher_llm = [x for x in spans if kind_of(x) == "LLM" and x["name"] == f"process {complete}"]
    llm_spans = dspy_llm + switcher_llm
    assert kinds["CHAIN"] > 0 and dspy_llm, kinds
    assert len(dspy_llm) == len(switcher_llm) == len(complete_sends)
    assert kinds["LLM"] == 2 * len(complete_sends)
    served = Counter(attributes(x).get("gen_ai.response.model") for x in switcher_llm)
    assert served == {"demo/fewshot": len(complete_sends)}, served

    def ancestors(span: dict[str, Any]) -> Iterator[dict[str, Any]]:
        while span.get("parent_span_id") in by_id:
            span = by_id[span["parent_span_id"]]
            yield span

    for send in complete_sends:
        assert any(a["name"] == "LM.__call__" for a in ancestors(send)), "an LM hop outside DSPy's LLM span"
    for llm in llm_spans:
        assert any(a["name"].startswith("process ") for a in ancestors(llm)), "an LLM span outside any task"
    print(f"\nPhoenix trace {trace_id}: {len(spans)} spans, {len(llm_spans)} LLM, kinds {dict(kinds)}")


async def check_key_not_exported(phoenix: str, system: System) -> None:
    async with await nats.connect(system.env["DSPYRT_NATS_URLS"]) as nc:
        reply = await nc.request(
            system.config.subjects.endpoint("switcher", "complete"),
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": PROVIDER_MODEL}).encode(),
            timeout=60,
        )
    # the provider was called (it answered 401 quoting the key) and the switcher fell back to the demo model
    assert PROVIDER_MODEL in json.loads(reply.data)["tried"], reply.data
    spans: list[dict[str, Any]] = []
    complete = f"process {system.config.subjects.endpoint('switcher', 'complete')}"

    def exported() -> bool:
        # this request came from a client without telemetry: its process span is a root of its own
        spans[:] = phoenix_spans(phoenix, system.project)
        return any(x["name"] == complete and not x.get("parent_span_id") for x in spans)

    await wait_until(lambda: anyio.to_thread.run_sync(exported), timeout=30, what="the request's span in Phoenix")
    text = json.dumps(spans)
    assert KEY.removeprefix("sk-test-") not in text, [x["name"] for x in spans if KEY[8:] in json.dumps(x)]
