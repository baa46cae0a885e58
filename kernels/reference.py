"""The reference kernels: every operation a MobileNet needs, in plain NumPy, readable top to bottom.

These are the definitions. The fast Numba kernels beside this file must agree with them (tests check
that over many shapes), and a learner can read this file to see what each layer computes.

Conventions, everywhere in npmobile:
- activations are NHWC float32 arrays: x[n, row, column, channel] (every function keeps its input's dtype,
  so the same code runs in float64 for ``predict(x, reference=True, dtype=np.float64)``; constants are
  Python floats, which NumPy rounds to the array's dtype);
- a convolution kernel is [kernel_h, kernel_w, in_channels, out_channels], as Keras stores it;
- a depthwise kernel is [kernel_h, kernel_w, channels, depth_multiplier];
- padding is explicit: ((top, bottom), (left, right)) rows/columns of zeros around the image.
  ``same_padding`` turns Keras's padding="same" into these numbers.

Each function returns a new array; they are written for clarity, not speed.

Reading order, the way a MobileNet uses them: padding (``same_padding``, ``zero_pad``) → ``conv2d`` (the
stem) → ``depthwise_conv2d`` + ``pointwise_conv2d`` (the separable pair every block is made of) →
``batch_norm`` (folded away at inference) → activations (``relu6``, ``hard_swish``) → pooling and
``dense`` (the head) → ``squeeze_excite`` (MobileNetV3). docs/depthwise.md runs them on a 4x4 image.
"""

from __future__ import annotations

import numpy as np

Padding = tuple[tuple[int, int], tuple[int, int]]
NO_PADDING: Padding = ((0, 0), (0, 0))


# --------------------------------------------------------------------------------------------------
# Shapes and padding
# --------------------------------------------------------------------------------------------------


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """Zeros to add before and after one spatial axis for Keras/TensorFlow padding="same".

    "same" means the output has ceil(size / stride) positions. The total padding needed for that is
    split with the smaller half first (top/left), the extra one last: TensorFlow's rule, which is
    why a stride-2 layer on an even input pads (0, 1) and MobileNets add ZeroPadding2D themselves.
    """
    effective_kernel = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective_kernel - size, 0)
    return total // 2, total - total // 2


def conv_output_size(size: int, kernel: int, stride: int, pad: tuple[int, int], dilation: int = 1) -> int:
    """Number of positions a kernel visits along one axis of a padded input."""
    effective_kernel = (kernel - 1) * dilation + 1
    return (size + pad[0] + pad[1] - effective_kernel) // stride + 1


def zero_pad(x: np.ndarray, padding: Padding) -> np.ndarray:
    """Surround each image with rows and columns of zeros (Keras ZeroPadding2D)."""
    (top, bottom), (left, right) = padding
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def _tap_windows(xp: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int],
                dilation: tuple[int, int] = (1, 1)) -> dict[tuple[int, int], np.ndarray]:
    """What each kernel tap sees: for tap (di, dj), the padded input's pixel (i*sh + di*dh, j*sw + dj*dw)
    at every output position (i, j), as one [N, OH, OW, C] view of ``xp``; taps in the order (0, 0), (0, 1), ...

    A convolution is the sum over taps of each window times its tap's weights; the pooling windows are
    these views side by side.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    oh = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    ow = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    if oh < 0 or ow < 0:
        raise ValueError(f"a {kh}x{kw} window does not fit the padded input {xp.shape[1:3]}")
    windows = {}
    for di in range(kh):
        for dj in range(kw):
            # The padded rows i*sh + di*dh for every output row i = 0..oh-1 (and likewise columns).
            rows = slice(di * dh, di * dh + oh * sh, sh)
            cols = slice(dj * dw, dj * dw + ow * sw, sw)
            windows[di, dj] = xp[:, rows, cols, :]
    return windows


# --------------------------------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------------------------------


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None, strides: tuple[int, int] = (1, 1),
           padding: Padding = NO_PADDING, dilation: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Standard convolution: every output channel looks at every input channel.

    out[n, i, j, co] = bias[co] + sum over (di, dj, ci) of
                       x_padded[n, i*sh + di*dh, j*sw + dj*dw, ci] * kernel[di, dj, ci, co]

    The loop runs over the kh*kw kernel taps; each tap is one matrix product of the shifted input
    [N*H*W, Cin] with that tap's [Cin, Cout] slice of the kernel.

    So the two Python loops are the sum over (di, dj), and the matrix product ``@`` is the sum over ci.
    Cost: kh*kw*Cin*Cout multiply-adds per output pixel: every output channel reads every input channel.
    """
    kh, kw, _cin, cout = kernel.shape
    windows = _tap_windows(zero_pad(x, padding), (kh, kw), strides, dilation)
    out = np.zeros(windows[0, 0].shape[:3] + (cout,), dtype=np.result_type(x, kernel))
    for (di, dj), window in windows.items():
        # [n, oh, ow, Cin] @ [Cin, Cout]: this tap's contribution, summed over input channels.
        out += window @ kernel[di, dj]
    if bias is not None:
        out += bias
    return out


def indirect_conv2d(x: np.ndarray, table: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """conv2d as the indirect GEMM computes it: each output pixel's patch row gathered through a table.

    ``table`` is kernels/conv.py's ``indirection_table``: for pixel p (in tiles of MR pixels) and
    kernel tap t, table[p // MR, t, p % MR] is where in the flat [H*W*Cin] image the Cin values that
    tap sees begin, or -1 in the padding (read as zeros). Gathering those Cin values for every tap
    gives im2col's patch row; the product with the [KH*KW*Cin, Cout] kernel is the convolution.
    Returns [N, pixels, Cout], pixels counted up to a whole number of tiles (the last ones are padding).
    """
    kh, kw, cin, cout = kernel.shape
    n = x.shape[0]
    offsets = table.transpose(0, 2, 1).reshape(-1, kh * kw)  # [pixels, taps]
    flat = np.concatenate([x.reshape(n, -1), np.zeros((n, cin), x.dtype)], axis=1)  # zeros at the end
    start = np.where(offsets < 0, flat.shape[1] - cin, offsets)  # the padding reads those zeros
    patches = flat[:, start[:, :, None] + np.arange(cin)].reshape(n, -1, kh * kw * cin)  # im2col's rows
    out = patches @ kernel.reshape(kh * kw * cin, cout)
    if bias is not None:
        out += bias
    return out


def depthwise_conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None,
                     strides: tuple[int, int] = (1, 1), padding: Padding = NO_PADDING,
                     dilation: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Depthwise convolution: each channel is filtered on its own, with its own small kernel.

    out[n, i, j, c*M + m] = bias[c*M + m] + sum over (di, dj) of
                            x_padded[n, i*sh + di*dh, j*sw + dj*dw, c] * kernel[di, dj, c, m]

    where M is the depth multiplier (1 in MobileNets unless asked otherwise). No channel mixing:
    that is the pointwise convolution's job. Cost: kh*kw*C multiply-adds per pixel, against
    kh*kw*C*C' for a standard convolution.

    The loops are conv2d's, with the matrix product replaced by an elementwise product: there is no
    sum over channels, which is the whole saving.
    """
    kh, kw, c, multiplier = kernel.shape
    windows = _tap_windows(zero_pad(x, padding), (kh, kw), strides, dilation)
    n, oh, ow, _ = windows[0, 0].shape
    # Channel c's M outputs are kept on their own axis, then flattened to c*M + m (Keras's order).
    out = np.zeros((n, oh, ow, c, multiplier), dtype=np.result_type(x, kernel))
    for (di, dj), window in windows.items():
        # The same windows as in conv2d. [n, oh, ow, c, 1] * [c, M]: each channel times its own weights.
        out += window[..., None] * kernel[di, dj]
    out = out.reshape(n, oh, ow, c * multiplier)
    if bias is not None:
        out += bias
    return out


def pointwise_conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """1x1 convolution: at every pixel, mix the channels with one matrix. A plain GEMM.

    out[n, i, j, co] = bias[co] + sum over ci of x[n, i, j, ci] * kernel[ci, co]
    ``kernel`` is [Cin, Cout] (a Keras 1x1 kernel with its two leading 1s dropped).
    It sees no neighbours: every pixel is an independent vector of channels, so the whole layer is one
    matrix product [N*H*W, Cin] @ [Cin, Cout]. In MobileNets these layers hold most of the multiply-adds.
    """
    out = x @ kernel
    if bias is not None:
        out += bias
    return out


def dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Fully connected layer on [N, features]: x @ kernel + bias."""
    out = x @ kernel
    if bias is not None:
        out += bias
    return out


def pack_panels(kernel: np.ndarray, width: int) -> np.ndarray:
    """A [K, N] kernel cut into column panels of ``width``, zero-padded past N: [ceil(N/width), K, width].

    The layout kernels/gemm.py streams: one panel is ``width`` output channels for every input
    channel, front to back, so the microkernel reads it as one contiguous run.
    """
    k, n = kernel.shape
    count = -(-n // width)
    padded = np.zeros((k, count * width), kernel.dtype)
    padded[:, :n] = kernel
    return padded.reshape(k, count, width).transpose(1, 0, 2).copy()


def gemm_panels(x: np.ndarray, panels: np.ndarray, bias: np.ndarray, n: int) -> np.ndarray:
    """x [M, K] @ (the kernel packed by ``pack_panels``) + bias, in the order kernels/gemm.py sums.

    Each output starts at zero and adds x[m, k] * w[k, n] for k = 0, 1, ..., K-1 in float32, panel
    by panel; the bias comes last. (The fast kernel fuses each multiply and add into one FMA, which
    rounds once instead of twice; the tests allow for that.)
    """
    m, k = x.shape
    count, _, width = panels.shape
    out = np.zeros((m, count * width), np.float32)
    for p in range(count):
        acc = np.zeros((m, width), np.float32)
        for i in range(k):
            acc += x[:, i : i + 1] * panels[p, i]
        out[:, p * width : (p + 1) * width] = acc
    return out[:, :n] + bias


# --------------------------------------------------------------------------------------------------
# Normalization and scaling
# --------------------------------------------------------------------------------------------------


def batch_norm(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    mean: np.ndarray,
    variance: np.ndarray,
    epsilon: float = 1e-3,
) -> np.ndarray:
    """BatchNormalization at inference: a per-channel affine map, computed as Keras does.

    inv = gamma / sqrt(variance + epsilon);  y = x * inv + (beta - mean * inv)
    Written in this order (not (x - mean) * inv + beta) because that is Keras's order, and float32
    rounding follows the order. Because it is affine, it folds into the convolution before it.
    """
    inv = 1.0 / np.sqrt(variance + epsilon)
    if gamma is not None:
        inv = inv * gamma
    shift = -mean * inv
    if beta is not None:
        shift = beta + shift
    return x * inv + shift


def rescale(x: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """Keras Rescaling: x * scale + offset (MobileNetV3 maps [0, 255] to [-1, 1] with it)."""
    return x * scale + offset


# --------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------


def relu(x: np.ndarray, max_value: float | None = None, negative_slope: float = 0.0, threshold: float = 0.0):
    """Keras ReLU: x above threshold (capped at max_value), negative_slope * (x - threshold) below."""
    # Keras's own branches: with no slope, values at or below the threshold become exactly 0;
    # with a slope (leaky ReLU), they are scaled instead.
    if negative_slope == 0.0:
        y = np.where(x > threshold, x, 0.0) if threshold != 0.0 else np.maximum(x, 0.0)
    else:
        y = np.where(x >= threshold, x, negative_slope * (x - threshold))
    if max_value is not None:
        y = np.minimum(y, max_value)
    return y.astype(x.dtype, copy=False)


def relu6(x: np.ndarray) -> np.ndarray:
    """min(max(x, 0), 6): the ReLU that keeps activations in a range low-precision hardware likes.

    A known range [0, 6] maps onto 8-bit integers with a fixed step; an unbounded ReLU would not.
    """
    return np.minimum(np.maximum(x, 0.0), 6.0)


def hard_sigmoid(x: np.ndarray) -> np.ndarray:
    """Keras 3 hard_sigmoid: relu6(x + 3) / 6, a piecewise-linear sigmoid (0 below -3, 1 above 3)."""
    return relu6(x + 3.0) / 6.0


def hard_sigmoid_keras2(x: np.ndarray) -> np.ndarray:
    """What Activation('hard_sigmoid') meant in Keras 2: clip(0.2 * x + 0.5, 0, 1)."""
    return np.clip(0.2 * x + 0.5, 0.0, 1.0)


def hard_swish(x: np.ndarray) -> np.ndarray:
    """x * hard_sigmoid(x): MobileNetV3's cheap swish. Keras computes x * (relu6(x + 3) / 6).

    Exactly 0 below -3 and exactly x above 3, close to swish in between, with no exponential.
    """
    return x * hard_sigmoid(x)


def hard_swish_from_ops(x: np.ndarray) -> np.ndarray:
    """Hard-swish as tf_keras's MobileNetV3 builds it from separate layers:
    Multiply([x, ReLU(6)(x + 3) * (1 / 6)]). Same function, rounded differently: it multiplies by
    the float32 nearest 1/6 where Keras 3's activation divides by 6."""
    return x * (relu6(x + 3.0) * (1.0 / 6.0))


def sigmoid(x: np.ndarray) -> np.ndarray:
    # Split by sign so exp never overflows.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def swish(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), also called silu."""
    return x * sigmoid(x)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x) / sum(exp(x)) along ``axis``, with the max subtracted first so exp cannot overflow."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------


def global_average_pool(x: np.ndarray, keepdims: bool = False) -> np.ndarray:
    """Mean over all pixels of each channel: [N, H, W, C] -> [N, C] (or [N, 1, 1, C])."""
    return x.mean(axis=(1, 2), keepdims=keepdims, dtype=x.dtype)


def global_max_pool(x: np.ndarray, keepdims: bool = False) -> np.ndarray:
    return x.max(axis=(1, 2), keepdims=keepdims)


def _pool_windows(x: np.ndarray, pool: tuple[int, int], strides: tuple[int, int], padding: Padding, fill: float):
    """All pooling windows as one array [N, OH, OW, C, ph*pw], padding filled with ``fill``."""
    (top, bottom), (left, right) = padding
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    return np.stack(list(_tap_windows(xp, pool, strides).values()), axis=-1)


def max_pool2d(x: np.ndarray, pool: tuple[int, int], strides: tuple[int, int], padding: Padding = NO_PADDING):
    """Largest value in each window; padded positions never win (they are -inf)."""
    return _pool_windows(x, pool, strides, padding, -np.inf).max(axis=-1)


def average_pool2d(x: np.ndarray, pool: tuple[int, int], strides: tuple[int, int], padding: Padding = NO_PADDING):
    """Mean of each window, counting only real pixels: TensorFlow leaves padding out of the count."""
    sums = _pool_windows(x, pool, strides, padding, 0.0).sum(axis=-1)
    ones = np.ones((1,) + x.shape[1:3] + (1,), dtype=x.dtype)
    counts = _pool_windows(ones, pool, strides, padding, 0.0).sum(axis=-1)
    return (sums / counts).astype(x.dtype, copy=False)


# --------------------------------------------------------------------------------------------------
# Upsampling (segmentation heads on a MobileNet encoder)
# --------------------------------------------------------------------------------------------------


def upsample2d(x: np.ndarray, size: tuple[int, int], interpolation: str = "nearest") -> np.ndarray:
    """Keras UpSampling2D: each image made size[0] times taller and size[1] times wider.

    "nearest": every pixel repeated into a size[0] x size[1] block.
    "bilinear": TensorFlow's resize with half-pixel centers (what Keras calls): output pixel i looks at
    input position (i + 0.5) * (in / out) - 0.5, clamped to the image, and mixes its two neighbours
    by the fractional part -- first along each row, then between the two rows.
    """
    if interpolation == "nearest":
        return np.repeat(np.repeat(x, size[0], axis=1), size[1], axis=2)
    if interpolation != "bilinear":
        raise ValueError(f"upsample2d: interpolation {interpolation!r} is not nearest or bilinear")
    n, h, w, c = x.shape
    top, bottom, row_mix = _bilinear_taps(h, h * size[0])
    left, right, col_mix = _bilinear_taps(w, w * size[1])
    col_mix = col_mix[None, None, :, None]
    upper = x[:, top]  # [n, out_h, w, c]: the input row above each output row
    lower = x[:, bottom]
    upper = upper[:, :, left] + (upper[:, :, right] - upper[:, :, left]) * col_mix
    lower = lower[:, :, left] + (lower[:, :, right] - lower[:, :, left]) * col_mix
    return upper + (lower - upper) * row_mix[None, :, None, None]


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position: the input positions below and above it and how far it lies between them."""
    scale = np.float32(in_size / out_size)
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    below = np.floor(position)
    lower = np.maximum(below, 0).astype(np.int64)
    upper = np.minimum(np.ceil(position), in_size - 1).astype(np.int64)
    return lower, upper, (position - below).astype(np.float32)


def resize(x: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """TensorFlow's image resize as Keras calls it (tf.image.resize, half-pixel centers, no antialias):
    "bilinear" as in upsample2d; "nearest" takes, for output position i, input floor((i + 0.5) * in / out)
    (clamped to the image). Every position and weight in float32, as TensorFlow computes them."""
    n, h, w, c = x.shape
    if interpolation == "nearest":
        rows, cols = _nearest_taps(h, size[0]), _nearest_taps(w, size[1])
        return x[:, rows][:, :, cols]
    if interpolation != "bilinear":
        raise ValueError(f"resize: interpolation {interpolation!r} is not bilinear or nearest")
    top, bottom, row_mix = _resize_taps(h, size[0])
    left, right, col_mix = _resize_taps(w, size[1])
    col_mix = col_mix[None, None, :, None].astype(x.dtype)
    upper, lower = x[:, top], x[:, bottom]
    upper = upper[:, :, left] + (upper[:, :, right] - upper[:, :, left]) * col_mix
    lower = lower[:, :, left] + (lower[:, :, right] - lower[:, :, left]) * col_mix
    return upper + (lower - upper) * row_mix[None, :, None, None].astype(x.dtype)


def _resize_scale(in_size: int, out_size: int) -> np.float32:
    return np.float32(in_size) / np.float32(out_size)  # one float32 division, as TensorFlow's


def _resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * _resize_scale(in_size, out_size) \
        - np.float32(0.5)
    below = np.floor(position)
    lower = np.maximum(below, 0).astype(np.int64)
    upper = np.minimum(np.ceil(position), in_size - 1).astype(np.int64)
    return lower, upper, (position - below).astype(np.float32)


def _nearest_taps(in_size: int, out_size: int) -> np.ndarray:
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * _resize_scale(in_size, out_size)
    return np.clip(np.floor(position).astype(np.int64), 0, in_size - 1)


# --------------------------------------------------------------------------------------------------
# Squeeze-and-excite (MobileNetV3)
# --------------------------------------------------------------------------------------------------


def squeeze_excite(
    x: np.ndarray,
    reduce_kernel: np.ndarray,
    reduce_bias: np.ndarray,
    expand_kernel: np.ndarray,
    expand_bias: np.ndarray,
) -> np.ndarray:
    """Reweight channels by a gate computed from the whole image (attention over channels).

    squeeze: s = mean over pixels of x            [N, C]
    excite:  g = hard_sigmoid(relu(s @ W1 + b1) @ W2 + b2)   two tiny dense layers, [N, C]
    scale:   out = x * g                           each channel times its gate
    The gate is computed as relu6(z + 3) * (1/6): MobileNetV3 builds it from ops, not the
    hard_sigmoid activation, and multiplies by the rounded 1/6.
    """
    s = global_average_pool(x)
    z = relu(dense(s, reduce_kernel, reduce_bias))
    z = dense(z, expand_kernel, expand_bias)
    gate = relu6(z + 3.0) * (1.0 / 6.0)
    return x * gate[:, None, None, :]
