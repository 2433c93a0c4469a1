"""``dspyrt.connect()``: the system's task-level verbs, spoken in DSPy.

    async with dspyrt.connect() as client:        # found as the CLI finds it: dspyrt.toml, DSPYRT_*, `dspyrt up`
        result = await client.optimize(Topic, trainset, optimizer="labeled_fewshot", params={"k": 16})
        print(result.optimized_score)

Each verb (``optimize``, ``evaluate``, ``cycle``, ``refine_role``) checks its arguments, builds the task's input
model and returns a :class:`TaskRun`: awaiting it submits the task and returns the typed result, or raises
:class:`~dspyrt.agents.api.errors.TaskFailed` (:class:`~dspyrt.agents.api.errors.ProviderError` for a provider's
failure). ``progress=callback`` gets each progress event; or follow them yourself::

    async with client.optimize(Topic, trainset) as run:   # submitted on entry
        async for event in run.progress():                # ends when the task does
            print(event.phase, event.step, event.total)
        result = await run.result()

Tasks go through :class:`dspyrt.runtime.client.Client` (``client.client``), the same submit, wait and progress the
CLI uses. ``client.program(name)`` is a deployed program as a ``dspy.Module``; ``client.load(name)`` its program
and optimized state, built locally.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
from anyio.from_thread import BlockingPortal
from anyio.streams.memory import MemoryObjectReceiveStream
from opentelemetry import context as otel_context
from pydantic import BaseModel, ValidationError

from dspyrt.agents.api.errors import task_failure
from dspyrt.agents.api.remote import RemoteProgram
from dspyrt.agents.api.signatures import (
    ExamplesLike,
    ProgramLike,
    build_request,
    example_rows,
    merged_inputs,
    program_spec,
)
from dspyrt.agents.artifacts import ArtifactStore
from dspyrt.agents.assertions.models import Case, ValidationReport, ValidationRequest
from dspyrt.agents.loop.models import (
    CycleRequest,
    CycleResult,
    EvaluateRequest,
    EvaluationResult,
    PredictReply,
    PredictRequest,
    ProgramDetail,
    ProgramName,
)
from dspyrt.agents.optimizers.models import ArtifactRef, Budget, OptimizationRequest, OptimizationResult
from dspyrt.agents.programs import load_program_state, parse_program_spec
from dspyrt.agents.roles.models import REFINE_TASK, RefineRequest, RoleDefinition, RoleRefinementResult
from dspyrt.bus import DspyrtError, MessageValidationError, NotFoundError, TaskRecord, TaskStatus
from dspyrt.bus.errors import ConfigurationError, FieldError
from dspyrt.runtime.client import Client, connect_client
from dspyrt.runtime.config import IntegrationConfig, load_config
from dspyrt.runtime.datasets import DatasetManifest
from dspyrt.runtime.events import TaskProgress

log = logging.getLogger("dspyrt.api")

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")

ProgressCallback = Callable[[TaskProgress], Awaitable[None] | None]
"""Called with each progress event of a task (an ``async def`` is awaited)."""


class TaskRun(Generic[R]):
    """One task of a verb: ``await`` it for the typed result, or ``async with`` it to follow its progress.

    The arguments were checked when the verb was called; the task is submitted when the run is awaited or entered,
    once (``task_id`` is set then). ``timeout``: seconds to wait for the result (``TimeoutError``; the task goes on).
    """

    def __init__(
        self,
        client: Client,
        kind: str,
        request: BaseModel,
        result_model: type[R],
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> None:
        self.kind = kind
        self.request = request
        self.result_model = result_model
        self.timeout = timeout
        self.task_id: str | None = None
        self._client = client
        self._callback = progress
        self._stack: AsyncExitStack | None = None
        self._events: MemoryObjectReceiveStream[TaskProgress] | None = None
        self._outcome: TaskRecord | Exception | None = None
        self._done: anyio.Event | None = None

    async def submit(self) -> str:
        """Submit the task (once); its id."""
        if self.task_id is None:
            self.task_id = (await self._client.submit(self.kind, self.request)).task_id
        return self.task_id

    def __await__(self) -> Generator[Any, None, R]:
        return self._run().__await__()

    async def _run(self) -> R:
        if self._callback is None:
            return await self.result()
        async with self:
            async for event in self.progress():
                called = self._callback(event)
                if inspect.isawaitable(called):
                    await called
            return await self.result()

    async def __aenter__(self) -> TaskRun[R]:
        if self._stack is not None:
            raise DspyrtError("this task run is already being followed", code="invalid_state")
        stack = AsyncExitStack()
        await stack.enter_async_context(self._following())
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _following(self) -> AsyncIterator[None]:
        """A task group that pumps the task's progress events into a stream, closed when the task ends."""
        task_id = await self.submit()
        send, receive = anyio.create_memory_object_stream[TaskProgress](math.inf)
        done = self._done = anyio.Event()

        async def pump() -> None:
            try:
                async for event in self._client.progress(task_id):
                    try:
                        send.send_nowait(TaskProgress.model_validate(event.data))
                    except ValidationError:
                        continue
            except Exception as exc:  # progress is a hint: losing it must not end the wait
                log.debug("progress of %s not followed: %s", task_id, exc)

        async def wait() -> None:
            with send:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(pump)
                    try:
                        self._outcome = await self._client.result(task_id, timeout=self.timeout, kind=self.kind)
                    except Exception as exc:  # kept for result(): raised outside the task group, unwrapped
                        self._outcome = exc
                    inner.cancel_scope.cancel()
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            self._events = receive
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                receive.close()

    def progress(self) -> AsyncIterator[TaskProgress]:
        """The task's progress events, from its first one; the iteration ends when the task does. Only inside
        ``async with run:``."""
        if self._events is None or self._stack is None:
            raise DspyrtError("follow progress inside 'async with client.<verb>(...) as run'", code="invalid_state")
        return self._events

    async def result(self) -> R:
        """Wait for the task (submitting it first if needed); its typed result, or the :class:`TaskFailed` its
        failure stands for."""
        if self._done is not None and self._stack is not None:
            await self._done.wait()
        if self._outcome is None:
            task_id = await self.submit()
            self._outcome = await self._client.result(task_id, timeout=self.timeout, kind=self.kind)
        if isinstance(self._outcome, Exception):
            raise self._outcome
        record = self._outcome
        if record.status is not TaskStatus.SUCCEEDED:
            raise task_failure(record)
        return self.result_model.model_validate(record.result)


class DSPyClient:
    """The task-level verbs over an open :class:`~dspyrt.runtime.client.Client`; see the module docstring.

    Made by :func:`connect`, which owns its connection. ``client`` is the lower-level client (raw submits,
    ``tasks()``, ``dead_letters()``, ...).
    """

    def __init__(self, client: Client, config: IntegrationConfig, portal: BlockingPortal) -> None:
        self.client = client
        self.config = config
        self._portal = portal
        self._loop_thread = threading.get_ident()

    # --- tasks -----------------------------------------------------------------------------------------

    def optimize(
        self,
        /,
        program: ProgramLike,
        trainset: ExamplesLike,
        valset: ExamplesLike | None = None,
        *,
        metric: str = "exact_match",
        optimizer: str | None = None,
        params: Mapping[str, Any] | None = None,
        model: str | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> TaskRun[OptimizationResult]:
        """Optimize ``program`` on ``trainset`` (scored on ``valset``, else a held-out share of the trainset):
        the ``optimize`` task. ``options``: any other field of :class:`OptimizationRequest` (``program_name``,
        ``seed``, ``no_cache``, ``metric_field``, ...)."""
        fields = self._spec_fields(program, metric, optimizer, params, model, budget, trainset=trainset, valset=valset)
        request = build_request(OptimizationRequest, {**fields, **options})
        return TaskRun(self.client, "optimize", request, OptimizationResult, progress=progress, timeout=timeout)

    def cycle(
        self,
        /,
        program: ProgramLike,
        trainset: ExamplesLike,
        devset: ExamplesLike,
        valset: ExamplesLike | None = None,
        *,
        program_name: str,
        metric: str = "exact_match",
        optimizer: str | None = None,
        params: Mapping[str, Any] | None = None,
        model: str | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> TaskRun[CycleResult]:
        """A create → evaluate → optimize → evaluate → validate → deploy cycle of ``program`` under
        ``program_name``: the ``cycle`` task. ``options``: any other field of :class:`CycleRequest`
        (``objectives``, ``validation``, ``canary_fraction``, ``shard_size``, ...)."""
        fields = self._spec_fields(
            program, metric, optimizer, params, model, budget, trainset=trainset, valset=valset, devset=devset
        )
        request = build_request(CycleRequest, {**fields, "program_name": program_name, **options})
        return TaskRun(self.client, "cycle", request, CycleResult, progress=progress, timeout=timeout)

    def evaluate(
        self,
        /,
        program: ProgramLike,
        devset: ExamplesLike,
        *,
        state: Mapping[str, Any] | None = None,
        artifact: ArtifactRef | OptimizationResult | None = None,
        metric: str = "exact_match",
        model: str | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> TaskRun[EvaluationResult]:
        """Score ``program`` on ``devset`` (sharded over the evaluators): the ``evaluate`` task. Its optimized
        state is ``state`` (a ``dump_state()``) or an ``artifact`` (an optimization's result or its artifact).
        ``options``: any other field of :class:`EvaluateRequest` (``shard_size``, ``metric_field``, ...)."""
        if isinstance(artifact, OptimizationResult):
            if artifact.artifact is None:
                raise MessageValidationError("artifact: this optimization result stored no artifact")
            artifact = artifact.artifact
        rows, inputs = example_rows(devset, "devset")
        ref = {"spec": program_spec(program), "state": dict(state) if state is not None else None, "artifact": artifact}
        fields = {"program": ref, "devset": rows, "input_fields": inputs, "metric": _metric(metric), "model": model}
        request = build_request(EvaluateRequest, {**fields, **options})
        return TaskRun(self.client, "evaluate", request, EvaluationResult, progress=progress, timeout=timeout)

    def refine_role(
        self,
        /,
        role: RoleDefinition | Mapping[str, Any],
        *,
        target_context: str | None = None,
        model: str | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> TaskRun[RoleRefinementResult]:
        """Refine an agent role (the ``refine-role`` task). ``options``: any other field of
        :class:`RefineRequest` (``use_lm``, ``save``, ``max_lm_calls``)."""
        fields: dict[str, Any] = {"role": role, "model": model, **options}
        if target_context is not None:
            fields["target_context"] = target_context
        request = build_request(RefineRequest, fields)
        return TaskRun(self.client, REFINE_TASK, request, RoleRefinementResult, progress=progress, timeout=timeout)

    def _spec_fields(
        self,
        program: ProgramLike,
        metric: str,
        optimizer: str | None,
        params: Mapping[str, Any] | None,
        model: str | None,
        budget: Budget | Mapping[str, Any] | None,
        **examples: ExamplesLike | None,
    ) -> dict[str, Any]:
        """The fields an optimize and a cycle share (:class:`OptimizationSpec`), from DSPy's objects."""
        fields: dict[str, Any] = {"program": program_spec(program), "metric": _metric(metric), "model": model}
        declared = []
        for name, value in examples.items():
            if value is not None:
                fields[name], inputs = example_rows(value, name)
                declared.append(inputs)
        fields["input_fields"] = merged_inputs(*declared)
        if optimizer is not None:
            fields["optimizer"] = optimizer
        if params is not None:
            fields["params"] = dict(params)
        if budget is not None:
            fields["budget"] = budget
        return fields

    # --- requests ----------------------------------------------------------------------------------------

    async def validate(
        self, /, cases: list[Case | Mapping[str, Any]], *, timeout: float = 30.0, **options: Any
    ) -> ValidationReport:
        """Validate a program's output records (``{"inputs": ..., "outputs": ...}``; outputs may be a
        ``dspy.Prediction``) through the ``assertions`` agent. ``options``: any other field of
        :class:`ValidationRequest` (``output_schema``, ``invariants``, ``types``, ``fail_on``, ...)."""
        records = [case if isinstance(case, Case) else _case(case) for case in cases]
        request = build_request(ValidationRequest, {"cases": records, **options})
        return await self.client.request("assertions", "validate", request, ValidationReport, timeout=timeout)

    async def predict(
        self, /, program: str, inputs: Mapping[str, Any], *, version: int | None = None, timeout: float = 60.0
    ) -> PredictReply:
        """One call of a deployed program (``serving.predict``): its active version, or ``version``."""
        request = build_request(PredictRequest, {"program": program, "inputs": dict(inputs), "version": version})
        return await self.client.request("serving", "predict", request, PredictReply, timeout=timeout)

    def program(self, name: str, version: int | None = None) -> RemoteProgram:
        """The deployed program ``name`` as a ``dspy.Module`` calling it through ``serving.predict`` (its active
        version, or ``version``); see :class:`RemoteProgram`."""
        build_request(PredictRequest, {"program": name, "inputs": {}, "version": version})  # refuse a bad name now
        return RemoteProgram(self, name, version)

    async def load(self, /, name: str, version: int | None = None) -> Any:
        """The deployed program ``name`` (its active version, or ``version``) built here, with its optimized
        state loaded: a local ``dspy.Module`` for offline use (its LM calls go to the ``dspy.LM`` you configure).
        Reads the artifact store: needs JetStream access, so not through the gateway."""
        if self.client.gateway is not None:
            raise ConfigurationError("load reads the artifact store, which a client of the gateway cannot")
        detail = await self.client.request("loop-deploy", "show", ProgramName(program=name), ProgramDetail)
        if version is None:
            deployed = detail.pointer.active
            if deployed is None:
                raise NotFoundError(f"program {name} has no active version")
        else:
            found = [v for v in detail.versions if v.version == version]
            if not found:
                known = ", ".join(str(v.version) for v in detail.versions)
                raise NotFoundError(f"program {name} has no version {version} (versions: {known})")
            deployed = found[0]
        store = await ArtifactStore.open(self.client.bus, self.config.stream_layout)
        document = await store.get(
            ArtifactRef(store=deployed.artifact_store, name=deployed.artifact_name, version=str(deployed.version),
                        sha256=deployed.artifact_sha256, size=0)
        )  # fmt: skip
        return load_program_state(parse_program_spec(document["spec"]), document["state"])

    async def put_dataset(self, /, name: str, examples: ExamplesLike) -> DatasetManifest:
        """Store ``examples`` (``dspy.Example``s or dicts) as a version of dataset ``name``; pass
        ``str(manifest.ref)`` where a verb takes examples."""
        rows, _ = example_rows(examples, "examples")
        return await self.client.put_dataset(name, rows)

    # --- calling from other threads ------------------------------------------------------------------

    def call_from_thread(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` on this client's event loop from another thread, with the caller's trace context; blocks.
        On the loop's own thread it would wait for itself: refused."""
        if threading.get_ident() == self._loop_thread:
            raise DspyrtError(
                "a blocking call on the event loop thread of the client it needs would wait for itself: in async "
                "code await program.acall(...) (or aforward); for blocking calls use dspyrt.connect_sync()",
                code="blocking_call_on_loop",
            )
        return self._portal.call(_in_context, otel_context.get_current(), fn)

    async def call_on_loop(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` on this client's event loop: directly when already on it, else through a worker thread
        (from another event loop, such as a notebook's beside a :func:`~dspyrt.connect_sync` client)."""
        if threading.get_ident() == self._loop_thread:
            return await fn()
        call = partial(self._portal.call, _in_context, otel_context.get_current(), fn)
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)


async def _in_context(context: otel_context.Context, fn: Callable[[], Awaitable[T]]) -> T:
    """``fn()`` under the caller's OpenTelemetry context: its current span is the parent of the request's."""
    token = otel_context.attach(context)
    try:
        return await fn()
    finally:
        otel_context.detach(token)


def _metric(metric: Any) -> str:
    if not isinstance(metric, str):
        raise MessageValidationError(
            "metric: name one of the service's metrics (such as 'exact_match'); a callable cannot be sent",
            [FieldError(loc="metric", message=f"expected a metric name, got {type(metric).__name__}")],
        )
    return metric


def _case(case: Mapping[str, Any]) -> Case:
    data = dict(case)
    outputs = data.get("outputs")
    if outputs is not None and hasattr(outputs, "toDict"):  # a dspy.Prediction
        data["outputs"] = dict(outputs.toDict())
    result: Case = build_request(Case, data)
    return result


def _identity() -> str:
    return os.environ.get("USER") or "python"


@asynccontextmanager
async def connect(config: IntegrationConfig | None = None, *, identity: str | None = None) -> AsyncIterator[DSPyClient]:
    """Connect to the system for the block: ``config``, else the configuration the CLI reads (``dspyrt.toml``
    or ``$DSPYRT_CONFIG``, ``DSPYRT_*``), reaching the configured NATS or the system ``dspyrt up`` started in this
    folder. No system within seconds: ``BusUnavailableError``. ``identity``: who asks (audit records; default
    ``$USER``)."""
    cfg = config if config is not None else load_config()
    async with connect_client(cfg, identity=identity or _identity()) as client:
        # The portal lets RemoteProgram.forward, called from other threads, run its request on this loop.
        portal = BlockingPortal()
        async with portal:
            try:
                yield DSPyClient(client, cfg, portal)
            finally:
                await portal.stop(cancel_remaining=True)
