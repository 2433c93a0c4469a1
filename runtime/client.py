"""The user-facing client: submit tasks, await results, follow progress, call agents, read dead letters.

async with connect_client(load_config()) as client:
    sub = await client.submit("optimize", {...})
    record = await client.result(sub.task_id, timeout=600)

A kind no worker serves is refused at submit (``UnknownKindError``, code ``unknown_kind``, naming the served
kinds). A submit that failed (say, the server restarted under it) is completed by submitting the same id again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from dspyrt.bus import (
    Bus,
    BusUnavailableError,
    ConfigurationError,
    DeadLetter,
    DspyrtError,
    Event,
    NotFoundError,
    PayloadTooLargeError,
    TaskRecord,
    TaskStore,
    ensure_streams,
    submit_task,
    wait_for_task,
)
from dspyrt.bus.events import follow_events
from dspyrt.bus.messages import CLIENT_HEADER, encode
from dspyrt.bus.streams import read_tail
from dspyrt.bus.tasks import Submission, TaskKinds, load_result, pick_task_id, replay_dead_letter
from dspyrt.runtime.config import IntegrationConfig

if TYPE_CHECKING:  # imported where used: a CLI command that needs neither starts faster without them
    from dspyrt.bus.claims import ClaimStore
    from dspyrt.runtime.datasets import DatasetManifest, DatasetStore
    from dspyrt.runtime.gateway import GatewayTasks

R = TypeVar("R", bound=BaseModel)

SYSTEM_FILE = "system.json"
# Through the gateway a task id prefix is looked up among the client's newest tasks, this many (its list's maximum).
GATEWAY_PREFIX_SCAN = 1000


class Client:
    """Talks to a running system over an open :class:`Bus`.

    Tasks go to JetStream directly (``store``), or, with ``gateway``, through the gateway agent as the
    connection's own NATS user: the deploy's client users have no JetStream access, and see their own tasks only.
    """

    def __init__(
        self, bus: Bus, store: TaskStore | None, *, identity: str | None = None, gateway: GatewayTasks | None = None
    ) -> None:
        if store is None and gateway is None:
            raise ValueError("a Client needs the task store or the gateway")
        self.bus = bus
        self._store = store
        self.gateway = gateway
        self.identity = identity
        self.kinds = TaskKinds(bus)  # served kinds, remembered briefly between submits
        self._datasets: DatasetStore | None = None
        self._claims: ClaimStore | None = None

    @property
    def store(self) -> TaskStore:
        """The task bucket, for callers with JetStream access (agents, admin); not through the gateway."""
        if self._store is None:
            raise DspyrtError(
                "this client goes through the gateway (client_gateway): task records are read with task()/tasks()",
                code="invalid_config",
            )
        return self._store

    async def request(
        self,
        agent: str,
        endpoint: str,
        payload: BaseModel | dict[str, Any],
        reply_model: type[R],
        *,
        timeout: float = 10.0,
    ) -> R:
        data = encode(payload) if isinstance(payload, BaseModel) else json.dumps(payload).encode()
        return await self.bus.request(
            self.bus.subjects.endpoint(agent, endpoint), data, reply_model, timeout=timeout, headers=self._headers()
        )

    async def call(
        self, agent: str, endpoint: str, payload: dict[str, Any], *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """A request with a JSON object in and out, for callers without the reply's model (the CLI)."""
        msg = await self.bus.request_raw(
            self.bus.subjects.endpoint(agent, endpoint),
            json.dumps(payload).encode(),
            timeout=timeout,
            headers=self._headers(),
        )
        data: dict[str, Any] = json.loads(msg.data)
        return data

    def _headers(self) -> dict[str, str] | None:
        # Who asked: agents read it as current_caller() (audit records, logs).
        return {CLIENT_HEADER: self.identity} if self.identity else None

    async def submit(
        self,
        kind: str,
        input: BaseModel | dict[str, Any],
        *,
        task_id: str | None = None,
        require_worker: bool = True,
    ) -> Submission:
        """Submit a durable task; its id (``created`` false if the id existed already).

        A kind that no worker serves (no worker of it has ever started) is refused with
        :class:`~dspyrt.bus.tasks.UnknownKindError` before anything is written. ``require_worker=False`` queues it
        anyway, for a deployment whose workers of that kind start later: the task waits for the first one.

        If a submit fails (an exception, say while the server restarts), submit the same ``task_id`` again: a task
        that was recorded but never queued is queued then, and one that was queued is not run twice.
        """
        from dspyrt.runtime.datasets import has_references, pin_references, with_dataset_hint

        payload = input.model_dump(mode="json") if isinstance(input, BaseModel) else input
        try:
            if self.gateway is not None:  # the gateway checks the kind and datasets (and which kinds clients submit)
                return await self.gateway.submit(kind, payload, task_id=task_id)
            if has_references(payload):  # the task runs on the versions that exist now, on every delivery
                payload = await pin_references(await self.datasets(), payload)
            return await submit_task(
                self.bus,
                self.store,
                kind,
                payload,
                task_id=task_id,
                submitted_by=self.identity,
                require_worker=require_worker,
                kinds=self.kinds,
            )
        except PayloadTooLargeError as exc:
            raise with_dataset_hint(exc) from exc

    async def datasets(self) -> DatasetStore:
        """The deployment's datasets (needs JetStream access: not through the gateway)."""
        from dspyrt.runtime.datasets import DatasetStore

        if self._datasets is None:
            if self._store is None:
                raise DspyrtError(
                    "this client goes through the gateway (client_gateway): datasets are put by a user with "
                    "JetStream access (the admin user)",
                    code="invalid_config",
                )
            self._datasets = await DatasetStore.open(self.bus)
        return self._datasets

    async def put_dataset(self, name: str, rows: Any, *, source: str | None = None) -> DatasetManifest:
        """Store ``rows`` (dicts or ``dspy.Example``s) as a version of dataset ``name``; the manifest says which
        (``manifest.ref``: pass ``str(manifest.ref)`` or ``"dataset:NAME"`` where a task takes examples)."""
        return await (await self.datasets()).put(name, rows, source=source)

    async def full_result(self, record: TaskRecord) -> Any:
        """A record's whole result: claim-checked results (``record.result_ref``) are read from the object store;
        through the gateway, the record's summary is what a client sees."""
        if record.result_ref is None or self.gateway is not None:
            return record.result
        if self._claims is None:  # opened once: every claim-checked result of this client is read through it
            from dspyrt.bus.claims import ClaimStore

            self._claims = await ClaimStore.open(self.bus)
        return await load_result(self._claims, record)

    async def result(self, task_id: str, *, timeout: float | None = None, kind: str | None = None) -> TaskRecord:
        """Wait until the task ends. Pass its ``kind`` when known (an agent waiting for a task it submitted: its
        permissions let it watch the records of the kinds it submits only)."""
        if self.gateway is not None:
            return await self.gateway.result(task_id, timeout)
        record = await wait_for_task(self.bus, self.store, task_id, timeout, kind=kind)
        return await self._with_full_result(record)

    async def _with_full_result(self, record: TaskRecord) -> TaskRecord:
        if record.result_ref is None:
            return record
        return record.model_copy(update={"result": await self.full_result(record)})

    async def run(self, kind: str, input: BaseModel | dict[str, Any], *, timeout: float | None = None) -> TaskRecord:
        submission = await self.submit(kind, input)
        return await self.result(submission.task_id, timeout=timeout, kind=kind)

    async def task(self, task_id: str, *, kind: str | None = None) -> TaskRecord:
        if self.gateway is not None:
            return await self.gateway.task(task_id)
        record = await self.store.get(task_id, kind)
        if record is None:
            raise NotFoundError(f"no task with id {task_id}")
        return await self._with_full_result(record)

    async def resolve_task_id(self, prefix: str) -> str:
        """The full id of the one task whose id is ``prefix`` or starts with it (see :func:`resolve_task_id`)."""
        if self.gateway is None:
            return await self.store.resolve_id(prefix)
        try:
            return (await self.gateway.task(prefix)).id
        except DspyrtError as exc:
            if exc.code != "not_found":
                raise
        # The gateway answers about this user's tasks only: look among the newest of them.
        candidates = [r.id for r in await self.gateway.tasks(GATEWAY_PREFIX_SCAN) if r.id.startswith(prefix)]
        if not candidates:
            raise NotFoundError(
                f"no task with id {prefix}, nor one whose id starts with it among your newest {GATEWAY_PREFIX_SCAN}"
            )
        return pick_task_id(prefix, candidates)

    async def tasks(self, limit: int = 50) -> list[TaskRecord]:
        if self.gateway is not None:
            return await self.gateway.tasks(limit)
        return await self.store.list(limit)

    def progress(self, task_id: str) -> AsyncIterator[Event]:
        """Progress events of one task, from its first (replayed) to live ones (through the gateway: the latest
        one each time it changes)."""
        if self.gateway is not None:
            return self.gateway.progress(task_id)
        return follow_events(self.bus, self.bus.subjects.task_progress_pattern(task_id), replay=True)

    async def dead_letters(self, limit: int = 100) -> list[tuple[int, DeadLetter]]:
        """Dead letters with their stream sequence, newest last."""
        tail = await read_tail(self.bus, self.bus.subjects.dlq_stream, limit)
        return [(seq, DeadLetter.model_validate_json(data)) for seq, _, data in tail]

    async def replay(self, task_id: str) -> str:
        """Replay the newest dead letter of ``task_id`` (after fixing whatever killed it)."""
        for _, letter in reversed(await self.dead_letters(limit=10_000)):
            if letter.task_id == task_id:
                return await replay_dead_letter(self.bus, self.store, letter)
        raise NotFoundError(f"no dead letter for task {task_id}")

    async def consumer_pending(self, kind: str) -> int:
        """Tasks of ``kind`` waiting in the queue (queue depth)."""
        s = self.bus.subjects
        try:
            info = await self.bus.js.consumer_info(s.task_stream, s.task_consumer(kind))
        except Exception:
            return 0
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def resolve_task_id(source: Client | TaskStore, prefix: str) -> str:
    """The full id of the one task whose id is ``prefix`` or starts with it, as git takes an abbreviated commit.

    An exact id wins. No match: :class:`~dspyrt.bus.errors.NotFoundError`; several: ``DspyrtError`` with code
    ``ambiguous_id`` naming the candidates. From a :class:`~dspyrt.bus.tasks.TaskStore` (one listing of the task
    bucket's keys), or a :class:`Client` (through the gateway: among the user's newest tasks). Commands that take a
    task id to read (``tasks show``, ``traces``, ``dlq --replay``) call it; ``submit --id`` takes its id as it is.
    """
    if isinstance(source, TaskStore):
        return await source.resolve_id(prefix)
    return await source.resolve_task_id(prefix)


def system_file(config: IntegrationConfig) -> Path:
    """Where ``dspyrt up`` writes how to reach it, so other commands in the same folder find it."""
    return config.state_dir / SYSTEM_FILE


def resolve_servers(config: IntegrationConfig) -> list[str]:
    if config.nats_urls:
        return config.nats_urls
    path = system_file(config)
    if path.is_file():
        try:
            return [str(json.loads(path.read_text())["nats_url"])]
        except (ValueError, KeyError) as exc:
            raise BusUnavailableError(f"{path} is unreadable ({exc}); restart 'dspyrt up'") from exc
    raise BusUnavailableError(
        f"no system found: no NATS URL configured and no {path} (start one with 'dspyrt up', or set DSPYRT_NATS_URLS)"
    )


@asynccontextmanager
async def connect_client(
    config: IntegrationConfig,
    *,
    identity: str | None = None,
    servers: list[str] | None = None,
    create_streams: bool = False,
) -> AsyncIterator[Client]:
    """Connect to the configured (or locally started) system; fail within seconds if there is none.

    The agents create the streams; a client only does so when asked (it may lack the permission).
    """
    bus = Bus(config.connection_options(servers or resolve_servers(config), name="dspyrt-client"), config.subjects)
    await bus.connect()
    try:
        if create_streams:
            await ensure_streams(bus, config.stream_layout)
        if config.client_gateway:
            from dspyrt.runtime.gateway import GatewayTasks

            if not config.nats_user:
                raise ConfigurationError("client_gateway needs nats_user: the gateway answers about that user's tasks")
            headers = {CLIENT_HEADER: identity} if identity else None
            yield Client(bus, None, identity=identity, gateway=GatewayTasks(bus, config.nats_user, headers=headers))
        else:
            yield Client(bus, await TaskStore.open(bus), identity=identity)
    finally:
        await bus.close()
