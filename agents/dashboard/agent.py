"""The dashboard agent (``<prefix>.dashboard.*``): the guide's MetricsDashboard on the bus.

At start it replays the whole event stream with a fresh ordered consumer, so every instance holds the complete
history (an instance's series survive its restart because the stream does), then follows new events. Alert
states, custom metric types and rules set at run time are kept in the KV bucket ``<PREFIX>_dashboard``; each
alert transition is written there with compare-and-swap, so of several replicas exactly one publishes it
(``alert.firing`` / ``alert.resolved``) and takes its action (``alert.action``):

- a regression on the canary version of a program (labels ``program`` and ``version``, the deploy registry's
  canary) rolls the canary back through ``loop-deploy.rollback``;
- with ``auto_optimize``, a regression on a deployed program starts a ``cycle`` task with the program's latest
  cycle request (kept by the cycle coordinator), under a task id derived from the alert and its episode, so one
  firing alert starts one cycle.

Endpoints: ``snapshot`` (what both views show), ``alerts``, ``rules``, ``set_rules``, ``metrics``,
``register_metric``; the web page is served on ``DSPYRT_DASHBOARD_PORT``. Its settings are
``IntegrationConfig``'s ``alerts_file`` and ``dashboard_*`` fields (``DSPYRT_ALERTS_FILE``, ``DSPYRT_DASHBOARD_*``).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup
from anyio.abc import TaskStatus as AnyioTaskStatus
from nats.js import api
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import metrics

from dspyrt.agents.dashboard.alerts import (
    Alert,
    AlertRule,
    AlertRuleError,
    AlertTransition,
    RegressionRule,
    load_rules_file,
    parse_rules,
)
from dspyrt.agents.dashboard.core import MetricsDashboard
from dspyrt.agents.dashboard.models import (
    AlertAction,
    AlertChanged,
    AlertFiring,
    AlertList,
    AlertResolved,
    CustomMetricType,
    DashboardSnapshot,
    MetricRegistered,
    MetricType,
    MetricTypeList,
    QueueDepth,
    RuleList,
    RulesChanged,
    SetRules,
    SnapshotQuery,
)
from dspyrt.agents.dashboard.otel import DashboardInstruments
from dspyrt.agents.dashboard.web import create_app, listen, running_web, web_access
from dspyrt.agents.deployments import DeployRegistry, ProgramPointer
from dspyrt.agents.loop.models import CycleCompleted
from dspyrt.bus import DspyrtError, Empty, Event, TaskStatus, decode
from dspyrt.bus.streams import key_value, kv_keys, kv_update
from dspyrt.runtime.agent import Agent, CheckResult, endpoint
from dspyrt.runtime.config import IntegrationConfig, IntegrationMode

log = logging.getLogger("dspyrt.dashboard")

ALERT_KEY = "alert."
METRIC_KEY = "metric."
RULES_KEY = "rules"


# ------------------------------------------------------------------------------------------------ agent


class DashboardAgent(Agent):
    """The guide's MetricsDashboard on the bus: series from the event stream, alerts, views."""

    name = "dashboard"
    group = "monitoring"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.MONITORING_ONLY})
    switch = "enable_metrics"
    description = "metrics dashboard: series from events, alerts and their actions, web and terminal views"
    publishes = (AlertFiring, AlertResolved, AlertAction, RulesChanged, MetricRegistered, QueueDepth)

    dashboard: MetricsDashboard
    kv: KeyValue
    cycles: KeyValue
    deployments: DeployRegistry
    instruments: DashboardInstruments
    replayed: anyio.Event

    def __init__(self, config: IntegrationConfig) -> None:
        super().__init__(config)
        self.web_url: str | None = None
        self.web_error: str | None = None
        self.replaying = True
        self.replay_target = 0
        self.evaluations = 0
        self._tg: TaskGroup | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        layout = self.config.stream_layout
        s = self.bus.subjects
        self.kv = await key_value(self.bus, s.bucket("dashboard"), layout)
        self.cycles = await key_value(self.bus, s.bucket("cycles"), layout)
        self.deployments = await DeployRegistry.open(self.bus, layout)
        self.dashboard = MetricsDashboard(max_points=self.config.dashboard_max_points)
        self.replaying, self.web_url, self.web_error = True, None, None
        await self._load_state()
        self.instruments = DashboardInstruments(metrics.get_meter("dspyrt.dashboard"), self.dashboard.metric_types)
        self.dashboard.listeners.append(self.instruments)
        self.replayed = anyio.Event()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._follow)
            tg.start_soon(self._evaluate_loop)
            tg.start_soon(self._queue_loop)
            try:
                if self.config.dashboard_port is None:
                    yield
                else:
                    async with self._web():
                        yield
            finally:
                tg.cancel_scope.cancel()
                self._tg = None

    @asynccontextmanager
    async def _web(self) -> AsyncIterator[None]:
        settings = self.config
        sock: socket.socket | None = None
        try:
            access = web_access(settings.dashboard_host, settings.dashboard_hosts, settings.dashboard_token_env)
            # A port the user set is that port or none; the default gives way to a free one when taken.
            explicit = "dashboard_port" in settings.model_fields_set
            sock = listen(settings.dashboard_host, settings.dashboard_port or 0, explicit=explicit)
        except DspyrtError as exc:
            # A busy port or a missing token must not take the bus side down (a second replica on the same
            # host, say): the health check says why there is no page.
            self.web_error = exc.message
            log.error("%s", exc.message)
        if sock is None:
            yield
            return
        app = create_app(self.snapshot_of, poll_interval=settings.dashboard_poll, access=access)
        async with running_web(app, sock) as url:
            self.web_url = url
            log.info(
                "dashboard web view at %s (hosts %s; %s)",
                url,
                ", ".join(sorted(access.hosts)),
                f"token from {settings.dashboard_token_env}" if access.token is not None else "no token",
            )
            yield

    async def _load_state(self) -> None:
        """Custom metric types, run-time rules and alert states kept in KV; the configured rules file."""
        stored: dict[str, bytes] = {}
        for key in await self._keys():
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value:
                stored[key] = entry.value
        for key, raw in stored.items():
            if key.startswith(METRIC_KEY):
                try:
                    self.dashboard.register_custom_metric(CustomMetricType.model_validate_json(raw))
                except ValueError as exc:  # pydantic's ValidationError too: one bad value must not stop start-up
                    log.error("stored custom metric %s ignored: %s", key, exc)
        known, rates = set(self.dashboard.metric_types), self.dashboard.rate_metrics()
        if self.config.alerts_file is not None:
            self.dashboard.configure_rules(
                load_rules_file(self.config.alerts_file, known_metrics=known, rate_metrics=rates)
            )
        if RULES_KEY in stored:
            try:
                rules = parse_rules(json.loads(stored[RULES_KEY]), source="stored rules")
                self.dashboard.set_rules(rules, replace=True)
            except (AlertRuleError, ValueError) as exc:
                log.error("stored run-time alert rules ignored: %s", exc)
        alerts: list[Alert] = []
        for key, raw in stored.items():
            if key.startswith(ALERT_KEY):
                try:
                    alerts.append(Alert.model_validate_json(raw))
                except ValueError as exc:
                    log.error("stored alert state %s ignored: %s", key, exc)
        self.dashboard.alerts.restore(alerts)

    async def _keys(self) -> list[str]:
        return await kv_keys(self.kv)

    # --- the event stream --------------------------------------------------------------------------

    async def _follow(self, *, task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Replay every event kept in the stream, then follow new ones (one ordered consumer, no state)."""
        s = self.bus.subjects
        info = await self.bus.js.stream_info(s.event_stream)
        self.replay_target = int(info.state.last_seq) if info.state.messages else 0
        sub = await self.bus.js.subscribe(
            s.all_events, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL, stream=s.event_stream
        )
        if self.replay_target == 0:
            self._caught_up()
        task_status.started()
        try:
            async for msg in sub.messages:
                await self._handle_raw(msg.data)
                if self.replaying:
                    meta = msg.metadata
                    if meta.sequence.stream >= self.replay_target or not meta.num_pending:
                        self._caught_up()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await sub.unsubscribe()
                except Exception as exc:  # connection already gone
                    log.debug("unsubscribe: %s", exc)

    def _caught_up(self) -> None:
        self.replaying = False
        self.instruments.live = True
        self.replayed.set()
        log.info("dashboard history rebuilt from %d events", self.dashboard.stats["events"])

    async def _handle_raw(self, data: bytes) -> None:
        """Decode and record one event; nothing it holds may end the agent: the stream is replayed from the
        start at every restart, so an event that did would stop every instance, again after each restart."""
        try:
            event = decode(Event, data)
        except DspyrtError:
            self.dashboard.stats["malformed"] += 1
            return
        try:
            await self._handle(event)
        except Exception:
            self.dashboard.stats["failed"] += 1
            log.warning("dashboard event %s not recorded", event.topic, exc_info=True)

    async def _handle(self, event: Event) -> None:
        if not self.dashboard.record_event(event) or event.topic != CycleCompleted.topic:
            return
        cycle = CycleCompleted.model_validate(event.data)
        if cycle.validation is None:
            await self._cycle_validation(cycle.cycle_id, cycle.program, event.time)

    async def _cycle_validation(self, cycle_id: str, program: str, at: float) -> None:
        """``cycle.completed`` does not carry the validation report: read it from the cycle task's record."""
        try:
            record = await self.client.store.get(cycle_id, kind="cycle")
        except Exception as exc:  # not a task id, bucket trouble: the rest of the cycle is recorded
            log.debug("no record for cycle %s: %s", cycle_id, exc)
            return
        if record is None:
            return
        if record.status.terminal:
            self._record_validation(program, record.result, at)
        elif self._tg is not None:
            # The coordinator publishes cycle.completed just before it stores the result.
            self._tg.start_soon(self._await_validation, cycle_id, program, at)

    async def _await_validation(self, cycle_id: str, program: str, at: float) -> None:
        try:
            record = await self.client.result(cycle_id, timeout=60, kind="cycle")
        except Exception as exc:
            log.debug("cycle %s result not read: %s", cycle_id, exc)
            return
        if record.status is TaskStatus.SUCCEEDED:
            self._record_validation(program, record.result, at)

    def _record_validation(self, program: str, result: Any, at: float) -> None:
        report = result.get("validation") if isinstance(result, dict) else None
        if isinstance(report, dict):
            try:
                self.dashboard.record_validation(program, report, at)
            except ValueError as exc:
                log.debug("validation of %s not recorded: %s", program, exc)

    # --- alerts ------------------------------------------------------------------------------------

    async def _evaluate_loop(self) -> None:
        await self.replayed.wait()
        while True:
            try:
                await self.evaluate()
            except Exception:
                log.exception("alert evaluation failed")
            await anyio.sleep(self.config.dashboard_eval_interval)

    async def evaluate(self) -> list[AlertTransition]:
        """Evaluate every rule now; persist, publish and act on the transitions this instance wins."""
        applied: list[AlertTransition] = []
        for transition in self.dashboard.evaluate_alerts(time.time()):
            if await self._persist(transition):
                applied.append(transition)
                alert = transition.alert
                await self.publish_event(f"alert.{alert.state}", AlertChanged.of(alert))
                if alert.state == "firing":
                    await self._act(alert)
        self.instruments.alerts(self.dashboard.alerts.alerts.values())
        self.evaluations += 1
        return applied

    async def _persist(self, transition: AlertTransition) -> bool:
        """Write the new state with compare-and-swap against the state this instance knew; ``False`` (and the
        stored state adopted) when another instance got there first."""
        alert, previous = transition.alert, transition.previous
        known = previous.key if previous else None
        data = alert.model_dump_json().encode()

        def move(raw: bytes | None) -> bytes | None:
            stored = Alert.model_validate_json(raw) if raw else None
            return data if (stored.key if stored else None) == known else None  # else it moved on elsewhere

        outcome = await kv_update(self.kv, ALERT_KEY + alert.id, move)
        if not outcome.written and outcome.value:
            self.dashboard.alerts.adopt(Alert.model_validate_json(outcome.value))
        return outcome.written

    async def _act(self, alert: Alert) -> None:
        """A firing regression on a program: roll its canary back, or (auto_optimize) start a new cycle."""
        rule = self.dashboard.alerts.rules.get(alert.rule)
        program = alert.labels.get("program")
        if not isinstance(rule, RegressionRule) or not rule.actions or program is None:
            return
        version = alert.labels.get("version")
        try:
            pointer = await self.deployments.pointer(program)
        except Exception as exc:
            await self._action(alert, "none", ok=False, detail=f"deploy registry unreadable: {exc}")
            return
        if pointer is None or pointer.active is None:
            await self._action(alert, "none", ok=True, detail=f"program {program} is not deployed")
            return
        if version is not None and pointer.canary is not None and str(pointer.canary.version) == version:
            await self._rollback(alert, program, version)
            return
        if version is not None and str(pointer.active.version) != version:
            detail = f"v{version} of {program} is neither its active version nor its canary"
            await self._action(alert, "none", ok=True, detail=detail)
            return
        if not self.config.auto_optimize:
            await self._action(alert, "none", ok=True, detail="auto_optimize is off: no cycle started")
            return
        await self._reoptimize(alert, program)

    async def _rollback(self, alert: Alert, program: str, version: str) -> None:
        try:
            pointer = await self.client.request(
                "loop-deploy", "rollback", {"program": program}, ProgramPointer, timeout=15
            )
        except DspyrtError as exc:
            await self._action(alert, "rollback", ok=False, detail=f"canary v{version} not rolled back: {exc}")
            return
        active = pointer.active.version if pointer.active else None
        await self._action(
            alert, "rollback", ok=True, detail=f"canary v{version} of {program} rolled back; active v{active}"
        )

    async def _reoptimize(self, alert: Alert, program: str) -> None:
        from dspyrt.agents.loop.cycle import last_cycle_key  # the loop (and DSPy) only when an alert needs it

        try:
            entry = await self.cycles.get(last_cycle_key(program))
            request: dict[str, Any] | None = json.loads(entry.value) if entry.value else None
        except KeyNotFoundError:
            request = None
        if request is None:
            await self._action(alert, "cycle", ok=False, detail=f"no stored cycle request for {program}")
            return
        task_id = f"alert-{alert.id}-{alert.episode}"
        try:
            submission = await self.client.submit("cycle", request, task_id=task_id)
        except DspyrtError as exc:
            await self._action(alert, "cycle", ok=False, detail=f"cycle not submitted: {exc}", task_id=task_id)
            return
        detail = f"re-optimization cycle {'started' if submission.created else 'already started'} for {program}"
        await self._action(alert, "cycle", ok=True, detail=detail, task_id=task_id)

    async def _action(
        self, alert: Alert, action: Literal["rollback", "cycle", "none"], *, ok: bool, detail: str, task_id: str = ""
    ) -> None:
        (log.info if ok else log.warning)("alert %s (%s): %s", alert.rule, action, detail)
        taken = AlertAction(
            id=alert.id, rule=alert.rule, labels=alert.labels, episode=alert.episode, action=action, ok=ok,
            detail=detail, task_id=task_id or None,
        )  # fmt: skip
        await self.publish_event(AlertAction.topic, taken)

    # --- endpoints ---------------------------------------------------------------------------------

    def snapshot_of(self, query: SnapshotQuery) -> DashboardSnapshot:
        """What both views show (the web page reads it over HTTP, ``dspyrt dashboard`` over the bus)."""
        return self.dashboard.snapshot(query, web_url=self.web_url, replaying=self.replaying)

    @endpoint("snapshot")
    async def snapshot(self, query: SnapshotQuery) -> DashboardSnapshot:
        """Series, alerts, programs, models and queues (all, or one program / model / metric)."""
        return self.snapshot_of(query)

    @endpoint("alerts")
    async def list_alerts(self, _: Empty) -> AlertList:
        """Every alert this dashboard knows, firing first."""
        alerts = sorted(self.dashboard.alerts.alerts.values(), key=lambda a: (a.state != "firing", -a.updated_at))
        return AlertList(alerts=alerts)

    @endpoint("rules")
    async def list_rules(self, _: Empty) -> RuleList:
        """The alert rules in force."""
        return RuleList(rules=[r.model_dump(mode="json") for r in self.dashboard.rules])

    @endpoint("set_rules")
    async def set_rules(self, request: SetRules) -> RuleList:
        """Add or replace run-time alert rules (validated; every problem is named). Every replica applies them
        (a ``dashboard.rules`` event); they are kept across restarts."""
        incoming: list[AlertRule] = parse_rules(
            request.rules,
            source="set_rules request",
            known_metrics=set(self.dashboard.metric_types),
            rate_metrics=self.dashboard.rate_metrics(),
        )
        merged = incoming if request.replace else [*self.dashboard.added_rules.values(), *incoming]
        combined = list({r.name: r for r in merged}.values())
        payload = [r.model_dump(mode="json") for r in combined]
        await self.kv.put(RULES_KEY, json.dumps(payload).encode())
        self.dashboard.set_rules(combined, replace=True)
        await self.publish_event(RulesChanged.topic, RulesChanged(rules=payload))
        return await self.list_rules(Empty())

    @endpoint("metrics")
    async def list_metrics(self, _: Empty) -> MetricTypeList:
        """Built-in and custom metric types."""
        return MetricTypeList(metric_types=sorted(self.dashboard.metric_types.values(), key=lambda i: i.name))

    @endpoint("register_metric")
    async def register_metric(self, request: CustomMetricType) -> MetricTypeList:
        """Add a custom metric type; ``metric.<name>`` events ``{value, labels}`` feed it from then on."""
        if request.name in {m.value for m in MetricType}:
            raise DspyrtError(f"{request.name!r} is a built-in metric type", code="conflict")
        known = self.dashboard.metric_types.get(request.name)
        registered_at = known.since if known is not None and known.since is not None else time.time()
        custom = request.model_copy(update={"registered_at": registered_at})
        await self.kv.put(METRIC_KEY + custom.name, custom.model_dump_json().encode())
        self.dashboard.register_custom_metric(custom)
        await self.publish_event(MetricRegistered.topic, MetricRegistered.model_validate(custom.model_dump()))
        return await self.list_metrics(Empty())

    # --- queue depth -------------------------------------------------------------------------------

    async def _queue_loop(self) -> None:
        """Read how many tasks of each kind are waiting or running; publish ``queue.depth`` when it changes
        (so the figure is in the event stream like everything else, and survives restarts)."""
        await self.replayed.wait()
        s = self.bus.subjects
        while True:
            try:
                info = await self.bus.js.stream_info(s.task_stream, subjects_filter=s.all_tasks)
                depths = {s.task_kind(subject): n for subject, n in (info.state.subjects or {}).items()}
                for series in self.dashboard.series(MetricType.QUEUE_DEPTH):
                    depths.setdefault(series.labels.get("kind", ""), 0)
                for kind, depth in sorted(depths.items()):
                    known = self.dashboard.series(MetricType.QUEUE_DEPTH, {"kind": kind})
                    latest = known[0].latest() if known else None
                    if kind and (latest is None or latest.value != depth):
                        await self.publish_event(QueueDepth.topic, QueueDepth(kind=kind, depth=depth))
            except Exception as exc:  # reconnecting; the next reading will do
                log.debug("queue depth not read: %s", exc)
            await anyio.sleep(self.config.dashboard_queue_interval)

    # --- health ------------------------------------------------------------------------------------

    async def health_checks(self) -> dict[str, CheckResult]:
        stats = self.dashboard.get_stats()
        history = (
            f"replaying up to event {self.replay_target}"
            if self.replaying
            else f"{stats['events']} events, {stats['series']} series, {stats['alerts_firing']} alerts firing"
        )
        checks = {"history": CheckResult(ok=not self.replaying, detail=history)}
        if self.config.dashboard_port is not None:
            checks["web"] = CheckResult(
                ok=self.web_url is not None, detail=self.web_url or self.web_error or "starting"
            )
        return checks
