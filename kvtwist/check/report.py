"""
Check results and the two ways they are reported: text for people, JSON for programs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


@dataclass
class CheckResult:
    """
    The verdict of one check.

    ``evidence`` holds the lines that show a failure: the exact requests and
    replies, one per line. ``stats`` holds figures worth keeping in the
    JSON report (operations run, latencies).
    """

    group: str
    name: str
    passed: bool
    summary: str
    evidence: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.group}: {self.name}"


def passed(group: str, name: str, summary: str, **stats: Any) -> CheckResult:
    return CheckResult(group, name, True, summary, stats=stats)


def failed(group: str, name: str, summary: str, evidence: Sequence[str] = (), **stats: Any) -> CheckResult:
    return CheckResult(group, name, False, summary, list(evidence), stats)


def allPassed(results: Sequence[CheckResult]) -> bool:
    return all(result.passed for result in results)


def renderText(
    target: str, settings: dict[str, Any], results: Sequence[CheckResult], notes: Sequence[str] = ()
) -> str:
    """The report for a terminal: a verdict line per check, evidence under each failure; ``notes`` go in the header."""
    shown = "  ".join(f"{name}={_shown(value)}" for name, value in settings.items())
    lines = [f"kvtwist-check report for {target}", f"  {shown}", *notes, ""]
    for result in results:
        lines.append(f"{'PASS' if result.passed else 'FAIL'}  {result.title}: {result.summary}")
        for line in result.evidence:
            lines.append(f"        {line}")
    failures = sum(not result.passed for result in results)
    lines.append("")
    if failures:
        lines.append(f"{len(results)} checks: {len(results) - failures} passed, {failures} FAILED")
    else:
        lines.append(f"{len(results)} checks: all passed")
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def renderJSON(target: str, settings: dict[str, Any], results: Sequence[CheckResult]) -> str:
    """The report as one JSON document (see docs/checker.md for its fields)."""
    document = {
        "target": target,
        "settings": settings,
        "passed": allPassed(results),
        "checks": [dict(asdict(result), title=result.title) for result in results],
    }
    return json.dumps(document, indent=2) + "\n"
