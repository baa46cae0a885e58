"""The GEMM microkernel's configuration: which register tiles exist, which this CPU compiles, which one a product
takes, and how a product is cut into tasks. Data and small pure functions over shape and CPU; what they were
measured against is in bench/README.md ("GEMM tiles and cuts").

Every tile gives bit-identical answers (each output is one FMA chain over K, kernels/gemm.py), so these rules
only decide speed, never an answer.
"""

from __future__ import annotations

from typing import NamedTuple

from .backend import target_cpu_name, target_has_avx512


class Tile(NamedTuple):
    """One register tile of the microkernel: ``mr`` rows x ``nr`` columns of the output held in
    mr x (nr / vw) accumulators of type <vw x float> for the whole loop over K."""

    mr: int
    nr: int
    vw: int

    @property
    def name(self) -> str:
        return f"{self.mr}x{self.nr}_v{self.vw}"


# Twelve accumulators of AVX2's sixteen registers.
AVX2_6X16 = Tile(6, 16, 8)
# 16 and 28 accumulators of AVX-512's 32.
AVX512_8X32 = Tile(8, 32, 16)
# For outputs whose width is closer to a multiple of 16 than of 32 (16, 40, 80, 112, 144 channels).
AVX512_28X16 = Tile(28, 16, 16)
# A matrix-vector product (a dense layer on one image), where the rows of a taller tile would be computed
# and thrown away.
AVX512_1X128 = Tile(1, 128, 16)
# Products of 49 or 196 rows (7x7 and 14x14 maps, one image), which 8-row tiles would pad by 14% and 2%.
AVX512_7X32 = Tile(7, 32, 16)

# Whether the code may use AVX-512: the JIT's target CPU, or what the AOT module was built for.
AVX512 = target_has_avx512()

# The 28x16 tile loads one number of A for each of its FMAs (the 8x32 tile one for every two). Where the cores
# keep up with that (AMD's Zen 4 and Zen 5), it beats padding a width of 32k+16 to 32(k+1); on Intel's cores it
# does only when the width is 16, where 8x32 would compute twice the columns it keeps (measured on Rocket Lake;
# its siblings of the same core design, Ice Lake and Tiger Lake, assumed alike). Either tile, the same bits.
NARROW_TILE_ONLY_AT_16 = ("rocketlake", "icelake-client", "icelake-server", "tigerlake")
CPU_NAME = target_cpu_name() if AVX512 else ""

# The tiles the drivers are compiled with: those ``choose_tile`` picks on the target CPU only (each costs
# seconds of compile time on every first run). The target is part of Numba's cache key, so a cache never
# mixes the two; the tests of AVX2's tiles run in a process compiled for Haswell on any CPU (tests/test_avx2.py).
# The compiled drivers know a tile by its index in this tuple.
COMPILED_TILES = (AVX512_8X32, AVX512_28X16, AVX512_1X128, AVX512_7X32) if AVX512 else (AVX2_6X16,)

# The indirect GEMM's tiles (a convolution read through an indirection table, kernels/conv.py), for
# INDIRECT_CIN input channels: the stems of image models (RGB). A prefix of COMPILED_TILES, so that an index
# means the same tile in both: AVX2's one, or AVX-512's two for many pixels; not the matrix-vector tile nor
# the 7-row one (1x1 layers of 7x7 and 14x14 maps). A stem packed for those is packed again for the first.
INDIRECT_CIN = 3
INDIRECT_TILES = COMPILED_TILES[:2]


def choose_tile(m: int, n: int, avx512: bool = AVX512, cpu: str = CPU_NAME) -> Tile:
    """The fastest tile for an [m, k] x [k, n] product on this CPU (bench/kernels.py).

    Every tile gives bit-identical answers, so the choice is free to follow the whole product's shape,
    batch included.
    """
    if not avx512:
        return AVX2_6X16
    if m == 1:
        return AVX512_1X128
    if round_up(n, 16) < round_up(n, 32) and (n <= 16 or cpu not in NARROW_TILE_ONLY_AT_16):
        return AVX512_28X16
    return AVX512_7X32 if round_up(m, 7) < round_up(m, 8) else AVX512_8X32  # the tile that pads fewer rows


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# Tasks the cut aims for: a few per core on up to four cores, so that unequal tiles even out.
TASKS = 8


def tiling(m: int, k: int, panels: int, mr: int) -> tuple[int, int]:
    """Rows and panels per task for an [m, k] product over ``panels`` panels.

    The rows of a task (times K) stay in L2 while each of its panels passes over them. The cut changes
    no answer; it only spreads the work.
    """
    rows = mr * max(1, min(128, 65536 // max(k, 1)) // mr)
    row_tiles = -(-m // rows)
    if row_tiles >= TASKS:  # rows alone make enough tasks: tiles that the threads share evenly
        return even_rows(m, rows, mr), panels
    col_tiles = min(panels, -(-TASKS // row_tiles))
    per_task = -(-panels // col_tiles)
    col_tiles = -(-panels // per_task)
    if row_tiles * col_tiles < TASKS and m > mr:
        rows = max(mr, round_up(-(-m // -(-TASKS // col_tiles)), mr))
    # Row tiles of one height (a multiple of MR), as many as above but none left short: the tasks go to the
    # threads in equal runs (Numba's static schedule), so equal tasks finish together.
    row_tiles = -(-m // rows)
    return max(mr, round_up(-(-m // row_tiles), mr)), per_task


def even_rows(m: int, rows: int, mr: int) -> int:
    """The height (a multiple of ``mr``, at most ``rows``) of the row tiles of an [m, k] product cut by rows
    alone, chosen so that two threads, each given an equal run of tiles (Numba's static schedule), get the
    most even share of rows; then the fewest tiles (each task reads all the weights).

    At batch 8 a 14x14 map's product has 1568 rows: thirteen 128-row tiles would give one thread 896 rows
    and the other 672; fourteen of 112 give each 784.
    """
    fewest = -(-m // rows)
    best_key, best = None, rows
    for count in range(fewest, 2 * fewest + 1):
        height = round_up(-(-m // count), mr)
        tiles = -(-m // height)
        key = (-(-tiles // 2) * height, tiles)
        if best_key is None or key < best_key:
            best_key, best = key, height
    return best
