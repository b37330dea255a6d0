"""Reading a server's CPU time and resident memory from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds used so far (user + system, all threads) and resident bytes."""

    cpu: float
    rss: int


def parseStatTicks(text: str) -> int:
    """
    User plus system clock ticks from the text of /proc/PID/stat.

    The command name (field 2) is in parentheses and may itself hold spaces
    or parentheses, so fields are counted from the last ``)``: utime and
    stime are fields 14 and 15 of the whole line.
    """
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def parseStatusRss(text: str) -> int:
    """Resident bytes from the text of /proc/PID/status (its ``VmRSS`` line, in kB)."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            number, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmRSS unit {unit!r}")
            return int(number) * 1024
    raise ValueError("no VmRSS line (is the process a zombie?)")


def sample(pid: int) -> ProcSample:
    """The current CPU time and resident memory of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = parseStatTicks(f.read())
    with open(f"/proc/{pid}/status") as f:
        rss = parseStatusRss(f.read())
    return ProcSample(cpu=ticks / _TICKS_PER_SECOND, rss=rss)
