"""Co-tenants: no client can touch another's work, enforced by the server's permissions plus the gateway.

A real nats-server runs the deployment's accounts (``deploy/nats/gen_accounts.py``) with two client users,
``client`` and ``team-b``. Each attempt of the table below is made from outside, as that user would, with raw
nats-py (not our client) where it is a NATS operation; each must be refused, and the server's log must show the
refusal. Through the gateway, each client sees and touches its own tasks only.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from dspyrt.bus import Bus, EmbeddedServer, RemoteError, TaskRecord, TaskStatus, TaskStore, ensure_streams
from dspyrt.bus.events import publish_event
from dspyrt.bus.subjects import inbox_prefix
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.gateway import GatewayAgent, GatewayTasks
from tests.helpers import serving, wait_until
from tests.test_deploy_configs import SecuredServer, gen

pytestmark = pytest.mark.timeout(90)

CLIENTS = ("client", "team-b")


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredServer]:
    """A nats-server with the deployment's accounts for two client users, passwords of its own."""
    directory = tmp_path_factory.mktemp("tenants")
    (directory / "accounts.conf").write_text(gen.render("dspy", CLIENTS))
    (directory / "server.conf").write_text("include ./accounts.conf\n")
    passwords = {gen.password_variable(user): f"pw-{secrets.token_hex(16)}" for user in gen.users(CLIENTS)}
    log = directory / "server.log"
    with pytest.MonkeyPatch.context() as mp:
        for var, value in passwords.items():
            mp.setenv(var, value)
        server = EmbeddedServer(
            directory / "jetstream", extra_args=["-c", str(directory / "server.conf")], log_file=log
        ).start()
    try:
        yield SecuredServer(server, passwords, log)
    finally:
        server.stop()


def violations_of(server: SecuredServer, user: str) -> list[str]:
    return [line for line in server.violations() if line.split()[0] == user]


async def raw(server: SecuredServer, user: str, errors: list[str]) -> nats.NATS:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    return await nats.connect(
        server.url,
        user=user,
        password=server.passwords[gen.password_variable(user)],
        error_cb=on_error,
        allow_reconnect=False,
        inbox_prefix=inbox_prefix(user),
    )


# What a client must not be able to do, and why it matters. (subject to publish on, payload)
PUBLISH_ATTEMPTS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "push-consumer redirection: a consumer delivering its bytes to an agent-only endpoint",
        "$JS.API.CONSUMER.CREATE.KV_DSPY_tasks",
        {
            "stream_name": "KV_DSPY_tasks",
            "config": {
                "deliver_subject": "dspy.optimizer.set_active",
                "deliver_group": "dspy-workers",
                "ack_policy": "none",
            },
        },
    ),
    ("the same with a named consumer", "$JS.API.CONSUMER.CREATE.KV_DSPY_tasks.x.$KV.DSPY_tasks.>", {}),
    ("replaying every event of everyone", "$JS.API.CONSUMER.CREATE.DSPY_EVENTS", {}),
    ("writing (overwriting) a task record", "$KV.DSPY_tasks.victim-task", {"status": "succeeded"}),
    ("purging task records", "$JS.API.STREAM.PURGE.KV_DSPY_tasks", {}),
    ("deleting a task record", "$JS.API.STREAM.MSG.DELETE.KV_DSPY_tasks", {"seq": 1}),
    ("reading a record by sequence", "$JS.API.STREAM.MSG.GET.KV_DSPY_tasks", {"seq": 1}),
    ("reading a record by key", "$JS.API.DIRECT.GET.KV_DSPY_tasks.$KV.DSPY_tasks.victim-task", {}),
    ("reading or deleting queued tasks", "$JS.API.STREAM.MSG.GET.DSPY_TASKS", {"seq": 1}),
    ("queueing a task past the gateway", "dspy.task.wordcount", {"id": "x", "kind": "wordcount"}),
    ("acting as another client at the gateway", "dspy.gateway.team-b.submit", {"kind": "wordcount"}),
    ("an agent-internal endpoint", "dspy.optimizer.set_active", {"name": "copro"}),
    ("forging an event", "dspy.event.task.progress.wordcount.victim-task", {}),
]
SUBSCRIBE_ATTEMPTS: list[tuple[str, str]] = [
    ("watching every task record", "$KV.DSPY_tasks.>"),
    ("another client's replies", "_INBOX.team-b.>"),
    ("everyone's replies", "_INBOX.>"),
    ("every event (progress, scores, costs)", "dspy.event.>"),
    ("posing as the gateway", "dspy.gateway.*.submit"),
]


# What an agent must not do beyond its role: ``example`` serves ``wordcount`` only (and submits nothing), so the
# records and the progress of every other kind's tasks are out of its reach. (subject to publish on, payload)
AGENT_ATTEMPTS: list[tuple[str, str, dict[str, Any]]] = [
    ("writing a record of another kind", "$KV.DSPY_tasks.optimize.x", {"id": "x", "kind": "optimize"}),
    ("writing a record under a bare task id", "$KV.DSPY_tasks.x", {"id": "x", "kind": "wordcount"}),
    ("forging progress of another kind's task", "dspy.event.task.progress.optimize.x", {"phase": "done"}),
    ("forging progress under a bare task id", "dspy.event.task.progress.x", {"phase": "done"}),
]


@pytest.mark.parametrize(("why", "subject", "payload"), PUBLISH_ATTEMPTS, ids=[a[0] for a in PUBLISH_ATTEMPTS])
async def test_a_client_is_refused(tenants: SecuredServer, why: str, subject: str, payload: dict[str, Any]) -> None:
    await refused(tenants, "client", why, subject, payload)


@pytest.mark.parametrize(("why", "subject", "payload"), AGENT_ATTEMPTS, ids=[a[0] for a in AGENT_ATTEMPTS])
async def test_an_agent_is_refused_beyond_its_kinds(
    tenants: SecuredServer, why: str, subject: str, payload: dict[str, Any]
) -> None:
    await refused(tenants, "example", why, subject, payload)


async def refused(server: SecuredServer, user: str, why: str, subject: str, payload: dict[str, Any]) -> None:
    """``user`` publishes on ``subject`` with raw nats-py: the server refuses it, and logs the refusal."""
    errors: list[str] = []
    nc = await raw(server, user, errors)
    try:
        await nc.publish(subject, json.dumps(payload).encode(), reply=nc.new_inbox())
        await nc.flush()
        expected = f'permissions violation for publish to "{subject.lower()}"'
        await wait_until(lambda: any(expected in e for e in errors), timeout=5, what=f"refused: {why}")
        assert nc.is_connected
    finally:
        await nc.close()
    # and the server says so in its own log (written a moment later)
    await wait_until(lambda: f"{user} Publish {subject}" in server.violations(), timeout=5, what="logged")


async def test_an_agent_writes_the_records_and_progress_of_its_own_kind(tenants: SecuredServer, tmp_path: Path) -> None:
    """What the refusals above leave to ``example``: its own kind's records (create, update, delete, read back by
    bare id) and progress events, with no permission violation."""
    config = tenant_config(tenants, "example", tmp_path / "example")
    before = len(violations_of(tenants, "example"))
    task_id = f"own-{secrets.token_hex(4)}"
    async with Bus(config.connection_options(name="own-kind"), config.subjects) as bus:
        await ensure_streams(bus, config.stream_layout)
        store = await TaskStore.open(bus)
        assert await store.create(TaskRecord(id=task_id, kind="wordcount", status=TaskStatus.PENDING))

        def finish(record: TaskRecord | None) -> TaskRecord | None:
            assert record is not None
            return record.model_copy(update={"status": TaskStatus.SUCCEEDED, "result": {"words": 2}})

        await store.transition(task_id, finish, kind="wordcount")
        record = await store.get(task_id)  # by bare id: found by a filtered key listing
        assert record is not None and record.status is TaskStatus.SUCCEEDED and record.result == {"words": 2}
        assert store.key_subject(task_id, "wordcount") == f"$KV.DSPY_tasks.wordcount.{task_id}"
        await publish_event(bus, bus.subjects.task_progress_topic("wordcount", task_id), {"phase": "x"}, source="t")
        entry = await store.entry(task_id, "wordcount")
        assert entry is not None
        await store.delete(task_id, kind="wordcount", last=entry[1])
        assert await store.get(task_id) is None
    assert len(violations_of(tenants, "example")) == before


@pytest.mark.parametrize(("why", "subject"), SUBSCRIBE_ATTEMPTS, ids=[a[0] for a in SUBSCRIBE_ATTEMPTS])
async def test_a_client_may_not_listen(tenants: SecuredServer, why: str, subject: str) -> None:
    errors: list[str] = []
    nc = await raw(tenants, "client", errors)
    try:
        await nc.subscribe(subject)
        await nc.flush()
        expected = f'permissions violation for subscription to "{subject.lower()}"'
        await wait_until(lambda: any(expected in e for e in errors), timeout=5, what=f"refused: {why}")
    finally:
        await nc.close()


async def test_an_agent_may_answer_requests_but_not_write_into_inboxes(tenants: SecuredServer) -> None:
    """allow_responses: an agent replies to what it is asked, and cannot publish into a client's inbox otherwise."""
    errors: list[str] = []
    nc = await raw(tenants, "example", errors)
    try:
        await nc.publish("_INBOX.client.forged", b'{"text": "not from the agent you asked"}')
        await nc.flush()
        await wait_until(lambda: any('publish to "_inbox.client.forged"' in e for e in errors), timeout=5)
    finally:
        await nc.close()


def tenant_config(server: SecuredServer, user: str, state: Path) -> IntegrationConfig:
    config = server.config(user, state)
    return config.model_copy(update={"client_gateway": user in CLIENTS})


@asynccontextmanager
async def gateway_system(server: SecuredServer, tmp_path: Path) -> AsyncIterator[SecuredServer]:
    """The example agent and the gateway, each under its own user (entered in the test's own task)."""
    from dspyrt.agents.example import ExampleAgent

    async with serving(tenant_config(server, "example", tmp_path / "example"), [ExampleAgent]):
        async with serving(tenant_config(server, "gateway", tmp_path / "gateway"), [GatewayAgent]):
            yield server


async def test_each_client_sees_and_touches_its_own_tasks_only(tenants: SecuredServer, tmp_path: Path) -> None:
    async with gateway_system(tenants, tmp_path) as server:
        await each_client_sees_its_own(server, tmp_path)


async def each_client_sees_its_own(server: SecuredServer, tmp_path: Path) -> None:
    before = {u: len(violations_of(server, u)) for u in ("gateway", "example")}
    a_config = tenant_config(server, "client", tmp_path / "a")
    b_config = tenant_config(server, "team-b", tmp_path / "b")
    async with Bus(a_config.connection_options(name="a"), a_config.subjects) as a_bus:
        async with Bus(b_config.connection_options(name="b"), b_config.subjects) as b_bus:
            a, b = GatewayTasks(a_bus, "client"), GatewayTasks(b_bus, "team-b")
            mine = await a.submit("wordcount", {"text": "to be or not to be"}, task_id=f"a-{secrets.token_hex(4)}")
            done = await a.result(mine.task_id, timeout=30)
            assert done.status is TaskStatus.SUCCEEDED and done.result["words"] == 6
            assert done.submitted_by == "client"
            # team-b cannot read, wait for, list or take over client's task
            for attempt in (b.task(mine.task_id), b.wait(mine.task_id, 1.0)):
                with pytest.raises(RemoteError) as refused:
                    await attempt
                assert refused.value.code == "not_found"
            with pytest.raises(RemoteError) as taken:
                await b.submit("wordcount", {"text": "hijack"}, task_id=mine.task_id)
            assert taken.value.code == "conflict"
            assert mine.task_id not in [r.id for r in await b.tasks()]
            assert mine.task_id in [r.id for r in await a.tasks()]
            # the victim's record still holds its own result
            assert (await a.task(mine.task_id)).result["words"] == 6
            # only the kinds offered to clients: an agent-internal kind is refused by the gateway
            with pytest.raises(RemoteError) as internal:
                await b.submit("evaluate-shard", {})
            assert internal.value.code == "not_found" and "not offered to clients" in internal.value.message
            # a re-submitted id of one's own is the same task, not a second run
            again = await a.submit("wordcount", {"text": "other"}, task_id=mine.task_id)
            assert (again.task_id, again.created) == (mine.task_id, False)
    # the gateway and the agent did all this without one permission violation
    assert {u: len(violations_of(server, u)) for u in ("gateway", "example")} == before


async def test_progress_reaches_its_owner_through_the_gateway(tenants: SecuredServer, tmp_path: Path) -> None:
    config = tenant_config(tenants, "client", tmp_path / "a")
    async with gateway_system(tenants, tmp_path), Bus(config.connection_options(name="a"), config.subjects) as bus:
        tasks = GatewayTasks(bus, "client")
        submitted = await tasks.submit("wordcount", {"text": "one two three"})
        with anyio.fail_after(30):
            events = [event async for event in tasks.progress(submitted.task_id)]
        record = await tasks.result(submitted.task_id, timeout=30)
    assert record.status is TaskStatus.SUCCEEDED
    assert all(e.data["task_id"] == submitted.task_id for e in events)


def test_the_gateway_offers_the_kinds_the_deploy_lets_clients_submit() -> None:
    assert tuple(IntegrationConfig().gateway_kinds) == gen.PUBLIC_TASKS


async def test_the_cli_of_a_client_user_goes_through_the_gateway(tenants: SecuredServer, tmp_path: Path) -> None:
    """As a client user would run it: ``dspyrt submit … --wait`` and ``dspyrt tasks`` with only its own user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPYRT_")}
    env.update(
        DSPYRT_NATS_URLS=tenants.url,
        DSPYRT_NATS_USER="team-b",
        DSPYRT_NATS_PASSWORD=tenants.passwords[gen.password_variable("team-b")],
        DSPYRT_CLIENT_GATEWAY="true",
        DSPYRT_STATE_DIR=str(tmp_path / "cli"),
    )
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"kind": "wordcount", "input": {"text": "one two three four"}}))
    cli = [sys.executable, "-m", "dspyrt.runtime.cli"]
    before = len(violations_of(tenants, "team-b"))
    async with gateway_system(tenants, tmp_path):
        submitted = await anyio.run_process(
            [*cli, "submit", "wordcount", str(task), "--wait", "--json"], env=env, check=False
        )
        assert submitted.returncode == 0, submitted.stderr.decode()
        record = json.loads(submitted.stdout)
        assert record["status"] == "succeeded" and record["result"]["words"] == 4
        listed = await anyio.run_process([*cli, "tasks", "--json"], env=env, check=False)
        assert listed.returncode == 0, listed.stderr.decode()
        assert [r["id"] for r in json.loads(listed.stdout)] == [record["id"]]
    assert len(violations_of(tenants, "team-b")) == before


async def test_the_gateway_pins_dataset_references_for_its_clients(tenants: SecuredServer, tmp_path: Path) -> None:
    """A client names a dataset the operator put; the gateway pins it (reading the datasets under its own
    permissions) or refuses a missing one at submit. The client itself has no JetStream access."""
    from dspyrt.runtime.client import Client
    from dspyrt.runtime.datasets import DatasetStore

    admin = tenants.config("admin", tmp_path / "admin")
    async with Bus(admin.connection_options(name="admin"), admin.subjects) as admin_bus:
        await ensure_streams(admin_bus)
        manifest = await (await DatasetStore.open(admin_bus)).put("shared-texts", [{"text": "one two"}])
    before = len(violations_of(tenants, "gateway"))
    config = tenant_config(tenants, "client", tmp_path / "a")
    async with gateway_system(tenants, tmp_path), Bus(config.connection_options(name="a"), config.subjects) as bus:
        client = Client(bus, None, gateway=GatewayTasks(bus, "client"))
        with pytest.raises(RemoteError) as missing:
            await client.submit("wordcount", {"text": "dataset:no-such-texts"})
        assert missing.value.code == "dataset_not_found" and "dspyrt datasets put" in missing.value.message
        submitted = await client.submit("wordcount", {"text": "dataset:shared-texts"})
        record = await client.result(submitted.task_id, timeout=30)
        # wordcount counts the words of what it received: the reference, pinned to the version put above
        assert record.status is TaskStatus.SUCCEEDED
        assert record.result["top"] == [[f"dataset:shared-texts@{manifest.version}", 1]]
        with pytest.raises(Exception, match="gateway"):
            await client.put_dataset("mine", [{"text": "x"}])  # no JetStream access: said, not attempted
    assert len(violations_of(tenants, "gateway")) == before


async def test_an_agent_that_only_reads_datasets_cannot_write_one(tenants: SecuredServer, tmp_path: Path) -> None:
    """The evaluator reads dataset parts; under the deploy's permissions it cannot put a version (nor move a name's
    newest version), so a compromised evaluator cannot change what the next cycle trains on."""
    from dspyrt.runtime.datasets import DatasetStore

    admin = tenants.config("admin", tmp_path / "admin")
    async with Bus(admin.connection_options(name="admin"), admin.subjects) as admin_bus:
        await ensure_streams(admin_bus)
        store = await DatasetStore.open(admin_bus)
        honest = await store.put("guarded-texts", [{"text": "the real rows"}])
    config = tenants.config("evaluator", tmp_path / "evaluator")
    async with Bus(config.connection_options(name="evaluator"), config.subjects) as bus:
        reader = await DatasetStore.open(bus)
        assert await reader.rows("dataset:guarded-texts") == [{"text": "the real rows"}]
        with anyio.fail_after(30), pytest.raises(Exception):  # noqa: B017 (refused by the server, as a timeout)
            await reader.put("guarded-texts", [{"text": "poisoned rows"}])
    await wait_until(
        lambda: any("datasets" in v.lower() for v in violations_of(tenants, "evaluator")),
        timeout=5,
        what="the server refused the evaluator's write",
    )
    async with Bus(admin.connection_options(name="admin"), admin.subjects) as admin_bus:
        store = await DatasetStore.open(admin_bus)
        assert await store.resolve("dataset:guarded-texts") == honest.ref
        [index] = [i for i in await store.indexes() if i.name == "guarded-texts"]
        assert [v.version for v in index.versions] == [honest.version]
