"""``RequestPool``: runs each request on a reused worker task instead of a new task per request.

A micro endpoint's callback sees one message at a time, so every request has to be handed to a task of its own to
run concurrently. Spawning one per request through an anyio task group cost about 17 µs of CPU (task, cancel scope,
task-group bookkeeping); handing it to a waiting worker through an ``asyncio.Queue`` costs about 2 µs
(benchmarks/bench_foundation.py ``--profile rr-untraced``). Workers are started on demand, never more than the
requests in flight (the caller holds the concurrency limit), and live in the caller's task group.

Each worker runs under its own shielded cancel scope, registered in ``running``: cancelling the task group does not
interrupt a request being answered; the host waits for in-flight requests within its grace period and then cancels
what is left through those scopes (idle workers included). Jobs share their worker's context: a job resets the
context variables it sets (the host does so for who asks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

Job = Callable[[], Awaitable[None]]


class RequestPool:
    def __init__(self, workers: TaskGroup, running: set[anyio.CancelScope]) -> None:
        self._workers = workers
        self._running = running
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._idle = 0  # workers waiting in ``get``; each takes exactly one job when it wakes

    def submit(self, job: Job) -> None:
        """Run ``job`` on a worker; the caller bounds how many are submitted and not yet finished."""
        self._queue.put_nowait(job)
        if self._queue.qsize() > self._idle:
            self._workers.start_soon(self._work)

    async def _work(self) -> None:
        with anyio.CancelScope(shield=True) as scope:
            self._running.add(scope)
            try:
                while True:
                    self._idle += 1
                    try:
                        job = await self._queue.get()
                    finally:
                        self._idle -= 1
                    await job()  # jobs handle their own errors: a failure must not end the worker
            finally:
                self._running.discard(scope)
