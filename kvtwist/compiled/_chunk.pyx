# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""
The in-memory store in C, with a whole chunk of common requests run at C level.

On CPython the interpreter's work per request (a split list, tokens,
parsed ints, a reply object, method calls) costs more than everything
else the server does at depth 16. ``CompiledStore.runChunk`` walks the
received bytes, looks keys up in a C hash map and writes the replies into
one buffer, with no Python object per token or per request. Every line it
is not sure about is left to the Python protocol, which stays the
reference for the whole grammar.
"""

import os
from zlib import crc32 as _crc32

from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.long cimport PyLong_AsSsize_t, PyLong_FromLongLong
from cpython.object cimport PyObject

from kvtwist.compiled._int64 cimport _formatInt, _parseInt
from kvtwist.compiled._tablememory cimport TableMemory, allocTable, freeAllTables, freeTable

from kvtwist.server import stats as _stats
from kvtwist.storage.interface import DELETE, GET, PUT, Operation, StoreFull
from kvtwist.storage.journal import OP_DEL, OP_PUT, RECORD_SIZE

# The reply texts of the protocol (kvtwist.server.protocol; a test checks
# that they agree).
cdef const char* _OK = b"OK\n"
cdef const char* _EXISTS = b"Key already exists\n"
cdef const char* _NOT_FOUND = b"Key not found\n"
cdef enum:
    _OK_LEN = 3
    _EXISTS_LEN = 19
    _NOT_FOUND_LEN = 14
STORE_FULL = "store is full"

# The outcomes runChunk tallies, and where each is counted in the
# server's request counters.
cdef enum:
    _STORED
    _EXISTED
    _GOT
    _GOT_NONE
    _DELETED
    _DELETED_NONE
    _OUTCOMES
cdef Py_ssize_t _COUNT_AT[_OUTCOMES]
_COUNT_AT[:] = [
    _stats.PUT_OK, _stats.PUT_EXISTS, _stats.GET_FOUND, _stats.GET_NOT_FOUND, _stats.DEL_OK, _stats.DEL_NOT_FOUND
]
cdef Py_ssize_t _LAST_COUNT = max(_COUNT_AT)

cdef enum:
    # The map is split into 1 << _SHARD_BITS tables that grow on their own.
    _SHARD_BITS = 8
    _SHARDS = 1 << _SHARD_BITS
    # The smallest table, in slots (a power of two).
    _MIN_SLOTS = 8
    # Linear probing stays fast up to about 70% full: grow beyond 11/16,
    # shrink below 1/8 (to 1/4 full after halving, so that churn around
    # one size never resizes back and forth).
    _GROW_NUM = 11
    _GROW_DEN = 16
    # Reply bytes per request byte, at most: the shortest request line,
    # "get 1\n", is 6 bytes, and the longest reply 21
    # ("-999999999999999999\n"; "Key already exists\n" is 19).
    _REPLY_PER_BYTE = 4
    # runChunk keeps its reply buffer between calls up to this size, which
    # a chunk of one 4 KiB read never needs; a bigger one is freed at once.
    _KEPT_REPLY_BYTES = 65536


cdef struct Slot:
    int64_t key
    int64_t value


# What undoes one pending journal record: the key's value before it, if it had one.
cdef struct Undo:
    int64_t key
    int64_t value
    bint had


# The journal's record layout (kvtwist.storage.journal; a test checks that
# the records written here are the ones it writes).
cdef Py_ssize_t _RECORD_SIZE = RECORD_SIZE
cdef unsigned char _OP_PUT = OP_PUT
cdef unsigned char _OP_DEL = OP_DEL


# One shard: an open-addressing table and the entry counts that resize it.
cdef struct Table:
    Slot* slots
    uint64_t mask
    Py_ssize_t used
    Py_ssize_t growAt
    Py_ssize_t shrinkAt


cdef inline uint64_t _mix(int64_t key, uint64_t salt) noexcept nogil:
    """A keyed 64-bit finalizer (MurmurHash3's): every key bit moves every index bit."""
    cdef uint64_t h = <uint64_t>key + salt
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    h *= 0xc4ceb9fe1a85ec53ULL
    h ^= h >> 33
    return h


cdef int _resizeTable(TableMemory* memory, Table* table, uint64_t slots, uint64_t salt) noexcept nogil:
    """Move a table's entries into ``slots`` fresh slots (a power of two); -1, changing nothing, without memory."""
    cdef Slot* fresh = <Slot*>allocTable(memory, slots * sizeof(Slot))
    cdef Slot* old = table.slots
    cdef uint64_t oldSlots = 0 if old == NULL else table.mask + 1
    cdef uint64_t mask = slots - 1
    cdef uint64_t i, j
    if fresh == NULL:
        return -1
    for i in range(oldSlots):
        if old[i].key != 0:
            # The keys are distinct: the first empty slot is the place.
            j = _mix(old[i].key, salt) & mask
            while fresh[j].key != 0:
                j = (j + 1) & mask
            fresh[j] = old[i]
    freeTable(memory, old)
    table.slots = fresh
    table.mask = mask
    table.growAt = <Py_ssize_t>(slots * _GROW_NUM // _GROW_DEN)
    table.shrinkAt = 0 if slots <= _MIN_SLOTS else <Py_ssize_t>(slots // 8)
    return 0


cdef enum:
    _OTHER
    _PUT
    _GET
    _DEL


cdef inline int _verb(const char* p) noexcept nogil:
    """Which of the three lower-case verbs the three bytes at ``p`` spell, if any."""
    if p[0] == c'g' and p[1] == c'e' and p[2] == c't':
        return _GET
    if p[0] == c'p' and p[1] == c'u' and p[2] == c't':
        return _PUT
    if p[0] == c'd' and p[1] == c'e' and p[2] == c'l':
        return _DEL
    return _OTHER


cdef inline bint _parseRequest(
    const char* p, const char* nl, int* verb, int64_t* key, int64_t* value
) noexcept nogil:
    """
    Whether the line from ``p`` to its LF at ``nl`` is a request in the
    common form (see runChunk); if so, its verb, key and (for put) value.
    """
    cdef const char* q
    if nl - p < 5 or p[3] != c' ':
        return False
    verb[0] = _verb(p)
    if verb[0] == _OTHER:
        return False
    q = _parseInt(p + 4, nl, key)
    if q == NULL:
        return False
    if verb[0] == _PUT:
        if q == nl or q[0] != c' ':
            return False
        q = _parseInt(q + 1, nl, value)
    return q == nl


cdef inline char* _copy(char* out, const char* text, Py_ssize_t size) noexcept nogil:
    """Write one of the fixed reply lines at ``out``; return the byte after it."""
    memcpy(out, text, size)
    return out + size


cdef inline const char* _nextRequest(
    const char* p, const char* end, Py_ssize_t maxRequest, const char** lineEnd, int* verb, int64_t* key, int64_t* value
) noexcept nogil:
    """
    Skip the empty lines from ``p`` (they get no reply) and return where the
    next line starts; ``lineEnd`` is its LF if it is a complete request in
    the common form, parsed into ``verb``, ``key`` and ``value``, else NULL:
    every chunk loop stops at such a line.
    """
    cdef const char* nl
    lineEnd[0] = NULL
    while p < end:
        nl = <const char*>memchr(p, c'\n', end - p)
        if nl == NULL or nl - p > maxRequest:
            return p
        if nl != p:
            if _parseRequest(p, nl, verb, key, value):
                lineEnd[0] = nl
            return p
        p = nl + 1
    return p


cdef inline char* _reply(char* out, int outcome, int64_t value, Py_ssize_t* tally) noexcept nogil:
    """Write the reply line of ``outcome`` at ``out`` (``value`` for a get that found one) and count it; return the byte after it."""
    tally[outcome] += 1
    if outcome == _GOT:
        return _formatInt(out, value)
    if outcome == _STORED or outcome == _DELETED:
        return _copy(out, _OK, _OK_LEN)
    if outcome == _EXISTED:
        return _copy(out, _EXISTS, _EXISTS_LEN)
    return _copy(out, _NOT_FOUND, _NOT_FOUND_LEN)


cdef int _startTally(list counts, Py_ssize_t* tally) except -1:
    """Refuse counts too short for the tally; zero the tally."""
    cdef int i
    if len(counts) <= _LAST_COUNT:
        raise ValueError("counts has no place for every outcome")
    for i in range(_OUTCOMES):
        tally[i] = 0
    return 0


cdef int _addTally(Py_ssize_t* tally, list counts) except -1:
    """Add each outcome's count to its place in the server's request counters."""
    cdef int i
    for i in range(_OUTCOMES):
        if tally[i]:
            counts[_COUNT_AT[i]] += tally[i]
    return 0


cdef int _checkChunk(Py_ssize_t size, Py_ssize_t start, list counts, Py_ssize_t* tally) except -1:
    """Refuse a start outside the data or counts too short for the tally; zero the tally."""
    if start < 0 or start > size:
        raise ValueError("start is outside the data")
    return _startTally(counts, tally)


cdef inline void _putLE64(unsigned char* out, int64_t value) noexcept nogil:
    cdef uint64_t bits = <uint64_t>value
    cdef int i
    for i in range(8):
        out[i] = <unsigned char>(bits >> (8 * i))


cdef class CompiledStore:
    """
    The ``IStore`` that keeps everything in a C hash map, with the
    semantics of ``MemoryStore``, plus ``runChunk`` for the protocol.

    The map is open addressing with linear probing over 16-byte slots of
    (key, value), hashed with a random salt per store so that clients
    cannot easily choose colliding keys. Key 0 marks an empty slot (fresh
    tables come zeroed); the key 0 itself is kept beside the tables, which
    live in blocks fit for huge pages (kvtwist.compiled._tablememory).
    Deletion shifts later entries of the run back, so there are no
    tombstones and churn never slows lookups. The top bits of a key's
    hash pick one of 256 tables, which doubles beyond 11/16 full and
    halves below 1/8: growing moves 1/256 of the keys, so no put stalls
    the server for long (one table of 3M keys took 0.2 s to double).
    """

    cdef Table _tables[_SHARDS]
    # Where the tables' slots live (kvtwist.compiled._tablememory).
    cdef TableMemory _memory
    # Entries in the tables (the key 0 not included).
    cdef Py_ssize_t _used
    cdef bint _hasZero
    cdef int64_t _zeroValue
    cdef uint64_t _salt
    cdef Py_ssize_t _room
    # runChunk's reply buffer, kept between calls.
    cdef char* _out
    cdef Py_ssize_t _outSize
    # runJournaledChunk's journal records not yet written, and what undoes each.
    cdef char* _records
    cdef Undo* _undo
    cdef Py_ssize_t _pending
    cdef Py_ssize_t _pendingRoom

    def __cinit__(self):
        cdef int i
        self._salt = int.from_bytes(os.urandom(8), "little")
        for i in range(_SHARDS):
            if _resizeTable(&self._memory, &self._tables[i], _MIN_SLOTS, self._salt) < 0:
                raise MemoryError()

    def __init__(self, items=None, maxKeys=None):
        """
        ``items``, (key, value) pairs, become the store's contents (the first
        of a repeated key wins). With ``maxKeys``, a put of a new key beyond
        that many is refused with ``StoreFull``, as in ``MemoryStore``;
        gets and dels go on.
        """
        cdef int64_t key, value
        self._room = (<Py_ssize_t>maxKeys) if maxKeys is not None else PY_SSIZE_T_MAX
        if items is not None:
            for key, value in items:
                self._insert(key, value)

    def __dealloc__(self):
        freeAllTables(&self._memory)
        free(self._out)
        free(self._records)
        free(self._undo)

    # The map

    cdef inline Slot* _find(self, int64_t key, Table** where) noexcept nogil:
        """The slot holding ``key`` (not 0), or the empty slot where it would go; its table in ``where``."""
        cdef uint64_t h = _mix(key, self._salt)
        cdef Table* table = &self._tables[h >> (64 - _SHARD_BITS)]
        cdef Slot* slots = table.slots
        cdef uint64_t mask = table.mask
        cdef uint64_t i = h & mask
        while slots[i].key != key and slots[i].key != 0:
            i = (i + 1) & mask
        where[0] = table
        return &slots[i]

    cdef inline bint _has(self, int64_t key) noexcept nogil:
        cdef Table* table
        if key == 0:
            return self._hasZero
        return self._find(key, &table).key != 0

    cdef inline bint _lookup(self, int64_t key, int64_t* value) noexcept nogil:
        cdef Slot* slot
        cdef Table* table
        if key == 0:
            value[0] = self._zeroValue
            return self._hasZero
        slot = self._find(key, &table)
        value[0] = slot.value
        return slot.key != 0

    cdef inline int _tryPut(self, int64_t key, int64_t value) noexcept nogil:
        """
        Store ``value`` under ``key`` unless the key exists: 1 if stored,
        0 if the key exists, -1 (changing nothing) when the store is full
        or memory is short to grow.
        """
        cdef Slot* slot
        cdef Table* table
        if key == 0:
            if self._hasZero:
                return 0
            if self._count() >= self._room:
                return -1
            self._hasZero = True
            self._zeroValue = value
            return 1
        slot = self._find(key, &table)
        if slot.key != 0:
            return 0
        if self._count() >= self._room:
            return -1
        if table.used >= table.growAt:
            if _resizeTable(&self._memory, table, (table.mask + 1) * 2, self._salt) < 0:
                return -1
            slot = self._find(key, &table)
        slot.key = key
        slot.value = value
        table.used += 1
        self._used += 1
        return 1

    cdef int _insert(self, int64_t key, int64_t value) except -1:
        """A put beyond any limit on keys (loading): 1 if stored, 0 if the key exists."""
        cdef Py_ssize_t room = self._room
        cdef int stored
        self._room = PY_SSIZE_T_MAX
        stored = self._tryPut(key, value)
        self._room = room
        if stored < 0:
            raise MemoryError()
        return stored

    cdef bint _remove(self, int64_t key) noexcept nogil:
        """Remove ``key``; True if it was there."""
        cdef Table* table
        cdef Slot* slots
        cdef Slot* slot
        cdef uint64_t mask, hole, j, home
        if key == 0:
            if not self._hasZero:
                return False
            self._hasZero = False
            return True
        slot = self._find(key, &table)
        if slot.key == 0:
            return False
        slots, mask = table.slots, table.mask
        hole = j = <uint64_t>(slot - slots)
        while True:
            j = (j + 1) & mask
            if slots[j].key == 0:
                break
            home = _mix(slots[j].key, self._salt) & mask
            # The entry at j may fill the hole unless its home lies
            # cyclically after the hole and at or before j.
            if ((home - hole - 1) & mask) >= ((j - hole) & mask):
                slots[hole] = slots[j]
                hole = j
        slots[hole].key = 0
        slots[hole].value = 0
        table.used -= 1
        self._used -= 1
        if table.used < table.shrinkAt:
            # Without memory for the smaller table, the bigger one stays.
            _resizeTable(&self._memory, table, (mask + 1) // 2, self._salt)
        return True

    cdef inline Py_ssize_t _count(self) noexcept nogil:
        return self._used + self._hasZero

    cdef int _assign(self, int64_t key, int64_t value) except -1:
        """Set ``key`` to ``value``, whether or not it exists, beyond any limit on keys (replay, undo)."""
        cdef Slot* slot
        cdef Table* table
        if self._insert(key, value):
            return 0
        if key == 0:
            self._zeroValue = value
        else:
            slot = self._find(key, &table)
            slot.value = value
        return 0

    # IStore

    @property
    def full(self):
        """Whether a put of a new key would be refused."""
        return self._count() >= self._room

    def put(self, int64_t key, int64_t value, batch):
        cdef int stored = self._tryPut(key, value)
        if stored < 0:
            if self._count() >= self._room:
                raise StoreFull(STORE_FULL)
            raise MemoryError()
        return stored == 1

    def get(self, int64_t key, batch):
        cdef int64_t value
        if self._lookup(key, &value):
            return value
        return None

    def delete(self, int64_t key, batch):
        return self._remove(key)

    def deliver(self, target, batch):
        target.sendReplies(batch)

    def items(self):
        """Every (key, value) pair, in no particular order, as they were when called."""
        cdef int t
        cdef uint64_t i
        cdef Slot* slots
        cdef list pairs = []
        if self._hasZero:
            pairs.append((0, self._zeroValue))
        for t in range(_SHARDS):
            slots = self._tables[t].slots
            for i in range(self._tables[t].mask + 1):
                if slots[i].key != 0:
                    pairs.append((slots[i].key, slots[i].value))
        return iter(pairs)

    def __len__(self):
        return self._count()

    def __contains__(self, key):
        if not isinstance(key, int) or not (-(2**63) <= key < 2**63):
            return False
        return self._has(<int64_t>key)

    # Replay (kvtwist.storage.journal.ReplayTarget) and compaction

    def update(self, pairs):
        """Set each (key, value) of ``pairs``, overwriting, beyond any limit on keys: recovery's blind writes."""
        cdef int64_t key, value
        for key, value in pairs:
            self._assign(key, value)

    def pop(self, key, default=None):
        """Remove ``key``; its value, or ``default`` when it was not there."""
        cdef int64_t value
        if not isinstance(key, int) or not (-(2**63) <= key < 2**63):
            return default
        if not self._lookup(<int64_t>key, &value):
            return default
        self._remove(<int64_t>key)
        return value

    def reserve(self, Py_ssize_t count):
        """Grow each table to hold its share of ``count`` entries, so that recovery rehashes nothing."""
        cdef int t
        cdef uint64_t slots
        cdef Py_ssize_t share = count // _SHARDS + 1
        # A share plus a quarter for the spread between tables, below the growth threshold.
        share += share // 4
        slots = _MIN_SLOTS
        while <Py_ssize_t>(slots * _GROW_NUM // _GROW_DEN) < share:
            slots *= 2
        for t in range(_SHARDS):
            if self._tables[t].mask + 1 < slots:
                if _resizeTable(&self._memory, &self._tables[t], slots, self._salt) < 0:
                    raise MemoryError()

    def keyParts(self):
        """
        Every key, a table at a time, each listed only when asked for: a key
        never moves between tables, so one that stays in the store while the
        parts are taken is in exactly one (what a compaction's snapshot needs).
        """
        cdef int t
        cdef uint64_t i
        cdef Slot* slots
        cdef list keys
        yield [0] if self._hasZero else []
        for t in range(_SHARDS):
            keys = []
            slots = self._tables[t].slots
            for i in range(self._tables[t].mask + 1):
                if slots[i].key != 0:
                    keys.append(slots[i].key)
            yield keys

    def capacity(self):
        """The slots of all the tables, 16 bytes each: for tests and memory figures."""
        cdef int t
        cdef Py_ssize_t total = 0
        for t in range(_SHARDS):
            total += self._tables[t].mask + 1
        return total

    def tableBlocks(self):
        """(address, bytes, table size, tables) of each block the tables live in: for tests."""
        return [
            (<uintptr_t>block.base, block.bytes, block.tableBytes, block.used)
            for block in self._memory.blocks[:self._memory.count]
        ]

    # The chunk executor

    def runChunk(self, bytes data not None, Py_ssize_t start, Py_ssize_t maxRequest, list counts not None):
        """
        Run the complete lines of ``data`` from ``start`` that are in the
        common form, and stop at the first that is not, or at the end of
        the complete lines, without consuming it.

        The common form is exactly ``put K V``, ``get K`` or ``del K``,
        lower case, single spaces, each number an optional '-' and 1 to 19
        ASCII digits within the signed 64-bit range, the line no longer than ``maxRequest`` bytes; and an
        empty line, which gets no reply, as in the protocol. A put of a new
        key into a full store is not common: the Python path refuses it.

        Returns the replies and the offset just after the last line run,
        and adds the count of each outcome to ``counts`` (indices from
        kvtwist.server.stats).
        """
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef const char* base = PyBytes_AS_STRING(data)
        cdef const char* p
        cdef char* out
        cdef char* o
        cdef Py_ssize_t tally[_OUTCOMES]
        _checkChunk(size, start, counts, tally)
        out = o = self._replyBuffer((size - start) * _REPLY_PER_BYTE)
        p = self._runLines(base + start, base + size, maxRequest, &o, tally)
        return self._replies(out, o, tally, counts), p - base

    cdef char* _replyBuffer(self, Py_ssize_t need) except NULL:
        """A buffer of ``need`` bytes for a chunk's replies: the one kept between calls when it is big enough."""
        cdef char* out
        # (An empty chunk still gets a buffer: NULL means an error here.)
        need = max(need, 1)
        if need <= self._outSize:
            return self._out
        out = <char*>malloc(need)
        if out == NULL:
            raise MemoryError()
        if need <= _KEPT_REPLY_BYTES:
            free(self._out)
            self._out = out
            self._outSize = need
        return out

    cdef bytes _replies(self, char* out, char* end, Py_ssize_t* tally, list counts):
        """The replies written from ``out`` to ``end`` (freeing a buffer that is not kept), with the tally counted."""
        replies = self._repliesOf(out, end)
        _addTally(tally, counts)
        return replies

    cdef bytes _repliesOf(self, char* out, char* end):
        """The replies written from ``out`` to ``end``, freeing the buffer if it is not the kept one."""
        try:
            return PyBytes_FromStringAndSize(out, end - out)
        finally:
            if out != self._out:
                free(out)

    cdef const char* _runLines(
        self, const char* p, const char* end, Py_ssize_t maxRequest, char** reply, Py_ssize_t* tally
    ) noexcept nogil:
        """runChunk's loop: run lines from ``p``, append replies at ``reply[0]``, tally outcomes; return where it stopped."""
        cdef const char* nl
        cdef char* o = reply[0]
        cdef int verb, stored
        cdef int64_t key, value
        while True:
            p = _nextRequest(p, end, maxRequest, &nl, &verb, &key, &value)
            if nl == NULL:
                break
            if verb == _GET:
                if self._lookup(key, &value):
                    o = _reply(o, _GOT, value, tally)
                else:
                    o = _reply(o, _GOT_NONE, 0, tally)
            elif verb == _PUT:
                stored = self._tryPut(key, value)
                if stored == 1:
                    o = _reply(o, _STORED, 0, tally)
                elif stored == 0:
                    o = _reply(o, _EXISTED, 0, tally)
                else:
                    break
            elif self._remove(key):
                o = _reply(o, _DELETED, 0, tally)
            else:
                o = _reply(o, _DELETED_NONE, 0, tally)
            p = nl + 1
        reply[0] = o
        return p


    # The journaled chunk executor

    def runJournaledChunk(
        self, bytes data not None, Py_ssize_t start, Py_ssize_t maxRequest, list counts not None,
        dict dirty, Py_ssize_t appended,
    ):
        """
        ``runChunk`` for a journaled store (kvtwist.storage.journaled), with
        its semantics: each put or del that changes something also adds its
        journal record to the pending records, numbered on from
        ``appended``, with what undoes it. The caller writes them
        (``pendingRecords``), then either confirms them or, if the write
        failed, undoes them, so that nothing stays applied that is not in
        the journal.

        ``dirty`` maps each key whose last change is not durable yet to that
        change's record number (None when the store does not track it); a
        write here enters its own. Returns the replies, the offset just
        after the last line run, the new ``appended``, and the newest record
        the replies depend on (0 for none), as ``Batch.waitFor``.
        """
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef const char* base = PyBytes_AS_STRING(data)
        cdef const char* p = base + start
        cdef const char* end = base + size
        cdef const char* nl
        cdef char* out
        cdef char* o
        cdef Py_ssize_t tally[_OUTCOMES]
        cdef Py_ssize_t waitFor = 0
        cdef int verb
        cdef int64_t key, value, old
        _checkChunk(size, start, counts, tally)
        out = o = self._replyBuffer((size - start) * _REPLY_PER_BYTE)
        try:
            while True:
                p = _nextRequest(p, end, maxRequest, &nl, &verb, &key, &value)
                if nl == NULL:
                    break
                if verb == _GET:
                    waitFor = _dependOn(dirty, key, waitFor)
                    if self._lookup(key, &value):
                        o = _reply(o, _GOT, value, tally)
                    else:
                        o = _reply(o, _GOT_NONE, 0, tally)
                elif verb == _PUT:
                    if self._has(key):
                        waitFor = _dependOn(dirty, key, waitFor)
                        o = _reply(o, _EXISTED, 0, tally)
                    else:
                        # A full store refuses on the Python path, which says so.
                        if self._count() >= self._room:
                            break
                        self._journal(_OP_PUT, key, value, False, 0)
                        if self._tryPut(key, value) < 0:
                            self._pending -= 1
                            raise MemoryError()
                        appended += 1
                        waitFor = _changed(dirty, key, appended)
                        o = _reply(o, _STORED, 0, tally)
                else:
                    if self._lookup(key, &old):
                        self._journal(_OP_DEL, key, 0, True, old)
                        self._remove(key)
                        appended += 1
                        waitFor = _changed(dirty, key, appended)
                        o = _reply(o, _DELETED, 0, tally)
                    else:
                        waitFor = _dependOn(dirty, key, waitFor)
                        o = _reply(o, _DELETED_NONE, 0, tally)
                p = nl + 1
        except BaseException:
            if out != self._out:
                free(out)
            raise
        return self._replies(out, o, tally, counts), p - base, appended, waitFor

    cdef int _journal(self, unsigned char op, int64_t key, int64_t value, bint had, int64_t old) except -1:
        """Add the record of a change about to be applied, and what undoes it, to the pending ones."""
        cdef Py_ssize_t room
        cdef char* records
        cdef Undo* undo
        cdef unsigned char* record
        cdef uint64_t crc
        cdef int i
        if self._pending == self._pendingRoom:
            room = self._pendingRoom * 2 if self._pendingRoom else 16
            records = <char*>realloc(self._records, room * _RECORD_SIZE)
            if records == NULL:
                raise MemoryError()
            self._records = records
            undo = <Undo*>realloc(self._undo, room * sizeof(Undo))
            if undo == NULL:
                raise MemoryError()
            self._undo = undo
            self._pendingRoom = room
        record = <unsigned char*>self._records + self._pending * _RECORD_SIZE
        record[0] = op
        _putLE64(record + 1, key)
        _putLE64(record + 9, value)
        crc = _crc32(PyBytes_FromStringAndSize(<char*>record, _RECORD_SIZE - 4))
        for i in range(4):
            record[17 + i] = <unsigned char>(crc >> (8 * i))
        self._undo[self._pending].key = key
        self._undo[self._pending].value = old
        self._undo[self._pending].had = had
        self._pending += 1
        return 0

    def pendingRecords(self):
        """The journal records of the changes runJournaledChunk made since the last confirm or undo, in order."""
        return PyBytes_FromStringAndSize(self._records, self._pending * _RECORD_SIZE)

    def confirmPending(self):
        """The pending records are in the journal: forget them."""
        self._pending = 0

    def undoPending(self):
        """The pending records could not be written: take their changes back, newest first, and forget them."""
        cdef Undo* undo
        while self._pending:
            self._pending -= 1
            undo = &self._undo[self._pending]
            if undo.had:
                self._assign(undo.key, undo.value)
            else:
                self._remove(undo.key)


cdef inline Py_ssize_t _dependOn(dict dirty, int64_t key, Py_ssize_t waitFor) except -1:
    """``waitFor``, or the number of the record that last changed ``key`` if that is newer and not yet durable."""
    cdef PyObject* number
    cdef Py_ssize_t n
    if not dirty:
        return waitFor
    number = PyDict_GetItem(dirty, PyLong_FromLongLong(key))
    if number == NULL:
        return waitFor
    n = PyLong_AsSsize_t(<object>number)
    return n if n > waitFor else waitFor


cdef inline Py_ssize_t _changed(dict dirty, int64_t key, Py_ssize_t number) except -1:
    """Note that record ``number`` changed ``key``; the replies now depend on it (the newest record)."""
    if dirty is not None:
        PyDict_SetItem(dirty, PyLong_FromLongLong(key), number)
    return number


cdef class ChunkRunner:
    """
    A server's in-memory fast path, whole in C: ``CompiledStore.runChunk``
    on a chunk from its start, with the server's request limit, counting
    each outcome and the bytes it ran in C.

    The protocol calls ``run`` for every read, and on CPython each Python
    operation around the call counts against a request that costs about
    10 µs in all: a limit read from the factory, a byte count and the
    outcomes added to Python ints cost about 2% of the throughput
    (docs/performance.md). The server's stats add these counts to the
    ones its Python path keeps (``kvtwist.server.stats.ServerStats``).
    """

    cdef CompiledStore _store
    cdef Py_ssize_t _maxRequest
    cdef Py_ssize_t _tally[_OUTCOMES]
    cdef Py_ssize_t _bytes
    cdef object _latency
    cdef Py_ssize_t _timeEvery
    cdef Py_ssize_t _untilTimed

    def __init__(self, CompiledStore store not None, Py_ssize_t maxRequest, latency=None, Py_ssize_t timeEvery=1):
        """
        With a ``latency`` histogram (``--metrics``), one chunk in
        ``timeEvery`` run here, the first among them, is timed and observed
        there, once per reply. Counting down and reading the clock in C
        spares every chunk the Python checks that would choose the chunks
        to time, so that the protocol takes this path with metrics on too.
        """
        if timeEvery < 1:
            raise ValueError(f"timeEvery must be at least 1, not {timeEvery}")
        self._store = store
        self._maxRequest = maxRequest
        self._latency = latency
        self._timeEvery = timeEvery
        self._untilTimed = 1 if latency is not None else 0

    def run(self, bytes data not None):
        """``store.runChunk(data, 0, maxRequest, counts)``, counted here."""
        cdef CompiledStore store = self._store
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef const char* base = PyBytes_AS_STRING(data)
        cdef const char* p
        cdef char* out
        cdef char* o
        cdef timespec began
        cdef bint timed = False
        if self._untilTimed:
            self._untilTimed -= 1
            if not self._untilTimed:
                self._untilTimed = self._timeEvery
                timed = True
                clock_gettime(CLOCK_MONOTONIC, &began)
        out = o = store._replyBuffer(size * _REPLY_PER_BYTE)
        p = store._runLines(base, base + size, self._maxRequest, &o, self._tally)
        self._bytes += p - base
        if timed and o != out:
            self._observe(&began, out, o)
        return store._repliesOf(out, o), p - base

    cdef int _observe(self, timespec* began, const char* out, const char* end) except -1:
        """File the time since ``began`` once for each reply in ``out`` up to ``end``."""
        cdef timespec now
        cdef Py_ssize_t replies = 0
        cdef const char* p = out
        clock_gettime(CLOCK_MONOTONIC, &now)
        while p < end:
            p = <const char*>memchr(p, c'\n', end - p)
            if p == NULL:
                break
            replies += 1
            p += 1
        seconds = (now.tv_sec - began.tv_sec) + (now.tv_nsec - began.tv_nsec) * 1e-9
        self._latency.observe(seconds, replies)
        return 0

    def requestCounts(self):
        """The requests run here, by kind: a list indexed as ``ServerStats.requests``."""
        cdef int i
        counts = [0] * len(_stats.REQUEST_KINDS)
        for i in range(_OUTCOMES):
            counts[_COUNT_AT[i]] = self._tally[i]
        return counts

    @property
    def bytesRun(self):
        """The bytes of the requests run here."""
        return self._bytes


# The remote engines' path: the same parsing, and the replies formatted
# from the engine's outcomes, for a chunk whose requests go to an
# IRemoteStore (kvtwist.server.protocol).

cdef object _PUT_CODE = PUT
cdef object _GET_CODE = GET
cdef object _DELETE_CODE = DELETE
cdef object _ZERO = 0
cdef object _OPERATION = Operation

cdef extern from *:
    """
    /* An Operation (a tuple subclass) made as tuple.__new__ makes one, without the argument tuple. */
    static PyObject* kvtwist_newOperation(PyObject* type, PyObject* command, PyObject* key, PyObject* value) {
        PyObject* operation = ((PyTypeObject*)type)->tp_alloc((PyTypeObject*)type, 3);
        if (operation == NULL) {
            return NULL;
        }
        Py_INCREF(command);
        PyTuple_SET_ITEM(operation, 0, command);
        Py_INCREF(key);
        PyTuple_SET_ITEM(operation, 1, key);
        Py_INCREF(value);
        PyTuple_SET_ITEM(operation, 2, value);
        return operation;
    }
    """
    object _newOperation "kvtwist_newOperation" (object type, object command, object key, object value)


def parseChunk(bytes data not None, Py_ssize_t maxRequest):
    """
    The ``Operation`` of each complete line of ``data`` in the common form
    (as ``CompiledStore.runChunk`` takes them), up to the first line that
    is not, and the offset just after the last line taken. Empty lines are
    taken and give no operation, as in the protocol.
    """
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef const char* base = PyBytes_AS_STRING(data)
    cdef const char* p = base
    cdef const char* end = base + size
    cdef const char* nl
    cdef int verb
    cdef int64_t key, value = 0
    cdef list operations = []
    while True:
        p = _nextRequest(p, end, maxRequest, &nl, &verb, &key, &value)
        if nl == NULL:
            break
        if verb == _PUT:
            operations.append(_newOperation(_OPERATION, _PUT_CODE, key, value))
        else:
            operations.append(_newOperation(_OPERATION, _GET_CODE if verb == _GET else _DELETE_CODE, key, _ZERO))
        p = nl + 1
    return operations, p - base


def formatOutcomes(list operations not None, list outcomes not None, list counts not None):
    """
    The reply lines for what an engine answered to ``operations``, with
    each outcome counted in ``counts``; None if any outcome is an error,
    whose text only the Python path writes.
    """
    cdef Py_ssize_t n = len(operations)
    cdef Py_ssize_t i
    cdef Py_ssize_t tally[_OUTCOMES]
    cdef char* out
    cdef char* o
    cdef object command, outcome
    if len(outcomes) != n:
        raise ValueError("one outcome per operation")
    _startTally(counts, tally)
    for i in range(n):
        outcome = outcomes[i]
        if outcome is not None and outcome is not True and outcome is not False and type(outcome) is not int:
            return None
    # The longest reply line: a value, 21 bytes.
    out = <char*>malloc(n * 21 + 1)
    if out == NULL:
        raise MemoryError()
    o = out
    try:
        for i in range(n):
            command = (<tuple>operations[i])[0]
            outcome = outcomes[i]
            if command == _GET_CODE:
                if outcome is None:
                    o = _reply(o, _GOT_NONE, 0, tally)
                else:
                    o = _reply(o, _GOT, outcome, tally)
            elif command == _PUT_CODE:
                o = _reply(o, _STORED if outcome is True else _EXISTED, 0, tally)
            else:
                o = _reply(o, _DELETED if outcome is True else _DELETED_NONE, 0, tally)
        replies = PyBytes_FromStringAndSize(out, o - out)
    finally:
        free(out)
    _addTally(tally, counts)
    return replies
