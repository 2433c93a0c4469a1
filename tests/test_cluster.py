"""Faults on a real 3-node JetStream cluster (tests/cluster.py), with streams and buckets at 3 replicas.

Agents run as OS processes (``python -m tests.agent_proc``, the ``sleeper``) connected with all three URLs, or
in-process where a scenario needs an agent of its own. Each scenario counts its losses — tasks submitted that do
not end ``succeeded`` — and expects none:

(a) one node SIGKILLed mid-run (the task stream's leader);
(b) agent processes SIGKILLed at random mid-run and replaced;
(c) the whole cluster SIGKILLed and started again;
(d) a kind whose handlers hang does not hold up another kind on the same connection;
(e) a poison task is dead-lettered, and runs again after the fix with ``Client.replay``.

"No task with two different results" is checked on the record's whole history: the task bucket is created here
with 64 revisions per key before anything else opens it, so every write the workers made can be read back.
"""

from __future__ import annotations

import random
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from nats.errors import Error as NatsError
from nats.js import api

from dspyrt.bus import Bus, Message, PermanentError, TaskRecord, TaskStatus, TaskStore, ensure_streams
from dspyrt.runtime.agent import Agent, TaskContext, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.agent_proc import SleepJob
from tests.cluster import NatsCluster
from tests.helpers import AgentProcess, dead_letters_of, serving, wait_until

pytestmark = pytest.mark.timeout(120)

HISTORY = 64  # revisions kept per task record (the product keeps 1): enough to see every write


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as started:
        yield started


@pytest.fixture
def cluster_config(cluster: NatsCluster, prefix: str, tmp_path: Path) -> IntegrationConfig:
    return IntegrationConfig(
        nats_urls=cluster.urls,
        subject_prefix=prefix,
        state_dir=tmp_path / "state",
        stream_replicas=3,
        task_ack_wait=2.0,
        event_stream_max_mb=8,
        shutdown_grace=2.0,
    )


@pytest.fixture
async def cluster_bus(cluster: NatsCluster, cluster_config: IntegrationConfig) -> AsyncIterator[Bus]:
    await cluster.ready()
    config = cluster_config
    async with Bus(config.connection_options(name="test-client"), config.subjects) as bus:
        s = bus.subjects
        await bus.js.create_key_value(
            bucket=s.task_bucket, history=HISTORY, replicas=3, storage=api.StorageType.FILE, ttl=3600
        )
        await ensure_streams(bus, config.stream_layout)
        yield bus


@pytest.fixture
async def cluster_client(cluster_bus: Bus) -> Client:
    return Client(cluster_bus, await TaskStore.open(cluster_bus), identity="test")


async def start_sleeper(
    processes: list[AgentProcess], config: IntegrationConfig, workdir: Path, markers: Path, concurrency: int
) -> AgentProcess:
    # ack_wait is 2 s here (30 s by default): 20 deliveries keep a task alive through ~40 s of failed deliveries
    # (a fail-over makes task-record writes time out), still less than production's 4 x 30 s.
    process = AgentProcess(
        config, workdir, markers, stream_replicas=3, agent_concurrency=concurrency, task_max_deliver=20
    ).start()
    processes.append(process)
    await process.ready(timeout=30)
    return process


def done_markers(markers: Path) -> dict[str, list[tuple[int, int]]]:
    """(pid, attempt) of every finished handler run, by task id."""
    found: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for path in markers.glob("done-*"):
        task_id, pid, attempt = path.name.split("-")[1:]
        found[task_id].append((int(pid), int(attempt)))
    return found


async def record_histories(bus: Bus, timeout: float = 30.0) -> dict[str, list[TaskRecord]]:
    """Every stored revision of every task record, oldest first (read with one ordered consumer). JetStream API
    requests may time out for a few seconds after a node is lost (a new meta leader is being elected): retried."""
    bucket = bus.subjects.task_bucket
    head = f"$KV.{bucket}."
    with anyio.fail_after(timeout):
        while True:
            histories: dict[str, list[TaskRecord]] = defaultdict(list)
            try:
                info = await bus.js.stream_info(f"KV_{bucket}")
                if not info.state.messages:
                    return histories
                sub = await bus.js.subscribe(
                    f"{head}>", ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL, stream=f"KV_{bucket}"
                )
                try:
                    while True:
                        msg = await sub.next_msg(timeout=5)
                        if msg.data:
                            record = TaskRecord.model_validate_json(msg.data)  # key <kind>.<task id>
                            histories[record.id].append(record)
                        if not msg.metadata.num_pending:
                            return histories
                finally:
                    await sub.unsubscribe()
            except NatsError:
                await anyio.sleep(0.5)


async def wait_all(client: Client, ids: list[str], timeout: float) -> dict[str, TaskRecord]:
    """Every task's terminal record (the waits run side by side, across faults).

    ``Client.result`` gives up when one of its reads fails during a fail-over (``dspyrt.bus.tasks.wait_for_task`` does
    not retry a timed-out KV get); such a wait is started again here, within the same deadline, and counted."""
    records: dict[str, TaskRecord] = {}
    restarted = 0
    limit = anyio.Semaphore(50)

    async def one(task_id: str) -> None:
        nonlocal restarted
        async with limit:
            while task_id not in records:
                try:
                    records[task_id] = await client.result(task_id, timeout=timeout)
                except NatsError:
                    restarted += 1
                    await anyio.sleep(0.2)

    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            for task_id in ids:
                tg.start_soon(one, task_id)
    if restarted:
        print(f"client waits restarted after a failed read: {restarted}")
    return records


def check_outcome(
    scenario: str,
    ids: list[str],
    records: dict[str, TaskRecord],
    histories: dict[str, list[TaskRecord]],
    markers: Path | None = None,
) -> None:
    """Losses, and tasks whose stored result changed after success: both must be zero."""
    lost = [i for i in ids if records[i].status is not TaskStatus.SUCCEEDED]
    rewritten = []
    for task_id in ids:
        history = histories[task_id]
        successes = [r for r in history if r.status is TaskStatus.SUCCEEDED]
        if len(successes) != 1 or history[-1] != successes[0] or records[task_id].result != successes[0].result:
            rewritten.append(task_id)
    retried = sum(1 for i in ids if records[i].attempts > 1)
    line = f"cluster scenario {scenario}: submitted={len(ids)} lost={len(lost)} rewritten={len(rewritten)}"
    line += f" redelivered={retried}"
    if markers is not None:
        done = done_markers(markers)
        # the stored result names the process and delivery that produced it, and that run did finish
        unmatched = [i for i in ids if (records[i].result["pid"], records[i].result["attempt"]) not in done.get(i, [])]
        ran_twice = sum(1 for i in ids if len(done.get(i, [])) > 1)
        line += f" ran_to_completion_more_than_once={ran_twice} unmatched={len(unmatched)}"
        assert unmatched == [], unmatched[:5]
    print(line)
    assert lost == [], [(i, records[i].status, records[i].error) for i in lost[:5]]
    assert rewritten == [], [(i, [(r.status, r.result) for r in histories[i]]) for i in rewritten[:5]]


async def submit_sleeps(client: Client, count: int, seconds: float) -> list[str]:
    return [(await client.submit("sleep", SleepJob(seconds=seconds))).task_id for _ in range(count)]


async def test_streams_and_buckets_have_three_replicas(
    cluster_bus: Bus, cluster_config: IntegrationConfig, cluster: NatsCluster
) -> None:
    s = cluster_bus.subjects
    for stream in (s.task_stream, s.event_stream, s.dlq_stream, f"KV_{s.task_bucket}"):
        info = await cluster_bus.js.stream_info(stream)
        assert info.config.num_replicas == 3, stream
        assert info.cluster is not None
        assert len(info.cluster.replicas or []) == 2, stream  # the leader plus two followers


async def test_a_node_killed_mid_run_loses_nothing(
    cluster: NatsCluster,
    cluster_config: IntegrationConfig,
    cluster_bus: Bus,
    cluster_client: Client,
    tmp_path: Path,
    processes: list[AgentProcess],
) -> None:
    markers = tmp_path / "markers"
    for i in range(2):
        await start_sleeper(processes, cluster_config, tmp_path / f"agent{i}", markers, concurrency=4)
    ids = await submit_sleeps(cluster_client, 200, 0.1)

    await wait_until(lambda: len(done_markers(markers)) >= 40, timeout=60, what="40 tasks done")
    info = await cluster_bus.js.stream_info(cluster_bus.subjects.task_stream)
    assert info.cluster is not None and info.cluster.leader
    victim = cluster.node(info.cluster.leader)
    cluster.kill(victim)  # the task stream's leader: the worst node to lose
    done_at_kill = len(done_markers(markers))

    records = await wait_all(cluster_client, ids, timeout=90)
    assert len(done_markers(markers)) > done_at_kill  # progress resumed on the two nodes left
    assert all(p.process is not None and p.process.poll() is None for p in processes)
    check_outcome("a (node killed)", ids, records, await record_histories(cluster_bus), markers)


async def test_agents_killed_at_random_lose_nothing_and_store_one_result(
    cluster_config: IntegrationConfig,
    cluster_bus: Bus,
    cluster_client: Client,
    tmp_path: Path,
    processes: list[AgentProcess],
) -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    print(f"cluster scenario b: seed={seed}")
    markers = tmp_path / "markers"
    alive = [
        await start_sleeper(processes, cluster_config, tmp_path / f"agent{i}", markers, concurrency=4) for i in range(3)
    ]
    ids = await submit_sleeps(cluster_client, 200, 0.1)

    for kill in range(3):
        threshold = 40 * (kill + 1)
        await wait_until(lambda t=threshold: len(done_markers(markers)) >= t, timeout=60, what=f"{threshold} done")
        victim = rng.choice(alive)
        alive.remove(victim)
        victim.signal(signal.SIGKILL)  # mid-task: it holds up to 4 deliveries
        assert await victim.wait() == -signal.SIGKILL
        alive.append(
            await start_sleeper(processes, cluster_config, tmp_path / f"replacement{kill}", markers, concurrency=4)
        )

    records = await wait_all(cluster_client, ids, timeout=90)
    check_outcome("b (agents killed)", ids, records, await record_histories(cluster_bus), markers)
    assert any(r.attempts > 1 for r in records.values())  # the kills did hit tasks in flight


async def test_the_whole_cluster_restarted_mid_run_loses_nothing(
    cluster: NatsCluster,
    cluster_config: IntegrationConfig,
    cluster_bus: Bus,
    cluster_client: Client,
    tmp_path: Path,
    processes: list[AgentProcess],
) -> None:
    markers = tmp_path / "markers"
    agents = [
        await start_sleeper(processes, cluster_config, tmp_path / f"agent{i}", markers, concurrency=4) for i in range(2)
    ]
    ids = await submit_sleeps(cluster_client, 200, 0.1)

    await wait_until(lambda: len(done_markers(markers)) >= 40, timeout=60, what="40 tasks done")
    cluster.kill_all()  # SIGKILL, all three at once
    done_at_kill = len(done_markers(markers))
    await anyio.sleep(0.5)
    cluster.start()  # same ports, same stores
    await cluster.ready(timeout=60)

    records = await wait_all(cluster_client, ids, timeout=90)
    assert len(done_markers(markers)) > done_at_kill
    # the same processes finished the run over reconnected connections
    assert all(a.process is not None and a.process.poll() is None for a in agents)
    check_outcome("c (cluster restarted)", ids, records, await record_histories(cluster_bus), markers)


# --- in-process agents for (d) and (e) ----------------------------------------------------------------------


class Job(Message):
    n: int = 0
    poison: bool = False


class Done(Message):
    n: int


class Crawler(Agent):
    """Its handlers wait for the test to open ``gate``: a kind that is as slow as it gets."""

    name = "crawler"
    gate: anyio.Event | None = None
    holding = 0

    @task("crawl")
    async def crawl(self, job: Job, ctx: TaskContext) -> Done:
        assert Crawler.gate is not None
        Crawler.holding += 1
        await Crawler.gate.wait()
        return Done(n=job.n)


class Sprinter(Agent):
    name = "sprinter"

    @task("sprint")
    async def sprint(self, job: Job, ctx: TaskContext) -> Done:
        return Done(n=job.n)


class Fragile(Agent):
    """Crashes on a poisoned job until ``fixed``; a crash is an unexpected error, so it is retried first."""

    name = "fragile"
    fixed = False

    @task("fragile")
    async def fragile(self, job: Job, ctx: TaskContext) -> Done:
        if job.poison and not Fragile.fixed:
            raise RuntimeError("poisoned input: the handler crashes on it")
        if job.n < 0:
            raise PermanentError("negative n")
        return Done(n=job.n)


async def test_a_hung_kind_does_not_hold_up_another(
    cluster_config: IntegrationConfig, cluster_bus: Bus, cluster_client: Client
) -> None:
    Crawler.gate, Crawler.holding = anyio.Event(), 0
    config = cluster_config.model_copy(update={"agent_concurrency": 8})
    try:
        async with serving(config, [Crawler, Sprinter]):  # one process, one connection, both kinds
            crawls = [(await cluster_client.submit("crawl", Job(n=i))).task_id for i in range(40)]
            await wait_until(lambda: Crawler.holding == 8, timeout=30, what="the crawler's 8 slots taken")
            sprints = [(await cluster_client.submit("sprint", Job(n=i))).task_id for i in range(100)]

            sprinted = await wait_all(cluster_client, sprints, timeout=60)
            stuck = [await cluster_client.task(i) for i in crawls]
            assert [r.status for r in stuck].count(TaskStatus.SUCCEEDED) == 0  # the gate is still shut
            assert Crawler.holding == 8  # and the crawler took no more than its slots

            Crawler.gate.set()
            crawled = await wait_all(cluster_client, crawls, timeout=60)
    finally:
        if Crawler.gate is not None:
            Crawler.gate.set()
    records = {**sprinted, **crawled}
    check_outcome("d (hung kind beside a fast one)", crawls + sprints, records, await record_histories(cluster_bus))
    assert [sprinted[i].result["n"] for i in sprints] == list(range(100))


async def test_a_poison_task_is_dead_lettered_and_replayed_after_the_fix(
    cluster_config: IntegrationConfig, cluster_bus: Bus, cluster_client: Client
) -> None:
    Fragile.fixed = False
    config = cluster_config.model_copy(update={"task_max_deliver": 2})
    async with serving(config, [Fragile]):
        poison = (await cluster_client.submit("fragile", Job(n=7, poison=True))).task_id
        good = [(await cluster_client.submit("fragile", Job(n=i))).task_id for i in range(20)]

        dead = await cluster_client.result(poison, timeout=30)
        assert dead.status is TaskStatus.DEAD
        assert dead.error is not None and dead.error.code == "exhausted"
        [letter] = await dead_letters_of(cluster_client, poison)
        assert letter.deliveries == 2
        assert "poisoned input" in letter.reason.message
        healthy = await wait_all(cluster_client, good, timeout=30)  # the others were never held up

        Fragile.fixed = True  # the fix is deployed
        assert await cluster_client.replay(poison) == poison
        replayed = await cluster_client.result(poison, timeout=30)
    assert replayed.status is TaskStatus.SUCCEEDED
    assert replayed.result == {"n": 7}
    assert replayed.attempts == 1
    history = (await record_histories(cluster_bus))[poison]
    assert [r.status for r in history].count(TaskStatus.DEAD) == 1
    assert history[-1].status is TaskStatus.SUCCEEDED
    ids = [*good, poison]
    check_outcome("e (poison replayed)", ids, {**healthy, poison: replayed}, await record_histories(cluster_bus))
