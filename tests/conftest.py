"""Shared fixtures: a running kvstore server on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from serverproc import ServerProcess, start_server


@pytest.fixture
def kvserver() -> Iterator[ServerProcess]:
    server = start_server()
    try:
        yield server
    finally:
        server.stop()
