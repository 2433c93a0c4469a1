"""deploy/nats/cluster-tls.conf, for real: three nats-servers (the wheel's) whose cluster block is the shipped one
— route password, route URLs from the environment, mutual TLS — form a JetStream cluster with certificates
generated here (a CA, one certificate per node for the address the other nodes dial it by); a fourth node with a
certificate from another CA is kept out although it knows the route password; ``nats-server -t`` accepts the
three nats-tls-N.conf once their certificates exist; a renewed certificate is taken on reload; and the openssl
commands of deploy/README.md make certificates of that shape.

Certificates come from ``cryptography`` (the test extra) or, without it, the ``openssl`` command.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from nats.js import api

from dspyrt.bus import EmbeddedServer
from dspyrt.bus.server import free_port, nats_server_binary

pytestmark = pytest.mark.timeout(120)

NATS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "nats"
TLS_DIR = "/etc/nats/tls/"  # where cluster-tls.conf reads the certificates
FILES = ("ca.pem", "route.pem", "route-key.pem")


# ------------------------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Authority:
    cert: Path
    key: Path


class Issuer:
    """Makes a CA and the certificates it signs, writing PEM files."""

    def authority(self, folder: Path, name: str) -> Authority:
        raise NotImplementedError

    def issue(self, ca: Authority, folder: Path, dns: str, ip: str) -> None:
        """``folder``/route.pem and route-key.pem for a node known as ``dns`` and ``ip`` (serverAuth and
        clientAuth: a node both dials and answers routes), and ``folder``/ca.pem."""
        raise NotImplementedError


class CryptographyIssuer(Issuer):
    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.x509, self.hashes, self.serialization, self.ec = x509, hashes, serialization, ec
        self.oid, self.eku = NameOID, ExtendedKeyUsageOID

    def _key(self, path: Path) -> Any:
        key = self.ec.generate_private_key(self.ec.SECP256R1())
        s = self.serialization
        path.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
        path.chmod(0o600)
        return key

    def _name(self, common_name: str) -> Any:
        return self.x509.Name([self.x509.NameAttribute(self.oid.COMMON_NAME, common_name)])

    def _builder(self, subject: str, issuer: Any, public_key: Any) -> Any:
        now = datetime.datetime.now(datetime.UTC)
        return (
            self.x509.CertificateBuilder()
            .subject_name(self._name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(self.x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def _write(self, cert: Any, path: Path) -> None:
        path.write_bytes(cert.public_bytes(self.serialization.Encoding.PEM))

    def authority(self, folder: Path, name: str) -> Authority:
        x509 = self.x509
        folder.mkdir(parents=True, exist_ok=True)
        key = self._key(folder / "ca-key.pem")
        cert = (
            self._builder(name, self._name(name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # key_cert_sign, crl_sign
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, self.hashes.SHA256())
        )
        self._write(cert, folder / "ca.pem")
        return Authority(folder / "ca.pem", folder / "ca-key.pem")

    def issue(self, ca: Authority, folder: Path, dns: str, ip: str) -> None:
        x509 = self.x509
        folder.mkdir(parents=True, exist_ok=True)
        ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        ca_key = self.serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
        key = self._key(folder / "route-key.pem")
        cert = (
            self._builder(dns, ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )  # digital_signature
            .add_extension(x509.ExtendedKeyUsage([self.eku.SERVER_AUTH, self.eku.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(dns), x509.IPAddress(ipaddress.ip_address(ip))]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                critical=False,
            )
            .sign(ca_key, self.hashes.SHA256())
        )
        self._write(cert, folder / "route.pem")
        shutil.copyfile(ca.cert, folder / "ca.pem")


class OpenSSLIssuer(Issuer):
    def __init__(self, binary: str) -> None:
        self.binary = binary

    def _run(self, *args: str, cwd: Path) -> None:
        subprocess.run([self.binary, *args], cwd=cwd, check=True, capture_output=True, timeout=30)

    def authority(self, folder: Path, name: str) -> Authority:
        folder.mkdir(parents=True, exist_ok=True)
        self._run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "1", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=folder,
        )  # fmt: skip
        return Authority(folder / "ca.pem", folder / "ca-key.pem")

    def issue(self, ca: Authority, folder: Path, dns: str, ip: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ext.cnf").write_text(
            f"subjectAltName=DNS:{dns},IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\n"
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        )
        self._run(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "route-key.pem", "-out", "route.csr", "-subj", f"/CN={dns}",
            cwd=folder,
        )  # fmt: skip
        self._run(
            "x509", "-req", "-in", "route.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key), "-set_serial",
            str(secrets.randbits(63)), "-days", "1", "-extfile", "ext.cnf", "-out", "route.pem",
            cwd=folder,
        )  # fmt: skip
        shutil.copyfile(ca.cert, folder / "ca.pem")


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    try:
        return CryptographyIssuer()
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("no way to make test certificates: install the test extra (cryptography) or openssl")
        return OpenSSLIssuer(openssl)


def test_the_issuers_agree(tmp_path: Path) -> None:
    """Both ways of making certificates give what the cluster test relies on (when both are there)."""
    pytest.importorskip("cryptography", reason="cryptography (the test extra) is not installed")
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to compare with")
    for name, made in (("py", CryptographyIssuer()), ("cli", OpenSSLIssuer(openssl))):
        ca = made.authority(tmp_path / name / "ca", f"ca-{name}")
        made.issue(ca, tmp_path / name / "node", "nats-1", "127.0.0.1")
        text = subprocess.run(
            [openssl, "x509", "-noout", "-text", "-in", str(tmp_path / name / "node" / "route.pem")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "DNS:nats-1" in text and "IP Address:127.0.0.1" in text, name
        assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text, name
        verified = subprocess.run(
            [openssl, "verify", "-CAfile", str(ca.cert), str(tmp_path / name / "node" / "route.pem")],
            capture_output=True, text=True,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr


# ------------------------------------------------------------------------------------------------- cluster


def block(text: str, name: str) -> str:
    """The last top-level ``name { ... }`` block of a nats-server config, braces included."""
    starts = [m.start() for m in re.finditer(rf"(?m)^{re.escape(name)}\s*\{{", text)]
    assert starts, f"no {name} block"
    depth, at = 0, starts[-1]
    for i in range(at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[at : i + 1]
    raise AssertionError(f"unbalanced {name} block")


def shipped_cluster_block() -> str:
    text = block((NATS_DIR / "cluster-tls.conf").read_text(), "cluster")
    for expected in ("listen: 0.0.0.0:6222", TLS_DIR + "ca.pem", "verify: true", "$NATS_ROUTE_PASSWORD"):
        assert expected in text, expected
    return text


def monitor(port: int, host: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{host}:{port}/{path}", timeout=2) as reply:
        data: dict[str, Any] = json.loads(reply.read())
        return data


def remote_names(port: int, host: str) -> set[str]:
    try:
        return {str(r.get("remote_name", "")) for r in monitor(port, host, "routez")["routes"] or []}
    except OSError:
        return set()


def wait_for(what: str, check: Callable[[], bool], diagnose: Callable[[], str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s\n{diagnose()}")
        time.sleep(0.1)


@dataclass
class Node:
    name: str
    host: str
    route_port: int
    monitor_port: int
    folder: Path
    server: EmbeddedServer | None = None

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def nodes(tmp_path: Path, issuer: Issuer, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Node]]:
    """Three nodes, each on its own loopback address with a certificate for it, configured with the shipped
    cluster block (its listen address and certificate folder replaced); not started."""
    ca = issuer.authority(tmp_path / "ca", "dspyrt test route CA")
    password = f"pw-{secrets.token_hex(12)}"
    made = [
        Node(f"nats-{i}", f"127.0.0.{i}", free_port(f"127.0.0.{i}"), free_port(f"127.0.0.{i}"), tmp_path / f"n{i}")
        for i in (1, 2, 3)
    ]
    # What every host's environment holds (systemd: /etc/nats/nats.env): the same for all nodes.
    monkeypatch.setenv("NATS_ROUTE_PASSWORD", password)
    for i, node in enumerate(made, start=1):
        monkeypatch.setenv(f"NATS_ROUTE_{i}", f"nats-route://route:{password}@{node.host}:{node.route_port}")
    for node in made:
        issuer.issue(ca, node.folder / "tls", node.name, node.host)
        configure(node, shipped_cluster_block())
    try:
        yield made
    finally:
        for node in made:
            if node.server is not None:
                node.server.stop()


def configure(node: Node, cluster: str) -> Path:
    cluster = cluster.replace("listen: 0.0.0.0:6222", f"listen: {node.host}:{node.route_port}")
    cluster = cluster.replace(TLS_DIR, f"{node.folder / 'tls'}/")
    conf = node.folder / "node.conf"
    conf.write_text(f"server_name: {node.name}\nhttp: {node.host}:{node.monitor_port}\n{cluster}\n")
    return conf


def start(node: Node) -> None:
    node.server = EmbeddedServer(
        node.folder / "js", host=node.host, extra_args=["-c", str(node.folder / "node.conf")], log_file=node.log
    ).start()


async def test_three_nodes_form_a_jetstream_cluster_over_tls_routes(
    nodes: list[Node], issuer: Issuer, tmp_path: Path
) -> None:
    for node in nodes:
        start(node)

    def logs() -> str:
        return "\n".join(f"--- {n.name}\n{n.log_text()[-3000:]}" for n in nodes)

    names = {n.name for n in nodes}
    wait_for(
        "every node routes to the two others",
        lambda: all(remote_names(n.monitor_port, n.host) == names - {n.name} for n in nodes),
        logs,
    )
    for node in nodes:  # every node requires TLS on its routes and verifies the other side's certificate
        cluster = monitor(node.monitor_port, node.host, "varz")["cluster"]
        assert cluster["tls_required"] and cluster["tls_verify"] and cluster.get("tls_cert_not_after"), cluster

    def meta() -> dict[str, Any]:
        return dict(monitor(nodes[0].monitor_port, nodes[0].host, "jsz").get("meta_cluster") or {})

    wait_for("a JetStream meta leader", lambda: bool(meta().get("leader")), lambda: f"{meta()}\n{logs()}")
    assert meta()["cluster_size"] == 3 and meta()["leader"] in names

    # a replicated stream, written through one node and read through another
    assert nodes[0].server is not None and nodes[2].server is not None
    first, third = await nats.connect(nodes[0].server.url), await nats.connect(nodes[2].server.url)
    try:
        js = first.jetstream()
        await js.add_stream(name="TLSCHECK", subjects=["tls.check"], num_replicas=3)
        # The stream answers once its replicas have elected a leader (on a loaded machine: a moment after it
        # exists; a publish before that finds no responder).
        with anyio.fail_after(15):
            while not ((await js.stream_info("TLSCHECK")).cluster or api.ClusterInfo()).leader:
                await anyio.sleep(0.1)
        await js.publish("tls.check", b"over tls routes")
        info = await third.jetstream().stream_info("TLSCHECK")
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        assert info.state.messages == 1
    finally:
        await first.close()
        await third.close()

    # A node whose certificate another CA signed is refused, though it has the route password and trusts the
    # cluster's CA (so the handshake gets as far as the cluster's nodes checking its certificate).
    stranger = Node("nats-4", "127.0.0.4", free_port("127.0.0.4"), free_port("127.0.0.4"), tmp_path / "n4")
    other_ca = issuer.authority(tmp_path / "other-ca", "someone else's CA")
    issuer.issue(other_ca, stranger.folder / "tls", stranger.name, stranger.host)
    shutil.copyfile(tmp_path / "ca" / "ca.pem", stranger.folder / "tls" / "ca.pem")
    configure(stranger, shipped_cluster_block())
    # (Go's TLS client sends no certificate the server's CA did not sign: "didn't provide a certificate".)
    refusal = re.compile(r"TLS route handshake error: .*(signed by unknown authority|didn't provide a certificate)")
    try:
        start(stranger)
        wait_for(
            "the cluster's nodes refuse the stranger's certificate",
            lambda: all(refusal.search(n.log_text()) for n in nodes),
            lambda: stranger.log_text()[-2000:] + logs(),
        )
        assert remote_names(stranger.monitor_port, stranger.host) == set()
        assert all(remote_names(n.monitor_port, n.host) == names - {n.name} for n in nodes)
    finally:
        if stranger.server is not None:
            stranger.server.stop()


@pytest.mark.parametrize("node", ["nats-tls-1.conf", "nats-tls-2.conf", "nats-tls-3.conf"])
def test_the_tls_node_configs_are_valid(node: str, tmp_path: Path, issuer: Issuer) -> None:
    """``nats-server -t`` on the shipped files as they are, but for where the certificates live."""
    folder = tmp_path / "nats"
    shutil.copytree(NATS_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    ca = issuer.authority(tmp_path / "ca", "test CA")
    issuer.issue(ca, tmp_path / "tls", node.removesuffix(".conf"), "127.0.0.1")
    tls_conf = folder / "cluster-tls.conf"
    tls_conf.write_text(tls_conf.read_text().replace(TLS_DIR, f"{tmp_path / 'tls'}/"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    example = (NATS_DIR.parent / "example.env").read_text().splitlines()
    env |= dict(line.split("=", 1) for line in example if line and not line.startswith("#"))
    for i in (1, 2, 3):
        env[f"NATS_ROUTE_{i}"] = f"nats-route://route:{env['NATS_ROUTE_PASSWORD']}@nats-{i}:6222"
    result = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(folder / node)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


def test_the_guide_makes_route_certificates_as_it_says(tmp_path: Path) -> None:
    """deploy/README.md's openssl commands, run as written: each node's certificate verifies against the CA and
    names its host, for server and client use (what the cluster test above needs of a certificate)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command")
    text = (NATS_DIR.parent / "README.md").read_text()
    commands = text.split("<!-- tested: route-certs -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    hosts = re.search(r'hosts="([^"]+)"', commands)
    assert hosts is not None
    for host in hosts[1].split():
        folder = tmp_path / host
        assert {p.name for p in folder.iterdir()} >= set(FILES)
        verified = subprocess.run(
            [openssl, "verify", "-CAfile", str(folder / "ca.pem"), str(folder / "route.pem")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr
        shown = subprocess.run(
            [openssl, "x509", "-noout", "-text", "-in", str(folder / "route.pem")],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        assert f"DNS:{host}" in shown
        assert "TLS Web Server Authentication" in shown and "TLS Web Client Authentication" in shown
        assert "CA:FALSE" in shown


def test_a_renewed_certificate_is_taken_on_reload(
    tmp_path: Path, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewal as the guide says: new files in place, then ``systemctl reload`` (SIGHUP); no restart."""
    node = Node("nats-1", "127.0.0.1", free_port(), free_port(), tmp_path / "n1")
    monkeypatch.setenv("NATS_ROUTE_PASSWORD", "pw-renewal")
    for i in (1, 2, 3):
        monkeypatch.setenv(f"NATS_ROUTE_{i}", f"nats-route://route:pw-renewal@{node.host}:{node.route_port}")
    ca = issuer.authority(tmp_path / "ca", "test CA")
    issuer.issue(ca, node.folder / "tls", node.name, node.host)
    configure(node, shipped_cluster_block())
    start(node)
    try:
        assert node.server is not None and node.server.pid is not None

        def not_after() -> str:
            return str(monitor(node.monitor_port, node.host, "varz")["cluster"].get("tls_cert_not_after"))

        before = not_after()
        time.sleep(1.1)  # the new certificate ends a second or more later
        issuer.issue(ca, node.folder / "tls", node.name, node.host)
        os.kill(node.server.pid, signal.SIGHUP)
        wait_for("the renewed certificate", lambda: not_after() > before, lambda: node.log_text()[-2000:], timeout=10)
    finally:
        if node.server is not None:
            node.server.stop()
