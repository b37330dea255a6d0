"""kvtwist: a key-value server for signed 64-bit integer keys and values, on Twisted."""

__version__ = "0.1.0"
