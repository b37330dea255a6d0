"""
The servers under test: their addresses as the command line gives them.

A run checks one node, or several nodes that claim to share one store. The
command line names them as ``HOST:PORT`` each (``[ADDRESS]:PORT`` for an
IPv6 address), or, for one node, in the older form ``HOST PORT``. This
module turns those words into ``Node`` values, or says in one line what is
wrong with them. It has no Twisted imports: parsing is tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

#: How a usage error about addresses ends: what to write instead.
FORMS = "give HOST PORT for one node, or HOST:PORT for each node ([ADDRESS]:PORT for IPv6)"


class AddressError(ValueError):
    """Words that name no node; the message is one line for the user."""


@dataclass(frozen=True)
class Node:
    """One server to connect to: a host name, IPv4 or IPv6 address, and a TCP port."""

    host: str
    port: int

    @property
    def address(self) -> str:
        """``HOST:PORT``, with an IPv6 address in brackets, as the command line accepts it back."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parsePort(text: str) -> int:
    """A TCP port number from 1 to 65535, or ``AddressError``."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise AddressError(f"not a TCP port number (1 to 65535): {text!r}")
    return int(text)


def _checkHost(host: str, word: str) -> str:
    if not host or any(character.isspace() for character in host):
        raise AddressError(f"no host in {word!r}; {FORMS}")
    return host


def parseNode(word: str) -> Node:
    """
    One ``HOST:PORT`` or ``[ADDRESS]:PORT`` word.

    A bare IPv6 address with a port after its last colon (``::1:5000``) is
    refused rather than guessed at: ``::1:5000`` is itself a valid address.
    """
    if word.startswith("["):
        host, bracket, rest = word[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise AddressError(f"not [ADDRESS]:PORT: {word!r}; {FORMS}")
        if ":" not in host:
            raise AddressError(f"brackets are for IPv6 addresses only: {word!r}; {FORMS}")
        return Node(_checkHost(host, word), parsePort(rest[1:]))
    host, colon, port = word.rpartition(":")
    if not colon:
        raise AddressError(f"not HOST:PORT: {word!r}; {FORMS}")
    if ":" in host:
        raise AddressError(f"write an IPv6 address in brackets, as [ADDRESS]:PORT: {word!r}")
    return Node(_checkHost(host, word), parsePort(port))


def parseNodes(words: Sequence[str]) -> tuple[Node, ...]:
    """
    The nodes named by the command line's positional words.

    ``HOST PORT`` (two words, the second a bare number, the first not itself
    ``HOST:PORT``) is one node, as before nodes could be several; any other
    words must each be ``HOST:PORT``.
    """
    if not words:
        raise AddressError(f"no server given; {FORMS}")
    if len(words) == 2 and ":" not in words[1] and not _looksLikeNode(words[0]):
        return (Node(_checkHost(words[0], words[0]), parsePort(words[1])),)
    return tuple(parseNode(word) for word in words)


def _looksLikeNode(word: str) -> bool:
    """Whether ``word`` is written as one address with its port (and not as a bare IPv6 host)."""
    return word.startswith("[") or word.count(":") == 1
