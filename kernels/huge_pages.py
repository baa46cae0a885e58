"""Memory for what the kernels read at every prediction -- packed weights, a plan's buffers -- carved from large
blocks that the kernel may back with transparent huge pages (2 MB).

Why: a model's weights do not stay in the caches from one prediction to the next, so each layer reads its weights
from memory while it runs. In 4 KB pages that read crosses a page every 4 KB, each a TLB miss, and the hardware
prefetchers stop at every page boundary; in 2 MB pages neither happens (bench/README.md, "Huge pages").

    zeros(count)    a 64-byte aligned float32 array of ``count`` zeros, from the current block
    copy(array)     the same values as a C-contiguous float32 array there

Blocks are anonymous memory maps of BLOCK_BYTES (or larger, for a larger request) with madvise(MADV_HUGEPAGE),
where the platform has it; elsewhere plain zeroed memory. Pages are only made resident when first written. An
array keeps its block alive (its base), so a block is unmapped once the last array carved from it is gone. Only
the place of the data changes, never a value.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np

BLOCK_BYTES = 8 << 20  # four huge pages; an array larger than what is left of a block starts a new one
_ALIGN = 64  # a cache line: the GEMM's weight vectors then never straddle two
_lock = threading.Lock()  # plans may be made in several threads at once (a server, Ray or Dask workers)
_block: np.ndarray | None = None  # the block being carved, as float32
_used = 0  # bytes of it given out


def _new_block(nbytes: int) -> np.ndarray:
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel built without transparent huge pages: 4 KB pages, same answers
            pass
    return np.frombuffer(memory, np.float32)


def zeros(count: int) -> np.ndarray:
    """``count`` float32 zeros, 64-byte aligned, in memory that huge pages may back."""
    global _block, _used
    nbytes = -(-max(count, 1) * 4 // _ALIGN) * _ALIGN
    with _lock:
        if _block is None or _used + nbytes > _block.nbytes:
            if nbytes > BLOCK_BYTES // 2:  # a large array gets a block of its own; the current one goes on
                return _new_block(-(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)[:count]
            _block, _used = _new_block(BLOCK_BYTES), 0
        start = _used // 4
        _used += nbytes
        return _block[start:start + count]


def copy(array: np.ndarray) -> np.ndarray:
    """``array``'s values as a C-contiguous float32 array of its shape, in memory that huge pages may back."""
    out = zeros(array.size).reshape(array.shape)
    out[...] = array
    return out
