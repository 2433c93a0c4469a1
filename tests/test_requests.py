"""Request/reply through agent endpoints: typed answers, structured errors for bad input, micro discovery."""

from __future__ import annotations

import json

import anyio
import nats
import pytest
from pydantic import Field

from dspyrt.bus import Bus, EmbeddedServer, Empty, Message, RemoteError
from dspyrt.bus.messages import ERROR_CODE_HEADER, ERROR_HEADER, MAX_FIELD_ERRORS
from dspyrt.runtime.agent import Agent, current_caller, endpoint
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.host import HealthReply
from dspyrt.runtime.system import SystemAgent, SystemStatus
from tests.helpers import gather_replies, hosting, serving

pytestmark = pytest.mark.timeout(60)


class AddRequest(Message):
    a: int
    b: int


class AddReply(Message):
    total: int
    served_by: str


class Numbers(Message):
    values: list[int] = Field(max_length=1_000_000)


class Count(Message):
    n: int


class Calculator(Agent):
    name = "calc"
    group = "example"
    version = "1.2.3"
    description = "adds numbers"

    @endpoint("add")
    async def add(self, request: AddRequest) -> AddReply:
        """Add two integers."""
        return AddReply(total=request.a + request.b, served_by=self.name)

    @endpoint("count")
    async def count(self, request: Numbers) -> Count:
        return Count(n=len(request.values))

    @endpoint("whoami")
    async def whoami(self, request: Empty) -> AddReply:
        return AddReply(total=0, served_by=current_caller() or "-")

    @endpoint("explode")
    async def explode(self, request: Empty) -> Empty:
        raise RuntimeError("line one\r\nline two")


async def test_typed_request_reply(config: IntegrationConfig, client: Client) -> None:
    async with hosting(Calculator(config)):
        reply = await client.request("calc", "add", AddRequest(a=2, b=40), AddReply)
        assert reply == AddReply(total=42, served_by="calc")
        # a plain dict is validated the same way on the agent's side
        assert (await client.request("calc", "add", {"a": -1, "b": 1}, AddReply)).total == 0


async def test_who_asks_does_not_leak_to_the_next_request(config: IntegrationConfig, client: Client) -> None:
    # Requests run on reused worker tasks (runtime.request_pool): one request's Dspyrt-Client must not be seen by a
    # later request that declares none, on whichever worker it lands.
    async with hosting(Calculator(config)):
        raw = client.bus.nc
        for _ in range(5):
            asked = await raw.request(
                client.bus.subjects.endpoint("calc", "whoami"), b"{}", timeout=5, headers={"Dspyrt-Client": "alice"}
            )
            assert json.loads(asked.data)["served_by"] == "alice"
            anonymous = await raw.request(client.bus.subjects.endpoint("calc", "whoami"), b"{}", timeout=5)
            assert json.loads(anonymous.data)["served_by"] == "-"


async def test_health_endpoint(config: IntegrationConfig, client: Client) -> None:
    async with hosting(Calculator(config)) as host:
        health = await client.request("calc", "health", Empty(), HealthReply)
        assert health.agent == "calc"
        assert health.instance == host.instance_id
        assert health.version == "1.2.3"
        assert health.healthy
        assert health.checks["nats"].ok


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param(b'{"a": "two", "b": 1}', "a", id="wrong-type"),
        pytest.param(b'{"a": 1}', "b", id="missing-field"),
        pytest.param(b'{"a": 1, "b": 2, "c": 3}', "c", id="unknown-field"),
        pytest.param(b"definitely not json", "(body)", id="not-json"),
        pytest.param(b'{"a": 1, "b": "\xff\xfe"}', "(body)", id="invalid-utf8"),
        pytest.param(b"\x80\x81\x82", "(body)", id="binary"),
        pytest.param(b"[1, 2]", "(body)", id="not-an-object"),
    ],
)
async def test_malformed_request_gets_structured_error(
    config: IntegrationConfig, bus: Bus, client: Client, payload: bytes, field: str
) -> None:
    subject = config.subjects.endpoint("calc", "add")
    async with hosting(Calculator(config)) as host:
        # the typed client path: one RemoteError with the stable code and the field that was wrong
        with pytest.raises(RemoteError) as caught:
            await bus.request(subject, payload, AddReply)
        error = caught.value
        assert error.code == "invalid_message"
        assert "AddRequest" in error.message
        assert [fe.loc for fe in error.field_errors][:1] == [field]

        # the wire contract, as any NATS micro client sees it: error headers plus a JSON body
        raw = await bus.nc.request(subject, payload, timeout=5)
        assert raw.headers is not None
        assert raw.headers[ERROR_CODE_HEADER] == "400"
        assert raw.headers[ERROR_HEADER] == error.message
        body = json.loads(raw.data)
        assert body["code"] == "invalid_message"
        assert body["field_errors"][0]["loc"] == field

        # and the agent is still serving
        assert (await client.request("calc", "add", AddRequest(a=1, b=2), AddReply)).total == 3
        assert host.counters["add"].errors == 2


async def test_many_field_errors_fit_in_one_reply(config: IntegrationConfig, client: Client) -> None:
    """A payload with many bad items is answered with a bounded error, not an error reply too big to send; past
    LISTED_ERRORS_LIMIT none are listed (pydantic would build all 100k before any could be sliced)."""
    async with hosting(Calculator(config)):
        with pytest.raises(RemoteError) as caught:
            await client.request("calc", "count", {"values": ["x"] * 900}, Count)
        assert caught.value.code == "invalid_message"
        assert "900 error(s)" in caught.value.message
        assert len(caught.value.field_errors) == MAX_FIELD_ERRORS
        assert caught.value.field_errors[0].loc == "values.0"
        with pytest.raises(RemoteError) as caught:
            await client.request("calc", "count", {"values": ["x"] * 100_000}, Count)
        assert caught.value.code == "invalid_message"
        assert "100000 error(s) (too many to list)" in caught.value.message
        assert caught.value.field_errors == []
        assert (await client.request("calc", "count", Numbers(values=[1, 2, 3]), Count)).n == 3


async def test_handler_failure_and_reply_less_publish_keep_agent_serving(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    async with hosting(Calculator(config)) as host:
        with pytest.raises(RemoteError) as caught:
            await client.request("calc", "explode", Empty(), Empty)
        assert caught.value.code == "internal"
        assert "RuntimeError" in caught.value.message

        # a plain publish (no reply subject) to an endpoint must not take the agent down
        await bus.nc.publish(config.subjects.endpoint("calc", "add"), b'{"a": 1, "b": 1}')
        await bus.nc.publish(config.subjects.endpoint("calc", "add"), b"garbage")
        assert (await client.request("calc", "add", AddRequest(a=5, b=5), AddReply)).total == 10
        assert host.counters["add"].requests == 3


async def test_srv_ping_discovers_every_instance(nats_server: EmbeddedServer, config: IntegrationConfig) -> None:
    """Discovery the way `nats micro ls` does it: $SRV.PING, gather every reply."""
    service = f"{config.subject_prefix}-calc"
    async with hosting(Calculator(config)) as first, hosting(Calculator(config)) as second:
        nc = await nats.connect(nats_server.url)
        try:
            pongs = [p for p in await gather_replies(nc, "$SRV.PING") if p["name"] == service]
            assert sorted(p["id"] for p in pongs) == sorted([first.instance_id, second.instance_id])
            for pong in pongs:
                assert pong["type"] == "io.nats.micro.v1.ping_response"
                assert pong["version"] == "1.2.3"
                assert pong["metadata"] == {"agent": "calc", "group": "example", "prefix": config.subject_prefix}

            # by name: only this agent's instances answer
            by_name = await gather_replies(nc, f"$SRV.PING.{service}")
            assert {p["id"] for p in by_name} == {first.instance_id, second.instance_id}

            # INFO names the endpoints and their subjects; both replicas share one queue group
            info = await nc.request(f"$SRV.INFO.{service}.{first.instance_id}", b"", timeout=5)
            endpoints = {e["name"]: e for e in json.loads(info.data)["endpoints"]}
            assert set(endpoints) == {"add", "count", "whoami", "explode", "health"}
            assert endpoints["add"]["subject"] == config.subjects.endpoint("calc", "add")
            assert endpoints["add"]["queue_group"] == config.subjects.queue_group
            assert endpoints["add"]["metadata"] == {"request": "AddRequest", "reply": "AddReply"}
        finally:
            await nc.close()

    # once drained, neither instance answers any more
    nc = await nats.connect(nats_server.url)
    try:
        assert await gather_replies(nc, f"$SRV.PING.{service}", window=0.5) == []
    finally:
        await nc.close()


async def test_requests_are_shared_between_replicas(config: IntegrationConfig, client: Client) -> None:
    async with hosting(Calculator(config)) as first, hosting(Calculator(config)) as second:
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(client.request, "calc", "add", AddRequest(a=i, b=i), AddReply)
        served = [first.counters["add"].requests, second.counters["add"].requests]
        assert sum(served) == 40
        assert all(n > 0 for n in served)


async def test_system_status_through_serve(config: IntegrationConfig, client: Client) -> None:
    """``serve`` (supervisor) hosts the agents; the system agent finds them through $SRV.STATS."""
    async with serving(config, [Calculator, SystemAgent]) as system:
        assert (await client.request("calc", "add", AddRequest(a=3, b=4), AddReply)).total == 7
        with pytest.raises(RemoteError):
            await client.bus.request(config.subjects.endpoint("calc", "add"), b"nope", AddReply)
        # the health figures ride in $SRV.STATS; refresh them now rather than wait for the periodic refresh
        await system.supervisor.hosts["calc"].refresh_health()
        status = await client.request("system", "status", Empty(), SystemStatus)
        assert status.prefix == config.subject_prefix
        by_name = {a.name: a for a in status.agents}
        assert set(by_name) == {"calc", "system"}
        calc = by_name["calc"].instances
        assert len(calc) == 1
        assert calc[0].requests == 2
        assert calc[0].errors == 1
        assert calc[0].healthy
        assert system.supervisor.restarts == {"calc": 0, "system": 0}
