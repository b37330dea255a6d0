"""kvtwist-check's command line: --version, --json paths, profile names and their help."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvtwist.check.cli import parseSettings
from kvtwist.version import version

CHECKER = str(Path(sys.executable).with_name("kvtwist-check"))


def runChecker(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHECKER, *arguments], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def freePort() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_versionPrintsKvtwistsVersion() -> None:
    done = runChecker("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"kvtwist {version()}\n"
    assert version() != "unknown"


@pytest.mark.parametrize("where", ["missing/report.json", "."])
def test_aJSONPathThatCannotBeWrittenFailsAtOnceWithOneLine(tmp_path: Path, where: str) -> None:
    """A missing directory, or a directory itself: status 2 before any check runs, no traceback."""
    path = tmp_path / where
    # A port nothing listens on: had it tried to connect, it would say "cannot connect".
    done = runChecker("127.0.0.1", str(freePort()), "--json", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"kvtwist-check: cannot write the JSON report to {path}: ")
    assert done.stderr.count("\n") == 1, done.stderr


def test_aRunThatCannotCheckLeavesNoEmptyJSONFile(tmp_path: Path) -> None:
    """The file is opened before the run; if no report comes, it does not stay behind empty."""
    path = tmp_path / "report.json"
    done = runChecker("127.0.0.1", str(freePort()), "--json", str(path))
    assert done.returncode == 2 and "cannot connect" in done.stderr
    assert not path.exists()


def test_anExistingJSONFileIsLeftAloneWhenNoReportComes(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("{}\n")
    done = runChecker("127.0.0.1", str(freePort()), "--json", str(path))
    assert done.returncode == 2
    assert path.read_text() == "{}\n"


def test_profilesAreNamedForWhatTheyCheckAndExplainedInHelp() -> None:
    done = runChecker("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--profile {basic,kvtwist}" in text
    assert "basic (default): the rules any server of this protocol must follow" in text
    assert "kvtwist: also kvtwist's stricter documented rules" in text
    assert parseSettings(["h", "1"])[0].profile == "basic"
    assert parseSettings(["h", "1", "--profile", "kvtwist"])[0].profile == "kvtwist"


def test_theOldProfileNameStillWorksWithAWarning(capsys: pytest.CaptureFixture[str]) -> None:
    settings, _ = parseSettings(["h", "1", "--profile", "assignment"])
    assert settings.profile == "basic"
    assert capsys.readouterr().err == "kvtwist-check: warning: --profile assignment is the old name of --profile basic\n"


def test_anUnknownProfileIsAUsageError() -> None:
    done = runChecker("127.0.0.1", "1", "--profile", "strict")
    assert done.returncode == 2
    assert "invalid choice: 'strict' (choose from" in done.stderr
