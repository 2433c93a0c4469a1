"""``dspyrt lm-cache`` shows and clears the switcher's shared LM response cache, as a real process on a real bus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr

from dspyrt.agents.switcher.agent import SwitcherAgent
from dspyrt.bus import Bus, EmbeddedServer, ensure_streams, free_port
from dspyrt.bus.audit import read_audit
from dspyrt.bus.streams import cache_bucket
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import start_server

pytestmark = pytest.mark.timeout(60)

DSPYRT = Path(sys.executable).parent / "dspyrt"
MIB = 1024 * 1024


async def dspyrt(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``dspyrt`` as a user runs it, in its own process (without blocking this test's event loop)."""
    done = await anyio.run_process([str(DSPYRT), *args], env={**os.environ, "COLUMNS": "200", **env}, check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def env_of(config: IntegrationConfig, **settings: object) -> dict[str, str]:
    return {
        "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
        "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
        "DSPYRT_LOG_LEVEL": "WARNING",
        **{f"DSPYRT_{k.upper()}": str(v) for k, v in settings.items()},
    }


def report_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


async def test_before_any_switcher_ran_there_is_no_cache(config: IntegrationConfig, bus: Bus) -> None:
    env = env_of(config)
    bucket = bus.subjects.lm_cache_bucket

    shown = await dspyrt(env, "lm-cache")
    assert shown.returncode == 0, shown.stderr
    assert "no LM cache yet (the switcher creates it on its first start)" in shown.stdout
    assert bucket in shown.stdout
    assert "lm_cache_memory_entries" in shown.stdout

    data = report_of(await dspyrt(env, "lm-cache", "--json"))
    assert data["bucket"] == bucket and data["stream"] == f"KV_{bucket}"
    assert data["exists"] is False and data["entries"] == 0
    assert data["settings"] == {
        "lm_cache": True,
        "lm_cache_ttl_hours": 168.0,
        "lm_cache_max_mb": 1024,
        "lm_cache_memory_entries": 10_000,
    }
    assert data["notes"] == ["no LM cache yet (the switcher creates it on its first start)"]

    # Clearing nothing is not an error, and does not create the bucket.
    cleared = report_of(await dspyrt(env, "lm-cache", "--clear", "--json"))
    assert cleared["removed"] == 0 and cleared["exists"] is False
    assert report_of(await dspyrt(env, "lm-cache", "--json"))["exists"] is False


async def test_entries_are_counted_and_cleared(config: IntegrationConfig, bus: Bus) -> None:
    env = env_of(config)
    bucket = bus.subjects.lm_cache_bucket
    kv = await cache_bucket(bus, bucket, config.stream_layout, ttl=3600, max_bytes=2 * MIB)
    for i in range(3):
        await kv.put(f"key{i}", b'{"model": "demo/x", "text": "an answer"}')

    data = report_of(await dspyrt(env, "lm-cache", "--json"))
    assert data["exists"] is True
    assert data["entries"] == 3 and data["size_bytes"] > 0
    assert data["ttl_seconds"] == 3600 and data["max_bytes"] == 2 * MIB
    # The bucket keeps the limits it was made with; the configuration (168 h, 1024 MB) says otherwise.
    assert any("created with" in note for note in data["notes"])

    shown = await dspyrt(env, "lm-cache")
    assert shown.returncode == 0, shown.stderr
    assert f"bucket {bucket}" in shown.stdout
    assert "entries  3" in shown.stdout and "1 h" in shown.stdout and "2.0 MiB" in shown.stdout

    cleared = await dspyrt(env, "lm-cache", "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert f"removed 3 entries from LM cache bucket {bucket}" in cleared.stdout
    assert "in-memory LRU" in cleared.stdout and "restarts" in cleared.stdout

    after = report_of(await dspyrt(env, "lm-cache", "--json"))
    assert after["exists"] is True and after["entries"] == 0 and after["removed"] is None

    [record] = [r for r in await read_audit(bus) if r.action == "lm-cache.clear"]
    assert record.target == bucket and record.detail == {"removed": 3}

    await kv.put("again", b"{}")
    again = report_of(await dspyrt(env, "lm-cache", "--clear", "--json"))
    assert again["removed"] == 1 and again["entries"] == 0
    assert any("in-memory LRU" in note for note in again["notes"])


async def test_the_bucket_is_the_one_the_switcher_makes(config: IntegrationConfig, bus: Bus, client: Client) -> None:
    switcher_config = config.model_copy(update={"lm_cache_ttl_hours": 2.0, "lm_cache_max_mb": 3})
    agent = SwitcherAgent(switcher_config)
    agent.attach(bus, client)
    assert await agent.make_cache() is not None

    data = report_of(await dspyrt(env_of(config, lm_cache_ttl_hours=2, lm_cache_max_mb=3), "lm-cache", "--json"))
    assert data["exists"] is True and data["entries"] == 0
    assert data["ttl_seconds"] == 7200 and data["max_bytes"] == 3 * MIB
    assert data["notes"] == []  # the configuration and the bucket agree


async def test_an_unreachable_nats_is_one_line_and_exit_code_2(config: IntegrationConfig) -> None:
    env = env_of(config.model_copy(update={"nats_urls": [f"nats://127.0.0.1:{free_port()}"]}))
    done = await dspyrt(env, "lm-cache")
    assert done.returncode == 2
    assert done.stderr.startswith("error unavailable: cannot reach NATS")
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A nats-server where ``viewer`` may only look at streams and ``admin`` may do everything."""
    conf = tmp_path / "server.conf"
    conf.write_text(
        """
authorization {
  users = [
    {user: admin, password: "pw-admin-test"}
    {user: viewer, password: "pw-viewer-test",
     permissions: {publish: ["$JS.API.STREAM.INFO.>"], subscribe: ["_INBOX.viewer.>"]}}
  ]
}
"""
    )
    server = start_server(tmp_path / "guarded" / "jetstream", extra_args=["-c", str(conf)])
    try:
        yield server
    finally:
        server.stop()


async def test_a_refused_purge_is_one_line_and_exit_code_2(
    guarded: EmbeddedServer, prefix: str, tmp_path: Path
) -> None:
    admin = IntegrationConfig(
        nats_urls=[guarded.url],
        nats_user="admin",
        nats_password=SecretStr("pw-admin-test"),
        subject_prefix=prefix,
        state_dir=tmp_path / "state",
        event_stream_max_mb=8,
    )
    async with Bus(admin.connection_options(name="admin"), admin.subjects) as bus:
        await ensure_streams(bus, admin.stream_layout)
        kv = await cache_bucket(bus, bus.subjects.lm_cache_bucket, ttl=3600, max_bytes=MIB)
        await kv.put("a", b"{}")
        await kv.put("b", b"{}")

        viewer = {**env_of(admin), "DSPYRT_NATS_USER": "viewer", "DSPYRT_NATS_PASSWORD": "pw-viewer-test"}
        shown = report_of(await dspyrt(viewer, "lm-cache", "--json"))
        assert shown["entries"] == 2

        refused = await dspyrt(viewer, "lm-cache", "--clear")
        assert refused.returncode == 2, refused.stderr
        # The connection's own warning about it may come first; the command's error is the last line.
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error permission_denied: NATS refused to purge stream {shown['stream']}")
        assert last.endswith("permissions violation for user 'viewer'") and "Traceback" not in refused.stderr
        assert (await bus.js.stream_info(shown["stream"])).state.messages == 2  # nothing was removed
