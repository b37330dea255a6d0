"""
A real three-master Redis Cluster on free loopback ports, for the tests of
the redis-cluster engine; each master is a ``redisprocs`` server of its own.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from redisprocs import RedisProcess, call, freePort, startRedis

HOST = "127.0.0.1"


def addressOf(server: RedisProcess) -> str:
    return f"{HOST}:{server.port}"


def alive(server: RedisProcess) -> bool:
    return server.proc is not None and server.proc.poll() is None


def nodeId(server: RedisProcess) -> str:
    reply: Any = server.call("CLUSTER", "MYID")
    return bytes(reply).decode()


class RedisCluster:
    """Masters that share the 16384 slots, no replicas."""

    def __init__(self, masters: list[RedisProcess]) -> None:
        self.masters = masters

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(addressOf(master) for master in self.masters)

    def byPort(self, port: int) -> RedisProcess:
        return next(master for master in self.masters if master.port == port)

    def slotOwners(self) -> list[RedisProcess | None]:
        """The master of every slot, as the first live master sees the map."""
        live = next(master for master in self.masters if alive(master))
        owners: list[RedisProcess | None] = [None] * 16384
        reply: Any = live.call("CLUSTER", "SLOTS")
        for start, end, primary, *_ in reply:
            owners[start : end + 1] = [self.byPort(primary[1])] * (end - start + 1)
        return owners

    def owner(self, slot: int) -> RedisProcess:
        """The master that serves ``slot``."""
        owner = self.slotOwners()[slot]
        if owner is None:
            raise LookupError(f"no master serves slot {slot}")
        return owner

    def waitState(self, state: str = "ok", timeout: float = 20.0) -> None:
        """Wait until every live master says ``cluster_state:<state>``."""
        deadline = time.monotonic() + timeout
        while True:
            infos: list[Any] = [master.call("CLUSTER", "INFO") for master in self.masters if alive(master)]
            if all(f"cluster_state:{state}".encode() in info for info in infos):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach cluster_state:{state}: {infos!r}")
            time.sleep(0.05)

    def stop(self) -> None:
        for master in self.masters:
            master.close()


def startCluster(masters: int = 3, extra: tuple[str, ...] = ()) -> RedisCluster:
    """Start ``masters`` servers, join them with ``redis-cli --cluster create``, wait for ``cluster_state:ok``."""
    servers: list[RedisProcess] = []
    try:
        for _ in range(masters):
            servers.append(
                startRedis(
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-port", str(freePort()), *extra,
                )  # fmt: skip
            )
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(addressOf(server) for server in servers),
             "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout.decode()}{create.stderr.decode()}")
        cluster = RedisCluster(servers)
        cluster.waitState("ok")
        return cluster
    except BaseException:
        for server in servers:
            server.close()
        raise


def moveSlot(cluster: RedisCluster, slot: int, target: RedisProcess, pause: float = 0.0, batch: int = 10) -> int:
    """
    Move ``slot`` and its keys to ``target`` the way ``redis-cli --cluster reshard`` does.

    IMPORTING on the target, MIGRATING on the source, ``MIGRATE ... KEYS``
    in batches of ``batch`` (sleeping ``pause`` between them, so that
    clients meet the slot half moved), then ``SETSLOT ... NODE`` on the
    target, the source and the others. Returns how many keys moved.
    Blocking: call it from a thread when a reactor must keep running.
    """
    source = cluster.owner(slot)
    if source is target:
        return 0
    targetId, sourceId = nodeId(target), nodeId(source)
    _ok(target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", sourceId))
    _ok(source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", targetId))
    moved = 0
    while True:
        keys: Any = source.call("CLUSTER", "GETKEYSINSLOT", slot, batch)
        if not keys:
            break
        _ok(source.call("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys))
        moved += len(keys)
        time.sleep(pause)
    for server in [target, source, *(m for m in cluster.masters if m not in (target, source))]:
        if alive(server):
            _ok(server.call("CLUSTER", "SETSLOT", slot, "NODE", targetId))
    return moved


def _ok(reply: object) -> None:
    if reply not in (b"OK", b"NOKEY"):
        raise RuntimeError(f"redis refused a resharding step: {reply!r}")


__all__ = ["RedisCluster", "addressOf", "alive", "call", "freePort", "moveSlot", "nodeId", "startCluster"]
