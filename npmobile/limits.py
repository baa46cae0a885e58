"""Every bound npmobile puts on what a file (or an input of a size unknown until predict) may ask for, in one
place. The README's Security section states the same numbers and where each is checked.

None comes near a real MobileNet: the largest (V2 alpha 1.4, V3-Large) hold under 6.2 M weight values in
under 400 tensors, their configs are under 1 MB of JSON with under 100 k values nested under 30 deep,
and at 224 px their largest layer output is 1.2 M values per image.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------------
# Reading a file (npmobile/io, in the isolated reader's child; the parent checks the child's result again)
# --------------------------------------------------------------------------------------------------

# Bytes of a whole .pth / .safetensors file, and of any one member of a .keras or .pth zip once decompressed
# (never decompressed past the size its header claims).
MAX_FILE_BYTES = 512 * 2**20
# Bytes of one JSON text: a model config (.h5 attribute, .keras config.json), a safetensors header.
MAX_CONFIG_BYTES = 16 * 2**20
# JSON values (objects, arrays, strings, numbers) in one config; counted on the text before it is parsed,
# so an archive of a few KB cannot unfold into millions of Python objects.
MAX_CONFIG_VALUES = 2**20
# Nesting of JSON arrays and objects in one config (each nested model adds about five).
MAX_CONFIG_DEPTH = 100
# Bytes of a .pth's pickle.
MAX_PICKLE_BYTES = 64 * 2**20
# Tensors (datasets, state-dict entries) in one file.
MAX_TENSORS = 2**16
# Values in one tensor, and in all of one file's tensors together.
MAX_TENSOR_VALUES = 64 * 2**20
MAX_FILE_VALUES = 256 * 2**20
# And no more values than this many per byte of the file on disk, above a floor: compression, HDF5 fill
# values and zero strides cannot turn a few KB into gigabytes of arrays (real weights: under one value per byte).
VALUES_PER_FILE_BYTE = 16
VALUES_FLOOR = 16 * 2**20

# What the isolated reader's child sends back (npmobile/isolation.py), checked by the child before it sends and
# by the parent before it parses or allocates: a JSON header (the configs re-encoded, the names of layers
# and tensors), then the arrays, at most the file's values (file_value_limit) in at most 4 bytes each.
MAX_RESULT_HEADER_BYTES = 2 * MAX_CONFIG_BYTES + 256 * MAX_TENSORS
MAX_RESULT_VALUES = 2 * MAX_CONFIG_VALUES + 16 * MAX_TENSORS
MAX_RESULT_DEPTH = MAX_CONFIG_DEPTH + 8

# --------------------------------------------------------------------------------------------------
# Running a model (npmobile/layers.py): at load, and again at predict for inputs of unknown size
# --------------------------------------------------------------------------------------------------

# Values per image of any one layer's output or padded input.
MAX_LAYER_VALUES = 2**28
# The widest window (kernel or pool, dilation included) along one axis, in pixels.
MAX_WINDOW = 2**12
# Window positions x window size one layer may visit per image.
MAX_WINDOW_WORK = 2**30
# Values per image in all of a plan's buffers together (checked when a plan is made for an input shape).
MAX_PLAN_VALUES = 2**29


def file_value_limit(file_bytes: int) -> int:
    """The most values a file of ``file_bytes`` bytes may give (all its tensors together)."""
    return min(MAX_FILE_VALUES, max(VALUES_FLOOR, VALUES_PER_FILE_BYTE * file_bytes))
