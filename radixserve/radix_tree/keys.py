"""Token keys as int64 buffers: what the tree stores and compares instead of Python ints.

A node keeps its run of tokens as one ``bytes`` object, 8 bytes per token in
native byte order. However long the run, that is one allocation to make and one
to free, and comparing two runs is one ``memcmp``. Tuples of Python ints cost
a conversion per token on the way in and a deallocation per token on eviction.

A caller's key is read through two memoryviews of its own buffer, with no copy
when it is a numpy int64 array or an ``array('q')`` (what the scheduler
passes): ``tokens`` (format ``'q'``: ``tokens[i]`` is token i as an int, used
to find a child) and ``raw`` (format ``'B'``: sliced without copying, and
compared with ``bytes.startswith``). A list or tuple is its own ``tokens``
and is packed once per call into ``bytes`` for ``raw`` (``struct``, about
twice as fast as building an ``array('q')`` from a list). Anything else (a
range, numpy arrays of other dtypes or strides, a torch tensor) goes through
``tolist()`` or iteration and the same packing.

The views must not outlive the call that made them: while a memoryview of an
``array`` exists, the array cannot grow, and the scheduler appends to its
token arrays. The tree stores ``bytes`` copies only.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Any

TOKEN_BYTES = 8
BYTEORDER = sys.byteorder
# Formats of one-dimensional signed 64-bit buffers (numpy int64 reports 'l' on LP64).
_INT64_FORMATS = frozenset({"q", "l", "<q", "<l", "=q", "=l", "@q", "@l"})


def key_views(key: Sequence[int]) -> tuple[Sequence[int], bytes | memoryview]:
    """``(tokens, raw)``: ``key``'s tokens as ints by index, and its int64 bytes.
    Without a copy for numpy int64 arrays and ``array('q')``."""
    if type(key) is array and key.typecode == "q":  # exactly array, as below: subclasses take the slow path
        tokens = memoryview(key)
        return tokens, tokens.cast("B")
    kind = type(key)
    if kind is tuple or kind is list:  # before memoryview(): its TypeError is slow to raise
        return key, _pack(key)
    try:
        view = memoryview(key)  # type: ignore[arg-type]
    except TypeError:
        view = None
    if (
        view is not None
        and view.ndim == 1
        and view.itemsize == TOKEN_BYTES
        and view.format in _INT64_FORMATS
        and view.c_contiguous
    ):
        raw = view.cast("B")
        return raw.cast("q"), raw
    tolist = getattr(key, "tolist", None)  # other numpy dtypes, torch tensors
    raw = memoryview(_pack(tolist() if tolist is not None else key))
    return raw.cast("q"), raw


def _pack(items: Any) -> bytes:
    try:
        return struct.pack(f"{len(items)}q", *items)
    except (TypeError, struct.error):
        raise ValueError(
            f"a key must be a sequence of ints that fit in int64, got {type(items).__name__}"
        ) from None


def to_bytes(key: Sequence[int]) -> bytes:
    """``key`` as the tree stores it (8 bytes per token)."""
    return bytes(key_views(key)[1])


def to_tuple(key_bytes: bytes) -> tuple[int, ...]:
    """The tokens of a stored run, as a tuple of ints (for reading, not for the hot path)."""
    return tuple(memoryview(key_bytes).cast("q").tolist())


def first_page(key_bytes: bytes, page_size: int) -> Any:
    """The children-dict key of a run: its first token (page size 1) or first page tuple."""
    if page_size == 1:
        return int.from_bytes(key_bytes[:TOKEN_BYTES], BYTEORDER, signed=True)
    return tuple(memoryview(key_bytes)[: TOKEN_BYTES * page_size].cast("q").tolist())


def common_tokens(key_bytes: bytes, raw: bytes | memoryview, offset: int, limit: int) -> int:
    """How many leading tokens ``key_bytes`` shares with ``raw[offset:]``, at most ``limit``.

    Galloping then bisecting, each probe one ``startswith`` (a memcmp of the
    probed window), so a long shared run costs O(log n) calls and no copy.
    """
    lo = 0
    step = 64
    while True:
        if lo >= limit:
            return limit
        hi = min(lo + step, limit)
        if not key_bytes.startswith(
            raw[offset + TOKEN_BYTES * lo : offset + TOKEN_BYTES * hi], TOKEN_BYTES * lo
        ):
            break
        lo = hi
        step *= 2
    # Tokens [0, lo) agree; some token in [lo, hi) differs.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if key_bytes.startswith(
            raw[offset + TOKEN_BYTES * lo : offset + TOKEN_BYTES * mid], TOKEN_BYTES * lo
        ):
            lo = mid
        else:
            hi = mid
    return lo
