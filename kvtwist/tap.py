"""The ``kvstore`` twistd plugin: command-line options and the service they build."""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorCore
from twisted.python import usage

from kvtwist import compiled
from kvtwist.engines import DEFAULT_KEY_PREFIX, DEFAULT_STORE_TIMEOUT, EngineOptions, EngineURLError, announceEngine, openEngine
from kvtwist.server.arguments import (
    DEFAULT_PORT, dataDirectory, listenAddresses, metricsEndpoint, oneOf, passwordFile, positiveInt, seconds,
)
from kvtwist.server.factory import DEFAULT_MAX_CONNECTIONS, KVFactory
from kvtwist.server.listening import listeningService
from kvtwist.server.protocol import DEFAULT_MAX_REQUEST, DEFAULT_REQUEST_TIMEOUT
from kvtwist.server.reactorchoice import installUnlessChosen
from kvtwist.storage.datadir import DataDirLocked
from kvtwist.storage.durable import DurableService, DurableStore, announceStore
from kvtwist.storage.fsync import DEFAULT_FSYNC, FSYNC_POLICIES
from kvtwist.storage.interface import IRemoteStore, IStore
from kvtwist.storage.journaled import openDirectory
from kvtwist.storage.memory import MemoryStore
from kvtwist.storage.recovery import RecoveryError
from kvtwist.version import version


class Options(usage.Options):
    optFlags = [
        ["log-connections", None, "Log each connection's open and close, with why it closed (never each request)."],
    ]
    optParameters = [
        ["max-request", None, DEFAULT_MAX_REQUEST, "Longest request accepted, in bytes.", positiveInt("max-request")],
        ["max-connections", None, DEFAULT_MAX_CONNECTIONS, "Most connections served at once.", positiveInt("max-connections")],
        ["idle-timeout", None, 0.0, "Close connections that send no request for this many seconds.", seconds("idle-timeout")],
        ["request-timeout", None, DEFAULT_REQUEST_TIMEOUT, "Close a connection whose request is not complete this many seconds after its first byte (a TLS handshake too).", seconds("request-timeout")],
        ["password-file", None, None, "Require clients to send auth PASSWORD first, with the password on this file's one line.", passwordFile],
        ["max-keys", None, None, "Refuse puts of new keys once this many are stored (Error: store is full); without it, no limit.", positiveInt("max-keys")],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics and a health check at /healthz on this endpoint (e.g. tcp:9100:interface=127.0.0.1; a bare port means loopback). Needs the metrics extra.", metricsEndpoint],
        ["store", None, "memory", "Where the data lives: memory (this process; --data makes it durable), "
         "redis://[:PASSWORD@]HOST:PORT[/DB], rediss://... (TLS), redis-cluster://HOST:PORT[,HOST:PORT...] "
         "or etcd://HOST:PORT[,HOST:PORT...]. Many kvtwist nodes can share one engine. Needs the redis or etcd extra."],
        ["key-prefix", None, DEFAULT_KEY_PREFIX, "With a remote store, put this before every key, to share the engine with other applications."],
        ["store-timeout", None, DEFAULT_STORE_TIMEOUT, "With a remote store, answer a request the engine has not answered in this many seconds with Error: store unavailable (timeout).", seconds("store-timeout")],
        ["data", "d", None, "Keep the data in this directory (journal and snapshots); without it, memory only.",
         dataDirectory],
        # No default here, so that postOptions can tell a given --fsync from
        # none: it applies DEFAULT_FSYNC itself.
        ["fsync", None, None, f"With --data, when the journal is forced to disk: always, everysec or no. [default: {DEFAULT_FSYNC}]",
         oneOf("fsync", FSYNC_POLICIES, "always: no reply before its write is on disk; everysec: at most a second lost "
               "on power loss; no: the OS decides.")],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []

    def opt_version(self) -> None:
        """Print kvtwist's version and exit."""
        # usage.Options' own --version prints Twisted's; twistd itself only
        # sees a --version given before the plugin's name.
        print(f"kvtwist {version()}")
        raise SystemExit(0)

    def opt_port(self, port: str) -> None:
        """Where to listen; repeat it to listen in several places. A bare port N listens on 127.0.0.1 and ::1 only; any Twisted server endpoint string works too: tcp:5000 (every interface), unix:/run/kv.sock, ssl:5443:privateKey=server.pem. [default: 5000]"""
        self["port"].extend(listenAddresses(port))

    opt_p = opt_port

    def postOptions(self) -> None:
        # The reactor comes first: checking the options needs one. Unless
        # twistd was given --reactor, it is kvtwist's (kvtwist.server.reactor).
        reactor = installUnlessChosen()
        if self["fsync"] is None:
            self["fsync"] = DEFAULT_FSYNC
        elif not self["data"]:
            raise usage.UsageError("--fsync needs --data: without it the store is in memory and nothing is synced")
        if self["store"] != "memory":
            self._checkRemoteStore(reactor)
        if not self["port"]:
            self["port"] = listenAddresses(DEFAULT_PORT)
        # Parse each description now, so that a typo or a missing certificate
        # is a usage error rather than a traceback at start-up.
        for address in self["port"]:
            try:
                endpoints.serverFromString(reactor, address.endpointDescription)
            except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
                raise usage.UsageError(f"--port {address.description!r} is not a usable endpoint: {e}")


    def _checkRemoteStore(self, reactor: Any) -> None:
        """The options that cannot go with a remote store, and the URL itself, checked now rather than at start-up."""
        for option in ("data", "max-keys"):
            if self[option] is not None:
                raise usage.UsageError(
                    f"--{option} cannot be used with --store {self['store']}: "
                    + ("durability belongs to the engine (docs/scaling.md)" if option == "data"
                       else "a remote engine cannot count the keys under a prefix cheaply")
                )
        if self["store-timeout"] <= 0:
            raise usage.UsageError("--store-timeout must be more than 0")
        _openEngine(self, reactor)


def _openEngine(config: Options, reactor: Any) -> Any:
    """The remote engine the options name, or a usage error that says why not."""
    options = EngineOptions(keyPrefix=config["key-prefix"], timeout=config["store-timeout"])
    try:
        return openEngine(config["store"], options, reactor)
    except EngineURLError as e:
        raise usage.UsageError(f"--store {e}")
    except ImportError as e:
        extra = "etcd" if config["store"].startswith("etcd") else "redis"
        raise usage.UsageError(f"--store {config['store']} needs the {extra} extra ({e.name} is missing): pip install 'kvtwist[{extra}]'")


def makeService(config: Options, reactor: IReactorCore | None = None) -> service.IService:
    """Build the server from parsed options; tests pass a fake reactor."""
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[assignment]
    store: IStore | IRemoteStore
    durable: DurableService | None = None
    engine = None
    if config["store"] != "memory":
        engine = store = _openEngine(config, reactor)
    elif config["data"]:
        try:
            opened = openDirectory(config["data"], config["max-keys"])
        except (DataDirLocked, RecoveryError) as e:
            raise SystemExit(f"kvstore: cannot start: {e}")
        except OSError as e:
            raise SystemExit(f"kvstore: cannot start: data directory {config['data']}: {e.strerror or e}")
        store = DurableStore(opened, config["fsync"], reactor)
        durable = DurableService(store)
    else:
        # The compiled store where the extension is built (kvtwist.compiled), else the pure one.
        store = (compiled.CompiledStore or MemoryStore)(maxKeys=config["max-keys"])
    factory = KVFactory(
        store,
        maxRequest=config["max-request"],
        maxConnections=config["max-connections"],
        idleTimeout=config["idle-timeout"],
        requestTimeout=config["request-timeout"],
        password=config["password-file"],
        reactor=reactor,
        timing=config["metrics"] is not None,
        logConnections=bool(config["log-connections"]),
    )
    # Without a password the listeners warn about every address that other
    # machines can reach.
    listening = listeningService(
        reactor, config["port"], factory, authenticated=config["password-file"] is not None,
        announce=partial(announceEngine, engine) if engine is not None
        else partial(announceStore, durable.store) if durable is not None
        else partial(announceStore, None, compiledPath=isinstance(store, compiled.CompiledStore or ())),
    )
    if durable is None and engine is None and config["metrics"] is None:
        return listening
    # MultiService stops its children in reverse order: stop listening
    # first, then flush and close the journal, or the engine's connections.
    top = service.MultiService()
    if durable is not None:
        durable.setServiceParent(top)
    if engine is not None:
        engine.setServiceParent(top)
    listening.setServiceParent(top)
    if config["metrics"] is not None:
        # Imported only here: without --metrics nothing of it is loaded.
        from kvtwist.server.metrics import metricsService

        metricsService(
            reactor, config["metrics"], factory, None if durable is None else durable.store
        ).setServiceParent(top)
    return top

