"""
The order in which checks run, and the whole run as one call.

Cheap single-connection checks come first, so a server that gets the basics
wrong fails fast and the report starts with the simplest explanation; the
long concurrent workload comes last.
"""

from __future__ import annotations

from kvtwist.check.concurrency import checkConcurrency
from kvtwist.check.conformance import checkConformance
from kvtwist.check.report import CheckResult
from kvtwist.check.robustness import checkRobustness
from kvtwist.check.serving import checkServing
from kvtwist.check.target import Target
from kvtwist.check.visibility import checkVisibility


async def runChecks(target: Target) -> list[CheckResult]:
    """Every check against ``target``, in report order."""
    results = await checkConformance(target)
    results += await checkServing(target)
    results += await checkRobustness(target)
    results.append(target.finished(await checkVisibility(target)))
    results += await checkConcurrency(target)
    return results
