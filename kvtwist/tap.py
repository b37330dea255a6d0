"""The ``kvstore`` twistd plugin: command-line options and the service they build."""

from __future__ import annotations

import resource
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort, IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from kvtwist.storage.datadir import DataDirLocked
from kvtwist.storage.durable import DEFAULT_FSYNC, FSYNC_POLICIES, DurableService
from kvtwist.storage.journaled import JournaledStore
from kvtwist.server.protocol import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_REQUEST, KVFactory
from kvtwist.storage.recovery import RecoveryError


def endpointDescription(port: str) -> str:
    """
    A server endpoint description for ``--port``.

    A bare number is what people type, but current Twisted no longer
    accepts it as an endpoint, so it becomes ``tcp:N``.
    """
    port = port.strip()
    return f"tcp:{port}" if port.isdigit() else port


def _positiveInt(what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise usage.UsageError(f"--{what} must be a whole number, not {text!r}")
        if value < 1:
            raise usage.UsageError(f"--{what} must be at least 1")
        return value

    parse.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"--idle-timeout must be a number of seconds, not {text!r}")
    if not value >= 0 or value == float("inf"):
        raise usage.UsageError("--idle-timeout must be 0 (never) or a positive number of seconds")
    return value


_seconds.coerceDoc = "Seconds; 0 means never."  # type: ignore[attr-defined]


def _fsyncPolicy(text: str) -> str:
    if text not in FSYNC_POLICIES:
        raise usage.UsageError(f"--fsync must be one of {', '.join(FSYNC_POLICIES)}, not {text!r}")
    return text


_fsyncPolicy.coerceDoc = "always: no reply before its write is on disk; everysec: at most a second lost on power loss; no: the OS decides."  # type: ignore[attr-defined]


class Options(usage.Options):
    optParameters = [
        ["port", "p", "5000", "Where to listen: a port number or a server endpoint string (tcp:5000:interface=127.0.0.1, unix:/path, ssl:...)."],
        ["max-request", None, DEFAULT_MAX_REQUEST, "Longest request accepted, in bytes.", _positiveInt("max-request")],
        ["max-connections", None, DEFAULT_MAX_CONNECTIONS, "Most connections served at once.", _positiveInt("max-connections")],
        ["idle-timeout", None, 0.0, "Close connections idle for this many seconds.", _seconds],
        ["data", "d", None, "Keep the data in this directory (journal and snapshots); without it, memory only."],
        ["fsync", None, DEFAULT_FSYNC, "With --data, when the journal is forced to disk: always, everysec or no.", _fsyncPolicy],
    ]

    def postOptions(self) -> None:
        self["port"] = endpointDescription(self["port"])
        # Parse the description now, so that a typo or a missing certificate
        # is a usage error rather than a traceback at start-up.
        from twisted.internet import reactor

        try:
            endpoints.serverFromString(reactor, self["port"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise usage.UsageError(f"--port {self['port']!r} is not a usable endpoint: {e}")


# Descriptors beyond the clients': listening socket, journal, logs, spares.
_SPARE_FILES = 64


def allowOpenFiles(wanted: int, log: Logger) -> int:
    """
    Raise this process's open-file limit towards ``wanted``; return the new limit.

    Every client is a file descriptor, and many systems start processes
    with a soft limit of 1024, well under the default --max-connections.
    The soft limit may be raised up to the hard one without privileges.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warn(
            "open-file limit is {limit}: fewer than --max-connections clients can connect;"
            " raise it with ulimit -n",
            limit=target,
        )
    return target


class KVService(service.Service):
    """
    Listens on one endpoint while running.

    Unlike ``strports.service`` it keeps the listening port, so it can log
    the real address (useful with port 0) and stop listening on shutdown.
    """

    _log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: KVFactory, description: str = ""
    ) -> None:
        self.endpoint = endpoint
        self.description = description or repr(endpoint)
        self.factory = factory
        self.port: IListeningPort | None = None
        self._listen: defer.Deferred[None] | None = None

    def privilegedStartService(self) -> None:
        # Binding here lets a privileged port be taken before twistd drops
        # privileges, and makes a port in use fail start-up at once.
        super().privilegedStartService()
        allowOpenFiles(self.factory.maxConnections + _SPARE_FILES, self._log)
        failures: list[BaseException] = []
        self._listen = self.endpoint.listen(self.factory).addCallbacks(
            self._listening, lambda f: failures.append(f.value)
        )
        if failures:
            # One clear line instead of a traceback: this is an operator's
            # mistake (port in use, no permission), not a bug.
            raise SystemExit(f"kvstore: cannot listen on {self.description}: {failures[0]}")

    def startService(self) -> None:
        if self._listen is None:
            self.privilegedStartService()
        super().startService()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self._log.info("kvstore listening on {address}", address=port.getHost())

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        self._listen = None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)


def makeService(config: Options, reactor: IReactorCore | None = None) -> service.IService:
    """Build the server from parsed options; tests pass a fake reactor."""
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[assignment]
    durable = _openData(config["data"], config["fsync"], reactor) if config["data"] else None
    factory = KVFactory(
        store=durable.journaled if durable else None,
        maxRequest=config["max-request"],
        maxConnections=config["max-connections"],
        idleTimeout=config["idle-timeout"],
        whenDurable=durable.whenDurable if durable else None,
    )
    endpoint = endpoints.serverFromString(reactor, config["port"])
    listening = KVService(endpoint, factory, config["port"])
    if durable is None:
        return listening
    # MultiService stops its children in reverse order: stop listening
    # first, then flush and close the journal.
    top = service.MultiService()
    durable.setServiceParent(top)
    listening.setServiceParent(top)
    return top


def _openData(directory: str, fsync: str, reactor: IReactorCore) -> DurableService:
    """Lock and recover the data directory, or exit with one line that says why."""
    try:
        journaled = JournaledStore.open(directory)
    except (DataDirLocked, RecoveryError) as e:
        raise SystemExit(f"kvstore: cannot start: {e}")
    except OSError as e:
        raise SystemExit(f"kvstore: cannot start: data directory {directory}: {e.strerror or e}")
    return DurableService(journaled, fsync, reactor)
