"""Models benchmark: what the LM proxy (switcher over NATS) and the optimize task cost next to plain in-process DSPy.

L. The LM proxy hop. The same ``dspy.Predict`` calls (``text -> topic`` with 4 demos, ChatAdapter prompt) made
   (a) in-process on the offline demo engine (``dspyrt.agents.lm.demo.demo_lm`` via ``dspy.context``) and
   (b) through the switcher agent over a real nats-server (``dspyrt.agents.lm.bus_engine.bus_lm``, model pinned),
   from the event loop (``Predict.acall``: the async engine) and from worker threads (``Predict.__call__``: the sync
   engine, which hops back to the loop with ``anyio.from_thread.run``, as DSPy optimizers do). Sequential latency
   (p50/p99 per call) and throughput with ``--concurrency`` callers in flight. Repeated with the fault wrapper's fixed
   50 ms latency on the same demo engine (a stand-in for a real provider's round trip).
O. The ``optimize`` task end to end: submit examples/optimize.json (LabeledFewShot k=16, ``no_cache``, model pinned)
   and wait for the result, against the same build + Evaluate(baseline) + LabeledFewShot.compile + Evaluate(optimized)
   run in-process with DSPy directly (same num_threads), and against that plain run with only its LM over the bus
   (the hop's share, without the task machinery). Median of ``--reps`` interleaved repetitions; the task is split into
   queue pickup (submit -> RUNNING in the task bucket), the agent's run (``duration_s``), the rest of the handler and
   the result notification.
C. One proxied call piece by piece, each measured alone in the same process (p50 µs): raw NATS round trip on the
   agents' connection, pydantic/JSON both ways, the spans of one hop, the switcher's own work (its second dspy.LM
   layer, the demo engine inside it, model ordering, the lm.call event + metrics), the sync engine's thread hop.

Everything runs in this process (agents via ``dspyrt.runtime.supervisor.serve``, as ``dspyrt up`` does, tracing on with
the JSONL exporter) against one embedded nats-server. This is a benchmark, not a test: nothing asserts on timing.

    .venv/bin/python benchmarks/bench_models.py                 # ~1-2 minutes
    .venv/bin/python benchmarks/bench_models.py --quick         # ~30 s, fewer samples
    .venv/bin/python benchmarks/bench_models.py --no-latency    # skip the 50 ms rows
    .venv/bin/python benchmarks/bench_models.py --profile       # cProfile of the bus async concurrent window
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import dspy
from _common import load_average, proc_cpu, versions
from dspy import lm15

from dspyrt.agents.lm.bus_engine import Routing, bus_lm, to_completion_request, to_response
from dspyrt.agents.lm.registry import ModelRegistry, build_lm
from dspyrt.agents.metrics import MetricRegistry
from dspyrt.agents.optimizers.agent import OptimizerAgent
from dspyrt.agents.programs import build_program, parse_program_spec
from dspyrt.agents.switcher.agent import SwitcherAgent
from dspyrt.agents.switcher.models import CompletionReply, CompletionRequest
from dspyrt.bus import EmbeddedServer, tracing
from dspyrt.bus.messages import decode, encode
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.supervisor import RunningSystem
from dspyrt.runtime.supervisor import serving as supervisor_serving

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FILE = ROOT / "examples" / "optimize.json"
FAST, SLOW = "demo/fewshot", "demo/slow50ms"
SLOW_SECONDS = 0.05
MODELS_TOML = f"""
[[models]]
model = "{FAST}"
max_concurrency = 64

[[models]]
model = "{SLOW}"
max_concurrency = 64
faults = {{ latency = {{ kind = "fixed", seconds = {SLOW_SECONDS} }} }}
"""


# ----------------------------------------------------------------------------- measurement helpers


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Seq:
    """Sequential latencies (seconds)."""

    samples: list[float]

    @property
    def p50(self) -> float:
        return pct(self.samples, 0.50)

    @property
    def p99(self) -> float:
        return pct(self.samples, 0.99)


@dataclass
class Conc:
    """Throughput with N callers in flight, and CPU per call (this process, all threads; the nats-server)."""

    rate: float
    py_cpu_us: float
    srv_cpu_us: float
    errors: int = 0

    @property
    def cores(self) -> float:
        """CPU seconds per second of this process (1.0: one core busy, about what one GIL allows)."""
        return self.rate * self.py_cpu_us / 1e6


@dataclass
class Window:
    server_pid: int | None
    profiler: cProfile.Profile | None = None
    ends: list[float] = field(default_factory=list)
    errors: int = 0

    async def run(self, warmup: float, duration: float) -> Conc:
        await anyio.sleep(warmup)
        cpu0, srv0, t0 = time.process_time(), proc_cpu(self.server_pid), time.perf_counter()
        if self.profiler:
            self.profiler.enable()
        await anyio.sleep(duration)
        if self.profiler:
            self.profiler.disable()
        t1, cpu1, srv1 = time.perf_counter(), time.process_time(), proc_cpu(self.server_pid)
        done = sum(1 for t in list(self.ends) if t0 <= t <= t1)
        return Conc(
            rate=done / (t1 - t0),
            py_cpu_us=1e6 * (cpu1 - cpu0) / done if done else float("nan"),
            srv_cpu_us=1e6 * (srv1 - srv0) / done if done else float("nan"),
            errors=self.errors,
        )


TEXTS = [
    "boil the eggs and chop the parsley",
    "the goalkeeper saved two penalties",
    "the bank cut its interest rate",
    "snow and strong winds expected tonight",
    "the laptop needs a software update",
]


def make_program(example: dict[str, Any]) -> Any:
    """The example's program (``text -> topic`` with its instructions) with 4 labelled demos: a realistic prompt."""
    program = build_program(parse_program_spec(example["program"]))
    demos = [dspy.Example(**row).with_inputs("text") for row in example["trainset"][:4]]
    for _, predictor in program.named_predictors():
        predictor.demos = demos
    return program


async def seq_async(program: Any, lm: Any, n: int) -> Seq:
    samples: list[float] = []
    with dspy.context(lm=lm):
        for i in range(max(5, n // 10)):  # warm-up
            await program.acall(text=TEXTS[i % len(TEXTS)])
        for i in range(n):
            t0 = time.perf_counter()
            await program.acall(text=TEXTS[i % len(TEXTS)])
            samples.append(time.perf_counter() - t0)
    return Seq(samples)


def _seq_sync_thread(program: Any, lm: Any, n: int) -> Seq:
    samples: list[float] = []
    with dspy.context(lm=lm):
        for i in range(max(5, n // 10)):
            program(text=TEXTS[i % len(TEXTS)])
        for i in range(n):
            t0 = time.perf_counter()
            program(text=TEXTS[i % len(TEXTS)])
            samples.append(time.perf_counter() - t0)
    return Seq(samples)


async def seq_sync(program: Any, lm: Any, n: int) -> Seq:
    """Sequential calls from one worker thread (the event loop stays free, as in the optimizer agent)."""
    return await anyio.to_thread.run_sync(_seq_sync_thread, program, lm, n)


async def conc_async(program: Any, lm: Any, args: argparse.Namespace, window: Window) -> Conc:
    stop = False

    async def loop(k: int) -> None:
        with dspy.context(lm=lm):
            i = k
            while not stop:
                try:
                    await program.acall(text=TEXTS[i % len(TEXTS)])
                except Exception:
                    window.errors += 1
                    continue
                window.ends.append(time.perf_counter())
                i += 1

    async with anyio.create_task_group() as tg:
        for k in range(args.concurrency):
            tg.start_soon(loop, k)
        result = await window.run(args.warmup, args.duration)
        stop = True
    return result


async def conc_sync(program: Any, lm: Any, args: argparse.Namespace, window: Window) -> Conc:
    stop = threading.Event()

    def loop(k: int) -> None:
        with dspy.context(lm=lm):
            i = k
            while not stop.is_set():
                try:
                    program(text=TEXTS[i % len(TEXTS)])
                except Exception:
                    window.errors += 1
                    continue
                window.ends.append(time.perf_counter())
                i += 1

    limiter = anyio.CapacityLimiter(args.concurrency)
    async with anyio.create_task_group() as tg:
        for k in range(args.concurrency):
            tg.start_soon(partial(anyio.to_thread.run_sync, loop, k, limiter=limiter))
        result = await window.run(args.warmup, args.duration)
        stop.set()
    return result


# ----------------------------------------------------------------------------- the system under test


def serving(config: IntegrationConfig) -> AbstractAsyncContextManager[RunningSystem]:
    """The agents under test in this process, for the block."""
    return supervisor_serving(config, [SwitcherAgent, OptimizerAgent], process_name="bench-models", ready_timeout=20)


# ----------------------------------------------------------------------------- section O: optimize


@dataclass
class BusRun:
    wall: float  # submit -> result in hand
    pickup: float  # submit -> RUNNING written to the task bucket
    run: float  # the agent's manager.run (OptimizationResult.duration_s)
    handler: float  # RUNNING -> SUCCEEDED written
    baseline: float
    optimized: float
    lm_calls: int


@dataclass
class LocalRun:
    wall: float
    baseline: float
    optimized: float


async def optimize_over_bus(system: RunningSystem, task_input: dict[str, Any]) -> BusRun:
    client = system.client
    task_id = uuid.uuid4().hex
    marks: dict[str, float] = {}

    async def on_update(msg: Any) -> None:
        try:
            status = json.loads(msg.data)["status"]
        except (ValueError, KeyError, TypeError):
            return
        marks.setdefault(status, time.perf_counter())

    sub = await system.bus.nc.subscribe(client.store.key_subject(task_id), cb=on_update)
    await system.bus.nc.flush()
    try:
        t0 = time.perf_counter()
        await client.submit("optimize", task_input, task_id=task_id)
        record = await client.result(task_id, timeout=120)
        wall = time.perf_counter() - t0
    finally:
        await sub.unsubscribe()
    if record.status.value != "succeeded":
        raise RuntimeError(f"optimize task {task_id} ended {record.status.value}: {record.error}")
    result = record.result
    running, done = marks.get("running", t0), marks.get("succeeded", t0 + wall)
    return BusRun(
        wall=wall,
        pickup=running - t0,
        run=float(result["duration_s"]),
        handler=done - running,
        baseline=float(result["baseline_score"]),
        optimized=float(result["optimized_score"]),
        lm_calls=int(result["lm_calls"]),
    )


def optimize_in_process(example: dict[str, Any], lm: Any, num_threads: int) -> LocalRun:
    """The same work with DSPy directly: build, Evaluate baseline, LabeledFewShot(k=16).compile, Evaluate."""
    metric = MetricRegistry.installed().get(example.get("metric", "exact_match"))
    k = int(example.get("params", {}).get("k", 16))
    t0 = time.perf_counter()
    student = build_program(parse_program_spec(example["program"]))
    train = [dspy.Example(**row).with_inputs("text") for row in example["trainset"]]
    val = [dspy.Example(**row).with_inputs("text") for row in example["valset"]]
    with dspy.context(lm=lm):
        evaluate = dspy.Evaluate(devset=val, metric=metric, num_threads=num_threads, display_progress=False)
        baseline = float(evaluate(student).score)
        optimized = dspy.LabeledFewShot(k=k).compile(student, trainset=train, sample=True)
        score = float(evaluate(optimized).score)
    return LocalRun(time.perf_counter() - t0, baseline, score)


# ----------------------------------------------------------------------------- section C: components


class RecordingEngine:
    """Wraps an engine and keeps the last request, so the components use the exact wire content of a call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last: lm15.Request | None = None

    def complete(self, request: lm15.Request) -> lm15.Response:
        self.last = request
        return self.inner.complete(request)

    def stream(self, request: lm15.Request) -> Any:
        return self.inner.stream(request)

    def close(self) -> None:
        return None


def timed(fn: Callable[[], Any], n: int) -> float:
    """p50 µs of a synchronous call."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1e6 * pct(samples, 0.5)


async def atimed(fn: Callable[[], Awaitable[Any]], n: int, server_pid: int | None = None) -> tuple[float, float]:
    """p50 µs of an awaited call, and the nats-server's CPU µs per call meanwhile (0 without ``server_pid``)."""
    for _ in range(max(5, n // 10)):
        await fn()
    samples = []
    count = max(n, 2000) if server_pid else n  # /proc CPU times tick every 10 ms: enough calls to see them
    srv0 = proc_cpu(server_pid)
    for _ in range(count):
        t0 = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t0)
    await anyio.sleep(0.2)  # let the server finish persisting what was published
    return 1e6 * pct(samples, 0.5), 1e6 * (proc_cpu(server_pid) - srv0) / count


async def components(system: RunningSystem, program: Any, n: int, server_pid: int | None) -> dict[str, float]:
    from dspyrt.agents.lm.demo import DemoFewShotEngine

    engine = DemoFewShotEngine()
    recorder = RecordingEngine(engine)
    with dspy.context(lm=dspy.LM("local/recorder", engine=recorder, cache=False)):
        program(text=TEXTS[0])
    request = recorder.last
    assert request is not None
    routing = Routing(model=FAST, no_cache=True)  # C5 measures the call, not a response-cache hit
    creq = to_completion_request(request, routing)
    host = system.supervisor.hosts["switcher"]
    switcher = host.agent.switcher  # type: ignore[attr-defined]
    spec = host.agent.registry.get(FAST)  # type: ignore[attr-defined]
    reply = await switcher.complete(creq)
    reply_bytes, req_bytes = encode(reply), encode(creq)
    out: dict[str, float] = {"request_bytes": len(req_bytes), "reply_bytes": len(reply_bytes)}
    out["engine"] = timed(lambda: engine.complete(request), n)
    out["order"] = timed(lambda: switcher._order(creq), n)

    def json_both_ways() -> None:
        body = encode(to_completion_request(request, routing))  # client: build + encode
        decode(CompletionRequest, body)  # switcher: validate
        data = encode(reply)  # switcher: encode the reply
        to_response(decode(CompletionReply, data))  # client: validate + back to lm15

    out["json"] = timed(json_both_ways, n)

    subject = system.bus.subjects.endpoint("switcher", "complete")
    event_subject = system.bus.subjects.event("lm.call")

    def spans_of_one_hop() -> None:
        with tracing.send_span(subject, size=100, expects_reply=True):
            headers = tracing.inject({})
        with tracing.process_span(subject, headers, size=100, is_request=True):
            with tracing.send_span(event_subject, size=100):
                tracing.inject({})

    out["spans"] = timed(spans_of_one_hop, n)

    nc = system.bus.nc
    echo_subject = f"benchmodels.{uuid.uuid4().hex[:8]}.echo"

    async def echo(msg: Any) -> None:
        await nc.publish(msg.reply, msg.data)

    sub = await nc.subscribe(echo_subject, cb=echo)
    await nc.flush()
    try:
        out["nats_rtt"], out["nats_rtt_srv"] = await atimed(
            lambda: nc.request(echo_subject, req_bytes, timeout=5), n, server_pid
        )
    finally:
        await sub.unsubscribe()

    out["caller"], _ = await atimed(lambda: switcher.caller(spec, creq), n)
    out["on_call"], out["on_call_srv"] = await atimed(lambda: switcher.on_call(FAST, reply, None), n, server_pid)
    out["switcher_complete"], _ = await atimed(lambda: switcher.complete(creq), n)

    token = anyio.lowlevel.current_token()

    async def noop() -> None:
        return None

    def hops() -> float:
        return timed(lambda: anyio.from_thread.run(noop, token=token), n)

    out["thread_hop"] = await anyio.to_thread.run_sync(hops)
    return out


# ----------------------------------------------------------------------------- the run


@dataclass
class Row:
    id: str
    label: str
    local: float | None
    bus: float | None
    unit: str
    kind: str  # "lat" (lower is better), "rate" (higher is better), "info"


def fmt(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "-"
    if unit == "µs":
        return f"{value:,.0f} µs"
    if unit == "ms":
        return f"{value:,.1f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "calls/s":
        return f"{value:,.0f}/s"
    if unit == "%":
        return f"{value:.1f}"
    if unit == "B":
        return f"{value:,.0f} B"
    if unit == "cores":
        return f"{value:.2f} cores"
    return f"{value:g} {unit}"


def print_table(rows: list[Row]) -> None:
    header = ("id", "measurement", "in-process", "over the bus", "bus - in-proc", "bus / in-proc")
    lines: list[tuple[str, ...]] = []
    for r in rows:
        if r.kind == "section":
            lines.append(("", r.label, "", "", "", ""))
            continue
        delta = ratio = ""
        if r.local is not None and r.bus is not None and r.kind in ("lat", "rate"):
            d = r.bus - r.local
            sign = "+" if d >= 0 else "-"
            delta = sign + fmt(abs(d), r.unit) if r.kind == "lat" else ""
            ratio = f"{r.bus / r.local:.2f}x" if r.local else ""
        lines.append((r.id, r.label, fmt(r.local, r.unit), fmt(r.bus, r.unit), delta, ratio))
    cells = [line for line in lines if line[0] or not line[1]]  # section titles do not set column widths
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(header)]
    right = {2, 3, 4, 5}

    def render(cells: tuple[str, ...]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    print(render(header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        if not line[0] and line[1]:
            print(line[1])
        else:
            print(render(line))


class Table:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def section(self, label: str) -> None:
        self.rows.append(Row("", label, None, None, "", "section"))

    def add(self, id: str, label: str, local: float | None, bus: float | None, unit: str, kind: str = "info") -> None:
        self.rows.append(Row(id, label, local, bus, unit, kind))


def latency_tag(model: str) -> str:
    return "demo engine" if model == FAST else f"demo engine + fixed {SLOW_SECONDS * 1e3:.0f} ms latency"


async def measure_hop(
    table: Table, args: argparse.Namespace, server: EmbeddedServer, program: Any, lms: dict[str, dict[str, Any]]
) -> str:
    """Section L. ``lms[side][model]``, side "local" or "bus". Returns the profile text (``--profile``)."""
    profile_text = ""
    variants = [(FAST, args.calls, "µs", 1e6)]
    if not args.no_latency:
        variants.append((SLOW, args.slow_calls, "ms", 1e3))
    modes = [("async (acall)", seq_async, conc_async), ("sync (threads)", seq_sync, conc_sync)]
    n_id, inflight = 0, args.concurrency
    for model, n_calls, unit, scale in variants:
        table.section(f"L  LM proxy hop: dspy.Predict('text -> topic', 4 demos), {latency_tag(model)}")
        for mode, seq_fn, conc_fn in modes:
            print(f"  L {model} {mode} ...", flush=True)
            local, bus = lms["local"][model], lms["bus"][model]
            seq_l = await seq_fn(program, local, n_calls)
            seq_b = await seq_fn(program, bus, n_calls)
            conc_l = await conc_fn(program, local, args, Window(server.pid))
            profiler = cProfile.Profile() if args.profile and model == FAST and mode.startswith("async") else None
            conc_b = await conc_fn(program, bus, args, Window(server.pid, profiler))
            if profiler is not None:
                stream = io.StringIO()
                pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(30)
                profile_text = stream.getvalue()
            if conc_l.errors or conc_b.errors:
                print(f"    errors: in-process {conc_l.errors}, bus {conc_b.errors}", flush=True)
            n_id += 1
            i = f"L{n_id}"
            table.add(f"{i}a", f"{mode}: sequential p50 per call", seq_l.p50 * scale, seq_b.p50 * scale, unit, "lat")
            table.add(f"{i}b", f"{mode}: sequential p99 per call", seq_l.p99 * scale, seq_b.p99 * scale, unit, "lat")
            table.add(f"{i}c", f"{mode}: {inflight} in flight, throughput", conc_l.rate, conc_b.rate, "calls/s", "rate")
            label = f"{mode}: {inflight} in flight, Python CPU per call"
            table.add(f"{i}d", label, conc_l.py_cpu_us, conc_b.py_cpu_us, "µs", "lat")
            table.add(f"{i}e", f"{mode}: {inflight} in flight, Python CPU busy", conc_l.cores, conc_b.cores, "cores")
            if model == FAST:
                table.add(
                    f"{i}f", f"{mode}: {inflight} in flight, nats-server CPU per call", None, conc_b.srv_cpu_us, "µs"
                )
    return profile_text


async def measure_optimize(
    table: Table, args: argparse.Namespace, system: RunningSystem, example: dict[str, Any], lms: dict[str, Any]
) -> None:
    """Section O: the optimize task vs the same plain DSPy run, in-process and with only the LM over the bus."""
    num_threads = int(example.get("num_threads", 4))
    variants = [(FAST, args.reps)]
    if not args.no_latency:
        variants.append((SLOW, args.slow_reps))
    for n, (model, reps) in enumerate(variants, start=1):
        print(f"  O {model} x{reps} ...", flush=True)
        task_input = {**example, "model": model, "no_cache": True}
        run_local = partial(anyio.to_thread.run_sync, optimize_in_process, example, lms["local"][model], num_threads)
        # The same plain DSPy run with the bus LM: the LM hop's share, without the task machinery.
        run_hop = partial(anyio.to_thread.run_sync, optimize_in_process, example, lms["bus"][model], num_threads)
        # Warm-up, not counted: first task fetch, first use of the program's classes, ...
        await optimize_over_bus(system, task_input)
        await run_local()
        await run_hop()
        tasks: list[BusRun] = []
        locals_: list[LocalRun] = []
        hops: list[LocalRun] = []
        for _ in range(reps):  # interleaved, so drift hits every variant alike
            tasks.append(await optimize_over_bus(system, task_input))
            locals_.append(await run_local())
            hops.append(await run_hop())

        def med(values: list[float]) -> float:
            return statistics.median(values)

        local_wall = med([r.wall for r in locals_])
        i = f"O{n}"
        table.section(
            f"O  optimize task, LabeledFewShot k=16, {len(example['valset'])}-example valset, "
            f"num_threads={num_threads}, {latency_tag(model)}, median of {reps}"
        )
        table.add(
            f"{i}a",
            "end to end: plain DSPy run | task submit -> result",
            local_wall,
            med([r.wall for r in tasks]),
            "s",
            "lat",
        )
        table.add(
            f"{i}b",
            "  plain DSPy run, only its LM over the bus (no task)",
            local_wall,
            med([r.wall for r in hops]),
            "s",
            "lat",
        )
        table.add(
            f"{i}c",
            "  task: the agent's run (manager.run in a thread)",
            local_wall,
            med([r.run for r in tasks]),
            "s",
            "lat",
        )
        table.add(
            f"{i}d", "  task: queue pickup (submit -> RUNNING in task KV)", None, med([r.pickup for r in tasks]), "s"
        )
        table.add(
            f"{i}e",
            "  task: rest of handler (artifact, cache, events)",
            None,
            med([r.handler - r.run for r in tasks]),
            "s",
        )
        notify = med([r.wall - r.pickup - r.handler for r in tasks])
        table.add(f"{i}f", "  task: result notification (SUCCEEDED -> client)", None, notify, "s")
        table.add(f"{i}g", "baseline score (the two sides must match)", locals_[0].baseline, tasks[0].baseline, "%")
        table.add(f"{i}h", "optimized score (the two sides must match)", locals_[0].optimized, tasks[0].optimized, "%")
        table.add(f"{i}i", "LM calls per run (bus: the run's usage meter)", None, tasks[0].lm_calls, "calls")


def add_components(table: Table, comp: dict[str, float]) -> None:
    table.section("C  one proxied call, piece by piece, each measured alone (p50 µs per call)")
    table.add("C1", "raw NATS request/reply on the agents' connection", None, comp["nats_rtt"], "µs")
    table.add("C2", "  nats-server CPU per raw request/reply", None, comp["nats_rtt_srv"], "µs")
    table.add("C3", "pydantic+JSON: CompletionRequest/Reply both ways", None, comp["json"], "µs")
    table.add("C4", "spans: send + process + lm.call event send", None, comp["spans"], "µs")
    table.add("C5", "switcher.complete() (C6 + C8 + C9 + limits, figures)", None, comp["switcher_complete"], "µs")
    table.add("C6", "  switcher's own dspy.LM.aforward on the demo engine", None, comp["caller"], "µs")
    table.add("C7", "    of which the demo engine's complete() (both sides)", comp["engine"], comp["engine"], "µs")
    table.add("C8", "  _order(): model order with fallback (rank() per call)", None, comp["order"], "µs")
    table.add("C9", "  on_call: lm.call event publish + 4 metric records", None, comp["on_call"], "µs")
    table.add("C10", "    nats-server CPU per lm.call event (stream write)", None, comp["on_call_srv"], "µs")
    table.add("C11", "sync engine only: anyio.from_thread.run hop", None, comp["thread_hop"], "µs")
    table.add(
        "C12", "request (in-process column) / reply size on the wire", comp["request_bytes"], comp["reply_bytes"], "B"
    )


async def run(args: argparse.Namespace, server: EmbeddedServer, workdir: Path) -> None:
    example = json.loads(EXAMPLE_FILE.read_text())["input"]
    models_file = workdir / "models.toml"
    models_file.write_text(MODELS_TOML)
    config = IntegrationConfig(
        nats_urls=[server.url],
        subject_prefix=f"bm{uuid.uuid4().hex[:8]}",
        state_dir=workdir / "state",
        models_file=models_file,
    )
    registry = ModelRegistry.from_toml(models_file)
    program = make_program(example)
    table = Table()
    t_start = time.perf_counter()
    async with serving(config) as system:
        print(f"agents up (switcher + optimizer, this process); spans -> {system.telemetry.span_destination}")
        lms = {
            # The same specs the switcher builds its LMs from: same engine, same fault wrapper.
            "local": {name: build_lm(registry.get(name)) for name in (FAST, SLOW)},
            # no_cache: the switcher's response cache would answer every repeat of the 5 texts (the in-process LM
            # has no cache), so the bus side would skip the engine and its 50 ms latency; the answer is still stored.
            "bus": {name: bus_lm(system.client, Routing(model=name, no_cache=True)) for name in (FAST, SLOW)},
        }
        profile_text = await measure_hop(table, args, server, program, lms)
        await measure_optimize(table, args, system, example, lms)
        print("  C components ...", flush=True)
        add_components(table, await components(system, program, args.component_calls, server.pid))
    elapsed = time.perf_counter() - t_start

    print()
    print_table(table.rows)
    print()
    print("Ratios are bus / in-process: latency and CPU rows >1x cost more over the bus; throughput <1x is slower.")
    print(f"measured in {elapsed:.0f} s; load average {load_average()} at the end (other processes share the cores)")
    mismatched = [r.id for r in table.rows if r.label.endswith("must match)") and r.local != r.bus]
    if mismatched:
        print(f"WARNING: scores differ between in-process and bus runs ({', '.join(mismatched)}): not the same work")
    if profile_text:
        print("\ncProfile of the bus async concurrent window (event loop thread, tottime):\n" + profile_text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500, help="sequential calls per demo-engine row")
    parser.add_argument("--slow-calls", type=int, default=40, help="sequential calls per 50 ms row")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight in the throughput rows")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per throughput row")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before each throughput window")
    parser.add_argument("--reps", type=int, default=7, help="optimize repetitions (demo engine)")
    parser.add_argument("--slow-reps", type=int, default=5, help="optimize repetitions (50 ms latency)")
    parser.add_argument("--component-calls", type=int, default=500)
    parser.add_argument("--no-latency", action="store_true", help="skip the 50 ms latency rows")
    parser.add_argument("--quick", action="store_true", help="fewer samples (~30 s)")
    parser.add_argument("--profile", action="store_true", help="cProfile the bus async concurrent window")
    args = parser.parse_args()
    logging.getLogger("dspy").setLevel(logging.WARNING)  # Evaluate logs every score at INFO
    if args.quick:
        args.calls, args.slow_calls, args.duration, args.reps, args.slow_reps = 200, 20, 1.5, 3, 2
        args.component_calls = 200

    print(
        f"bench_models: {platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} cores ({platform.platform()}); load average {load_average()} at start"
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-models-"))
    server = EmbeddedServer(workdir / "jetstream", log_file=workdir / "nats-server.log")
    try:
        server.start()
        nats_version = "?"
        try:
            import subprocess

            from dspyrt.bus.server import nats_server_binary

            nats_version = subprocess.run(
                [str(nats_server_binary()), "--version"], capture_output=True, text=True, check=False
            ).stdout.strip()
        except Exception:
            pass
        print(f"versions: {versions()}; {nats_version} (pid {server.pid}, {server.url})")
        print(
            f"settings: {args.concurrency} in flight, {args.duration:g} s windows, {args.calls}/{args.slow_calls} "
            f"sequential calls, {args.reps}/{args.slow_reps} optimize reps; OTEL_TRACES_SAMPLER="
            f"{os.environ.get('OTEL_TRACES_SAMPLER', '(default: parentbased_always_on)')}",
            flush=True,
        )
        anyio.run(run, args, server, workdir)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
