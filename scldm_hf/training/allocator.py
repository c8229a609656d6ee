"""glibc's allocator told to keep freed memory for reuse on CPU, so that the large activations of every training step
are not mapped and page-faulted afresh (issue 20: up to 2.4M page faults and ~half the step in system time at the
scLDM base scale; benchmarks/RESULTS.md, "#20 items 1 and 6", run B, and "built-in allocator setting")."""

import ctypes
import os
import platform

# mallopt parameter ids (glibc malloc.h) -> the environment variable that sets the same at start-up, and our value
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 1 << 30),  # blocks below 1 GiB come from the heap, not mmap
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 1 << 30),  # up to 1 GiB of freed heap is kept, not returned
    "MALLOC_TOP_PAD_": (M_TOP_PAD, 256 << 20),  # the heap grows 256 MiB at a time
}


def keep_freed_memory() -> list[str]:
    """Apply `KEEP_FREED_MEMORY` with ``mallopt`` where this process runs on glibc, each setting unless its environment
    variable is set already (the user's choice wins); returns the variables applied (empty elsewhere).

    Results do not change; the process keeps up to ~1.3 GiB of freed memory for reuse instead of returning it.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return []
    libc = ctypes.CDLL("libc.so.6")
    return [name for name, (parameter, value) in KEEP_FREED_MEMORY.items()
            if name not in os.environ and libc.mallopt(parameter, value) == 1]
