"""The twistd dropin: ``twistd -n kvstore --port 5000``."""

from twisted.application.service import ServiceMaker

kvstore = ServiceMaker(
    "kvstore",
    "kvtwist.tap",
    "A key-value server for signed 64-bit integer keys and values.",
    "kvstore",
)
