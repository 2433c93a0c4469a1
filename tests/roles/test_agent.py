"""The roles agent over a real nats-server: refinement on the demo engine through the switcher, versions,
structured errors for bad role definitions, the durable refine-role task, and the ``dspyrt roles`` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from dspyrt.agents.roles import (
    CheckReply,
    RefineRequest,
    RoleDefinition,
    RoleList,
    RoleRecord,
    RoleRefinementResult,
    RoleRefinementSystem,
    RolesAgent,
    RoleStore,
    check_role,
)
from dspyrt.agents.switcher.agent import SwitcherAgent
from dspyrt.agents.switcher.models import Selection, SelectRequest, SwitcherStats
from dspyrt.bus import Bus, Empty, RemoteError, TaskStatus
from dspyrt.runtime.cli_roles import roles_app
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import serving

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_FILE = ROOT / "examples" / "roles" / "planner.json"
SAMPLE: dict[str, Any] = json.loads(SAMPLE_FILE.read_text())

pytestmark = pytest.mark.timeout(60)


def refine(role: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    return {"role": role or SAMPLE, **changes}


async def test_refining_the_sample_on_the_demo_engine_removes_patterns_and_keeps_responsibilities(
    config: IntegrationConfig,
) -> None:
    async with serving(config, [SwitcherAgent, RolesAgent]) as system:
        result = await system.client.request("roles", "refine", refine(), RoleRefinementResult)
        stats = await system.client.request("switcher", "stats", Empty(), SwitcherStats)
    role = RoleDefinition.model_validate(SAMPLE)
    planted = {f.pattern for f in check_role(role)}
    assert len(planted) >= 5 and set(result.patterns_found) == planted
    # The deterministic post-check: nothing corporate is left, whatever the demo engine answered.
    assert result.patterns_remaining == [] and result.findings_after == []
    assert check_role(result.after) == []
    assert result.after.corporate_patterns_removed and result.after.solo_developer_optimized
    # Every responsibility listed in keep, and every one that is not corporate, is still there word for word.
    for item in [*role.keep, "scope_definition"]:
        assert item in result.after.responsibilities
    assert result.after.keep == role.keep
    assert result.score == 1.0 and result.patterns_removed_share == 1.0
    # The LM part ran through the switcher on the demo engine, and its rewrites came from the bundled demos.
    served = {m.model: m.calls for m in stats.models}
    assert result.lm_used and result.model == "demo/fewshot" and served["demo/fewshot"] == result.lm_calls >= 1
    rewritten = {c.before: c.after for c in result.changes if c.kind == "rewritten"}
    assert rewritten["stakeholder_analysis"] == "user_needs_analysis"
    assert all(c.source == "lm" for c in result.changes if c.kind == "rewritten")
    removed = {c.before for c in result.changes if c.kind == "removed"}
    assert {"cross_functional_alignment_meetings", "sign_off_on_release_plans"} <= removed
    assert result.lm_score is not None and 0 < result.lm_score <= result.score
    assert result.version == 1


async def test_versions_latest_and_named(config: IntegrationConfig) -> None:
    async with serving(config, [SwitcherAgent, RolesAgent]) as system:
        request = system.client.request
        first = await request("roles", "refine", refine(), RoleRefinementResult)
        second = await request("roles", "refine", refine(target_context="two-person startup"), RoleRefinementResult)
        dry = await request("roles", "refine", refine(save=False, use_lm=False), RoleRefinementResult)
        latest = await request("roles", "get", {"name": "planner"}, RoleRecord)
        older = await request("roles", "get", {"name": "planner", "version": 1}, RoleRecord)
        listing = await request("roles", "list", Empty(), RoleList)
        with pytest.raises(RemoteError) as missing:
            await request("roles", "get", {"name": "planner", "version": 9}, RoleRecord)
        with pytest.raises(RemoteError) as unknown:
            await request("roles", "get", {"name": "nobody"}, RoleRecord)
    assert (first.version, second.version, dry.version) == (1, 2, None)
    assert latest.version == latest.latest == 2 and latest.versions == [1, 2]
    assert latest.refinement.target_context == "two-person startup" and latest.role == second.after
    assert older.version == 1 and older.latest == 2 and older.role == first.after
    assert [(p.name, p.latest) for p in listing.roles] == [("planner", 2)]
    assert missing.value.code == unknown.value.code == "not_found"


async def test_a_stored_role_is_fetched_by_name_and_its_name_routes_the_switcher(
    config: IntegrationConfig, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nmodel = "demo/fewshot"\n\n[[models]]\nmodel = "demo/planning"\ntags = ["planner"]\n')
    async with serving(config.model_copy(update={"models_file": models}), [SwitcherAgent, RolesAgent]) as system:
        await system.client.request("roles", "refine", refine(model="demo/fewshot"), RoleRefinementResult)
        record = await system.client.request("roles", "get", {"name": "planner"}, RoleRecord)
        selection = await system.client.request("switcher", "select", SelectRequest(role=record.name), Selection)
    assert selection.model == "demo/planning" and "planner" in selection.reason
    assert "roadmap planning" in record.role.as_instructions()


@pytest.mark.parametrize(
    ("role_changes", "locs"),
    [
        ({"role_type": "manager"}, {"role.role_type"}),
        ({"focus": "   ", "responsibilities": []}, {"role.focus", "role.responsibilities"}),
        ({"role_type": "custom", "name": None}, {"role"}),
        ({"keep": ["golf"]}, {"role"}),
        ({"unexpected": 1}, {"role.unexpected"}),
    ],
)
async def test_bad_role_definitions_get_structured_errors_and_the_agent_keeps_serving(
    config: IntegrationConfig, role_changes: dict[str, Any], locs: set[str]
) -> None:
    bad = {k: v for k, v in {**SAMPLE, **role_changes}.items() if v is not None}
    async with serving(config, [SwitcherAgent, RolesAgent]) as system:
        with pytest.raises(RemoteError) as failed:
            await system.client.request("roles", "refine", refine(bad), RoleRefinementResult)
        with pytest.raises(RemoteError) as checked:
            await system.client.request("roles", "check", {"role": bad}, CheckReply)
        still = await system.client.request("roles", "check", {"role": SAMPLE}, CheckReply)
    assert failed.value.code == checked.value.code == "invalid_message"
    assert {fe.loc for fe in failed.value.field_errors} == locs
    assert all(fe.message for fe in failed.value.field_errors)
    assert not still.clean and "scope_definition" not in still.corporate_responsibilities


async def test_refine_role_task_stores_one_version_and_bad_input_fails_permanently(config: IntegrationConfig) -> None:
    async with serving(config, [SwitcherAgent, RolesAgent]) as system:
        good = await system.client.run("refine-role", RefineRequest.model_validate(refine()), timeout=30)
        bad = await system.client.run("refine-role", refine({**SAMPLE, "custom_name": "x"}), timeout=30)
        again = await system.client.request("roles", "get", {"name": "planner"}, RoleRecord)
    assert good.status is TaskStatus.SUCCEEDED, good.error
    assert good.result["version"] == 1 and good.result["task_id"] == good.id
    assert again.versions == [1]
    assert bad.status is TaskStatus.FAILED and bad.attempts == 1
    assert bad.error is not None and bad.error.code == "invalid_message"
    assert "custom_name is only for role_type 'custom'" in bad.error.field_errors[0].message


async def test_cli_roles_refine_show_and_list(config: IntegrationConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPYRT_NATS_URLS", config.nats_urls[0])
    monkeypatch.setenv("DSPYRT_SUBJECT_PREFIX", config.subject_prefix)
    monkeypatch.setenv("DSPYRT_LOG_LEVEL", "WARNING")
    runner = CliRunner()

    def cli(*args: str) -> Any:
        return runner.invoke(roles_app, list(args), catch_exceptions=False)

    bad_file = anyio.Path("bad.json")  # the test's own working directory (tmp_path)
    await bad_file.write_text(json.dumps({**SAMPLE, "focus": ""}))
    async with serving(config, [SwitcherAgent, RolesAgent]):
        refined = await anyio.to_thread.run_sync(cli, "refine", str(SAMPLE_FILE), "--json")
        plain = await anyio.to_thread.run_sync(cli, "refine", str(SAMPLE_FILE), "--context", "indie hacker")
        shown = await anyio.to_thread.run_sync(cli, "show", "planner", "--version", "1", "--json")
        listed = await anyio.to_thread.run_sync(cli, "list")
        rejected = await anyio.to_thread.run_sync(cli, "refine", str(bad_file))
    assert refined.exit_code == 0, refined.output
    result = json.loads(refined.stdout)
    assert result["version"] == 1 and result["patterns_remaining"] == []
    assert plain.exit_code == 0 and "stored as v2" in plain.stdout and "user_needs_analysis" in plain.stdout
    assert json.loads(shown.stdout)["version"] == 1
    assert listed.exit_code == 0 and "planner" in listed.stdout and "v2" in listed.stdout
    assert rejected.exit_code == 2 and "role.focus" in rejected.stderr


async def test_lm_errors_come_back_with_their_own_code(config: IntegrationConfig) -> None:
    async with serving(config, [SwitcherAgent, RolesAgent]) as system:
        with pytest.raises(RemoteError) as failed:
            await system.client.request("roles", "refine", refine(model="demo/nope"), RoleRefinementResult)
        record = await system.client.run("refine-role", refine(model="demo/nope"), timeout=30)
        fine = await system.client.request("roles", "refine", refine(save=False), RoleRefinementResult)
    assert failed.value.code == "no_eligible_model" and "demo/nope" in failed.value.message
    assert record.status is TaskStatus.FAILED and record.attempts == 1
    assert record.error is not None and record.error.code == "no_eligible_model"
    assert fine.patterns_remaining == []


async def test_the_store_numbers_concurrent_saves_apart_and_a_task_saves_once(bus: Bus) -> None:
    store = await RoleStore.open(bus)
    result = RoleRefinementSystem().refine(RoleDefinition.model_validate(SAMPLE))
    saved: list[int] = []

    async def save() -> None:
        saved.append((await store.save(result)).version or 0)

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(save)
    first = await store.save(result, task_id="task-1")
    again = await store.save(result, task_id="task-1")
    assert sorted(saved) == [1, 2, 3, 4, 5, 6]
    assert first.version == again.version == 7 and again.task_id == "task-1"
    assert await store.versions("planner") == [1, 2, 3, 4, 5, 6, 7]
    pointer = await store.pointer("planner")
    assert pointer is not None and pointer.latest == 7
    assert [p.name for p in await store.pointers()] == ["planner"]


async def test_a_save_cut_short_after_its_version_is_finished_by_the_next_delivery(bus: Bus) -> None:
    """The version was stored, then the process died before the task's key: a redelivery stored a second one."""
    store = await RoleStore.open(bus)
    result = RoleRefinementSystem().refine(RoleDefinition.model_validate(SAMPLE))
    put = store.kv.put

    async def dies_on_the_task_key(key: str, value: bytes) -> int:
        raise RuntimeError("process killed")

    store.kv.put = dies_on_the_task_key  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await store.save(result, task_id="task-9")
    store.kv.put = put  # type: ignore[method-assign]
    again = await store.save(result, task_id="task-9")
    assert again.version == 1 and again.task_id == "task-9"
    assert await store.versions("planner") == [1]
    pointer = await store.pointer("planner")
    assert pointer is not None and pointer.latest == 1


def test_the_cli_module_imports_neither_agents_nor_dspy() -> None:
    code = (
        "import sys, dspyrt.runtime.cli_roles, dspyrt.runtime.cli; "
        "bad = sorted(m for m in sys.modules if m.startswith(('dspyrt.agents', 'dspy.')) or m == 'dspy'); "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
