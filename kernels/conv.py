"""Standard convolution (the stem, and any Conv2D that is not 1x1), fast.

    conv2d(x, kernel, bias, out, stride_h, stride_w, pad_top, pad_left, act,
           dilation_h=1, dilation_w=1)

x       [N, H, W, Cin]        float32, C-contiguous, unpadded
kernel  [KH, KW, Cin, Cout]   float32, C-contiguous (Keras's layout)
bias    [Cout]                float32 (zeros if none)
out     [N, OH, OW, Cout]     float32, C-contiguous, preallocated, must not alias x
act     an ACT_* code; padding as in kernels.depthwise: top/left given, the output size fixes the
        rest, taps outside the image read as zero without a padded copy.

How: im2col, then one GEMM. Each output pixel's receptive field (KH*KW*Cin values, zeros where
the window hangs over the border) becomes one row of a [N*OH*OW, KH*KW*Cin] matrix, and
``kernel.reshape(KH*KW*Cin, Cout)`` is already the matching [K, Cout] matrix because Keras stores
the kernel tap-major. The GEMM and its fused epilogue are pointwise.py's. For the MobileNet stem
(3x3, stride 2, 3 channels) the patch matrix is 27 floats wide: building it costs about as much
as the product, and it is what lets the product run in BLAS instead of a 27-term loop per pixel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .activations import ACT_NONE
from .pointwise import gemm


@njit(parallel=True, cache=True)
def im2col(x, patches, kh, kw, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, oh, ow):
    """patches[(n*OH + i)*OW + j, (di*KW + dj)*Cin + c] = x_padded[n, i*sh + di*dh, j*sw + dj*dw, c]."""
    n_images, h, w, cin = x.shape
    for job in prange(n_images * oh):
        n = job // oh
        i = job % oh
        for j in range(ow):
            row = patches[job * ow + j]
            for di in range(kh):
                ih = i * stride_h - pad_top + di * dilation_h
                for dj in range(kw):
                    iw = j * stride_w - pad_left + dj * dilation_w
                    base = (di * kw + dj) * cin
                    if 0 <= ih < h and 0 <= iw < w:
                        for c in range(cin):
                            row[base + c] = x[n, ih, iw, c]
                    else:
                        for c in range(cin):
                            row[base + c] = np.float32(0.0)


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
) -> None:
    """out = act(conv2d(x, kernel) + bias); see the module docstring for the contract."""
    kh, kw, cin, cout = kernel.shape
    n, oh, ow, _ = out.shape
    patches = np.empty((n * oh * ow, kh * kw * cin), dtype=np.float32)
    im2col(x, patches, kh, kw, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, oh, ow)
    gemm(patches, kernel.reshape(kh * kw * cin, cout), bias, out.reshape(-1, cout), act, None)
