"""The twistd dropins: the ``kvstore`` server (``twistd -n kvstore --port 5000``) and its reactor."""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

kvstore = ServiceMaker(
    "kvstore",
    "kvtwist.tap",
    "A key-value server for signed 64-bit integer keys and values.",
    "kvstore",
)

# The reactor kvstore installs when twistd is given none; --reactor=kvepoll
# picks it for any twistd application.
kvepoll = Reactor(
    "kvepoll",
    "kvtwist.server.reactor",
    "Twisted's epoll reactor with the log context set once per poll, not per event (kvtwist's default).",
)
