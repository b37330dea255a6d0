"""
Serving clients at the same time: one slow client must not hold up the rest.

A client connects and then sits idle, or sends half a request and stops.
While it does, a few other clients each run a short conversation; every
reply must come within ``--timeout`` (what the replies say is judged by the
other checks). A server that handles one client at a
time, or reads a whole line before it turns to anyone else, fails here.
"""

from __future__ import annotations

from twisted.internet.defer import gatherResults, ensureDeferred

from kvtwist.check import workload
from kvtwist.check.conformance import CLEARED, NOT_FOUND, OK, EXISTS
from kvtwist.check.probe import Transcript
from kvtwist.check.report import CheckResult, failed, passed
from kvtwist.check.script import ANY, Expect, Script, ask, reply, runScript
from kvtwist.check.target import Target

GROUP = "serving at the same time"
WORKERS = 3


def conversation(key: int, rounds: int = 5, judged: bool = True) -> Script:
    """
    A short put/get/del conversation on one key, the work of one busy client.

    With ``judged=False`` any reply will do: only whether and when replies
    come matters, their correctness is the other checks' business.
    """

    def expect(wanted: Expect) -> Expect:
        return wanted if judged else ANY

    exchanges = [ask(f"del {key}", expect(CLEARED))]
    for value in range(1, rounds + 1):
        exchanges += [
            ask(f"put {key} {value}", expect(OK)),
            ask(f"put {key} 0", expect(EXISTS)),
            ask(f"get {key}", expect(reply(str(value)))),
            ask(f"del {key}", expect(OK)),
            ask(f"get {key}", expect(NOT_FOUND)),
        ]
    return Script(f"busy client on key {key}", "replies while another client is slow", tuple(exchanges))


async def whileHeld(target: Target, name: str, label: str, first: bytes, rest: bytes | None) -> CheckResult:
    """
    Run busy clients while a holder keeps a connection open having sent ``first``.

    With ``rest`` (the end of the held request), the holder finishes its
    request afterwards and must get ``OK``: a split request is a request.
    ``first`` then starts with a whole ``del`` of the key, so the put is
    sure to succeed.
    """
    seed = target.settings.seed
    transcript = Transcript()
    try:
        holder = await target.probe("slow client", transcript)
    except Exception as e:
        return failed(GROUP, name, f"could not connect: {e}")
    try:
        if first:
            holder.send(first)
        # Give the server time to accept the holder and read its bytes
        # before the busy clients arrive.
        await target.sleep(0.2)
        keys = workload.keys(seed, f"serving/{label}", WORKERS)
        started = target.clock()
        results = await gatherResults(
            [ensureDeferred(runScript(target, GROUP, conversation(key, judged=False))) for key in keys]
        )
        elapsed = target.clock() - started
        for result in results:
            if not result.passed:
                return failed(
                    GROUP, name,
                    f"while one client was slow, another client was not served: {result.summary}",
                    transcript.lines() + result.evidence,
                )
        if rest is not None:
            holder.send(rest)
            # ``first`` holds one whole request (a del) before the half one.
            await holder.nextLine(target.settings.timeout)
            line = await holder.nextLine(target.settings.timeout)
            if line is None or line.rstrip(b"\r") != b"OK":
                return failed(
                    GROUP, name, "the slow client's request, once completed, did not get 'OK'", transcript.lines()
                )
    finally:
        holder.close()
    return passed(
        GROUP, name,
        f"{WORKERS} other clients got all their replies ({elapsed:.2f} s in all) while one client was slow",
        seconds=round(elapsed, 3),
    )


async def checkServing(target: Target) -> list[CheckResult]:
    key, = workload.keys(target.settings.seed, "serving/half", 1)
    return [
        target.finished(await whileHeld(target, "an idle client", "idle", b"", None)),
        target.finished(
            await whileHeld(
                target, "a half-sent request", "half", b"del %d\nput %d" % (key, key), b" 5\n"
            )
        ),
    ]
