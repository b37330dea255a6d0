"""
Robustness: a misbehaving client must not hurt the others.

While a few well-behaved clients keep working on their own keys (checking
every reply and its delay), an attacker sends a far too long line, or
garbage bytes, or drops connections abruptly in the middle of requests.
Afterwards a new client must still be served correctly. What the attacker
itself gets back is not judged here (the kvtwist profile's conformance
checks judge the too-long reply).
"""

from __future__ import annotations

from typing import Awaitable, Callable

from twisted.internet.defer import DeferredList, ensureDeferred, gatherResults

from kvtwist.check import workload
from kvtwist.check.conformance import sampleSession
from kvtwist.check.probe import Transcript
from kvtwist.check.report import CheckResult, failed, passed
from kvtwist.check.script import runScript
from kvtwist.check.serving import conversation
from kvtwist.check.target import Target

GROUP = "robustness"
VICTIMS = 3
LONG_LINE = 1 << 20
GARBAGE = 1 << 16


# Each attack returns a one-line account of what it did; the attackers' own
# transcripts would only bury the victims' in a report.


async def _sendAndLeave(target: Target, data: bytes) -> str:
    """Send ``data`` in 4 KiB writes, give the server a moment, leave; what the server did."""
    attacker = await target.probe("attacker", Transcript())
    for offset in range(0, len(data), 4096):
        attacker.send(data[offset : offset + 4096])
    closed = await attacker.waitClosed(0.5)
    attacker.close()
    return "closed" if closed else "kept"


async def _tooLongLine(target: Target) -> str:
    kept = await _sendAndLeave(target, b"put 1 " + b"9" * LONG_LINE)
    return f"sent a {LONG_LINE}-byte line without LF; the server {kept} that connection"


async def _garbage(target: Target) -> str:
    kept = await _sendAndLeave(target, workload.garbage(target.settings.seed, GARBAGE))
    return f"sent {GARBAGE} random bytes; the server {kept} that connection"


async def _abruptDisconnects(target: Target) -> str:
    """Connections reset at once, in the middle of a request, and with unread replies."""
    pipelined = b"get 1\n" * 2000

    async def one(index: int) -> None:
        attacker = await target.probe(f"attacker {index}", Transcript())
        if index % 3 == 1:
            attacker.send(b"put 12345 6")
        elif index % 3 == 2:
            attacker.send(pipelined)
        attacker.abort()

    await DeferredList([ensureDeferred(one(index)) for index in range(30)], consumeErrors=True)
    return "reset 30 connections: 10 at once, 10 in the middle of a request, 10 with 2000 replies unread"


async def underAttack(
    target: Target, name: str, attack: Callable[[Target], Awaitable[str]]
) -> CheckResult:
    """Run victims while ``attack`` runs; then check their replies and a fresh client."""
    keys = workload.keys(target.settings.seed, f"robustness/{name}", VICTIMS)
    attacked = False

    async def victim(key: int) -> CheckResult:
        # Keep working until one round has run entirely after the attack.
        while True:
            last = attacked
            result = await runScript(target, GROUP, conversation(key))
            if last or not result.passed:
                return result

    victims = [ensureDeferred(victim(key)) for key in keys]
    try:
        account = "the attacker " + await attack(target)
    except Exception as e:
        account = f"the attacker failed: {e}"
    attacked = True
    results = await gatherResults(victims)
    for result in results:
        if not result.passed:
            return failed(
                GROUP, name, f"a well-behaved client suffered: {result.summary}", [account, *result.evidence]
            )
    after = await runScript(target, GROUP, sampleSession())
    if not after.passed:
        return failed(
            GROUP, name, f"afterwards a new client was not served correctly: {after.summary}",
            [account, *after.evidence],
        )
    return passed(GROUP, name, f"{VICTIMS} clients working meanwhile, and a new client afterwards, were unaffected")


async def checkRobustness(target: Target) -> list[CheckResult]:
    attacks: list[tuple[str, Callable[[Target], Awaitable[str]]]] = [
        (f"a {LONG_LINE >> 20} MiB line", _tooLongLine),
        (f"{GARBAGE >> 10} KiB of garbage bytes", _garbage),
        ("abrupt disconnects", _abruptDisconnects),
    ]
    results = []
    for name, attack in attacks:
        target.progress(f"robustness: {name}")
        results.append(target.finished(await underAttack(target, name, attack)))
    return results

