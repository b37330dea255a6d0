"""The twistd plugin: option parsing, the service it builds, and discovery."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import twisted.test
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.plugin import IPlugin, getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import TestCase

from kvtwist.server.arguments import LISTEN_BACKLOG, ListenAddress, withServerDefaults
from kvtwist.server.factory import KVFactory
from kvtwist.server.listening import KVService, ListeningPort
from kvtwist.tap import Options, makeService
from kvtwist import compiled
from kvtwist.version import version

# A certificate and key that ship with Twisted, for ssl: descriptions.
SERVER_PEM = Path(twisted.test.__file__).with_name("server.pem")


# The in-memory store's start-up line: it says whether the compiled path runs.
MEMORY_LINE = "kvstore: store: memory" + (" (compiled)" if compiled.CompiledStore is not None else "")


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def descriptions(options: Options) -> list[str]:
    return [address.description for address in options["port"]]


@pytest.fixture
def logged() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def test_defaults() -> None:
    options = parse()
    assert descriptions(options) == ["tcp:5000:interface=127.0.0.1", r"tcp6:5000:interface=\:\:1"]
    assert options["max-request"] == 4096
    assert options["max-connections"] == 10000
    assert options["idle-timeout"] == 0


def test_a_bare_port_is_loopback_only() -> None:
    assert parse("--port", " 6001 ")["port"] == [
        ListenAddress("tcp:6001:interface=127.0.0.1"),
        ListenAddress(r"tcp6:6001:interface=\:\:1", skipIfUnavailable=True),
    ]


@pytest.mark.parametrize("given", ["tcp:5000", "tcp:5000:interface=127.0.0.1", "unix:/tmp/kv.sock"])
def test_an_endpoint_string_is_kept(given: str) -> None:
    assert parse("--port", given)["port"] == [ListenAddress(given)]


def test_port_may_be_repeated() -> None:
    options = parse("--port", "tcp:5000", "-p", "unix:/tmp/kv.sock", "--port", "6000")
    assert descriptions(options) == [
        "tcp:5000", "unix:/tmp/kv.sock", "tcp:6000:interface=127.0.0.1", r"tcp6:6000:interface=\:\:1"]


@pytest.mark.parametrize("bad", ["foo:1", "tcp:notaport", "ssl:5000:privateKey=/nonexistent.pem", "",
                                 "unix:/tmp/kv.sock:backlog=many", "unix:/tmp/kv.sock:mode=rw"])
def test_unusable_port_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="not a usable endpoint"):
        parse("--port", bad)


def test_a_bare_port_out_of_range_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not a port number"):
        parse("--port", "65536")


@pytest.mark.parametrize(
    "given, expected",
    [("tcp:5000", f"tcp:5000:backlog={LISTEN_BACKLOG}"),
     ("tcp:5000:backlog=7:interface=127.0.0.1", "tcp:5000:backlog=7:interface=127.0.0.1"),
     (r"tcp6:5000:interface=\:\:1", rf"tcp6:5000:interface=\:\:1:backlog={LISTEN_BACKLOG}"),
     ("ssl:5443:privateKey=k.pem", f"ssl:5443:privateKey=k.pem:backlog={LISTEN_BACKLOG}"),
     ("unix:/run/kv.sock", f"unix:/run/kv.sock:backlog={LISTEN_BACKLOG}:mode=600"),
     ("unix:/run/kv.sock:mode=660:backlog=9", "unix:/run/kv.sock:mode=660:backlog=9"),
     # An escaped colon is part of the path, not the start of an argument.
     (r"unix:/run/x\:backlog=1", rf"unix:/run/x\:backlog=1:backlog={LISTEN_BACKLOG}:mode=600"),
     ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0")],
)
def test_server_defaults(given: str, expected: str) -> None:
    assert withServerDefaults(given) == expected


@pytest.mark.parametrize("port", ["6000", "tcp:6000", r"tcp6:6000:interface=\:\:1"])
def test_tcp_ports_listen_with_a_long_backlog(port: str) -> None:
    reactor = MemoryReactor()
    makeService(parse("--port", port), reactor=reactor).startService()
    assert reactor.tcpServers
    assert all(backlog == LISTEN_BACKLOG for (_, _, backlog, _) in reactor.tcpServers)


def test_a_given_backlog_is_kept() -> None:
    reactor = MemoryReactor()
    makeService(parse("--port", "tcp:6000:backlog=7"), reactor=reactor).startService()
    [(_, _, backlog, _)] = reactor.tcpServers
    assert backlog == 7


def test_ssl_listens_with_a_long_backlog() -> None:
    reactor = MemoryReactor()
    makeService(parse("--port", f"ssl:6443:privateKey={SERVER_PEM}"), reactor=reactor).startService()
    [(port, _, _, backlog, _)] = reactor.sslServers
    assert (port, backlog) == (6443, LISTEN_BACKLOG)


def test_unix_endpoint_is_private_with_a_long_backlog() -> None:
    reactor = MemoryReactor()
    makeService(parse("--port", "unix:/tmp/kvtwist-test.sock"), reactor=reactor).startService()
    [(path, _, backlog, mode, _)] = reactor.unixServers
    assert (path, backlog, mode) == ("/tmp/kvtwist-test.sock", LISTEN_BACKLOG, 0o600)


def test_a_given_unix_mode_is_kept() -> None:
    reactor = MemoryReactor()
    makeService(parse("--port", "unix:/tmp/kvtwist-test.sock:mode=660"), reactor=reactor).startService()
    [(_, _, _, mode, _)] = reactor.unixServers
    assert mode == 0o660


def test_max_request() -> None:
    assert parse("--max-request", "100")["max-request"] == 100


def test_max_connections() -> None:
    assert parse("--max-connections", "3")["max-connections"] == 3


def test_idle_timeout() -> None:
    assert parse("--idle-timeout", "2.5")["idle-timeout"] == 2.5


def test_request_timeout() -> None:
    assert parse()["request-timeout"] == 30
    assert parse("--request-timeout", "0.5")["request-timeout"] == 0.5


def test_max_keys() -> None:
    assert parse()["max-keys"] is None
    assert parse("--max-keys", "1000")["max-keys"] == 1000


@pytest.mark.parametrize(
    "content, password",
    [(b"s3cret\n", b"s3cret"), (b"s3cret", b"s3cret"), (b"s3cret\r\n", b"s3cret"), (b"\xc3\xa9t\xc3\xa9\n", "été".encode())],
)
def test_password_file(tmp_path: Path, content: bytes, password: bytes) -> None:
    path = tmp_path / "password"
    path.write_bytes(content)
    assert parse("--password-file", str(path))["password-file"] == password


@pytest.mark.parametrize("content", [b"", b"\n", b"two words\n", b"one\ntwo\n", b"tab\there", b"x" * 5000])
def test_a_password_the_protocol_cannot_carry_is_a_usage_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "password"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="--password-file"):
        parse("--password-file", str(path))


def test_a_missing_password_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No such file"):
        parse("--password-file", str(tmp_path / "nowhere"))


def test_a_password_silences_the_exposure_warning(tmp_path: Path, logged: Sequence[LogEvent]) -> None:
    path = tmp_path / "password"
    path.write_bytes(b"s3cret\n")
    svc = makeService(parse("--port", "tcp:6000", "--password-file", str(path)), reactor=MemoryReactor())
    svc.startService()
    assert isinstance(svc, KVService) and svc.factory.password == b"s3cret"
    assert not [e for e in logged if "reachable from other machines" in formatEvent(e)]
    assert not [e for e in logged if "s3cret" in formatEvent(e)], "the password is never logged"


@pytest.mark.parametrize(
    "args",
    [("--max-request", "0"), ("--max-request", "x"), ("--max-connections", "-1"), ("--idle-timeout", "-1"),
     ("--idle-timeout", "nan"), ("--idle-timeout", "soon"), ("--request-timeout", "-2"), ("--max-keys", "0")],
)
def test_bad_numbers_are_usage_errors(args: tuple[str, str]) -> None:
    with pytest.raises(UsageError):
        parse(*args)


def test_make_service_listens_with_the_configured_factory() -> None:
    reactor = MemoryReactor()
    svc = makeService(parse("--port", "tcp:6000:interface=127.0.0.1", "--max-request", "77",
                            "--max-connections", "5", "--idle-timeout", "9", "--request-timeout", "4",
                            "--max-keys", "12"), reactor=reactor)
    assert isinstance(svc, KVService)
    svc.startService()
    [(port, factory, backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (6000, "127.0.0.1")
    assert isinstance(factory, KVFactory) and factory is svc.factory
    assert (factory.maxRequest, factory.maxConnections, factory.idleTimeout) == (77, 5, 9)
    assert factory.requestTimeout == 4 and factory.reactor is reactor and factory.password is None
    assert factory.store.full is False and len(factory.store) == 0
    [listener] = list(svc)
    assert isinstance(listener, ListeningPort) and listener.port is not None


def test_every_port_listens_with_the_one_factory() -> None:
    reactor = MemoryReactor()
    svc = makeService(parse("--port", "6000", "--port", "unix:/tmp/kvtwist-test.sock"), reactor=reactor)
    assert isinstance(svc, KVService)
    svc.startService()
    assert [(port, interface) for (port, _, _, interface) in reactor.tcpServers] == [(6000, "127.0.0.1"), (6000, "::1")]
    factories = {server[1] for server in reactor.tcpServers + reactor.unixServers}
    assert factories == {svc.factory}


def test_every_address_is_logged(logged: Sequence[LogEvent]) -> None:
    makeService(parse("--port", "6000", "--port", "unix:/tmp/kvtwist-test.sock"), reactor=MemoryReactor()).startService()
    lines = [formatEvent(e) for e in logged if formatEvent(e).startswith("kvstore listening on ")]
    assert len(lines) == 3
    assert "UNIXAddress('/tmp/kvtwist-test.sock')" in lines[2]


def test_the_start_up_story_comes_before_the_first_listening_line(logged: Sequence[LogEvent]) -> None:
    makeService(parse("--port", "unix:/tmp/kvtwist-test.sock"), reactor=MemoryReactor()).startService()
    assert [formatEvent(e) for e in logged] == [
        f"kvstore: kvtwist {version()} starting",
        MEMORY_LINE,
        "kvstore listening on UNIXAddress('/tmp/kvtwist-test.sock')",
    ]


def test_version_prints_kvtwist_s_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    # usage.Options' own --version prints Twisted's.
    with pytest.raises(SystemExit) as exited:
        parse("--version")
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"kvtwist {version()}\n"


def test_every_interface_is_an_exposed_server(logged: Sequence[LogEvent]) -> None:
    makeService(parse("--port", "tcp:6000"), reactor=MemoryReactor()).startService()
    [warning] = [formatEvent(e) for e in logged if "reachable from other machines" in formatEvent(e)]
    assert "port=6000" in warning and "no authentication is configured" in warning


def test_a_unix_socket_is_not_exposed(logged: Sequence[LogEvent]) -> None:
    makeService(parse("--port", "unix:/tmp/kvtwist-test.sock"), reactor=MemoryReactor()).startService()
    assert not [e for e in logged if "reachable from other machines" in formatEvent(e)]


class StopTests(TestCase):
    """Stopping on the real reactor, where a port that still listens would still take connections."""

    async def test_stop_service_stops_listening(self) -> None:
        from twisted.internet import reactor

        svc = makeService(parse("--port", "tcp:0:interface=127.0.0.1"), reactor=reactor)
        assert isinstance(svc, KVService)
        svc.startService()
        [listener] = list(svc)
        assert isinstance(listener, ListeningPort)
        assert listener.port is not None
        host = listener.port.getHost()
        assert isinstance(host, IPv4Address)
        address = ("127.0.0.1", host.port)
        socket.create_connection(address, timeout=5).close()
        await svc.stopService()
        self.assertIsNone(listener.port)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5)


def test_plugin_is_discovered() -> None:
    import twisted.plugins

    makers = {p.tapname: p for p in getPlugins(IPlugin, twisted.plugins) if hasattr(p, "tapname")}
    assert "kvstore" in makers
    assert makers["kvstore"].options is Options


def test_log_connections() -> None:
    assert not makeService(parse("--port", "6000"), reactor=MemoryReactor()).factory.logConnections
    svc = makeService(parse("--port", "6000", "--log-connections"), reactor=MemoryReactor())
    assert svc.factory.logConnections


# --store: where the data lives.


def test_the_store_is_in_memory_by_default() -> None:
    options = parse()
    assert options["store"] == "memory"
    factory = _factoryOf(makeService(options, reactor=MemoryReactor()))
    assert factory.store is not None and factory.remote is None


def _factoryOf(top: object) -> KVFactory:
    services = [top, *getattr(top, "services", [])]
    for candidate in services:
        if isinstance(candidate, KVService):
            return candidate.factory
    raise AssertionError(f"no KVService in {services}")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379", "redis-cluster://127.0.0.1:7000,127.0.0.1:7001",
                                 "etcd://127.0.0.1:2379"])
def test_a_remote_store_becomes_the_factorys_engine(url: str) -> None:
    options = parse("--store", url, "--key-prefix", "app:", "--store-timeout", "0.5")
    top = makeService(options, reactor=MemoryReactor())
    factory = _factoryOf(top)
    assert factory.store is None and factory.remote is not None
    # The engine is a child service, stopped after the listeners.
    children = list(top)  # type: ignore[call-overload]
    assert factory.remote in children and children.index(factory.remote) < children.index(
        next(c for c in children if isinstance(c, KVService))
    )


@pytest.mark.parametrize("args, words", [
    (["--store", "mysql://x"], "expected memory, redis://"),
    (["--store", "redis://127.0.0.1"], "redis://127.0.0.1"),
    (["--store", "redis://127.0.0.1:6379", "--data", "somewhere"], "--data cannot be used with --store"),
    (["--store", "etcd://127.0.0.1:2379", "--max-keys", "10"], "--max-keys cannot be used with --store"),
    (["--store", "redis://127.0.0.1:6379", "--fsync", "always"], "--fsync needs --data"),
    (["--store", "etcd://127.0.0.1:2379", "--store-timeout", "0"], "--store-timeout must be more than 0"),
])
def test_remote_store_usage_errors(args: list[str], words: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=re.escape(words)):
        parse(*[str(tmp_path / a) if a == "somewhere" else a for a in args])
