"""--metrics: the counters behind /metrics, read through prometheus-client, and /healthz."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client", reason="--metrics needs the metrics extra")

from prometheus_client import CollectorRegistry  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.web.test.requesthelper import DummyRequest  # noqa: E402

from kvtwist.server.factory import KVFactory  # noqa: E402
from kvtwist.server.metrics import HealthResource, KVCollector  # noqa: E402
from kvtwist.storage.durable import DurableStore  # noqa: E402
from kvtwist.storage.journaled import openDirectory  # noqa: E402
from kvtwist.storage.memory import MemoryStore  # noqa: E402


def scrape(factory: KVFactory, durable: DurableStore | None = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(KVCollector(factory, durable))
    return registry


def requests(registry: CollectorRegistry, command: str, outcome: str) -> float | None:
    return registry.get_sample_value("kvtwist_requests_total", {"command": command, "outcome": outcome})


def test_requests_are_counted_by_command_and_outcome() -> None:
    clock = Clock()
    factory = KVFactory(MemoryStore(maxKeys=3), reactor=clock, timing=True)
    proto, transport = factory.buildProtocol(None), StringTransport()
    proto.makeConnection(transport)
    sent = b"put 1 1\nput 1 2\nput 2 2\nput 3 3\nput 4 4\nget 1\nget 9\nget x\ndel 2\ndel 2\nfrob\nget\n"
    proto.dataReceived(sent)
    registry = scrape(factory)
    expected = {
        ("put", "ok"): 3, ("put", "exists"): 1, ("put", "store_full"): 1, ("get", "found"): 1,
        ("get", "not_found"): 1, ("get", "bad_key"): 1, ("del", "ok"): 1, ("del", "not_found"): 1,
        ("other", "unknown_command"): 1, ("other", "wrong_arguments"): 1, ("bye", "ok"): 0,
    }
    for (command, outcome), count in expected.items():
        assert requests(registry, command, outcome) == count, (command, outcome)
    assert registry.get_sample_value("kvtwist_keys") == 2
    assert registry.get_sample_value("kvtwist_connections_open") == 1
    assert registry.get_sample_value("kvtwist_connections_accepted_total") == 1
    assert registry.get_sample_value("kvtwist_received_bytes_total") == len(sent)
    assert registry.get_sample_value("kvtwist_sent_bytes_total") == len(transport.value())
    assert registry.get_sample_value("kvtwist_request_latency_seconds_count") == 12
    proto.dataReceived(b"Bye\n")
    proto.connectionLost()
    registry = scrape(factory)
    assert requests(registry, "bye", "ok") == 1
    assert registry.get_sample_value("kvtwist_connections_closed_total", {"reason": "bye"}) == 1
    assert registry.get_sample_value("kvtwist_connections_open") == 0


def test_refusals_and_server_ended_connections_are_counted_by_reason() -> None:
    clock = Clock()
    factory = KVFactory(MemoryStore(), maxConnections=1, idleTimeout=1, reactor=clock)
    first = factory.buildProtocol(None)
    first.makeConnection(StringTransport())
    refused = factory.buildProtocol(None)
    refused.makeConnection(StringTransport())
    clock.advance(1)
    first.connectionLost()
    registry = scrape(factory)
    assert registry.get_sample_value("kvtwist_connections_refused_total", {"reason": "limit"}) == 1
    assert registry.get_sample_value("kvtwist_connections_closed_total", {"reason": "idle"}) == 1
    assert registry.get_sample_value("kvtwist_connections_closed_total", {"reason": "client"}) == 0


def test_without_timing_no_latency_is_measured() -> None:
    factory = KVFactory(MemoryStore(), reactor=Clock())
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.dataReceived(b"get 1\n")
    assert scrape(factory).get_sample_value("kvtwist_request_latency_seconds_count") == 0


def _memoryStores() -> list[object]:
    """The in-memory stores a server may run: the pure-Python one, and the compiled one where it is built."""
    from kvtwist import compiled

    stores: list[object] = [pytest.param(MemoryStore, id="python")]
    if compiled.CompiledStore is not None:
        stores.append(pytest.param(compiled.CompiledStore, id="compiled"))
    return stores


@pytest.mark.parametrize("makeStore", _memoryStores())
def test_latency_is_timed_on_a_sample_of_chunks_scaled_to_every_request(makeStore: type[MemoryStore]) -> None:
    # On the compiled path too: its chunks run in C, but the sampled ones still go through the clock.
    from kvtwist.server.protocol import TIME_EVERY

    factory = KVFactory(makeStore(), reactor=Clock(), timing=True)
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    chunks = 2 * TIME_EVERY + 1
    for i in range(chunks):
        proto.dataReceived(b"get %d\nput %d 1\n" % (i, i))
    # The first chunk, then one in TIME_EVERY: three chunks of two requests.
    assert factory.stats.latency.count == 3 * 2
    registry = scrape(factory)
    assert registry.get_sample_value("kvtwist_request_latency_seconds_count") == 2 * chunks
    assert registry.get_sample_value("kvtwist_request_latency_seconds_bucket", {"le": "+Inf"}) == 2 * chunks
    # The sum is scaled the same way as the counts.
    scaled = registry.get_sample_value("kvtwist_request_latency_seconds_sum")
    assert scaled == pytest.approx(factory.stats.latency.total * chunks / 3)


def test_a_chunk_the_runner_began_and_python_finished_files_each_reply_once() -> None:
    from kvtwist import compiled

    if compiled.CompiledStore is None:
        pytest.skip("no compiled path")
    factory = KVFactory(compiled.CompiledStore(), reactor=Clock(), timing=True)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    # The runner answers the get and leaves the unknown line to Python; both
    # are the first of their kind to be sampled, the runner's and the connection's.
    proto.dataReceived(b"get 1\nfoo\n")
    assert transport.value().count(b"\n") == 2
    assert factory.stats.latency.count == 1


def test_a_remote_engine_exports_its_round_trips_errors_and_health() -> None:
    from test_protocol_remote import DictEngine

    from kvtwist.storage.interface import TIMED_OUT

    engine = DictEngine()
    factory = KVFactory(engine, reactor=Clock(), timing=True)
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    # What an engine records of itself (kvtwist.engines): here, by hand.
    engine.stats.operations = 5
    engine.stats.latency.observe(0.002, 2)
    engine.stats.failed(TIMED_OUT, 3)
    registry = scrape(factory)
    assert registry.get_sample_value("kvtwist_engine_operations_total") == 5
    assert registry.get_sample_value("kvtwist_engine_errors_total", {"reason": TIMED_OUT}) == 3
    assert registry.get_sample_value("kvtwist_engine_latency_seconds_count") == 2
    assert registry.get_sample_value("kvtwist_engine_unavailable") == 0
    # No key count: an engine cannot count the keys under a prefix cheaply.
    assert registry.get_sample_value("kvtwist_keys") is None
    health = HealthResource(None, factory.remote)
    request = DummyRequest([b""])
    assert health.render_GET(request) == b"ok\n"
    engine.stats.unavailable = "connection refused"
    assert scrape(factory).get_sample_value("kvtwist_engine_unavailable") == 1
    request = DummyRequest([b""])
    assert health.render_GET(request) == b"store unavailable: connection refused\n"
    assert request.responseCode == 503


def test_a_durable_store_exports_its_journal_fsyncs_and_health(tmp_path) -> None:
    from twisted.internet import defer

    clock = Clock()
    store = DurableStore(openDirectory(str(tmp_path)), "always", clock, runBlocking=defer.maybeDeferred)
    factory = KVFactory(store, reactor=clock)
    proto, transport = factory.buildProtocol(None), StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"put 1 1\n")
    clock.advance(0)
    assert transport.value() == b"OK\n"
    registry = scrape(factory, store)
    assert registry.get_sample_value("kvtwist_journal_bytes") == store.journalBytes > 0
    assert registry.get_sample_value("kvtwist_fsync_duration_seconds_count") == 1
    assert registry.get_sample_value("kvtwist_compactions_total") == 0
    assert registry.get_sample_value("kvtwist_read_only") == 0
    health = HealthResource(store)
    request = DummyRequest([b""])
    assert health.render_GET(request) == b"ok\n" and request.responseCode in (None, 200)
    store.turnReadOnly("journal fsync failed: Input/output error")
    request = DummyRequest([b""])
    assert health.render_GET(request) == b"read-only: journal fsync failed: Input/output error\n"
    assert request.responseCode == 503
    assert scrape(factory, store).get_sample_value("kvtwist_read_only") == 1
    store.close()


def test_a_real_server_is_scraped_after_known_traffic(tmp_path) -> None:
    """A real twistd process: the counts /metrics shows are the traffic sent, and /healthz says ok."""
    import socket
    import urllib.request

    from serverproc import start_server

    metricsPort = _freePort()
    server = start_server("--data", str(tmp_path / "data"), "--metrics", f"tcp:{metricsPort}:interface=127.0.0.1")
    try:
        with server.connect() as client:
            client.sendall(b"put 1 1\nput 1 2\nget 1\nget 2\ndel 1\nfrob\nBye\n")
            received = b""
            while not received.endswith(b"Goodbye\n"):
                received += client.recv(4096)
        assert received == (b"OK\nKey already exists\n1\nKey not found\nOK\n"
                            b"Error: unknown command (expected put, get, del or Bye)\nGoodbye\n")
        base = f"http://127.0.0.1:{metricsPort}"
        text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        for line in [
            'kvtwist_requests_total{command="put",outcome="ok"} 1.0',
            'kvtwist_requests_total{command="put",outcome="exists"} 1.0',
            'kvtwist_requests_total{command="get",outcome="found"} 1.0',
            'kvtwist_requests_total{command="get",outcome="not_found"} 1.0',
            'kvtwist_requests_total{command="del",outcome="ok"} 1.0',
            'kvtwist_requests_total{command="other",outcome="unknown_command"} 1.0',
            'kvtwist_requests_total{command="bye",outcome="ok"} 1.0',
            "kvtwist_keys 0.0",
            "kvtwist_read_only 0.0",
            "kvtwist_request_latency_seconds_count 7.0",
        ]:
            assert line in text.splitlines(), line
        assert "process_resident_memory_bytes" in text
        health = urllib.request.urlopen(f"{base}/healthz", timeout=10)
        assert health.status == 200 and health.read() == b"ok\n"
        with socket.create_connection(("127.0.0.1", metricsPort)):
            pass
    finally:
        server.stop()


def _freePort() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_is_a_service_beside_the_listener_only_when_asked() -> None:
    from twisted.application.internet import StreamServerEndpointService
    from twisted.application.service import IServiceCollection
    from twisted.internet.testing import MemoryReactor

    from kvtwist.tap import Options, makeService

    options = Options()
    options.parseOptions(["--port", "6000", "--metrics", "9100"])
    assert options["metrics"] == "tcp:9100:interface=127.0.0.1"
    services = list(IServiceCollection(makeService(options, MemoryReactor())))
    assert [type(s) for s in services][-1] is StreamServerEndpointService


def test_without_metrics_nothing_of_it_is_imported() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from twisted.internet.testing import MemoryReactor\n"
        "from kvtwist.tap import Options, makeService\n"
        "o = Options(); o.parseOptions(['--port', '6000'])\n"
        "makeService(o, MemoryReactor()).startService()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'kvtwist.server.metrics'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
