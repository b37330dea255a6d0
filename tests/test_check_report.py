"""Reports and transcripts: what a person or a program reads after a run."""

from __future__ import annotations

import json

from kvtwist.check.probe import Transcript, showBytes
from kvtwist.check.report import allPassed, failed, passed, renderJSON, renderText

SETTINGS = {"profile": "assignment", "seed": 3}


def results() -> list:
    return [
        passed("conformance", "sample session", "fine", operations=7),
        failed("concurrency", "linearizability", "2 keys fail", ["client 1 'put 5 1' -> 'OK'", "client 2 'put 5 2' -> 'OK'"]),
    ]


def test_textReportShowsVerdictsEvidenceAndCount() -> None:
    text = renderText("127.0.0.1:5000", SETTINGS, results()).splitlines()
    assert text[0] == "kvtwist-check report for 127.0.0.1:5000"
    assert "seed=3" in text[1]
    assert "PASS  conformance: sample session: fine" in text
    failure = text.index("FAIL  concurrency: linearizability: 2 keys fail")
    assert text[failure + 1].strip() == "client 1 'put 5 1' -> 'OK'"
    assert text[-1] == "2 checks: 1 passed, 1 FAILED"


def test_textReportWhenAllPass() -> None:
    text = renderText("h:1", SETTINGS, results()[:1])
    assert text.endswith("1 checks: all passed\n")


def test_jsonReport() -> None:
    document = json.loads(renderJSON("h:1", SETTINGS, results()))
    assert document["passed"] is False
    assert document["settings"] == SETTINGS
    first, second = document["checks"]
    assert first["title"] == "conformance: sample session" and first["stats"] == {"operations": 7}
    assert second["passed"] is False and len(second["evidence"]) == 2


def test_allPassed() -> None:
    assert allPassed(results()[:1])
    assert not allPassed(results())
    assert allPassed([])


def test_transcriptKeepsHeadAndTail() -> None:
    transcript = Transcript(keep=3)
    for number in range(10):
        transcript.note(str(number))
    assert transcript.lines() == ["0", "1", "2", "... 4 lines not shown ...", "7", "8", "9"]


def test_shortTranscriptIsWhole() -> None:
    transcript = Transcript(keep=3)
    for number in range(5):
        transcript.note(str(number))
    assert transcript.lines() == ["0", "1", "2", "3", "4"]


def test_showBytesShortensLongDataInTheMiddle() -> None:
    assert showBytes(b"get 1\n") == "b'get 1\\n'"
    long = showBytes(b"x" * 1000 + b"END")
    assert "(1003 bytes)" in long and long.endswith("END'") and len(long) < 200
