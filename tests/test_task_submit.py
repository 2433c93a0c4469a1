"""Tasks cannot be lost between submit and run (issue 11).

- a kind nobody serves (a typo) is refused at submit, before anything is written, with the served kinds;
- an envelope whose ``kind`` disagrees with its subject is dead-lettered, not run as the subject's kind;
- a submit cut off between its record and its publish (the server killed in between) is completed by submitting
  the same id again, and a task that is queued, running or finished is never run twice by a re-submit;
- ``dspyrt submit --wait`` says when no worker picked the task up, and gives up at ``--timeout``.

Real nats-servers throughout; the cut is made by a TCP proxy in front of the server that kills the server when it
sees the task's publish go by, so the client's real submit path stops exactly between its two steps.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from anyio.abc import TaskStatus as AnyioTaskStatus

from dspyrt.bus import Bus, EmbeddedServer, Message, TaskStatus, ensure_streams
from dspyrt.bus.messages import MSG_ID_HEADER, TASK_ID_HEADER
from dspyrt.bus.tasks import TaskEnvelope, UnknownKindError
from dspyrt.runtime.agent import Agent, RetryPolicy, TaskContext, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import ROOT, dead_letters_of, hosting, restartable_server, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    with restartable_server(tmp_path) as server:
        yield server


class Job(Message):
    n: int
    hold: bool = False  # wait for the test to open the ledger's gate


class Done(Message):
    n: int
    attempt: int


class Ledger:
    """What the handlers did, shared by every replica of a test."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.gate = anyio.Event()


class Multiplier(Agent):
    name = "multiplier"

    def __init__(self, config: IntegrationConfig, ledger: Ledger) -> None:
        super().__init__(config)
        self.ledger = ledger

    async def _run(self, job: Job, ctx: TaskContext, factor: int) -> Done:
        self.ledger.runs[ctx.task_id] += 1
        if job.hold:
            await self.ledger.gate.wait()
        return Done(n=job.n * factor, attempt=ctx.attempt)

    @task("double")
    async def double(self, job: Job, ctx: TaskContext) -> Done:
        return await self._run(job, ctx, 2)

    @task("triple")
    async def triple(self, job: Job, ctx: TaskContext) -> Done:
        return await self._run(job, ctx, 3)


class Parent(Agent):
    """Submits a child task of a kind nobody serves, as an agent does (its own ``Client``)."""

    name = "parent"

    @task("parent", retry=RetryPolicy(max_attempts=2))
    async def parent(self, job: Job, ctx: TaskContext) -> Done:
        await self.client.submit("no-such-child", {"n": job.n}, task_id=f"{ctx.task_id}-child")
        return Done(n=job.n, attempt=ctx.attempt)


async def task_messages(bus: Bus) -> int:
    """Task messages in the work queue (not yet acknowledged or terminated)."""
    return int((await bus.js.stream_info(bus.subjects.task_stream)).state.messages)


async def dspyrt(
    config: IntegrationConfig, workdir: Path, *args: str, url: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The real CLI in its own process, against ``url`` (else the test's server)."""
    env = {
        **os.environ,
        "DSPYRT_NATS_URLS": url or ",".join(config.nats_urls),
        "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
        "DSPYRT_STATE_DIR": str(workdir / "cli"),
        "COLUMNS": "500",  # rich wraps at 80 columns when stderr is not a terminal
    }
    with anyio.fail_after(60):
        return await anyio.run_process([sys.executable, "-m", "dspyrt.runtime.cli", *args], env=env,
            check=False, cwd=ROOT)


# ----------------------------------------------------------------------------------------- unknown kinds


async def test_a_kind_nobody_serves_is_refused_at_once_with_the_served_kinds(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    async with hosting(Multiplier(config, Ledger())):
        fresh = Client(bus, client.store, identity="test")  # nothing cached: the refusal a CLI run sees
        started = time.perf_counter()
        with pytest.raises(UnknownKindError) as refused:
            await fresh.submit("doubel", Job(n=1), task_id="typo")
        elapsed = time.perf_counter() - started
        print(f"typo'd kind refused in {elapsed * 1000:.1f} ms (fresh client)")
        error = refused.value
        assert error.code == "unknown_kind"
        assert error.served == ("double", "triple")
        assert "no worker serves task kind 'doubel'" in error.message
        assert "Served kinds: double, triple" in error.message
        assert "Did you mean 'double'?" in error.message
        # refused before anything was written: no record, no message
        assert await client.store.get("typo") is None
        assert await task_messages(bus) == 0
        # a served kind goes through (the answer is remembered briefly: no second round trip)
        assert (await fresh.submit("double", Job(n=1))).created
        started = time.perf_counter()
        with pytest.raises(UnknownKindError):
            await fresh.submit("doubel", Job(n=1))
        print(f"typo'd kind refused in {(time.perf_counter() - started) * 1000:.1f} ms (warm client)")


async def test_a_kind_is_served_from_its_first_worker_on_even_while_none_runs(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    """Unknown kinds are asked about again before they are refused (a worker may have just started); the
    kind's queue outlives its workers, so a kind stays served while no worker runs."""
    with pytest.raises(UnknownKindError, match="none \\(no worker has started yet\\)"):
        await client.submit("double", Job(n=1))
    ledger = Ledger()
    async with hosting(Multiplier(config, ledger)):
        record = await client.run("double", Job(n=4), timeout=20)  # the same client, right after its refusal
        assert record.result == {"n": 8, "attempt": 1}
    # every worker gone: still served, the task waits in the queue for the next one
    queued = await client.submit("triple", Job(n=2))
    assert queued.created
    async with hosting(Multiplier(config, ledger)):
        assert (await client.result(queued.task_id, timeout=20)).result == {"n": 6, "attempt": 1}


async def test_require_worker_false_queues_a_task_for_a_worker_yet_to_come(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    """The documented escape hatch: a deployment may submit before the first worker of a kind has started."""
    early = await client.submit("double", Job(n=5), require_worker=False)
    assert early.created
    assert (await client.task(early.task_id)).status is TaskStatus.PENDING
    async with hosting(Multiplier(config, Ledger())):
        assert (await client.result(early.task_id, timeout=20)).result == {"n": 10, "attempt": 1}


async def test_a_child_task_of_a_kind_nobody_serves_fails_its_parent_with_the_reason(
    config: IntegrationConfig, client: Client
) -> None:
    """Agents submit through the same path. The refusal is retried like any transient error (a worker of the
    child's kind may be starting in a rolling deploy), then the parent is dead-lettered with the reason."""
    async with hosting(Parent(config)):
        record = await client.run("parent", Job(n=1), timeout=30)
    assert record.status is TaskStatus.DEAD
    assert record.error is not None
    assert "unknown_kind" in record.error.message
    assert "no worker serves task kind 'no-such-child'" in record.error.message
    assert "Served kinds: parent" in record.error.message
    assert await client.store.get(f"{record.id}-child") is None


async def test_the_cli_refuses_a_typo_with_the_served_kinds(
    config: IntegrationConfig, client: Client, tmp_path: Path
) -> None:
    job = tmp_path / "job.json"
    job.write_text('{"n": 2}')
    async with hosting(Multiplier(config, Ledger())):
        started = time.perf_counter()
        result = await dspyrt(config, tmp_path, "submit", "doubel", str(job), "--wait")
        print(f"'dspyrt submit doubel ... --wait' exited {result.returncode} in {time.perf_counter() - started:.2f} s")
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "unknown_kind: no worker serves task kind 'doubel'" in stderr
    assert "Served kinds: double, triple. Did you mean 'double'?" in stderr
    assert await client.tasks() == []


# ----------------------------------------------------------------------------------------- kind mismatch


async def test_an_envelope_whose_kind_disagrees_with_its_subject_is_dead_lettered(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    ledger = Ledger()
    async with hosting(Multiplier(config, ledger)) as host:
        envelope = TaskEnvelope(id="claimed", kind="triple", input={"n": 5})
        ack = await bus.js.publish(
            config.subjects.task("double"),
            envelope.model_dump_json().encode(),
            headers={MSG_ID_HEADER: "claimed", TASK_ID_HEADER: "claimed"},
        )
        [letter] = await dead_letters_of(client, f"invalid-{ack.seq}")
        assert letter.reason.code == "kind_mismatch"
        assert letter.reason.message == (
            f"task 'claimed' says kind 'triple' but came on {config.subjects.task('double')} (kind 'double'); "
            "not run. Submit it as 'triple'."
        )
        assert letter.deliveries == 1
        assert ledger.runs == Counter()  # run as neither kind
        assert host.workers[0].stats.failed + host.workers[1].stats.failed == 1
        assert await client.store.get("claimed") is None  # the id it claims is not touched
        assert (await client.task(f"invalid-{ack.seq}")).status is TaskStatus.FAILED
        assert await task_messages(bus) == 0
        # the letter keeps the envelope: replayed after a look, it runs as the kind it names
        assert await client.replay(f"invalid-{ack.seq}") == "claimed"
        record = await client.result("claimed", timeout=20)
    assert record.status is TaskStatus.SUCCEEDED
    assert record.result == {"n": 15, "attempt": 1}
    assert ledger.runs == Counter({"claimed": 1})


# ----------------------------------------------------------------------------------------- re-submitting


async def test_submitting_a_queued_task_again_never_runs_it_twice(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    """Inside the duplicate window the server drops the copy; after it, two copies of one task sit in the queue,
    and only the first delivered runs it. Running and finished tasks are not published again at all."""
    await ensure_streams(bus, dataclasses.replace(config.stream_layout, task_duplicate_window=1.0))
    ledger = Ledger()
    async with hosting(Multiplier(config, ledger)):
        pass  # its consumer exists: the kind is served, though no worker runs now

    first = await client.submit("double", Job(n=1, hold=True), task_id="twice")
    again = await client.submit("double", Job(n=1, hold=True), task_id="twice")
    assert (first.created, again.created, again.requeued) == (True, False, False)
    assert await task_messages(bus) == 1  # dropped as a duplicate by the server

    await anyio.sleep(1.5)  # past the duplicate window: the server no longer knows the message id
    late = await client.submit("double", Job(n=1, hold=True), task_id="twice")
    assert (late.created, late.requeued) == (False, True)
    assert await task_messages(bus) == 2  # two copies of one task

    async with hosting(Multiplier(config, ledger)) as a, hosting(Multiplier(config, ledger)) as b:
        workers = [*a.workers, *b.workers]
        await wait_until(lambda: ledger.runs["twice"] == 1, what="the task started")
        # the other copy is delivered while the first runs: acknowledged without running
        await wait_until(lambda: sum(w.stats.duplicates for w in workers) == 1, what="the copy dropped")
        assert (await client.task("twice")).status is TaskStatus.RUNNING
        running = await client.submit("double", Job(n=1), task_id="twice")
        assert (running.created, running.requeued) == (False, False)
        ledger.gate.set()
        record = await client.result("twice", timeout=20)
        await wait_until(lambda: _no_task_messages(bus), what="queue empty")
    assert record.result == {"n": 2, "attempt": 1}
    assert ledger.runs["twice"] == 1

    finished = await client.submit("double", Job(n=1), task_id="twice")
    assert (finished.created, finished.requeued) == (False, False)
    assert await task_messages(bus) == 0
    assert (await client.task("twice")).result == {"n": 2, "attempt": 1}


async def _no_task_messages(bus: Bus) -> bool:
    return await task_messages(bus) == 0


class CuttingProxy:
    """A TCP proxy in front of nats-server. Once armed, the ``after``-th publish on ``subject`` that a client sends
    through it is never forwarded: ``on_cut`` runs instead (the test kills the server) and that client's connection
    is closed. A real cut between two steps of the client's real code path. Then it disarms and relays again."""

    def __init__(self, target_port: int, subject: str, on_cut: Callable[[], None]) -> None:
        self.target_port = target_port
        self.pattern = f"PUB {subject} ".encode()  # the protocol's PUB and HPUB lines
        self.on_cut = on_cut
        self.port = 0
        self.cuts = 0
        self.cut = anyio.Event()
        self._countdown = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def arm(self, after: int = 1) -> None:
        self._countdown = after
        self.cut = anyio.Event()

    async def serve(self, *, task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(SocketAttribute.local_port)
        task_status.started()
        async with listener:
            await listener.serve(self._relay)

    def _cuts_here(self, data: bytes) -> bool:
        if self._countdown <= 0:
            return False
        self._countdown -= data.count(self.pattern)
        if self._countdown > 0:
            return False
        self._countdown = 0
        self.cuts += 1
        self.on_cut()
        self.cut.set()
        return True

    async def _relay(self, client: SocketStream) -> None:
        async with client:
            try:
                server = await anyio.connect_tcp("127.0.0.1", self.target_port)
            except OSError:
                return  # the server is down: so is this connection
            async with server, anyio.create_task_group() as tg:

                async def down() -> None:
                    try:
                        async for chunk in server:
                            await client.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(down)
                try:
                    async for chunk in client:
                        # (A publish line split across two reads is missed: the client sends each line whole.)
                        if self._cuts_here(chunk):
                            break
                        await server.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
                tg.cancel_scope.cancel()


async def test_a_submit_cut_off_by_a_server_crash_is_completed_by_submitting_the_id_again(
    nats_server: EmbeddedServer, config: IntegrationConfig, bus: Bus, client: Client, tmp_path: Path
) -> None:
    """``dspyrt submit`` writes the record; the server is SIGKILLed before the task's publish reaches it. The
    submit fails, the server comes back with the record ``pending`` and no message: submitting the same id
    again (what the error message says to do) queues it, and it runs once."""
    ledger = Ledger()
    job = tmp_path / "job.json"
    job.write_text('{"n": 21}')
    async with hosting(Multiplier(config, ledger)), anyio.create_task_group() as tg:
        proxy = CuttingProxy(nats_server.port, config.subjects.task("double"), nats_server.kill)
        await tg.start(proxy.serve)
        proxy.arm()
        cut = await dspyrt(config, tmp_path, "submit", "double", str(job), "--id", "cut-1", url=proxy.url)
        stderr = cut.stderr.decode()
        assert proxy.cuts == 1, stderr
        assert cut.returncode == 2, stderr
        assert "submitting task cut-1 did not complete" in stderr
        assert "repeat this command with --id cut-1" in stderr
        assert not nats_server.running

        nats_server.start()  # same port, same store
        await wait_until(lambda: bus.connected, what="the test's connection back")
        record = await client.task("cut-1")
        assert record.status is TaskStatus.PENDING  # the record made it, the message did not
        assert await task_messages(bus) == 0

        again = await dspyrt(
            config, tmp_path, "submit", "double", str(job), "--id", "cut-1", "--wait", "--timeout", "30"
        )
        stderr = again.stderr.decode()
        assert again.returncode == 0, stderr
        assert "task cut-1 was recorded but never queued (an earlier submit failed): queued now" in stderr
        tg.cancel_scope.cancel()
    record = await client.task("cut-1")
    assert record.status is TaskStatus.SUCCEEDED
    assert record.result == {"n": 42, "attempt": 1}
    assert ledger.runs == Counter({"cut-1": 1})


# ----------------------------------------------------------------------------------------- dspyrt submit --wait


async def test_wait_says_when_no_worker_picked_the_task_up_and_gives_up_at_its_timeout(
    config: IntegrationConfig, client: Client, tmp_path: Path
) -> None:
    ledger = Ledger()
    async with hosting(Multiplier(config, ledger)):
        pass  # a worker came and went: the kind is served, but nobody serves it now
    job = tmp_path / "job.json"
    job.write_text('{"n": 2}')
    started = time.perf_counter()
    waited = await dspyrt(
        config, tmp_path, "submit", "double", str(job), "--id", "lonely", "--wait", "--notice-after", "1",
        "--timeout", "4",
    )  # fmt: skip
    print(f"'dspyrt submit --wait --notice-after 1 --timeout 4' exited in {time.perf_counter() - started:.2f} s")
    stderr = waited.stderr.decode()
    assert waited.returncode == 124, stderr
    assert (
        "notice no worker has picked up task lonely in 1s: no worker may be serving kind 'double' "
        "(is its agent running? see 'dspyrt status'). Waiting up to 4s in all." in stderr
    )
    assert "timed out after 4s: task lonely (double) is still pending. It goes on" in stderr
    assert f"dspyrt submit double {job} --id lonely --wait" in stderr

    # the task goes on: once a worker serves the kind, the same command finds it and waits for its result
    async with hosting(Multiplier(config, ledger)):
        done = await dspyrt(config, tmp_path, "submit", "double", str(job), "--id", "lonely", "--wait", "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert "notice" not in done.stderr.decode()
    assert '"result": {' in done.stdout.decode()
    assert ledger.runs == Counter({"lonely": 1})
    assert (await client.task("lonely")).result == {"n": 4, "attempt": 1}
