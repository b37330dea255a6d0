"""
Signed 64-bit integers in decimal, read and written at C level: shared by
the compiled path's modules (inline, so each module has its own copy).
"""

from libc.stdint cimport int64_t, uint64_t

cdef enum:
    # Digits of the longest int64 (without leading zeros beyond these);
    # longer numbers go to the Python path.
    _MAX_DIGITS = 19
    # Bytes of the longest int64 in decimal: "-9223372036854775808".
    _MAX_DECIMAL = 20


cdef inline const char* _parseInt(const char* p, const char* end, int64_t* out) noexcept nogil:
    """
    Parse an optional '-' and 1 to 19 ASCII digits at ``p`` that make a
    signed 64-bit integer; return the first byte after them, or NULL when
    that is not a number of the common form (the Python path judges it,
    and refuses one out of range).
    """
    cdef bint negative = False
    # 19 digits always fit 64 unsigned bits; the range is checked after.
    cdef uint64_t magnitude = 0
    cdef const char* first
    if p < end and p[0] == c'-':
        negative = True
        p += 1
    first = p
    while p < end and c'0' <= p[0] <= c'9':
        if p - first == _MAX_DIGITS:
            return NULL
        magnitude = magnitude * 10 + <uint64_t>(p[0] - c'0')
        p += 1
    if p == first:
        return NULL
    if negative:
        if magnitude > <uint64_t>9223372036854775808ULL:
            return NULL
        # Two's complement: the negation of 2**63 is INT64_MIN itself.
        out[0] = <int64_t>(<uint64_t>0 - magnitude)
    else:
        if magnitude > <uint64_t>9223372036854775807ULL:
            return NULL
        out[0] = <int64_t>magnitude
    return p


cdef inline char* _formatDigits(char* out, int64_t value) noexcept nogil:
    """Write ``value`` in canonical decimal at ``out``; return the byte after it."""
    cdef char digits[20]
    cdef int n = 0
    cdef uint64_t magnitude
    if value < 0:
        out[0] = c'-'
        out += 1
        # Negating in unsigned arithmetic is defined for INT64_MIN too.
        magnitude = 0 - <uint64_t>value
    else:
        magnitude = <uint64_t>value
    while True:
        digits[n] = <char>(c'0' + magnitude % 10)
        n += 1
        magnitude //= 10
        if magnitude == 0:
            break
    while n > 0:
        n -= 1
        out[0] = digits[n]
        out += 1
    return out


cdef inline char* _formatInt(char* out, int64_t value) noexcept nogil:
    """Write ``value`` in canonical decimal and a LF at ``out``; return the byte after them."""
    out = _formatDigits(out, value)
    out[0] = c'\n'
    return out + 1
