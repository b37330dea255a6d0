"""The ``kvstore`` twistd plugin: command-line options and the service they build."""

from __future__ import annotations

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorCore
from twisted.python import usage

from kvtwist.server.arguments import DEFAULT_PORT, fsyncPolicy, listenAddresses, positiveInt, seconds
from kvtwist.server.factory import DEFAULT_MAX_CONNECTIONS, KVFactory
from kvtwist.server.listening import listeningService
from kvtwist.server.protocol import DEFAULT_MAX_REQUEST
from kvtwist.storage.datadir import DataDirLocked
from kvtwist.storage.durable import DurableService, DurableStore
from kvtwist.storage.fsync import DEFAULT_FSYNC
from kvtwist.storage.interface import IStore
from kvtwist.storage.journaled import openDirectory
from kvtwist.storage.memory import MemoryStore
from kvtwist.storage.recovery import RecoveryError


class Options(usage.Options):
    optParameters = [
        ["max-request", None, DEFAULT_MAX_REQUEST, "Longest request accepted, in bytes.", positiveInt("max-request")],
        ["max-connections", None, DEFAULT_MAX_CONNECTIONS, "Most connections served at once.", positiveInt("max-connections")],
        ["idle-timeout", None, 0.0, "Close connections idle for this many seconds.", seconds],
        ["data", "d", None, "Keep the data in this directory (journal and snapshots); without it, memory only."],
        ["fsync", None, DEFAULT_FSYNC, "With --data, when the journal is forced to disk: always, everysec or no.", fsyncPolicy],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []

    def opt_port(self, port: str) -> None:
        """Where to listen; repeat it to listen in several places. A bare port N listens on 127.0.0.1 and ::1 only; any Twisted server endpoint string works too: tcp:5000 (every interface), unix:/run/kv.sock, ssl:5443:privateKey=server.pem. [default: 5000]"""
        self["port"].extend(listenAddresses(port))

    opt_p = opt_port

    def postOptions(self) -> None:
        if not self["port"]:
            self["port"] = listenAddresses(DEFAULT_PORT)
        # Parse each description now, so that a typo or a missing certificate
        # is a usage error rather than a traceback at start-up.
        from twisted.internet import reactor

        for address in self["port"]:
            try:
                endpoints.serverFromString(reactor, address.endpointDescription)
            except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
                raise usage.UsageError(f"--port {address.description!r} is not a usable endpoint: {e}")


def makeService(config: Options, reactor: IReactorCore | None = None) -> service.IService:
    """Build the server from parsed options; tests pass a fake reactor."""
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[assignment]
    store: IStore
    durable: DurableService | None = None
    if config["data"]:
        try:
            opened = openDirectory(config["data"])
        except (DataDirLocked, RecoveryError) as e:
            raise SystemExit(f"kvstore: cannot start: {e}")
        except OSError as e:
            raise SystemExit(f"kvstore: cannot start: data directory {config['data']}: {e.strerror or e}")
        store = DurableStore(opened, config["fsync"], reactor)
        durable = DurableService(store)
    else:
        store = MemoryStore()
    factory = KVFactory(
        store,
        maxRequest=config["max-request"],
        maxConnections=config["max-connections"],
        idleTimeout=config["idle-timeout"],
    )
    # No authentication exists yet, so the listeners warn about every address
    # that other machines can reach.
    listening = listeningService(reactor, config["port"], factory, authenticated=False)
    if durable is None:
        return listening
    # MultiService stops its children in reverse order: stop listening
    # first, then flush and close the journal.
    top = service.MultiService()
    durable.setServiceParent(top)
    listening.setServiceParent(top)
    return top
