"""
What the server counts while it serves: plain integers, read at scrape time.

Counting costs one list increment per request and a few per connection
(on the compiled fast path, an addition in C), with no lock and no
library call on the hot path; ``kvtwist.server.metrics``
turns these numbers into Prometheus metrics when someone asks
(``--metrics``). No Twisted imports.
"""

from __future__ import annotations

from typing import Protocol

from kvtwist.histogram import Histogram

# Every (command, outcome) a request can have, each an index into
# ``ServerStats.requests``. A request's outcome is what its reply says:
# an ``Error:`` kind, or the answer.
REQUEST_KINDS: tuple[tuple[str, str], ...] = (
    ("put", "ok"), ("put", "exists"),
    ("get", "found"), ("get", "not_found"),
    ("del", "ok"), ("del", "not_found"),
    ("put", "bad_key"), ("put", "bad_value"), ("get", "bad_key"), ("del", "bad_key"),
    ("put", "read_only"), ("del", "read_only"), ("put", "store_full"),
    ("put", "unavailable"), ("get", "unavailable"), ("del", "unavailable"),
    ("put", "store_error"), ("get", "store_error"), ("del", "store_error"),
    ("bye", "ok"),
    ("auth", "ok"), ("auth", "invalid_password"), ("auth", "no_password"),
    ("other", "unknown_command"), ("other", "wrong_arguments"), ("other", "auth_required"), ("other", "too_long"),
)
_INDEX = {kind: i for i, kind in enumerate(REQUEST_KINDS)}
PUT_OK, PUT_EXISTS = _INDEX["put", "ok"], _INDEX["put", "exists"]
GET_FOUND, GET_NOT_FOUND = _INDEX["get", "found"], _INDEX["get", "not_found"]
DEL_OK, DEL_NOT_FOUND = _INDEX["del", "ok"], _INDEX["del", "not_found"]
PUT_BAD_KEY, PUT_BAD_VALUE = _INDEX["put", "bad_key"], _INDEX["put", "bad_value"]
GET_BAD_KEY, DEL_BAD_KEY = _INDEX["get", "bad_key"], _INDEX["del", "bad_key"]
BYE = _INDEX["bye", "ok"]
AUTH_OK, AUTH_INVALID, AUTH_NO_PASSWORD = (
    _INDEX["auth", "ok"], _INDEX["auth", "invalid_password"], _INDEX["auth", "no_password"]
)
UNKNOWN_COMMAND, WRONG_ARGUMENTS = _INDEX["other", "unknown_command"], _INDEX["other", "wrong_arguments"]
AUTH_REQUIRED, TOO_LONG = _INDEX["other", "auth_required"], _INDEX["other", "too_long"]


def storeErrorKind(command: str, kind: str) -> int:
    """The index for a store's refusal of ``command``, by the error's ``kind``."""
    return _INDEX.get((command, kind), _INDEX[command, "store_error"])


# Why connections end, when the server ends them, or why they never start.
REFUSAL_REASONS = ("limit",)
CLOSE_REASONS = ("bye", "too_long", "idle", "request_timeout", "auth", "client")

# Request latency buckets, in seconds: from the read that completed a
# chunk of requests to the write of its replies.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class CountedInC(Protocol):
    """What the compiled fast path counts on its own (``kvtwist.compiled.ChunkRunner``)."""

    def requestCounts(self) -> list[int]: ...

    @property
    def bytesRun(self) -> int: ...


class ServerStats:
    """
    The server's counters; every key exists from the start, so a reader
    in another thread never sees one appear.

    ``requests`` and ``bytesIn`` are what the Python path counts; the
    compiled fast path, when there is one, counts in C (``countedInC``),
    and ``requestCounts`` and ``receivedBytes`` give the sums.
    """

    def __init__(self, latency: Histogram | None = None, countedInC: CountedInC | None = None) -> None:
        self.requests = [0] * len(REQUEST_KINDS)
        self.accepted = 0
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.bytesIn = 0
        self.bytesOut = 0
        # Shared with the compiled fast path, which files the chunks it times there itself.
        self.latency = latency if latency is not None else Histogram(LATENCY_BUCKETS)
        self._countedInC = countedInC

    def requestCounts(self) -> list[int]:
        """Every request by kind, indexed as ``REQUEST_KINDS``."""
        counts = list(self.requests)
        if self._countedInC is not None:
            for kind, count in enumerate(self._countedInC.requestCounts()):
                counts[kind] += count
        return counts

    def receivedBytes(self) -> int:
        """The bytes of every request received."""
        inC = self._countedInC.bytesRun if self._countedInC is not None else 0
        return self.bytesIn + inC
