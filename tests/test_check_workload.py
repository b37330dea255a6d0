"""The seeded workload: the same seed gives the same requests, different seeds do not."""

from __future__ import annotations

from itertools import islice

from kvtwist.check import workload
from kvtwist.check.history import PUT


def firstRequests(seed: int, client: int, count: int = 300) -> list[workload.Request]:
    keys = workload.keys(seed, "shared", 8)
    return list(islice(workload.clientRequests(seed, client, keys), count))


def test_sameSeedSameRequests() -> None:
    assert firstRequests(42, 3) == firstRequests(42, 3)
    assert workload.keys(42, "shared", 8) == workload.keys(42, "shared", 8)
    assert workload.garbage(42, 1000) == workload.garbage(42, 1000)


def test_otherSeedOrClientOtherRequests() -> None:
    assert firstRequests(42, 3) != firstRequests(43, 3)
    assert firstRequests(42, 3) != firstRequests(42, 4)
    assert workload.keys(42, "shared", 8) != workload.keys(43, "shared", 8)


def test_keysAreDistinctAndOutOfTheWay() -> None:
    keys = workload.keys(1, "shared", 500)
    assert len(set(keys)) == 500
    assert all(workload.KEY_FLOOR <= key < workload.KEY_CEILING < 2**63 for key in keys)


def test_everyPutWritesAValueNoOtherPutWrites() -> None:
    values = [
        request.value
        for client in range(20)
        for request in firstRequests(5, client, 500)
        if request.verb == PUT
    ]
    assert len(values) == len(set(values)) > 1000
    assert all(0 < value < 2**63 for value in values)


def test_theMixUsesEveryVerbAndEveryKey() -> None:
    requests = firstRequests(9, 0, 2000)
    assert {request.verb for request in requests} == {"put", "get", "del"}
    assert {request.key for request in requests} == set(workload.keys(9, "shared", 8))


def test_requestLines() -> None:
    assert workload.Request("put", 5, -6).line == b"put 5 -6"
    assert workload.Request("get", 5).line == b"get 5"
    assert workload.Request("del", -5).line == b"del -5"
