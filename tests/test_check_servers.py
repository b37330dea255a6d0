"""
kvtwist-check end to end: the installed console script against real servers.

kvtwist itself must pass both profiles; each deliberately broken server in
``brokenservers`` must fail the checks that its bug violates; a correct
server with its own error texts must pass the basic profile; a server of
another protocol (redis) must fail, linearizability included.

Several nodes: two servers that do not share a store must fail as one
store, one server named twice must pass, and a server whose store is
sometimes unavailable (``Error: `` replies of unknown outcome) must pass
with its indeterminate operations counted.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from brokenservers import brokenServer
from serverproc import ServerProcess, start_server

from kvtwist.check import workload

CHECKER = str(Path(sys.executable).with_name("kvtwist-check"))
# Short runs: a second of workload is thousands of operations, plenty to
# catch these bugs; a short timeout keeps the stalling servers quick.
QUICK = ["--clients", "20", "--duration", "1", "--timeout", "2", "--seed", "7"]


def check(host: str, port: int, tmp_path: Path, *options: str) -> tuple[int, dict[str, Any], str, str]:
    """Run the console script on ``HOST PORT``; its exit status, JSON report, stdout and stderr."""
    return checkNodes([host, str(port)], tmp_path, *options)


def checkNodes(nodes: list[str], tmp_path: Path, *options: str) -> tuple[int, dict[str, Any], str, str]:
    """Run the console script on the words ``nodes``; its exit status, JSON report, stdout and stderr."""
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    done = subprocess.run(
        [CHECKER, *nodes, "--json", str(report), *options],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    document = json.loads(report.read_text()) if report.exists() else {}
    return done.returncode, document, done.stdout, done.stderr


def entry(document: dict[str, Any], title: str) -> dict[str, Any]:
    """The JSON report's entry for the check named ``title``."""
    return next(check for check in document["checks"] if check["title"] == title)


def verdicts(document: dict[str, Any]) -> dict[str, bool]:
    return {entry["title"]: entry["passed"] for entry in document["checks"]}


@pytest.mark.parametrize("profile", ["basic", "kvtwist"])
def test_kvtwistPasses(kvserver: ServerProcess, tmp_path: Path, profile: str) -> None:
    """The real server, the default 50 clients: every check passes, exit status 0."""
    status, document, out, err = check(
        kvserver.host, kvserver.port, tmp_path, "--profile", profile, "--duration", "2"
    )
    assert status == 0, out + err
    assert document["passed"] is True
    titles = verdicts(document)
    assert all(titles.values())
    assert "concurrency: linearizability" in titles
    assert ("conformance: error replies" in titles) == (profile == "kvtwist")
    assert "12 checks: all passed" in out or "21 checks: all passed" in out
    # Progress goes to stderr while it runs.
    assert "concurrency:" in err and "PASS" in err


@pytest.mark.parametrize(
    "name, mustFail",
    [
        ("overwrite", {"conformance: sample session", "concurrency: linearizability"}),
        ("lossy", {"concurrency: linearizability"}),
        ("per-client", {"concurrency: cross-client visibility", "concurrency: linearizability"}),
        ("one-at-a-time", {"serving at the same time: an idle client", "serving at the same time: a half-sent request"}),
        ("reorder", {"conformance: 1050 pipelined requests"}),
    ],
)
def test_brokenServerIsCaught(tmp_path: Path, name: str, mustFail: set[str]) -> None:
    with brokenServer(name) as (host, port):
        status, document, out, err = check(host, port, tmp_path, *QUICK)
    assert status == 1, out + err
    failing = {title for title, ok in verdicts(document).items() if not ok}
    assert mustFail <= failing, out


def test_correctServerWithOtherErrorTextsPassesTheBasicProfile(tmp_path: Path) -> None:
    with brokenServer("correct") as (host, port):
        status, document, out, err = check(host, port, tmp_path, *QUICK)
        assert status == 0, out + err
        assert all(verdicts(document).values())
        # The stricter profile notices the error texts and the lenient numbers.
        status, document, out, err = check(host, port, tmp_path, *QUICK, "--profile", "kvtwist")
    assert status == 1
    failing = {title for title, ok in verdicts(document).items() if not ok}
    assert {"conformance: error replies", "conformance: malformed integers"} <= failing
    assert "concurrency: linearizability" not in failing


def test_theTooLongCheckFollowsTheServersLimit(tmp_path: Path) -> None:
    """A server whose limit is above the checker's default request takes it; --max-request tells the checker."""
    server = start_server("--max-request", "20000")
    try:
        options = (*QUICK, "--profile", "kvtwist")
        status, document, out, err = check(server.host, server.port, tmp_path, *options)
        assert status == 1
        assert {title for title, ok in verdicts(document).items() if not ok} == {"conformance: request too long"}
        status, document, out, err = check(server.host, server.port, tmp_path, *options, "--max-request", "20000")
        assert status == 0, out + err
        assert document["settings"]["max_request"] == 20000
    finally:
        server.stop()


def test_failureShowsTheExactExchange(tmp_path: Path) -> None:
    with brokenServer("overwrite") as (host, port):
        status, document, out, err = check(host, port, tmp_path, *QUICK)
    sample = next(entry for entry in document["checks"] if entry["title"] == "conformance: sample session")
    assert sample["summary"] == "expected 'Key already exists', got b'OK'"
    assert "connection 1: sent     b'put 1 3\\n'" in sample["evidence"]
    assert sample["evidence"][-1] == "connection 1: received b'OK\\n'"
    assert "FAIL  conformance: sample session" in out
    linear = next(entry for entry in document["checks"] if entry["title"] == "concurrency: linearizability")
    witness = [line for line in linear["evidence"] if "'put " in line and "-> 'OK'" in line]
    assert len(witness) >= 2, linear["evidence"]


def freePort() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachableServerIsStatusTwoWithOneLine(tmp_path: Path) -> None:
    status, document, out, err = check("127.0.0.1", freePort(), tmp_path)
    assert status == 2
    assert document == {} and out == ""
    assert err.count("\n") == 1 and "cannot connect to 127.0.0.1:" in err


@pytest.mark.parametrize(
    "arguments, says",
    [([], "NODE"), (["127.0.0.1"], "'127.0.0.1'"), (["127.0.0.1", "http"], "'http'"),
     (["127.0.0.1", "70000"], "'70000'"), (["127.0.0.1:0"], "'0'"), (["127.0.0.1:1", "[::1]:65536"], "'65536'"),
     (["127.0.0.1:1", "localhost"], "'localhost'"), (["::1:5000"], "[ADDRESS]:PORT"),
     (["127.0.0.1", "1", "--clients", "0"], "--clients"), (["127.0.0.1", "1", "--duration", "-1"], "--duration"),
     (["127.0.0.1", "1", "--profile", "strict"], "'strict'")],
)
def test_usageErrorsAreStatusTwoWithOneLine(arguments: list[str], says: str) -> None:
    done = subprocess.run([CHECKER, *arguments], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("kvtwist-check: ") and done.stderr.count("\n") == 1, done.stderr
    assert says in done.stderr


def test_runsAsAModule() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvtwist.check", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert "--profile {basic,kvtwist}" in done.stdout


def test_aServerWithAPasswordIsCheckedWithThePasswordFile(tmp_path: Path) -> None:
    """With --password-file every check passes; without it, or with a wrong one: one clear line, status 2."""
    password, wrong = tmp_path / "password", tmp_path / "wrong"
    password.write_text("s3cret-Pa55\n")
    wrong.write_text("guess\n")
    runs = [tmp_path / name for name in ("run-with", "run-without", "run-wrong")]
    for run in runs:
        run.mkdir()
    server = start_server("--password-file", str(password))
    try:
        status, document, out, err = check(
            server.host, server.port, runs[0], *QUICK, "--profile", "kvtwist", "--password-file", str(password)
        )
        assert status == 0, out + err
        assert all(verdicts(document).values())
        report = out + err + json.dumps(document)
        assert "s3cret" not in report, "the password must never appear in a report"

        status, document, out, err = check(server.host, server.port, runs[1], *QUICK)
        assert status == 2 and document == {} and out == ""
        address = f"{server.host}:{server.port}"
        assert err == (
            f"kvtwist-check: {address} requires a password (it answers 'Error: authentication required'): "
            "give it with --password-file FILE\n"
        )

        status, document, out, err = check(server.host, server.port, runs[2], *QUICK, "--password-file", str(wrong))
        assert status == 2 and document == {} and out == ""
        assert err == (
            f"kvtwist-check: cannot connect to {address}: the server refused the password (Error: invalid password)\n"
        )
        assert "guess" not in err
    finally:
        server.stop()


@pytest.mark.parametrize("content", ["", "two words\n", "a\nb\n"])
def test_aPasswordFileTheServerWouldRefuseIsAUsageError(tmp_path: Path, content: str) -> None:
    path = tmp_path / "password"
    path.write_text(content)
    done = subprocess.run([CHECKER, "127.0.0.1", "1", "--password-file", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("kvtwist-check: ") and done.stderr.count("\n") == 1, done.stderr
    assert "--password-file" in done.stderr


@contextmanager
def redisServer() -> Iterator[int]:
    """A throwaway redis-server on a free port, keeping nothing on disk; skips the test without redis."""
    program = shutil.which("redis-server")
    if program is None:
        pytest.skip("redis-server is not installed")
    port = freePort()
    process = subprocess.Popen(
        [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def test_aServerOfAnotherProtocolDoesNotPassLinearizability(tmp_path: Path) -> None:
    """redis answers ':0', '$-1' and '-ERR unknown command': nothing there can prove atomicity."""
    with redisServer() as port:
        status, document, out, err = check("127.0.0.1", port, tmp_path, *QUICK)
    assert status == 1, out + err
    linear = next(entry for entry in document["checks"] if entry["title"] == "concurrency: linearizability")
    assert linear["passed"] is False
    assert linear["summary"].startswith("not checked: "), linear["summary"]
    assert "neither a reply the protocol allows for their request nor an 'Error: ' line" in linear["summary"]
    assert "PASS  concurrency: linearizability" not in out
    assert "one atomic store shared by all clients" not in out


def test_twoNodesThatDoNotShareAStoreFailAsOne(tmp_path: Path) -> None:
    """Two ordinary servers, each with its own memory: a write on one is not seen on the other."""
    first, second = start_server(), start_server()
    try:
        nodes = [f"{server.host}:{server.port}" for server in (first, second)]
        status, document, out, err = checkNodes(nodes, tmp_path, *QUICK)
    finally:
        first.stop()
        second.stop()
    assert status == 1, out + err
    assert document["settings"]["nodes"] == nodes
    titles = verdicts(document)
    # Each node alone is a correct server: the single-node checks pass.
    assert titles["conformance: sample session"] and titles["concurrency: replies"], out
    linear = entry(document, "concurrency: linearizability")
    assert linear["passed"] is False
    assert "not linearizable" in linear["summary"] and not linear["summary"].startswith("not checked")
    # The witness names the nodes: replies from both of them cannot all be right.
    assert any("on node 1" in line for line in linear["evidence"]), linear["evidence"]
    assert any("on node 2" in line for line in linear["evidence"]), linear["evidence"]
    visibility = entry(document, "concurrency: cross-client visibility")
    assert visibility["passed"] is False
    assert "on node 2" in " ".join(visibility["evidence"])


def test_oneNodeNamedTwicePasses(kvserver: ServerProcess, tmp_path: Path) -> None:
    """The same server given as two nodes is one store: every check passes, and the output says how it spread."""
    node = f"{kvserver.host}:{kvserver.port}"
    status, document, out, err = checkNodes([node, node], tmp_path, *QUICK)
    assert status == 0, out + err
    assert all(verdicts(document).values())
    assert document["settings"]["nodes"] == [node, node]
    visibility = entry(document, "concurrency: cross-client visibility")
    assert "2 nodes" in visibility["summary"]
    assert 0 < visibility["stats"]["reads_on_another_node"] <= visibility["stats"]["reads_per_round"]
    assert "spread round-robin over 2 nodes" in entry(document, "concurrency: linearizability")["summary"]
    assert f"the first node, {node}" in out


def test_oneNodeAsHostColonPort(kvserver: ServerProcess, tmp_path: Path) -> None:
    node = f"{kvserver.host}:{kvserver.port}"
    status, document, out, err = checkNodes([node], tmp_path, *QUICK)
    assert status == 0, out + err
    assert document["target"] == node and document["settings"]["nodes"] == [node]


def checkFlaky(name: str, tmp_path: Path) -> tuple[int, dict[str, Any], str, str, int, int]:
    """
    Check a ``flaky`` server (faulty on the workload's keys); the checker's
    status, report, stdout and stderr, and what the server says of its
    faults: replies of unknown outcome, and writes among them applied.
    """
    keys = 8
    shared = workload.keys(int(QUICK[QUICK.index("--seed") + 1]), "shared", keys)
    with brokenServer(name, *shared) as (host, port):
        status, document, out, err = check(host, port, tmp_path, *QUICK, "--keys", str(keys))
        with socket.create_connection((host, port), timeout=10) as connection:
            connection.sendall(b"faults\n")
            faults, applied = connection.makefile().readline().split()
    return status, document, out, err, int(faults), int(applied)


def test_errorRepliesOfUnknownOutcomePassAndAreCounted(tmp_path: Path) -> None:
    """
    A server whose store is sometimes unavailable answers 'Error: ...' and
    has applied some of those writes all the same: that is allowed, and
    the report counts exactly the replies it sent.
    """
    status, document, out, err, faults, applied = checkFlaky("flaky", tmp_path)
    assert status == 0, out + err
    assert faults > 0 and applied > 0
    for title in ("concurrency: replies", "concurrency: linearizability"):
        stats = entry(document, title)["stats"]
        assert stats["indeterminate"] == stats["error_replies"] == faults, (title, stats, faults)
        assert stats["missing_replies"] == 0
        assert f"{faults} indeterminate" in entry(document, title)["summary"]
    assert f"{faults} indeterminate ({faults} 'Error: ' replies" in out


def test_theSameFaultsWithoutTheErrorPrefixFail(tmp_path: Path) -> None:
    """The same server, its fault reply without 'Error: ': a reply the protocol does not allow."""
    status, document, out, err, faults, _ = checkFlaky("flaky-garbage", tmp_path)
    assert status == 1, out + err
    assert faults > 0
    replies = entry(document, "concurrency: replies")
    assert replies["passed"] is False
    assert replies["summary"].startswith(f"{faults} replies the protocol does not allow")
    assert replies["stats"]["indeterminate"] == 0
    linear = entry(document, "concurrency: linearizability")
    assert linear["passed"] is False and linear["summary"].startswith(f"not checked: {faults} of ")
