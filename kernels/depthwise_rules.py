"""Which depthwise path and which row kernel a layer takes: data and small pure functions over the layer's
shape and the CPU. Every choice here gives the same bits (kernels/depthwise.py); they decide only speed.
What they were checked against is in bench/README.md ("Depthwise rules").
"""

from __future__ import annotations

import math

from .activations import ACT_HARD_SWISH, ACT_NONE, ACT_RELU, ACT_RELU6
from .gemm_rules import AVX512

# The vector width: 16 channels fill an AVX-512 register; on AVX2 the 9 kernel vectors of 8 floats and the
# accumulators still fit its 16 registers (a rule of the CPU, never a timing). Only this CPU's width is
# built: each width's copies of the loops cost seconds of first-run compile time.
VECTOR_WIDTH = 16 if AVX512 else 8
# The window sizes and activations the vector row kernel applies (on its registers); all else takes the
# plain loops.
VECTOR_SIZES = (3, 5)
VECTOR_ACTS = (ACT_NONE, ACT_RELU, ACT_RELU6, ACT_HARD_SWISH)


def takes_vector_kernel(kh: int, kw: int, act: int) -> bool:
    """Whether a layer with a kh x kw window and activation ``act`` runs through the vector row kernel."""
    return kh == kw and kh in VECTOR_SIZES and act in VECTOR_ACTS


# The L1 data cache the order rule assumes: 64 sets of 64-byte lines (every x86-64 core of the last decade:
# 32 KB 8-way or 48 KB 12-way), of whose ways a block's input and output rows can count on 6 (the kernel,
# the next rows and the replacement policy take the rest).
L1_SETS, L1_WAYS, LINE_FLOATS = 64, 6, 16


def by_pixel_order(k: int, channels: int, in_width: int, out_width: int) -> bool:
    """Whether a row should run every channel block of each group of pixels in turn, rather than each
    block over the whole row (a fixed rule of the layer's shape; both give the same bits).

    Block by block over the row, the loads of one block are ``channels`` floats apart: when that is a
    multiple of a cache line, they fall in L1_SETS / gcd(lines apart, L1_SETS) sets only, and the k
    input rows and the output row of a block (k * in_width + out_width lines) evict one another once
    they outnumber those sets' ways, as at MobileNet V1's layers (32-1024 channels). Pixel by pixel,
    the loads walk along each pixel's channels instead, at the cost of loading the block's kernel for
    every group of pixels, which loses where nothing conflicts (V2's and V3's 144-960 channels). 3x3
    windows only: no MobileNet 5x5 layer conflicts.
    """
    if k != 3 or channels % LINE_FLOATS or channels <= VECTOR_WIDTH:  # one block: the same loads either way
        return False
    sets = L1_SETS // math.gcd(channels // LINE_FLOATS, L1_SETS)
    return k * in_width + out_width > L1_WAYS * sets
