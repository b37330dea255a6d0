"""
``--metrics ENDPOINT``: Prometheus metrics at ``/metrics`` and a health check at ``/healthz``.

Imported only when the option is given. The server keeps plain counters
(``kvtwist.server.stats``, and the durable store's fsync and compaction
figures); a custom collector reads them when Prometheus scrapes, so
serving requests never touches the metrics library. ``/metrics`` is
prometheus-client's own Twisted resource; both are served by
``twisted.web`` in the server's reactor.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.twisted import MetricsResource
from twisted.application import internet, service
from twisted.internet import endpoints
from twisted.web import resource, server
from twisted.web.server import Request

from kvtwist.histogram import Histogram
from kvtwist.server.factory import KVFactory
from kvtwist.server.stats import REQUEST_KINDS
from kvtwist.storage.durable import DurableStore
from kvtwist.storage.interface import IRemoteStore


def _histogram(
    name: str, documentation: str, histogram: Histogram, count: int | None = None
) -> HistogramMetricFamily:
    """
    ``histogram`` as Prometheus shows one; with ``count``, the histogram
    holds a sample, scaled so that its count is ``count`` exactly.
    """
    scale = count / histogram.count if count is not None and histogram.count else 1.0
    cumulative, buckets = 0.0, []
    for bound, observed in zip((*histogram.bounds, float("inf")), histogram.counts):
        cumulative += observed * scale
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.total * scale)


class KVCollector(Collector):
    """Reads the server's counters at scrape time."""

    def __init__(self, factory: KVFactory, durable: DurableStore | None) -> None:
        self.factory = factory
        self.durable = durable

    def collect(self) -> Iterator[Metric]:
        factory, stats = self.factory, self.factory.stats
        requests = CounterMetricFamily(
            "kvtwist_requests", "Requests by command and outcome (an Error: kind, or the answer).",
            labels=["command", "outcome"],
        )
        counts = stats.requestCounts()
        for (command, outcome), count in zip(REQUEST_KINDS, counts):
            requests.add_metric([command, outcome], count)
        yield requests
        # Timed on a sample of chunks (KVProtocol._timeThisChunk); each request is answered by one reply line.
        yield _histogram(
            "kvtwist_request_latency_seconds",
            "From the read that completed a request to the write of its reply (a sample, scaled to every request).",
            stats.latency, sum(counts),
        )
        yield GaugeMetricFamily("kvtwist_connections_open", "Client connections open now.", value=factory.connections)
        yield CounterMetricFamily("kvtwist_connections_accepted", "Client connections accepted.", value=stats.accepted)
        refused = CounterMetricFamily(
            "kvtwist_connections_refused", "Connections refused at once, by reason.", labels=["reason"]
        )
        for reason, count in list(stats.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        closed = CounterMetricFamily(
            "kvtwist_connections_closed",
            "Connections ended, by reason: the server's (bye, too_long, idle, request_timeout, auth) or the client's.",
            labels=["reason"],
        )
        for reason, count in list(stats.closed.items()):
            closed.add_metric([reason], count)
        yield closed
        yield CounterMetricFamily("kvtwist_received_bytes", "Bytes of requests received.", value=stats.receivedBytes())
        yield CounterMetricFamily("kvtwist_sent_bytes", "Bytes of replies sent.", value=stats.bytesOut)
        if factory.store is not None:
            # Not with a remote engine: none of them counts the keys under a prefix cheaply.
            yield GaugeMetricFamily("kvtwist_keys", "Keys stored.", value=len(factory.store))
        remote = factory.remote
        if remote is not None:
            engine = remote.stats
            yield CounterMetricFamily(
                "kvtwist_engine_operations", "Operations sent to the remote engine.", value=engine.operations
            )
            errors = CounterMetricFamily(
                "kvtwist_engine_errors", "Operations the remote engine did not answer, by reason.", labels=["reason"]
            )
            for reason, count in list(engine.errors.items()):
                errors.add_metric([reason], count)
            yield errors
            yield _histogram(
                "kvtwist_engine_latency_seconds", "Round trips to the remote engine, a chunk of requests at a time.",
                engine.latency,
            )
            yield GaugeMetricFamily(
                "kvtwist_engine_unavailable", "1 while the remote engine cannot be reached.",
                value=int(engine.unavailable is not None),
            )
        durable = self.durable
        if durable is not None:
            yield GaugeMetricFamily(
                "kvtwist_journal_bytes", "Bytes of journal that recovery would replay now.", value=durable.journalBytes
            )
            yield _histogram(
                "kvtwist_fsync_duration_seconds", "fsyncs of the journal (in the reactor or a thread), from start to end.",
                durable.policy.fsyncDurations,
            )
            yield CounterMetricFamily("kvtwist_compactions", "Compactions finished.", value=durable.compactor.completed)
            yield GaugeMetricFamily(
                "kvtwist_read_only", "1 while the store refuses changes after a disk error.",
                value=int(durable.readOnlyReason is not None),
            )


class HealthResource(resource.Resource):
    """``/healthz``: 200 while the server serves, 503 with the reason when it cannot take writes."""

    isLeaf = True

    def __init__(self, durable: DurableStore | None, remote: IRemoteStore | None = None) -> None:
        super().__init__()
        self.durable = durable
        self.remote = remote

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        reason = None
        if self.durable is not None and self.durable.readOnlyReason is not None:
            reason = f"read-only: {self.durable.readOnlyReason}"
        elif self.remote is not None and self.remote.stats.unavailable is not None:
            reason = f"store unavailable: {self.remote.stats.unavailable}"
        if reason is not None:
            request.setResponseCode(503)
            return f"{reason}\n".encode("utf-8", "replace")
        return b"ok\n"


def metricsService(
    reactor: Any, description: str, factory: KVFactory, durable: DurableStore | None
) -> service.IService:
    """The web service for ``--metrics``: ``/metrics`` and ``/healthz`` on the endpoint ``description``."""
    registry = CollectorRegistry()
    registry.register(KVCollector(factory, durable))
    ProcessCollector(registry=registry)
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"healthz", HealthResource(durable, factory.remote))
    site = server.Site(root)
    site.noisy = False
    return internet.StreamServerEndpointService(endpoints.serverFromString(reactor, description), site)
