"""
The ``kvtwist-check`` command.

It runs every check against ``HOST PORT``, or against the nodes
``HOST:PORT HOST:PORT ...`` that claim to share one store, on the Twisted
reactor, prints progress on stderr while it works, and then the report on
stdout. Exit status: 0 when every check passed, 1 when any failed, 2 for a
usage error (one line on stderr) or a server that cannot be reached at all.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import IO, Any, NoReturn, Sequence, TextIO

from twisted.internet.task import react
from twisted.python import usage

from kvtwist.check.nodes import AddressError, parseNodes
from kvtwist.check.report import allPassed, renderJSON, renderText
from kvtwist.check.runner import runChecks
from kvtwist.check.target import BASIC, DEPRECATED_PROFILES, KVTWIST, PROFILES, Settings, Target
from kvtwist.client import KVClient
from kvtwist.server.arguments import passwordFile
from kvtwist.server.protocol import DEFAULT_MAX_REQUEST
from kvtwist.version import version

#: What a kvtwist server started with --password-file answers before ``auth``.
AUTH_REQUIRED = "Error: authentication required"

PROGRAM = "kvtwist-check"


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
        return value

    return parse


def _profile(text: str) -> str:
    """A profile name; an old name becomes its new one, with a warning, so old scripts keep working."""
    new = DEPRECATED_PROFILES.get(text)
    if new is None:
        return text
    print(f"{PROGRAM}: warning: --profile {text} is the old name of --profile {new}", file=sys.stderr)
    return new


PROFILE_HELP = (
    f"which rules to hold the server to. {BASIC} (default): the rules any server of this protocol must follow: "
    "the fixed replies, pipelined replies in order, CRLF requests, and any reply to undefined input as long as "
    f"the connection keeps working. {KVTWIST}: also kvtwist's stricter documented rules (docs/protocol.md): "
    "verbs in any case, tabs, exact 64-bit integers, 'Error: ' replies, NUL and blank requests, the request "
    f"limit, bare LF reply endings. ({', '.join(DEPRECATED_PROFILES)} is an old name of {BASIC}.)"
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, status 2, with where to look next."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


NODES_HELP = (
    "the server as HOST PORT; or several nodes that share one store, as HOST:PORT each ([ADDRESS]:PORT for "
    "IPv6; HOST:PORT alone for one node). Single-connection checks run against the first node; the visibility "
    "and concurrency checks spread their clients over all nodes round-robin and check the whole history as one"
)


def parser() -> argparse.ArgumentParser:
    arguments = _Parser(
        prog=PROGRAM,
        description="Check that a key-value server speaking the kvtwist protocol conforms to it "
        "and behaves as one atomic store shared by concurrent clients.",
        epilog="Exit status: 0 all checks passed, 1 a check failed, 2 usage error or server unreachable. "
        "The checker writes and deletes keys: do not point it at data you need.",
    )
    arguments.add_argument("--version", action="version", version=f"kvtwist {version()}")
    arguments.add_argument("nodes", nargs="+", metavar="NODE", help=NODES_HELP)
    arguments.add_argument("--clients", type=_positive(int), default=50, help="concurrent clients (default 50)")
    arguments.add_argument(
        "--duration", type=_positive(float), default=10.0, help="seconds of concurrent workload (default 10)"
    )
    arguments.add_argument("--keys", type=_positive(int), default=8, help="shared keys in the workload (default 8)")
    arguments.add_argument("--seed", type=int, help="seed for every random choice (default: a random one, reported)")
    arguments.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON to FILE")
    arguments.add_argument(
        "--profile", type=_profile, choices=PROFILES, default=BASIC, help=PROFILE_HELP,
    )
    arguments.add_argument(
        "--timeout", type=_positive(float), default=5.0,
        help="seconds a reply may take before it counts as missing (default 5)",
    )
    arguments.add_argument(
        "--max-request", type=_positive(int), default=DEFAULT_MAX_REQUEST, metavar="BYTES",
        help=f"the server's request limit, for the kvtwist profile's too-long check (default {DEFAULT_MAX_REQUEST}, "
        "kvtwist's default)",
    )
    arguments.add_argument(
        "--password-file", type=Path, metavar="FILE",
        help="for a server started with --password-file: every connection first sends auth with the password "
        "on this file's one line (it never appears in the report)",
    )
    return arguments


def _readPassword(path: Path) -> bytes:
    """The password in ``path``, by the server's own rules for its --password-file; a usage error if it breaks them."""
    try:
        return passwordFile(str(path))
    except usage.UsageError as e:
        parser().error(str(e))


class JSONReport:
    """
    The ``--json`` file, opened before the run so that a path that cannot be
    written is a usage error at once, not a traceback after minutes of checks.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._existed = path.exists()
        self._file: IO[str] | None = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        """Replace the file's content with ``text``."""
        assert self._file is not None
        try:
            self._file.truncate(0)
        except OSError:
            pass  # not a regular file (a pipe, /dev/stdout): nothing to truncate
        self._file.write(text)
        self._file.close()
        self._file = None

    def discard(self) -> None:
        """No report after all (the server could not be checked): leave no empty file behind."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if not self._existed:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def openReport(path: Path | None) -> JSONReport | None:
    """The ``--json`` file ready to write, or exit with status 2 and one line if it cannot be."""
    if path is None:
        return None
    try:
        return JSONReport(path)
    except OSError as e:
        print(f"{PROGRAM}: cannot write the JSON report to {path}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(2) from None


def parseSettings(argv: Sequence[str]) -> tuple[Settings, Path | None]:
    """The run's settings and the JSON path; exits with status 2 on a usage error."""
    arguments = parser()
    # Intermixed: options may come between the nodes, as between HOST and PORT before.
    options = arguments.parse_intermixed_args(argv)
    try:
        nodes = parseNodes(options.nodes)
    except AddressError as e:
        arguments.error(str(e))
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(10**6)
    settings = Settings(
        nodes=nodes,
        clients=options.clients,
        duration=options.duration,
        keys=options.keys,
        seed=seed,
        profile=options.profile,
        timeout=options.timeout,
        maxRequest=options.max_request,
        password=None if options.password_file is None else _readPassword(options.password_file),
    )
    return settings, options.json


def _progress(stream: TextIO) -> Any:
    started = time.monotonic()

    def show(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", file=stream, flush=True)

    return show


async def run(
    reactor: Any, settings: Settings, report: JSONReport | None, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Run every check and print the report; the exit status."""
    try:
        return await _run(reactor, settings, report, out, err)
    finally:
        if report is not None:
            report.discard()


async def _run(reactor: Any, settings: Settings, report: JSONReport | None, out: TextIO, err: TextIO) -> int:
    target = Target(reactor, settings, _progress(err))
    reachable = await _reachable(reactor, target, err)
    if not reachable:
        return 2
    target.progress(f"checking {target.description} with profile {settings.profile}, seed {settings.seed}")
    notes = _nodeNotes(target)
    for line in notes:
        target.progress(line.strip())
    results = await runChecks(target)
    out.write(renderText(target.description, settings.shown(), results, notes))
    if report is not None:
        report.write(renderJSON(target.description, settings.shown(), results))
    return 0 if allPassed(results) else 1


async def _reachable(reactor: Any, target: Target, err: TextIO) -> bool:
    """Whether every node accepts a connection and, without --password-file, wants no password (else one line)."""
    settings = target.settings
    seen = set()
    for index, node in enumerate(target.nodes):
        if node in seen:
            continue
        seen.add(node)
        try:
            client = await target.client(index)
        except Exception as e:
            print(f"{PROGRAM}: cannot connect to {node.address}: {e}", file=err)
            return False
        if settings.password is None and await _wantsPassword(reactor, client, settings.timeout):
            print(
                f"{PROGRAM}: {node.address} requires a password (it answers 'Error: authentication required'): "
                "give it with --password-file FILE",
                file=err,
            )
            return False
        client.connection.loseConnection()
    return True


def _nodeNotes(target: Target) -> list[str]:
    """With several nodes: which checks ran where (the report's header says so)."""
    if len(target.nodes) == 1:
        return []
    return [
        f"  conformance, serving and robustness: the first node, {target.address}; "
        f"visibility and concurrency: clients spread round-robin over all {len(target.nodes)} nodes, "
        "one history checked as one store"
    ]


async def _wantsPassword(reactor: Any, client: KVClient, timeout: float) -> bool:
    """Whether the server refuses a harmless read until the client authenticates (kvtwist's --password-file)."""
    try:
        reply = await client.request("get 1").addTimeout(timeout, reactor)
    except Exception:
        # Silence or a lost connection: the checks will say what is wrong.
        return False
    if reply == AUTH_REQUIRED:
        client.connection.loseConnection()
        return True
    return False


def main(argv: Sequence[str] | None = None) -> NoReturn:
    settings, jsonPath = parseSettings(sys.argv[1:] if argv is None else argv)
    report = openReport(jsonPath)

    async def checked(reactor: Any) -> None:
        raise SystemExit(await run(reactor, settings, report))

    react(checked)
