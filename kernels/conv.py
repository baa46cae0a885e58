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
patches scratch space of at least N*OH*OW*KH*KW*Cin floats (allocated if None).

How: im2col, then a GEMM. Each output pixel's receptive field (KH*KW*Cin values, zeros where the
window hangs over the border) becomes one row of a [N*OH*OW, KH*KW*Cin] matrix, and
``kernel.reshape(KH*KW*Cin, Cout)`` is already the matching [K, Cout] matrix because Keras stores
the kernel tap-major. With BLAS (kernels/blas.py) the two are fused per tile of output pixels:
each worker builds the patch rows of its tile and multiplies them while they are still in cache,
then runs the epilogue, like kernels/pointwise.py's tiles. For the MobileNet stem (3x3, stride 2,
3 channels) the patch matrix is 27 floats wide: building it costs about as much as the product,
and it is what lets the product run in BLAS instead of a 27-term loop per pixel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import blas
from .activations import ACT_NONE
from .gemm import PackedWeights, gemm_packed
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
) -> None:
    """out = act(conv2d(x * scale + offset, kernel) + bias); see the module docstring for the contract.

    ``packed``: ``kernel.reshape(KH*KW*Cin, Cout)`` and ``bias`` as pointwise.prepare_weights packed
    them (once per plan), when it chose the microkernel: im2col, then the product on it.
    """
    kh, kw, cin, cout = kernel.shape
    n, oh, ow, _ = out.shape
    if x.shape[0] != n or x.shape[3] != cin or out.shape[3] != cout or bias.shape != (cout,):
        raise ValueError(f"conv2d shapes do not fit: x {x.shape}, kernel {kernel.shape}, bias {bias.shape}, "
                         f"out {out.shape}")
    rows, width = n * oh * ow, kh * kw * cin
    if patches is None:
        patches = np.empty(rows * width, dtype=np.float32)
    patches = patches[: rows * width].reshape(rows, width)
    w2 = kernel.reshape(width, cout)
    o2 = out.reshape(rows, cout)
    scale, offset = np.float32(scale), np.float32(offset)  # Keras rescales in float32
    if packed is not None and (packed.k, packed.n) != (width, cout):
        raise ValueError(f"conv2d: packed weights [{packed.k}, {packed.n}] do not fit kernel {kernel.shape}")
    if packed is not None and x.flags.c_contiguous and o2.flags.c_contiguous:
        # The patch matrix whole, then the product: the same compiled kernel as every pointwise layer
        # (a fused version, patches built per tile, cost seconds more of first-run compile for ~2% of
        # a MobileNet).
        im2col(x, patches, kh, kw, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, oh, ow,
               scale, offset)
        gemm_packed(patches, packed, o2, act)
    elif blas.AVAILABLE and x.flags.c_contiguous and w2.flags.c_contiguous and o2.flags.c_contiguous:
        # Tiles of rows only (column tiles would build the same patch rows twice): pointwise's row
        # height, cut by the shape of one image alone (see pointwise.tile_shape).
        tile_rows = min(tile_shape(oh * ow, width, cout)[0], max(16, -(-oh * ow // TILES_PER_IMAGE)))
        conv_tiles(x, patches, w2, bias, o2, act, kh, kw, stride_h, stride_w, pad_top, pad_left,
                   dilation_h, dilation_w, oh, ow, scale, offset, tile_rows)
    else:
        im2col(x, patches, kh, kw, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, oh, ow,
               scale, offset)
        gemm_matmul(patches, w2, bias, o2, act, None, oh * ow)
