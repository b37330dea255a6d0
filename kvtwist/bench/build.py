"""Compiling the C tools that ship as sources inside this package."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

CFLAGS = ("-O2", "-Wall", "-Wextra")


class BuildError(Exception):
    """The C compiler is missing or refused a source file."""


def defaultCacheDir() -> Path:
    """Where built binaries are kept: the package directory may be read-only."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvtwist"


def source(name: str) -> bytes:
    """The C source ``name``.c shipped in this package."""
    return (resources.files("kvtwist.bench") / f"{name}.c").read_bytes()


def build(name: str, cacheDir: Path | None = None, cc: str | None = None) -> Path:
    """
    The path of a compiled ``name``.c, compiling it if needed.

    The binary's name carries a hash of the source and flags, so an edited
    source is rebuilt and a stale binary is never run.
    """
    cc = cc or os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise BuildError(f"no C compiler found ({cc!r}); install gcc or set CC")
    text = source(name)
    digest = hashlib.sha256(text + " ".join((cc,) + CFLAGS).encode()).hexdigest()[:12]
    cacheDir = cacheDir or defaultCacheDir()
    target = cacheDir / f"{name}-{digest}"
    if target.exists():
        return target
    cacheDir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cacheDir) as work:
        src = Path(work) / f"{name}.c"
        src.write_bytes(text)
        out = Path(work) / name
        result = subprocess.run(
            [cc, *CFLAGS, str(src), "-o", str(out)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise BuildError(f"{cc} could not build {name}.c:\n{result.stderr}")
        # Rename is atomic: a concurrent run sees either no binary or a whole one.
        out.replace(target)
    return target
