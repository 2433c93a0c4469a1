"""Test helpers: host an agent in-process or in its own OS process, and wait for things without timing asserts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketStream
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError

from dspyrt.bus import Bus, DeadLetter, EmbeddedServer, TaskStore, free_port
from dspyrt.runtime.agent import Agent
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.host import AgentHost
from dspyrt.runtime.supervisor import RunningSystem
from dspyrt.runtime.supervisor import serving as supervisor_serving

ROOT = Path(__file__).resolve().parent.parent


def start_server(store_dir: Path, *, port: int = 0, extra_args: list[str] | None = None) -> EmbeddedServer:
    """A real nats-server with JetStream in ``store_dir``, logging beside it."""
    return EmbeddedServer(
        store_dir, port=port, extra_args=extra_args, log_file=store_dir.parent / "nats-server.log"
    ).start()


@contextmanager
def restartable_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of the test's own, on a fixed port so a restart comes back at the same address; always stopped."""
    server = start_server(tmp_path / "nats" / "jetstream", port=free_port())
    try:
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def hosting(agent: Agent) -> AsyncIterator[AgentHost]:
    """Run ``agent`` on its own connection (as its own process would) for the block; then drain it."""
    config = agent.config
    async with Bus(config.connection_options(name=f"agent-{agent.name}"), config.subjects) as bus:
        store = await TaskStore.open(bus)
        host = AgentHost(agent, bus, store, Client(bus, store, identity=agent.name))
        async with anyio.create_task_group() as tg:
            await tg.start(host.run)
            yield host
            tg.cancel_scope.cancel()


def serving(config: IntegrationConfig, classes: list[type[Agent]]) -> AbstractAsyncContextManager[RunningSystem]:
    """``dspyrt.runtime.supervisor.serving`` as the tests use it (no signal handlers: this is the test process)."""
    return supervisor_serving(config, classes, process_name="test", ready_timeout=15)


async def wait_until(check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 20.0, what: str = "") -> None:
    """Poll ``check`` until it is true; fail (TimeoutError) after ``timeout`` seconds."""
    try:
        with anyio.fail_after(timeout):
            while True:
                result = check()
                if not isinstance(result, bool):
                    result = await result
                if result:
                    return
                await anyio.sleep(0.05)
    except TimeoutError as exc:
        raise TimeoutError(f"not true within {timeout:g}s: {what or check!r}") from exc


async def dead_letters_of(client: Client, task_id: str) -> list[DeadLetter]:
    """The task's dead letters, once there is one. The record turns terminal just before the dead letter
    is published, so a test that has seen the record waits for the letter."""
    letters: list[DeadLetter] = []

    async def arrived() -> bool:
        letters[:] = [letter for _, letter in await client.dead_letters() if letter.task_id == task_id]
        return bool(letters)

    await wait_until(arrived, what=f"dead letter of {task_id}")
    return letters


async def gather_replies(
    nc: NatsClient, subject: str, *, window: float = 3.0, quiet: float = 0.5
) -> list[dict[str, Any]]:
    """Scatter-gather the way NATS tooling does it: publish with a reply inbox, collect every JSON answer."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[dict[str, Any]] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        with anyio.move_on_after(window):
            while True:
                try:
                    msg = await sub.next_msg(timeout=quiet if replies else window)
                except NatsTimeoutError:
                    if replies:
                        break
                    continue
                if msg.headers and msg.headers.get("Status") == "503":
                    break  # the server's "no responders" notice: nobody is listening
                replies.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return replies


class AgentProcess:
    """One agent in its own OS process (``python -m tests.agent_proc``), configured through DSPYRT_* variables.

    ``markers`` is a directory where the process's task handler leaves ``started-``/``done-`` files, so a test
    can see which process holds which task.
    """

    def __init__(self, config: IntegrationConfig, workdir: Path, markers: Path, **settings: object) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.markers = markers
        self.env = {
            **os.environ,
            "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
            "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
            "DSPYRT_EVENT_STREAM_MAX_MB": str(config.event_stream_max_mb),
            "DSPYRT_STATE_DIR": str(self.state_dir),
            "DSPYRT_TASK_ACK_WAIT": str(config.task_ack_wait),
            "DSPYRT_SHUTDOWN_GRACE": str(config.shutdown_grace),
            "DSPYRT_LOG_LEVEL": "INFO",
            "TEST_AGENT_MARKERS": str(markers),
            **{f"DSPYRT_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.pid

    @property
    def log(self) -> str:
        path = self.workdir / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> AgentProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.markers.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "agent.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.agent_proc"], cwd=ROOT, env=self.env, stdout=log, stderr=log
            )
        return self

    async def ready(self, timeout: float = 20.0) -> None:
        """Wait until every agent in the process is serving (it writes ``state/ready``)."""

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"agent process exited with {self.process.returncode}:\n{self.log}")
            return (self.state_dir / "ready").exists()

        await wait_until(up, timeout=timeout, what="agent process ready")

    def signal(self, signum: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    async def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit; its exit code."""
        process = self.process
        if process is None:
            raise RuntimeError("not started")
        await wait_until(lambda: process.poll() is not None, timeout=timeout, what="agent process exit")
        return int(process.returncode)

    def stop(self) -> None:
        """Make sure the process is gone (SIGKILL if needed); safe to call twice."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(10)


@asynccontextmanager
async def echoing_provider() -> AsyncIterator[str]:
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers every call with a 401 quoting the bearer token,
    as some providers and proxies do ("Incorrect API key provided: sk-...")."""

    async def answer(stream: SocketStream) -> None:
        async with stream:
            data = b""
            with anyio.move_on_after(5):
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
            head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            auth = [line for line in head.split("\r\n") if line.lower().startswith("authorization:")]
            key = auth[0].split()[-1] if auth else "?"
            message = {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}
            body = json.dumps({"error": {**message, "code": "invalid_api_key"}}).encode()
            await stream.send(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer)
        yield f"http://127.0.0.1:{port}/v1"
        tg.cancel_scope.cancel()


CYCLE = json.loads((ROOT / "examples" / "cycle.json").read_text())["input"]


def cycle(**changes: Any) -> dict[str, Any]:
    """examples/cycle.json's input with ``changes``, and no required validators (unless the changes add some)."""
    data = {**CYCLE, **changes}
    data["objectives"] = {**CYCLE["objectives"], "required_validators": []}
    data["objectives"].update(changes.get("objectives", {}))
    return data
