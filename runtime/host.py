"""``AgentHost``: puts one agent instance on the bus and takes it off again without losing work.

- endpoints become a NATS micro service (``$SRV.PING|INFO|STATS`` discovery, queue group per agent so replicas
  share requests); each request runs on a pooled worker task under the agent's concurrency limit;
- each ``@task`` kind gets a ``TaskWorker`` on the shared durable consumer, with the retry policy and run-time
  limit the kind declares;
- each ``@on_event`` gets an ``EventConsumer`` shared by the agent's replicas;
- a built-in ``health`` endpoint answers with the agent's checks, and the same figures ride in ``$SRV.STATS``.

Shutdown (cancellation): stop taking requests, let in-flight work finish within the grace period, and hand
unfinished tasks back to JetStream (nak) for redelivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service
from pydantic import BaseModel, Field, ValidationError

from dspyrt.bus import (
    Bus,
    EventConsumer,
    MessageValidationError,
    TaskEnvelope,
    TaskRun,
    TaskStore,
    TaskWorker,
    WorkerOptions,
    tracing,
)
from dspyrt.bus.messages import CLIENT_HEADER, Empty, check_size, decode, encode, error_body, field_errors_of
from dspyrt.runtime.agent import Agent, CheckResult, EndpointSpec, TaskContext, TaskSpec, _caller, _requester
from dspyrt.runtime.client import Client
from dspyrt.runtime.liveness import LivenessGuard
from dspyrt.runtime.request_pool import RequestPool
from dspyrt.runtime.telemetry import current_telemetry

log = logging.getLogger("dspyrt.host")

HEALTH_ENDPOINT = "health"
HEALTH_REFRESH = 5.0

# Micro error headers carry an HTTP-like number; the JSON body carries our stable string code.
_HTTP_CODES = {
    "invalid_message": "400",
    "payload_too_large": "413",
    "not_found": "404",
    "unavailable": "503",
    "timeout": "504",
    "conflict": "409",
}


def http_code(code: str) -> str:
    return _HTTP_CODES.get(code, "500")


@dataclass
class EndpointCounters:
    requests: int = 0
    errors: int = 0
    processing_ns: int = 0
    in_flight: int = 0
    last_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        mean = self.processing_ns / self.requests if self.requests else 0.0
        return {
            "requests": self.requests,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "mean_latency_ms": round(mean / 1e6, 3),
            "last_error": self.last_error,
        }


class HealthReply(BaseModel):
    agent: str
    instance: str
    version: str
    healthy: bool
    uptime_s: float
    checks: dict[str, CheckResult] = Field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    events: dict[str, dict[str, int]] = Field(default_factory=dict)
    dropped_spans: int = 0
    # The OpenTelemetry instrumentors the process turned on (e.g. "dspy").
    instrumentations: list[str] = Field(default_factory=list)
    # The process's NATS connection: reconnects, inbound messages nats-py could not process (repaired or dropped:
    # bus.connection.InboundRepairs), liveness probes and the forced reconnects that brought it back.
    bus: dict[str, int] = Field(default_factory=dict)


@dataclass
class AgentHost:
    agent: Agent
    bus: Bus
    store: TaskStore
    client: Client
    counters: dict[str, EndpointCounters] = field(default_factory=dict)
    workers: list[TaskWorker] = field(default_factory=list)
    consumers: list[EventConsumer] = field(default_factory=list)
    service: Service | None = None
    last_health: HealthReply | None = None
    # The process's liveness guard (``serve`` runs one per connection); its figures ride in health.
    liveness: LivenessGuard | None = None
    # Each request worker's own (shielded) cancel scope: shutdown answers requests in flight within
    # ``shutdown_grace`` instead of cancelling them, then cancels what is left through these (runtime.request_pool).
    _running: set[anyio.CancelScope] = field(default_factory=set, init=False, repr=False)

    @property
    def instance_id(self) -> str:
        return self.service.id if self.service else "-"

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        agent, config = self.agent, self.agent.config
        agent.attach(self.bus, self.client)
        # fast_acquire: a free slot must not cost a trip through the event loop per request.
        limit = anyio.Semaphore(config.agent_concurrency, fast_acquire=True)
        async with agent.lifespan(), anyio.create_task_group() as requests:
            self.service = await self._register(requests, limit)
            try:
                async with anyio.create_task_group() as tg:
                    for spec in agent.tasks():
                        worker = self._worker(spec)
                        self.workers.append(worker)
                        await tg.start(worker.run)
                    for ev in agent.events():
                        consumer = EventConsumer(
                            self.bus,
                            self.bus.subjects.event_consumer(agent.name, ev.method),
                            ev.pattern,
                            getattr(agent, ev.method),
                            replay=ev.replay,
                        )
                        self.consumers.append(consumer)
                        await tg.start(consumer.run)
                    await self.refresh_health()
                    tg.start_soon(self._health_loop)
                    log.info("agent %s up (instance %s)", agent.name, self.instance_id)
                    task_status.started()
                    await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    # Bounded: micro's stop drains each subscription, a flush that waits for a PONG, which a
                    # deaf connection (runtime.liveness gave it up) never sends.
                    with anyio.move_on_after(config.shutdown_grace):
                        await self._stop_service()
                    with anyio.move_on_after(config.shutdown_grace):
                        while any(c.in_flight for c in self.counters.values()):
                            await anyio.sleep(0.02)
                    for scope in self._running:
                        scope.cancel()
                    requests.cancel_scope.cancel()

    async def _stop_service(self) -> None:
        if self.service is not None:
            try:
                await self.service.stop()
            except Exception as exc:  # connection already gone
                log.debug("service stop: %s", exc)

    # --- request/reply ------------------------------------------------------------------------------

    async def _register(self, requests: TaskGroup, limit: anyio.Semaphore) -> Service:
        agent, s = self.agent, self.bus.subjects
        service = await add_service(
            self.bus.nc,
            name=s.service_name(agent.name),
            version=agent.version,
            description=agent.description or agent.name,
            metadata={"agent": agent.name, "group": agent.group, "prefix": s.prefix},
            queue_group=s.queue_group,
            stats_handler=self._stats_data,
        )
        pool = RequestPool(requests, self._running)
        specs = [*agent.endpoints(), EndpointSpec(HEALTH_ENDPOINT, "", Empty, HealthReply, "health and checks")]
        for spec in specs:
            self.counters[spec.name] = EndpointCounters()
            await service.add_endpoint(
                name=spec.name,
                subject=s.user_endpoint(agent.name, spec.name) if spec.per_user else s.endpoint(agent.name, spec.name),
                handler=self._dispatcher(spec, pool, limit),
                metadata={"request": spec.request.__name__, "reply": spec.reply.__name__},
            )
        # Without this round trip a request sent right after startup can reach the server before the
        # endpoints' subscriptions do ("no responders").
        await self.bus.flush()
        return service

    def _dispatcher(
        self, spec: EndpointSpec, pool: RequestPool, limit: anyio.Semaphore
    ) -> Callable[[Request], Awaitable[None]]:
        method: Callable[[Any], Awaitable[BaseModel]] = (
            getattr(self.agent, spec.method) if spec.method else self._health_endpoint
        )
        counters = self.counters[spec.name]
        queue_group = self.bus.subjects.queue_group
        max_payload = self.bus.max_payload

        async def serve(req: Request) -> None:
            started = time.perf_counter_ns()
            # Workers are reused: set who asks for this request and reset it after, so nothing leaks to the next.
            headers = req.headers
            caller = _caller.set(headers.get(CLIENT_HEADER) if headers else None)
            requester = _requester.set(self.bus.subjects.user_of_endpoint(req.subject) if spec.per_user else None)
            try:
                with tracing.process_span(
                    req.subject, headers, size=len(req.data), consumer_group=queue_group, is_request=True
                ) as span:
                    try:
                        reply = await method(decode(spec.request, req.data))
                        await req.respond(check_size(encode(reply), max_payload, f"reply of {spec.name}"))
                    except Exception as exc:
                        body = error_body(exc)
                        counters.errors += 1
                        counters.last_error = body.message
                        tracing.mark_error(span, body.code, body.message)
                        if body.code == "internal":
                            log.exception("%s.%s failed", self.agent.name, spec.name)
                        try:
                            await req.respond_error(
                                http_code(body.code), body.message, data=body.model_dump_json().encode()
                            )
                        except Exception as reply_exc:  # no reply subject, connection gone: keep serving
                            log.warning("%s.%s: error reply not sent: %s", self.agent.name, spec.name, reply_exc)
            finally:
                _requester.reset(requester)
                _caller.reset(caller)
                counters.in_flight -= 1
                counters.processing_ns += time.perf_counter_ns() - started
                limit.release()

        async def dispatch(req: Request) -> None:
            # The micro callback handles one message at a time: hand each request to a worker of its own.
            await limit.acquire()
            counters.requests += 1
            counters.in_flight += 1
            pool.submit(partial(serve, req))

        return dispatch

    # --- tasks ----------------------------------------------------------------------------------------

    def _worker(self, spec: TaskSpec) -> TaskWorker:
        agent, config = self.agent, self.agent.config
        method = getattr(agent, spec.method)

        async def handle(envelope: TaskEnvelope, run: TaskRun) -> Any:
            try:
                job = spec.input.model_validate(envelope.input)
            except ValidationError as exc:
                errors = field_errors_of(exc)
                raise MessageValidationError(
                    f"{spec.input.__name__} input is invalid: {exc.error_count()} error(s)"
                    + (f" ({errors[0].loc}: {errors[0].message})" if errors else ""),
                    errors,
                ) from exc
            return await method(job, TaskContext(agent, run))

        attempts = spec.retry.max_attempts or config.task_max_deliver
        return TaskWorker(
            self.bus,
            self.store,
            spec.kind,
            handle,
            WorkerOptions(
                ack_wait=spec.ack_wait or config.task_ack_wait,
                max_deliver=attempts,
                backoff=spec.retry.delays(attempts),
                timeout=spec.timeout,
                concurrency=spec.concurrency or config.agent_concurrency,
                drain_grace=config.shutdown_grace,
            ),
            worker_name=f"{agent.name}/{self.instance_id}",
        )

    # --- health ---------------------------------------------------------------------------------------

    async def _health_endpoint(self, _: Empty) -> HealthReply:
        return await self.refresh_health()

    async def refresh_health(self) -> HealthReply:
        checks: dict[str, CheckResult] = {"nats": self._nats_check()}
        if self.liveness is not None:
            checks["liveness"] = self.liveness.check()
        try:
            with anyio.fail_after(3):
                checks.update(await self.agent.health_checks())
        except Exception as exc:
            checks["agent"] = CheckResult(ok=False, detail=f"health check failed: {exc}")
        telemetry = current_telemetry()
        self.last_health = HealthReply(
            agent=self.agent.name,
            instance=self.instance_id,
            version=self.agent.version,
            healthy=all(c.ok for c in checks.values()),
            uptime_s=round(time.time() - self.agent.started_at, 1),
            checks=checks,
            tasks={w.kind: vars(w.stats).copy() for w in self.workers},
            events={c.name: {"handled": c.handled, "failed": c.failed} for c in self.consumers},
            dropped_spans=telemetry.dropped_spans() if telemetry else 0,
            instrumentations=telemetry.instrumentations if telemetry else [],
            bus={
                "reconnects": self.bus.reconnects,
                **self.bus.inbound.as_dict(),
                **(self.liveness.figures() if self.liveness is not None else {}),
            },
        )
        return self.last_health

    def _nats_check(self) -> CheckResult:
        bus = self.bus
        parts = ["connected" if bus.connected else "disconnected (reconnecting)"]
        if bus.reconnects:
            parts.append(f"{bus.reconnects} reconnect(s)")
        if bus.inbound.total:
            parts.append(f"{bus.inbound.total} malformed inbound message(s) survived, last: {bus.inbound.last}")
        return CheckResult(ok=bus.connected, detail="; ".join(parts))

    async def _health_loop(self) -> None:
        while True:
            await anyio.sleep(HEALTH_REFRESH)
            try:
                await self.refresh_health()
            except Exception as exc:
                log.debug("health refresh failed: %s", exc)

    def _stats_data(self, stats: EndpointStats) -> dict[str, Any]:
        """Extra figures in ``$SRV.STATS``: ours count errors and latency of the real work, not the dispatch."""
        data = self.counters[stats.name].as_dict() if stats.name in self.counters else {}
        if stats.name == HEALTH_ENDPOINT and self.last_health is not None:
            data["health"] = self.last_health.model_dump(mode="json")
        return data
