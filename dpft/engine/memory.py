"""CPU memory between steps: freed pages stay in the process (glibc malloc), so each step reuses them
instead of faulting fresh, kernel-zeroed pages in.

Why (issue 23): a DP step holds more at once than a non-private one — book-keeping keeps every Linear
layer's output gradient B until the clipped sum — so with glibc's defaults the heap grows past its trim
threshold during each backward and is handed back to the OS after it; the next step faults the same
memory in again, inside whichever op first writes it (gelu_backward, softmax_backward, ...). Measured with
`python benchmarks/step_phases.py` (MiniLM, B = 64, L = 64, 2 threads, docs/benchmarks.md §9): autograd's
backward in the bk step took 1.64 s with glibc's defaults and 1.01 s with freed memory kept, the
non-private step's 1.65 s and 1.62 s. The cost is memory: the process does not shrink between steps, and
the heap's blocks are reused less tightly, so peak RSS rises (MiniLM's bk step in `dpft bench`: 1.19× → 1.33×
the non-private step's; README's main job: 1.58 → 1.76 GB).

Set `DPFT_RETAIN_FREED_MEMORY=0` to keep glibc's defaults (a process that must give memory back between
steps). A no-op where the C library is not glibc. Not a privacy matter: only where the process' own
allocations come from."""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit: larger blocks are always mmap'd
_done: list[bool] = []


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Keep freed heap memory for reuse (no automatic trimming; blocks up to 32 MiB from the heap, not
    mmap); once per process. True when glibc accepted both settings."""
    if _done:
        return _done[0]
    ok = False
    if os.environ.get("DPFT_RETAIN_FREED_MEMORY", "1") != "0":
        libc = _libc()
        try:
            ok = libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and \
                bool(libc.mallopt(M_TRIM_THRESHOLD, -1))  # -1: never trim (man mallopt)
        except AttributeError:
            ok = False
    _done.append(ok)
    return ok


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS now (collect, then glibc's malloc_trim — which trims whatever
    the threshold above says): `dpft bench` does it before each path's memory baseline, else a later path
    reuses the heap an earlier one grew and reads ~0."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
