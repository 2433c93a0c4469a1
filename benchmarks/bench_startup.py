"""Start-up benchmark: how long ``dspyrt up`` takes until every agent says it is healthy, and the memory it holds.

S. ``dspyrt up`` is launched as a user runs it (``.venv/bin/dspyrt up``: one process that starts an embedded
   ``nats-server`` and hosts every agent the default mode enables), in a fresh temporary folder (its own state dir)
   with ``DSPYRT_NATS_PORT=0`` and ``DSPYRT_DASHBOARD_PORT=0`` (free ports). The clock starts just before the
   launch. This process watches for ``.dspyrt/system.json`` (the embedded server is up), reads the command's output
   for its ``dspyrt is up`` line (every agent host started), and, as soon as the server is there, asks each agent's
   built-in ``health`` endpoint over NATS (``<prefix>.<agent>.health``, which refreshes the agent's checks: the
   dashboard's web page included) every 20 ms until it answers ``healthy: true``; an agent once healthy is not
   asked again. *Healthy* is when the last agent first answered so. The agents expected are those ``dspyrt up``
   runs: ``agents_for`` of the default configuration (``--agents`` narrows both). Then the process is stopped as
   Ctrl-C stops it (SIGINT to its process group, SIGKILL after 20 s) and nothing it started may be left running.
   ``--reps`` repetitions (3) after ``--warmup`` uncounted ones (1: the first run after an idle spell pays for
   cold disk caches), the median of each figure.
M. Memory, ``VmRSS`` from ``/proc/<pid>/status`` (``VmHWM``, the peak, beside it): the ``dspyrt up`` process once
   every agent is healthy (each repetition; the median), its children (``nats-server``) apart, and, in the last
   repetition, the same process after the README's example task (``examples/cycle.json``, the create → evaluate
   → optimize → validate → deploy cycle ``make run`` sends, submitted by this process and awaited). Then one
   ``python -m dspyrt.runtime.cli agent evaluator`` process, started as an operator starts it against the running
   server (``DSPYRT_NATS_URLS``, a state dir of its own, as ``bench_loop.py`` does), measured once its instance
   answers ``$SRV.STATS`` with a healthy report (the time to that is shown too).
C. For context, what any Python process pays before it does anything: ``python -c pass``, ``python -c "import
   dspy"`` and importing every agent class (``available_agents()``, which ``dspyrt up`` does before it starts
   anything; ended with ``os._exit`` so that the interpreter's teardown, which start-up never pays, is left out),
   each the median of ``--reps`` runs, one after each repetition of S.

Targets: every agent healthy within 2 s of the launch, and the process hosting every agent at most 300 MB.
``--importtime`` prints where ``python -X importtime`` says the agents' imports go (by top-level package, and the
slowest modules), and exits.

    .venv/bin/python benchmarks/bench_startup.py                   # about 40 s
    .venv/bin/python benchmarks/bench_startup.py --reps 5 --json /tmp/startup.json
    .venv/bin/python benchmarks/bench_startup.py --importtime

This is a benchmark, not a test: nothing asserts on timing; the targets are reported as met or missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The benchmark's own configuration is the default one, as the launched commands' is: no developer's settings.
for _name in [k for k in os.environ if k.startswith(("DSPYRT_", "OTEL_"))]:
    del os.environ[_name]

import anyio  # noqa: E402
from _common import importtime_rows, load_average, versions  # noqa: E402

from dspyrt.bus import Bus, TaskStore  # noqa: E402
from dspyrt.bus.subjects import SERVICE_STATS  # noqa: E402
from dspyrt.runtime.cli_input import read_task_file  # noqa: E402
from dspyrt.runtime.client import Client  # noqa: E402
from dspyrt.runtime.config import IntegrationConfig  # noqa: E402
from dspyrt.runtime.host import HEALTH_ENDPOINT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DSPYRT = BIN / "dspyrt"
EXAMPLE = ROOT / "examples" / "cycle.json"
READY_LINE = "dspyrt is up"
TARGET_HEALTHY_S = 2.0
TARGET_RSS_MB = 300.0
POLL = 0.02  # seconds between health rounds
TIMEOUT = 60.0  # for anything to come up
STOP_GRACE = 20.0  # SIGINT, then SIGKILL
AGENTS_IMPORT = "from dspyrt.runtime.registry import available_agents; available_agents()"
# Without the interpreter's teardown (0.2-0.4 s for ~1,100 modules): comparable with S1a, which has none.
AGENTS_ONLY = AGENTS_IMPORT + "; import os; os._exit(0)"
CONTEXT = {
    "python -c pass": "pass",
    'python -c "import dspy"': "import dspy",
    "python: import every agent class, no teardown": AGENTS_ONLY,
}


def child_env(**settings: str) -> dict[str, str]:
    """The environment of the launched commands: no DSPYRT_*/OTEL_* (removed above), free ports, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Unbuffered: the ready line reaches the pipe when it is printed, as it reaches a terminal.
    env |= {"COLUMNS": "120", "PYTHONUNBUFFERED": "1", "DSPYRT_NATS_PORT": "0", "DSPYRT_DASHBOARD_PORT": "0"}
    return env | settings


# ----------------------------------------------------------------------------- /proc


def memory_mb(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM of a process, MB (0 where /proc does not have them)."""
    found = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in found:
                    found[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return found["VmRSS"], found["VmHWM"]


def children(pid: int) -> dict[int, str]:
    """Direct children of a process (from /proc): pid -> command name."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                head, rest = fh.read().rsplit(")", 1)
        except OSError:
            continue  # exited meanwhile
        if int(rest.split()[1]) == pid:
            found[int(entry)] = head.split("(", 1)[1]
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ----------------------------------------------------------------------------- one run of `dspyrt up`


@dataclass
class Run:
    nats_s: float = 0.0  # launch -> .dspyrt/system.json (embedded nats-server up)
    ready_s: float = 0.0  # launch -> "dspyrt is up" printed
    healthy_s: float = 0.0  # launch -> the last agent answered healthy
    last_agent: str = ""  # the agent that answered healthy last
    first_healthy: dict[str, float] = field(default_factory=dict)  # agent -> launch to its first healthy answer
    stop_s: float = 0.0  # SIGINT -> the process exited
    rss_mb: float = 0.0  # dspyrt up, healthy
    hwm_mb: float = 0.0
    children_mb: dict[str, float] = field(default_factory=dict)  # "nats-server (pid)" -> RSS
    # Only in the run with the example task and the evaluator (the last one):
    example_s: float | None = None
    example_status: str | None = None
    example_rss_mb: float | None = None
    example_hwm_mb: float | None = None
    evaluator_healthy_s: float | None = None
    evaluator_rss_mb: float | None = None
    evaluator_hwm_mb: float | None = None


class Output:
    """The command's stdout, read on a thread: each line with the time it arrived; also written to a file."""

    def __init__(self, process: subprocess.Popen[bytes], path: Path) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(process, path), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[bytes], path: Path) -> None:
        assert process.stdout is not None
        with path.open("w") as log:
            for raw in process.stdout:
                line = raw.decode(errors="replace")
                self.lines.append((time.perf_counter(), line))
                log.write(line)
                log.flush()

    def seen(self, text: str) -> float | None:
        return next((t for t, line in list(self.lines) if text in line), None)


def launch(argv: list[str], cwd: Path, env: dict[str, str], *, pipe: bool) -> subprocess.Popen[bytes]:
    """``argv`` in a session of its own, so that stopping it signals its group and only that group (the embedded
    nats-server has a session of its own: ``dspyrt up`` stops it, ``sweep`` kills it if it outlived ``dspyrt up``);
    stdout to a pipe (``pipe``) or to ``cwd/stdout.log``, stderr to ``cwd/stderr.log``."""
    with (cwd / "stderr.log").open("wb") as stderr, (cwd / "stdout.log").open("wb") as log:
        stdout = subprocess.PIPE if pipe else log  # the child keeps its own copies of the files
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)


def failed(what: str, workdir: Path) -> SystemExit:
    tail = (workdir / "stderr.log").read_text(errors="replace")[-3000:] if (workdir / "stderr.log").is_file() else ""
    return SystemExit(f"{what} (in {workdir}):\n{tail}")


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGINT, grace: float = STOP_GRACE) -> float:
    """``sig`` to the process's group (SIGINT: Ctrl-C), SIGKILL after ``grace`` or when this wait is interrupted;
    seconds until the process exited (and was reaped)."""
    started = time.perf_counter()
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=grace)
        except ProcessLookupError:
            process.wait()
        except BaseException as exc:  # still running after the grace period, or Ctrl-C here: leave nothing behind
            if isinstance(exc, subprocess.TimeoutExpired):
                print(f"  pid {process.pid} still running {grace:.0f}s after {sig!r}: SIGKILL", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
    return time.perf_counter() - started


def sweep(workdir: Path) -> list[int]:
    """Kill every process still working in ``workdir`` (this run's temporary folder: only processes this benchmark
    started, and what they started, work there), such as an embedded nats-server that outlived ``dspyrt up``;
    the ones killed."""
    left = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(f"/proc/{entry}/cwd"))
        except OSError:
            continue  # exited meanwhile, or not ours to read
        if (cwd == workdir or workdir in cwd.parents) and alive(int(entry)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                left.append(int(entry))
    return left


async def health_rounds(
    bus: Bus, expected: list[str], start: float, run: Run, process: subprocess.Popen[bytes]
) -> None:
    """Ask every agent not yet healthy for its health, every POLL seconds, until all have answered healthy."""
    pending = set(expected)

    async def ask(agent: str) -> None:
        try:
            msg = await bus.request_raw(bus.subjects.endpoint(agent, HEALTH_ENDPOINT), b"{}", timeout=1.0)
        except Exception:  # no responders yet, or a timeout: the next round asks again
            return
        if json.loads(msg.data).get("healthy"):
            run.first_healthy.setdefault(agent, time.perf_counter() - start)
            pending.discard(agent)

    with anyio.fail_after(TIMEOUT):
        while pending:
            if process.poll() is not None:
                return
            async with anyio.create_task_group() as tg:
                for agent in sorted(pending):
                    tg.start_soon(ask, agent)
            if pending:
                await anyio.sleep(POLL)


async def instances(bus: Bus, agent: str) -> dict[str, bool]:
    """Every instance of ``agent`` answering ``$SRV.STATS``: instance id -> its last health report's verdict."""
    found = {}
    for msg in await bus.gather(f"{SERVICE_STATS}.{bus.subjects.service_name(agent)}", window=0.5, quiet=0.05):
        try:
            stats = json.loads(msg.data)
        except ValueError:  # no responders (a status message without a body): no instance yet
            continue
        endpoints = stats.get("endpoints") or []
        health = next(((e.get("data") or {}).get("health") or {} for e in endpoints if e.get("name") == "health"), {})
        found[str(stats.get("id"))] = bool(health.get("healthy"))
    return found


async def observe(
    process: subprocess.Popen[bytes], output: Output, start: float, workdir: Path, expected: list[str],
    run: Run, last: bool, example: bool,
) -> None:  # fmt: skip
    system_json = workdir / ".dspyrt" / "system.json"
    with anyio.fail_after(TIMEOUT):
        while not system_json.is_file():
            if process.poll() is not None:
                raise failed(f"dspyrt up exited with {process.returncode}", workdir)
            await anyio.sleep(0.01)
    run.nats_s = time.perf_counter() - start
    while True:  # written, not necessarily flushed, when it is first seen
        try:
            system = json.loads(system_json.read_text())
            break
        except ValueError:
            await anyio.sleep(0.005)
    config = IntegrationConfig(nats_urls=[system["nats_url"]], subject_prefix=system["prefix"])
    bus = Bus(config.connection_options(name="bench-startup"), config.subjects)
    await bus.connect()
    try:
        await health_rounds(bus, expected, start, run, process)
        if process.poll() is not None:
            raise failed(f"dspyrt up exited with {process.returncode}", workdir)
        run.healthy_s = max(run.first_healthy.values())
        run.last_agent = max(run.first_healthy, key=lambda a: run.first_healthy[a])
        run.rss_mb, run.hwm_mb = memory_mb(process.pid)
        for pid, name in children(process.pid).items():
            run.children_mb[f"{name} ({pid})"] = memory_mb(pid)[0]
        with anyio.fail_after(TIMEOUT):  # printed before the health rounds end, as a rule: read it in any case
            while (ready := output.seen(READY_LINE)) is None:
                await anyio.sleep(0.01)
        run.ready_s = ready - start
        if not last:
            return
        if example:
            client = Client(bus, await TaskStore.open(bus), identity="bench-startup")
            kind, payload = read_task_file(EXAMPLE)
            began = time.perf_counter()
            submission = await client.submit(kind, payload)
            record = await client.result(submission.task_id, timeout=TIMEOUT)
            run.example_s = time.perf_counter() - began
            run.example_status = str(getattr(record.status, "value", record.status))
            run.example_rss_mb, run.example_hwm_mb = memory_mb(process.pid)
        await evaluator(bus, system["nats_url"], workdir, run)
    finally:
        with anyio.CancelScope(shield=True):
            await bus.close()


async def evaluator(bus: Bus, nats_url: str, workdir: Path, run: Run) -> None:
    """One ``python -m dspyrt.runtime.cli agent evaluator`` against the running server, until its instance reports
    healthy in ``$SRV.STATS``; its memory then. Stopped (SIGTERM, as an operator's stop) before returning."""
    before = set(await instances(bus, "evaluator"))  # the one `dspyrt up` hosts, when it runs the evaluator
    folder = workdir / "evaluator"
    folder.mkdir()
    argv = [sys.executable, "-m", "dspyrt.runtime.cli", "agent", "evaluator"]
    env = child_env(DSPYRT_NATS_URLS=nats_url, DSPYRT_STATE_DIR=str(folder / "state"))
    start = time.perf_counter()
    process = launch(argv, folder, env, pipe=False)
    try:
        with anyio.fail_after(TIMEOUT):
            while True:
                if process.poll() is not None:
                    raise failed(f"the evaluator process exited with {process.returncode}", folder)
                if any(healthy for id_, healthy in (await instances(bus, "evaluator")).items() if id_ not in before):
                    break
                await anyio.sleep(0.05)
        run.evaluator_healthy_s = time.perf_counter() - start
        run.evaluator_rss_mb, run.evaluator_hwm_mb = memory_mb(process.pid)
    finally:
        stop(process, signal.SIGTERM)  # as an operator's stop: drain


def one_run(expected: list[str], agents: str | None, *, last: bool, example: bool) -> Run:
    run = Run()
    with tempfile.TemporaryDirectory(prefix="dspyrt-bench-startup-") as tmp:
        workdir = Path(tmp)
        argv = [str(DSPYRT), "up"] + (["--agents", agents] if agents else [])
        start = time.perf_counter()
        process = launch(argv, workdir, child_env(), pipe=True)
        try:
            output = Output(process, workdir / "stdout.log")
            anyio.run(observe, process, output, start, workdir, expected, run, last, example)
        finally:
            try:
                run.stop_s = stop(process)
            finally:
                left = sweep(workdir)
                if left:
                    print(f"  warning: pids {left} outlived dspyrt up and were killed", file=sys.stderr)
    return run


# ----------------------------------------------------------------------------- context: bare interpreter costs


def timed(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), check=True, capture_output=True)
    return time.perf_counter() - start


def importtime() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", AGENTS_IMPORT + "; import dspyrt.runtime.supervisor"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = importtime_rows(done.stderr)
    total = sum(self_us for _, self_us, _ in rows)
    by_package: dict[str, int] = {}
    for _, self_us, name in rows:
        top = name.strip().split(".")[0]
        by_package[top] = by_package.get(top, 0) + self_us
    print(f"importing every agent class and the supervisor: {len(rows)} modules, {total / 1e6:.3f} s (self times)")
    print(f"{'self s':>7}  {'share':>6}  top-level package")
    for name, self_us in sorted(by_package.items(), key=lambda kv: -kv[1])[:15]:
        print(f"{self_us / 1e6:7.3f}  {self_us / total:6.1%}  {name}")
    print(f"\n{'cumulative s':>12}  {'self s':>7}  module")
    for cumulative, self_us, name in sorted(rows, reverse=True)[:25]:
        print(f"{cumulative / 1e6:12.3f}  {self_us / 1e6:7.3f}  {name}")


# ----------------------------------------------------------------------------- report


def verdict(value: float | None, target: float | None) -> str:
    if value is None or target is None:
        return ""
    return "met" if value <= target else "missed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="counted runs of `dspyrt up` (default 3); the median")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted runs first (default 1)")
    parser.add_argument("--agents", help="comma-separated agent names for `dspyrt up --agents` (default: by mode)")
    parser.add_argument("--no-example", action="store_true", help="skip the example task (examples/cycle.json)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure, every run, as JSON")
    parser.add_argument("--importtime", action="store_true", help="print where the agents' imports go, and exit")
    args = parser.parse_args()
    # Stopped by SIGTERM as by Ctrl-C: what it started is stopped too. A SIGINT handler of our own (even when
    # started in the background, where SIGINT is ignored) lets the commands launched inherit SIGINT's default.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.importtime:
        importtime()
        return

    from dspyrt.runtime.registry import agents_for

    expected = [cls.name for cls in agents_for(IntegrationConfig(agents=args.agents.split(",") if args.agents else []))]
    load_before = load_average()
    began = time.perf_counter()

    warmups = [one_run(expected, args.agents, last=False, example=False) for _ in range(args.warmup)]
    runs: list[Run] = []
    context: dict[str, list[float]] = {label: [] for label in CONTEXT}
    for i in range(args.reps):  # interleaved, so that drift in the machine's load hits every figure alike
        runs.append(one_run(expected, args.agents, last=i == args.reps - 1, example=not args.no_example))
        for label, code in CONTEXT.items():
            context[label].append(timed(code))

    def med(name: str) -> float:
        return statistics.median(getattr(r, name) for r in runs)

    last = runs[-1]
    children_mb: dict[str, list[float]] = {}
    for r in runs:
        for key, mb in r.children_mb.items():
            children_mb.setdefault(key.split(" (")[0], []).append(mb)
    rows: list[tuple[str, str, str, float | None, float | None, str]] = [
        # id, what, unit, figure, target, spread
        ("S1", "dspyrt up: launch -> every agent healthy", "s", med("healthy_s"), TARGET_HEALTHY_S,
         f"{min(r.healthy_s for r in runs):.2f}-{max(r.healthy_s for r in runs):.2f}"),
        ("S1a", "  launch -> embedded nats-server up (system.json)", "s", med("nats_s"), None, ""),
        ("S1b", f"  launch -> '{READY_LINE}' printed", "s", med("ready_s"), None, ""),
        ("S1c", "  stop: SIGINT -> exited", "s", med("stop_s"), None, ""),
        ("M1", "RSS, dspyrt up process, every agent healthy", "MB", med("rss_mb"), TARGET_RSS_MB,
         f"peak {med('hwm_mb'):.0f}"),
    ]  # fmt: skip
    if last.example_rss_mb is not None:
        rows.append(("M1a", f"  after the example task ({EXAMPLE.name}, {last.example_status}, {last.example_s:.2f} s)",
                     "MB", last.example_rss_mb, TARGET_RSS_MB, f"peak {last.example_hwm_mb:.0f}"))  # fmt: skip
    for name, values in sorted(children_mb.items()):
        rows.append(("M1c", f"  child process {name}", "MB", statistics.median(values), None, ""))
    if last.evaluator_rss_mb is not None:
        rows.append(("M2", "RSS, one `agent evaluator` process, healthy", "MB", last.evaluator_rss_mb, None,
                     f"peak {last.evaluator_hwm_mb:.0f}"))  # fmt: skip
        rows.append(("M2a", "  evaluator: launch -> its instance healthy", "s", last.evaluator_healthy_s, None, ""))
    for i, (label, times) in enumerate(context.items(), 1):
        rows.append((f"C{i}", label, "s", statistics.median(times), None, f"{min(times):.2f}-{max(times):.2f}"))

    print(f"dspyrt up start-up: {args.reps} runs (median) after {args.warmup} uncounted, {len(expected)} agents")
    print(f"python {sys.version.split()[0]}; {versions()}")
    print(
        f"{os.cpu_count()} CPUs ({cpu_model()}); load average {load_before} at the start, {load_average()} at the end"
    )
    print(f"{'id':<4} {'what':<66} {'figure':>9} {'target':>8}  {'':<6}  range / peak")
    for id_, what, unit, figure, target, spread in rows:
        shown = "-" if figure is None else f"{figure:.0f} {unit}" if unit == "MB" else f"{figure:.2f} {unit}"
        aim = "" if target is None else f"{target:.0f} {unit}" if unit == "MB" else f"{target:.1f} {unit}"
        print(f"{id_:<4} {what:<66} {shown:>9} {aim:>8}  {verdict(figure, target):<6}  {spread}")
    slow = sorted(last.first_healthy.items(), key=lambda kv: -kv[1])[:3]
    print("last run, the agents healthy last: " + ", ".join(f"{a} {t:.2f} s" for a, t in slow))
    if warmups:
        print("uncounted: " + ", ".join(f"healthy {w.healthy_s:.2f} s" for w in warmups))
    print(f"total {time.perf_counter() - began:.0f} s")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "python": sys.version.split()[0],
                    "versions": versions(),
                    "cpus": os.cpu_count(),
                    "cpu": cpu_model(),
                    "load_average": {"start": load_before, "end": load_average()},
                    "agents": expected,
                    "targets": {"healthy_s": TARGET_HEALTHY_S, "rss_mb": TARGET_RSS_MB},
                    "rows": [
                        {"id": i, "what": w.strip(), "unit": u, "figure": f, "target": t, "met": verdict(f, t) or None}
                        for i, w, u, f, t, _ in rows
                    ],
                    "runs": [asdict(r) for r in runs],
                    "warmups": [asdict(w) for w in warmups],
                    "context": context,
                },
                indent=1,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
