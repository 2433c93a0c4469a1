"""Generate ``accounts.conf``: the NATS accounts, users and per-agent subject permissions of one deployment.

    python deploy/nats/gen_accounts.py > deploy/nats/accounts.conf              # prefix dspy
    python deploy/nats/gen_accounts.py --prefix acme > accounts.conf             # another deployment
    python deploy/nats/gen_accounts.py --check deploy/nats/accounts.conf         # exit 1 if out of date
    python deploy/nats/gen_accounts.py --env-example > deploy/example.env         # the password variables
    python deploy/nats/gen_accounts.py --client client --client team-a > accounts.conf   # one user per client

Standard library only, so it runs anywhere. The table ``AGENTS`` below says what each agent does on the bus
besides serving its own endpoints; the permissions follow from it. When an agent starts to call another agent,
submit a new task kind, publish a new event or open a new bucket, add it here and regenerate (the permission
test in ``tests/test_deploy_configs.py`` fails on any permission violation the server logs).

Passwords are never in the file: each user's password is the environment variable ``NATS_PW_<USER>`` of the
nats-server process (``-`` becomes ``_``, upper case), e.g. ``NATS_PW_LOOP_CREATE``. nats-server parses the
variable's value as a config value, so a password must be a plain token that starts with a letter and does not
look like a number, size or boolean: ``pw-`` followed by hex digits (``echo pw-$(openssl rand -hex 24)``).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Access:
    """What one agent does on the bus besides serving its own endpoints (``<prefix>.<agent>.*``)."""

    tasks: tuple[str, ...] = ()  # task kinds it consumes (its own durable consumer on the task stream)
    submits: tuple[str, ...] = ()  # task kinds it submits and waits for
    calls: tuple[str, ...] = ()  # "agent.endpoint" it sends requests to
    events: tuple[str, ...] = ()  # event topics it publishes (``*``/``>`` allowed); task progress is implied
    buckets: tuple[str, ...] = ()  # KV buckets it writes (and reads); task records: see agent_permissions
    reads: tuple[str, ...] = ()  # KV buckets it only reads (opening a missing one creates it)
    objects: tuple[str, ...] = ()  # object stores it writes (and reads)
    reads_objects: tuple[str, ...] = ()  # object stores it only reads
    audits: tuple[str, ...] = ()  # audit actions it records (``<prefix>.audit.<user>.<action>``)
    follows_events: bool = False  # reads the whole event stream with an ordered consumer (dashboard)
    reads_progress: bool = False  # reads a task's latest progress event by subject (the gateway)
    discovery: bool = False  # asks every service instance ($SRV.PING|INFO|STATS), e.g. for system status


VALIDATORS = ("validator-code", "validator-logic", "validator-performance", "validator-security", "validator-custom")
SWITCHER_LM = ("switcher.select", "switcher.complete")

# Task kinds a client may submit (the others are submitted by agents to agents, e.g. evaluate-shard): the gateway
# submits them for clients (and accepts only these: IntegrationConfig.gateway_kinds has the same list).
PUBLIC_TASKS = ("optimize", "cycle", "evaluate", "refine-role", "wordcount")

# Agent name -> what it does. Names are the entry points of the ``dspyrt.agents`` group.
AGENTS: dict[str, Access] = {
    "system": Access(discovery=True),
    # Datasets (runtime/datasets.py): versions in the object store "datasets", their index in the KV bucket of the
    # same name. Readers pin references (gateway) or read rows (optimizer, evaluators, cycle).
    "gateway": Access(
        submits=PUBLIC_TASKS, reads_progress=True, reads=("datasets",), reads_objects=("datasets",)
    ),
    "example": Access(tasks=("wordcount",)),
    "switcher": Access(events=("lm.call",), reads=("deployments",), buckets=("lmcache",)),
    "optimizer": Access(
        tasks=("optimize",),
        calls=SWITCHER_LM,
        events=("optimization.*",),
        buckets=("optcache", "optimizer"),
        objects=("artifacts",),
        reads=("datasets",),
        reads_objects=("datasets",),
    ),
    "loop-create": Access(),
    "loop-evaluate": Access(
        tasks=("evaluate",),
        submits=("evaluate-shard",),
        calls=("switcher.select",),
        reads=("datasets",),
        reads_objects=("datasets",),
    ),
    "evaluator": Access(
        tasks=("evaluate-shard",),
        calls=("switcher.complete",),
        reads=("datasets",),
        reads_objects=("artifacts", "datasets"),
    ),
    "loop-deploy": Access(events=("deploy.*",), buckets=("deployments",), audits=("deploy", "rollback", "promote")),
    "cycle": Access(
        tasks=("cycle",),
        submits=("evaluate", "optimize"),
        calls=("loop-create.create", "assertions.validate", "loop-deploy.deploy"),
        events=("cycle.*",),
        buckets=("cycles",),
        reads=("datasets",),
        reads_objects=("datasets",),
    ),
    # Serving records sampled predictions and turns feedback into new versions of <program>-feedback datasets.
    "serving": Access(
        calls=SWITCHER_LM,
        events=("predict.served", "feedback.recorded"),
        buckets=("predictions", "feedback", "datasets"),
        reads=("deployments",),
        objects=("datasets",),
        reads_objects=("artifacts",),
    ),
    "assertions": Access(calls=tuple(f"{v}.validate" for v in VALIDATORS)),
    **{v: Access() for v in VALIDATORS},
    "roles": Access(tasks=("refine-role",), calls=SWITCHER_LM, events=("role.refined",), buckets=("roles",)),
    "dashboard": Access(
        submits=("cycle",),
        calls=("loop-deploy.rollback",),
        events=("alert.*", "dashboard.*", "queue.depth"),
        buckets=("dashboard",),
        reads=("cycles", "deployments"),
        follows_events=True,
    ),
}


# Client users: people and programs that submit work, each with its own user (add one with --client NAME).
CLIENTS = ("client",)

# Request/reply endpoints a client (the ``client`` user: people and programs that submit work) may call.
PUBLIC_ENDPOINTS = (
    "system.status",
    "example.echo",
    "serving.predict",
    # Correcting a prediction whose id the client was given; listing predictions and setting the sample rate are
    # for operators (they show other clients' inputs and change a setting).
    "serving.feedback",
    "loop-deploy.list",
    "loop-deploy.show",
    "optimizer.list",
    "optimizer.stats",
    "switcher.models",
    "switcher.stats",
    "assertions.validate",
    "roles.refine",
    "roles.check",
    "roles.get",
    "roles.list",
    "dashboard.snapshot",
    "dashboard.alerts",
    "dashboard.rules",
    "dashboard.metrics",
)

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class Names:
    """The subject, stream and bucket names of one deployment (the same rules as ``bus/subjects.py``)."""

    def __init__(self, prefix: str) -> None:
        if not _TOKEN.match(prefix):
            raise ValueError(f"prefix {prefix!r} must be letters, digits, '_' or '-'")
        self.prefix = prefix
        self.upper = prefix.upper().replace("-", "_")

    @property
    def streams(self) -> list[str]:
        return [f"{self.upper}_{s}" for s in ("TASKS", "EVENTS", "DLQ", "AUDIT")]

    @property
    def task_stream(self) -> str:
        return f"{self.upper}_TASKS"

    @property
    def event_stream(self) -> str:
        return f"{self.upper}_EVENTS"

    @property
    def dlq_stream(self) -> str:
        return f"{self.upper}_DLQ"

    @property
    def audit_stream(self) -> str:
        return f"{self.upper}_AUDIT"

    def bucket(self, name: str) -> str:
        return f"{self.upper}_{name}"

    @staticmethod
    def task_consumer(kind: str) -> str:
        return f"tasks_{kind}"

    def dlq(self, kind: str) -> str:
        return f"{self.prefix}.dlq.{kind}"

    def max_deliveries_advisory(self, kind: str) -> str:
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.task_stream}.{self.task_consumer(kind)}"

    def audit(self, user: str, action: str) -> str:
        """Where ``user`` records audit ``action`` (``dspyrt.bus.subjects.Subjects.audit``): the subject names
        the user."""
        return f"{self.prefix}.audit.{user}.{action}"

    @staticmethod
    def inbox(user: str) -> str:
        """Replies to ``user`` (``dspyrt.bus.subjects.inbox_prefix``): only that user may subscribe there."""
        return f"_INBOX.{user}.>"

    def task(self, kind: str) -> str:
        return f"{self.prefix}.task.{kind}"

    def task_records(self, kind: str) -> str:
        """Writes (and updates) of the task records of ``kind``: keys are ``<kind>.<task id>`` (bus.tasks.task_key)."""
        return f"$KV.{self.bucket('tasks')}.{kind}.>"

    def endpoint(self, dotted: str) -> str:
        return f"{self.prefix}.{dotted}"

    def gateway(self, user: str) -> str:
        """A client's own gateway subjects (``dspyrt.bus.subjects.Subjects.user_endpoint``): the subject names
        the user."""
        return f"{self.prefix}.gateway.{user}.>"

    def event(self, topic: str) -> str:
        return f"{self.prefix}.event.{topic}"

    def service(self, agent: str) -> str:
        return f"{self.prefix}-{agent}"


def password_variable(user: str) -> str:
    return "NATS_PW_" + user.upper().replace("-", "_")


# ----------------------------------------------------------------------------- JetStream building blocks


def _api(*parts: str) -> str:
    return "$JS.API." + ".".join(parts)


def open_stream(stream: str) -> list[str]:
    """Open an existing stream or bucket, creating it if missing (``dspyrt.bus.streams.key_value``/``object_store``)."""
    return [_api("STREAM.INFO", stream), _api("STREAM.CREATE", stream)]


def read_messages(stream: str) -> list[str]:
    """Get single messages by sequence or last-by-subject (KV get, dead letters, audit records)."""
    return [_api("STREAM.MSG.GET", stream), _api("DIRECT.GET", stream), _api("DIRECT.GET", stream, ">")]


def ordered_consumer(stream: str) -> list[str]:
    """An ephemeral ordered consumer (KV keys/watch, object get, replaying events), its flow control and
    its clean-up; the messages themselves arrive on the client's own ``_INBOX``."""
    return [
        _api("CONSUMER.CREATE", stream),
        _api("CONSUMER.CREATE", stream, "*"),
        _api("CONSUMER.CREATE", stream, "*", ">"),
        _api("CONSUMER.INFO", stream, "*"),
        _api("CONSUMER.DELETE", stream, "*"),
        f"$JS.FC.{stream}.>",
    ]


def durable_consumer(stream: str, consumer: str) -> list[str]:
    """A shared durable pull consumer: create/look up, fetch, acknowledge."""
    return [
        _api("CONSUMER.INFO", stream, consumer),
        _api("CONSUMER.CREATE", stream, consumer),
        _api("CONSUMER.CREATE", stream, consumer, ">"),
        _api("CONSUMER.DURABLE.CREATE", stream, consumer),
        _api("CONSUMER.MSG.NEXT", stream, consumer),
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def kv_read(bucket: str, *, create: bool = True) -> list[str]:
    stream = f"KV_{bucket}"
    opening = open_stream(stream) if create else [_api("STREAM.INFO", stream)]
    return [*opening, *read_messages(stream), *ordered_consumer(stream)]


def kv_write(bucket: str) -> list[str]:
    return [*kv_read(bucket), f"$KV.{bucket}.>"]


def object_read(store: str) -> list[str]:
    stream = f"OBJ_{store}"
    # Reading an object subscribes to its chunks without naming the stream: nats-py looks it up by subject.
    return [*open_stream(stream), *read_messages(stream), *ordered_consumer(stream), _api("STREAM.NAMES")]


def object_write(store: str) -> list[str]:
    # A put of an existing name purges the old chunks.
    return [*object_read(store), f"$O.{store}.>", _api("STREAM.PURGE", f"OBJ_{store}")]


# ----------------------------------------------------------------------------- permissions per user


@dataclass
class Permissions:
    publish: list[str]
    subscribe: list[str]
    # May answer the requests it receives (once each) without publishing on anyone's inbox otherwise.
    allow_responses: bool = False

    def add(self, publish: list[str] | None = None, subscribe: list[str] | None = None) -> None:
        for subject in publish or []:
            if subject not in self.publish:
                self.publish.append(subject)
        for subject in subscribe or []:
            if subject not in self.subscribe:
                self.subscribe.append(subject)


def agent_permissions(names: Names, agent: str, access: Access) -> Permissions:
    n = names
    perms = Permissions([], [])
    # Every agent process: creates the deployment's streams and the task bucket at start when missing
    # (runtime.supervisor.serve -> bus.streams.ensure_streams) and reads task records (a KV get cannot be
    # restricted by key: it is a JetStream API request on the bucket's stream). It writes only the records of the
    # kinds it consumes or submits: the key is <kind>.<task id>. Changing a stream's settings is for admin
    # (`dspyrt streams`): agents run with manage_streams = false.
    for stream in n.streams:
        perms.add(open_stream(stream))
    perms.add(kv_read(n.bucket("tasks")))
    perms.add([n.task_records(kind) for kind in (*access.tasks, *access.submits)])
    # Its micro service: discovery requests for all services, this service and this instance; its endpoints.
    service = n.service(agent)
    perms.add(
        subscribe=[
            "$SRV.PING",
            "$SRV.INFO",
            "$SRV.STATS",
            f"$SRV.*.{service}",
            f"$SRV.*.{service}.*",
            f"{n.prefix}.{agent}.*",
            f"{n.prefix}.{agent}.*.*",  # per-user endpoints: <prefix>.<agent>.<user>.<name>
        ]
    )
    # Replies to its own requests (and JetStream API answers) arrive on its own inbox; it answers the requests it
    # receives (allow_responses) but may not publish on anyone's inbox otherwise. Its health probe
    # (deploy/k8s/probe.py, same user) asks its own service.
    perms.allow_responses = True
    perms.add(
        publish=[n.inbox(agent), f"$SRV.PING.{service}", f"$SRV.INFO.{service}", f"$SRV.STATS.{service}"],
        subscribe=[n.inbox(agent)],
    )

    for kind in access.tasks:
        perms.add(durable_consumer(n.task_stream, n.task_consumer(kind)))
        # Dead-lettering: publish the letter; move tasks whose every delivery crashed (advisory, get, delete).
        perms.add(
            [
                n.dlq(kind),
                _api("STREAM.MSG.GET", n.task_stream),
                _api("STREAM.MSG.DELETE", n.task_stream),
            ],
            [n.max_deliveries_advisory(kind)],
        )
    if access.tasks:
        # Claim checks: a result too large for its record goes to the results object store (bus.claims).
        perms.add(object_write(n.bucket("results")))
    # Progress events of its own kinds' tasks only (<prefix>.event.task.progress.<kind>.<task id>).
    perms.add([n.event(f"task.progress.{kind}.>") for kind in access.tasks])
    if access.submits:
        perms.add(
            # Submit asks which kinds are served (the task stream's consumers) before it writes anything.
            [n.task(kind) for kind in access.submits]
            + [n.audit(agent, "task.submit"), _api("CONSUMER.NAMES", n.task_stream)],
            # Waiting for the result watches the record's key.
            [n.task_records(kind) for kind in access.submits],
        )
        perms.add(object_read(n.bucket("results")))  # a claim-checked result is read from there
    perms.add([n.endpoint(call) for call in access.calls])
    perms.add([n.event(topic) for topic in access.events])
    perms.add([n.audit(agent, action) for action in access.audits])
    for bucket in access.buckets:
        perms.add(kv_write(n.bucket(bucket)))
    for bucket in access.reads:
        perms.add(kv_read(n.bucket(bucket)))
    for store in access.objects:
        perms.add(object_write(n.bucket(store)))
    for store in access.reads_objects:
        perms.add(object_read(n.bucket(store)))
    if access.follows_events:
        perms.add(ordered_consumer(n.event_stream))
    if access.reads_progress:
        perms.add([_api("STREAM.INFO", n.event_stream), *read_messages(n.event_stream)])
    if access.discovery:
        perms.add(["$SRV.PING", "$SRV.INFO", "$SRV.STATS"])
    return perms


def client_permissions(names: Names, user: str) -> Permissions:
    """A client user: its own gateway subjects (submit, read and wait for its own tasks), the public endpoints,
    service discovery, its own inbox. No JetStream API at all (no stream, consumer or KV access: a consumer it could
    create might deliver its bytes anywhere), no task subject, no agent-internal endpoint (``switcher.complete``,
    ``loop-deploy.deploy``, ...), no dead letters, no events: another client's tasks are out of its reach, and the
    gateway answers each user about its own tasks only (the server vouches for the user named in the subject)."""
    n = names
    perms = Permissions([], [])
    perms.add(
        [
            n.gateway(user),
            *[n.endpoint(e) for e in PUBLIC_ENDPOINTS],
            *[n.endpoint(f"{agent}.health") for agent in AGENTS],
            "$SRV.PING",
            "$SRV.INFO",
            "$SRV.STATS",
            "$SRV.PING.*",
            "$SRV.INFO.*",
            "$SRV.STATS.*",
        ],
        [n.inbox(user)],
    )
    return perms


# ----------------------------------------------------------------------------- rendering


def _quoted(subjects: list[str], indent: str) -> str:
    return "\n".join(f'{indent}"{s}"' for s in subjects)


def _user(user: str, perms: Permissions | None, comment: str) -> str:
    lines = [f"      # {comment}", "      {", f'        user: "{user}"']
    lines.append(f"        password: ${password_variable(user)}")
    if perms is not None:
        lines += [
            "        permissions: {",
            "          publish: { allow: [",
            _quoted(perms.publish, "            "),
            "          ] }",
            "          subscribe: { allow: [",
            _quoted(perms.subscribe, "            "),
            "          ] }",
        ]
        if perms.allow_responses:
            lines.append("          allow_responses: true")
        lines.append("        }")
    lines.append("      }")
    return "\n".join(lines)


def render(prefix: str = "dspy", clients: tuple[str, ...] = CLIENTS) -> str:
    names = Names(prefix)
    account = names.upper
    users = [
        _user(agent, agent_permissions(names, agent, access), f"agent {agent}: dspyrt agent {agent}")
        for agent, access in AGENTS.items()
    ]
    for client in clients:
        users.append(_user(client, client_permissions(names, client), "a client: its own tasks (through the gateway)"))
    users.append(_user("admin", None, "operators: everything in this account (nats CLI, dlq replay, rollback)"))
    header = f"""\
# Generated by deploy/nats/gen_accounts.py --prefix {prefix}; edit the table there, not this file.
#
# Account {account}: the deployment (subject prefix "{prefix}"), with JetStream.
#   - one user per agent, named after it, allowed only the subjects it uses;
#   - one user per client ("client" by default; more with --client NAME): its own tasks only, through the gateway;
#   - "admin" for operators.
# Account SYS: the system account (server monitoring: nats server report/list, $SYS.>).
#
# Passwords come from the nats-server's environment, one variable per user: NATS_PW_<USER> ("-" -> "_"),
# e.g. NATS_PW_LOOP_CREATE. Use values like pw-<48 hex digits> (see gen_accounts.py for why).
# An agent connects with DSPYRT_NATS_USER=<agent name> and DSPYRT_NATS_PASSWORD=<its password>.
"""
    body = "\n".join(users)
    return f"""{header}
accounts {{
  {account} {{
    jetstream: enabled
    users: [
{body}
    ]
  }}
  SYS {{
    users: [
      {{ user: "sys", password: $NATS_PW_SYS }}
    ]
  }}
}}
system_account: SYS
"""


def users(clients: tuple[str, ...] = CLIENTS) -> list[str]:
    """Every user of the deployment's account, and the system account's."""
    return [*AGENTS, *clients, "admin", "sys"]


def render_env_example(clients: tuple[str, ...] = CLIENTS) -> str:
    """``example.env``: one password variable per user, with values that are obviously not to be used."""
    lines = [
        "# Example secrets for deploy/compose.yaml: copy to deploy/.env and replace EVERY value, e.g. with",
        "#   for v in $(grep -o '^[A-Z_]*' example.env); do echo $v=pw-$(openssl rand -hex 24); done > .env",
        "# (a value must start with a letter and be letters, digits, '-' or '_': nats-server reads it as a config",
        "# value). The NATS_PW_* go to the nats-servers (accounts.conf reads them) and to each agent;",
        "# NATS_ROUTE_PASSWORD is the cluster routes' login; DASHBOARD_TOKEN the dashboard page's bearer token.",
    ]
    lines += [f"{password_variable(user)}=pw-example-{user}-change-me" for user in users(clients)]
    lines += ["NATS_ROUTE_PASSWORD=pw-example-route-change-me", "DASHBOARD_TOKEN=pw-example-dashboard-token-change-me"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default="dspy", help="subject prefix of the deployment (default dspy)")
    parser.add_argument("--check", type=Path, help="compare with this file; exit 1 if it is out of date")
    parser.add_argument("--env-example", action="store_true", help="print example.env (the password variables)")
    parser.add_argument(
        "--client", action="append", default=[], metavar="NAME",
        help="a client user (repeat for several; default: one user named client)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    clients = tuple(args.client) or CLIENTS
    for client in clients:
        if not _TOKEN.match(client) or client in AGENTS or client in ("admin", "sys"):
            parser.error(f"client name {client!r} must be letters, digits, '_' or '-' and not an agent's or admin")
    text = render_env_example(clients) if args.env_example else render(args.prefix, clients)
    if args.check is not None:
        if args.check.read_text() != text:
            print(f"{args.check} is out of date: regenerate it with {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
