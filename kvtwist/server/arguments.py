"""Parsing the kvstore plugin's command-line values: each coercer gives a one-line usage error."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.python import usage


DEFAULT_PORT = "5000"
# Twisted's default backlog of 50 overflows when hundreds of clients connect
# at once: the kernel drops their SYNs and they retry a second or more later.
# 511 is what Redis and nginx use; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 511
# A Unix socket is otherwise created 666, open to every local user, and the
# server has no authentication.
UNIX_SOCKET_MODE = "600"
_TAKES_BACKLOG = ("tcp", "tcp6", "unix", "ssl")


@dataclass(frozen=True)
class ListenAddress:
    """One place to listen, as ``--port`` asked for it."""

    # A Twisted server endpoint description, as the user gave it (a bare port
    # spelt out); messages quote it.
    description: str
    # The ::1 half of a bare port: a machine without IPv6 has no such
    # address, which is no reason not to serve on 127.0.0.1.
    skipIfUnavailable: bool = False

    @property
    def endpointDescription(self) -> str:
        """The description to listen with: ``description`` plus kvtwist's defaults."""
        return withServerDefaults(self.description)


def listenAddresses(port: str) -> list[ListenAddress]:
    """
    Where one ``--port`` value asks to listen.

    A bare number N is what people type for a quick server, so it means
    loopback only, 127.0.0.1 and ::1: the server has no authentication, and
    being reachable from other machines has to be asked for (``tcp:N``).
    Anything else is a Twisted server endpoint description.
    """
    port = port.strip()
    if not (port.isascii() and port.isdigit()):
        return [ListenAddress(port)]
    number = int(port)
    if number > 65535:
        raise usage.UsageError(f"--port {port} is not a port number (0 to 65535)")
    return [
        ListenAddress(f"tcp:{number}:interface=127.0.0.1"),
        ListenAddress(f"tcp6:{number}:interface=\\:\\:1", skipIfUnavailable=True),
    ]


def withServerDefaults(description: str) -> str:
    """
    ``description`` with the safe defaults it does not override.

    A listen backlog of ``LISTEN_BACKLOG`` for the endpoint types that take
    one, and mode ``UNIX_SOCKET_MODE`` (octal, as Twisted's ``mode=`` reads
    it) for a Unix socket.
    """
    fields = _fields(description)
    given = {_keyword(field) for field in fields[1:]}
    kind = fields[0].lower()
    defaults = []
    if kind in _TAKES_BACKLOG and "backlog" not in given:
        defaults.append(f"backlog={LISTEN_BACKLOG}")
    if kind == "unix" and "mode" not in given:
        defaults.append(f"mode={UNIX_SOCKET_MODE}")
    return ":".join([description, *defaults])


def _fields(description: str) -> list[str]:
    """Split an endpoint description at its colons; a backslash escapes the next character."""
    fields, current, chars = [], "", iter(description)
    for char in chars:
        if char == "\\":
            current += char + next(chars, "")
        elif char == ":":
            fields.append(current)
            current = ""
        else:
            current += char
    fields.append(current)
    return fields


def _keyword(field: str) -> str | None:
    """The name of a ``name=value`` field, or None for a positional one."""
    escaped = False
    for i, char in enumerate(field):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "=":
            return field[:i]
    return None


def positiveInt(what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise usage.UsageError(f"--{what} must be a whole number, not {text!r}")
        if value < 1:
            raise usage.UsageError(f"--{what} must be at least 1")
        return value

    parse.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]
    return parse


def seconds(what: str) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise usage.UsageError(f"--{what} must be a number of seconds, not {text!r}")
        if not value >= 0 or value == float("inf"):
            raise usage.UsageError(f"--{what} must be 0 (never) or a positive number of seconds")
        return value

    parse.coerceDoc = "Seconds; 0 means never."  # type: ignore[attr-defined]
    return parse


# What the protocol splits requests at: a password holding one could never be sent.
_NOT_IN_PASSWORDS = re.compile(rb"[\s\0]")


def passwordFile(path: str) -> bytes:
    """The password in the file ``path``: its first line, which must be all there is."""
    try:
        with open(path, "rb") as f:
            content = f.read(4096 + 3)
    except OSError as e:
        raise usage.UsageError(f"--password-file {path}: {e.strerror or e}")
    password = content[:-1] if content.endswith(b"\n") else content
    password = password[:-1] if password.endswith(b"\r") else password
    if not password:
        raise usage.UsageError(f"--password-file {path} is empty")
    if _NOT_IN_PASSWORDS.search(password) or len(password) > 4096:
        raise usage.UsageError(
            f"--password-file {path}: the password must be one line of at most 4096 bytes with no spaces, tabs or NULs"
        )
    return password


passwordFile.coerceDoc = "Its one line is the password clients send with auth."  # type: ignore[attr-defined]


def dataDirectory(path: str) -> str:
    """
    ``path`` for ``--data``, refused when it, or the first of its parents that exists, is not a directory.

    A directory that does not exist yet is fine: the server creates it and
    its missing parents. Anything else would fail later as ``File exists``,
    which names neither the option nor the problem.
    """
    given = found = os.path.abspath(path)
    while not os.path.exists(found) and os.path.dirname(found) != found:
        found = os.path.dirname(found)
    if os.path.isdir(found):
        return path
    what = "a file, not a directory" if os.path.isfile(found) else "not a directory"
    raise usage.UsageError(f"--data {path} is {what}" if found == given else f"--data {path}: {found} is {what}")


def oneOf(what: str, choices: Sequence[str], doc: str) -> Any:
    def parse(text: str) -> str:
        if text not in choices:
            raise usage.UsageError(f"--{what} must be one of {', '.join(choices)}, not {text!r}")
        return text

    parse.coerceDoc = doc  # type: ignore[attr-defined]
    return parse


def metricsEndpoint(text: str) -> str:
    """The endpoint for ``--metrics``: a bare port means loopback, like ``--port``; the extra must be installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise usage.UsageError("--metrics needs prometheus-client: pip install 'kvtwist[metrics]'")
    description = text.strip()
    if description.isascii() and description.isdigit():
        description = f"tcp:{description}:interface=127.0.0.1"
    return description


metricsEndpoint.coerceDoc = "A port number or a server endpoint string."  # type: ignore[attr-defined]
