"""The ``Agent`` base class: typed endpoints, durable task handlers and event subscriptions, declared on a class.

    class Greeter(Agent):
        name = "greeter"

        @endpoint("greet")
        async def greet(self, request: GreetRequest) -> GreetReply: ...

        @task("greet-all", retry=RetryPolicy(max_attempts=3, initial_delay=2.0), timeout=600)
        async def greet_all(self, job: GreetAll, ctx: TaskContext) -> GreetAllResult: ...

        @on_event("cycle.completed")
        async def on_cycle(self, event: Event) -> None: ...

Request and reply types come from the handler's annotations (pydantic models). The agent instance is the shared
state; ``AgentHost`` (``dspyrt.runtime.host``) puts it on the bus.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dspyrt.bus import Bus, TaskRun, publish_event
from dspyrt.bus.events import EventData
from dspyrt.bus.subjects import check_dotted, check_token
from dspyrt.runtime.config import IntegrationMode
from dspyrt.runtime.events import TaskProgress

if TYPE_CHECKING:
    from dspyrt.runtime.client import Client
    from dspyrt.runtime.config import IntegrationConfig

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    method: str
    request: type[BaseModel]
    reply: type[BaseModel]
    description: str
    # Served on <prefix>.<agent>.<user>.<name> for every user; the handler reads the user with current_requester().
    per_user: bool = False


class RetryPolicy(BaseModel):
    """How often a task kind is tried, and how long a retryable failure waits before the next try.

    Attempt ``n`` that fails with a retryable error is delivered again after ``initial_delay * multiplier**(n-1)``
    seconds, at most ``max_delay`` (a ``RetryableError(delay=...)`` names its own wait); after ``max_attempts``
    deliveries the task is dead-lettered (``exhausted``, with the last error). A permanent error is never retried.
    ``max_attempts=None``: the deployment's ``task_max_deliver``. The default waits 1, 4, 16, 60, 60, ... s."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int | None = Field(default=None, ge=1, le=1000)
    initial_delay: float = Field(default=1.0, ge=0, le=86_400)
    multiplier: float = Field(default=4.0, ge=1, le=100)
    max_delay: float = Field(default=60.0, ge=0, le=86_400)

    @model_validator(mode="after")
    def _max_covers_initial(self) -> RetryPolicy:
        if self.max_delay < self.initial_delay:
            raise ValueError(f"max_delay {self.max_delay:g}s is shorter than initial_delay {self.initial_delay:g}s")
        return self

    def delays(self, attempts: int) -> tuple[float, ...]:
        """The wait after each failed attempt of ``attempts`` (the last one's is never used: it is dead-lettered)."""
        waits = [self.initial_delay]
        for _ in range(attempts - 1):
            waits.append(min(waits[-1] * self.multiplier, self.max_delay))  # capped as it grows: never overflows
        return tuple(waits)


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    method: str
    input: type[BaseModel]
    output: type[BaseModel] | None
    ack_wait: float | None
    retry: RetryPolicy
    timeout: float | None
    concurrency: int | None


@dataclass(frozen=True)
class EventSpec:
    pattern: str
    method: str
    replay: bool


def _signature_types(fn: Callable[..., Any]) -> tuple[type[BaseModel], Any]:
    hints = get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    if not params:
        raise TypeError(f"{fn.__qualname__} must take the request model as its first argument")
    first = hints.get(params[0].name)
    if not (inspect.isclass(first) and issubclass(first, BaseModel)):
        raise TypeError(f"{fn.__qualname__}: annotate the first argument with a pydantic model")
    return first, hints.get("return")


def endpoint(name: str, *, description: str = "", per_user: bool = False) -> Callable[[F], F]:
    """A request/reply endpoint on ``<prefix>.<agent>.<name>``: ``async def h(self, req: Model) -> Reply``.

    ``per_user``: on ``<prefix>.<agent>.<user>.<name>`` instead, one subject per NATS user, so the server's
    publish permissions vouch for who asks (``current_requester()``)."""
    check_token(name, "endpoint name")

    def mark(fn: F) -> F:
        request, reply = _signature_types(fn)
        if not (inspect.isclass(reply) and issubclass(reply, BaseModel)):
            raise TypeError(f"{fn.__qualname__}: annotate the return type with a pydantic model")
        fn.__dspyrt_endpoint__ = EndpointSpec(  # type: ignore[attr-defined]
            name, fn.__name__, request, reply, description or (fn.__doc__ or "").strip().split("\n")[0], per_user
        )
        return fn

    return mark


def task(
    kind: str,
    *,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    ack_wait: float | None = None,
    concurrency: int | None = None,
) -> Callable[[F], F]:
    """A durable task handler for ``<prefix>.task.<kind>``: ``async def h(self, input: Model, ctx: TaskContext)``.

    The kind's policy is declared here, as Temporal activities and Celery tasks do:

    - ``retry``: how often it is tried and the backoff between tries (:class:`RetryPolicy`; default: the
      deployment's ``task_max_deliver`` attempts, waits of 1, 4, 16, 60 s).
    - ``timeout``: the run-time limit of one attempt, in seconds. A handler still running then is cancelled, its
      automatic heartbeat stops, and the task fails with code ``timeout`` at once, not retried: a handler that hung
      once hangs again. Default: no limit (the heartbeat keeps a long handler alive).
    - ``ack_wait``: how long a delivery may go without a heartbeat before JetStream hands it to another worker.
    - ``concurrency``: tasks of this kind one agent instance runs at once (default: ``agent_concurrency``).
    """
    check_token(kind, "task kind")
    if timeout is not None and not (0 < timeout < math.inf):
        raise ValueError(f"task {kind!r}: timeout must be a positive number of seconds, not {timeout!r}")
    policy = retry or RetryPolicy()

    def mark(fn: F) -> F:
        model, output = _signature_types(fn)
        out = output if inspect.isclass(output) and issubclass(output, BaseModel) else None
        spec = TaskSpec(kind, fn.__name__, model, out, ack_wait, policy, timeout, concurrency)
        fn.__dspyrt_task__ = spec  # type: ignore[attr-defined]
        return fn

    return mark


def on_event(pattern: str, *, replay: bool = False) -> Callable[[F], F]:
    """Handle events on ``<prefix>.event.<pattern>`` (``*``/``>`` allowed), once per agent across replicas."""
    check_dotted(pattern.replace("*", "x").replace(">", "x"), "event pattern")

    def mark(fn: F) -> F:
        fn.__dspyrt_event__ = EventSpec(pattern, fn.__name__, replay)  # type: ignore[attr-defined]
        return fn

    return mark


_caller: ContextVar[str | None] = ContextVar("dspyrt_caller", default=None)


def current_caller() -> str | None:
    """The identity the requesting client declared (``Dspyrt-Client`` header), inside an endpoint handler."""
    return _caller.get()


_requester: ContextVar[str | None] = ContextVar("dspyrt_requester", default=None)


def current_requester() -> str | None:
    """Inside a ``per_user`` endpoint's handler: the user token of the subject the request came on."""
    return _requester.get()


class CheckResult(BaseModel):
    ok: bool
    detail: str = ""


class TaskContext:
    """What a task handler may do besides computing its result: report progress, keep the task alive."""

    def __init__(self, agent: Agent, run: TaskRun) -> None:
        self.agent = agent
        self.run = run

    @property
    def task_id(self) -> str:
        return self.run.envelope.id

    @property
    def attempt(self) -> int:
        return self.run.attempt

    async def heartbeat(self) -> None:
        await self.run.heartbeat()

    async def progress(self, phase: str, *, step: int | None = None, total: int | None = None, **data: Any) -> None:
        """Publish a progress event for this task (:class:`TaskProgress`; ``dspyrt submit --wait`` shows them) and
        keep it alive. ``data``: figures of the handler's own, published beside ``phase``, ``step`` and ``total``."""
        event = TaskProgress(task_id=self.task_id, phase=phase, step=step, total=total, **data)
        topic = self.agent.bus.subjects.task_progress_topic(self.run.envelope.kind, self.task_id)
        await self.agent.publish_event(topic, event)
        await self.run.heartbeat()


class Agent:
    """Base class of every agent. Subclasses set ``name`` (and ``group``, ``modes``, ``switch``, ``version``,
    ``description``)."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    # A label for the agents of one area ("loop", "validators"), shown by ``dspyrt status``.
    group: ClassVar[str] = ""
    # The modes whose processes run this agent (``dspyrt.runtime.registry.agents_for``), and the name of the
    # IntegrationConfig on/off setting that turns it off there (``"enable_metrics"``; None: nothing does).
    modes: ClassVar[frozenset[IntegrationMode]] = frozenset({IntegrationMode.FULL})
    switch: ClassVar[str | None] = None
    # The event types this agent publishes (the AsyncAPI document and the dashboard read them).
    publishes: ClassVar[tuple[type[EventData], ...]] = ()

    def __init__(self, config: IntegrationConfig) -> None:
        if not self.name:
            raise TypeError(f"{type(self).__name__} must set a name")
        check_token(self.name, "agent name")
        self.config = config
        self.started_at = time.time()
        self._bus: Bus | None = None
        self._client: Client | None = None

    # --- declared handlers ----------------------------------------------------------------------------

    @classmethod
    def endpoints(cls) -> list[EndpointSpec]:
        return [s for s in (getattr(m, "__dspyrt_endpoint__", None) for m in _members(cls)) if s]

    @classmethod
    def tasks(cls) -> list[TaskSpec]:
        return [s for s in (getattr(m, "__dspyrt_task__", None) for m in _members(cls)) if s]

    @classmethod
    def events(cls) -> list[EventSpec]:
        return [s for s in (getattr(m, "__dspyrt_event__", None) for m in _members(cls)) if s]

    # --- what the host gives the agent ------------------------------------------------------------------

    def attach(self, bus: Bus, client: Client) -> None:
        self._bus = bus
        self._client = client

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError(f"agent {self.name} is not running on a bus")
        return self._bus

    @property
    def client(self) -> Client:
        """The user-facing client, for calling other agents (trace context follows automatically)."""
        if self._client is None:
            raise RuntimeError(f"agent {self.name} is not running on a bus")
        return self._client

    async def publish_event(self, topic: str, data: dict[str, Any] | BaseModel) -> None:
        await publish_event(self.bus, topic, data, source=self.name)

    # --- overridable lifecycle -------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Open what the agent needs (buckets, models, ...) before it serves; close it after."""
        yield

    async def health_checks(self) -> dict[str, CheckResult]:
        """The agent's own dependency checks; the host adds the NATS check."""
        return {}


def _members(cls: type) -> list[Any]:
    seen: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for key, value in vars(klass).items():
            seen[key] = value
    return list(seen.values())
