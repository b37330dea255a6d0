"""The conformance scripts themselves: the counts in a check's name and summary are what it really sends."""

from __future__ import annotations

import re

import pytest

from kvtwist.check.conformance import basicScripts, kvtwistScripts, pipelining
from kvtwist.check.script import Script


def requestsSent(script: Script) -> int:
    """Request lines in the script's writes (each ends in LF)."""
    return sum(exchange.send.count(b"\n") for exchange in script.exchanges)


def countsIn(text: str) -> set[int]:
    return {int(number) for number in re.findall(r"(\d+) (?:pipelined )?requests", text)}


@pytest.mark.parametrize("keys", [1, 200, 5000])
def test_aPipeliningChecksNameAndSummarySayHowManyRequestsItSends(keys: int) -> None:
    script = pipelining(7, keys)
    sent = requestsSent(script)
    assert len(script.exchanges) == 1, "all in one write"
    assert countsIn(script.name) == {sent}
    assert countsIn(script.proves) == {sent}
    assert f"on {keys} keys" in script.proves


def test_everyScriptNamedByARequestCountSendsThatMany() -> None:
    scripts = [*basicScripts(3), *kvtwistScripts(3, 4096)]
    counted = [script for script in scripts if countsIn(script.name)]
    assert len(counted) == 3  # the basic profile's pipelining, and both of the kvtwist profile's
    for script in counted:
        assert countsIn(script.name) == countsIn(script.proves) == {requestsSent(script)}, script.name
