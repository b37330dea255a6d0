"""
The Redis engine: ``--store redis://[[USER]:PASSWORD@]HOST:PORT[/DB]``, or
``rediss://...`` for TLS.

Each request is one atomic Redis command on the key ``<prefix><key>``:
``put`` is ``SET key value NX``, ``get`` is ``GET``, ``del`` is ``DEL``;
values are canonical decimal strings. A chunk's commands go to Redis in one
pipelined write, so a chunk costs one round trip. Where the compiled path
is built (``kvtwist.compiled.respPath``), a chunk's commands are written
and its replies read at C level; the Python functions here are the
reference, and judge every reply the compiled path is not sure about.

TLS is verified against the platform's trusted CAs, or against the
certificates in ``?ca=PATH`` (a PEM file, for a self-signed server). A
server that asks for client certificates gets the one in ``?cert=PATH``
(a PEM file holding the certificate and its key). A password in the URL
may be percent-encoded, and never appears in the logs.
"""

from __future__ import annotations

import re
from functools import partial
from types import ModuleType
from typing import Any, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from kvtwist.compiled import respPath
from kvtwist.engines import EngineOptions, EngineURLError
from kvtwist.engines.redisnode import RedisNode, ReplyError
from kvtwist.storage.interface import (
    DELETE,
    GET,
    PUT,
    EngineStats,
    Operation,
    Outcome,
    StoreError,
    StoreReadOnly,
    StoreUnavailable,
)

_MIN = -(2**63)
_MAX = 2**63 - 1
_URL_FORM = "redis://[[USER]:PASSWORD@]HOST:PORT[/DB] or rediss://...[?ca=PATH][&cert=PATH]"
_DB = re.compile(r"[0-9]{1,9}")


class RedisStore(Service):
    """An ``IRemoteStore`` whose data lives in one Redis server (or a replicated primary)."""

    def __init__(
        self,
        node: RedisNode,
        stats: EngineStats,
        description: str,
        keyPrefix: str,
        *,
        compiled: ModuleType | None,
    ) -> None:
        """``compiled`` is ``kvtwist.compiled.respPath``, or None for the Python path alone."""
        self.node = node
        # Shared with the node, which records latency and unavailability in it.
        self.stats = stats
        self._description = description
        self._prefix = keyPrefix.encode()
        self._encoder = CommandEncoder(self._prefix)
        # The compiled RESP path this store takes, or None.
        self.compiled = compiled

    def startService(self) -> None:
        super().startService()
        self.node.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.node.stopService()

    def describe(self) -> str:
        return self._description

    def execute(self, operations: Sequence[Operation]) -> Deferred[list[Outcome]]:
        """Run the chunk as one pipeline of one command per operation; see ``IRemoteStore``."""
        self.stats.operations += len(operations)
        compiled = self.compiled
        if compiled is not None:
            pipeline = compiled.encodeCommands(operations, self._prefix)
        else:
            pipeline = b"".join(self._encoder.encode(operations))
        return self.node.sendEncoded(pipeline, len(operations), partial(self._outcomes, operations))

    def _outcomes(self, operations: Sequence[Operation], replies: list[object]) -> list[Outcome]:
        compiled = self.compiled
        if compiled is not None:
            outcomes: list[Outcome] | None = compiled.decodeOutcomes(operations, replies)
            if outcomes is not None:
                return outcomes
        stats = self.stats
        return [outcomeOf(operation, reply, stats) for operation, reply in zip(operations, replies)]


def commandFor(operation: Operation, name: bytes) -> tuple[bytes, ...]:
    """The one Redis command that is ``operation`` on the key called ``name``: one atomic step."""
    command = operation.command
    if command == PUT:
        return (b"SET", name, b"%d" % operation.value, b"NX")
    if command == GET:
        return (b"GET", name)
    if command == DELETE:
        return (b"DEL", name)
    raise ValueError(f"unknown operation {operation!r}")


class CommandEncoder:
    """
    The RESP bytes of each operation's command (what ``encodeCommands``
    makes of ``commandFor``), from templates that hold the key prefix: one
    formatting per operation instead of one per argument.
    """

    def __init__(self, prefix: bytes) -> None:
        # The prefix goes into %-templates, so its own % signs are escaped.
        key = b"$%d\r\n" + prefix.replace(b"%", b"%%") + b"%b\r\n"
        self._prefixLength = len(prefix)
        self._get = b"*2\r\n$3\r\nGET\r\n" + key
        self._delete = b"*2\r\n$3\r\nDEL\r\n" + key
        self._put = b"*4\r\n$3\r\nSET\r\n" + key + b"$%d\r\n%b\r\n$2\r\nNX\r\n"

    def encode(self, operations: Sequence[Operation]) -> list[bytes]:
        """One encoded command per operation, in order; ValueError for an unknown command."""
        get, put, delete, length = self._get, self._put, self._delete, self._prefixLength
        encoded: list[bytes] = []
        append = encoded.append
        for operation in operations:
            command, key, value = operation
            digits = b"%d" % key
            if command == GET:
                append(get % (length + len(digits), digits))
            elif command == PUT:
                valueDigits = b"%d" % value
                append(put % (length + len(digits), digits, len(valueDigits), valueDigits))
            elif command == DELETE:
                append(delete % (length + len(digits), digits))
            else:
                raise ValueError(f"unknown operation {operation!r}")
        return encoded


def outcomeOf(operation: Operation, reply: object, stats: EngineStats) -> Outcome:
    """
    What Redis's reply (or the node's StoreUnavailable) says about
    ``operation``; failures are counted in ``stats``. A stored value must be
    what kvtwist writes, a canonical 64-bit decimal. A cluster handles its
    redirects before it asks this.
    """
    command = operation.command
    if command == GET:
        if reply is None:
            return None
        if type(reply) is bytes:
            try:
                value = int(reply)
            except ValueError:
                value = _MAX + 1
            if _MIN <= value <= _MAX and b"%d" % value == reply:
                return value
            stats.failed("bad value")
            return StoreError(f"the store holds a value for key {operation.key} that is not a 64-bit integer")
    elif command == PUT:
        if reply == b"OK":
            return True
        if reply is None:
            return False
    elif type(reply) is int:
        return reply > 0
    if isinstance(reply, StoreUnavailable):
        stats.failed(reply.reason)
        return reply
    if isinstance(reply, ReplyError):
        text = " ".join(str(reply).split())
        code = text.split(" ", 1)[0]
        stats.failed(f"redis {code}")
        if code == "READONLY":
            return StoreReadOnly(f"store is read-only ({text})")
        return StoreError(f"store refused the request ({text})")
    stats.failed("unexpected reply")
    return StoreError(f"store gave an unexpected reply {str(reply)[:40]!r}")


def fromURL(url: str, options: EngineOptions, reactor: Any) -> RedisStore:
    """The ``RedisStore`` a ``redis://`` or ``rediss://`` URL names; ``EngineURLError`` says what is wrong with one."""
    try:
        parts = urlsplit(url)
        port = parts.port
        hostname = parts.hostname
    except ValueError as e:
        raise EngineURLError(f"{_redacted(url)}: {e}; expected {_URL_FORM}") from None
    tls = parts.scheme == "rediss"
    if parts.scheme not in ("redis", "rediss"):
        raise EngineURLError(f"{_redacted(url)}: not a Redis URL; expected {_URL_FORM}")
    if not hostname:
        raise EngineURLError(f"{_redacted(url)}: no host; expected {_URL_FORM}")
    if port is None:
        raise EngineURLError(f"{_redacted(url)}: no port (Redis listens on 6379 by default); expected {_URL_FORM}")
    if port == 0:
        raise EngineURLError(f"{_redacted(url)}: port 0 is not a port Redis can listen on")
    if parts.fragment:
        raise EngineURLError(f"{_redacted(url)}: a Redis URL has no #fragment")
    db = 0
    path = parts.path
    if path not in ("", "/"):
        if not _DB.fullmatch(path[1:]):
            raise EngineURLError(f"{_redacted(url)}: the database after / must be a number such as 0 or 1, not {path[1:]!r}")
        db = int(path[1:])
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and password is None:
        raise EngineURLError(f"{_redacted(url)}: user {username!r} has no password; write redis://USER:PASSWORD@HOST:PORT")
    if password == "":
        raise EngineURLError(f"{_redacted(url)}: the password after : is empty")
    query: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise EngineURLError(f"{_redacted(url)}: cannot read the query {parts.query!r}; expected ?ca=PATH&cert=PATH") from None
    for name, value in pairs:
        if name not in ("ca", "cert"):
            raise EngineURLError(f"{_redacted(url)}: unknown parameter {name!r}; a rediss:// URL takes ca=PATH and cert=PATH")
        if not tls:
            raise EngineURLError(f"{_redacted(url)}: {name}= is for TLS; write rediss:// to use TLS")
        if name in query:
            raise EngineURLError(f"{_redacted(url)}: {name}= is given twice")
        if not value:
            raise EngineURLError(f"{_redacted(url)}: {name}= needs a file name")
        query[name] = value
    tlsOptions = _tlsOptions(url, hostname, query.get("ca"), query.get("cert")) if tls else None
    stats = EngineStats()
    node = RedisNode(hostname, port, options, reactor, stats, db=db, username=username, password=password, tlsOptions=tlsOptions)
    return RedisStore(node, stats, _redacted(url), options.keyPrefix, compiled=respPath)


def _redacted(url: str) -> str:
    """``url`` with any password replaced by ``***``: for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    if not slash:
        authority, question, tail = rest.partition("?")
        slash = question
    credentials, at, hostport = authority.rpartition("@")
    if not at:
        return url
    user, colon, _ = credentials.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{hostport}{slash}{tail}"


def _tlsOptions(url: str, hostname: str, ca: str | None, cert: str | None) -> object:
    from twisted.internet import ssl

    trustRoot: Any = None
    if ca is not None:
        try:
            pem = open(ca, "rb").read()
        except OSError as e:
            raise EngineURLError(f"{_redacted(url)}: cannot read the CA file: {e.strerror}: {ca}") from None
        blocks = [b"-----BEGIN CERTIFICATE-----" + block for block in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
        try:
            certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
        except Exception:
            certificates = []
        if not certificates:
            raise EngineURLError(f"{_redacted(url)}: the CA file holds no PEM certificate: {ca}")
        trustRoot = ssl.trustRootFromCertificates(certificates)
    clientCertificate: Any = None
    if cert is not None:
        try:
            clientCertificate = ssl.PrivateCertificate.loadPEM(open(cert, "rb").read())
        except OSError as e:
            raise EngineURLError(f"{_redacted(url)}: cannot read the client certificate: {e.strerror}: {cert}") from None
        except Exception:
            raise EngineURLError(f"{_redacted(url)}: cert= needs one PEM file with a certificate and its key: {cert}") from None
    return ssl.optionsForClientTLS(hostname, trustRoot=trustRoot, clientCertificate=clientCertificate)
