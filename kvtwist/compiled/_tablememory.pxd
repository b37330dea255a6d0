"""
Memory for the compiled map's tables, in blocks the kernel may back with
huge pages.

Every get looks up a slot at a random place in the map, and the miss in
the data cache comes with a miss in the TLB (the cache of address
translations), dear in a virtual machine: 4 KiB pages make a map of a few
MiB span a thousand pages. ``malloc`` puts the 256 small tables anywhere in
its heap. Here tables of the same size share 2 MiB blocks, mapped aligned and
advised with ``MADV_HUGEPAGE``, so that Linux can map each block with one
entry (docs/performance.md has the figures). Elsewhere, or where the
kernel declines, the blocks are ordinary memory and nothing else changes.

A table of a block or more gets whole blocks of its own.
A freed table's pages go back to the kernel at once, and a block is
unmapped as soon as its last table is freed, so a map that has grown
keeps at most one partly used block per table size. Inline, as the only
user is kvtwist.compiled._chunk.
"""

from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset


cdef extern from *:
    """
    #include <stdint.h>
    #include <sys/mman.h>
    #include <unistd.h>
    /* `size` bytes of fresh memory aligned to `alignment` (a power of two
       that divides `size`), advised as huge pages where the kernel has
       them; NULL without memory. Mapped rather than taken from malloc,
       whose heap would keep a freed block resident. */
    static void* kvtwist_mapAligned(size_t alignment, size_t size) {
        size_t spare = alignment;
        char* p = mmap(NULL, size + spare, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        size_t head;
        if (p == MAP_FAILED)
            return NULL;
        head = (alignment - (uintptr_t)p % alignment) % alignment;
        if (head)
            munmap(p, head);
        if (spare - head)
            munmap(p + head + size, spare - head);
        p += head;
    #ifdef MADV_HUGEPAGE
        (void)madvise(p, size, MADV_HUGEPAGE);
    #endif
        return p;
    }
    static void kvtwist_unmap(void* p, size_t size) {
        munmap(p, size);
    }
    /* Give the pages of `size` bytes at `p` back to the kernel, keeping the
       mapping (they read as zeros after); nothing for less than a page. */
    static void kvtwist_release(void* p, size_t size) {
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        if (size >= page && (uintptr_t)p % page == 0)
            (void)madvise(p, size - size % page, MADV_DONTNEED);
    }
    """
    void* kvtwist_mapAligned(size_t alignment, size_t size) nogil
    void kvtwist_unmap(void* p, size_t size) nogil
    void kvtwist_release(void* p, size_t size) nogil


cdef enum:
    # One huge page on x86-64 and most arm64 kernels.
    _BLOCK_BYTES = 2 * 1024 * 1024


# A block, and the tables of one size cut from it.
cdef struct Block:
    char* base
    size_t bytes
    size_t tableBytes
    # Tables handed out, and how far from base they have been cut.
    size_t used
    size_t cut
    # Tables given back, each holding the next one's address in its first bytes.
    void* returned


cdef struct TableMemory:
    Block* blocks
    size_t count
    size_t room


cdef inline void* allocTable(TableMemory* memory, size_t tableBytes) noexcept nogil:
    """A zeroed table of ``tableBytes`` (a power of two, at least a pointer's size); NULL without memory."""
    cdef Block* block
    cdef void* table
    cdef size_t i
    for i in range(memory.count):
        block = &memory.blocks[i]
        if block.tableBytes == tableBytes and (block.returned != NULL or block.cut < block.bytes):
            break
    else:
        block = _newBlock(memory, tableBytes)
        if block == NULL:
            return NULL
    if block.returned != NULL:
        table = block.returned
        block.returned = (<void**>table)[0]
    else:
        table = block.base + block.cut
        block.cut += tableBytes
    block.used += 1
    memset(table, 0, tableBytes)
    return table


cdef inline Block* _newBlock(TableMemory* memory, size_t tableBytes) noexcept nogil:
    cdef Block* grown
    cdef size_t room
    cdef size_t blockBytes = _BLOCK_BYTES
    cdef char* base
    if tableBytes * 2 > _BLOCK_BYTES:
        blockBytes = (tableBytes + _BLOCK_BYTES - 1) // _BLOCK_BYTES * _BLOCK_BYTES
    if memory.count == memory.room:
        room = memory.room * 2 if memory.room else 16
        grown = <Block*>realloc(memory.blocks, room * sizeof(Block))
        if grown == NULL:
            return NULL
        memory.blocks, memory.room = grown, room
    base = <char*>kvtwist_mapAligned(_BLOCK_BYTES, blockBytes)
    if base == NULL:
        return NULL
    memory.blocks[memory.count] = Block(base, blockBytes, tableBytes, 0, 0, NULL)
    memory.count += 1
    return &memory.blocks[memory.count - 1]


cdef inline void freeTable(TableMemory* memory, void* table) noexcept nogil:
    """Give back a table that ``allocTable`` handed out (NULL: nothing)."""
    cdef uintptr_t address = <uintptr_t>table
    cdef Block* block
    cdef size_t i
    if table == NULL:
        return
    for i in range(memory.count):
        block = &memory.blocks[i]
        if <uintptr_t>block.base <= address < <uintptr_t>block.base + block.bytes:
            block.used -= 1
            if block.used == 0:
                kvtwist_unmap(block.base, block.bytes)
                memory.count -= 1
                memory.blocks[i] = memory.blocks[memory.count]
            else:
                # Its pages go back at once: a map that grows frees its old
                # tables one by one, and a block lives until its last goes,
                # which would hold both sizes' memory at the peak.
                kvtwist_release(table, block.tableBytes)
                (<void**>table)[0] = block.returned
                block.returned = table
            return


cdef inline void freeAllTables(TableMemory* memory) noexcept nogil:
    """Free every block, and the list of them."""
    cdef size_t i
    for i in range(memory.count):
        kvtwist_unmap(memory.blocks[i].base, memory.blocks[i].bytes)
    free(memory.blocks)
    memory.blocks, memory.count, memory.room = NULL, 0, 0
