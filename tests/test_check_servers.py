"""
kvtwist-check end to end: the installed console script against real servers.

kvtwist itself must pass both profiles; each deliberately broken server in
``brokenservers`` must fail the checks that its bug violates; a correct
server with its own error texts must pass the basic profile; a server of
another protocol (redis) must fail, linearizability included.
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

CHECKER = str(Path(sys.executable).with_name("kvtwist-check"))
# Short runs: a second of workload is thousands of operations, plenty to
# catch these bugs; a short timeout keeps the stalling servers quick.
QUICK = ["--clients", "20", "--duration", "1", "--timeout", "2", "--seed", "7"]


def check(host: str, port: int, tmp_path: Path, *options: str) -> tuple[int, dict[str, Any], str, str]:
    """Run the console script; its exit status, JSON report, stdout and stderr."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [CHECKER, host, str(port), "--json", str(report), *options],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    document = json.loads(report.read_text()) if report.exists() else {}
    return done.returncode, document, done.stdout, done.stderr


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
    "arguments",
    [[], ["127.0.0.1"], ["127.0.0.1", "http"], ["127.0.0.1", "70000"], ["127.0.0.1", "1", "--clients", "0"],
     ["127.0.0.1", "1", "--duration", "-1"], ["127.0.0.1", "1", "--profile", "strict"]],
)
def test_usageErrorsAreStatusTwo(arguments: list[str]) -> None:
    done = subprocess.run([CHECKER, *arguments], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "usage: kvtwist-check" in done.stderr


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
    assert "usage: kvtwist-check" in done.stderr and "--password-file" in done.stderr


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
