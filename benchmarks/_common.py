"""What every benchmark here measures the same way: CPU from /proc, the machine's load, the package versions.

The benchmarks run as scripts (``python benchmarks/bench_X.py``), so this folder is on ``sys.path``.
"""

from __future__ import annotations

import os
from importlib import metadata

PACKAGES = ("dspy", "nats-py", "anyio", "pydantic", "opentelemetry-sdk")


def proc_cpu(pid: int | None) -> float:
    """utime + stime of a process from /proc, seconds (0 where /proc is not available)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores, /proc/stat), 0 where unavailable."""
    try:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def load_average(sep: str = "/") -> str:
    try:
        return sep.join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def versions(names: tuple[str, ...] = PACKAGES) -> str:
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} ?")
    return ", ".join(parts)


def importtime_rows(stderr: str) -> list[tuple[int, int, str]]:
    """``python -X importtime``'s report as (cumulative us, self us, module) rows."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|", 2)
        rows.append((int(cumulative_us), int(self_us), name.rstrip()))
    return rows
