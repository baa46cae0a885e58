"""Memory for packed weights and a plan's buffers (kernels/huge_pages.py): where the data lives, never a value."""

from __future__ import annotations

import numpy as np

from npmobile.kernels import huge_pages


def test_zeros_are_aligned_writable_and_never_overlap():
    arrays = [huge_pages.zeros(count) for count in (1, 5, 16, 17, 1000, 3)]
    for array, count in zip(arrays, (1, 5, 16, 17, 1000, 3), strict=True):
        assert array.dtype == np.float32 and array.shape == (count,) and array.flags.writeable
        assert array.ctypes.data % 64 == 0
        assert not array.any()
    for number, array in enumerate(arrays):
        array[:] = number + 1
    for number, array in enumerate(arrays):  # each kept its own values: no two share memory
        assert (array == number + 1).all()


def test_an_array_larger_than_half_a_block_gets_a_block_of_its_own():
    before = huge_pages.zeros(4)
    large = huge_pages.zeros(huge_pages.BLOCK_BYTES // 4)
    after = huge_pages.zeros(4)
    assert large.base is not before.base and after.base is before.base
    large[-1] = 1.0
    assert not before.any() and not after.any()


def test_copy_keeps_shape_and_values_as_contiguous_float32():
    source = np.arange(24, dtype=np.float64).reshape(2, 3, 4)[:, ::2, :]
    copied = huge_pages.copy(source)
    assert copied.dtype == np.float32 and copied.flags.c_contiguous and copied.shape == source.shape
    np.testing.assert_array_equal(copied, source.astype(np.float32))
