"""The listening side of the server: its ports, what it tells the operator about them, and the open-file limit."""

from __future__ import annotations

import errno
import ipaddress
import resource
import socket
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvtwist.server.arguments import ListenAddress
from kvtwist.server.factory import KVFactory
from kvtwist.version import version

# Descriptors beyond the clients': listening sockets, journal, logs, and room
# to accept a client over the limit and tell it so.
_SPARE_FILES = 64
# How a listen on ::1 fails on a machine without IPv6.
_NO_IPV6 = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)


class CannotListen(SystemExit, Exception):
    """
    A port could not be bound at start-up: one line for the operator, no traceback.

    It is both a ``SystemExit`` and an ``Exception`` because twistd reports
    a failed start in two ways. With ``-n``, a ``SystemExit`` prints its
    message and exits 1. When daemonizing, only an ``Exception`` reaches the
    parent waiting on the terminal, which otherwise waits forever; it shows
    the class name and ``str()`` in 100 bytes, so ``str()`` puts the reason
    first.
    """

    def __init__(self, description: str, reason: str) -> None:
        super().__init__(f"kvstore: cannot listen on {description}: {reason}")
        self.description = description
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} ({self.description})"


def allowOpenFiles(connections: int, log: Logger) -> int:
    """
    Make room for ``connections`` clients in the open-file limit; return how many fit.

    Every client is a file descriptor, and many systems start processes
    with a soft limit of 1024, well under the default --max-connections.
    The soft limit may be raised up to the hard one without privileges.
    Where even that is too low, fewer clients are served: at the limit
    Twisted would drop new connections without a word, while under it a
    client over the connection limit is told ``Error: too many connections``.
    """
    wanted = connections + _SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return connections
    limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    except (ValueError, OSError):
        limit = soft
    if limit >= wanted:
        return connections
    fitting = max(1, limit - _SPARE_FILES)
    log.warn(
        "open-file limit is {limit}: serving at most {fitting} clients at once instead of"
        " --max-connections {connections}; the others get 'Error: too many connections'."
        " Raise the limit (ulimit -n) to serve more.",
        limit=limit,
        fitting=fitting,
        connections=connections,
    )
    return fitting


def isExposed(address: IAddress) -> bool:
    """Whether other machines may reach ``address``: anything but loopback or a Unix socket."""
    if isinstance(address, UNIXAddress):
        return False
    if isinstance(address, (IPv4Address, IPv6Address)):
        try:
            return not ipaddress.ip_address(address.host.partition("%")[0]).is_loopback
        except ValueError:
            return True
    return True


class ListeningPort(service.Service):
    """
    Listens on one endpoint while running.

    Like Twisted's ``StreamServerEndpointService``, it cancels a listen still
    under way when stopped and reports a listen that fails after start-up.
    It also binds in ``privilegedStartService``, so that a privileged port is
    taken before twistd drops privileges and a failure there stops start-up
    with ``CannotListen``; it logs the address it got, and warns when other
    machines can reach it without authentication.
    """

    _log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: KVFactory, address: ListenAddress, warnIfExposed: bool
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.address = address
        self.warnIfExposed = warnIfExposed
        self.port: IListeningPort | None = None
        self._pending: defer.Deferred[IListeningPort | None] | None = None
        self._starting = False
        self._startFailure: Failure | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._starting = True
        try:
            self._pending = self.endpoint.listen(self.factory).addCallbacks(self._listening, self._failed)
        finally:
            self._starting = False
        failure, self._startFailure = self._startFailure, None
        if failure is not None:
            self._pending = None
            raise CannotListen(self.address.description, _reason(failure.value))

    def startService(self) -> None:
        if self._pending is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        pending, self._pending = self._pending, None
        if pending is None:
            return defer.succeed(None)
        pending.cancel()
        return pending.addCallback(self._stopListening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        self._log.info("kvstore listening on {address}", address=address)
        if self.warnIfExposed and isExposed(address):
            self._log.warn(
                "kvstore on {address} is reachable from other machines and no authentication is"
                " configured: anyone who can connect can read and change every key. Listen on"
                " loopback (a bare --port N) or a unix: socket, or firewall this port.",
                address=address,
            )
        return port

    def _failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return  # stopService gave up on it
        if self.address.skipIfUnavailable and _unavailable(failure.value):
            self._log.warn(
                "kvstore not listening on {description}: {reason} (this machine seems to have no IPv6)",
                description=self.address.description,
                reason=_reason(failure.value),
            )
        elif self._starting:
            self._startFailure = failure
        else:
            self._log.failure(
                "kvstore: cannot listen on {description}", failure, description=self.address.description
            )

    def _stopListening(self, port: IListeningPort | None) -> defer.Deferred[None] | None:
        self.port = None
        return None if port is None else port.stopListening()


class KVService(service.MultiService):
    """
    Everything the server listens on, one ``ListeningPort`` per address, all with one factory.

    Before it listens, it logs kvtwist's version and calls ``announce`` (for
    the store's lines), so that the log says what is starting before where
    it listens, and fits the factory's connection
    limit to the open-file limit.
    """

    _log = Logger()

    def __init__(self, factory: KVFactory, announce: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.factory = factory
        self.announce = announce
        self._prepared = False

    def privilegedStartService(self) -> None:
        self._beforeListening()
        super().privilegedStartService()

    def startService(self) -> None:
        self._beforeListening()
        super().startService()

    def _beforeListening(self) -> None:
        # Once, whether twistd's privileged start or a plain start (twist) comes first.
        if not self._prepared:
            self._prepared = True
            self._log.info("kvstore: kvtwist {version} starting", version=version())
            self.announce()
            self.factory.maxConnections = allowOpenFiles(self.factory.maxConnections, self._log)


def listeningService(
    reactor: Any,
    addresses: Iterable[ListenAddress],
    factory: KVFactory,
    *,
    authenticated: bool,
    announce: Callable[[], None] = lambda: None,
) -> KVService:
    """
    The service that serves ``factory`` on every ``--port`` address, after ``announce``.

    Without authentication, it warns about each address that other
    machines can reach.
    """
    listening = KVService(factory, announce)
    for address in addresses:
        endpoint = endpoints.serverFromString(reactor, address.endpointDescription)
        ListeningPort(endpoint, factory, address, warnIfExposed=not authenticated).setServiceParent(listening)
    return listening


def _reason(error: object) -> str:
    """The operating system's words for a failed listen ("Address already in use"), else the error's."""
    if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
        return error.socketError.strerror or str(error.socketError)
    return str(error)


def _unavailable(error: object) -> bool:
    """Whether a listen failed because the address does not exist here (no IPv6), not because it is taken."""
    if not (isinstance(error, CannotListenError) and isinstance(error.socketError, OSError)):
        return False
    return isinstance(error.socketError, socket.gaierror) or error.socketError.errno in _NO_IPV6
