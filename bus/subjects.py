"""Every subject, stream, consumer, bucket and object-store name. Nothing else builds these strings.

With the default prefix ``dspy``:

- ``dspy.task.<kind>``               durable tasks (work-queue stream ``DSPY_TASKS``)
- ``dspy.<agent>.<endpoint>``        request/reply endpoints (micro service ``dspy-<agent>``)
- ``dspy.event.<topic>``             fan-out events (limits stream ``DSPY_EVENTS``); a task's progress is
                                     ``dspy.event.task.progress.<kind>.<task id>``
- ``dspy.dlq.<kind>``                dead letters (stream ``DSPY_DLQ``)
- ``dspy.audit.<user>.<action>``     who did what when (stream ``DSPY_AUDIT``), by NATS user
- KV ``DSPY_tasks``                  task status and results, keyed by ``<kind>.<task id>``
- ``_INBOX.<user>.*``                replies to NATS user ``<user>`` (see ``inbox_prefix``)

Two deployments share one NATS account by choosing different prefixes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_DOTTED = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def check_token(value: str, what: str) -> str:
    """A single subject token: letters, digits, ``_`` and ``-`` (no dots, no wildcards)."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} must be letters, digits, '_' or '-'")
    return value


def check_dotted(value: str, what: str) -> str:
    """Dot-separated tokens, no wildcards."""
    if not _DOTTED.match(value):
        raise ValueError(f"{what} {value!r} must be dot-separated tokens of letters, digits, '_' or '-'")
    return value


INBOX_ROOT = "_INBOX"
NO_USER = "_anonymous"
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def user_token(user: str | None) -> str:
    """A NATS user as one subject token (characters a token cannot hold become ``_``); ``NO_USER`` for none."""
    return _NOT_TOKEN.sub("_", user) if user else NO_USER


def inbox_prefix(user: str | None) -> str:
    """Where replies to ``user`` arrive: ``_INBOX.<user>`` (so a permission can keep everyone else out of them).

    With the shared ``_INBOX`` every user allowed to receive replies could subscribe to ``_INBOX.>`` and read all
    replies of the account.
    """
    return f"{INBOX_ROOT}.{user_token(user)}" if user else INBOX_ROOT


@dataclass(frozen=True)
class Subjects:
    """Names for one deployment, derived from its subject prefix."""

    prefix: str = "dspy"

    def __post_init__(self) -> None:
        check_token(self.prefix, "subject prefix")

    # --- names of JetStream things: upper-case prefix keeps them apart per deployment
    @property
    def _upper(self) -> str:
        return self.prefix.upper().replace("-", "_")

    @property
    def task_stream(self) -> str:
        return f"{self._upper}_TASKS"

    @property
    def event_stream(self) -> str:
        return f"{self._upper}_EVENTS"

    @property
    def dlq_stream(self) -> str:
        return f"{self._upper}_DLQ"

    @property
    def audit_stream(self) -> str:
        return f"{self._upper}_AUDIT"

    @property
    def task_bucket(self) -> str:
        return f"{self._upper}_tasks"

    @property
    def lm_cache_bucket(self) -> str:
        """The switcher's LM response cache, shared by every switcher replica."""
        return self.bucket("lmcache")

    def bucket(self, name: str) -> str:
        """A KV bucket owned by some agent (deployments, roles, caches, ...)."""
        return f"{self._upper}_{check_token(name, 'bucket name')}"

    def object_store(self, name: str) -> str:
        return f"{self._upper}_{check_token(name, 'object store name')}"

    # --- tasks
    def task(self, kind: str) -> str:
        return f"{self.prefix}.task.{check_token(kind, 'task kind')}"

    @property
    def all_tasks(self) -> str:
        return f"{self.prefix}.task.>"

    def task_kind(self, subject: str) -> str:
        return subject.rsplit(".", 1)[-1]

    def task_consumer(self, kind: str) -> str:
        """The durable consumer that every replica handling ``kind`` shares."""
        return f"tasks_{check_token(kind, 'task kind')}"

    def task_pull(self, kind: str) -> str:
        """Where a worker of ``kind`` asks its consumer for the next messages (JetStream's API subject)."""
        return f"$JS.API.CONSUMER.MSG.NEXT.{self.task_stream}.{self.task_consumer(kind)}"

    def max_deliveries_advisory(self, kind: str) -> str:
        """Where JetStream says a task of ``kind`` reached max_deliver without being acknowledged."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.task_stream}.{self.task_consumer(kind)}"

    # --- dead letters
    def dlq(self, kind: str) -> str:
        return f"{self.prefix}.dlq.{check_token(kind, 'task kind')}"

    @property
    def all_dlq(self) -> str:
        return f"{self.prefix}.dlq.>"

    # --- audit
    def audit(self, action: str, user: str | None) -> str:
        """Records of ``user`` go under its own token, so a permission (not the record) says who wrote them."""
        return f"{self.prefix}.audit.{user_token(user)}.{check_dotted(action, 'audit action')}"

    def audit_user(self, subject: str) -> str | None:
        """The user token an audit subject names (``None`` for records without a user)."""
        token = subject.removeprefix(f"{self.prefix}.audit.").split(".", 1)[0]
        return None if token == NO_USER else token

    @property
    def all_audit(self) -> str:
        return f"{self.prefix}.audit.>"

    # --- events
    def event(self, topic: str) -> str:
        return f"{self.prefix}.event.{check_dotted(topic, 'event topic')}"

    def event_pattern(self, pattern: str) -> str:
        """A subscription pattern under the event space; ``*`` and ``>`` allowed."""
        return f"{self.prefix}.event.{pattern}"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.event.>"

    def task_progress_topic(self, kind: str, task_id: str) -> str:
        """A task's progress events: the kind is in the subject, so a permission keeps each agent to its own."""
        return f"task.progress.{check_token(kind, 'task kind')}.{check_token(task_id, 'task id')}"

    def task_progress_pattern(self, task_id: str) -> str:
        """The progress events of a task whatever its kind (for ``follow_events``)."""
        return f"task.progress.*.{check_token(task_id, 'task id')}"

    def event_consumer(self, agent: str, handler: str) -> str:
        return f"events_{check_token(agent, 'agent name')}_{check_token(handler, 'handler name')}"

    # --- request/reply endpoints and micro services
    def endpoint(self, agent: str, name: str) -> str:
        return f"{self.prefix}.{check_token(agent, 'agent name')}.{check_token(name, 'endpoint name')}"

    def user_endpoint(self, agent: str, name: str, user: str = "*") -> str:
        """A per-user endpoint, ``<prefix>.<agent>.<user>.<name>``: a user allowed to publish only under its own
        name (``<prefix>.<agent>.<user>.>``) is vouched for by the server, whatever its message says."""
        token = user if user == "*" else check_token(user, "user name")
        return f"{self.prefix}.{check_token(agent, 'agent name')}.{token}.{check_token(name, 'endpoint name')}"

    def user_of_endpoint(self, subject: str) -> str | None:
        """The user token of a per-user endpoint's subject (see :meth:`user_endpoint`)."""
        parts = subject.split(".")
        return parts[-2] if len(parts) >= 4 and subject.startswith(f"{self.prefix}.") else None

    def service_name(self, agent: str) -> str:
        """The micro service name: ``$SRV.PING.<service_name>`` finds every instance of the agent."""
        return f"{self.prefix}-{check_token(agent, 'agent name')}"

    def agent_of_service(self, service: str) -> str | None:
        head = f"{self.prefix}-"
        return service[len(head) :] if service.startswith(head) else None

    @property
    def queue_group(self) -> str:
        return f"{self.prefix}-workers"


# The micro discovery subjects are fixed by the NATS micro protocol.
SERVICE_PING = "$SRV.PING"
SERVICE_INFO = "$SRV.INFO"
SERVICE_STATS = "$SRV.STATS"
