"""
Which reactor kvtwist runs on when nobody chose one: its own
(``kvtwist.server.reactor``) where epoll exists, Twisted's default
elsewhere.

Kept apart from ``kvtwist.server.reactor``, which, like Twisted's epoll
reactor, cannot even be imported without epoll: the ``kvstore`` plugin
imports this module on every platform.
"""

from __future__ import annotations

import select
import sys
from typing import Any


def installUnlessChosen() -> Any:
    """
    Install kvtwist's reactor unless a reactor is installed already (as
    ``twistd --reactor`` does before the plugin's options are parsed) or
    this platform has no epoll, and return the reactor in use.
    """
    if "twisted.internet.reactor" not in sys.modules and hasattr(select, "epoll"):
        # Imported here: it needs epoll.
        from kvtwist.server.reactor import install

        install()
    from twisted.internet import reactor

    return reactor
