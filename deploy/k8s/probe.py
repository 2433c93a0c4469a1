"""Exec probe for one dspyrt agent (Kubernetes liveness/readiness, or any supervisor):

    python /opt/dspyrt/probe.py live  AGENT     # exit 0: alive, 1: not
    python /opt/dspyrt/probe.py ready AGENT     # exit 0: ready for work, 1: not

It reads the same configuration as the agent (DSPYRT_* variables, dspyrt.toml or $DSPYRT_CONFIG), connects with
the same credentials, and asks the agent's micro service ``<prefix>-<AGENT>``:

- live:  ``$SRV.PING.<prefix>-<AGENT>``. Alive when this container's instance answers. When NATS itself cannot be
         reached the probe also says alive: the agent reconnects by itself, and restarting it would not bring
         NATS back (it would only turn a NATS outage into a restart storm).
- ready: ``$SRV.STATS.<prefix>-<AGENT>``. Ready when this container's instance reports ``healthy`` in the figures
         of its ``health`` endpoint (its own dependency checks, refreshed every few seconds). NATS unreachable
         means not ready.

"This container's instance" is the one whose service metadata carries this host name (``host``). Agents that
do not publish a host are matched as a whole: any instance of AGENT counts, which is a weaker check.

Only the installed project (and its dependencies) is used; it prints one line saying why.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

import anyio

from dspyrt.bus import Bus, BusUnavailableError, ConfigurationError
from dspyrt.bus.subjects import SERVICE_PING, SERVICE_STATS
from dspyrt.runtime.client import resolve_servers
from dspyrt.runtime.config import load_config

CONNECT_TIMEOUT = 2.0
WINDOW = 2.0


def _mine(replies: list[dict[str, Any]], host: str) -> tuple[list[dict[str, Any]], bool]:
    """The replies of this host's instance; ``False`` when no reply says which host it is (fallback: all)."""
    hosts = [r.get("metadata", {}).get("host") for r in replies]
    if not any(hosts):
        return replies, False
    return [r for r in replies if r.get("metadata", {}).get("host") == host], True


def _healthy(stats: dict[str, Any]) -> bool:
    for endpoint in stats.get("endpoints") or []:
        if endpoint.get("name") == "health":
            health = (endpoint.get("data") or {}).get("health") or {}
            return bool(health.get("healthy"))
    return False


async def probe(mode: str, agent: str) -> tuple[int, str]:
    config = load_config()
    try:
        servers = resolve_servers(config)  # the configured URLs, or the system `dspyrt up` started here
    except BusUnavailableError as exc:
        return (0, f"alive (not checked: {exc})") if mode == "live" else (1, f"not ready: {exc}")
    options = config.connection_options(servers, name=f"dspyrt-probe-{agent}").model_copy(
        update={"connect_timeout": CONNECT_TIMEOUT, "initial_connect_attempts": 1, "max_reconnect_attempts": 0}
    )
    bus = Bus(options, config.subjects)
    try:
        with anyio.fail_after(CONNECT_TIMEOUT * len(options.servers) + 2):
            await bus.connect()
    except (BusUnavailableError, TimeoutError) as exc:
        if mode == "live":
            return 0, f"alive (not checked: NATS unreachable, the agent reconnects by itself: {exc})"
        return 1, f"not ready: NATS unreachable ({exc})"
    try:
        service = config.subjects.service_name(agent)
        discovery = SERVICE_PING if mode == "live" else SERVICE_STATS
        msgs = await bus.gather(f"{discovery}.{service}", window=WINDOW, quiet=0.3)
        replies = []
        for msg in msgs:
            try:
                replies.append(json.loads(msg.data))
            except ValueError:
                continue
        host = socket.gethostname()
        mine, matched = _mine(replies, host)
        scope = f"instance on {host}" if matched else f"instances of {service} (they publish no host)"
        if mode == "live":
            if mine:
                return 0, f"alive: {len(mine)} {scope} answered"
            return 1, f"dead: no {scope} answered $SRV.PING ({len(replies)} other instance(s) did)"
        healthy = [r for r in mine if _healthy(r)]
        if healthy:
            return 0, f"ready: {len(healthy)}/{len(mine)} {scope} healthy"
        return 1, f"not ready: {len(mine)} {scope} answered, none healthy"
    finally:
        await bus.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("live", "ready"):
        print("usage: probe.py live|ready AGENT", file=sys.stderr)
        return 2
    try:
        code, why = anyio.run(probe, argv[0], argv[1])
    except ConfigurationError as exc:
        code, why = 1, f"configuration: {exc}"
    print(why)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
