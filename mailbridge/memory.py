"""Handing freed memory back to the operating system between batches.

glibc keeps what Python frees in its heaps for reuse, and the sizes a batch allocates (raw mails of a few
kB to several MB, their pickles for the parser workers, the results) leave holes it seldom returns: the
daemon settled several MiB above what it uses. `malloc_trim(0)` releases every free page, in every arena,
in well under a millisecond; once per batch of 50 mails, in the daemon's main process.

Not in the parser workers: there it cost more than it saved. Each chunk then faults its pages in again
(~23 more page faults and ~50 µs more system time per mail, measured over 500 bench mails), for a peak
that barely moved. Not glibc: nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_libc_name = ctypes.util.find_library("c")
if _libc_name:
    try:
        _trim = ctypes.CDLL(_libc_name).malloc_trim
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim
        _trim = None


def release_free_memory() -> None:
    if _trim is not None:
        _trim(0)
