"""The listening service: its ports, start-up failures, stopping, warnings, and the open-file limit."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from kvtwist.server import listening
from kvtwist.server.arguments import ListenAddress
from kvtwist.server.factory import KVFactory
from kvtwist.server.listening import CannotListen, KVService, ListeningPort, allowOpenFiles, isExposed
from kvtwist.storage.memory import MemoryStore
from kvtwist.version import version

LOOPBACK = ListenAddress("tcp:5000:interface=127.0.0.1")
IPV6_LOOPBACK = ListenAddress(r"tcp6:5000:interface=\:\:1", skipIfUnavailable=True)


class FakePort:
    """A listening port that knows whether it was stopped; ``stopped`` is what stopListening returns."""

    def __init__(self, address: IAddress) -> None:
        self.address = address
        self.listening = True
        self.stopped: defer.Deferred[None] = defer.succeed(None)

    def getHost(self) -> IAddress:
        return self.address

    def stopListening(self) -> defer.Deferred[None]:
        self.listening = False
        return self.stopped


@implementer(IStreamServerEndpoint)
class FakeEndpoint:
    """An endpoint whose listen gives ``result``: a port, a Deferred, or an exception."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.factories: list[IProtocolFactory] = []

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        self.factories.append(factory)
        if isinstance(self.result, defer.Deferred):
            return self.result
        if isinstance(self.result, BaseException):
            return defer.fail(self.result)
        return defer.succeed(self.result)


def factory() -> KVFactory:
    return KVFactory(MemoryStore(), maxConnections=100)


def portOn(address: IAddress, warnIfExposed: bool = True) -> tuple[ListeningPort, FakePort]:
    """A service for LOOPBACK whose endpoint listens at once on ``address``."""
    port = FakePort(address)
    return ListeningPort(FakeEndpoint(port), factory(), LOOPBACK, warnIfExposed), port


def inUse(interface: str = "127.0.0.1") -> CannotListenError:
    return CannotListenError(interface, 5000, OSError(errno.EADDRINUSE, "Address already in use"))


@pytest.fixture
def logged() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def texts(events: Sequence[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events]


def succeeded(d: defer.Deferred[Any]) -> bool:
    """Whether ``d`` has a result now, and not a failure."""
    results: list[object] = []
    d.addCallback(results.append)
    return len(results) == 1


def test_it_logs_the_address_it_listens_on(logged: Sequence[LogEvent]) -> None:
    svc, port = portOn(IPv4Address("TCP", "127.0.0.1", 5000))
    svc.startService()
    assert svc.port is port
    assert texts(logged) == ["kvstore listening on IPv4Address(type='TCP', host='127.0.0.1', port=5000)"]


@pytest.mark.parametrize(
    "address, exposed",
    [(IPv4Address("TCP", "0.0.0.0", 5000), True), (IPv4Address("TCP", "192.0.2.7", 5000), True),
     (IPv6Address("TCP", "::", 5000), True), (IPv6Address("TCP", "fe80::1%eth0", 5000), True),
     (IPv4Address("TCP", "127.0.0.1", 5000), False), (IPv4Address("TCP", "127.0.0.2", 5000), False),
     (IPv6Address("TCP", "::1", 5000), False), (UNIXAddress("/run/kv.sock"), False)],
)
def test_it_warns_when_other_machines_can_connect(logged: Sequence[LogEvent], address: IAddress, exposed: bool) -> None:
    assert isExposed(address) is exposed
    portOn(address)[0].startService()
    warnings = [e for e in logged if e["log_level"] == LogLevel.warn]
    assert len(warnings) == exposed
    if exposed:
        assert "reachable from other machines and no authentication is configured" in formatEvent(warnings[0])


def test_no_warning_when_authenticated(logged: Sequence[LogEvent]) -> None:
    portOn(IPv4Address("TCP", "0.0.0.0", 5000), warnIfExposed=False)[0].startService()
    assert not [e for e in logged if e["log_level"] == LogLevel.warn]


def test_a_port_in_use_stops_start_up_with_one_line() -> None:
    svc = ListeningPort(FakeEndpoint(inUse()), factory(), LOOPBACK, warnIfExposed=True)
    with pytest.raises(CannotListen) as raised:
        svc.privilegedStartService()
    # twistd -n prints a SystemExit's code; a daemonizing twistd passes an
    # Exception's class and str() to the terminal, in 100 bytes.
    assert isinstance(raised.value, SystemExit) and isinstance(raised.value, Exception)
    assert raised.value.code == "kvstore: cannot listen on tcp:5000:interface=127.0.0.1: Address already in use"
    assert str(raised.value).startswith("Address already in use")
    assert svc.port is None


def test_a_port_in_use_stops_a_plain_start_too() -> None:
    svc = ListeningPort(FakeEndpoint(inUse()), factory(), LOOPBACK, warnIfExposed=True)
    with pytest.raises(CannotListen):
        svc.startService()
    assert not svc.running


def test_no_ipv6_loopback_is_skipped_with_a_warning(logged: Sequence[LogEvent]) -> None:
    missing = CannotListenError("::1", 5000, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    svc = ListeningPort(FakeEndpoint(missing), factory(), IPV6_LOOPBACK, warnIfExposed=True)
    svc.privilegedStartService()
    svc.startService()
    assert svc.running and svc.port is None
    [warning] = texts(logged)
    assert warning.startswith(r"kvstore not listening on tcp6:5000:interface=\:\:1: Cannot assign requested address")
    assert succeeded(svc.stopService())


def test_a_taken_ipv6_loopback_still_stops_start_up() -> None:
    svc = ListeningPort(FakeEndpoint(inUse("::1")), factory(), IPV6_LOOPBACK, warnIfExposed=True)
    with pytest.raises(CannotListen, match="Address already in use"):
        svc.privilegedStartService()


def test_a_listen_that_fails_after_start_up_is_reported(logged: Sequence[LogEvent]) -> None:
    later: defer.Deferred[Any] = defer.Deferred()
    svc = ListeningPort(FakeEndpoint(later), factory(), LOOPBACK, warnIfExposed=True)
    svc.startService()
    later.errback(inUse())
    [event] = logged
    assert event["log_level"] == LogLevel.critical
    assert formatEvent(event) == "kvstore: cannot listen on tcp:5000:interface=127.0.0.1"
    assert event["log_failure"].check(CannotListenError)
    assert succeeded(svc.stopService())


def test_a_pending_listen_is_cancelled_on_stop(logged: Sequence[LogEvent]) -> None:
    cancelled: list[defer.Deferred[Any]] = []
    pending: defer.Deferred[Any] = defer.Deferred(cancelled.append)
    svc = ListeningPort(FakeEndpoint(pending), factory(), LOOPBACK, warnIfExposed=True)
    svc.startService()
    stopped = svc.stopService()
    assert cancelled == [pending]
    assert succeeded(stopped) and not svc.running
    assert logged == []


def test_stop_waits_until_the_port_stops_listening() -> None:
    svc, port = portOn(IPv4Address("TCP", "127.0.0.1", 5000))
    port.stopped = defer.Deferred()
    svc.startService()
    done: list[None] = []
    svc.stopService().addCallback(done.append)
    assert not port.listening and svc.port is None
    assert done == []
    port.stopped.callback(None)
    assert done == [None]


def test_stop_before_start() -> None:
    svc, port = portOn(IPv4Address("TCP", "127.0.0.1", 5000))
    assert succeeded(svc.stopService())
    assert port.listening


def test_kvservice_listens_everywhere_and_stops_everywhere() -> None:
    shared = factory()
    svc = KVService(shared)
    ports = [FakePort(IPv4Address("TCP", "127.0.0.1", 5000)), FakePort(UNIXAddress("/run/kv.sock"))]
    endpoints = [FakeEndpoint(port) for port in ports]
    for endpoint in endpoints:
        ListeningPort(endpoint, shared, LOOPBACK, warnIfExposed=True).setServiceParent(svc)
    svc.privilegedStartService()
    svc.startService()
    assert [endpoint.factories for endpoint in endpoints] == [[shared], [shared]]
    assert succeeded(svc.stopService())
    assert [port.listening for port in ports] == [False, False]


def test_kvservice_announces_once_before_it_listens(logged: Sequence[LogEvent]) -> None:
    svc = KVService(factory(), announce=lambda: listening.Logger().info("what is starting"))
    portOn(IPv4Address("TCP", "127.0.0.1", 5000))[0].setServiceParent(svc)
    svc.privilegedStartService()
    svc.startService()
    assert texts(logged) == [
        f"kvstore: kvtwist {version()} starting", "what is starting",
        "kvstore listening on IPv4Address(type='TCP', host='127.0.0.1', port=5000)",
    ]


def test_a_plain_start_announces_too(logged: Sequence[LogEvent]) -> None:
    # twist calls startService only.
    svc = KVService(factory(), announce=lambda: listening.Logger().info("what is starting"))
    portOn(IPv4Address("TCP", "127.0.0.1", 5000))[0].setServiceParent(svc)
    svc.startService()
    assert texts(logged) == [
        f"kvstore: kvtwist {version()} starting", "what is starting",
        "kvstore listening on IPv4Address(type='TCP', host='127.0.0.1', port=5000)",
    ]


def fakeLimits(monkeypatch: pytest.MonkeyPatch, soft: int, hard: int) -> list[tuple[int, int]]:
    """Replace the open-file limit the listening module sees; return the limits it sets."""
    applied: list[tuple[int, int]] = []
    fake = SimpleNamespace(
        RLIMIT_NOFILE=listening.resource.RLIMIT_NOFILE,
        RLIM_INFINITY=listening.resource.RLIM_INFINITY,
        getrlimit=lambda which: applied[-1] if applied else (soft, hard),
        setrlimit=lambda which, limits: applied.append(limits),
    )
    monkeypatch.setattr(listening, "resource", fake)
    return applied


def test_a_high_enough_limit_is_left_alone(monkeypatch: pytest.MonkeyPatch, logged: Sequence[LogEvent]) -> None:
    applied = fakeLimits(monkeypatch, 2000, 4096)
    assert allowOpenFiles(1000, listening.Logger()) == 1000
    assert applied == [] and logged == []


def test_the_soft_limit_is_raised_to_fit(monkeypatch: pytest.MonkeyPatch, logged: Sequence[LogEvent]) -> None:
    applied = fakeLimits(monkeypatch, 1024, 65536)
    assert allowOpenFiles(10000, listening.Logger()) == 10000
    assert applied == [(10064, 65536)] and logged == []


def test_a_hard_limit_too_low_lowers_the_connection_limit(monkeypatch: pytest.MonkeyPatch,
                                                          logged: Sequence[LogEvent]) -> None:
    applied = fakeLimits(monkeypatch, 100, 200)
    assert allowOpenFiles(400, listening.Logger()) == 136
    assert applied == [(200, 200)]
    [warning] = texts(logged)
    assert warning.startswith("open-file limit is 200: serving at most 136 clients at once instead of"
                              " --max-connections 400")


def test_kvservice_fits_the_factory_to_the_limit_once(monkeypatch: pytest.MonkeyPatch,
                                                      logged: Sequence[LogEvent]) -> None:
    fakeLimits(monkeypatch, 200, 200)
    shared = KVFactory(MemoryStore(), maxConnections=400)
    svc = KVService(shared)
    svc.privilegedStartService()
    svc.startService()
    assert shared.maxConnections == 136
    assert len([e for e in logged if "instead of --max-connections" in formatEvent(e)]) == 1


class RealReactorTests(TestCase):
    """A ListeningPort on the real reactor and real sockets (stopping one: tests/test_tap.py)."""

    def test_a_port_in_use(self) -> None:
        from twisted.internet import reactor

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            number = taken.getsockname()[1]
            svc = ListeningPort(TCP4ServerEndpoint(reactor, number, interface="127.0.0.1"), factory(),
                                ListenAddress(f"tcp:{number}:interface=127.0.0.1"), warnIfExposed=True)
            with self.assertRaises(CannotListen) as raised:
                svc.privilegedStartService()
        self.assertEqual(raised.exception.code,
                         f"kvstore: cannot listen on tcp:{number}:interface=127.0.0.1: Address already in use")
