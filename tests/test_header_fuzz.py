"""Raw-protocol fuzzing of header blocks (issue 11): no message may silence an agent process.

nats-py parses every inbound message inside its connection's read loop; before ``dspyrt.bus.connection``'s guard, one
8-byte header block (``NATS/1.0``) raised there and the loop ended while the client still said "connected": every
agent of the process answered nothing until a stale-connection reconnect minutes later. The server relays any
header block a publisher sends, so the bytes here are written on a raw TCP socket, speaking the NATS protocol by
hand (``INFO``/``CONNECT``/``HPUB``/``PING``), never through nats-py.

Every installed agent runs in one agent process (``dspyrt up``, as an operator starts it). Each malformed shape
goes to every endpoint subject (the built-in ``health`` included) and every task subject; after each message,
every agent must answer ``$SRV.PING`` within 2 s (the deadline the issue sets), on the same instance (no restart).
At the end, the process's health must show the repaired messages and no reconnect: the parsing guard alone kept
the connection reading, not the liveness guard (``dspyrt.runtime.liveness``), which would take longer than 2 s anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from anyio.abc import SocketStream
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError

from dspyrt.runtime.agent import Agent
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.host import HEALTH_ENDPOINT
from dspyrt.runtime.registry import available_agents
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

PING_DEADLINE = 2.0  # the bound: every agent answers $SRV.PING within 2 s after each message
MAX_PAYLOAD = 1024 * 1024  # nats-server's default; the huge shapes stay just under it


# ----------------------------------------------------------------------------------------- raw protocol


class RawNats:
    """One NATS connection spoken by hand on a TCP socket: ``CONNECT``, ``SUB``, ``HPUB``/``PUB``, ``PING``.

    A reader task answers the server's ``PING``s, counts ``PONG``s and keeps the ``MSG``/``HMSG`` frames that
    arrive on the inbox (replies to what was sent), so the socket never backs up.
    """

    CONNECT = b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"protocol":1}\r\n'

    def __init__(self, sock: SocketStream, inbox: str) -> None:
        self.sock = sock
        self.inbox = inbox
        self.frames: list[tuple[str, bytes, bytes]] = []  # (subject, header block, payload)
        self.errors: list[bytes] = []
        self._pongs = 0
        self._pong = anyio.Event()
        self._buf = bytearray()

    @classmethod
    @asynccontextmanager
    async def connect(cls, host: str, port: int) -> AsyncIterator[RawNats]:
        async with await anyio.connect_tcp(host, port) as sock, anyio.create_task_group() as tg:
            raw = cls(sock, f"_INBOX.raw{uuid.uuid4().hex[:8]}")
            info = b""
            while b"\r\n" not in info:
                info += await sock.receive()
            if not info.startswith(b"INFO "):
                raise RuntimeError(f"not a NATS server: {info[:80]!r}")
            raw._buf += info[info.index(b"\r\n") + 2 :]
            await sock.send(cls.CONNECT + f"SUB {raw.inbox} 1\r\nSUB {raw.inbox}.> 2\r\n".encode())
            tg.start_soon(raw._read)
            await raw.flush()
            try:
                yield raw
            finally:
                tg.cancel_scope.cancel()

    async def hpub(self, subject: bytes | str, header_block: bytes, payload: bytes, reply: bytes | str = b"") -> None:
        """``HPUB subject [reply] hdr_len total_len\\r\\n<header block><payload>\\r\\n``."""
        subj = subject.encode() if isinstance(subject, str) else subject
        rep = reply.encode() if isinstance(reply, str) else reply
        sizes = f"{len(header_block)} {len(header_block) + len(payload)}".encode()
        line = b" ".join([b"HPUB", subj, *([rep] if rep else []), sizes])
        await self.sock.send(line + b"\r\n" + header_block + payload + b"\r\n")

    async def flush(self, timeout: float = 10.0) -> None:
        """``PING`` and wait for its ``PONG``: the server has processed (and routed) everything sent before."""
        seen = self._pongs
        await self.sock.send(b"PING\r\n")
        with anyio.fail_after(timeout):
            while self._pongs <= seen:
                await self._pong.wait()
        if self.errors:
            raise RuntimeError(f"the server refused what was sent: {self.errors[-1]!r}")

    async def _read(self) -> None:
        while True:
            try:
                self._buf += await self.sock.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            await self._parse()

    async def _parse(self) -> None:
        buf = self._buf
        while (end := buf.find(b"\r\n")) >= 0:
            line = bytes(buf[:end])
            if line.startswith((b"MSG ", b"HMSG ")):
                parts = line.split()
                hdr_len = int(parts[-2]) if line.startswith(b"HMSG") else 0
                total = int(parts[-1])
                if len(buf) < end + 2 + total + 2:
                    return  # the rest of the frame is still on its way
                body = bytes(buf[end + 2 : end + 2 + total])
                self.frames.append((parts[1].decode(errors="replace"), body[:hdr_len], body[hdr_len:]))
                del buf[: end + 2 + total + 2]
                continue
            del buf[: end + 2]
            if line == b"PING":
                await self.sock.send(b"PONG\r\n")
            elif line == b"PONG":
                self._pongs += 1
                self._pong.set()
                self._pong = anyio.Event()
            elif line.startswith(b"-ERR"):
                self.errors.append(line)


# ----------------------------------------------------------------------------------------- malformed shapes


@dataclass(frozen=True)
class Shape:
    """One hostile message: its header block, its payload, and optionally a reply subject of its own."""

    name: str
    block: bytes
    payload: bytes = b"{}"
    reply: bytes | None = None  # None: the raw connection's inbox
    # nats-py 2.16 raises on it inside its read loop (found by hand; the test does not ask nats-py).
    breaks_nats_py: bool = False


def _big_block(size: int) -> bytes:
    head, tail = b"NATS/1.0\r\nX-Big: ", b"\r\n\r\n"
    return head + b"a" * (size - len(head) - len(tail)) + tail


SHAPES: list[Shape] = [
    # The issue: the magic and nothing else, 8 bytes.
    Shape("magic-only", b"NATS/1.0", breaks_nats_py=True),
    Shape("magic-only-empty-payload", b"NATS/1.0", b"", breaks_nats_py=True),
    Shape("empty-block", b""),  # HPUB with a 0-byte header block
    Shape("magic-crlf", b"NATS/1.0\r\n"),
    Shape("magic-crlf-crlf", b"NATS/1.0\r\n\r\n"),
    Shape("crlf-crlf-only", b"\r\n\r\n", breaks_nats_py=True),
    Shape("crlf-only", b"\r\n", breaks_nats_py=True),
    Shape("one-byte", b"N", breaks_nats_py=True),
    Shape("truncated-magic", b"NATS/1", breaks_nats_py=True),
    Shape("truncated-status", b"NATS/1.0 5"),
    Shape("truncated-header-line", b"NATS/1.0\r\ntracepar"),
    Shape("missing-final-crlfs", b"NATS/1.0\r\ntraceparent: x"),
    Shape("lf-only", b"NATS/1.0\ntraceparent: x\n\n"),
    Shape("not-nats", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
    Shape("magic-glued", b"NATS/1.0X-A: b\r\n\r\n"),
    Shape("nul-bytes", b"NATS/1.0\r\n\x00\x00: \x00\r\n\x00\r\n\r\n"),
    Shape("status-abc", b"NATS/1.0 abc\r\n\r\n"),
    Shape("status-99999", b"NATS/1.0 99999\r\n\r\n"),
    Shape("status-negative", b"NATS/1.0 -1\r\n\r\n"),
    Shape("status-blank", b"NATS/1.0    \r\n\r\n"),
    Shape("status-503", b"NATS/1.0 503\r\n\r\n"),
    Shape("status-503-empty-payload", b"NATS/1.0 503\r\n\r\n", b""),
    Shape("status-503-description", b"NATS/1.0 503 No Responders\r\n\r\n", b""),
    Shape("status-503-no-crlf", b"NATS/1.0 503", b""),
    Shape("status-404-headers", b"NATS/1.0 404 No Messages\r\nNats-Pending-Messages: x\r\n\r\n", b""),
    Shape("status-408", b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Bytes: -1\r\n\r\n", b""),
    Shape("status-409", b"NATS/1.0 409 Consumer Deleted\r\n\r\n", b""),
    Shape(
        "status-100-heartbeat-bad-numbers",
        b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: abc\r\nNats-Last-Stream: -1\r\n"
        b"Nats-Consumer-Stalled: \r\n\r\n",
        b"",
    ),
    Shape("status-100-flow-control", b"NATS/1.0 100 FlowControl Request\r\n\r\n", b""),
    Shape("status-line-as-header", b"NATS/1.0\r\nStatus: 503\r\nDescription: No Responders\r\n\r\n", b""),
    Shape("status-not-utf8", b"NATS/1.0 \xff\xfe\r\n\r\n", breaks_nats_py=True),
    # Valid UTF-8 whose first three bytes after the space cut a character in two.
    Shape("status-cuts-a-character", "NATS/1.0 ééé\r\n\r\n".encode(), breaks_nats_py=True),
    Shape("description-not-utf8", b"NATS/1.0 503 \xff\xfe\r\n\r\n", b"", breaks_nats_py=True),
    Shape("description-not-utf8-with-headers", b"NATS/1.0 100 Idle\xff\r\nk: v\r\n\r\n", breaks_nats_py=True),
    Shape("values-not-utf8", b"NATS/1.0\r\ntraceparent: \xff\xfe\r\ntracestate: \xc3\x28\r\n\r\n"),
    Shape("names-not-ascii", "NATS/1.0\r\nété: v\r\n".encode() + b"\xff: v\r\n\r\n"),
    Shape("no-colon", b"NATS/1.0\r\nno colon at all\r\n\r\n"),
    Shape("empty-name", b"NATS/1.0\r\n: v\r\n  : w\r\n\r\n"),
    Shape("duplicate-keys", b"NATS/1.0\r\ntraceparent: a\r\ntraceparent: b\r\nTRACEPARENT: c\r\n\r\n"),
    Shape(
        "forged-dspyrt-and-micro-headers",
        b"NATS/1.0\r\nDspyrt-Task-Id: \xff\r\nDspyrt-Record-Rev: \xc2\xb2\r\nNats-Service-Error-Code: abc\r\n"
        b"Nats-Msg-Id: \r\n\r\n",
    ),
    Shape("many-lines", b"NATS/1.0\r\n" + b"k: v\r\n" * 20_000 + b"\r\n"),
    Shape("huge-near-max-payload", _big_block(MAX_PAYLOAD - 4096)),
    Shape("huge-status-not-utf8", b"NATS/1.0 503 " + b"\xff" * 500_000 + b"\r\n\r\n", b"", breaks_nats_py=True),
    Shape("huge-magic-only-payload", b"NATS/1.0", b"x" * (MAX_PAYLOAD - 4096), breaks_nats_py=True),
    # Not a header block: a reply subject that is not UTF-8 (nats-py decodes it while building the message).
    Shape("reply-subject-not-utf8", b"NATS/1.0\r\n\r\n", reply=b"_INBOX.\xff\xfe"),
]


# ----------------------------------------------------------------------------------------- the system


@dataclass(frozen=True)
class Target:
    agent: str
    subject: str
    task: bool = False


def targets_of(config: IntegrationConfig, classes: list[type[Agent]]) -> list[Target]:
    """Every subject an agent reads that a client can publish on: endpoints (``health`` too) and task kinds."""
    s = config.subjects
    found: list[Target] = []
    for cls in classes:
        for spec in cls.endpoints():
            per_user = bool(getattr(spec, "per_user", False))
            subject = s.user_endpoint(cls.name, spec.name, "fuzzer") if per_user else s.endpoint(cls.name, spec.name)
            found.append(Target(cls.name, subject))
        found.append(Target(cls.name, s.endpoint(cls.name, HEALTH_ENDPOINT)))
        found += [Target(cls.name, s.task(spec.kind), task=True) for spec in cls.tasks()]
    return found


@dataclass
class AgentSystem:
    """Every installed agent in one ``dspyrt up`` process, and the test's own connection to ask them."""

    config: IntegrationConfig
    process: subprocess.Popen[bytes]
    log_path: Path
    nc: NatsClient
    services: dict[str, str]  # micro service name -> agent name
    targets: list[Target]
    instances: dict[str, str] = field(default_factory=dict)  # service name -> instance id at the start

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def ping_all(self, deadline: float = PING_DEADLINE) -> dict[str, str]:
        """``$SRV.PING`` (every service of the server answers); the instance id of each of ours that answered
        within ``deadline`` seconds."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        answered: dict[str, str] = {}
        try:
            await self.nc.publish("$SRV.PING", b"", reply=inbox)
            with anyio.move_on_after(deadline):
                while len(answered) < len(self.services):
                    try:
                        msg = await sub.next_msg(timeout=deadline)
                    except NatsTimeoutError:
                        break
                    if not msg.data:  # the server's "no responders" (nothing serves $SRV.PING yet)
                        break
                    ping = json.loads(msg.data)
                    if ping.get("name") in self.services:
                        answered[ping["name"]] = ping["id"]
        finally:
            await sub.unsubscribe()
        return answered

    async def health(self, agent: str) -> dict[str, Any]:
        msg = await self.nc.request(self.config.subjects.endpoint(agent, HEALTH_ENDPOINT), b"{}", timeout=5)
        reply: dict[str, Any] = json.loads(msg.data)
        return reply


def start_agent_process(
    config: IntegrationConfig, classes: list[type[Agent]], workdir: Path
) -> subprocess.Popen[bytes]:
    """``dspyrt up`` with every installed agent, against the test's nats-server, as an operator starts it."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DSPYRT_", "OTEL_"))},
        "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
        "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
        "DSPYRT_STATE_DIR": str(workdir / "state"),
        "DSPYRT_AGENTS": ",".join(cls.name for cls in classes),
        "DSPYRT_EVENT_STREAM_MAX_MB": "16",
        "DSPYRT_TASK_ACK_WAIT": "3",
        "DSPYRT_TASK_MAX_DELIVER": "2",
        "DSPYRT_SHUTDOWN_GRACE": "2",
        "DSPYRT_DASHBOARD_PORT": "off",
        "DSPYRT_INSTRUMENTATIONS": "",
        "DSPYRT_LOG_LEVEL": "WARNING",
    }
    with open(workdir / "agents.log", "ab") as log:
        command = [sys.executable, "-m", "dspyrt.runtime.cli", "up"]
        return subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=log)


@asynccontextmanager
async def agent_system(config: IntegrationConfig, workdir: Path) -> AsyncIterator[AgentSystem]:
    """Every installed agent in one process, up and answering; killed at the end whatever happened."""
    classes = [cls for _, cls in sorted(available_agents().items())]
    process = start_agent_process(config, classes, workdir)
    try:
        async with await nats.connect(config.nats_urls[0], name="header-fuzz-prober") as nc:
            system = AgentSystem(
                config, process, workdir / "agents.log", nc,
                {config.subjects.service_name(cls.name): cls.name for cls in classes}, targets_of(config, classes),
            )  # fmt: skip

            async def all_up() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"the agent process exited with {process.returncode}:\n{system.log}")
                system.instances = await system.ping_all(deadline=0.5)
                return len(system.instances) == len(system.services)

            await wait_until(all_up, timeout=40, what="every agent answering $SRV.PING")
            yield system
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@asynccontextmanager
async def raw_connection(system: AgentSystem) -> AsyncIterator[RawNats]:
    url = system.nc.connected_url
    assert url is not None and url.hostname and url.port
    async with RawNats.connect(url.hostname, url.port) as raw:
        yield raw


def missing(system: AgentSystem, answered: dict[str, str]) -> list[str]:
    """The agents that did not answer, or answered from another instance (restarted)."""
    return sorted(system.services[name] for name, id_ in system.instances.items() if answered.get(name) != id_)


# ----------------------------------------------------------------------------------------- tests


async def test_an_8_byte_header_block_does_not_silence_an_agent_process(
    config: IntegrationConfig, tmp_path: Path
) -> None:
    """The issue as reported: ``NATS/1.0`` (no status, no CRLF) to one endpoint. nats-py's ``_process_headers``
    raised IndexError in the read loop, and every agent of the process answered 0 ``$SRV.PING``s."""
    async with agent_system(config, tmp_path / "agents") as system, raw_connection(system) as raw:
        await raw.hpub(config.subjects.endpoint("example", "echo"), b"NATS/1.0", b"{}", reply=raw.inbox)
        await raw.flush()
        answered = await system.ping_all()
        assert not missing(system, answered), f"silent after one 8-byte header block: {missing(system, answered)}"
        health = await system.health("example")
        assert health["bus"]["headers_dropped"] == 1
        assert health["bus"]["reconnects"] == 0


async def test_malformed_header_blocks_on_every_subject_leave_every_agent_answering(
    config: IntegrationConfig, tmp_path: Path
) -> None:
    """Every shape in ``SHAPES`` to every endpoint and task subject of every agent; after each message (after each
    shape's batch of task messages, once their workers have dead-lettered them) every agent answers ``$SRV.PING``
    within 2 s from the instance it started as. Task messages are invalid (``{}``): each ends in the dead-letter
    queue on its first delivery, none is lost or held until ``max_deliver``."""
    async with agent_system(config, tmp_path / "agents") as system, raw_connection(system) as raw:
        letters: dict[str, int] = {}  # task id -> deliveries, of every dead letter

        async def on_letter(msg: Any) -> None:
            letter = json.loads(msg.data)
            letters[letter["task_id"]] = letter["deliveries"]

        letters_sub = await system.nc.subscribe(config.subjects.all_dlq, cb=on_letter)
        endpoints = [t for t in system.targets if not t.task]
        task_subjects = [t for t in system.targets if t.task]
        sent = breaking = refused = stored = 0
        started = anyio.current_time()

        async def every_agent_answers(after: str) -> None:
            answered = await system.ping_all()
            assert not missing(system, answered), (
                f"after {after}, no $SRV.PING answer within {PING_DEADLINE:g}s from {missing(system, answered)}"
            )

        for shape in SHAPES:
            breaks = shape.breaks_nats_py or shape.reply is not None
            for target in endpoints:
                await raw.hpub(target.subject, shape.block, shape.payload, reply=shape.reply or raw.inbox)
                await raw.flush()  # the server has routed it to the agent, ahead of the PING below
                sent, breaking = sent + 1, breaking + breaks
                await every_agent_answers(f"{shape.name} on {target.subject}")
            # Task messages go through JetStream: wait until each was delivered (and dead-lettered) before asking.
            acks = {f"{raw.inbox}.{shape.name}.{i}": t for i, t in enumerate(task_subjects)}
            before = len(letters)
            for reply, target in acks.items():
                await raw.hpub(target.subject, shape.block, shape.payload, reply=shape.reply or reply)
            await raw.flush()
            sent, breaking = sent + len(acks), breaking + breaks * len(acks)
            # With a reply subject of its own the acknowledgements went there: count dead letters instead.
            seqs = [await pub_ack(raw, reply) for reply in acks] if shape.reply is None else None
            kept = len(acks) if seqs is None else len(seqs) - seqs.count(None)
            stored, refused = stored + kept, refused + len(acks) - kept
            await wait_until(
                partial(dead_lettered, letters, seqs, before + kept),
                timeout=15,
                what=f"dead letters of the {shape.name} task messages",
            )
            await every_agent_answers(f"{shape.name} on every task subject")
        elapsed = anyio.current_time() - started
        await letters_sub.unsubscribe()

        health = await system.health("example")
        figures = health["bus"]
        print(
            f"\n{sent} malformed messages ({len(SHAPES)} shapes x {len(system.targets)} subjects of "
            f"{len(system.services)} agents) in {elapsed:.1f}s; {breaking} of them used to stop nats-py's read loop; "
            f"{stored} task messages stored and dead-lettered, {refused} refused by JetStream (headers over 64 KiB); "
            f"process figures: {figures}"
        )
        # Each task message was dead-lettered on its first delivery: none held until max_deliver (a Status its
        # publisher wrote made nats-py's fetch take it for a server status, failing or skipping the delivery).
        late = {task_id: n for task_id, n in letters.items() if n != 1}
        assert len(letters) == stored and not late, f"dead-lettered after more than one delivery: {late}"
        # The process survived each message by itself: no reconnect, no liveness recovery, no restart.
        assert figures["reconnects"] == 0 and figures["liveness_recoveries"] == 0, figures
        assert figures["headers_dropped"] >= sum(shape.breaks_nats_py for shape in SHAPES) * len(endpoints), figures
        assert figures["messages_dropped"] >= len(endpoints), figures  # the reply subject that is not UTF-8
        assert figures["statuses_removed"] > 0, figures  # "Status:" lines a publisher stored with a task
        assert health["checks"]["nats"]["ok"] and "malformed inbound" in health["checks"]["nats"]["detail"]
        assert system.process.poll() is None, system.log


def dead_lettered(letters: dict[str, int], seqs: list[int | None] | None, count: int) -> bool:
    """Every stored message of ``seqs`` has its dead letter (``invalid-<stream sequence>``); without the
    sequences, ``count`` dead letters arrived."""
    if seqs is None:
        return len(letters) >= count
    return all(f"invalid-{seq}" in letters for seq in seqs if seq is not None)


async def pub_ack(raw: RawNats, reply: str, timeout: float = 10.0) -> int | None:
    """The stream sequence JetStream acknowledged on ``reply``; None when it refused to store the message
    (a header block over JetStream's 64 KiB)."""
    await wait_until(lambda: any(subject == reply for subject, _, _ in raw.frames), timeout=timeout, what=reply)
    ack = json.loads(next(payload for subject, _, payload in raw.frames if subject == reply))
    return int(ack["seq"]) if "error" not in ack else None
