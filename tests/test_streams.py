"""The deployment's streams: created where missing, brought to the configured settings only when allowed."""

from __future__ import annotations

import pytest

from dspyrt.bus import Bus, StreamLayout, StreamOutcome, ensure_streams
from dspyrt.runtime.config import IntegrationConfig


async def test_streams_are_created_kept_and_updated_only_when_allowed(
    config: IntegrationConfig, caplog: pytest.LogCaptureFixture
) -> None:
    s = config.subjects
    names = [s.task_stream, s.event_stream, s.dlq_stream, s.audit_stream]
    small = StreamLayout(event_max_bytes=4 * 1024 * 1024)
    larger = StreamLayout(event_max_bytes=6 * 1024 * 1024)
    async with Bus(config.connection_options(name="test-streams"), config.subjects) as bus:
        assert await ensure_streams(bus, small, update=False) == dict.fromkeys(names, StreamOutcome.CREATED)
        assert await ensure_streams(bus, small, update=False) == dict.fromkeys(names, StreamOutcome.UNCHANGED)

        differs = await ensure_streams(bus, larger, update=False)
        assert differs[s.event_stream] is StreamOutcome.DIFFERS
        assert (await bus.js.stream_info(s.event_stream)).config.max_bytes == small.event_max_bytes
        assert f"stream {s.event_stream} exists with other settings" in caplog.text

        updated = await ensure_streams(bus, larger, update=True)
        assert updated == {**dict.fromkeys(names, StreamOutcome.UNCHANGED), s.event_stream: StreamOutcome.UPDATED}
        assert (await bus.js.stream_info(s.event_stream)).config.max_bytes == larger.event_max_bytes
