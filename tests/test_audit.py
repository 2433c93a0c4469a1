"""The audit trail records task submissions, deploys and rollbacks with who, what and when."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dspyrt.agents.deployments import DeployedVersion, DeployRegistry, ProgramPointer
from dspyrt.agents.loop.models import RollbackRequest
from dspyrt.bus.audit import read_audit
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
