"""Foundation benchmark: what the runtime costs on top of raw NATS, side by side, against one nats-server.

A. request/reply with N requests in flight and a small JSON payload:
   raw nats-py | runtime endpoint traced | runtime endpoint sampled off | FastStream | runtime without an SDK
B. durable task hop, end to end (publish -> pull consumer -> ack), with concurrent publishers:
   raw JetStream publish + fetch(batch) + ack | runtime submit_task + Agent ``@task`` via AgentHost (traced / off)

Every row runs in its own child process (the global tracer provider can be set only once per process) against
the same embedded nats-server; the child prints its figures as JSON and this script prints one table. Rows run
``--rounds`` times, interleaved, and the table shows medians: this machine's speed drifts between runs.

    .venv/bin/python benchmarks/bench_foundation.py                      # everything, ~1.5 minutes
    .venv/bin/python benchmarks/bench_foundation.py --rounds 1 --duration 5 --inflight 50 --tasks 5000
    .venv/bin/python benchmarks/bench_foundation.py --only rr-raw,rr-traced
    .venv/bin/python benchmarks/bench_foundation.py --profile rr-traced  # cProfile of one row's measured window
    .venv/bin/python benchmarks/bench_foundation.py --json now.json --before then.json  # beside an earlier run

This is a benchmark, not a test: nothing here asserts on timing; targets are reported as met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from _common import proc_cpu
from pydantic import BaseModel

from dspyrt.runtime.agent import Agent, TaskContext, endpoint, task

RESULT_MARK = "BENCH_RESULT "
PAYLOAD = {"text": "hello benchmark", "n": 42}


# ----------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Row:
    key: str
    id: str
    label: str
    kind: str  # "rr" or "task"
    telemetry: str  # "none" (no SDK), "traced" (SDK, sampled), "off" (SDK, always_off sampler)
    target: float | None = None  # minimum ratio to the raw baseline of its section


ROWS = [
    Row("rr-raw", "A1", "raw nats-py request/reply (baseline)", "rr", "none"),
    Row("rr-traced", "A2", "runtime endpoint, tracing on (SDK, JSONL)", "rr", "traced", 0.3),
    Row("rr-untraced", "A3", "runtime endpoint, sampler always_off", "rr", "off", 0.6),
    Row("rr-faststream", "A4", "FastStream NATS, pydantic subscriber", "rr", "none"),
    Row("rr-nosdk", "A5", "runtime endpoint, no SDK (API no-op; info)", "rr", "none"),
    Row("task-raw", "B1", "raw JetStream publish + fetch/ack (baseline)", "task", "none"),
    Row("task-traced", "B2", "runtime submit_task + @task, tracing on", "task", "traced", 0.3),
    Row("task-untraced", "B3", "runtime submit_task + @task, always_off", "task", "off", 0.3),
]
# Round trips per durable task, at most (the runtime's task rows).
RT_TARGET = 4.0
BY_KEY = {r.key: r for r in ROWS}


# ----------------------------------------------------------------------------- payload models and agents


class EchoIn(BaseModel):
    text: str
    n: int


class EchoOut(BaseModel):
    text: str
    n: int


class BenchJob(BaseModel):
    text: str
    n: int


class BenchDone(BaseModel):
    n: int


class EchoAgent(Agent):
    name = "echo"
    description = "benchmark echo endpoint"

    @endpoint("echo")
    async def echo(self, request: EchoIn) -> EchoOut:
        return EchoOut(text=request.text, n=request.n)


class TaskAgent(Agent):
    name = "bencher"
    description = "benchmark trivial task"

    @task("bench")
    async def bench(self, job: BenchJob, ctx: TaskContext) -> BenchDone:
        return BenchDone(n=job.n)


# ----------------------------------------------------------------------------- measurement helpers


class Window:
    """Wall clock and CPU (this process, all threads; the nats-server) over the measured window."""

    def __init__(self, server_pid: int, profile: bool) -> None:
        self.server_pid = server_pid
        # Thread CPU time, not wall time: with the span exporter thread holding the GIL, a wall-clock profile
        # blames whatever the event loop was doing (socket send, epoll) for the time it spent waiting.
        self.profiler = cProfile.Profile(time.thread_time) if profile else None
        self.start = self.stop = 0.0
        self.cpu = self.server_cpu = 0.0

    def open(self) -> None:
        self._cpu0, self._srv0 = time.process_time(), proc_cpu(self.server_pid)
        if self.profiler:
            self.profiler.enable()
        self.start = time.perf_counter()

    def close(self) -> None:
        self.stop = time.perf_counter()
        if self.profiler:
            self.profiler.disable()
        self.cpu = time.process_time() - self._cpu0
        self.server_cpu = proc_cpu(self.server_pid) - self._srv0

    def figures(self, ops: int) -> dict[str, Any]:
        elapsed = self.stop - self.start
        return {
            "ops": ops,
            "seconds": elapsed,
            "rate": ops / elapsed if elapsed > 0 else 0.0,
            "py_cpu_us": 1e6 * self.cpu / ops if ops else None,
            "srv_cpu_us": 1e6 * self.server_cpu / ops if ops else None,
        }

    def profile_text(self, limit: int = 35) -> str:
        if not self.profiler:
            return ""
        out = io.StringIO()
        stats = pstats.Stats(self.profiler, stream=out)
        stats.sort_stats("tottime").print_stats(limit)
        stats.sort_stats("cumulative").print_stats(limit)
        return out.getvalue()


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def drive_requests(
    call: Callable[[], Awaitable[Any]], args: argparse.Namespace, window: Window
) -> dict[str, Any]:
    """``inflight`` loops calling ``call`` back to back; figures from the window after the warm-up."""
    samples: list[tuple[float, float]] = []
    errors: Counter[str] = Counter()
    stop = False

    async def loop() -> None:
        clock = time.perf_counter
        while not stop:
            t0 = clock()
            try:
                await call()
            except Exception as exc:
                errors[type(exc).__name__] += 1
                await asyncio.sleep(0.01)  # no busy loop on a persistent failure
                continue
            samples.append((t0, clock()))

    loops = [asyncio.create_task(loop()) for _ in range(args.inflight)]
    await asyncio.sleep(args.warmup)
    window.open()
    await asyncio.sleep(args.duration)
    window.close()
    stop = True
    await asyncio.gather(*loops)
    done = sum(1 for _, t1 in samples if window.start <= t1 <= window.stop)
    lat = sorted(t1 - t0 for t0, t1 in samples if t0 >= window.start and t1 <= window.stop)
    figures = window.figures(done)
    figures.update(p50_us=1e6 * (percentile(lat, 0.50) or 0), p99_us=1e6 * (percentile(lat, 0.99) or 0))
    figures["errors"] = dict(errors)
    figures["total_ops"] = len(samples)  # warm-up included: what the span count is divided by
    figures["rt_per_op"] = {"request": 1.0}
    return figures


def _category(subject: str) -> str:
    if subject.startswith("$JS.ACK."):
        return "ack"
    if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
        return "fetch"
    if subject.startswith(("$JS.API.DIRECT.GET.", "$JS.API.STREAM.MSG.GET.")):
        return "kv get"
    if subject.startswith("$KV."):
        return "kv write"
    if ".task." in subject:
        return "task publish"
    return "other"


class WireCounter:
    """Counts what a connection publishes: with a reply inbox (someone waits: a round trip) or one-way.

    Installed as an instance attribute over ``nc.publish``; nats-py's ``request``, JetStream publish, KV
    get/update, ``fetch`` and ``ack`` all go through it. Costs one extra Python call per publish.
    """

    def __init__(self) -> None:
        self.round_trips: Counter[str] = Counter()
        self.one_way: Counter[str] = Counter()
        self.enabled = False

    def install(self, nc: Any, role: str) -> None:
        original = nc.publish

        async def publish(
            subject: str, payload: bytes = b"", reply: str = "", headers: dict[str, str] | None = None
        ) -> None:
            if self.enabled:
                (self.round_trips if reply else self.one_way)[f"{role}: {_category(subject)}"] += 1
            await original(subject, payload, reply, headers)

        nc.publish = publish

    def per_op(self, ops: int) -> tuple[dict[str, float], dict[str, float]]:
        def norm(c: Counter[str]) -> dict[str, float]:
            return {k: v / ops for k, v in sorted(c.items())} if ops else {}

        return norm(self.round_trips), norm(self.one_way)


# ----------------------------------------------------------------------------- child: request/reply rows


async def rr_raw(url: str, args: argparse.Namespace, window: Window) -> dict[str, Any]:
    import nats

    server, client = await nats.connect(url, name="bench-raw-server"), await nats.connect(url, name="bench-raw-client")
    subject = f"benchraw.{uuid.uuid4().hex[:8]}.echo"

    async def respond(msg: Any) -> None:
        await server.publish(msg.reply, msg.data)

    await server.subscribe(subject, queue="bench", cb=respond)
    await server.flush()
    payload = json.dumps(PAYLOAD, separators=(",", ":")).encode()
    try:
        return await drive_requests(lambda: client.request(subject, payload, timeout=5), args, window)
    finally:
        await client.drain()
        await server.drain()


async def rr_runtime(url: str, args: argparse.Namespace, window: Window) -> dict[str, Any]:
    import anyio

    from dspyrt.bus import Bus, TaskStore, ensure_streams
    from dspyrt.runtime.client import Client
    from dspyrt.runtime.config import IntegrationConfig
    from dspyrt.runtime.host import AgentHost

    overrides = {"agent_concurrency": args.agent_concurrency} if args.agent_concurrency else {}
    config = IntegrationConfig(state_dir=Path(args.tmp), subject_prefix=f"b{uuid.uuid4().hex[:8]}", **overrides)
    server_bus = await Bus(config.connection_options([url], name="bench-agent"), config.subjects).connect()
    client_bus = await Bus(config.connection_options([url], name="bench-client"), config.subjects).connect()
    try:
        await ensure_streams(server_bus, config.stream_layout)
        store = await TaskStore.open(server_bus)
        host = AgentHost(EchoAgent(config), server_bus, store, Client(server_bus, store, identity="echo"))
        subject = client_bus.subjects.endpoint("echo", "echo")
        request = EchoIn(**PAYLOAD)
        async with anyio.create_task_group() as tg:
            await tg.start(host.run)
            figures = await drive_requests(
                lambda: client_bus.request(subject, request, EchoOut, timeout=5), args, window
            )
            tg.cancel_scope.cancel()
        figures["agent_concurrency"] = config.agent_concurrency
        return figures
    finally:
        await client_bus.close()
        await server_bus.close()


async def rr_faststream(url: str, args: argparse.Namespace, window: Window) -> dict[str, Any]:
    from faststream.nats import NatsBroker

    subject = f"benchfs.{uuid.uuid4().hex[:8]}.echo"
    server = NatsBroker(url, logger=None)

    @server.subscriber(subject, queue="bench", max_workers=args.faststream_workers)
    async def echo(request: EchoIn) -> EchoOut:
        return EchoOut(text=request.text, n=request.n)

    client = NatsBroker(url, logger=None)
    await server.start()
    await client.connect()
    request = EchoIn(**PAYLOAD)

    async def call() -> EchoOut:
        reply = await client.request(request, subject, timeout=5)
        return EchoOut.model_validate_json(reply.body)

    try:
        figures = await drive_requests(call, args, window)
        figures["max_workers"] = args.faststream_workers
        return figures
    finally:
        await client.stop()
        await server.stop()


# ----------------------------------------------------------------------------- child: durable task rows


def _task_body(i: int) -> bytes:
    """The raw path's message: the same JSON the runtime's TaskEnvelope carries, give or take the field order."""
    envelope = {
        "id": uuid.uuid4().hex,
        "kind": "bench",
        "input": {"text": PAYLOAD["text"], "n": i},
        "submitted_by": "bench",
        "submitted_at": time.time(),
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


async def _concurrently(n: int, concurrency: int, one: Callable[[int], Awaitable[Any]]) -> None:
    """Run ``one(i)`` for i in range(n) with ``concurrency`` loops pulling from a shared counter."""
    counter = iter(range(n))

    async def loop() -> None:
        for i in counter:
            await one(i)

    await asyncio.gather(*(loop() for _ in range(min(concurrency, n))))


async def task_raw(url: str, args: argparse.Namespace, window: Window) -> dict[str, Any]:
    import nats
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js import api

    consumer_nc = await nats.connect(url, name="bench-raw-consumer")
    publisher_nc = await nats.connect(url, name="bench-raw-publisher")
    counter = WireCounter()
    counter.install(publisher_nc, "client")
    counter.install(consumer_nc, "worker")
    tag = uuid.uuid4().hex[:8]
    stream, subject = f"BENCHRAW_{tag}", f"benchraw{tag}.task.bench"
    js, pub_js = consumer_nc.jetstream(), publisher_nc.jetstream()
    await js.add_stream(
        api.StreamConfig(
            name=stream,
            subjects=[subject],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
        )
    )
    psub = await js.pull_subscribe(
        subject,
        durable="raw",
        stream=stream,
        config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=-1),
    )
    acked = 0

    async def consume(until: int) -> None:
        nonlocal acked
        while acked < until:
            try:
                msgs = await psub.fetch(args.batch, timeout=1.0)
            except NatsTimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
                acked += 1

    async def one_pass(n: int) -> None:
        target = acked + n
        consumer = asyncio.create_task(consume(target))
        await _concurrently(n, args.submitters, lambda i: pub_js.publish(subject, _task_body(i)))
        await consumer
        await consumer_nc.flush()  # the acks are fire-and-forget: make sure the server has them

    try:
        await one_pass(args.task_warmup)
        counter.enabled = True
        window.open()
        await one_pass(args.tasks)
        window.close()
        counter.enabled = False
        figures = window.figures(args.tasks)
        info = await js.stream_info(stream)
        figures["left_in_stream"] = info.state.messages
        figures["rt_per_op"], figures["oneway_per_op"] = counter.per_op(args.tasks)
        figures["batch"] = args.batch
        await js.delete_stream(stream)
        return figures
    finally:
        await publisher_nc.drain()
        await consumer_nc.drain()


async def task_runtime(url: str, args: argparse.Namespace, window: Window) -> dict[str, Any]:
    import anyio

    from dspyrt.bus import Bus, TaskStatus, TaskStore, ensure_streams
    from dspyrt.runtime.client import Client
    from dspyrt.runtime.config import IntegrationConfig
    from dspyrt.runtime.host import AgentHost

    overrides = {"agent_concurrency": args.agent_concurrency} if args.agent_concurrency else {}
    config = IntegrationConfig(state_dir=Path(args.tmp), subject_prefix=f"b{uuid.uuid4().hex[:8]}", **overrides)
    server_bus = await Bus(config.connection_options([url], name="bench-worker"), config.subjects).connect()
    client_bus = await Bus(config.connection_options([url], name="bench-client"), config.subjects).connect()
    counter = WireCounter()
    counter.install(client_bus.nc, "client")
    counter.install(server_bus.nc, "worker")
    try:
        await ensure_streams(server_bus, config.stream_layout)
        store = await TaskStore.open(server_bus)
        client = Client(client_bus, await TaskStore.open(client_bus), identity="bench")
        host = AgentHost(TaskAgent(config), server_bus, store, Client(server_bus, store, identity="bencher"))
        submitted: list[str] = []

        async def submit(i: int) -> None:
            submitted.append((await client.submit("bench", BenchJob(text=PAYLOAD["text"], n=i))).task_id)

        async with anyio.create_task_group() as tg:
            await tg.start(host.run)
            stats = host.workers[0].stats

            async def one_pass(n: int) -> None:
                target = stats.succeeded + n
                await _concurrently(n, args.submitters, submit)
                while stats.succeeded + stats.failed + stats.dead < target:
                    await asyncio.sleep(0.001)
                await server_bus.nc.flush()

            await one_pass(args.task_warmup)
            counter.enabled = True
            window.open()
            await one_pass(args.tasks)
            window.close()
            counter.enabled = False
            tg.cancel_scope.cancel()
        figures = window.figures(args.tasks)
        figures["total_ops"] = args.tasks + args.task_warmup
        figures["rt_per_op"], figures["oneway_per_op"] = counter.per_op(args.tasks)
        figures["worker_stats"] = {k: v for k, v in vars(stats).items() if k != "busy_seconds"}
        last = await store.get(submitted[-1])
        figures["last_record_status"] = last.status.value if last else None
        figures["all_succeeded"] = stats.failed == 0 and stats.dead == 0 and last is not None
        figures["all_succeeded"] &= last is not None and last.status is TaskStatus.SUCCEEDED
        figures["agent_concurrency"] = config.agent_concurrency
        return figures
    finally:
        await client_bus.close()
        await server_bus.close()


CHILD_RUNNERS: dict[str, Callable[[str, argparse.Namespace, Window], Awaitable[dict[str, Any]]]] = {
    "rr-raw": rr_raw,
    "rr-traced": rr_runtime,
    "rr-untraced": rr_runtime,
    "rr-faststream": rr_faststream,
    "rr-nosdk": rr_runtime,
    "task-raw": task_raw,
    "task-traced": task_runtime,
    "task-untraced": task_runtime,
}


def child_main(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    row = BY_KEY[args.child]
    telemetry = None
    if row.telemetry != "none":
        from dspyrt.runtime.telemetry import setup_telemetry

        telemetry = setup_telemetry(Path(args.tmp) / row.key, service_name=f"bench-{row.key}")
    window = Window(args.server_pid, args.cprofile)
    result = asyncio.run(CHILD_RUNNERS[row.key](args.url, args, window))
    if telemetry is not None:
        telemetry.flush()
        result["spans_dropped"] = telemetry.dropped_spans()
        path = Path(telemetry.span_destination)
        result["spans_exported"] = sum(1 for _ in path.open()) if path.exists() else 0
        result["sampler"] = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on (SDK default)")
    if args.cprofile:
        print(window.profile_text(), file=sys.stderr)
    print(RESULT_MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent: orchestration and the table


def child_env(row: Row) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DSPYRT_"))}
    if row.telemetry == "off":
        env["OTEL_TRACES_SAMPLER"] = "always_off"
    return env


def run_child(row: Row, url: str, server_pid: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child", row.key, "--url", url, "--server-pid", str(server_pid),
        "--tmp", str(tmp), "--duration", str(args.duration), "--warmup", str(args.warmup),
        "--inflight", str(args.inflight), "--tasks", str(args.tasks), "--task-warmup", str(args.task_warmup),
        "--submitters", str(args.submitters), "--batch", str(args.batch),
        "--agent-concurrency", str(args.agent_concurrency or 0), "--faststream-workers", str(args.faststream_workers),
    ]  # fmt: skip
    if args.profile:
        cmd.append("--cprofile")
    timeout = 120 + args.duration + args.warmup + args.tasks / 100
    try:
        proc = subprocess.run(cmd, env=child_env(row), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # subprocess.run kills the child before raising
        return {"failed": f"timed out after {timeout:.0f}s"}
    if args.profile:
        print(proc.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return dict(json.loads(line[len(RESULT_MARK) :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"failed": f"exit {proc.returncode}: " + " | ".join(tail)}


def versions(binary: Path) -> dict[str, str]:
    found = {}
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
        found["nats-server"] = out.strip().split()[-1]
    except (OSError, subprocess.SubprocessError):
        found["nats-server"] = "?"
    for dist in ("nats-py", "opentelemetry-sdk", "faststream", "pydantic"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({model}), {system}, Python {platform.python_version()}"


def fmt_rt(per_op: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in per_op.items()) or "-"


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median rate (the lower middle one for an even count), with the spread of all rounds."""
    ok = sorted((r for r in rounds if "failed" not in r), key=lambda r: float(r["rate"]))
    failures = [r["failed"] for r in rounds if "failed" in r]
    if not ok:
        return {"failed": "; ".join(failures)}
    chosen = dict(ok[(len(ok) - 1) // 2])
    chosen["rates"] = [r["rate"] for r in ok]
    chosen["failures"] = failures
    return chosen


def paired_ratio(rounds: list[dict[str, Any]], base_rounds: list[dict[str, Any]]) -> float | None:
    """Median over rounds of (this row's rate / the baseline's rate in the same round): rounds are interleaved,
    so pairing them cancels slow drifts of the machine's speed."""
    ratios = sorted(
        r["rate"] / b["rate"]
        for r, b in zip(rounds, base_rounds, strict=False)
        if "failed" not in r and "failed" not in b and b["rate"] > 0
    )
    if not ratios:
        return None
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def print_table(all_rounds: dict[str, list[dict[str, Any]]], args: argparse.Namespace, header: list[str]) -> None:
    results = {key: median_round(rounds) for key, rounds in all_rounds.items()}
    cols = ["id", "path", "rate (median)", "rounds", "x raw", "target", "p50 us", "p99 us", "py cpu us/op",
            "srv cpu us/op", "RT/op"]  # fmt: skip
    lines: list[list[str]] = []
    notes: list[str] = []
    for row in ROWS:
        if row.key not in results:
            continue
        r = results[row.key]
        if "failed" in r:
            lines.append([row.id, row.label, "FAILED", "", "", "", "", "", "", "", ""])
            notes.append(f"{row.id}: {r['failed']}")
            continue
        for failure in r["failures"]:
            notes.append(f"{row.id}: a round failed: {failure}")
        ratio = paired_ratio(all_rounds[row.key], all_rounds.get("rr-raw" if row.kind == "rr" else "task-raw", []))
        if row.target is None:
            target = "baseline" if row.key.endswith("-raw") else "-"
        elif ratio is None:
            target = f">={row.target:.1f} ?"
        else:
            target = f">={row.target:.1f} " + ("met" if ratio >= row.target else "MISSED")
        unit = "req/s" if row.kind == "rr" else "task/s"
        rts = sum(r.get("rt_per_op", {}).values())
        lines.append(
            [
                row.id,
                row.label,
                f"{r['rate']:,.0f} {unit}",
                "..".join(f"{x / 1000:.1f}k" for x in (min(r["rates"]), max(r["rates"]))),
                f"{ratio:.2f}" if ratio is not None else "?",
                target,
                f"{r['p50_us']:,.0f}" if "p50_us" in r else "-",
                f"{r['p99_us']:,.0f}" if "p99_us" in r else "-",
                f"{r['py_cpu_us']:.1f}" if r.get("py_cpu_us") is not None else "-",
                f"{r['srv_cpu_us']:.1f}" if r.get("srv_cpu_us") is not None else "-",
                f"{rts:.2f}",
            ]
        )
        if r.get("errors"):
            notes.append(f"{row.id}: errors {r['errors']}")
        if r.get("agent_concurrency"):
            notes.append(f"{row.id}: runtime agent_concurrency {r['agent_concurrency']}")
        if "max_workers" in r:
            notes.append(f"{row.id}: FastStream subscriber max_workers={r['max_workers']}")
        if "spans_exported" in r:
            per = r["spans_exported"] / max(1, r.get("total_ops") or r["ops"])
            notes.append(
                f"{row.id}: spans exported {r['spans_exported']:,} ({per:.2f} per op, warm-up included), "
                f"dropped {r['spans_dropped']}, sampler {r['sampler']}"
            )
        if row.kind == "task":
            verdict = "met" if rts <= RT_TARGET else "MISSED"
            target_note = "" if row.key.endswith("-raw") else f" (target <= {RT_TARGET:g}: {verdict})"
            notes.append(f"{row.id}: round trips/task: {fmt_rt(r['rt_per_op'])}{target_note}")
            notes.append(f"{row.id}: one-way/task:     {fmt_rt(r['oneway_per_op'])}")
            if "all_succeeded" in r and not r["all_succeeded"]:
                notes.append(f"{row.id}: NOT all tasks succeeded: {r['worker_stats']} last={r['last_record_status']}")
            if r.get("left_in_stream"):
                notes.append(f"{row.id}: {r['left_in_stream']} messages left in the stream")
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    right = {2, 3, 4, 6, 7, 8, 9, 10}

    def render(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print()
    for h in header:
        print(h)
    print(render(cols))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(render(line))
    print()
    for note in notes:
        print("  " + note)
    print(
        f"  Each row ran {args.rounds} time(s), interleaved with the others, each time in a fresh child process;\n"
        "  shown: the round with the median rate (its latency and CPU too), 'rounds' = slowest..fastest round,\n"
        "  x raw = median over rounds of (rate / the raw baseline's rate in the same round).\n"
        "  RT = a publish that waits for a reply (request, JetStream publish ack, KV get/write, fetch); acks are "
        "one-way.\n  cpu us/op: CPU of the benchmark process (client and server side in one process, all threads) "
        "and of nats-server, per op in the window."
    )


def print_before_after(before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]]) -> None:
    """Each row's figures from an earlier run (``--before``, the JSON ``--json`` wrote) beside this run's."""
    cols = ["id", "path", "x raw before", "x raw now", "py cpu us/op before", "now", "RT/op before", "now"]
    lines: list[list[str]] = []
    for row in ROWS:
        if row.key not in before or row.key not in after:
            continue
        cells = [row.id, row.label]
        figures = []
        for rounds in (before, after):
            base = rounds.get("rr-raw" if row.kind == "rr" else "task-raw", [])
            ratio = paired_ratio(rounds[row.key], base)
            median = median_round(rounds[row.key])
            figures.append((ratio, median.get("py_cpu_us"), sum(median.get("rt_per_op", {}).values())))
        cells += [f"{f[0]:.2f}" if f[0] is not None else "?" for f in figures]
        cells += [f"{f[1]:.1f}" if f[1] is not None else "-" for f in figures]
        cells += [f"{f[2]:.2f}" if row.kind == "task" else "-" for f in figures]
        lines.append(cells)
    if not lines:
        return
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    print("\nbefore (--before) and now, same machine; each 'x raw' against the raw row of its own run")
    for line in [cols, ["-" * w for w in widths], *lines]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=2.5, help="measured seconds per request/reply round (default 2.5)")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per request/reply round (default 0.5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per row, interleaved; the median is shown (default 3)")
    p.add_argument("--inflight", type=int, default=100, help="requests in flight (default 100)")
    p.add_argument("--tasks", type=int, default=2000, help="tasks per durable-task row (default 2000)")
    p.add_argument("--task-warmup", type=int, default=200, help="untimed tasks before each task row (default 200)")
    p.add_argument("--submitters", type=int, default=100, help="concurrent task publishers/submitters (default 100)")
    p.add_argument("--batch", type=int, default=100, help="raw pull consumer fetch batch (default 100)")
    p.add_argument(
        "--agent-concurrency", type=int, default=0, help="runtime agent_concurrency (default: the config default, 32)"
    )
    p.add_argument(
        "--faststream-workers",
        type=int,
        default=1,
        help="FastStream subscriber max_workers (default 1, its own default)",
    )
    p.add_argument("--only", default="", help=f"comma-separated rows: {','.join(BY_KEY)}")
    p.add_argument("--profile", default="", metavar="ROW", help="run one row under cProfile and print its stats")
    p.add_argument("--json", type=Path, help="also write the raw figures to this file")
    p.add_argument("--before", type=Path, help="a --json file of an earlier run: print its figures beside these")
    # internal: child mode
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--cprofile", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args)
        return
    from dspyrt.bus.server import EmbeddedServer, nats_server_binary

    if args.profile:
        keys, args.rounds = [args.profile], 1
    elif args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
    else:
        keys = list(BY_KEY)
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        sys.exit(f"unknown row(s) {unknown}; choose from {', '.join(BY_KEY)}")
    header = [
        f"machine:  {machine()}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions(nats_server_binary()).items()),
        f"settings: {args.rounds} rounds; {args.inflight} in flight, {args.warmup:g}s warm-up + {args.duration:g}s "
        "per request/reply round; "
        f"{args.tasks} tasks (+{args.task_warmup} warm-up) from {args.submitters} concurrent submitters, "
        f"raw fetch batch {args.batch}; payload {json.dumps(PAYLOAD)}",
    ]
    results: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-foundation-") as tmp_name:
        tmp = Path(tmp_name)
        with EmbeddedServer(tmp / "nats", log_file=tmp / "nats-server.log") as server:
            assert server.pid is not None
            header.append(
                f"server:   one nats-server (pid {server.pid}) at {server.url}, JetStream file storage in a temp dir"
            )
            for round_no in range(1, args.rounds + 1):
                for key in keys:
                    print(f"round {round_no}/{args.rounds}: {key} ...", file=sys.stderr, flush=True)
                    results[key].append(run_child(BY_KEY[key], server.url, server.pid, args, tmp))
    header.append(f"total:    {time.perf_counter() - started:.1f}s")
    print_table(results, args, header)
    if args.before:
        print_before_after(json.loads(args.before.read_text())["results"], results)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=2))


if __name__ == "__main__":
    main()
