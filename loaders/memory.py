"""Give freed memory back to the OS between the planning and streaming phases.

Planning an epoch over millions of cells makes short-lived per-cell arrays; glibc and Arrow's
allocator keep the freed pages, and the streaming buffers allocated next land beside them, so peak
RSS would grow with the atlas although nothing per-cell is alive. Trimming both heaps keeps the
streaming peak set by the IO configuration.
"""
from __future__ import annotations

import ctypes
import ctypes.util


def release_free_memory() -> None:
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except ImportError:  # pragma: no cover - pyarrow is a dependency of the SOMA path only
        pass
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):  # glibc only
            libc.malloc_trim(0)
