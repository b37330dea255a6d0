"""Shared fixtures: a running kvstore server on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from serverproc import ServerProcess, removeLogDirs, start_server


@pytest.fixture
def kvserver() -> Iterator[ServerProcess]:
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True, scope="session")
def _removeServerLogs() -> Iterator[None]:
    """Leave no server log directory behind in the system's temporary directory."""
    yield
    removeLogDirs()
