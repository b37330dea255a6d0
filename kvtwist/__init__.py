"""kvtwist: a key-value server for signed 64-bit integer keys and values, on Twisted."""

from typing import Any


def __getattr__(name: str) -> Any:
    # setup.cfg holds the one version number; kvtwist.version finds it.
    if name == "__version__":
        from kvtwist.version import version

        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
