"""Provider benchmark: dspyrt next to plain DSPy against a local OpenAI-compatible provider over real HTTP.

Every LM call goes through the real ``dspy.LM("openai/demo-model", api_base=..., api_key=...)`` HTTP path to the
demo provider (``dspyrt.agents.lm.demo_provider``, a subprocess on 127.0.0.1 that answers like the demo engine, with a
fixed latency set through its ``/control`` endpoint). Nothing else touches the network.

A. The ``optimize`` task with 100 ms per provider call. The ``text -> topic`` program of examples/optimize.json
   (40 train / 20 val; ``--valset-repeat K`` repeats the valset K times), LabeledFewShot k=16:
   (a) in-process, plain DSPy as a user writes it without us: one ``dspy.LM(..., cache=False)``,
       ``dspy.Evaluate(num_threads=N)`` of the baseline, ``LabeledFewShot(k=16).compile``, ``Evaluate`` again;
   (b) dspyrt: the switcher and optimizer agents in this process (``dspyrt.runtime.supervisor.serving``, as ``dspyrt
       up`` runs them) on an embedded nats-server, the models TOML naming the provider; the same task submitted with
       ``no_cache: true`` and awaited (``client.run``).
   Same N on both sides, rounds interleaved, medians. Then the caches: the task again with the cache on (the LM
   answers of the no_cache runs are stored), with a new seed so the optimization-result cache misses and only the
   switcher's LM response cache answers, and once more identical so the result cache answers.
B. LM calls per second through one switcher process (``python -m dspyrt.runtime.cli agent switcher``, as an operator
   runs it) with ``--inflight`` senders of ``switcher.complete`` (distinct prompts, ``no_cache``) in this process,
   at 0 and 50 ms provider latency, next to the same load sent straight to the provider with
   ``dspy.LM(...).acall`` from this process (the raw peer); a second switcher process with its LM cache turned off
   (what storing every answer costs); the cache-on switcher answering repeated prompts from its cache. Each row is
   a fixed window after a warm-up, ``--rounds`` interleaved rounds, medians. CPU per call of this process, the
   switcher process, nats-server and the provider come from /proc.

This is a benchmark, not a test: nothing asserts on timing. Tracing is on in every process (the default sampler,
JSONL export); set ``OTEL_TRACES_SAMPLER=always_off`` to measure without it.

    .venv/bin/python benchmarks/bench_provider.py                  # ~3 minutes
    .venv/bin/python benchmarks/bench_provider.py --quick          # under 1 minute
    .venv/bin/python benchmarks/bench_provider.py --json out.json  # also write the figures as JSON
"""

from __future__ import annotations

import os

# Before DSPy and LiteLLM are imported: never fetch the model price list from the network.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import argparse
import cProfile
import io
import json
import logging
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import dspy
from _common import load_average, machine_busy, proc_cpu, versions

from dspyrt.agents.assertions.performance import percentile
from dspyrt.agents.lm.bus_engine import Routing, bus_lm
from dspyrt.agents.lm.demo_provider import DemoProviderProcess, run_demo_provider
from dspyrt.agents.optimizers.agent import OptimizerAgent
from dspyrt.agents.switcher.agent import SwitcherAgent
from dspyrt.agents.switcher.models import ChatMessage, CompletionReply, CompletionRequest, ModelList
from dspyrt.bus import EmbeddedServer, Empty
from dspyrt.bus.server import nats_server_binary
from dspyrt.runtime.client import Client, connect_client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.supervisor import serving
from dspyrt.runtime.telemetry import setup_telemetry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FILE = ROOT / "examples" / "optimize.json"
MODEL = "openai/demo-model"
KEY_ENV = "BENCH_PROVIDER_API_KEY"  # the models TOML names this variable; the provider's key is put in it
SWITCHER_CONCURRENCY = 256  # the switcher's agent_concurrency and the model's max_concurrency: never the limit
OPTIMIZE_LATENCY = 0.3  # the "300 ms provider"; --optimize-latency changes it
CALL_INFLIGHT = 8  # part L: LM calls in flight
ADDED_TARGET_MS = 5.0  # part L target: switcher p50 - in-process p50
RATIO_TARGET = 1.05  # part A target: dspyrt wall / in-process wall
CACHE_PROMPTS = 256  # distinct prompts the cache row cycles through
TOPIC_TEXTS = [
    "boil the eggs and chop the parsley",
    "the goalkeeper saved two penalties",
    "the bank cut its interest rate",
    "snow and strong winds expected tonight",
    "the laptop needs a software update",
]
INSTRUCTIONS = "Classify the text into one topic: sports, cooking, technology, finance or weather."


# ----------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Sample:
    """CPU seconds by process, provider requests, wall clock: one point in time."""

    t: float
    bench: float  # this process, every thread
    nats: float
    provider: float
    switcher: float  # the switcher process (part B), 0 when there is none
    machine: float  # the whole machine's busy CPU seconds (all cores)
    requests: int  # completion requests the provider received
    max_in_flight: int  # the most completion requests the provider held at once (since the last reset)

    def since(self, start: Sample) -> Sample:
        return Sample(
            self.t - start.t, self.bench - start.bench, self.nats - start.nats, self.provider - start.provider,
            self.switcher - start.switcher, self.machine - start.machine, self.requests - start.requests,
            self.max_in_flight,
        )  # fmt: skip


class Meter:
    def __init__(self, server_pid: int | None, provider: DemoProviderProcess) -> None:
        self.server_pid = server_pid
        self.provider = provider
        self.switcher_pid: int | None = None

    async def sample(self, *, reset: bool = False) -> Sample:
        """Now; ``reset`` zeroes the provider's counters first (its high-water mark of requests in flight)."""
        stats = await anyio.to_thread.run_sync(self.provider.reset if reset else self.provider.stats)
        return Sample(
            time.perf_counter(), time.process_time(), proc_cpu(self.server_pid), proc_cpu(self.provider.process.pid),
            proc_cpu(self.switcher_pid), machine_busy(), int(stats["requests"]), int(stats["max_in_flight"]),
        )  # fmt: skip


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- part A: the optimize task


def load_example(valset_repeat: int) -> tuple[dict[str, Any], str]:
    example: dict[str, Any] = json.loads(EXAMPLE_FILE.read_text())["input"]
    original = len(example["valset"])
    if valset_repeat > 1:
        example["valset"] = example["valset"] * valset_repeat
    train, val = len(example["trainset"]), len(example["valset"])
    what = f"examples/optimize.json, {train} train / {val} val"
    return example, what + (f" (its {original} val examples x{valset_repeat})" if valset_repeat > 1 else "")


def topic_match(example: Any, prediction: Any, trace: Any = None) -> bool:
    """Exact match on the topic, as a user writes the metric."""
    return str(example.topic).strip() == str(getattr(prediction, "topic", "") or "").strip()


def optimize_in_process(example: dict[str, Any], lm: Any, num_threads: int) -> tuple[float, float]:
    """Plain DSPy, no dspyrt: Evaluate the baseline, LabeledFewShot(k).compile, Evaluate the result. Scores in %."""
    program = example["program"]
    student = dspy.Predict(dspy.Signature(program["signature"], program["instructions"]))
    train = [dspy.Example(**row).with_inputs("text") for row in example["trainset"]]
    val = [dspy.Example(**row).with_inputs("text") for row in example["valset"]]
    with dspy.context(lm=lm):
        evaluate = dspy.Evaluate(devset=val, metric=topic_match, num_threads=num_threads, display_progress=False)
        baseline = float(evaluate(student).score)
        optimized = dspy.LabeledFewShot(k=int(example["params"]["k"])).compile(student, trainset=train)
        return baseline, float(evaluate(optimized).score)


@dataclass
class OptRun:
    side: str  # "in-process" | "dspyrt"
    threads: int
    wall: float
    bench_cpu: float
    nats_cpu: float
    provider_cpu: float
    provider_requests: int
    provider_max_in_flight: int
    baseline: float
    optimized: float
    lm_calls: int | None = None  # the task's usage meter (dspyrt only)
    cached_calls: int | None = None
    agent_run: float | None = None  # the agent's manager.run (OptimizationResult.duration_s)
    result_cached: bool = False


async def run_in_process(meter: Meter, example: dict[str, Any], lm: Any, threads: int) -> OptRun:
    start = await meter.sample(reset=True)
    baseline, optimized = await anyio.to_thread.run_sync(optimize_in_process, example, lm, threads)
    d = (await meter.sample()).since(start)
    return OptRun(
        "in-process", threads, d.t, d.bench, d.nats, d.provider, d.requests, d.max_in_flight, baseline, optimized
    )


async def run_task(meter: Meter, client: Client, task_input: dict[str, Any]) -> OptRun:
    start = await meter.sample(reset=True)
    record = await client.run("optimize", task_input, timeout=300)
    d = (await meter.sample()).since(start)
    if record.status.value != "succeeded":
        raise RuntimeError(f"optimize task ended {record.status.value}: {record.error}")
    r = record.result
    return OptRun(
        "dspyrt", int(task_input["num_threads"]), d.t, d.bench, d.nats, d.provider, d.requests, d.max_in_flight,
        float(r["baseline_score"]), float(r["optimized_score"]), int(r["lm_calls"]), int(r.get("cached_calls", 0)),
        float(r["duration_s"]), bool(r.get("cached", False)),
    )  # fmt: skip


@dataclass
class PartA:
    data: str
    val: list[dict[str, Any]]
    runs: list[OptRun] = field(default_factory=list)
    cache_runs: dict[str, OptRun] = field(default_factory=dict)
    calls: list[CallRow] = field(default_factory=list)  # part L, measured with the same agents
    profile: str = ""


async def part_a(args: argparse.Namespace, meter: Meter, config: IntegrationConfig, url: str, key: str) -> PartA:
    """Part L (one LM call) and part A (the optimize task), with the same agents in this process."""
    example, what = load_example(args.valset_repeat)
    result = PartA(what, example["valset"])
    await anyio.to_thread.run_sync(partial(meter.provider.control, latency=args.optimize_latency))
    # The user's LM: made once and reused, as a script would.
    lm = dspy.LM(MODEL, api_base=url, api_key=key, cache=False)

    def task(threads: int, **changes: Any) -> dict[str, Any]:
        return {**example, "model": MODEL, "num_threads": threads, "no_cache": True, **changes}

    top = max(args.threads)
    agents = serving(config, [SwitcherAgent, OptimizerAgent], process_name="bench-provider", ready_timeout=30)
    async with agents as system:
        client = system.client
        print("  agents up (switcher + optimizer, this process)", flush=True)
        if "L" in args.parts:
            result.calls, result.profile = await part_l(args, meter, system.client, lm)
        if "A" not in args.parts:
            return result
        print(f"  A warm-up, N={top} ...", flush=True)
        await run_in_process(meter, example, lm, top)  # not counted: first calls, first imports, pools
        await run_task(meter, client, task(top))
        for threads in args.threads:
            print(f"  A N={threads} x{args.rounds} ...", flush=True)
            for r in range(args.rounds):  # interleaved, the order alternating, so drift hits both sides alike
                local = partial(run_in_process, meter, example, lm, threads)
                bus = partial(run_task, meter, client, task(threads))
                for side in (local, bus) if r % 2 == 0 else (bus, local):
                    result.runs.append(await side())
        print("  A with the cache ...", flush=True)
        # The no_cache runs above stored their LM answers; a new seed gives a new optimization-result key.
        result.cache_runs["first"] = await run_task(meter, client, task(top, no_cache=False, seed=1))
        result.cache_runs["new_seed"] = await run_task(meter, client, task(top, no_cache=False, seed=2))
        result.cache_runs["identical"] = await run_task(meter, client, task(top, no_cache=False, seed=2))
    return result


# ----------------------------------------------------------------------------- part L: one LM call


@dataclass
class CallRow:
    """One side and mode of part L: every call's latency over the rounds, and this process's CPU per call."""

    mode: str  # "async" (acall on the event loop) | "threads" (sync calls from worker threads, as Evaluate makes)
    side: str  # "in-process" | "switcher"
    latencies: list[float] = field(default_factory=list)  # seconds
    cpu: list[float] = field(default_factory=list)  # CPU seconds per call of this process, per round
    max_in_flight: int = 0

    def p(self, q: float) -> float:
        return 1e3 * percentile(self.latencies, q) if self.latencies else float("nan")


async def calls_round(
    meter: Meter, lm: Any, mode: str, tag: str, inflight: int, per_sender: int, profiler: cProfile.Profile | None
) -> tuple[list[float], float, int]:
    """``inflight`` senders, each making ``per_sender`` calls one after another with distinct prompts: every
    call's latency, this process's CPU per call, the most requests the provider held at once."""
    lats: list[float] = []
    lock = threading.Lock()

    def one_sync(k: int) -> None:
        for i in range(per_sender):
            t0 = time.perf_counter()
            if not lm(prompt(tag, k, i)):
                raise RuntimeError("empty answer")
            with lock:
                lats.append(time.perf_counter() - t0)

    async def one_async(k: int) -> None:
        for i in range(per_sender):
            t0 = time.perf_counter()
            if not await lm.acall(prompt(tag, k, i)):
                raise RuntimeError("empty answer")
            lats.append(time.perf_counter() - t0)

    start = await meter.sample(reset=True)
    if profiler is not None:
        profiler.enable()
    try:
        limiter = anyio.CapacityLimiter(inflight)
        async with anyio.create_task_group() as tg:
            for k in range(inflight):
                if mode == "threads":
                    tg.start_soon(partial(anyio.to_thread.run_sync, one_sync, k, limiter=limiter))
                else:
                    tg.start_soon(one_async, k)
    finally:
        if profiler is not None:
            profiler.disable()
    d = (await meter.sample()).since(start)
    return lats, d.bench / max(1, len(lats)), d.max_in_flight


async def part_l(args: argparse.Namespace, meter: Meter, client: Client, lm: Any) -> tuple[list[CallRow], str]:
    """One LM call, plain ``dspy.LM`` against the switcher path (``bus_lm``, as an agent's DSPy program calls it:
    model pinned, ``no_cache``), ``CALL_INFLIGHT`` in flight, provider at ``--optimize-latency``. Both modes, the
    sides alternating, ``args.rounds`` rounds of ``args.calls_per_sender`` calls per sender."""
    via = bus_lm(client, Routing(model=MODEL, no_cache=True))
    inflight, per_sender = CALL_INFLIGHT, args.calls_per_sender
    rows = {(m, s): CallRow(m, s) for m in ("async", "threads") for s in ("in-process", "switcher")}
    run_id = uuid.uuid4().hex[:6]
    # cProfile on the event loop thread's CPU clock: the switcher and both NATS ends run there.
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    print(
        f"  L warm-up, then {args.rounds} rounds of {inflight} x {per_sender} calls per side and mode ...", flush=True
    )
    for mode in ("async", "threads"):
        for side, target in (("in-process", lm), ("switcher", via)):
            await calls_round(meter, target, mode, f"w{run_id}{mode}{side}", inflight, 2, None)
    for r in range(args.rounds):
        for mode in ("async", "threads"):
            sides = [("in-process", lm), ("switcher", via)]
            for side, target in sides if r % 2 == 0 else sides[::-1]:
                prof = profiler if side == "switcher" and mode == "async" else None
                lats, cpu, held = await calls_round(
                    meter, target, mode, f"{run_id}-{r}-{mode}-{side}", inflight, per_sender, prof
                )
                row = rows[(mode, side)]
                row.latencies += lats
                row.cpu.append(cpu)
                row.max_in_flight = max(row.max_in_flight, held)
    text = ""
    if profiler is not None:
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(45)
        text = stream.getvalue()
    return list(rows.values()), text


def print_part_l(rows: list[CallRow], args: argparse.Namespace) -> dict[str, Any]:
    print(
        f"L  one LM call: plain dspy.LM('{MODEL}') vs the switcher path (bus_lm, model pinned, no_cache; switcher in "
        f"this process), {CALL_INFLIGHT} in flight, provider {args.optimize_latency * 1e3:.0f} ms; "
        f"{args.rounds} rounds x {CALL_INFLIGHT} senders x {args.calls_per_sender} calls per row"
    )
    header = ("id", "mode", "path", "calls", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "CPU ms per call",
              "provider max in flight")  # fmt: skip
    lines: list[list[str]] = []
    summary: dict[str, Any] = {}
    n = 0
    for mode in ("async", "threads"):
        local = next(r for r in rows if r.mode == mode and r.side == "in-process")
        bus = next(r for r in rows if r.mode == mode and r.side == "switcher")
        added50, added99 = bus.p(50) - local.p(50), bus.p(99) - local.p(99)
        summary[mode] = {"in_process_p50_ms": local.p(50), "in_process_p99_ms": local.p(99),
                         "switcher_p50_ms": bus.p(50), "switcher_p99_ms": bus.p(99),
                         "added_p50_ms": added50, "added_p99_ms": added99}  # fmt: skip
        for row in (local, bus):
            n += 1
            is_bus = row is bus
            label = "plain dspy.LM, this process" if not is_bus else "bus_lm -> switcher -> dspy.LM"
            lines.append([
                f"L{n}", "acall on the loop" if mode == "async" else "sync, worker threads", label,
                str(len(row.latencies)), f(row.p(50), ".1f"), f(row.p(99), ".1f"),
                f(added50, "+.1f") if is_bus else "-", f(added99, "+.1f") if is_bus else "-",
                f(1e3 * median(row.cpu)), str(row.max_in_flight),
            ])  # fmt: skip
    render(header, lines, left={0, 1, 2})
    for mode, s in summary.items():
        met = "met" if s["added_p50_ms"] <= ADDED_TARGET_MS else "missed"
        print(f"target, {mode}: added latency p50 {s['added_p50_ms']:+.1f} ms <= {ADDED_TARGET_MS:g} ms: {met}")
    return summary


# ----------------------------------------------------------------------------- part B: calls per second


@dataclass
class Window:
    """One measured window of one row."""

    rate: float  # calls/s
    p50_ms: float
    p99_ms: float
    calls: int
    errors: int
    bench_ms: float  # CPU per call, this process
    switcher_ms: float | None  # CPU per call, the switcher process (None: the raw rows, no switcher)
    nats_ms: float | None
    provider_ms: float
    provider_requests_per_call: float
    provider_max_in_flight: int
    machine_cores: float  # the whole machine's busy CPU / wall
    other_cores: float  # the part of it not spent by this benchmark's processes (other work on the machine)


@dataclass
class LoadRow:
    id: str
    path: str
    kind: str  # "switcher" | "raw" | "cache_off" | "cache_hits"
    latency: float  # the provider's, seconds
    peer: str | None = None  # the raw row at the same latency
    windows: list[Window] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # calls/s / the peer's, same round

    def med(self, name: str) -> float | None:
        values = [getattr(w, name) for w in self.windows]
        return None if not values or any(v is None for v in values) else median(values)


def prompt(tag: str, sender: int, i: int) -> str:
    text = TOPIC_TEXTS[(sender + i) % len(TOPIC_TEXTS)]
    return f"{INSTRUCTIONS}\n\ntext: {text} (request {tag}-{sender}-{i})\n\nAnswer with the topic only."


async def load(meter: Meter, args: argparse.Namespace, call: Callable[[int, int], Awaitable[None]]) -> Window:
    """``args.inflight`` senders loop on ``call(sender, i)``; after the warm-up, one ``args.duration`` window."""
    ends: list[tuple[float, float]] = []
    errors = 0
    stop = anyio.Event()

    async def sender(k: int) -> None:
        nonlocal errors
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                await call(k, i)
            except Exception:
                errors += 1
                await anyio.sleep(0.01)
            else:
                t1 = time.perf_counter()
                ends.append((t1, t1 - t0))
            i += 1

    async with anyio.create_task_group() as tg:
        for k in range(args.inflight):
            tg.start_soon(sender, k)
        await anyio.sleep(args.warmup)
        start = await meter.sample(reset=True)
        await anyio.sleep(args.duration)
        end = await meter.sample()
        stop.set()  # the senders finish the call they are in, then stop
    w = end.since(start)
    lats = [lat for t, lat in ends if start.t <= t <= end.t]
    n = len(lats)

    def per_call(cpu: float) -> float:
        return 1e3 * cpu / n if n else float("nan")

    switcher = meter.switcher_pid is not None
    return Window(
        rate=n / w.t, calls=n, errors=errors,
        p50_ms=1e3 * percentile(lats, 50) if lats else float("nan"),
        p99_ms=1e3 * percentile(lats, 99) if lats else float("nan"),
        bench_ms=per_call(w.bench), switcher_ms=per_call(w.switcher) if switcher else None,
        nats_ms=per_call(w.nats) if switcher else None, provider_ms=per_call(w.provider),
        provider_requests_per_call=w.requests / n if n else float("nan"), provider_max_in_flight=w.max_in_flight,
        machine_cores=w.machine / w.t, other_cores=(w.machine - w.bench - w.switcher - w.nats - w.provider) / w.t,
    )  # fmt: skip


class SwitcherProcess:
    """``python -m dspyrt.runtime.cli agent switcher`` against the benchmark's nats-server; stopped when the
    block ends."""

    def __init__(self, config: IntegrationConfig, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "switcher.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("DSPYRT_")}
        self.env = {
            **base,  # holds KEY_ENV, the provider's key
            "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
            "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
            "DSPYRT_MODELS_FILE": str(config.models_file),
            "DSPYRT_STATE_DIR": str(folder / "state"),
            "DSPYRT_AGENT_CONCURRENCY": str(SWITCHER_CONCURRENCY),
            "DSPYRT_LM_CACHE": str(config.lm_cache).lower(),
            "DSPYRT_LOG_LEVEL": "WARNING",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SwitcherProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dspyrt.runtime.cli", "agent", "switcher"],
                cwd=ROOT, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # drains, as an operator's stop does
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the switcher process is not started")
        return self.process.pid

    async def ready(self, client: Client, timeout: float = 60.0) -> None:
        """Until the process answers ``switcher.models``; its log if it exits first."""
        with anyio.fail_after(timeout):
            while True:
                if self.process is None or self.process.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the switcher process exited before it was ready:\n{tail}")
                try:
                    await client.request("switcher", "models", Empty(), ModelList, timeout=1)
                    return
                except Exception:
                    await anyio.sleep(0.2)


def plan_rows(latencies: list[float]) -> list[list[LoadRow]]:
    """The rows, grouped by provider latency (each group runs under one ``/control`` setting)."""
    groups: list[list[LoadRow]] = []
    n = 0
    for j, latency in enumerate(latencies):
        group = [
            LoadRow("", "switcher process, no_cache", "switcher", latency),
            LoadRow("", "raw: dspy.LM.acall here", "raw", latency),
        ]
        if j == 0:
            group.append(LoadRow("", "switcher process, lm_cache off", "cache_off", latency))
        if j == len(latencies) - 1:
            group.append(LoadRow("", "switcher process, cache hits", "cache_hits", latency))
        for row in group:
            n += 1
            row.id = f"B{n}"
        raw_id = group[1].id
        for row in group:
            row.peer = None if row.kind == "raw" else raw_id
        groups.append(group)
    return groups


async def part_b(
    args: argparse.Namespace, meter: Meter, configs: tuple[IntegrationConfig, IntegrationConfig], url: str, key: str
) -> list[LoadRow]:
    """``configs``: the switcher with its cache on (the default) and with it off, each on its own subject prefix."""
    provider = meter.provider
    lm = dspy.LM(MODEL, api_base=url, api_key=key, cache=False)
    run_id = uuid.uuid4().hex[:6]
    per_sender = max(1, CACHE_PROMPTS // args.inflight)  # the cache row's prompts: per_sender for each sender
    groups = plan_rows(args.latencies)
    on, off = configs

    def raw(tag: str) -> Callable[[int, int], Awaitable[None]]:
        async def call(k: int, i: int) -> None:
            answer = await lm.acall(prompt(tag, k, i))
            if not answer:
                raise RuntimeError("empty answer")

        return call

    def via(client: Client, tag: str, *, cache_hits: bool) -> Callable[[int, int], Awaitable[None]]:
        async def call(k: int, i: int) -> None:
            number = i % per_sender if cache_hits else i
            request = CompletionRequest(
                messages=[ChatMessage(role="user", content=prompt(tag, k, number))],
                model=MODEL,
                no_cache=not cache_hits,
            )
            await client.request("switcher", "complete", request, CompletionReply, timeout=30)

        return call

    async with (
        connect_client(on, servers=on.nats_urls, create_streams=True) as client,
        connect_client(off, servers=off.nats_urls, create_streams=True) as client_off,
    ):
        with (
            SwitcherProcess(on, args.workdir / "switcher") as sw,
            SwitcherProcess(off, args.workdir / "nocache") as sw_off,
        ):
            started = time.perf_counter()
            await sw.ready(client)
            await sw_off.ready(client_off)
            print(
                f"  B switcher processes {sw.pid} (cache on) and {sw_off.pid} (lm_cache off) up in "
                f"{time.perf_counter() - started:.1f} s; filling the cache row's {per_sender * args.inflight} prompts",
                flush=True,
            )
            cache_tag = f"c{run_id}"

            async def fill(k: int) -> None:
                for number in range(per_sender):
                    request = CompletionRequest(
                        messages=[ChatMessage(role="user", content=prompt(cache_tag, k, number))], model=MODEL
                    )
                    await client.request("switcher", "complete", request, CompletionReply, timeout=30)

            await anyio.to_thread.run_sync(partial(provider.control, latency=0.0))
            async with anyio.create_task_group() as tg:
                for k in range(args.inflight):
                    tg.start_soon(fill, k)
            for r in range(args.rounds):
                print(
                    f"  B round {r + 1}/{args.rounds} ({args.warmup:g} + {args.duration:g} s per row) ...", flush=True
                )
                for group in groups:
                    await anyio.to_thread.run_sync(partial(provider.control, latency=group[0].latency))
                    rates: dict[str, float] = {}
                    for row in group if r % 2 == 0 else group[::-1]:  # the order alternates between rounds
                        tag = f"{run_id}-{r}-{row.id}"
                        if row.kind == "raw":
                            meter.switcher_pid, call = None, raw(tag)
                        elif row.kind == "cache_off":
                            meter.switcher_pid, call = sw_off.pid, via(client_off, tag, cache_hits=False)
                        elif row.kind == "cache_hits":
                            meter.switcher_pid, call = sw.pid, via(client, cache_tag, cache_hits=True)
                        else:
                            meter.switcher_pid, call = sw.pid, via(client, tag, cache_hits=False)
                        window = await load(meter, args, call)
                        row.windows.append(window)
                        rates[row.id] = window.rate
                    for row in group:
                        if row.peer is not None and rates.get(row.peer):
                            row.ratios.append(rates[row.id] / rates[row.peer])
            meter.switcher_pid = None
    return [row for group in groups for row in group]


# ----------------------------------------------------------------------------- printing


def render(header: Sequence[str], lines: Sequence[Sequence[str]], left: set[int]) -> None:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def one(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(one(header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(one(line))


def f(value: float | None, spec: str = ".2f") -> str:
    if value is None or value != value:
        return "-"
    return format(value, spec)


def print_part_a(a: PartA, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """The optimize table; returns the medians and ratios per N (for the JSON)."""
    print(
        f"A  optimize: LabeledFewShot k=16 on {a.data}; dspy.Predict('text -> topic'); provider latency "
        f"{args.optimize_latency * 1e3:.0f} ms per call; median of {args.rounds} interleaved rounds"
    )
    header = ("id", "run", "N", "wall s", "min-max s", "bench CPU s", "nats CPU s", "provider CPU s",
              "provider reqs", "max in flight", "task lm_calls", "agent run s", "baseline %",
              "optimized %")  # fmt: skip
    lines: list[list[str]] = []
    summary: dict[int, dict[str, float]] = {}
    n = 0
    for threads in args.threads:
        for side in ("in-process", "dspyrt"):
            runs = [r for r in a.runs if r.side == side and r.threads == threads]
            n += 1
            label = "plain DSPy, this process" if side == "in-process" else "dspyrt optimize task, no_cache"
            walls = [r.wall for r in runs]
            lines.append([
                f"A{n}", label, str(threads), f(median(walls), ".3f"), f"{min(walls):.2f}-{max(walls):.2f}",
                f(median([r.bench_cpu for r in runs])),
                f(median([r.nats_cpu for r in runs])) if side == "dspyrt" else "-",
                f(median([r.provider_cpu for r in runs])),
                f(median([r.provider_requests for r in runs]), ".0f"),
                str(max(r.provider_max_in_flight for r in runs)),
                f(median([r.lm_calls or 0 for r in runs]), ".0f") if side == "dspyrt" else "-",
                f(median([r.agent_run or 0 for r in runs]), ".3f") if side == "dspyrt" else "-",
                f(runs[0].baseline, ".1f"), f(runs[0].optimized, ".1f"),
            ])  # fmt: skip
        local = [r for r in a.runs if r.side == "in-process" and r.threads == threads]
        bus = [r for r in a.runs if r.side == "dspyrt" and r.threads == threads]
        ratios = [b.wall / lo.wall for lo, b in zip(local, bus, strict=True)]  # same round
        calls = median([r.provider_requests for r in local])
        lm_rounds = 2 * -(-len(a.val) // threads)  # two Evaluates of ceil(val / N) rounds; compile calls no LM
        lw, bw = median([r.wall for r in local]), median([r.wall for r in bus])
        summary[threads] = {
            "in_process_wall": lw, "dspyrt_wall": bw, "ratio_of_medians": bw / lw,
            "median_round_ratio": median(ratios), "lm_calls": calls,
            "overhead_ms_per_call": 1e3 * (bw - lw) / calls * threads if calls else float("nan"),
            "overhead_ms_per_round": 1e3 * (bw - lw) / lm_rounds,
            "agent_run": median([r.agent_run or 0 for r in bus]),
        }  # fmt: skip
    render(header, lines, left={0, 1})
    print()
    for threads, s in summary.items():
        outside = s["dspyrt_wall"] - s["agent_run"]
        print(
            f"N={threads}: dspyrt / in-process wall = {s['ratio_of_medians']:.2f}x (median of the per-round ratios "
            f"{s['median_round_ratio']:.2f}x); overhead ~ {s['overhead_ms_per_call']:.1f} ms per LM call "
            f"= (dspyrt wall - in-process wall) / {s['lm_calls']:.0f} calls x {threads} in flight, "
            f"{s['overhead_ms_per_round']:.1f} ms per round of N calls (2 x ceil(val / N) rounds); of the task's wall "
            f"{s['agent_run']:.3f} s is the agent's run, {outside:.3f} s queue, artifact, result and notification"
        )
    for threads, s in summary.items():
        met = "met" if s["ratio_of_medians"] <= RATIO_TARGET else "missed"
        print(f"target, N={threads}: dspyrt / in-process wall {s['ratio_of_medians']:.2f}x <= {RATIO_TARGET:g}x: {met}")
    mismatched = {(r.baseline, r.optimized) for r in a.runs}
    if len(mismatched) > 1:
        print(f"WARNING: the runs do not all reach the same scores {sorted(mismatched)}: not the same work")
    print()
    top = max(args.threads)
    nocache = median([r.wall for r in a.runs if r.side == "dspyrt" and r.threads == top])
    nocache_reqs = median([r.provider_requests for r in a.runs if r.side == "dspyrt" and r.threads == top])
    print(f"A' the caches (dspyrt, N={top}, same provider latency)")
    header2 = ("id", "run", "wall s", "vs no_cache", "provider reqs", "task lm_calls", "cached calls", "result cached")
    lines2 = [["C1", "no_cache (median above)", f(nocache, ".3f"), "1.00x", f(nocache_reqs, ".0f"), "-", "-", "-"]]
    labels = {
        "first": "cache on, seed 1 (no_cache runs stored the answers)",
        "new_seed": "cache on, seed 2: LM response cache answers",
        "identical": "identical repeat: optimization-result cache",
    }
    for i, (key, label) in enumerate(labels.items(), start=2):
        r = a.cache_runs[key]
        lines2.append([
            f"C{i}", label, f(r.wall, ".3f"), f"{r.wall / nocache:.2f}x", str(r.provider_requests),
            str(r.lm_calls), str(r.cached_calls), "yes" if r.result_cached else "no",
        ])  # fmt: skip
    render(header2, lines2, left={0, 1})
    return summary


def print_part_b(rows: list[LoadRow], args: argparse.Namespace) -> None:
    print(
        f"B  LM calls through one switcher process, {args.inflight} in flight, distinct prompts; "
        f"{args.duration:g} s windows after {args.warmup:g} s of warm-up; median of {args.rounds} interleaved rounds"
    )
    header = ("id", "path", "provider ms", "calls/s", "min-max", "vs raw", "p50 ms", "p99 ms", "bench CPU ms",
              "switcher CPU ms", "nats CPU ms", "provider CPU ms", "provider reqs", "max in flight",
              "machine cores", "not ours", "errors")  # fmt: skip
    lines = []
    for r in rows:
        rates = [w.rate for w in r.windows]
        lines.append([
            r.id, r.path, f"{1e3 * r.latency:g}", f(r.med("rate"), ",.0f"), f"{min(rates):,.0f}-{max(rates):,.0f}",
            f"{median(r.ratios):.2f}x" if r.ratios else "-", f(r.med("p50_ms"), ".1f"), f(r.med("p99_ms"), ".1f"),
            f(r.med("bench_ms")), f(r.med("switcher_ms")), f(r.med("nats_ms")), f(r.med("provider_ms")),
            f(r.med("provider_requests_per_call")), str(max(w.provider_max_in_flight for w in r.windows)),
            f(r.med("machine_cores")), f(r.med("other_cores")), str(sum(w.errors for w in r.windows)),
        ])  # fmt: skip
    render(header, lines, left={0, 1})
    print(
        "The switchers are processes of their own (python -m dspyrt.runtime.cli agent switcher; "
        "agent_concurrency and the "
        f"model's max_concurrency {SWITCHER_CONCURRENCY}), one with the LM cache on (the default: no_cache calls skip "
        "the lookup but still store the answer) and one with DSPYRT_LM_CACHE=false; one serves each row. The "
        f"{args.inflight} senders and the raw dspy.LM calls run in this process. vs raw: calls/s / the raw row's at "
        "the same provider latency in the same round (median). CPU columns: ms per call."
    )


# ----------------------------------------------------------------------------- the run


def models_toml(url: str) -> str:
    return (
        f'[[models]]\nmodel = "{MODEL}"\napi_base = "{url}"\napi_key_env = "{KEY_ENV}"\n'
        f"max_concurrency = {SWITCHER_CONCURRENCY}\n"
    )


async def run(args: argparse.Namespace, server: EmbeddedServer, provider: DemoProviderProcess) -> dict[str, Any]:
    workdir: Path = args.workdir
    models_file = workdir / "models.toml"
    models_file.write_text(models_toml(provider.url))
    os.environ[KEY_ENV] = provider.api_key
    # Each part on its own subject prefix: part B's switcher process must be the only switcher it reaches.
    config_a = IntegrationConfig(
        nats_urls=[server.url], subject_prefix=f"bpa{uuid.uuid4().hex[:8]}", state_dir=workdir / "state-a",
        models_file=models_file, auto_validate=False, auto_optimize=False,
    )  # fmt: skip
    config_b = config_a.model_copy(update={"subject_prefix": f"bpb{uuid.uuid4().hex[:8]}"})
    config_c = config_a.model_copy(update={"subject_prefix": f"bpc{uuid.uuid4().hex[:8]}", "lm_cache": False})
    # One tracer provider for the whole process (part A's agents would set it up anyway), so part B's load
    # generator sends with tracing on whichever parts run, as an agent calling the switcher does.
    telemetry = setup_telemetry(
        workdir / "bench-state", service_name="bench-provider", instrumentations=config_a.instrumentations
    )
    meter = Meter(server.pid, provider)
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    a: PartA | None = None
    b: list[LoadRow] = []
    try:
        if args.parts & {"A", "L"}:
            a = await part_a(args, meter, config_a, provider.url, provider.api_key)
        if "B" in args.parts:
            b = await part_b(args, meter, (config_b, config_c), provider.url, provider.api_key)
    finally:
        dropped = telemetry.dropped_spans()
        telemetry.shutdown()  # the last spans are written before the work folder goes
    elapsed = time.perf_counter() - started

    print()
    if a is not None and a.calls:
        figures["call"] = {
            "inflight": CALL_INFLIGHT, "latency_s": args.optimize_latency, "summary": print_part_l(a.calls, args),
            "rows": [asdict(r) for r in a.calls],
        }  # fmt: skip
        print()
    if a is not None and a.runs:
        summary = print_part_a(a, args)
        figures["optimize"] = {
            "data": a.data, "latency_s": args.optimize_latency, "rounds": args.rounds,
            "runs": [asdict(r) for r in a.runs], "summary": {str(k): v for k, v in summary.items()},
            "cache": {k: asdict(v) for k, v in a.cache_runs.items()},
        }  # fmt: skip
        print()
    if b:
        print_part_b(b, args)
        figures["throughput"] = {
            "inflight": args.inflight, "duration_s": args.duration, "rounds": args.rounds,
            "rows": [{**asdict(r), "median": {k: r.med(k) for k in Window.__dataclass_fields__}} for r in b],
        }  # fmt: skip
        print()
    print(
        "bench CPU: this process, every thread (part A: plain DSPy, or the agents + the client; part B: the load "
        "generator, or the raw dspy.LM calls). nats / provider / switcher CPU: those processes, from /proc. "
        "provider reqs: completion requests the provider counted (B: per call). machine cores: the whole machine's "
        "busy CPU / wall (the machine has " + str(os.cpu_count()) + " cores); not ours: the part of it other "
        "processes used."
    )
    print(
        f"measured in {elapsed:.0f} s; load average {load_average()} at the end; spans this process dropped: {dropped}"
    )
    if a is not None and a.profile:
        print("\ncProfile of the switcher path, part L async rows (event loop thread CPU):\n" + a.profile)
    figures["elapsed_s"] = elapsed
    return figures


def nats_version() -> str:
    try:
        out = subprocess.run([str(nats_server_binary()), "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return "nats-server ?"
    return out.stdout.strip() or "nats-server ?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (part A: per side and N; B: per row)")
    parser.add_argument("--threads", default="4,8", help="num_threads N of both optimize sides, comma-separated")
    parser.add_argument("--valset-repeat", type=int, default=1, help="repeat the example's valset K times")
    parser.add_argument("--inflight", type=int, default=64, help="calls in flight in part B")
    parser.add_argument("--latencies", default="0,0.05", help="provider latencies of part B (seconds)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds measured per part B row and round")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds of load before each part B window")
    parser.add_argument("--parts", default="L,A,B", help="which parts to run")
    parser.add_argument(
        "--optimize-latency", type=float, default=OPTIMIZE_LATENCY, help="provider seconds per call, parts L and A"
    )
    parser.add_argument("--calls-per-sender", type=int, default=12, help="part L: calls per sender and round")
    parser.add_argument("--profile", action="store_true", help="cProfile the switcher path (part L, async rows)")
    parser.add_argument("--quick", action="store_true", help="1 round, N=8 only, 3 s windows (~1 minute)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.threads, args.duration, args.warmup = 1, "8", 3.0, 1.0
    args.threads = [int(n) for n in str(args.threads).split(",")]
    args.latencies = [float(s) for s in str(args.latencies).split(",")]
    args.parts = {p.strip().upper() for p in str(args.parts).split(",")}
    logging.getLogger("dspy").setLevel(logging.WARNING)  # Evaluate logs every score at INFO

    print(
        f"bench_provider: {platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} cores ({platform.platform()}); load average {load_average()} at start"
    )
    args.workdir = Path(tempfile.mkdtemp(prefix="bench-provider-"))
    server = EmbeddedServer(args.workdir / "jetstream", log_file=args.workdir / "nats-server.log")
    try:
        server.start()
        with run_demo_provider(latency=args.optimize_latency) as provider:
            print(
                f"versions: {versions()}; {nats_version()} (pid {server.pid}); demo provider pid "
                f"{provider.process.pid} at {provider.url}"
            )
            print(
                f"settings: optimize N={args.threads}, {args.rounds} rounds; part B {args.inflight} in flight, "
                f"provider latencies {[f'{x * 1e3:g} ms' for x in args.latencies]}, {args.duration:g} s windows; "
                f"OTEL_TRACES_SAMPLER={os.environ.get('OTEL_TRACES_SAMPLER', '(default: parentbased_always_on)')}",
                flush=True,
            )
            figures = anyio.run(run, args, server, provider)
    finally:
        server.stop()
        shutil.rmtree(args.workdir, ignore_errors=True)
    if args.json is not None:
        machine = {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()}
        figures["machine"] = machine
        figures["versions"] = versions()
        args.json.write_text(json.dumps(figures, indent=2, default=str))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
