"""Data at scale: evaluations on datasets of 1k, 10k and 100k examples, and cycles on large devsets.

Every agent runs as its own process, as an operator runs them (``python -m dspyrt.runtime.cli agent NAME``): one
``switcher`` serving the demo model behind a fixed latency per LM call (default 50 ms, a provider's round trip),
``--evaluators`` ``evaluator`` processes, ``loop-evaluate`` (the coordinator), and for the cycles ``cycle``,
``loop-create``, ``optimizer`` and ``loop-deploy`` (validation off). The bench process only puts the datasets and
submits tasks, as a user would.

For each devset size the table gives wall time, examples per second, the peak RSS (VmHWM) of every evaluator and
of the coordinator *after* that size ran (sizes run in increasing order, so a peak that grows with the devset
shows up), and the bytes in the datasets and results object stores. The LM response cache is bypassed
(``no_cache``), so every example costs a real (simulated) LM call.

    .venv/bin/python benchmarks/bench_datasets.py                       # 1k/10k/100k + cycle 2000 x 4 KB (~15 min)
    .venv/bin/python benchmarks/bench_datasets.py --sizes 1000,10000 --no-cycle    # ~2 minutes
    .venv/bin/python benchmarks/bench_datasets.py --sizes 1000 --cycle-examples 100000 --cycle-text-bytes 0

This is a benchmark, not a test: nothing asserts on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from _common import load_average, versions
from bench_loop import EXAMPLE_FILE, MODEL, Fleet, make_devset, quiet_dspy, trained_state

from dspyrt.bus import EmbeddedServer
from dspyrt.runtime.client import Client, connect_client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.system import collect_status

FILLER_TEXT = (
    "the report notes that the committee met on a weekday and discussed several items in turn before the "
    "chair closed the session and everyone went home to read the minutes again"
)
FILLER = FILLER_TEXT.split()


def short_rows(n: int, valset: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``n`` distinct short rows: the valset texts in 20 wordings, each with its row number."""
    return [{"text": f"{row['text']} case {i}", "topic": row["topic"]} for i, row in enumerate(make_devset(valset, n))]


def long_rows(n: int, valset: list[dict[str, Any]], text_bytes: int) -> list[dict[str, Any]]:
    """``n`` rows whose text is a short topical text padded with neutral filler to about ``text_bytes`` bytes
    (a RAG passage's size)."""
    rows = []
    for i, row in enumerate(make_devset(valset, n)):
        words = [row["text"], f"case {i}"]
        size = sum(len(w) + 1 for w in words)
        j = 0
        while size < text_bytes:
            word = FILLER[j % len(FILLER)]
            words.append(word)
            size += len(word) + 1
            j += 1
        rows.append({"text": " ".join(words), "topic": row["topic"]})
    return rows


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a process in KiB, from /proc (0 where unavailable)."""
    found = {"VmHWM": 0, "VmRSS": 0}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in found:
                    found[key] = int(line.split()[1])
    except OSError:
        pass
    return found["VmHWM"], found["VmRSS"]


async def store_bytes(client: Client, store: str) -> int:
    try:
        info = await client.bus.js.stream_info(f"OBJ_{client.bus.subjects.object_store(store)}")
    except Exception:
        return 0
    return int(info.state.bytes or 0)


async def wait_agents(client: Client, config: IntegrationConfig, fleet: Fleet, counts: dict[str, int]) -> None:
    with anyio.fail_after(90):
        while True:
            fleet.check()
            status = await collect_status(client.bus, config, window=0.3)
            up = {a.name: len(a.instances) for a in status.agents}
            if all(up.get(name, 0) >= count for name, count in counts.items()):
                return
            await anyio.sleep(0.3)


@dataclass
class EvalRow:
    examples: int
    put_s: float
    wall_s: float
    score: float
    answered: int
    evaluator_peak_mb: list[float]
    coordinator_peak_mb: float
    datasets_mb: float
    results_mb: float
    results_inline: bool


@dataclass
class CycleRow:
    label: str
    put_s: float
    wall_s: float
    deployed: bool
    version: int | None
    baseline: float
    optimized: float | None
    state_bytes: int
    coordinator_peak_mb: float
    evaluator_peak_mb: list[float]


async def run_task(client: Client, kind: str, payload: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    submission = await client.submit(kind, payload)
    record = await client.result(submission.task_id, timeout=timeout)
    wall = time.perf_counter() - started
    if record.status.value != "succeeded":
        raise RuntimeError(f"{kind} task {submission.task_id} ended {record.status.value}: {record.error}")
    return dict(record.result), wall


def peaks(fleet: Fleet, name: str) -> list[float]:
    return [round(memory_kb(pid)[0] / 1024, 1) for pid in fleet.pids(name)]


async def evaluate_sizes(
    client: Client, fleet: Fleet, args: argparse.Namespace, example: dict[str, Any]
) -> list[EvalRow]:
    spec, state = example["program"], trained_state(example)
    out = []
    for n in args.sizes:
        rows = short_rows(n, example["valset"])
        started = time.perf_counter()
        manifest = await client.put_dataset(f"bench-{n}", rows)
        put_s = time.perf_counter() - started
        del rows
        print(
            f"  evaluate {n} examples (dataset {manifest.name}@{manifest.version}, put in {put_s:.1f} s) ...",
            flush=True,
        )
        job = {
            "program": {"spec": spec, "state": state},
            "devset": f"dataset:{manifest.name}",
            "metric": "exact_match",
            "model": MODEL,
            "shard_size": args.shard_size,
            "num_threads": args.num_threads,
            "no_cache": True,
        }
        result, wall = await run_task(client, "evaluate", job, timeout=args.timeout)
        coordinator = fleet.pids("loop-evaluate")
        out.append(
            EvalRow(
                examples=n,
                put_s=put_s,
                wall_s=wall,
                score=float(result["score"]),
                answered=int(result.get("answered") or result["examples"]),
                evaluator_peak_mb=peaks(fleet, "evaluator"),
                coordinator_peak_mb=round(memory_kb(coordinator[0])[0] / 1024, 1) if coordinator else 0.0,
                datasets_mb=round(await store_bytes(client, "datasets") / 2**20, 1),
                results_mb=round(await store_bytes(client, "results") / 2**20, 1),
                results_inline=bool(result.get("results")),
            )
        )
        print(f"    {wall:.1f} s, {n / wall:.0f} examples/s, score {result['score']}", flush=True)
    return out


async def run_cycle(
    client: Client, fleet: Fleet, args: argparse.Namespace, example: dict[str, Any], n: int, text_bytes: int
) -> CycleRow:
    rows = long_rows(n, example["valset"], text_bytes) if text_bytes else short_rows(n, example["valset"])
    label = f"{n} x {text_bytes // 1024} KB" if text_bytes else f"{n} short"
    name = f"cycle-{n}-{text_bytes}"
    started = time.perf_counter()
    manifest = await client.put_dataset(name, rows)
    put_s = time.perf_counter() - started
    del rows
    print(f"  cycle, devset {label} ({manifest.bytes / 2**20:.1f} MB, put in {put_s:.1f} s) ...", flush=True)
    program_name = f"bench-{uuid.uuid4().hex[:6]}"
    job = {
        "program_name": program_name,
        "program": example["program"],
        "trainset": example["trainset"],
        "devset": f"dataset:{name}",
        "metric": "exact_match",
        "optimizer": "labeled_fewshot",
        "params": {"k": 16},
        "model": MODEL,
        "shard_size": args.shard_size,
        "no_cache": True,
    }
    result, wall = await run_task(client, "cycle", job, timeout=args.timeout)
    state = await client.bus.js.key_value(client.bus.subjects.bucket("cycles"))
    entry = await state.get(result["cycle_id"])
    coordinator = fleet.pids("cycle")
    verdict = result["verdict"]
    optimized = result.get("optimized") or {}
    print(f"    {wall:.1f} s, deployed {verdict['deployed']} v{verdict.get('version')}", flush=True)
    return CycleRow(
        label=label,
        put_s=put_s,
        wall_s=wall,
        deployed=bool(verdict["deployed"]),
        version=verdict.get("version"),
        baseline=float(result["baseline"]["score"]),
        optimized=optimized.get("score"),
        state_bytes=len(entry.value or b""),
        coordinator_peak_mb=round(memory_kb(coordinator[0])[0] / 1024, 1) if coordinator else 0.0,
        evaluator_peak_mb=peaks(fleet, "evaluator"),
    )


def render(header: Sequence[str], lines: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


async def run(args: argparse.Namespace, server: EmbeddedServer, workdir: Path) -> None:
    example = json.loads(EXAMPLE_FILE.read_text())["input"]
    models_file = workdir / "models.toml"
    models_file.write_text(
        f'[[models]]\nmodel = "{MODEL}"\nmax_concurrency = 256\n'
        f'faults = {{ latency = {{ kind = "fixed", seconds = {args.latency} }} }}\n'
    )
    config = IntegrationConfig(
        nats_urls=[server.url],
        subject_prefix=f"bd{uuid.uuid4().hex[:8]}",
        state_dir=workdir / "bench-state",
        models_file=models_file,
        auto_validate=False,
    )
    fleet = Fleet(config, workdir)
    fleet.env["DSPYRT_AUTO_VALIDATE"] = "false"
    started = time.perf_counter()
    try:
        async with connect_client(config) as client:
            fleet.start("switcher", agent_concurrency=256)
            for _ in range(args.evaluators):
                fleet.start("evaluator")
            fleet.start("loop-evaluate")
            counts = {"switcher": 1, "evaluator": args.evaluators, "loop-evaluate": 1}
            if args.cycles:
                for name in ("cycle", "loop-create", "optimizer", "loop-deploy"):
                    fleet.start(name)
                    counts[name] = 1
            await wait_agents(client, config, fleet, counts)
            print(f"agents up in {time.perf_counter() - started:.1f} s", flush=True)
            evaluations = await evaluate_sizes(client, fleet, args, example)
            cycles = [await run_cycle(client, fleet, args, example, n, text_bytes) for n, text_bytes in args.cycles]
    finally:
        fleet.stop_all()
    print()
    print(
        f"Evaluate on a dataset: demo model + fixed {args.latency * 1e3:.0f} ms per LM call, "
        f"{args.evaluators} evaluator processes x 2 shards x {args.num_threads} threads, "
        f"shard_size {args.shard_size}, LM cache bypassed"
    )
    render(
        ("examples", "put s", "wall s", "ex/s", "score", "evaluator peak RSS MB", "coordinator peak MB",
         "datasets MB", "results MB", "results"),
        [
            (f"{r.examples:,}", f"{r.put_s:.1f}", f"{r.wall_s:.1f}", f"{r.examples / r.wall_s:.0f}", f"{r.score:.1f}",
             "/".join(f"{m:.0f}" for m in r.evaluator_peak_mb), f"{r.coordinator_peak_mb:.0f}", f"{r.datasets_mb}",
             f"{r.results_mb}", "inline" if r.results_inline else "object")
            for r in evaluations
        ],
    )  # fmt: skip
    if cycles:
        print()
        print("Cycles (create, evaluate baseline, LabeledFewShot k=16, evaluate optimized, deploy; validation off)")
        render(
            ("devset", "put s", "wall s", "deployed", "baseline", "optimized", "cycle state B", "cycle peak MB",
             "evaluator peak RSS MB"),
            [
                (c.label, f"{c.put_s:.1f}", f"{c.wall_s:.1f}", f"v{c.version}" if c.deployed else "no",
                 f"{c.baseline:.1f}", f"{c.optimized:.1f}" if c.optimized is not None else "-", str(c.state_bytes),
                 f"{c.coordinator_peak_mb:.0f}", "/".join(f"{m:.0f}" for m in c.evaluator_peak_mb))
                for c in cycles
            ],
        )  # fmt: skip
    print()
    print(
        "peak RSS: VmHWM of each process after the row ran (rows run in order, so growth with the devset shows as"
        " growth down the column). datasets/results MB: bytes in the object stores' streams after the row."
    )
    print(f"measured in {time.perf_counter() - started:.0f} s; load average {load_average()} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="devset sizes to evaluate, ascending")
    parser.add_argument("--latency", type=float, default=0.05, help="fixed seconds per LM call")
    parser.add_argument("--evaluators", type=int, default=4, help="evaluator processes")
    parser.add_argument("--shard-size", type=int, default=100, help="examples per evaluate-shard task")
    parser.add_argument("--num-threads", type=int, default=10, help="threads per shard")
    parser.add_argument("--cycle-examples", type=int, default=2000, help="devset rows of the cycle")
    parser.add_argument("--cycle-text-bytes", type=int, default=4096, help="text size per cycle row (0: short)")
    parser.add_argument("--no-cycle", action="store_true", help="evaluations only")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per task")
    args = parser.parse_args()
    args.sizes = sorted(int(n) for n in args.sizes.split(",") if n)
    args.cycles = [] if args.no_cycle else [(args.cycle_examples, args.cycle_text_bytes)]
    print(
        f"bench_datasets: {platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} cores; load average {load_average()} at start"
    )
    print(f"versions: {versions()}")
    print(
        f"settings: sizes {args.sizes}, {args.latency * 1e3:g} ms per LM call, {args.evaluators} evaluators, "
        f"shard_size {args.shard_size}, num_threads {args.num_threads}, cycles {args.cycles}; "
        f"OTEL_TRACES_SAMPLER={os.environ.get('OTEL_TRACES_SAMPLER', '(default: parentbased_always_on)')}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-datasets-"))
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
