"""
Real etcd clusters on free loopback ports, for the etcd engine's tests.

Each member is its own ``etcd`` process with its own data directory, so a
test can kill one member (``kill``), pause one (``pause``) or restart it
(``restart``) and watch what the engine does. The elections are tuned short
so that a cluster is serving within a second or two of ``start_cluster``.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

ETCD = shutil.which("etcd")

# Skip, not fail, where etcd is not installed: the engine is an optional extra.
requires_etcd = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (Debian: etcd-server)")


def _free_ports(count: int) -> list[int]:
    """Ports the kernel says are free now; all bound at once, so they differ."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class EtcdMember:
    """One etcd process of a cluster; its data directory outlives ``kill`` so that it can restart."""

    def __init__(self, name: str, clientPort: int, peerPort: int, dataDir: Path, logPath: Path) -> None:
        self.name = name
        self.clientPort = clientPort
        self.peerPort = peerPort
        self.dataDir = dataDir
        self.logPath = logPath
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.clientPort}"

    @property
    def peerURL(self) -> str:
        return f"http://127.0.0.1:{self.peerPort}"

    def start(self, initialCluster: str, token: str) -> None:
        assert ETCD is not None
        args = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.dataDir),
            "--listen-client-urls", f"http://{self.address}",
            "--advertise-client-urls", f"http://{self.address}",
            "--listen-peer-urls", self.peerURL,
            "--initial-advertise-peer-urls", self.peerURL,
            "--initial-cluster", initialCluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", token,
            # Short elections: the tests kill members and wait for a new leader.
            "--heartbeat-interval", "25",
            "--election-timeout", "250",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip
        with open(self.logPath, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """End the process at once, as a crash would (SIGKILL); its data stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): its kernel still accepts connections, but nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def healthy(self) -> bool:
        """Whether this member answers /health with a leader (a quorum behind it)."""
        try:
            with urllib.request.urlopen(f"http://{self.address}/health", timeout=1) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False


class EtcdCluster:
    """A running etcd cluster; ``url`` is its ``--store`` URL, every member listed."""

    def __init__(self, size: int) -> None:
        self.baseDir = Path(tempfile.mkdtemp(prefix="kvtwist-etcd-"))
        self.token = f"kvtwist-test-{uuid.uuid4().hex}"
        ports = _free_ports(2 * size)
        self.members = [
            EtcdMember(
                f"m{i}", ports[2 * i], ports[2 * i + 1], self.baseDir / f"m{i}.etcd", self.baseDir / f"m{i}.log"
            )
            for i in range(size)
        ]
        self.initialCluster = ",".join(f"{member.name}={member.peerURL}" for member in self.members)

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(member.address for member in self.members)

    def start(self, timeout: float = 20.0) -> None:
        for member in self.members:
            member.start(self.initialCluster, self.token)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20.0, members: list[EtcdMember] | None = None) -> None:
        """Wait until every running member (or those given) answers /health; raise with the logs if not."""
        deadline = time.monotonic() + timeout
        waiting = [member for member in (members or self.members) if member.proc is not None]
        while waiting:
            for member in waiting:
                if not member.running:
                    raise RuntimeError(f"etcd member {member.name} exited:\n{self.log_text()}")
            waiting = [member for member in waiting if not member.healthy()]
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"etcd members {[m.name for m in waiting]} not healthy:\n{self.log_text()}")
            if waiting:
                time.sleep(0.05)

    def kill(self, index: int) -> EtcdMember:
        member = self.members[index]
        member.kill()
        return member

    def restart(self, *indexes: int, timeout: float = 20.0) -> None:
        """Start the members given again on their data (all at once: they may need each other for a quorum)."""
        members = [self.members[index] for index in indexes]
        for member in members:
            member.kill()
            member.start(self.initialCluster, self.token)
        self.wait_healthy(timeout, members)

    def leader_index(self) -> int:
        """Which member leads now, by the running members' status."""
        for index, member in enumerate(self.members):
            if member.running:
                status = _post_json(member.address, "/v3/maintenance/status", {})
                if status.get("leader") == status["header"]["member_id"]:
                    return index
        raise RuntimeError("no running etcd member leads")

    def log_text(self) -> str:
        return "\n".join(
            f"--- {member.name}:\n" + member.logPath.read_text(errors="replace")[-4000:]
            for member in self.members
            if member.logPath.exists()
        )

    def stop(self) -> None:
        """Kill every member and remove every data directory."""
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                # A paused member would not die of SIGTERM; SIGKILL ends it either way.
                member.proc.kill()
            if member.proc is not None:
                member.proc.wait(10)
        shutil.rmtree(self.baseDir, ignore_errors=True)


def _post_json(address: str, path: str, body: Mapping[str, object]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://{address}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        result: dict[str, Any] = json.load(response)
    return result


def start_cluster(size: int = 3) -> EtcdCluster:
    """A healthy ``size``-member cluster (1 for a single member); ``stop`` it when done."""
    # Two clusters starting at once may both be offered a port; a member that
    # cannot bind exits, and a second try with new ports settles it.
    for attempt in range(2):
        cluster = EtcdCluster(size)
        try:
            cluster.start()
            return cluster
        except RuntimeError:
            cluster.stop()
            if attempt:
                raise
    raise AssertionError("unreachable")


def etcd_put_raw(cluster: EtcdCluster, key: bytes, value: bytes) -> None:
    """Store ``value`` under ``key`` directly in etcd, bypassing kvtwist (for values kvtwist never writes)."""
    body = {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()}
    for member in cluster.members:
        if member.running:
            _post_json(member.address, "/v3/kv/put", body)
            return
    raise RuntimeError("no running etcd member")


def etcd_get_raw(cluster: EtcdCluster, key: bytes) -> bytes | None:
    """The value etcd holds under ``key`` (linearizable), or None."""
    for member in cluster.members:
        if member.running:
            reply = _post_json(member.address, "/v3/kv/range", {"key": base64.b64encode(key).decode()})
            kvs = reply.get("kvs")
            if not isinstance(kvs, list) or not kvs:
                return None
            return base64.b64decode(kvs[0].get("value", ""))
    raise RuntimeError("no running etcd member")

