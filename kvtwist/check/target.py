"""
The servers under test and the settings of a run, shared by every check.

A run has one node or several that claim to share one store. Checks about
one server's conversation (conformance, serving, robustness) talk to the
first node; checks about shared state (visibility, concurrency) spread
their clients over all nodes, client ``i`` on node ``i mod N``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

from kvtwist.client import KVClient, connect, hostEndpoint
from kvtwist.check.nodes import Node
from kvtwist.check.probe import Probe, Transcript, openProbe
from kvtwist.check.report import CheckResult
from kvtwist.server.protocol import DEFAULT_MAX_REQUEST

#: The rules every server of this protocol must follow (the protocol's
#: original assignment): fixed replies, pipelining, CRLF, surviving bad input.
BASIC = "basic"
#: BASIC plus kvtwist's stricter documented rules (docs/protocol.md).
KVTWIST = "kvtwist"
PROFILES = (BASIC, KVTWIST)
#: Old profile names still accepted, so that existing scripts keep working.
DEPRECATED_PROFILES = {"assignment": BASIC}


@dataclass(frozen=True)
class Settings:
    """What the command line chose; every check reads its share."""

    #: The servers under test: the first for single-connection checks, all
    #: of them, round-robin, for the checks of shared state.
    nodes: tuple[Node, ...]
    clients: int = 50
    duration: float = 10.0
    keys: int = 8
    seed: int = 0
    profile: str = BASIC
    #: How long a reply may take before it counts as missing. Generous,
    #: because a loaded machine can be slow; a server that serves one client
    #: at a time never answers at all, however long one waits.
    timeout: float = 5.0
    #: The server's request limit (kvtwist's ``--max-request``); the
    #: kvtwist profile sends a request twice as long and expects it refused.
    maxRequest: int = DEFAULT_MAX_REQUEST
    #: Sent with ``auth`` first on every connection (``--password-file``).
    #: Kept out of ``repr`` and of ``shown``: a report never holds it.
    password: bytes | None = field(default=None, repr=False)

    def shown(self) -> dict[str, Any]:
        """The settings a report prints (enough to repeat the run)."""
        return {
            "nodes": [node.address for node in self.nodes],
            "profile": self.profile,
            "seed": self.seed,
            "clients": self.clients,
            "duration": self.duration,
            "keys": self.keys,
            "timeout": self.timeout,
            "max_request": self.maxRequest,
        }


class Target:
    """
    Connections to the server under test, the clock, and progress output.

    ``reactor`` provides IReactorTCP and IReactorTime (any real reactor).
    ``clock`` is monotonic and is what operation times in a history are
    measured with; ``progress`` takes one line of text for the user.
    """

    def __init__(
        self,
        reactor: Any,
        settings: Settings,
        progress: Callable[[str], None] = lambda line: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.progress = progress
        self.clock = clock

    @property
    def nodes(self) -> tuple[Node, ...]:
        return self.settings.nodes

    @property
    def address(self) -> str:
        """The first node's address: where the single-connection checks run."""
        return self.nodes[0].address

    @property
    def description(self) -> str:
        """Every node's address, for a report's title."""
        return ", ".join(node.address for node in self.nodes)

    def nodeOf(self, client: int) -> int:
        """The node (an index into ``nodes``) that client number ``client`` of a shared-state check talks to."""
        return client % len(self.nodes)

    @property
    def strict(self) -> bool:
        """Whether the stricter rules of this project's protocol specification apply."""
        return self.settings.profile == KVTWIST

    def _endpoint(self, node: int = 0) -> Any:
        where = self.nodes[node]
        return hostEndpoint(self.reactor, where.host, where.port, self.settings.timeout)

    def client(self, node: int = 0) -> Deferred[KVClient]:
        """A new connected ``KVClient`` to node number ``node``, authenticated when the run has a password."""
        return connect(self._endpoint(node), password=self.settings.password)

    def probe(self, name: str, transcript: Transcript) -> Deferred[Probe]:
        """
        A new connected raw ``Probe`` to the first node, writing into
        ``transcript``, authenticated when the run has a password.
        """
        opening = openProbe(self.reactor, self._endpoint(), name, transcript)
        password = self.settings.password
        if password is None:
            return opening

        async def authenticated(probe: Probe) -> Probe:
            await probe.authenticate(password, self.settings.timeout)
            return probe

        return opening.addCallback(lambda probe: ensureDeferred(authenticated(probe)))

    def sleep(self, seconds: float) -> Deferred[None]:
        return deferLater(self.reactor, seconds)

    def finished(self, result: CheckResult) -> CheckResult:
        """Tell the user a check is done; returns ``result`` for chaining."""
        self.progress(f"{'PASS' if result.passed else 'FAIL'}  {result.title}")
        return result
