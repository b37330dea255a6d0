"""
The optional C extensions, kvtwist.compiled._chunk and
kvtwist.compiled._resp; every other piece of metadata is in setup.cfg.

The extensions are built on CPython when Cython and a C compiler are there.
Anywhere else (PyPy, no compiler, a failed build) kvtwist installs as pure
Python and the server runs its Python path, with a warning at build time.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

_MODULES = ["_chunk", "_resp"]


class OptionalBuildExt(build_ext):
    """Builds the extensions, and warns instead of failing when one cannot be built."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:
            self._skip("the extensions", e)

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            # A binary left by an earlier build would not match this source.
            stale = self.get_ext_fullpath(ext.name)
            if os.path.exists(stale):
                os.remove(stale)
            self._skip(ext.name, e)

    def _skip(self, what: str, error: Exception) -> None:
        sys.stderr.write(
            f"WARNING: could not build {what} ({error}); kvtwist is installed without its compiled path "
            "and runs on its pure-Python path.\n"
        )


def _extensions() -> list[Any]:
    """The extensions to build here, or none (PyPy, or no Cython)."""
    if platform.python_implementation() != "CPython":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.stderr.write("WARNING: Cython is not installed; kvtwist is installed without its compiled path.\n")
        return []
    from setuptools import Extension

    extensions = []
    for module in _MODULES:
        source = os.path.join("kvtwist", "compiled", module + ".pyx")
        try:
            extensions += cythonize([Extension("kvtwist.compiled." + module, [source])], language_level=3, quiet=True)
        except Exception as e:
            sys.stderr.write(f"WARNING: could not translate {source} with Cython ({e}); kvtwist is installed "
                             "without its compiled path and runs on its pure-Python path.\n")
    return extensions


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
