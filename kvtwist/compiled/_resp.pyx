# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""
Redis's wire format (RESP) for a chunk's operations, at C level.

Over Redis, writing each operation's command and reading each reply in
Python cost as much as all the rest of a request's work in the node. These
functions do a whole chunk's common case in C. The Python engine
(``kvtwist.engines.redis``) stays the reference: ``encodeCommands`` makes
what its ``CommandEncoder`` makes, and any reply ``decodeOutcomes`` is
not sure about is left to its ``outcomeOf``.
"""

from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from kvtwist.compiled._int64 cimport _MAX_DECIMAL, _formatDigits, _parseInt
from kvtwist.storage.interface import DELETE, GET, PUT

cdef long _PUT_CODE = PUT
cdef long _GET_CODE = GET
cdef long _DELETE_CODE = DELETE

# The fixed parts of the three commands (as kvtwist.engines.redis.commandFor has them).
cdef const char* _GET_HEAD = b"*2\r\n$3\r\nGET\r\n"
cdef const char* _DEL_HEAD = b"*2\r\n$3\r\nDEL\r\n"
cdef const char* _SET_HEAD = b"*4\r\n$3\r\nSET\r\n"
cdef const char* _NX = b"$2\r\nNX\r\n"
cdef enum:
    _HEAD_LEN = 13
    _NX_LEN = 8
    # The most one command needs beyond its key prefix: a head, the key's
    # and the value's bulk headers and digits, and NX.
    _MOST_PER_COMMAND = _HEAD_LEN + 2 * (1 + _MAX_DECIMAL + 2 + _MAX_DECIMAL + 2) + _NX_LEN


cdef inline tuple _operation(object item):
    """``item`` as the (command, key, value) tuple an ``Operation`` is; TypeError for anything else."""
    if not isinstance(item, tuple) or len(<tuple>item) != 3:
        raise TypeError(f"not an operation: {item!r}")
    return <tuple>item


cdef inline char* _bulk(char* out, const char* prefix, Py_ssize_t prefixSize, int64_t number) noexcept nogil:
    """Write ``prefix`` and ``number`` in decimal as one RESP bulk string at ``out``; return the byte after it."""
    cdef char digits[_MAX_DECIMAL]
    cdef Py_ssize_t size = _formatDigits(digits, number) - digits
    out[0] = c'$'
    out = _formatDigits(out + 1, prefixSize + size)
    out[0] = c'\r'
    out[1] = c'\n'
    out += 2
    memcpy(out, prefix, prefixSize)
    out += prefixSize
    memcpy(out, digits, size)
    out += size
    out[0] = c'\r'
    out[1] = c'\n'
    return out + 2


cdef char* _encodeOne(char* o, object item, const char* prefix, Py_ssize_t prefixSize) except NULL:
    """Write the command of the operation ``item`` at ``o``; return the byte after it."""
    cdef tuple operation = _operation(item)
    cdef long command = operation[0]
    cdef int64_t key = operation[1]
    cdef int64_t value
    if command == _GET_CODE:
        memcpy(o, _GET_HEAD, _HEAD_LEN)
        return _bulk(o + _HEAD_LEN, prefix, prefixSize, key)
    if command == _PUT_CODE:
        value = operation[2]
        memcpy(o, _SET_HEAD, _HEAD_LEN)
        o = _bulk(o + _HEAD_LEN, prefix, prefixSize, key)
        o = _bulk(o, b"", 0, value)
        memcpy(o, _NX, _NX_LEN)
        return o + _NX_LEN
    if command == _DELETE_CODE:
        memcpy(o, _DEL_HEAD, _HEAD_LEN)
        return _bulk(o + _HEAD_LEN, prefix, prefixSize, key)
    raise ValueError(f"unknown operation {operation!r}")


def encodeCommands(operations, bytes prefix not None):
    """
    The RESP pipeline of one command per operation, back to back, each
    key under ``prefix``; ValueError for an unknown command.
    """
    cdef list items = operations if type(operations) is list else list(operations)
    cdef Py_ssize_t n = len(items)
    cdef Py_ssize_t prefixSize = PyBytes_GET_SIZE(prefix)
    cdef Py_ssize_t i
    cdef char* out = <char*>malloc(n * (prefixSize + _MOST_PER_COMMAND) + 1)
    cdef char* o = out
    if out == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            o = _encodeOne(o, items[i], PyBytes_AS_STRING(prefix), prefixSize)
        return PyBytes_FromStringAndSize(out, o - out)
    finally:
        free(out)


def encodeEach(operations, bytes prefix not None):
    """
    ``encodeCommands``, one command per operation in a list, for a caller
    that groups them (a cluster, by slot).
    """
    cdef list items = operations if type(operations) is list else list(operations)
    cdef Py_ssize_t prefixSize = PyBytes_GET_SIZE(prefix)
    cdef char* out = <char*>malloc(prefixSize + _MOST_PER_COMMAND)
    cdef char* o
    cdef list commands = []
    if out == NULL:
        raise MemoryError()
    try:
        for item in items:
            o = _encodeOne(out, item, PyBytes_AS_STRING(prefix), prefixSize)
            commands.append(PyBytes_FromStringAndSize(out, o - out))
        return commands
    finally:
        free(out)


cdef inline bint _isCanonical(const char* p, Py_ssize_t size) noexcept nogil:
    """Whether the decimal at ``p`` has no leading zero and is not "-0" (kvtwist writes no other)."""
    if p[0] == c'-':
        return size > 1 and p[1] != c'0'
    return p[0] != c'0' or size == 1


def decodeOutcomes(operations, list replies not None):
    """
    The ``Outcome`` of each operation from Redis's reply to its command,
    as ``outcomeOf`` would give it; None if any reply is not of the common
    form (an error, a failure, a value kvtwist did not write), which the
    Python path then judges and counts.
    """
    cdef list items = operations if type(operations) is list else list(operations)
    cdef Py_ssize_t n = len(items)
    cdef Py_ssize_t i, size
    cdef long command
    cdef int64_t value
    cdef const char* text
    cdef object reply
    cdef tuple operation
    cdef list outcomes
    if len(replies) != n:
        raise ValueError("one reply per operation")
    outcomes = [None] * n
    for i in range(n):
        operation = _operation(items[i])
        command = operation[0]
        reply = replies[i]
        if command == _GET_CODE:
            if reply is None:
                continue
            if type(reply) is not bytes:
                return None
            size = PyBytes_GET_SIZE(reply)
            text = PyBytes_AS_STRING(reply)
            if size == 0 or _parseInt(text, text + size, &value) != text + size or not _isCanonical(text, size):
                return None
            outcomes[i] = value
        elif command == _PUT_CODE:
            if reply is None:
                outcomes[i] = False
            elif type(reply) is bytes and reply == b"OK":
                outcomes[i] = True
            else:
                return None
        elif command == _DELETE_CODE and type(reply) is int:
            outcomes[i] = reply > 0
        else:
            return None
    return outcomes
