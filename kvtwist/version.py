"""Which kvtwist this is: the one answer behind ``--version`` and the start-up log."""

from __future__ import annotations

import configparser
from importlib import metadata
from pathlib import Path

UNKNOWN = "unknown"


def version() -> str:
    """
    kvtwist's version, or ``"unknown"``; it never raises.

    The ``setup.cfg`` of the source tree the package was imported from comes
    first, where there is one (``[metadata]`` with ``name = kvtwist``): the
    installed metadata may belong to another copy of kvtwist, as when the
    benchmark runs a baseline tree on this interpreter through a directory
    of links, or be stale, as in an editable install. Then the installed
    package's metadata (``importlib.metadata``); then ``"unknown"``.
    """
    return _sourceTreeVersion(Path(__file__)) or _installedVersion() or UNKNOWN


def _sourceTreeVersion(module: Path) -> str | None:
    """The version in the ``setup.cfg`` beside the package that holds ``module``, if it is kvtwist's."""
    try:
        # resolve(): the benchmark's link to the package leads back to its tree.
        setupCfg = module.resolve().parent.parent / "setup.cfg"
        parser = configparser.ConfigParser(interpolation=None)
        if not parser.read(setupCfg, encoding="utf-8"):
            return None
        if parser.get("metadata", "name", fallback=None) != "kvtwist":
            return None
        found = parser.get("metadata", "version", fallback="").strip()
    except (OSError, ValueError, configparser.Error):
        return None
    # "attr: ..." or "file: ..." would need setuptools to follow; not worth guessing.
    return found if found and ":" not in found else None


def _installedVersion() -> str | None:
    try:
        return metadata.version("kvtwist")
    except (metadata.PackageNotFoundError, OSError, ValueError):
        return None
