"""Payload size limits: refused before publishing, naming the size and the server's limit.

This module's server runs with a 64 KiB ``max_payload`` (instead of the 1 MiB default), so the limit is
clearly the server's own and the payloads stay small.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import Field

from dspyrt.bus import Bus, EmbeddedServer, Message, PayloadTooLargeError, RemoteError, TaskStatus
from dspyrt.bus.messages import ERROR_CODE_HEADER, HEADER_ALLOWANCE
from dspyrt.runtime.agent import Agent, TaskContext, endpoint, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import hosting, start_server

pytestmark = pytest.mark.timeout(60)

SERVER_MAX_PAYLOAD = 64 * 1024
USABLE = SERVER_MAX_PAYLOAD - HEADER_ALLOWANCE


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    workdir = tmp_path_factory.mktemp("nats-small")
    conf = workdir / "server.conf"
    conf.write_text(f"max_payload: {SERVER_MAX_PAYLOAD}\n")
    server = start_server(workdir / "jetstream", extra_args=["-c", str(conf)])
    try:
        yield server
    finally:
        server.stop()


class Size(Message):
    n: int = Field(ge=0)


class Blob(Message):
    data: str


class Inflater(Agent):
    name = "inflater"

    @endpoint("inflate")
    async def inflate(self, request: Size) -> Blob:
        return Blob(data="x" * request.n)

    @task("inflate")
    async def inflate_task(self, job: Size, ctx: TaskContext) -> Blob:
        return Blob(data="x" * job.n)


def check_error(error: PayloadTooLargeError, size: int, what: str) -> None:
    assert error.code == "payload_too_large"
    assert (error.size, error.limit) == (size, USABLE)
    assert f"{size} bytes" in str(error)
    assert f"limit of {USABLE} bytes" in str(error)
    assert what in str(error)


async def test_limit_comes_from_the_server(bus: Bus) -> None:
    assert bus.max_payload == SERVER_MAX_PAYLOAD


async def test_publish_over_the_limit_is_refused_and_nothing_is_sent(bus: Bus) -> None:
    subject = bus.subjects.event("sizes")
    sub = await bus.nc.subscribe(subject)
    try:
        for size in (SERVER_MAX_PAYLOAD + 1, USABLE + 1):  # over the server's limit; inside the header allowance
            with pytest.raises(PayloadTooLargeError) as caught:
                await bus.publish(subject, b"x" * size)
            check_error(caught.value, size, subject)
        await bus.publish(subject, b"x" * USABLE)  # exactly at the limit: fine
        assert len((await sub.next_msg(timeout=5)).data) == USABLE
        with pytest.raises(NatsTimeoutError):
            await sub.next_msg(timeout=0.2)
    finally:
        await sub.unsubscribe()


async def test_request_and_submit_over_the_limit(config: IntegrationConfig, bus: Bus, client: Client) -> None:
    big = Blob(data="y" * SERVER_MAX_PAYLOAD)
    size = len(big.model_dump_json())
    with pytest.raises(PayloadTooLargeError) as caught:
        await client.request("inflater", "inflate", big, Blob)
    check_error(caught.value, size, config.subjects.endpoint("inflater", "inflate"))

    with pytest.raises(PayloadTooLargeError) as caught:
        await client.submit("inflate", big)
    assert caught.value.size > size  # the envelope around the input
    assert "task inflate" in str(caught.value)
    # refused before anything was recorded or queued
    assert await client.tasks() == []
    assert (await bus.js.stream_info(config.subjects.task_stream)).state.messages == 0


async def test_reply_or_result_over_the_limit_is_an_error_not_a_crash(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    async with hosting(Inflater(config)):
        with pytest.raises(RemoteError) as caught:
            await client.request("inflater", "inflate", Size(n=SERVER_MAX_PAYLOAD), Blob)
        assert caught.value.code == "payload_too_large"
        assert "reply of inflate" in caught.value.message
        raw = await bus.nc.request(config.subjects.endpoint("inflater", "inflate"), b'{"n": 100000}', timeout=5)
        assert raw.headers is not None
        assert raw.headers[ERROR_CODE_HEADER] == "413"

        # A task result over the message limit is claim-checked (object store), not lost or failed.
        record = await client.run("inflate", Size(n=SERVER_MAX_PAYLOAD), timeout=20)
        assert record.status is TaskStatus.SUCCEEDED
        assert record.result_ref is not None and record.result_ref.size > SERVER_MAX_PAYLOAD
        assert record.result == {"data": "x" * SERVER_MAX_PAYLOAD}

        # still serving
        assert await client.request("inflater", "inflate", Size(n=3), Blob) == Blob(data="xxx")
        assert (await client.run("inflate", Size(n=2), timeout=20)).result == {"data": "xx"}
