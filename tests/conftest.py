"""
Shared test setup: a running kvstore server on a free port, tracemalloc
where the interpreter has it, and no Hypothesis deadline on PyPy.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import settings

from serverproc import ServerProcess, removeLogDirs, start_server

if platform.python_implementation() == "PyPy":
    # PyPy's JIT compiles a path the first time it runs hot, so one example
    # can take many times longer than the next: a deadline would then report
    # the compiler's work as a flaky failure of the code under test.
    settings.register_profile("pypy", deadline=None)
    settings.load_profile("pypy")


@pytest.fixture
def kvserver() -> Iterator[ServerProcess]:
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tracemalloc() -> ModuleType:
    """
    The ``tracemalloc`` module, for tests that measure what Python allocates.

    It is CPython's: PyPy has no ``_tracemalloc``, so there such a test is
    skipped, not passed.
    """
    return pytest.importorskip("tracemalloc", reason="tracemalloc is CPython-only (PyPy has no _tracemalloc)")


@pytest.fixture(autouse=True, scope="session")
def _removeServerLogs() -> Iterator[None]:
    """Leave no server log directory behind in the system's temporary directory."""
    yield
    removeLogDirs()
