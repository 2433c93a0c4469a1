"""A real 3-node JetStream cluster on loopback for the fault tests: the wheel's ``nats-server``, free ports, a store
dir per node, routes between every pair. Nodes can be killed (SIGKILL) and started again on the same ports and
stores, one at a time or all together.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from types import TracebackType

from dspyrt.bus import EmbeddedServer, free_port
from tests.helpers import wait_until


def _distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class ClusterNode:
    def __init__(self, name: str, server: EmbeddedServer, monitor_port: int) -> None:
        self.name = name
        self.server = server
        self.monitor_port = monitor_port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def running(self) -> bool:
        return self.server.running

    def jsz(self) -> dict[str, object]:
        """The node's JetStream view (``/jsz``); empty while it is down."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/jsz", timeout=1) as reply:
                data: dict[str, object] = json.loads(reply.read())
                return data
        except OSError:
            return {}

    def healthy(self) -> bool:
        """``/healthz``: JetStream is up, the node knows the meta leader and its streams are current."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False


class NatsCluster:
    """``size`` nats-servers forming one JetStream cluster. Use as a context manager: every node is stopped at the
    end whatever happened."""

    def __init__(self, root: Path, size: int = 3, name: str = "dspyrt-test") -> None:
        ports = _distinct_ports(3 * size)
        clients, routes, monitors = ports[:size], ports[size : 2 * size], ports[2 * size :]
        route_urls = [f"nats://127.0.0.1:{port}" for port in routes]
        self.nodes: list[ClusterNode] = []
        for i in range(size):
            node_name = f"n{i + 1}"
            extra = [
                "--server_name", node_name,
                "--cluster_name", name,
                "--cluster", route_urls[i],
                "--routes", ",".join(u for j, u in enumerate(route_urls) if j != i),
                "-m", str(monitors[i]),
            ]  # fmt: skip
            server = EmbeddedServer(
                root / node_name / "jetstream", port=clients[i], extra_args=extra, log_file=root / f"{node_name}.log"
            )
            self.nodes.append(ClusterNode(node_name, server, monitors[i]))

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> ClusterNode:
        [found] = [n for n in self.nodes if n.name == name]
        return found

    def start(self) -> NatsCluster:
        try:
            for node in self.nodes:
                node.server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.server.stop()

    def kill(self, node: ClusterNode) -> None:
        node.server.kill()

    def kill_all(self) -> None:
        for node in self.nodes:
            node.server.kill()

    def start_node(self, node: ClusterNode) -> None:
        node.server.start()

    async def ready(self, timeout: float = 30.0) -> None:
        """Every running node is healthy and they agree on one meta leader."""

        def agreed() -> bool:
            running = [n for n in self.nodes if n.running]
            if not running or not all(n.healthy() for n in running):
                return False
            leaders = {_meta_leader(n.jsz()) for n in running}
            return len(leaders) == 1 and None not in leaders

        await wait_until(agreed, timeout=timeout, what="JetStream cluster healthy with one meta leader")

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _meta_leader(jsz: dict[str, object]) -> str | None:
    meta = jsz.get("meta_cluster")
    if isinstance(meta, dict):
        leader = meta.get("leader")
        return str(leader) if leader else None
    return None
