"""CLI startup benchmark: what a command costs before it does anything, next to a bare Python.

It starts a system with ``dspyrt up`` in a temporary folder (embedded nats-server; by default the light agents
``system``, ``gateway`` and ``example``, ``--all-agents`` for every one), then times, as a user runs them from that
folder, ``python -c pass``, ``dspyrt --help`` and ``dspyrt status``: ``--rounds`` interleaved rounds, and the
median, fastest and slowest wall time of each. ``status`` includes its scatter-gather of ``$SRV.STATS``, which
waits ``quiet`` (0.25 s) after the last reply.

``--compare DIR`` adds a column for another source tree of the project run with the same interpreter (e.g. the
last commit: ``git archive HEAD | tar -x -C /tmp/before``), timed in the same rounds: before and after, side by
side, under the same load. ``--importtime CMD`` prints where ``python -X importtime`` says the command's imports
spend their time (``help`` or ``status``), and exits.

    .venv/bin/python benchmarks/bench_cli.py
    .venv/bin/python benchmarks/bench_cli.py --rounds 30 --compare /tmp/before
    .venv/bin/python benchmarks/bench_cli.py --importtime status

This is a benchmark, not a test: nothing here asserts on timing; the targets are reported as met or missed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import importtime_rows, load_average, versions

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DSPYRT = BIN / "dspyrt"
LIGHT_AGENTS = "system,gateway,example"
# The targets on the development machine (2 shared cores), seconds.
TARGETS = {"dspyrt --help": 0.4, "dspyrt status": 0.6}
READY_TIMEOUT = 120.0


@dataclass(frozen=True)
class Command:
    label: str
    argv: list[str]
    uses_tree: bool  # run with the compared source tree too


COMMANDS = [
    Command("python -c pass", [sys.executable, "-c", "pass"], uses_tree=False),
    Command("dspyrt --help", [str(DSPYRT), "--help"], uses_tree=True),
    Command("dspyrt status", [str(DSPYRT), "status"], uses_tree=True),
]


def clean_env(tree: Path | None = None) -> dict[str, str]:
    """The environment without the developer's DSPYRT_*/OTEL_* settings; ``tree`` first on the import path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSPYRT_", "OTEL_", "PYTHONPATH"))}
    env |= {"DSPYRT_LOG_LEVEL": "WARNING", "COLUMNS": "120"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def start_system(workdir: Path, agents: str | None) -> subprocess.Popen[bytes]:
    argv = [str(DSPYRT), "up"] + (["--agents", agents] if agents else [])
    log = (workdir / "up.log").open("wb")
    process = subprocess.Popen(argv, cwd=workdir, env=clean_env(), stdout=log, stderr=log, start_new_session=True)
    expected = len(agents.split(",")) if agents else 1
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"dspyrt up exited with {process.returncode}: see {workdir / 'up.log'}")
        if (workdir / ".dspyrt" / "system.json").is_file():
            done = subprocess.run(
                [str(DSPYRT), "status", "--json"], cwd=workdir, env=clean_env(), capture_output=True, check=False
            )
            try:
                answered = len(json.loads(done.stdout)["agents"])
            except (ValueError, KeyError):
                answered = 0
            if answered >= expected:
                return process
        time.sleep(0.5)
    stop_system(process)
    raise SystemExit(f"the system did not come up within {READY_TIMEOUT:.0f}s: see {workdir / 'up.log'}")


def stop_system(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):  # status: 1 when an agent is unhealthy (still a full run)
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return elapsed


def importtime(which: str, workdir: Path) -> None:
    args = ["--help"] if which == "help" else ["status"]
    code = "import sys; from dspyrt.runtime.cli import main; sys.argv[0] = 'dspyrt'; main()"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *args], cwd=workdir, env=clean_env(), capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    rows = importtime_rows(done.stderr)
    total = sum(self_us for _, self_us, _ in rows)
    print(f"dspyrt {' '.join(args)}: {len(rows)} modules, {total / 1e6:.3f} s of imports (self times summed)")
    print(f"{'cumulative s':>12}  {'self s':>7}  module")
    for cumulative, self_us, name in sorted(rows, reverse=True)[:30]:
        print(f"{cumulative / 1e6:12.3f}  {self_us / 1e6:7.3f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--all-agents", action="store_true", help="start every agent, not just the light ones")
    parser.add_argument("--compare", type=Path, help="another source tree of the project to time alongside")
    parser.add_argument("--importtime", choices=["help", "status"], help="print the command's import times, exit")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dspyrt-bench-cli-") as tmp:
        workdir = Path(tmp)
        agents = None if args.all_agents else LIGHT_AGENTS
        system = start_system(workdir, agents)
        try:
            if args.importtime:
                importtime(args.importtime, workdir)
                return
            trees: list[Path | None] = [None] + ([args.compare.resolve()] if args.compare else [])
            times: dict[tuple[str, Path | None], list[float]] = {}
            for command in COMMANDS:  # one untimed run each: the first run pays for cold caches (.pyc, disk)
                for tree in trees if command.uses_tree else [None]:
                    timed(command.argv, workdir, clean_env(tree))
            for _ in range(args.rounds):
                for command in COMMANDS:
                    for tree in trees if command.uses_tree else [None]:
                        times.setdefault((command.label, tree), []).append(
                            timed(command.argv, workdir, clean_env(tree))
                        )
        finally:
            stop_system(system)

    print(f"dspyrt CLI startup: {args.rounds} interleaved rounds, system with agents {agents or 'all'}")
    print(f"python {sys.version.split()[0]}; {versions()}; load average {load_average()}")
    head = f"{'command':<16} {'median s':>9} {'fastest':>8} {'slowest':>8} {'target':>7}"
    if args.compare:
        head += f"  {'compared tree':>13} {'ratio':>6}"
    print(head)
    for command in COMMANDS:
        ours = times[(command.label, None)]
        median = statistics.median(ours)
        target = TARGETS.get(command.label)
        met = "" if target is None else f"{target:.1f} {'met' if median <= target else 'missed'}"
        line = f"{command.label:<16} {median:9.3f} {min(ours):8.3f} {max(ours):8.3f} {met:>7}"
        if args.compare and command.uses_tree:
            theirs = statistics.median(times[(command.label, args.compare.resolve())])
            line += f"  {theirs:13.3f} {median / theirs:6.2f}"
        print(line)
    if args.compare:
        print(f"compared tree: {args.compare} (ratio: this tree's median / the compared tree's)")


if __name__ == "__main__":
    main()
