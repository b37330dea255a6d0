"""
What the checker asks of the server, derived only from the seed.

Every random choice (keys, the mix of requests per client, garbage bytes)
comes from a ``random.Random`` seeded from ``--seed`` and a fixed label, so
the same seed gives the same requests in the same order per client; only
the timing, which the server decides, differs between runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from kvtwist.check.history import DEL, GET, PUT

#: Keys are drawn far away from the small numbers people type by hand, so a
#: check does not trample the data of someone testing with ``put 1 2``.
KEY_FLOOR = 10**15
KEY_CEILING = 10**18

#: put / get / del weights. Gets are the cheapest way to catch a lost or
#: stale write; dels make keys absent again so puts keep succeeding.
MIX = ((PUT, 4), (GET, 4), (DEL, 2))


@dataclass(frozen=True)
class Request:
    """One well-formed request of the random mix."""

    verb: str
    key: int
    value: int | None = None

    @property
    def line(self) -> bytes:
        if self.verb == PUT:
            assert self.value is not None, "a put carries a value"
            return b"put %d %d" % (self.key, self.value)
        return b"%s %d" % (self.verb.encode(), self.key)


def rng(seed: int, label: str) -> random.Random:
    """A generator for one purpose: independent of how much the others were used."""
    return random.Random(f"{seed}/{label}")


def keys(seed: int, label: str, count: int) -> list[int]:
    """``count`` distinct keys for one purpose."""
    return rng(seed, f"keys/{label}").sample(range(KEY_FLOOR, KEY_CEILING), count)


def clientRequests(seed: int, client: int, sharedKeys: list[int]) -> Iterator[Request]:
    """
    The endless stream of requests client number ``client`` sends.

    Every put carries a value no other put in the run uses, so a value read
    back names the one put that wrote it; that makes failures easy to read.
    """
    choose = rng(seed, f"client/{client}")
    verbs = [verb for verb, _ in MIX]
    weights = [weight for _, weight in MIX]
    sequence = 0
    while True:
        verb = choose.choices(verbs, weights)[0]
        key = choose.choice(sharedKeys)
        if verb == PUT:
            sequence += 1
            yield Request(PUT, key, (client + 1) * 1_000_000_000 + sequence)
        else:
            yield Request(verb, key)


def garbage(seed: int, size: int) -> bytes:
    """Random bytes with the awkward ones (NUL, CR, ESC, bytes >= 0x80) common."""
    choose = rng(seed, "garbage")
    awkward = b"\x00\r\x1b\x7f\xff\xc3\t "
    return bytes(
        choose.choice(awkward) if choose.random() < 0.3 else choose.randrange(256) for _ in range(size)
    )
