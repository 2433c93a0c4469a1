"""Loop benchmark: distributed evaluation on the bus next to ``dspy.Evaluate`` in one process.

The work: 400 topic examples (examples/optimize.json's valset, each text in 20 wordings), scored with
``exact_match`` by the example's ``text -> topic`` program carrying a LabeledFewShot(k=16) state inline (as in the
evaluator-kill test of tests/test_loop.py), on the demo model behind the fault wrapper's fixed 50 ms latency per LM
call (a stand-in for a provider's round trip).

E. ``dspy.Evaluate(devset, metric, num_threads=N)`` in this process, the LM being
   ``dspyrt.agents.lm.demo.demo_lm(faults=FaultProfile(latency=fixed 50 ms))``: N=8 (the reference), and N equal to the
   total LM concurrency of each distributed row.
D. One ``evaluate`` task submitted to ``loop-evaluate`` (hosted in this process by ``dspyrt.runtime.supervisor.serve``),
   which splits the devset into ``evaluate-shard`` tasks scored by 1, 2 and 4 ``evaluator`` processes
   (``python -m dspyrt.runtime.cli agent evaluator``: 2 shards at once per process, ``num_threads`` threads per shard);
   every LM call goes over NATS to ``switcher`` process(es) (``python -m dspyrt.runtime.cli agent switcher``) serving
   the same demo model with the same 50 ms latency from a models TOML. Total LM concurrency is processes x 2 x
   num_threads. The 4-process row is run with 1 and then 2 switcher processes.
R. The same work the way a DSPy user parallelises it with Ray (the ``bench`` extra): the devset split into the
   same shards, 1, 2 and 4 Ray actors (one worker process each) each running ``dspy.Evaluate(num_threads)`` on 2
   shards at once with the E rows' LM (built per shard exactly as the E rows build it), the driver handing the next
   shard to whichever actor frees a slot and aggregating the per-example scores. Why 2 shards x num_threads rather
   than one ``Evaluate(num_threads=2 x num_threads)`` per actor on its share: it is the D rows' unit of work
   exactly (the same shards, LM calls in flight per process, rounds of LM calls, program load and ``Evaluate``
   per shard, pull-based hand-out), so the two rows differ only in what carries the shards and the LM calls.
   Ray is started once (``ray.init``, no dashboard, workers' logs kept out of the driver, usage stats off) and
   its actors are up before any timing, like the agent processes; it is shut down at the end.

Defaults: shard_size=50 and num_threads=10, so the 400 examples make 8 shards, which is exactly the 8 shard slots
of 4 evaluator processes (one wave), and each shard's 50 examples are 5 full rounds of 10 LM calls (no part-empty
round). Total LM concurrency is then 20, 40 and 80 for 1, 2 and 4 processes, and the equal-concurrency baselines
are dspy.Evaluate(num_threads=20/40/80). The switcher processes get agent_concurrency and the model's
max_concurrency of 256, so neither limit (defaults 32 and 4) caps the calls in flight.

Each row is the median of ``--reps`` repetitions (after an uncounted warm-up); the in-process and distributed runs
are interleaved so drift hits them alike. Every run's score and per-example scores are checked against
``dspy.Evaluate``'s. CPU seconds come from /proc (each process; the whole machine from /proc/stat, so CPU spent by
processes that are not ours shows too). A row's CPU is its own processes': this process for E; evaluators,
switchers, nats-server and this process for D; the actors, Ray's own processes (raylet, GCS, agents, idle
workers) and this process (the driver) for R. The second table gives each row's floors (LM latency alone; CPU over the
usable cores) and splits the distributed wall time using the task records' KV updates (evaluate task and shards).

    .venv/bin/python benchmarks/bench_loop.py            # ~4 minutes
    .venv/bin/python benchmarks/bench_loop.py --quick    # ~1.5 minutes, 1 repetition
    .venv/bin/python benchmarks/bench_loop.py --no-ray   # without the R rows
    OTEL_TRACES_SAMPLER=always_off .venv/bin/python benchmarks/bench_loop.py   # without tracing (all processes)

This is a benchmark, not a test: nothing asserts on timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import dspy
from _common import load_average, machine_busy, proc_cpu, versions

from dspyrt.agents.lm.demo import demo_lm
from dspyrt.agents.lm.faults import FaultProfile, FixedLatency
from dspyrt.agents.loop.evaluate import EvaluateAgent
from dspyrt.agents.metrics import MetricRegistry
from dspyrt.agents.programs import build_program, dump_program_state, load_program_state, parse_program_spec
from dspyrt.bus import EmbeddedServer
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.supervisor import RunningSystem
from dspyrt.runtime.supervisor import serving as supervisor_serving
from dspyrt.runtime.system import collect_status

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FILE = ROOT / "examples" / "optimize.json"
MODEL = "demo/slow50ms"
# Neutral wordings that vary every valset text into 20 examples (the demo model answers by word overlap).
WORDINGS = [
    "",
    "today",
    "this week",
    "reports say",
    "according to the news",
    "again",
    "last night",
    "this morning",
    "in the city",
    "once more",
    "on monday",
    "as expected",
    "said a spokesperson",
    "in the north",
    "for the second time",
    "late on friday",
    "early this year",
    "we heard",
    "in our town",
    "at last",
]


# ----------------------------------------------------------------------------- data and program


def make_devset(valset: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` rows: each valset text in each wording, in turn (deterministic)."""
    rows = []
    for i in range(n):
        base = valset[i % len(valset)]
        wording = WORDINGS[(i // len(valset)) % len(WORDINGS)]
        text = f"{base['text']} {wording}".strip() if wording else base["text"]
        rows.append({"text": text, "topic": base["topic"]})
    return rows


def trained_state(example: dict[str, Any]) -> dict[str, Any]:
    """The program's state after LabeledFewShot(k=16) on the example's trainset (no LM calls)."""
    spec = parse_program_spec(example["program"])
    train = [dspy.Example(**r).with_inputs("text") for r in example["trainset"]]
    return dump_program_state(dspy.LabeledFewShot(k=16).compile(build_program(spec), trainset=train))


# ----------------------------------------------------------------------------- CPU accounting


@dataclass
class Cpu:
    """CPU seconds during one run, by role."""

    evaluators: float = 0.0
    switchers: float = 0.0
    nats: float = 0.0
    actors: float = 0.0  # Ray actors (R rows)
    ray: float = 0.0  # Ray's own processes: raylet, gcs_server, its agents, idle workers
    bench: float = 0.0  # this process: dspy.Evaluate (E), loop-evaluate + client (D), the Ray driver (R)
    machine: float = 0.0

    @property
    def ours(self) -> float:
        """Every process this benchmark started, busy with the run or idle beside it."""
        return self.evaluators + self.switchers + self.nats + self.actors + self.ray + self.bench


class CpuMeter:
    def __init__(self, fleet: Fleet, server_pid: int | None) -> None:
        self.fleet = fleet
        self.server_pid = server_pid
        self.cluster: RayCluster | None = None

    def sample(self) -> Cpu:
        cluster = self.cluster
        return Cpu(
            evaluators=sum(proc_cpu(p) for p in self.fleet.pids("evaluator")),
            switchers=sum(proc_cpu(p) for p in self.fleet.pids("switcher")),
            nats=proc_cpu(self.server_pid),
            actors=sum(proc_cpu(p) for p in cluster.actor_pids) if cluster else 0.0,
            ray=sum(proc_cpu(p) for p in cluster.daemon_pids) if cluster else 0.0,
            bench=time.process_time(),
            machine=machine_busy(),
        )

    @staticmethod
    def delta(a: Cpu, b: Cpu) -> Cpu:
        return Cpu(
            b.evaluators - a.evaluators, b.switchers - a.switchers, b.nats - a.nats, b.actors - a.actors,
            b.ray - a.ray, b.bench - a.bench, b.machine - a.machine,
        )  # fmt: skip


def descendants(root: int, skip: set[int]) -> list[int]:
    """Processes under ``root`` (from /proc), not entering ``skip``'s subtrees."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in skip:
                found.append(child)
                stack.append(child)
    return found


# ----------------------------------------------------------------------------- agent processes


class Fleet:
    """``python -m dspyrt.runtime.cli agent NAME`` processes, as an operator runs them; every one is stopped at
    the end."""

    def __init__(self, config: IntegrationConfig, workdir: Path) -> None:
        self.workdir = workdir
        base = {k: v for k, v in os.environ.items() if not k.startswith("DSPYRT_")}
        self.env = {
            **base,
            "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
            "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
            "DSPYRT_MODELS_FILE": str(config.models_file),
            "DSPYRT_LOG_LEVEL": "WARNING",
        }
        self.processes: dict[str, list[subprocess.Popen[bytes]]] = {}

    def start(self, name: str, **settings: object) -> subprocess.Popen[bytes]:
        number = len(self.processes.get(name, []))
        folder = self.workdir / f"{name}-{number}"
        folder.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "DSPYRT_STATE_DIR": str(folder / "state")}
        env.update({f"DSPYRT_{k.upper()}": str(v) for k, v in settings.items()})
        with open(folder / "agent.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "dspyrt.runtime.cli", "agent", name], cwd=ROOT, env=env, stdout=log, stderr=log
            )
        self.processes.setdefault(name, []).append(process)
        return process

    def pids(self, name: str) -> list[int]:
        return [p.pid for p in self.processes.get(name, []) if p.poll() is None]

    def check(self) -> None:
        for name, processes in self.processes.items():
            for number, p in enumerate(processes):
                if p.poll() is not None:
                    log = (self.workdir / f"{name}-{number}" / "agent.log").read_text(errors="replace")
                    raise RuntimeError(f"{name} process {p.pid} exited with {p.returncode}:\n{log[-3000:]}")

    def stop_all(self) -> None:
        everyone = [p for ps in self.processes.values() for p in ps]
        for p in everyone:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # drain, as an operator's stop would
        for p in everyone:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


async def wait_instances(system: RunningSystem, fleet: Fleet, name: str, count: int, timeout: float = 60.0) -> None:
    """Until ``count`` instances of agent ``name`` answer ``$SRV.STATS``."""
    with anyio.fail_after(timeout):
        while True:
            fleet.check()
            status = await collect_status(system.bus, system.config, window=0.3)
            if sum(len(a.instances) for a in status.agents if a.name == name) >= count:
                return
            await anyio.sleep(0.2)


def serving(config: IntegrationConfig) -> AbstractAsyncContextManager[RunningSystem]:
    """The agents under test in this process, for the block."""
    return supervisor_serving(config, [EvaluateAgent], process_name="bench-loop", ready_timeout=30)


# ----------------------------------------------------------------------------- Ray

RAY_MISSING = "not installed: pip install -e '.[bench]'"


def import_ray() -> Any | None:
    """The ``ray`` module, or None when the ``bench`` extra is not installed (the R rows then say so)."""
    try:
        import ray
    except ImportError:
        return None
    return ray


def shard_evaluator(ray: Any) -> Any:
    """The Ray actor class: what a DSPy user writes to score devset shards in worker processes.

    Defined in a function so that this script runs without Ray; Ray pickles the class by value, so it uses
    only installed modules (not ``_common``, which the workers cannot import).
    """

    class ShardEvaluator:
        def __init__(self) -> None:
            logging.getLogger("dspy").setLevel(logging.WARNING)  # as in this process and the evaluator agents

        def pid(self) -> int:
            return os.getpid()

        def evaluate(
            self, spec: dict[str, Any], state: dict[str, Any], rows: list[dict[str, Any]], num_threads: int,
            latency: float,
        ) -> tuple[list[float], float, float]:  # fmt: skip
            """Per-example scores of one shard, and when it started and ended (CLOCK_MONOTONIC, shared by the
            processes of one machine)."""
            start = time.perf_counter()
            program = load_program_state(parse_program_spec(spec), state)
            devset = [dspy.Example(**r).with_inputs("text") for r in rows]
            metric = MetricRegistry.installed().get("exact_match")
            lm = demo_lm(faults=FaultProfile(latency=FixedLatency(seconds=latency)))  # the E rows' LM
            with dspy.context(lm=lm):
                evaluate = dspy.Evaluate(devset=devset, metric=metric, num_threads=num_threads, display_progress=False)
                result = evaluate(program)
            return [float(score) for _, _, score in result.results], start, time.perf_counter()

    # One worker process per actor; 2 shards at once, as an evaluator agent process runs them.
    return ray.remote(num_cpus=1, max_concurrency=2)(ShardEvaluator)


class RayCluster:
    """A local Ray instance and its actors; every call blocks (run it off the event loop)."""

    def __init__(self, ray: Any, workdir: Path, cpus: int) -> None:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # offline: no usage report at start-up
        self.ray = ray
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,  # workers' output stays in the session's log files
            logging_level=logging.ERROR,  # the driver's start-up notices (token auth, object store) are noise here
            object_store_memory=100 * 1024 * 1024,  # a few KB per shard; the default would claim 30% of RAM
            _temp_dir=str(workdir / "ray"),  # removed with the workdir
        )
        self.actor_class = shard_evaluator(ray)
        self.actors: list[Any] = []
        self.actor_pids: list[int] = []
        self.daemon_pids: list[int] = []
        self.others: set[int] = set()

    def grow(self, count: int, others: set[int]) -> None:
        """Until ``count`` actors are up; then which processes are Ray's own (``others``: not Ray's)."""
        while len(self.actors) < count:
            self.actors.append(self.actor_class.remote())
        self.actor_pids = self.ray.get([a.pid.remote() for a in self.actors])
        self.others = others
        self.refresh()

    def refresh(self) -> None:
        """Ray's processes under this one (raylet, gcs_server, agents, idle workers), actors excepted."""
        self.daemon_pids = [p for p in descendants(os.getpid(), self.others) if p not in self.actor_pids]

    def evaluate(self, job: dict[str, Any], shard_size: int, latency: float) -> Run:
        """The devset in shards over the actors, 2 in flight per actor, the next to whichever frees a slot."""
        ray = self.ray
        rows, spec, state = job["devset"], job["program"]["spec"], job["program"]["state"]
        pending = [(offset, rows[offset : offset + shard_size]) for offset in range(0, len(rows), shard_size)]
        pending.reverse()
        in_flight: dict[Any, tuple[int, int, float]] = {}  # ref -> (actor, offset, sent)

        def send(actor: int) -> None:
            offset, part = pending.pop()
            ref = self.actors[actor].evaluate.remote(spec, state, part, job["num_threads"], latency)
            in_flight[ref] = (actor, offset, time.perf_counter())

        t0 = time.perf_counter()
        for _ in range(2):
            for actor in range(len(self.actors)):
                if pending:
                    send(actor)
        by_offset: dict[int, list[float]] = {}
        waits, runs, ends, per_actor = [], [], [], [0] * len(self.actors)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                actor, offset, sent = in_flight.pop(ref)
                scores, start, end = ray.get(ref)
                by_offset[offset] = scores
                waits.append(start - sent)
                runs.append(end - start)
                ends.append(end - t0)
                per_actor[actor] += 1
                if pending:
                    send(actor)
        scores = [score for offset in sorted(by_offset) for score in by_offset[offset]]
        score = round(100 * sum(scores) / len(scores), 2)  # as dspy.Evaluate computes it
        wall = time.perf_counter() - t0
        return Run(
            wall=wall,
            cpu=Cpu(),
            score=score,
            scores=scores,
            marks={"last shard done": max(ends), "result in hand": wall},
            shard_runs=runs,
            shard_waits=waits,
            per_worker=sorted(per_actor, reverse=True),
        )

    def shutdown(self) -> None:
        self.ray.shutdown()


async def run_ray(cluster: RayCluster, meter: CpuMeter, job: dict[str, Any], args: argparse.Namespace) -> Run:
    cluster.refresh()  # Ray may have started or ended an idle worker since
    before = meter.sample()
    run = await anyio.to_thread.run_sync(cluster.evaluate, job, args.shard_size, args.latency)
    run.cpu = meter.delta(before, meter.sample())
    return run


# ----------------------------------------------------------------------------- one run of each kind


@dataclass
class Run:
    wall: float
    cpu: Cpu
    score: float
    scores: list[float]
    # Distributed runs only: where the time went (seconds from submit) and how the shards spread.
    marks: dict[str, float] = field(default_factory=dict)
    shard_runs: list[float] = field(default_factory=list)
    shard_waits: list[float] = field(default_factory=list)
    per_worker: list[int] = field(default_factory=list)
    example_p50_ms: float = 0.0
    lm_calls: int = 0


def evaluate_in_process(
    spec: dict[str, Any], state: dict[str, Any], rows: list[dict[str, Any]], num_threads: int, latency: float
) -> tuple[float, float, list[float]]:
    """``dspy.Evaluate`` on the same program (spec + state) and data, the demo LM with the same fixed latency."""
    program = load_program_state(parse_program_spec(spec), state)
    devset = [dspy.Example(**r).with_inputs("text") for r in rows]
    metric = MetricRegistry.installed().get("exact_match")
    lm = demo_lm(faults=FaultProfile(latency=FixedLatency(seconds=latency)))
    t0 = time.perf_counter()
    with dspy.context(lm=lm):
        result = dspy.Evaluate(devset=devset, metric=metric, num_threads=num_threads, display_progress=False)(program)
    wall = time.perf_counter() - t0
    return wall, float(result.score), [float(score) for _, _, score in result.results]


async def run_local(
    meter: CpuMeter, job: dict[str, Any], rows: list[dict[str, Any]], num_threads: int, latency: float
) -> Run:
    before = meter.sample()
    wall, score, scores = await anyio.to_thread.run_sync(
        evaluate_in_process, job["program"]["spec"], job["program"]["state"], rows, num_threads, latency
    )
    return Run(wall=wall, cpu=meter.delta(before, meter.sample()), score=score, scores=scores)


_STATUS = re.compile(rb'"status":"(\w+)"')
_WORKER = re.compile(rb'"worker":"([^"]*)"')


async def run_distributed(system: RunningSystem, meter: CpuMeter, job: dict[str, Any]) -> Run:
    """Submit one ``evaluate`` task and wait for its result; KV updates of it and its shards time the phases."""
    client = system.client
    task_id = uuid.uuid4().hex
    updates: list[tuple[float, str, str, str]] = []  # (time, key, status, worker)

    async def on_update(msg: Any) -> None:
        key = msg.subject.rsplit(".", 1)[1]
        if key.startswith(task_id):
            head = msg.data[:400]
            status, worker = _STATUS.search(head), _WORKER.search(head)
            updates.append(
                (
                    time.perf_counter(),
                    key,
                    status.group(1).decode() if status else "?",
                    worker.group(1).decode() if worker else "",
                )
            )

    sub = await system.bus.nc.subscribe(f"$KV.{client.store.bucket}.*.*", cb=on_update)  # <kind>.<task id>
    await system.bus.nc.flush()
    try:
        before = meter.sample()
        t0 = time.perf_counter()
        await client.submit("evaluate", job, task_id=task_id)
        record = await client.result(task_id, timeout=300)
        wall = time.perf_counter() - t0
        cpu = meter.delta(before, meter.sample())
        await anyio.sleep(0.05)  # the last KV notifications
    finally:
        await sub.unsubscribe()
    if record.status.value != "succeeded":
        raise RuntimeError(f"evaluate task {task_id} ended {record.status.value}: {record.error}")
    result = record.result

    first: dict[tuple[str, str], float] = {}
    workers: dict[str, str] = {}
    for when, key, status, worker in updates:
        first.setdefault((key, status), when - t0)
        if status == "running" and worker:
            workers.setdefault(key, worker)
    shard_keys = sorted({k for k, _ in first if k != task_id})
    runs = [first[(k, "succeeded")] - first[(k, "running")] for k in shard_keys if (k, "running") in first]
    waits = [first[(k, "running")] - first[(k, "pending")] for k in shard_keys if (k, "pending") in first]
    marks = {
        "coordinator running": first.get((task_id, "running"), float("nan")),
        "first shard pending": min((first[(k, "pending")] for k in shard_keys if (k, "pending") in first), default=0),
        "last shard pending": max((first[(k, "pending")] for k in shard_keys if (k, "pending") in first), default=0),
        "first shard running": min((first[(k, "running")] for k in shard_keys if (k, "running") in first), default=0),
        "last shard done": max((first[(k, "succeeded")] for k in shard_keys if (k, "succeeded") in first), default=0),
        "coordinator done": first.get((task_id, "succeeded"), float("nan")),
        "result in hand": wall,
    }
    per_worker: dict[str, int] = {}
    for key, worker in workers.items():
        if key != task_id:  # the evaluate task's own record names the coordinator
            per_worker[worker] = per_worker.get(worker, 0) + 1
    return Run(
        wall=wall,
        cpu=cpu,
        score=float(result["score"]),
        scores=[float(r["score"]) for r in result["results"]],
        marks=marks,
        shard_runs=runs,
        shard_waits=waits,
        per_worker=sorted(per_worker.values(), reverse=True),
        example_p50_ms=float(result["latency_p50_ms"]),
        lm_calls=int(result["lm_calls"]),
    )


# ----------------------------------------------------------------------------- rows and the table


@dataclass
class Row:
    id: str
    label: str
    concurrency: int
    runs: list[Run]
    reference: Row | None = None  # dspy.Evaluate(num_threads=8)
    equal: Row | None = None  # dspy.Evaluate at the same total concurrency
    kind: str = "E"  # E: dspy.Evaluate in this process, D: over the bus, R: Ray actors
    processes: int = 1  # evaluator processes (D) or Ray actors (R)
    note: str = ""  # why a row has no runs

    @property
    def distributed(self) -> bool:
        return self.kind == "D"

    @property
    def wall(self) -> float:
        return statistics.median(r.wall for r in self.runs)

    def cpu(self, attr: str) -> float:
        return float(statistics.median(getattr(r.cpu, attr) for r in self.runs))

    def own_cpu(self, cpu: Cpu) -> float:
        """The CPU of this row's processes (idle processes of the other kinds are left out)."""
        if self.kind == "D":
            return cpu.evaluators + cpu.switchers + cpu.nats + cpu.bench
        if self.kind == "R":
            return cpu.actors + cpu.ray + cpu.bench
        return cpu.bench

    @property
    def cpu_total(self) -> float:
        return statistics.median(self.own_cpu(r.cpu) for r in self.runs)

    @property
    def machine_cores(self) -> float:
        return statistics.median(r.cpu.machine / r.wall for r in self.runs)

    @property
    def other_cores(self) -> float:
        """CPU of processes that are not ours (other work on the machine) per second of wall time."""
        return statistics.median(max(0.0, r.cpu.machine - r.cpu.ours) / r.wall for r in self.runs)


def render(header: tuple[str, ...], lines: Sequence[tuple[str, ...]], left: set[int]) -> None:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def one(cells: tuple[str, ...]) -> str:
        padded = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    print(one(header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(one(line))


def print_main(rows: list[Row], examples: int) -> None:
    header = (
        "id", "run", "LM in flight", "wall s (median)", "min-max", "x faster than E8", "/ Evaluate same conc.",
        "CPU s workers/switch|ray/nats/bench", "CPU ms/ex", "machine cores", "not ours", "score",
    )  # fmt: skip
    lines = []
    for r in rows:
        if not r.runs:
            lines.append((r.id, r.label, str(r.concurrency), r.note, *[""] * 8))
            continue
        walls = [x.wall for x in r.runs]
        faster = f"{r.reference.wall / r.wall:.2f}x" if r.reference is not None else ""
        same = f"{r.wall / r.equal.wall:.2f}x" if r.equal is not None and r.equal.runs else ""
        if r.kind == "D":
            split = "/".join(f"{r.cpu(a):.2f}" for a in ("evaluators", "switchers", "nats", "bench"))
        elif r.kind == "R":
            split = f"{r.cpu('actors'):.2f}/{r.cpu('ray'):.2f}/-/{r.cpu('bench'):.2f}"
        else:
            split = f"-/-/-/{r.cpu('bench'):.2f}"
        lines.append(
            (
                r.id, r.label, str(r.concurrency), f"{r.wall:.3f}", f"{min(walls):.2f}-{max(walls):.2f}", faster, same,
                split, f"{1e3 * r.cpu_total / examples:.2f}", f"{r.machine_cores:.2f}", f"{r.other_cores:.2f}",
                f"{r.runs[0].score:g}",
            )
        )  # fmt: skip
    render(header, lines, {0, 1})


def latency_floor(row: Row, args: argparse.Namespace) -> float:
    """Seconds the LM latency alone takes at this row's concurrency (each thread waits latency per call)."""
    examples, shard_size, threads = int(args.examples), int(args.shard_size), int(args.num_threads)
    latency = float(args.latency)
    if row.kind == "E":
        return math.ceil(examples / row.concurrency) * latency
    waves = math.ceil(math.ceil(examples / shard_size) / (row.concurrency // threads))  # slots: processes x 2
    return waves * math.ceil(shard_size / threads) * latency


def print_breakdown(rows: list[Row], args: argparse.Namespace) -> None:
    header = (
        "id", "wall", "LM latency floor", "CPU floor", "pickup", "split+submit", "shard wait max p50/worst",
        "shard run p50/max", "merge+store", "notify", "shards per evaluator process / actor", "example p50 ms",
    )  # fmt: skip
    cores = os.cpu_count() or 1
    lines = []
    for r in rows:
        if not r.runs:
            continue
        # One Python process runs Python on about one core (the GIL); the bus and Ray rows can use every core.
        cpu_floor = r.cpu_total / (1 if r.kind == "E" else cores)
        first = (r.id, f"{r.wall:.3f}", f"{latency_floor(r, args):.3f}", f"{cpu_floor:.3f}")
        if r.kind == "E":
            lines.append((*first, *[""] * 8))
            continue

        def med(fn: Any, row: Row = r) -> float:
            return float(statistics.median(fn(x) for x in row.runs))

        waits = [max(x.shard_waits, default=0.0) for x in r.runs]
        wait = f"{statistics.median(waits):.3f}/{max(waits):.3f}"
        run50 = med(lambda x: statistics.median(x.shard_runs) if x.shard_runs else 0.0)
        runmax = med(lambda x: max(x.shard_runs, default=0.0))
        patterns: dict[str, int] = {}
        for x in r.runs:
            key = "/".join(str(n) for n in x.per_worker)
            patterns[key] = patterns.get(key, 0) + 1
        spread = ", ".join(f"{k} x{n}" for k, n in sorted(patterns.items(), key=lambda kv: -kv[1]))
        if r.kind == "R":  # shards are handed out by the driver: no queue pickup, split, or separate notify
            merge = med(lambda x: x.marks["result in hand"] - x.marks["last shard done"])
            lines.append(
                (*first, "", "", wait, f"{run50:.3f}/{runmax:.3f}", f"{merge:.3f}", "", spread, "")
            )  # fmt: skip
            continue
        pickup = med(lambda x: x.marks["coordinator running"])
        split = med(lambda x: x.marks["last shard pending"] - x.marks["coordinator running"])
        merge = med(lambda x: x.marks["coordinator done"] - x.marks["last shard done"])
        notify = med(lambda x: x.marks["result in hand"] - x.marks["coordinator done"])
        lines.append(
            (
                *first, f"{pickup:.3f}", f"{split:.3f}", wait, f"{run50:.3f}/{runmax:.3f}", f"{merge:.3f}",
                f"{notify:.3f}", spread, f"{med(lambda x: x.example_p50_ms):.1f}",
            )
        )  # fmt: skip
    render(header, lines, {0, 10})


def print_versus(rows: list[Row], examples: int) -> None:
    """Each R row beside the D row(s) with as many evaluator processes: wall and CPU per example, and their ratios."""
    header = (
        "processes", "bus row", "Ray row", "bus wall s", "Ray wall s", "bus / Ray wall", "bus CPU ms/ex",
        "Ray CPU ms/ex actors+driver / +daemons", "bus / Ray CPU",
    )  # fmt: skip
    lines = []
    for ray_row in (r for r in rows if r.kind == "R"):
        for bus in (r for r in rows if r.kind == "D" and r.processes == ray_row.processes and r.runs):
            bus_cpu = 1e3 * bus.cpu_total / examples
            if not ray_row.runs:
                wall = f"{bus.wall:.3f}"
                lines.append((str(bus.processes), bus.id, ray_row.id, wall, ray_row.note, "", f"{bus_cpu:.2f}", "", ""))
                continue
            ray_cpu = 1e3 * ray_row.cpu_total / examples
            no_daemons = 1e3 * statistics.median(x.cpu.actors + x.cpu.bench for x in ray_row.runs) / examples
            lines.append(
                (
                    str(bus.processes), bus.id, ray_row.id, f"{bus.wall:.3f}", f"{ray_row.wall:.3f}",
                    f"{bus.wall / ray_row.wall:.2f}x", f"{bus_cpu:.2f}", f"{no_daemons:.2f} / {ray_cpu:.2f}",
                    f"{bus_cpu / ray_cpu:.2f}x",
                )
            )  # fmt: skip
    if lines:
        render(header, lines, {1, 2})


# ----------------------------------------------------------------------------- the run


@contextmanager
def quiet_dspy() -> Iterator[None]:
    logger = logging.getLogger("dspy")
    level = logger.level
    logger.setLevel(logging.WARNING)  # Evaluate logs every score at INFO
    try:
        yield
    finally:
        logger.setLevel(level)


async def run(args: argparse.Namespace, server: EmbeddedServer, workdir: Path) -> None:
    example = json.loads(EXAMPLE_FILE.read_text())["input"]
    rows = make_devset(example["valset"], args.examples)
    job = {
        "program": {"spec": example["program"], "state": trained_state(example)},
        "devset": rows,
        "metric": "exact_match",
        "model": MODEL,
        "shard_size": args.shard_size,
        "num_threads": args.num_threads,
    }
    models_file = workdir / "models.toml"
    models_file.write_text(
        f'[[models]]\nmodel = "{MODEL}"\nmax_concurrency = {args.switcher_concurrency}\n'
        f'faults = {{ latency = {{ kind = "fixed", seconds = {args.latency} }} }}\n'
    )
    config = IntegrationConfig(
        nats_urls=[server.url],
        subject_prefix=f"bl{uuid.uuid4().hex[:8]}",
        state_dir=workdir / "bench-state",
        models_file=models_file,
        auto_validate=False,
    )
    fleet = Fleet(config, workdir)
    meter = CpuMeter(fleet, server.pid)
    table: list[Row] = []
    local_rows: dict[int, Row] = {}
    t_start = time.perf_counter()

    def local_row(threads: int) -> Row:
        if threads not in local_rows:
            local_rows[threads] = Row(f"E{threads}", f"dspy.Evaluate(num_threads={threads}), one process", threads, [])
            table.append(local_rows[threads])
        return local_rows[threads]

    async def local(threads: int) -> None:
        local_row(threads).runs.append(await run_local(meter, job, rows, threads, args.latency))

    ray = None if args.no_ray else import_ray()
    ray_note = "skipped (--no-ray)" if args.no_ray else RAY_MISSING
    cluster: RayCluster | None = None
    try:
        if ray is not None:
            started = time.perf_counter()
            # In the main thread (ray.init sets signal handlers), before anything is timed or served.
            cluster = meter.cluster = RayCluster(ray, workdir, max(args.evaluators))
            print(
                f"Ray {ray.__version__} up in {time.perf_counter() - started:.1f} s (local, no dashboard)", flush=True
            )
        async with serving(config) as system:
            print(f"loop-evaluate up (this process); spans -> {system.telemetry.span_destination}", flush=True)
            reference = local_row(args.local_threads)
            print(f"  E warm-up, dspy.Evaluate(num_threads={args.local_threads}) ...", flush=True)
            await run_local(meter, job, rows, args.local_threads, args.latency)
            stages = [(p, 1) for p in args.evaluators] + [(max(args.evaluators), 2)]
            for processes, switchers in stages:
                started = time.perf_counter()
                while len(fleet.pids("switcher")) < switchers:
                    fleet.start("switcher", agent_concurrency=args.switcher_concurrency)
                while len(fleet.pids("evaluator")) < processes:
                    fleet.start("evaluator")
                await wait_instances(system, fleet, "switcher", switchers)
                await wait_instances(system, fleet, "evaluator", processes)
                concurrency = processes * 2 * args.num_threads
                up = time.perf_counter() - started
                print(
                    f"  D {processes} evaluator(s), {switchers} switcher(s) up in {up:.1f} s;"
                    f" {concurrency} LM calls in flight, x{args.reps} ...",
                    flush=True,
                )
                label = (
                    f"bus: {processes} evaluator proc x 2 shards x {args.num_threads} thr, "
                    f"{switchers} switcher proc{'s' if switchers > 1 else ''}"
                )
                number = len([r for r in table if r.kind == "D"]) + 1
                row = Row(f"D{number}", label, concurrency, [], kind="D", processes=processes)
                row.reference = reference
                for _ in range(args.warmups):  # every new process serves a shard / call before it counts
                    await run_distributed(system, meter, job)
                equal = local_row(concurrency) if switchers == 1 else local_rows.get(concurrency)
                row.equal = equal
                ray_row = None
                if switchers == 1:  # Ray at the same process count (Ray has no switcher to double)
                    ray_label = f"Ray: {processes} actor proc x 2 shards x {args.num_threads} thr"
                    ray_row = Row(f"R{processes}", ray_label, concurrency, [], kind="R", processes=processes)
                    ray_row.reference, ray_row.equal = reference, equal
                    ray_row.note = "" if cluster is not None else ray_note
                    table.append(ray_row)
                if cluster is not None and ray_row is not None:
                    started = time.perf_counter()
                    others = {p for p in (server.pid, *fleet.pids("evaluator"), *fleet.pids("switcher")) if p}
                    await anyio.to_thread.run_sync(cluster.grow, processes, others)
                    print(
                        f"  R {processes} Ray actor(s) up in {time.perf_counter() - started:.1f} s;"
                        f" {concurrency} LM calls in flight, x{args.reps} ...",
                        flush=True,
                    )
                    for _ in range(args.warmups):  # every new actor imports DSPy and scores a shard before it counts
                        await run_ray(cluster, meter, job, args)
                for _ in range(args.reps):  # interleaved with the runs it is compared with
                    row.runs.append(await run_distributed(system, meter, job))
                    if cluster is not None and ray_row is not None:
                        ray_row.runs.append(await run_ray(cluster, meter, job, args))
                    if switchers == 1 and equal is not None:
                        await local(concurrency)
                    if len(reference.runs) < args.reps:
                        await local(args.local_threads)
                table.append(row)
    finally:
        fleet.stop_all()
        if cluster is not None:
            cluster.shutdown()
    elapsed = time.perf_counter() - t_start

    # Evaluate rows first, then the bus ones, then Ray's, each in the order they ran.
    ordered = [r for kind in "EDR" for r in table if r.kind == kind]
    print()
    print(
        f"Distributed evaluation vs dspy.Evaluate: {args.examples} examples, LabeledFewShot k=16 program, "
        f"demo model + fixed {args.latency * 1e3:.0f} ms per LM call; shard_size={args.shard_size}, "
        f"num_threads={args.num_threads} per shard; median of {args.reps}"
    )
    print_main(ordered, args.examples)
    print()
    print("Where the time goes (seconds, median over reps; bus phases from the task records' KV updates)")
    print_breakdown(ordered, args)
    print()
    print("dspyrt next to Ray at equal process counts (same shards, same LM calls in flight)")
    print_versus(ordered, args.examples)
    print()
    print(
        "x faster than E8: dspy.Evaluate(num_threads=8)'s wall / this row's. / Evaluate same conc.: this row's wall /"
        " dspy.Evaluate's with as many LM calls in flight (processes x 2 shards x num_threads). CPU s: process CPU"
        " per run by role (workers: evaluator processes in D rows, Ray actors in R rows; switch|ray: switchers in D"
        " rows, Ray's own processes in R rows; bench = this process: Evaluate itself in E rows, loop-evaluate +"
        " client in D rows, the Ray driver in R rows); CPU ms/ex: the row's own processes (the others idle beside"
        " it are left out); machine cores: CPU busy on the whole machine / wall; not ours: the part of it spent by"
        " processes this benchmark did not start."
    )
    print(
        "LM latency floor: the wall time if CPU were free (rounds of LM calls x latency). CPU floor: CPU s of our"
        f" processes / cores usable ({os.cpu_count()} for the bus and Ray rows, 1 for one Python process). pickup:"
        " submit -> evaluate task running; split+submit: -> last shard queued; shard wait: queued -> running;"
        " merge+store: last shard done -> evaluation stored; notify: -> result in the client's hand. Shards per"
        " evaluator process: how many shards each process ran, per run (a process runs 2 at once). R rows: shard"
        " wait is the driver's send -> the actor starting it, merge+store the last shard done -> scores aggregated"
        " in the driver."
    )
    check_scores(ordered, reference)
    verdict(ordered, reference, args)
    print(f"measured in {elapsed:.0f} s; load average {load_average()} at the end")


def check_scores(rows: list[Row], reference: Row) -> None:
    expected = reference.runs[0]
    bad = [
        f"{r.id} run {i + 1} ({x.score:g})"
        for r in rows
        for i, x in enumerate(r.runs)
        if abs(x.score - expected.score) > 0.005 or x.scores != expected.scores
    ]
    if bad:
        print(f"WARNING: score differs from dspy.Evaluate's {expected.score:g}: {', '.join(bad)}")
    else:
        runs = sum(len(r.runs) for r in rows)
        print(f"scores: all {runs} runs score {expected.score:g} with identical per-example scores (dspy.Evaluate's)")
    ray_runs = [(r.id, x) for r in rows if r.kind == "R" for x in r.runs]
    if ray_runs:
        same = all(abs(x.score - expected.score) <= 0.005 and x.scores == expected.scores for _, x in ray_runs)
        found = sorted({f"{x.score:g}" for _, x in ray_runs})
        print(
            f"Ray score: {'/'.join(found)} in {len(ray_runs)} runs ({', '.join(sorted({i for i, _ in ray_runs}))}),"
            f" E rows {expected.score:g} -> {'equal' if same else 'DIFFERENT'}"
        )


def verdict(rows: list[Row], reference: Row, args: argparse.Namespace) -> None:
    most = max(args.evaluators)
    top = [r for r in rows if r.distributed and r.concurrency == most * 2 * args.num_threads]
    if top:
        best = min(top, key=lambda r: r.wall)
        speedup = reference.wall / best.wall
        print(
            f"target >= 4x faster than dspy.Evaluate(num_threads={args.local_threads}) with {most} evaluator"
            f" processes: {speedup:.2f}x ({best.id}, the faster of {', '.join(r.id for r in top)}) -> "
            f"{'met' if speedup >= 4 else 'NOT met'}"
        )
        needed, floor = reference.wall / 4, best.cpu_total / (os.cpu_count() or 1)
        print(
            f"  4x means {needed:.3f} s; the CPU the bus path spends ({1e3 * best.cpu_total / args.examples:.2f} ms"
            f" per example over {os.cpu_count()} cores) alone takes {floor:.3f} s here"
        )
    for r in rows:
        if r.distributed and r.equal is not None:
            ratio = r.wall / r.equal.wall
            print(
                f"target <= 1.1x dspy.Evaluate's time at equal concurrency ({r.concurrency} in flight): {r.id} "
                f"{ratio:.2f}x -> {'met' if ratio <= 1.1 else 'NOT met'}"
            )
    for r in rows:
        if r.distributed and r.equal is not None and r.equal.runs:
            ratio = r.cpu_total / r.equal.cpu_total
            bus_ms, local_ms = 1e3 * r.cpu_total / args.examples, 1e3 * r.equal.cpu_total / args.examples
            print(
                f"target CPU per evaluated example over the bus <= 1.3x in-process dspy.Evaluate: {r.id}"
                f" {bus_ms:.2f} ms vs {r.equal.id} {local_ms:.2f} ms = {ratio:.2f}x"
                f" -> {'met' if ratio <= 1.3 else 'NOT met'}"
            )
    ray_top = [r for r in rows if r.kind == "R" and r.processes == most]
    if top and ray_top:
        best, ray_row = min(top, key=lambda r: r.wall), ray_top[0]
        if not ray_row.runs:
            print(f"target 4 processes at least as fast as Ray with 4 workers: not measured, Ray {ray_row.note}")
        else:
            ratio = best.wall / ray_row.wall
            others = ", ".join(f"{r.id} {r.wall / ray_row.wall:.2f}x" for r in top if r is not best)
            print(
                f"target {most} processes at least as fast as Ray with {most} workers: {best.id} / {ray_row.id} wall"
                f" {best.wall:.3f} / {ray_row.wall:.3f} s = {ratio:.2f}x ({others or 'the only bus row'}) ->"
                f" {'met' if ratio <= 1.0 else 'NOT met'}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=400, help="devset size")
    parser.add_argument("--latency", type=float, default=0.05, help="fixed seconds per LM call")
    parser.add_argument("--evaluators", default="1,2,4", help="evaluator process counts, ascending")
    parser.add_argument("--shard-size", type=int, default=50, help="examples per evaluate-shard task")
    parser.add_argument("--num-threads", type=int, default=10, help="threads per shard")
    parser.add_argument("--local-threads", type=int, default=8, help="the reference dspy.Evaluate's num_threads")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per row")
    parser.add_argument("--warmups", type=int, default=1, help="uncounted distributed runs per stage")
    parser.add_argument(
        "--switcher-concurrency", type=int, default=256, help="switcher agent_concurrency and model max_concurrency"
    )
    parser.add_argument("--quick", action="store_true", help="1 repetition (~1.5 minutes)")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray rows (R)")
    args = parser.parse_args()
    args.evaluators = sorted(int(n) for n in args.evaluators.split(","))
    if args.quick:
        args.reps = 1

    print(
        f"bench_loop: {platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} cores ({platform.platform()}); load average {load_average()} at start"
    )
    print(f"versions: {versions()}")
    print(
        f"settings: {args.examples} examples, {args.latency * 1e3:g} ms per LM call, evaluators {args.evaluators}, "
        f"shard_size {args.shard_size}, num_threads {args.num_threads}, {args.reps} reps; switcher processes run with "
        f"agent_concurrency={args.switcher_concurrency} and the model's max_concurrency={args.switcher_concurrency}; "
        f"OTEL_TRACES_SAMPLER={os.environ.get('OTEL_TRACES_SAMPLER', '(default: parentbased_always_on)')}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    server = EmbeddedServer(workdir / "jetstream", log_file=workdir / "nats-server.log")
    try:
        server.start()
        with quiet_dspy():
            anyio.run(run, args, server, workdir)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
