"""Starting the servers under test on free loopback ports, each in its own scratch directory."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import kvtwist

HOST = "127.0.0.1"
_KVSTORE_LISTENING = re.compile(r"kvstore listening on .*port=(\d+)")
_CSERVER_LISTENING = re.compile(r"cserver listening on .*:(\d+)")
_FLOOR_LISTENING = re.compile(r"floor listening on port (\d+)")
# Above the biggest load in the plan, so that no measurement hits the limit.
MAX_CONNECTIONS = 10100


class ServerError(Exception):
    """A server under test did not start."""


@dataclass
class Server:
    """A running server process: where it listens, which protocol it speaks."""

    kind: str
    proto: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    # The engine a kvtwist node keeps its data in (--store), stopped after the node.
    engine: Server | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logText(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")

    def stop(self) -> None:
        """Stop the process (TERM, then KILL after 10 s) and remove its directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.engine is not None:
            self.engine.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass(frozen=True)
class Options:
    """What the starters need beyond the kind: interpreters and binaries."""

    python: str = sys.executable
    pypy: str | None = None  # an interpreter with Twisted, for the kvtwist-pypy kinds
    redis: str | None = shutil.which("redis-server")
    etcd: str | None = shutil.which("etcd")
    cserver: Path | None = None
    # Another checkout of kvtwist, run by the -baseline kinds (see treeSource).
    baselineTree: Path | None = None


def kvtwistSupportsFsync() -> bool:
    """Whether this kvtwist has ``--data`` and ``--fsync`` (the durable store)."""
    from kvtwist import tap

    names = {p[0] for p in tap.Options.optParameters}
    return {"data", "fsync"} <= names


def _spawn(argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(workdir / "server.log", "wb") as log:
        return subprocess.Popen(
            argv, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env,
        )


def _startAndWaitForLog(
    kind: str, argv: list[str], workdir: Path, pattern: re.Pattern[str], env: dict[str, str] | None = None
) -> Server:
    """A server of our protocol that logs the port it listens on, once it does."""
    server = Server(kind, "kv", 0, _spawn(argv, workdir, env), workdir)
    with _stoppedOnError(server):
        server.port = _waitForLog(server, pattern)
    return server


@contextmanager
def _stoppedOnError(server: Server) -> Iterator[None]:
    """Stop ``server`` if its start fails or is interrupted (Ctrl-C, the harness's SIGTERM) before it is handed over."""
    try:
        yield
    except BaseException:
        server.stop()
        raise


def _waitForLog(server: Server, pattern: re.Pattern[str], timeout: float = 30.0) -> int:
    """The port ``server`` logs; ``ServerError`` with its log if it never does (the caller stops it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(server.logText())
        if match:
            return int(match.group(1))
        if server.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise ServerError(f"{server.kind} did not start listening:\n{server.logText()}")


def _freePort() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _waitForAnswer(server: Server, request: bytes, answered: Callable[[bytes], bool], timeout: float) -> bool:
    """Whether ``server`` answers ``request`` (on a new connection each try) as ``answered`` wants, in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            with socket.create_connection((HOST, server.port), timeout=1) as s:
                s.sendall(request)
                if answered(s.recv(4096)):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _startOnFreePort(
    kind: str, proto: str, workdir: Path, argvFor: Callable[[int], list[str]], request: bytes,
    answered: Callable[[bytes], bool], timeout: float,
) -> Server:
    """
    A server that cannot listen on port 0 and report it (Redis, etcd): on a
    free port picked here, retried, since another process may take it first.
    """
    for _ in range(5):
        port = _freePort()
        server = Server(kind, proto, port, _spawn(argvFor(port), workdir), workdir)
        with _stoppedOnError(server):
            if _waitForAnswer(server, request, answered, timeout):
                return server
        server.proc.kill()
        server.proc.wait()
    raise ServerError(f"{kind} did not start:\n{server.logText()}")


@dataclass(frozen=True)
class Source:
    """The kvtwist package a server runs, and the twistd dropin that names its plugin."""

    package: Path
    dropin: Path | None


_DROPIN = Path("twisted", "plugins", "kvtwist_plugin.py")


def installedSource() -> Source:
    """The kvtwist this harness belongs to, wherever it is installed."""
    package = Path(kvtwist.__file__).resolve().parent
    for base in (package.parent, *map(Path, sys.path)):
        if (base / _DROPIN).exists():
            return Source(package, base / _DROPIN)
    return Source(package, None)


def treeSource(tree: Path) -> Source:
    """
    The kvtwist of a source tree (a checkout, e.g. from ``git worktree add``).

    Only the package directory and the dropin are taken, so any layout of
    the package inside works: the old one (``kvtwist/protocol.py``) as
    well as the new one (``kvtwist/server/protocol.py``).
    """
    tree = tree.resolve()
    package, dropin = tree / "kvtwist", tree / _DROPIN
    missing = [str(p.relative_to(tree)) for p in (package / "__init__.py", dropin) if not p.is_file()]
    if missing:
        raise ServerError(f"{tree} is not a kvtwist source tree: it has no {' and no '.join(missing)}")
    return Source(package, dropin)


def _importRoot(workdir: Path, source: Source) -> Path:
    """
    A directory holding only ``source``'s kvtwist package and its dropin, as links.

    It goes first on the server's path, so the server runs that very
    kvtwist whatever its interpreter has installed, and another
    interpreter (PyPy) does not pick up this one's other packages, as it
    would from the directory kvtwist is installed in.
    """
    root = workdir / "path"
    (root / _DROPIN.parent).mkdir(parents=True)
    (root / "kvtwist").symlink_to(source.package, target_is_directory=True)
    if source.dropin is not None:
        (root / _DROPIN).symlink_to(source.dropin)
    return root


def runsOnPypy(kind: str) -> bool:
    return "pypy" in kind


BASELINE_SUFFIX = "-baseline"


def runsBaselineTree(kind: str) -> bool:
    """Whether ``kind`` runs the baseline tree (``Options.baselineTree``) instead of this kvtwist."""
    return kind.endswith(BASELINE_SUFFIX)


def runsWithFsync(kind: str) -> bool:
    """Whether ``kind`` is a kvtwist started with ``--data DIR --fsync always``."""
    return kind.startswith("kvtwist") and kind.removesuffix(BASELINE_SUFFIX).endswith("-always")


def withoutMetricsKind(kind: str) -> str:
    """The kind that is ``kind`` without ``--metrics``."""
    return kind.removesuffix("-metrics")


def inMemoryKind(kind: str) -> str:
    """The kind that is ``kind`` with its data in memory instead of a remote engine."""
    return "kvtwist" if kind in ENGINE_OF else kind


def baselineKind(kind: str) -> str:
    """The kind that runs the baseline tree in the same way as ``kind``: kvtwist -> kvtwist-baseline."""
    return kind + BASELINE_SUFFIX


def _python(kind: str, options: Options) -> str:
    python = options.pypy if runsOnPypy(kind) else options.python
    if python is None:
        raise ServerError("no PyPy interpreter given")
    return python


def _source(kind: str, options: Options) -> Source:
    if not runsBaselineTree(kind):
        return installedSource()
    if options.baselineTree is None:
        raise ServerError("no baseline tree given (--baseline-tree)")
    return treeSource(options.baselineTree)


def _pythonEnv(kind: str, options: Options, workdir: Path) -> dict[str, str]:
    root = str(_importRoot(workdir, _source(kind, options)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def _startKvtwist(kind: str, options: Options, workdir: Path) -> Server:
    engine, store = None, []
    if kind in ENGINE_OF:
        engine = start(ENGINE_OF[kind], options)
        scheme = "etcd" if engine.kind == "etcd" else "redis"
        store = ["--store", f"{scheme}://{HOST}:{engine.port}"]
    try:
        server = _startPlainKvtwist(kind, options, workdir, store)
    except BaseException:
        if engine is not None:
            engine.stop()
        raise
    server.engine = engine
    return server


def _startPlainKvtwist(kind: str, options: Options, workdir: Path, store: list[str]) -> Server:
    argv = [
        _python(kind, options), "-c", "from twisted.scripts.twistd import run; run()",
        "-n", "--pidfile=", "kvstore",
        "--port", f"tcp:0:interface={HOST}",
        "--max-connections", str(MAX_CONNECTIONS),
        *store,
    ]
    if runsWithFsync(kind):
        argv += ["--data", str(workdir / "data"), "--fsync", "always"]
    if kind.endswith("-metrics"):
        argv += ["--metrics", f"tcp:0:interface={HOST}"]
    return _startAndWaitForLog(kind, argv, workdir, _KVSTORE_LISTENING, _pythonEnv(kind, options, workdir))


def _startFloor(kind: str, options: Options, workdir: Path) -> Server:
    argv = [_python(kind, options), "-m", "kvtwist.bench.floor", f"tcp:0:interface={HOST}"]
    if "-always" in kind:
        argv += ["--journal", str(workdir / "journal"), "--fsync-in-thread"]
    if kind.endswith("-stock-reactor"):
        argv.append("--stock-reactor")
    return _startAndWaitForLog(kind, argv, workdir, _FLOOR_LISTENING, _pythonEnv(kind, options, workdir))


def _startRedis(kind: str, options: Options, workdir: Path) -> Server:
    if options.redis is None:
        raise ServerError("redis-server is not installed")
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "always"]
        if kind == "redis-always"
        else ["--appendonly", "no"]
    )
    redis = options.redis

    def argvFor(port: int) -> list[str]:
        return [
            redis, "--bind", HOST, "--port", str(port), "--save", "",
            "--dir", str(workdir), "--maxclients", str(MAX_CONNECTIONS),
            "--daemonize", "no", "--protected-mode", "no", *persistence,
        ]

    return _startOnFreePort(kind, "redis", workdir, argvFor, b"PING\r\n", lambda reply: reply.startswith(b"+PONG"), 10.0)


def _startEtcd(kind: str, options: Options, workdir: Path) -> Server:
    """One etcd member, alone: the engine of the kvtwist-etcd kind."""
    if options.etcd is None:
        raise ServerError("etcd is not installed")
    etcd = options.etcd

    def argvFor(port: int) -> list[str]:
        peer = _freePort()
        return [
            etcd, "--name", "bench", "--data-dir", str(workdir / "etcd"),
            "--listen-client-urls", f"http://{HOST}:{port}", "--advertise-client-urls", f"http://{HOST}:{port}",
            "--listen-peer-urls", f"http://{HOST}:{peer}", "--initial-advertise-peer-urls", f"http://{HOST}:{peer}",
            "--initial-cluster", f"bench=http://{HOST}:{peer}",
        ]

    return _startOnFreePort(
        kind, "etcd", workdir, argvFor, b"GET /health HTTP/1.0\r\n\r\n", lambda reply: b'"health":"true"' in reply, 20.0
    )


def _startCserver(kind: str, options: Options, workdir: Path) -> Server:
    if options.cserver is None:
        raise ServerError("cserver was not built")
    return _startAndWaitForLog(kind, [str(options.cserver), "0"], workdir, _CSERVER_LISTENING)


_STARTERS: dict[str, Callable[[str, Options, Path], Server]] = {
    "kvtwist": _startKvtwist,
    "kvtwist-always": _startKvtwist,
    "kvtwist-pypy": _startKvtwist,
    "kvtwist-pypy-always": _startKvtwist,
    # The same kvtwist, serving --metrics (compared with the one without).
    "kvtwist-metrics": _startKvtwist,
    # The same kvtwist servers, run from another source tree (--baseline-tree).
    "kvtwist-baseline": _startKvtwist,
    "kvtwist-pypy-baseline": _startKvtwist,
    "kvtwist-always-baseline": _startKvtwist,
    "kvtwist-pypy-always-baseline": _startKvtwist,
    # kvtwist nodes keeping their data in a remote engine started for them.
    "kvtwist-redis": _startKvtwist,
    "kvtwist-etcd": _startKvtwist,
    "redis": _startRedis,
    "redis-always": _startRedis,
    "etcd": _startEtcd,
    "cserver": _startCserver,
    # kvtwist's connection handling without its work (kvtwist.bench.floor).
    "twisted-floor": _startFloor,
    "twisted-floor-pypy": _startFloor,
    # The same on Twisted's own epoll reactor, to show what kvtwist's saves.
    "twisted-floor-stock-reactor": _startFloor,
    # The same, journaling writes with a group fsync per turn, in a thread
    # while the reactor goes on, as kvtwist does (--fsync always's floor).
    "twisted-floor-always": _startFloor,
    "twisted-floor-pypy-always": _startFloor,
}

KINDS = tuple(_STARTERS)

# The engine each remote-store kind is started with.
ENGINE_OF = {"kvtwist-redis": "redis", "kvtwist-etcd": "etcd"}

# Each kvtwist configuration is compared with the Redis configuration that
# makes the same promise.
REDIS_COUNTERPART = {
    "kvtwist": "redis",
    "kvtwist-pypy": "redis",
    "kvtwist-always": "redis-always",
    "kvtwist-pypy-always": "redis-always",
}


# The floor server on each kvtwist kind's interpreter.
FLOOR_OF = {
    "kvtwist": "twisted-floor",
    "kvtwist-always": "twisted-floor-always",
    "kvtwist-pypy": "twisted-floor-pypy",
    "kvtwist-pypy-always": "twisted-floor-pypy-always",
}


def start(kind: str, options: Options) -> Server:
    """Start a server of ``kind`` (one of ``KINDS``) on a free loopback port."""
    workdir = Path(tempfile.mkdtemp(prefix=f"kvbench-{kind}-"))
    try:
        return _STARTERS[kind](kind, options, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
