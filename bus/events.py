"""Fan-out events on ``<prefix>.event.<topic>``, kept in the event stream so late subscribers can replay."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, ClassVar

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js import api
from pydantic import BaseModel, ConfigDict, Field

from dspyrt.bus import tracing
from dspyrt.bus.connection import Bus
from dspyrt.bus.messages import decode, error_body

log = logging.getLogger("dspyrt.events")


class Event(BaseModel):
    """One event. ``data`` is the topic's own payload (documented by whoever publishes it)."""

    topic: str
    source: str = ""
    time: float = Field(default_factory=time.time)
    data: dict[str, Any] = Field(default_factory=dict)


async def publish_event(bus: Bus, topic: str, data: dict[str, Any] | BaseModel, *, source: str = "") -> None:
    """Publish an event. Core publish: the event stream captures it without a round trip per event.

    An :class:`EventData` is published only on a topic its type declares (``ValueError`` otherwise), so a reader
    that picks the model by topic reads what was written."""
    if isinstance(data, EventData) and not data.matches(topic):
        raise ValueError(f"a {type(data).__name__} event is published on {data.topic!r}, not on {topic!r}")
    payload = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
    await bus.publish(bus.subjects.event(topic), Event(topic=topic, source=source, data=payload))


class EventData(BaseModel):
    """The typed payload of one event type; subclasses set ``topic`` (``cycle.completed``; ``*`` stands for a token
    the publisher fills in, as in ``alert.*``). Unknown fields are kept, so a reader built against an older model
    accepts a newer publisher's events (forward compatibility). Values are checked strictly (no ``"12"`` for a
    number, no ``true`` for a count): an event is read from whatever published it, and a reader must not guess."""

    model_config = ConfigDict(extra="allow", strict=True)

    topic: ClassVar[str] = ""

    @classmethod
    def matches(cls, topic: str) -> bool:
        """Whether ``topic`` (a concrete one, as published) is one of this type's: token by token, ``*`` any one."""
        mine, theirs = cls.topic.split("."), topic.split(".")
        if not cls.topic or len(mine) != len(theirs):
            return False
        return all(m in ("*", t) for m, t in zip(mine, theirs, strict=True))


def event_type_of(topic: str, types: Iterable[type[EventData]]) -> type[EventData] | None:
    """The type among ``types`` whose topic ``topic`` is: an exact topic before a pattern (``alert.action``
    before ``alert.*``), then the pattern with the fewest wildcards; ``None`` when no type has it."""
    found = [t for t in types if t.matches(topic)]
    return min(found, key=lambda t: t.topic.count("*"), default=None)


EventHandler = Callable[[Event], Awaitable[None]]


class EventConsumer:
    """A durable pull consumer on the event stream, shared by the replicas of one agent.

    Each event is handled once per consumer name; a new consumer starts at the beginning of the stream
    (``replay=True``) or at new events only. A failing handler is retried a few times, then skipped with a log.
    """

    def __init__(
        self,
        bus: Bus,
        name: str,
        pattern: str,
        handler: EventHandler,
        *,
        replay: bool = False,
        max_deliver: int = 3,
    ) -> None:
        self.bus = bus
        self.name = name
        self.pattern = pattern
        self.handler = handler
        self.replay = replay
        self.max_deliver = max_deliver
        self.handled = 0
        self.failed = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self.bus.subjects
        subject = s.event_pattern(self.pattern)
        config = api.ConsumerConfig(
            durable_name=self.name,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL if self.replay else api.DeliverPolicy.NEW,
            max_deliver=self.max_deliver,
            ack_wait=30,
            filter_subject=subject,
        )
        psub = await self.bus.js.pull_subscribe(subject, durable=self.name, stream=s.event_stream, config=config)
        task_status.started()
        try:
            while True:
                try:
                    msgs = await psub.fetch(64, timeout=1.0)
                except TimeoutError:
                    continue
                except Exception as exc:  # reconnecting
                    log.debug("event fetch failed: %s", exc)
                    await anyio.sleep(0.5)
                    continue
                for msg in msgs:
                    await self._handle(msg)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await psub.unsubscribe()
                except Exception:
                    pass

    async def _handle(self, msg: Msg) -> None:
        with tracing.process_span(msg.subject, msg.headers, size=len(msg.data), consumer_group=self.name) as span:
            try:
                event = decode(Event, msg.data)
                await self.handler(event)
            except Exception as exc:
                self.failed += 1
                body = error_body(exc)
                tracing.mark_error(span, body.code, body.message)
                log.warning("event %s not handled by %s: %s", msg.subject, self.name, body.message)
                delivered = int(msg.metadata.num_delivered or 1)
                if delivered < self.max_deliver:
                    await msg.nak(delay=0.5 * delivered)
                else:
                    await msg.term()
                return
            self.handled += 1
            await msg.ack()


async def follow_events(bus: Bus, pattern: str, *, replay: bool = True) -> AsyncIterator[Event]:
    """Every event matching ``pattern`` (past ones first when ``replay``), for one reader, with no state kept."""
    subject = bus.subjects.event_pattern(pattern)
    sub = await bus.js.subscribe(
        subject,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.ALL if replay else api.DeliverPolicy.NEW,
        stream=bus.subjects.event_stream,
    )
    try:
        async for msg in sub.messages:
            try:
                yield decode(Event, msg.data)
            except Exception as exc:
                log.debug("skipping malformed event on %s: %s", msg.subject, exc)
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()
