"""
Scripted conversations: send these bytes, expect these reply lines.

A conformance check is a table of ``Exchange`` rows, read top to bottom,
in the style of Twisted's own protocol tests: adding a rule is adding a
row. ``runScript`` plays a script against the server over real connections
and turns the first mismatch into a failure that shows the whole exchange.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from kvtwist.check.probe import Probe, Transcript
from kvtwist.check.report import CheckResult, failed, passed
from kvtwist.check.target import Target


@dataclass(frozen=True)
class Expect:
    """A rule one reply line must follow, and how to say it in a report."""

    description: str
    test: Callable[[bytes], bool]


def reply(text: str) -> Expect:
    """Exactly this line."""
    wanted = text.encode()
    return Expect(repr(text), lambda line: line == wanted)


ANY = Expect("any reply", lambda line: True)


def oneOf(*texts: str) -> Expect:
    """Any one of these lines."""
    wanted = {text.encode() for text in texts}
    return Expect(" or ".join(map(repr, texts)), lambda line: line in wanted)


def error(hiding: bytes = b"\x1b") -> Expect:
    """
    A line starting ``Error: `` that does not contain ``hiding``.

    Error texts must never echo the client's bytes; the escape byte is
    always hidden-checked, since an echoed escape sequence reaches
    someone's terminal.
    """
    shown = "" if hiding == b"\x1b" else f" without {hiding!r}"
    return Expect(
        f"a line starting 'Error: '{shown}",
        lambda line: line.startswith(b"Error: ") and hiding not in line and b"\x1b" not in line,
    )


@dataclass(frozen=True)
class Exchange:
    """
    One write and what must come back for it.

    ``connection`` numbers the connection to use (opened on first use), so
    a script can check that one client sees what another did. ``until``
    is the lenient form for input the protocol's basic rules say nothing about: any
    lines may come first, but then this line must (the connection still
    works). ``closes`` says the server must close after the replies.
    """

    send: bytes
    expect: tuple[Expect, ...] = ()
    closes: bool = False
    until: bytes | None = None
    connection: int = 0


def ask(request: str, *expect: Expect, closes: bool = False, connection: int = 0) -> Exchange:
    """A single request line, sent with LF."""
    return Exchange(request.encode() + b"\n", expect, closes, connection=connection)


@dataclass(frozen=True)
class Script:
    """A named conformance check: what it proves, and its exchanges."""

    name: str
    proves: str
    exchanges: tuple[Exchange, ...]


async def runScript(target: Target, group: str, script: Script) -> CheckResult:
    """
    Play ``script``; pass if every reply matched, else fail with the transcript.

    Under the basic profile a CR before the LF of a reply is tolerated
    (the protocol's basic rules do not say how replies end); under the kvtwist profile
    every reply must end in a bare LF.
    """
    transcript = Transcript()
    probes: dict[int, Probe] = {}
    timeout = target.settings.timeout

    def verdict(problem: str | None) -> CheckResult:
        if problem is None:
            return passed(group, script.name, script.proves)
        return failed(group, script.name, problem, transcript.lines())

    def normal(line: bytes) -> bytes:
        if not target.strict and line.endswith(b"\r"):
            return line[:-1]
        return line

    def missing(probe: Probe, wanted: str) -> str:
        what = "the server closed the connection" if probe.closed else f"no reply within {timeout:g} s"
        return f"expected {wanted}, but {what}"

    try:
        for exchange in script.exchanges:
            probe = probes.get(exchange.connection)
            if probe is None:
                name = f"connection {exchange.connection + 1}"
                try:
                    probe = probes[exchange.connection] = await target.probe(name, transcript)
                except Exception as e:
                    return verdict(f"could not open {name}: {e}")
            probe.send(exchange.send)
            if exchange.until is not None:
                while True:
                    line = await probe.nextLine(timeout)
                    if line is None:
                        return verdict(missing(probe, f"{exchange.until.decode()!r} eventually"))
                    if normal(line) == exchange.until:
                        break
            requests = re.split(rb"[\n\0]", exchange.send)
            for number, expect in enumerate(exchange.expect):
                # Name the request when one write holds many.
                to = f" to request {number + 1} ({requests[number]!r})" if len(exchange.expect) > 1 else ""
                line = await probe.nextLine(timeout)
                if line is None:
                    return verdict(missing(probe, expect.description + to))
                if not expect.test(normal(line)):
                    return verdict(f"expected {expect.description}{to}, got {line!r}")
            if exchange.closes and not await probe.waitClosed(timeout):
                return verdict(f"expected the server to close the connection within {timeout:g} s")
        return verdict(None)
    finally:
        for probe in probes.values():
            probe.close()
