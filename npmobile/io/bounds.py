"""Checking what a file asks for against the caps of npmobile.limits, before it is made: JSON texts before they
are parsed, tensors before they are read. The isolated reader's child runs these while it reads, and the parent
runs the same ones again on what the child sends back (npmobile.isolation), before it allocates anything."""

from __future__ import annotations

import json
import os
from typing import Any

from npmobile.errors import ModelFileError
from npmobile.limits import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_VALUES,
    MAX_FILE_VALUES,
    MAX_TENSOR_VALUES,
    MAX_TENSORS,
    file_value_limit,
)

# Each array the isolated reader sends starts on a boundary of this many bytes.
ALIGN = 64


def json_values_at_most(raw: bytes) -> int:
    """An upper bound on the values a JSON text holds, from its bytes alone: every value but the first follows a
    comma or opens an array or object (commas inside strings only make the bound looser)."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (walked without recursion)."""
    if not isinstance(value, (dict, list)):
        return 0
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        items = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in items if isinstance(child, (dict, list)))  # scalars: no depth
    return deepest


def parse_json(raw: bytes | str, where: str, max_bytes: int = MAX_CONFIG_BYTES, max_values: int = MAX_CONFIG_VALUES,
               max_depth: int = MAX_CONFIG_DEPTH) -> Any:
    """``raw`` parsed, once its size and its number of values are known to be within the caps (a few KB of
    ``[{},{},...]`` in a zip would otherwise unfold into millions of Python objects), then its depth checked."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise ModelFileError(f"{where} is {len(data):,} bytes of JSON, more than {max_bytes:,}; refusing it")
    values = json_values_at_most(data)
    if values > max_values:
        raise ModelFileError(f"{where} holds up to {values:,} JSON values, more than {max_values:,}; refusing it")
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{where} is not valid JSON ({error})") from None
    except RecursionError:
        raise ModelFileError(f"{where} nests JSON deeper than {max_depth}; refusing it") from None
    if json_depth(parsed) > max_depth:
        raise ModelFileError(f"{where} nests JSON deeper than {max_depth}; refusing it")
    return parsed


def file_bytes(path: str) -> int:
    """The size of the file on disk, which bounds how many values it may give (limits.file_value_limit)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class ReadBudget:
    """Tensors and values one file may still give. Compression, HDF5 chunks never written (read back as fill
    values) and zero strides make values from no bytes, so a tiny file could list gigabytes of tensors that
    each pass the per-tensor cap (or one tensor many times over): all of them together are bounded by the
    file's size (limits.file_value_limit), counted before each one is read."""

    def __init__(self, file_size: int):
        self.limit = file_value_limit(file_size)
        self.values = 0
        self.tensors = 0
        self.layers = 0

    @classmethod
    def for_file(cls, path: str) -> ReadBudget:
        return cls(file_bytes(path))

    def take_layer(self, where: str) -> None:
        """One more layer (a group of tensors, maybe empty) in the result."""
        self.layers += 1
        if self.layers > MAX_TENSORS:
            raise ModelFileError(f"{where}: the file lists more than {MAX_TENSORS:,} layers; refusing it")

    def take(self, values: int, where: str) -> None:
        if values > MAX_TENSOR_VALUES:
            raise ModelFileError(f"{where}: a tensor of {values:,} values, more than any MobileNet weight "
                                 f"({MAX_TENSOR_VALUES:,}); refusing it")
        self.tensors += 1
        self.values += values
        if self.tensors > MAX_TENSORS:
            raise ModelFileError(f"{where}: the file holds more than {MAX_TENSORS:,} tensors; refusing it")
        if self.values > self.limit:
            why = "any file" if self.limit >= MAX_FILE_VALUES else "a file of its size (compressed or repeated values?)"
            raise ModelFileError(f"{where}: the file's weights add up to more than {self.limit:,} values, the most "
                                 f"{why} may hold; refusing it")


def check_result_arrays(table: Any, file_size: int, where: str) -> int:
    """The table of arrays the isolated reader's child sends ([dtype, shape, byte offset] each, laid one after
    the other on ALIGN-byte boundaries), held to the caps of the file it read: the byte length of their
    data. The child checks its table before sending it, the parent the table it got before allocating."""
    import numpy as np

    limit = file_value_limit(file_size)
    if not isinstance(table, list) or len(table) > MAX_TENSORS:
        raise ModelFileError(f"{where}: the reader's result lists more than {MAX_TENSORS:,} arrays; refusing it")
    values = end = 0
    for entry in table:
        dtype_text, shape, offset = entry
        dtype = np.dtype(str(dtype_text))
        if dtype.kind not in "fiub" or dtype.hasobject or dtype.itemsize > 8:
            raise ValueError(f"dtype {dtype}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"shape {shape!r}")
        count = 1
        for d in shape:
            count *= d
        if count > MAX_TENSOR_VALUES:
            raise ModelFileError(f"{where}: an array of {count:,} values, more than {MAX_TENSOR_VALUES:,}; refusing it")
        values += count
        end += -end % ALIGN
        if offset != end:
            raise ValueError("arrays not laid out one after the other")
        end += count * dtype.itemsize
        if values > limit or end > 4 * limit + ALIGN * len(table):
            raise ModelFileError(f"{where}: the arrays add up to more than {limit:,} values, the most a file of "
                                 f"{file_size:,} bytes may give; refusing it")
    return end
