"""A client in another language: tests/node/client.mjs, written from the README's Protocol section and
docs/asyncapi.yaml alone with the official ``nats`` npm package, against a real system (nats-server, switcher and
optimizer agents). It discovers the agents, reads a reply and an error reply, submits an ``optimize`` task, follows
its progress and prints the final record; what it read off the wire must fit the published document."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import anyio
import pytest
import yaml

from dspyrt.agents.optimizers.agent import OptimizerAgent
from dspyrt.agents.switcher.agent import SwitcherAgent
from dspyrt.runtime.asyncapi import DOCUMENT_PATH
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import ROOT, serving
from tests.test_asyncapi import payload_errors

pytestmark = pytest.mark.timeout(150)

NODE = shutil.which("node")
CLIENT_DIR = ROOT / "tests" / "node"
# The client's own deadline, under the test's: a hung client says so itself.
CLIENT_TIMEOUT_S = 90


def _skip_reason() -> str | None:
    if NODE is None:
        return "node is not installed (the Node.js client test needs Node 18+)"
    if not (CLIENT_DIR / "node_modules" / "nats").is_dir():
        return "tests/node/node_modules is missing: npm ci --prefix tests/node"
    return None


async def test_a_node_client_runs_an_optimize_task_from_the_published_protocol(config: IntegrationConfig) -> None:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    assert NODE is not None
    document: dict[str, Any] = yaml.safe_load((ROOT / DOCUMENT_PATH).read_text(encoding="utf-8"))
    env = {
        **os.environ,
        "NATS_URL": config.nats_urls[0],
        "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
        "CLIENT_TIMEOUT_MS": str(CLIENT_TIMEOUT_S * 1000),
    }
    async with serving(config, [SwitcherAgent, OptimizerAgent]):
        with anyio.fail_after(CLIENT_TIMEOUT_S + 20):
            done = await anyio.run_process(
                [NODE, str(CLIENT_DIR / "client.mjs"), str(ROOT / "examples" / "optimize.json")],
                cwd=CLIENT_DIR, env=env, check=False,
            )  # fmt: skip
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-4000:]}"
    out = json.loads(stdout)
    task_id = out["task_id"]

    # The task ran to the end, on the demo model, and its result is the optimizer's.
    assert out["status"] == "succeeded", out["record"].get("error")
    result = out["result"]
    assert isinstance(result["baseline_score"], float | int) and isinstance(result["optimized_score"], float | int)
    assert result["model"] == "demo/fewshot" and result["optimizer"] == "labeled_fewshot"
    assert out["record"]["kind"] == "optimize" and out["record"]["id"] == task_id
    assert out["record"]["submitted_by"] == "node-client"

    # Its progress arrived on the task's own subject, each event the runtime's wrapper around a TaskProgress.
    assert out["progress"], "no progress event reached the client"
    for event in out["progress"]:
        assert event["topic"] == f"task.progress.optimize.{task_id}" and event["source"] == "optimizer"
        assert event["data"]["task_id"] == task_id
        assert payload_errors(document, "event.TaskProgress", event) == []

    # Discovery found both agents of this deployment, with the endpoints' models named as the document names them.
    agents = {service["agent"]: service for service in out["services"]}
    assert {"optimizer", "switcher"} <= set(agents)
    listing = next(e for e in agents["optimizer"]["endpoints"] if e["name"] == "list")
    assert listing["subject"] == f"{config.subject_prefix}.optimizer.list"
    assert listing["reply"] in document["components"]["schemas"]

    # A reply, and an error reply with the micro headers and an ErrorBody.
    assert payload_errors(document, "reply.OptimizerList", out["endpoint"]["reply"]) == []
    error = out["error_reply"]
    assert error["error_code"] == "400" and error["error"], error
    assert error["body"]["code"] == "invalid_message"
    assert {f["loc"] for f in error["body"]["field_errors"]} >= {"name", "nmae"}
    assert payload_errors(document, "error", error["body"]) == []

    # The final record as the client read it from KV fits the published record of an optimize task.
    assert payload_errors(document, "record.optimize", out["record"]) == []
