"""Standard convolution (the stem, and any Conv2D that is not 1x1), fast.

    conv2d(x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act,
           dilation_h=1, dilation_w=1, scale=1.0, offset=0.0, patches=None)

x       [N, H, W, Cin]        float32, C-contiguous, unpadded
kernel  [KH, KW, Cin, Cout]   float32, C-contiguous (Keras's layout)
bias    [Cout]                float32 (zeros if none)
out     [N, OH, OW, Cout]     float32, C-contiguous, preallocated, must not alias x
act     an ACT_* code; padding as in kernels.depthwise: top/left given, the output size fixes the
        rest, taps outside the image read as zero without a padded copy.
scale, offset
        a Keras Rescaling folded in: the convolution sees x * scale + offset inside the image and
        zeros in the padding, exactly as Rescaling followed by a padded convolution does (which is
        why it is folded here, where the padding is known, and not into the weights).
patches scratch space of at least N*OH*OW*KH*KW*Cin floats for im2col (allocated if None).
packed  ``kernel.reshape(KH*KW*Cin, Cout)`` and ``bias`` packed for the microkernel, or None.
table   ``indirection_table`` for this geometry (made if None), and
rescaled
        scratch of at least x.size floats for the rescaled copy (allocated if None): both for the
        indirect GEMM.

How, on the microkernel (``packed`` weights, kernels/gemm.py): an indirect GEMM. Row p of the
product's A is output pixel p's receptive field, KH*KW*Cin values, tap-major, zeros where the window
hangs over the border; ``kernel.reshape(KH*KW*Cin, Cout)`` is already the matching [K, Cout] matrix
because Keras stores the kernel tap-major. Rather than copying those rows out (im2col: for the
MobileNet stem, 3x3 stride 2 on 3 channels, writing and reading back the 27-float rows cost more
than the product), the microkernel reads them in place through an indirection table made once per
input shape (``indirection_table``): per output pixel and tap, where in the image that tap's Cin
channels start, or "padding". Each output is the same FMA chain over k = (ky, kx, c) as the GEMM
on the patch rows, so the two give the same bits. A folded Rescaling is applied to a copy of the
input first (``rescale_into``), the same float32 operations im2col applied to each copied value.

Elsewhere (no packed weights: OpenBLAS) im2col, then a GEMM. With BLAS (kernels/blas.py) the two
are fused per tile of output pixels: each worker builds the patch rows of its tile and multiplies
them while they are still in cache, then runs the epilogue, like kernels/pointwise.py's tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np

from . import blas
from .activations import ACT_NONE
from .backend import njit, prange
from .entry import calls_blas, entry, in_order
from .gemm import INDIRECT_CIN, INDIRECT_TILES, PackedWeights, gemm_packed, igemm_packed
from .pointwise import TILES_PER_IMAGE, epilogue_rows, gemm_matmul, tile_shape


@njit(inline="always")
def _patch_rows(x, patches, r0, r1, kh, kw, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w,
                oh, ow, scale, offset):
    """patches[r] for the output pixels r0 <= r < r1 (r = (n*OH + i)*OW + j): the pixel's receptive
    field, tap-major, each value x * scale + offset, zeros where the window leaves the image."""
    n_images, h, w, cin = x.shape
    row_width = kw * cin
    x_rows = x.reshape(n_images, h, w * cin)
    n = r0 // (oh * ow)
    i = (r0 // ow) % oh
    j = r0 % ow - 1
    for r in range(r0, r1):
        j += 1  # (n, i, j) of pixel r, stepped instead of divided out: divisions cost more than the copies
        if j == ow:
            j = 0
            i += 1
            if i == oh:
                i = 0
                n += 1
        row = patches[r]
        iw0 = j * stride_w - pad_left
        whole_row = dilation_w == 1 and iw0 >= 0 and iw0 + kw <= w
        for di in range(kh):
            ih = i * stride_h - pad_top + di * dilation_h
            base = di * row_width
            if ih < 0 or ih >= h:
                for t in range(row_width):
                    row[base + t] = np.float32(0.0)
            elif whole_row:  # the kernel row lies inside the image: one contiguous run of kw*cin values
                src = x_rows[n, ih, iw0 * cin:iw0 * cin + row_width]
                for t in range(row_width):
                    row[base + t] = src[t] * scale + offset
            else:
                for dj in range(kw):
                    iw = iw0 + dj * dilation_w
                    if 0 <= iw < w:
                        for c in range(cin):
                            row[base + dj * cin + c] = x[n, ih, iw, c] * scale + offset
                    else:
                        for c in range(cin):
                            row[base + dj * cin + c] = np.float32(0.0)


@njit(parallel=True, cache=True)
def im2col(x, patches, kh, kw, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, oh, ow,
           scale, offset):
    """patches[(n*OH + i)*OW + j, (di*KW + dj)*Cin + c] = rescaled x_padded[n, i*sh + di*dh, j*sw + dj*dw, c]."""
    rows = patches.shape[0]
    for block in prange((rows + 63) // 64):
        _patch_rows(x, patches, block * 64, min(rows, block * 64 + 64), kh, kw, stride_h, stride_w,
                    pad_top, pad_left, dilation_h, dilation_w, oh, ow, scale, offset)


@njit(parallel=True, cache=True)
def conv_tiles(x, patches, w, bias, out, act, kh, kw, stride_h, stride_w, pad_top, pad_left, dilation_h,
               dilation_w, oh, ow, scale, offset, tile_rows):
    """im2col and the BLAS product fused per tile of ``tile_rows`` output pixels, tiles over the cores.

    w [KH*KW*Cin, Cout], out [N*OH*OW, Cout] and patches [N*OH*OW, KH*KW*Cin] are 2-D, C-contiguous.
    Each image is cut into the same tiles, none spanning two images (as pointwise.gemm_tiles does).
    """
    k = patches.shape[1]
    n = w.shape[1]
    rows_per_image = oh * ow
    row_tiles = (rows_per_image + tile_rows - 1) // tile_rows
    patches_address = np.int64(patches.ctypes.data)
    w_address = np.int64(w.ctypes.data)
    out_address = np.int64(out.ctypes.data)
    for tile in prange(x.shape[0] * row_tiles):
        image_start = (tile // row_tiles) * rows_per_image
        r0 = image_start + (tile % row_tiles) * tile_rows
        r1 = min(image_start + rows_per_image, r0 + tile_rows)
        _patch_rows(x, patches, r0, r1, kh, kw, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w,
                    oh, ow, scale, offset)
        blas.sgemm(blas.ROW_MAJOR, blas.NO_TRANS, blas.NO_TRANS, r1 - r0, n, k,
                   np.float32(1.0), patches_address + 4 * r0 * k, k, w_address, n,
                   np.float32(0.0), out_address + 4 * r0 * n, n)
        epilogue_rows(out, bias, act, None, r0, r1, 0, n)


def indirection_table(h: int, w: int, cin: int, oh: int, ow: int, kh: int, kw: int, stride_h: int, stride_w: int,
                      pad_top: int, pad_left: int, dilation_h: int = 1, dilation_w: int = 1,
                      mr: int = 1) -> np.ndarray:
    """Where each output pixel's receptive field lies in a flat [H, W, Cin] image, for the indirect GEMM.

    For output pixel p = (i, j) = (p // OW, p % OW) and tap (di, dj): the offset of the Cin values that
    tap sees, ((i*sh - top + di*dh) * W + j*sw - left + dj*dw) * Cin, or -1 where it falls in the
    padding. Laid out as the microkernel reads it, in tiles of ``mr`` pixels:
    [ceil(OH*OW / mr), KH*KW, mr] int32, table[p // mr, di*KW + dj, p % mr], -1 past the last pixel.
    """
    ih = (np.arange(oh) * stride_h - pad_top)[:, None] + np.arange(kh) * dilation_h  # [OH, KH]
    iw = (np.arange(ow) * stride_w - pad_left)[:, None] + np.arange(kw) * dilation_w  # [OW, KW]
    ih, iw = ih[:, None, :, None], iw[None, :, None, :]  # [OH, OW, KH, KW] by broadcasting
    inside = (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
    offsets = np.where(inside, (ih * w + iw) * cin, -1).reshape(oh * ow, kh * kw)
    tiles = -(-oh * ow // mr)
    table = np.full((tiles * mr, kh * kw), -1, np.int32)
    table[: oh * ow] = offsets
    return np.ascontiguousarray(table.reshape(tiles, mr, kh * kw).transpose(0, 2, 1))


def fits_indirection(x_shape: tuple) -> bool:
    """Whether the indirect GEMM takes a convolution of this input: INDIRECT_CIN channels (RGB; the
    tile is made for a fixed count), and offsets into one image that fit the table's int32."""
    return x_shape[3] == INDIRECT_CIN and math.prod(x_shape[1:]) < 2**31


@njit(parallel=True, cache=True)
def rescale_into(x, out, scale, offset):
    """out = x * scale + offset (2-D, C-contiguous, float32): im2col's arithmetic on each value, once."""
    rows, width = x.shape
    for r in prange(rows):
        for t in range(width):
            out[r, t] = x[r, t] * scale + offset


@entry
def conv2d(
    x: np.ndarray,
    kernel: np.ndarray,
    bias: np.ndarray,
    out: np.ndarray,
    stride_h: int,
    stride_w: int,
    pad_top: int,
    pad_left: int,
    act: int = ACT_NONE,
    dilation_h: int = 1,
    dilation_w: int = 1,
    scale: float = 1.0,
    offset: float = 0.0,
    patches: np.ndarray | None = None,
    packed: PackedWeights | None = None,
    table: np.ndarray | None = None,
    rescaled: np.ndarray | None = None,
    indirect: bool = True,
) -> Callable[[], None]:
    """out = act(conv2d(x * scale + offset, kernel) + bias); see the module docstring for the contract.

    ``packed``: ``kernel.reshape(KH*KW*Cin, Cout)`` and ``bias`` as pointwise.prepare_weights packed
    them (once per plan), when it chose the microkernel: the indirect GEMM, or with
    ``indirect=False`` im2col and then the microkernel on the patch matrix (the same bits; kept to
    compare the two).
    """
    kh, kw, cin, cout = kernel.shape
    n, oh, ow, _ = out.shape
    if x.shape[0] != n or x.shape[3] != cin or out.shape[3] != cout or bias.shape != (cout,):
        raise ValueError(f"conv2d shapes do not fit: x {x.shape}, kernel {kernel.shape}, bias {bias.shape}, "
                         f"out {out.shape}")
    rows, width = n * oh * ow, kh * kw * cin
    o2 = out.reshape(rows, cout)
    scale, offset = np.float32(scale), np.float32(offset)  # Keras rescales in float32
    if packed is not None and (packed.k, packed.n) != (width, cout):
        raise ValueError(f"conv2d: packed weights [{packed.k}, {packed.n}] do not fit kernel {kernel.shape}")
    microkernel = packed is not None and x.flags.c_contiguous and o2.flags.c_contiguous
    if (microkernel and indirect and x.dtype == np.float32 and fits_indirection(x.shape)
            and packed.tile in INDIRECT_TILES):
        mr = packed.tile.mr
        if table is None:
            table = indirection_table(x.shape[1], x.shape[2], cin, oh, ow, kh, kw, stride_h, stride_w, pad_top,
                                      pad_left, dilation_h, dilation_w, mr)
        if table.shape != (-(-oh * ow // mr), kh * kw, mr) or table.dtype != np.int32:
            raise ValueError(f"conv2d: indirection table {table.shape} does not fit out {out.shape}, kernel "
                             f"{kernel.shape}")
        source = x.reshape(n, -1)
        if scale == 1.0 and offset == 0.0:  # x * 1 + 0 is x but for the sign of zeros, which no sum sees
            return igemm_packed.bind(source, table, packed, o2, act)
        if rescaled is None:
            rescaled = np.empty(x.size, np.float32)
        rescaled_source = rescaled[: x.size].reshape(n, -1)
        return in_order(partial(rescale_into, source, rescaled_source, scale, offset),
                         igemm_packed.bind(rescaled_source, table, packed, o2, act))
    if patches is None:
        patches = np.empty(rows * width, dtype=np.float32)
    patches = patches[: rows * width].reshape(rows, width)
    w2 = kernel.reshape(width, cout)
    patch_rows = partial(im2col, x, patches, kh, kw, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w,
                         oh, ow, scale, offset)
    if microkernel:
        # The patch matrix whole, then the product: the same compiled kernel as every pointwise layer.
        return in_order(patch_rows, gemm_packed.bind(patches, packed, o2, act))
    if blas.AVAILABLE and x.flags.c_contiguous and w2.flags.c_contiguous and o2.flags.c_contiguous:
        # Tiles of rows only (column tiles would build the same patch rows twice): pointwise's row
        # height, cut by the shape of one image alone (see pointwise.tile_shape).
        tile_rows = min(tile_shape(oh * ow, width, cout)[0], max(16, -(-oh * ow // TILES_PER_IMAGE)))
        return calls_blas(partial(conv_tiles, x, patches, w2, bias, o2, act, kh, kw, stride_h, stride_w, pad_top,
                                  pad_left, dilation_h, dilation_w, oh, ow, scale, offset, tile_rows))
    return in_order(patch_rows, calls_blas(partial(gemm_matmul, patches, w2, bias, o2, act, None, oh * ow)))

