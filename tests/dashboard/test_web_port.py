"""Which port the web view gets: the default (8765) gives way to a free port when another process holds it (a
second ``dspyrt up`` on the same machine), and the agent reports the URL it serves; a port the user set is that
port or no page, with a one-line message naming ``DSPYRT_DASHBOARD_PORT``."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import httpx
import pytest

from dspyrt.agents.dashboard.web import PORT_SETTING, listen
from dspyrt.bus import ConfigurationError
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.dashboard.common import QUICK_LOOPS, configured_dashboard, snapshot

pytestmark = pytest.mark.timeout(45)

DEFAULT_PORT = IntegrationConfig.model_fields["dashboard_port"].default


def quick_default_port(config: IntegrationConfig) -> IntegrationConfig:
    """Quick loops, and the port left at its default (not set by anyone)."""
    quick = config.model_copy(update=QUICK_LOOPS)
    assert "dashboard_port" not in quick.model_fields_set and quick.dashboard_port == DEFAULT_PORT
    return quick


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process holds (listening), for the block."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        yield taken.getsockname()[1]


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_only_the_environment_or_an_argument_sets_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PORT_SETTING, raising=False)
    assert "dashboard_port" not in IntegrationConfig().model_fields_set
    monkeypatch.setenv(PORT_SETTING, str(DEFAULT_PORT))  # the default's value, but set: that port or none
    assert "dashboard_port" in IntegrationConfig().model_fields_set
    monkeypatch.delenv(PORT_SETTING)
    assert "dashboard_port" in IntegrationConfig(dashboard_port=9000).model_fields_set


def test_a_taken_default_gives_way_and_a_taken_setting_names_itself(taken_port: int) -> None:
    with listen("127.0.0.1", taken_port, explicit=False) as sock:
        assert sock.getsockname()[1] not in (0, taken_port)
    with pytest.raises(ConfigurationError) as refused:
        listen("127.0.0.1", taken_port)
    message = refused.value.message
    assert f"cannot listen on 127.0.0.1:{taken_port}" in message and "\n" not in message
    assert f"{PORT_SETTING}={taken_port}" in message and f"set {PORT_SETTING} to a free port" in message
    # what is not a busy port stays an error whoever chose the port (here: an address this host does not have)
    with pytest.raises(ConfigurationError, match=re.escape("cannot listen on 192.0.2.1")):
        listen("192.0.2.1", 0, explicit=False)


async def test_two_dashboards_on_the_default_port_both_serve(
    config: IntegrationConfig, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "second make run" case: both agents come up healthy, on different ports, and report their URLs."""
    monkeypatch.delenv(PORT_SETTING, raising=False)
    default_was_free = _is_free(DEFAULT_PORT)
    async with (
        configured_dashboard(quick_default_port(config)) as first,
        configured_dashboard(quick_default_port(config)) as second,
    ):
        urls = [first.web_url, second.web_url]
        assert None not in urls, [first.web_error, second.web_error]
        ports = [httpx.URL(str(url)).port for url in urls]
        assert ports[0] != ports[1]
        if default_was_free:
            assert ports[0] == DEFAULT_PORT
        for agent, url in zip((first, second), urls, strict=True):
            health = await agent.health_checks()
            assert health["web"].ok and health["web"].detail == url  # what `dspyrt status --json` shows
            async with httpx.AsyncClient(base_url=str(url), timeout=5) as http:
                assert (await http.get("healthz")).json() == {"ok": True}
        assert (await snapshot(client)).web_url in urls  # the bus endpoint names the URL too


async def test_a_port_the_user_set_is_not_replaced(
    config: IntegrationConfig, client: Client, monkeypatch: pytest.MonkeyPatch, taken_port: int
) -> None:
    monkeypatch.setenv(PORT_SETTING, str(taken_port))
    # The test's settings as arguments, the port from the environment, as `dspyrt up` reads them.
    from_env = IntegrationConfig(**{**config.model_dump(exclude={"dashboard_port"}), **QUICK_LOOPS})
    assert from_env.dashboard_port == taken_port
    async with configured_dashboard(from_env) as agent:
        health = await agent.health_checks()
        assert agent.web_url is None and not health["web"].ok
        assert f"{PORT_SETTING}={taken_port}" in health["web"].detail
        assert (await snapshot(client)).web_url is None  # the bus side still answers
