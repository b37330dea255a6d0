"""The twistd plugin: option parsing, the service it builds, and discovery."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactor
from twisted.plugin import IPlugin, getPlugins
from twisted.python.usage import UsageError

from kvtwist.server.protocol import KVFactory
from kvtwist.tap import KVService, Options, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults() -> None:
    options = parse()
    assert options["port"] == "tcp:5000"
    assert options["max-request"] == 4096
    assert options["max-connections"] == 10000
    assert options["idle-timeout"] == 0


@pytest.mark.parametrize(
    "given, expected",
    [("5000", "tcp:5000"), (" 6001 ", "tcp:6001"), ("tcp:5000:interface=127.0.0.1", "tcp:5000:interface=127.0.0.1"),
     ("unix:/tmp/kv.sock", "unix:/tmp/kv.sock")],
)
def test_port(given: str, expected: str) -> None:
    assert parse("--port", given)["port"] == expected


@pytest.mark.parametrize("bad", ["foo:1", "tcp:notaport", "ssl:5000:privateKey=/nonexistent.pem"])
def test_unusable_port_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="not a usable endpoint"):
        parse("--port", bad)


def test_max_request() -> None:
    assert parse("--max-request", "100")["max-request"] == 100


def test_max_connections() -> None:
    assert parse("--max-connections", "3")["max-connections"] == 3


def test_idle_timeout() -> None:
    assert parse("--idle-timeout", "2.5")["idle-timeout"] == 2.5


@pytest.mark.parametrize(
    "args",
    [("--max-request", "0"), ("--max-request", "x"), ("--max-connections", "-1"), ("--idle-timeout", "-1"),
     ("--idle-timeout", "nan"), ("--idle-timeout", "soon")],
)
def test_bad_numbers_are_usage_errors(args: tuple[str, str]) -> None:
    with pytest.raises(UsageError):
        parse(*args)


def test_make_service_listens_with_the_configured_factory() -> None:
    reactor = MemoryReactor()
    svc = makeService(parse("--port", "tcp:6000:interface=127.0.0.1", "--max-request", "77",
                            "--max-connections", "5", "--idle-timeout", "9"), reactor=reactor)
    assert isinstance(svc, KVService)
    svc.startService()
    [(port, factory, backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (6000, "127.0.0.1")
    assert isinstance(factory, KVFactory)
    assert (factory.maxRequest, factory.maxConnections, factory.idleTimeout) == (77, 5, 9)
    assert svc.port is not None


def test_stop_service_stops_listening() -> None:
    reactor = MemoryReactor()
    svc = makeService(parse("--port", "6000"), reactor=reactor)
    svc.startService()
    d = svc.stopService()
    assert reactor.tcpServers[0][0] == 6000
    assert svc.port is None
    assert d.called


def test_unix_endpoint() -> None:
    reactor = MemoryReactor()
    makeService(parse("--port", "unix:/tmp/kvtwist-test.sock"), reactor=reactor).startService()
    assert reactor.unixServers[0][0] == "/tmp/kvtwist-test.sock"


def test_plugin_is_discovered() -> None:
    import twisted.plugins

    makers = {p.tapname: p for p in getPlugins(IPlugin, twisted.plugins) if hasattr(p, "tapname")}
    assert "kvstore" in makers
    assert makers["kvstore"].options is Options
