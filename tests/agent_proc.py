"""An agent process for the fault tests: ``python -m tests.agent_proc``.

Configuration comes from the DSPYRT_* environment exactly as for ``dspyrt agent``; the process runs
``dspyrt.runtime.supervisor.serve`` (so SIGTERM drains it) with one agent, ``sleeper``, whose ``sleep`` task leaves
marker files in ``$TEST_AGENT_MARKERS``: ``started-<task>-<pid>-<attempt>`` when a delivery begins and
``done-<task>-<pid>-<attempt>`` when the handler has finished its work.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import anyio
from pydantic import Field

from dspyrt.bus import Message
from dspyrt.runtime.agent import Agent, TaskContext, task
from dspyrt.runtime.config import load_config
from dspyrt.runtime.supervisor import RunningSystem, serve


class SleepJob(Message):
    seconds: float = Field(ge=0, le=60)


class SleepResult(Message):
    pid: int
    attempt: int


def _mark(stage: str, ctx: TaskContext) -> None:
    markers = Path(os.environ["TEST_AGENT_MARKERS"])
    (markers / f"{stage}-{ctx.task_id}-{os.getpid()}-{ctx.attempt}").touch()


class Sleeper(Agent):
    name = "sleeper"
    description = "sleeps on request; for fault tests"

    @task("sleep")
    async def sleep(self, job: SleepJob, ctx: TaskContext) -> SleepResult:
        _mark("started", ctx)
        await anyio.sleep(job.seconds)
        _mark("done", ctx)
        return SleepResult(pid=os.getpid(), attempt=ctx.attempt)


def main() -> None:
    config = load_config()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")

    async def on_ready(system: RunningSystem) -> None:
        (config.state_dir / "ready").write_text(str(os.getpid()))

    anyio.run(partial(serve, config, [Sleeper], on_ready=on_ready, process_name="test-sleeper"))


if __name__ == "__main__":
    main()
