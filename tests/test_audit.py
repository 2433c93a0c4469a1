"""The audit trail records task submissions, deploys and rollbacks with who, what and when."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from dspyrt.agents.deployments import DeployedVersion, DeployRegistry, ProgramPointer
from dspyrt.agents.loop.models import RollbackRequest
from dspyrt.bus import Bus
from dspyrt.bus.audit import BATCH_BYTES, audit_log, read_audit, record_audit
from dspyrt.bus.streams import read_tail
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.registry import available_agents
from tests.helpers import serving


async def test_submissions_deploys_and_rollbacks_are_audited(config: IntegrationConfig) -> None:
    known = available_agents()
    async with serving(config, [known["example"], known["loop-deploy"]]) as system:
        alice = Client(system.bus, system.client.store, identity="alice")
        submission = await alice.submit("wordcount", {"text": "a b a"})
        await alice.result(submission.task_id, timeout=20)
        registry = await DeployRegistry.open(system.bus)
        for version in (1, 2):
            await registry.deploy(DeployedVersion(program="p", version=version, artifact_store="s", artifact_name="a"))
        await alice.request("loop-deploy", "rollback", RollbackRequest(program="p"), ProgramPointer)
        records = await read_audit(system.bus)
    actions: list[tuple[str, str, Any]] = [(r.action, r.target, r.identity) for r in records]
    assert ("task.submit", submission.task_id, "alice") in actions
    assert ("rollback", "p", "alice") in actions
    rollback = next(r for r in records if r.action == "rollback")
    assert "rolled back from v2 to v1" in rollback.detail["note"]
    assert all(r.time > 0 for r in records)
    assert json.loads(records[0].model_dump_json())["action"]


def test_audit_stream_name_follows_the_prefix(tmp_path: Path) -> None:
    config = IntegrationConfig(subject_prefix="acme", state_dir=tmp_path)
    assert config.subjects.audit_stream == "ACME_AUDIT"
    assert config.subjects.audit("task.submit", "alice") == "acme.audit.alice.task.submit"
    assert config.subjects.audit("task.submit", "ops@acme.com") == "acme.audit.ops_acme_com.task.submit"
    assert config.subjects.audit("deploy", None) == "acme.audit._anonymous.deploy"
    assert config.subjects.audit_user("acme.audit.alice.task.submit") == "alice"
    assert config.subjects.audit_user("acme.audit._anonymous.deploy") is None


async def test_json_calls_carry_the_callers_identity_too(config: IntegrationConfig) -> None:
    """The CLI's untyped calls (``dspyrt programs rollback``) went around the identity header: audit said nobody."""
    async with serving(config, [available_agents()["loop-deploy"]]) as system:
        registry = await DeployRegistry.open(system.bus)
        for version in (1, 2):
            await registry.deploy(DeployedVersion(program="q", version=version, artifact_store="s", artifact_name="a"))
        bob = Client(system.bus, system.client.store, identity="bob")
        pointer = await bob.call("loop-deploy", "rollback", {"program": "q"})
        assert pointer["active"]["version"] == 1
        records = await read_audit(system.bus)
    assert [(r.action, r.target, r.identity) for r in records if r.action == "rollback"] == [("rollback", "q", "bob")]


# ----------------------------------------------------------------------------------------- group commit


async def test_concurrent_records_share_appends_and_none_is_lost(bus: Bus) -> None:
    """Every caller returns once its record is stored; records that wait behind an append go in one message;
    one message never carries more than BATCH_BYTES of them."""
    log = audit_log(bus)
    big = "x" * (BATCH_BYTES // 8)

    async def one(i: int) -> None:
        detail = {"i": i, "pad": big if i % 5 == 0 else ""}
        await record_audit(bus, "task.submit", f"t{i}", identity="alice", detail=detail)

    async with anyio.create_task_group() as tg:
        for i in range(60):
            tg.start_soon(one, i)
    records = await read_audit(bus, limit=1000)
    assert sorted(r.target for r in records) == sorted(f"t{i}" for i in range(60))
    assert {(r.identity, r.nats_user) for r in records} == {("alice", bus.options.user)}
    assert log.appends < 60, "each record was appended alone"
    tail = await read_tail(bus, bus.subjects.audit_stream, 1000)
    assert len(tail) == log.appends
    assert max(len(data) for _, _, data in tail) <= BATCH_BYTES + 2 * len(big)


async def test_a_failed_append_fails_every_caller_it_carried(config: IntegrationConfig, bus: Bus) -> None:
    await bus.js.delete_stream(config.subjects.audit_stream)  # nothing stores audit records any more
    outcomes: list[BaseException | None] = []

    async def one(i: int) -> None:
        try:
            await record_audit(bus, "deploy", f"p{i}")
        except Exception as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)

    with anyio.fail_after(20):  # no caller waits forever for a batch that failed
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
    assert len(outcomes) == 10 and all(isinstance(o, Exception) for o in outcomes), outcomes


async def test_a_cancelled_caller_does_not_take_the_others_records_with_it(bus: Bus) -> None:
    """The caller sending an append is cancelled: the append it carries for the others completes (once)."""
    log = audit_log(bus)
    second = anyio.CancelScope()

    async def cancellable() -> None:
        with second:
            await record_audit(bus, "deploy", "second")

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(record_audit, bus, "deploy", "first"))
        await anyio.lowlevel.checkpoint()  # the first caller is sending its append
        tg.start_soon(cancellable)
        for i in range(8):
            tg.start_soon(partial(record_audit, bus, "deploy", f"after{i}"))
        with anyio.fail_after(10):
            while log.appends < 1 or log._actions["deploy"].waiting:  # the second now sends all nine
                await anyio.lowlevel.checkpoint()
        second.cancel()
    assert log.appends == 2  # the first alone, then the nine that waited behind it
    targets = [r.target for r in await read_audit(bus)]
    assert sorted(targets) == sorted(["first", "second", *(f"after{i}" for i in range(8))])


async def test_a_user_writing_garbage_under_its_audit_subject_does_not_hide_the_trail(bus: Bus) -> None:
    """Under the deploy's permissions every agent user may append under its own name; what is not records is shown
    as unreadable, with who wrote it, and the rest of the trail still reads."""
    await record_audit(bus, "deploy", "before", identity="alice")
    subject = bus.subjects.audit("deploy", bus.options.user)
    for junk in (b"not json", b"[1, 2]", b'{"action": 3}', b"\xff\xfe"):
        await bus.js.publish(subject, junk)
    await record_audit(bus, "deploy", "after", identity="alice")
    records = await read_audit(bus)
    assert [r.target for r in records if r.action == "deploy"] == ["before", "after"]
    unreadable = [r for r in records if r.action == "unreadable"]
    assert len(unreadable) == 4
    assert {r.nats_user for r in unreadable} == {bus.options.user}
    assert all(r.detail["error"] and r.target.startswith("message ") for r in unreadable)
