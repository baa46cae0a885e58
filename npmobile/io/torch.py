"""PyTorch weight files, read without PyTorch: ``torch.save(model.state_dict(), "best.pth")`` in the zip
format (the default since PyTorch 1.6), in the legacy format before it, and ``.safetensors``.

A ``.pth`` is a pickle, and unpickling can call any function a file names. Here it is read by an
unpickler that knows four kinds of global and nothing else: ``collections.OrderedDict`` (the dict
around the tensors), the storage classes (``torch.FloatStorage`` ...: only their names, turned into
NumPy dtypes), and ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` (replaced by our own
functions that record offset, size and stride). Any other global -- a class of a whole pickled
model, ``os.system`` in a hostile file -- is refused by name before anything is imported or called.
Tensor bytes come from the file's storages, checked against the sizes the pickle claims.

What comes out is a ``StateDict``: the tensors by PyTorch name, in PyTorch layouts, as NumPy arrays.
Mapping names and layouts onto an architecture is npmobile.applications.torchvision's job.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from functools import partial

import numpy as np

from npmobile.errors import ModelFileError, NpmobileError
from npmobile.io.bounds import ReadBudget, parse_json
from npmobile.io.kinds import ZIP_SIGNATURE, zip_members
from npmobile.limits import MAX_FILE_BYTES, MAX_PICKLE_BYTES, MAX_TENSOR_VALUES

# torch.serialization's legacy format starts with this number, pickled, then the protocol version.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
LEGACY_HEAD = b"\x80\x02\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")
# A header longer than this is no safetensors file (a sniff: reading bounds the header at MAX_CONFIG_BYTES).
MAX_SAFETENSORS_HEADER = 64 * 2**20
# Checkpoints nest the state dict under one of these keys (next to an optimizer's state, an epoch...).
NESTED_KEYS = ("state_dict", "model_state_dict", "model")

# The storage classes torch pickles by name, and what their bytes are.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # the top half of a float32: widened in _as_float
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
SAFETENSORS_DTYPES = {
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


@dataclass
class StateDict:
    """A file's tensors by PyTorch name (``features.0.0.weight``), PyTorch layouts, float32."""

    tensors: dict[str, np.ndarray]
    source: str


# --------------------------------------------------------------------------------------------------
# Recognising the formats
# --------------------------------------------------------------------------------------------------


def torch_format(path: str, head: bytes | None = None) -> str | None:
    """"zip", "legacy" or "safetensors" for a PyTorch file, None for anything else."""
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError:
            return None
    if head.startswith(LEGACY_HEAD):
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= MAX_SAFETENSORS_HEADER:
        return "safetensors"
    if head.startswith(ZIP_SIGNATURE):
        try:
            with zipfile.ZipFile(path) as archive:
                return "zip" if _pickle_member(archive.namelist()) else None
        except Exception:  # a sniff: a zip too broken to list is no PyTorch file; the Keras reader says why
            return None
    return None


def _pickle_member(names: list[str]) -> str | None:
    """The archive's ``<name>/data.pkl``: torch writes one folder named after the file."""
    found = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------------------


@dataclass
class _Storage:
    """A storage named by the pickle; its bytes are found by ``key`` once the pickle is read."""

    dtype: np.dtype
    key: str
    numel: int
    view: tuple[str, int, int] | None = None  # legacy views: (root key, offset, size)


@dataclass
class _TensorStub:
    """What ``_rebuild_tensor_v2`` asked for, materialized once the storages are read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType:
    """``torch.FloatStorage`` and its kin, by name only."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Call:
    """One of our rebuild functions as the pickle sees it."""

    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, *args):
        return self.function(*args)


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ModelFileError(f"{what} is not a tuple of integers")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorStub:
    """Stands in for torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride, requires_grad,
    backward_hooks[, metadata]); the last ones do not matter for inference."""
    if not isinstance(storage, _Storage) or not isinstance(storage_offset, int):
        raise ModelFileError("a tensor is rebuilt from something that is not a storage")
    size, stride = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if len(size) != len(stride) or storage_offset < 0 or min(size, default=1) < 0 or min(stride, default=0) < 0:
        raise ModelFileError(f"a tensor has an impossible size {size} / stride {stride}")
    # A zero stride repeats one value: a tiny storage could otherwise ask for terabytes.
    if int(np.prod(size, dtype=np.float64)) > MAX_TENSOR_VALUES:
        raise ModelFileError(f"a tensor of size {size} is far larger than any MobileNet weight; refusing it")
    return _TensorStub(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its data, for inference."""
    if not isinstance(data, _TensorStub):
        raise ModelFileError("a parameter is rebuilt from something that is not a tensor")
    return data


# (module, name) -> what the unpickler gives for it. Nothing else is ever looked up. Each lookup makes a new
# object (OrderedDict's class is immutable): a pickle can edit what it is given (the BUILD opcode sets
# attributes), and must only ever edit its own copy, never what the next file is read with.
_ALLOWED = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): lambda: _Call(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): lambda: _Call(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): lambda: _Call(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): lambda: _Call(_rebuild_parameter),
    **{("torch", name): partial(_StorageType, name) for name in STORAGE_DTYPES},
    # Legacy files saved from a GPU name its storages; the bytes are the same, read to the CPU.
    **{("torch.cuda", name): partial(_StorageType, name) for name in STORAGE_DTYPES},
}
_MODEL_MODULES = ("torch.nn", "torchvision", "__main__", "timm")
# A whole model pickled from the user's own module (a tutorial's model.py) names its layers' classes by this
# module path: seen in the pickle's bytes, nothing unpickled.
_LAYER_CLASSES = b"torch.nn.modules."


class _Refused(Exception):
    pass


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BytesIO):
        super().__init__(stream)
        self.stream = stream
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        make = _ALLOWED.get((module, name))
        if make is None:
            raise _Refused(f"{module}.{name}")
        return make()

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and pid[1].name in STORAGE_DTYPES
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise ModelFileError(f"an unknown persistent id {str(pid)[:80]!r}")
        view = pid[5] if len(pid) == 6 else None
        if view is not None and not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                                     and all(isinstance(v, int) for v in view[1:])):
            raise ModelFileError(f"an unknown storage view {str(view)[:80]!r}")
        storage = self.storages.setdefault(pid[2], _Storage(STORAGE_DTYPES[pid[1].name], pid[2], pid[4]))
        if view is None:
            return storage
        return _Storage(storage.dtype, view[0], view[2], (pid[2], view[1], view[2]))


def _unpickle(unpickler: _StateDictUnpickler, path: str):
    """``unpickler.load()``, with every failure as one ModelFileError naming the file."""
    try:
        return unpickler.load()
    except _Refused as refused:
        name = str(refused)
        if name.startswith(_MODEL_MODULES) or _LAYER_CLASSES in unpickler.stream.getvalue():
            raise ModelFileError(
                f"{path}: holds a whole pickled model (class {name}), not a state dict; npmobile never unpickles "
                "classes: save the weights with torch.save(model.state_dict(), PATH)") from None
        raise ModelFileError(
            f"{path}: the pickle refers to {name}, which a state dict never contains; npmobile only rebuilds tensors "
            "(refusing the file, nothing was run)") from None
    except ModelFileError as error:
        raise ModelFileError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            MemoryError, RecursionError, UnicodeDecodeError, struct.error, OverflowError) as error:
        raise ModelFileError(f"{path}: the pickle is corrupt ({type(error).__name__}: {str(error)[:120]})") from None


# --------------------------------------------------------------------------------------------------
# Storages and tensors
# --------------------------------------------------------------------------------------------------


def _storage_values(stub: _TensorStub, buffers: dict[str, np.ndarray]) -> np.ndarray:
    """The values of the storage a tensor is a view of (a legacy file's storage may itself view another)."""
    storage = stub.storage
    if storage.view is not None:
        root, offset, size = storage.view
        return buffers[root][offset : offset + size]
    return buffers[storage.key]


def _check_fits(stub: _TensorStub, flat: np.ndarray, where: str) -> None:
    """A tensor reads only values of its storage, each at most once."""
    if stub.size and min(stub.size) == 0:
        return
    last = stub.offset + sum((n - 1) * s for n, s in zip(stub.size, stub.stride))
    if last >= flat.size:
        raise ModelFileError(f"{where}: of size {stub.size}, reaches past its storage of {flat.size} values")
    if int(np.prod(stub.size, dtype=np.int64)) > flat.size:
        # Only zero or overlapping strides read a storage's values more than once: a few bytes could become
        # gigabytes of repeated values. No state dict's parameter or buffer is such a view.
        raise ModelFileError(f"{where}: of size {stub.size} (stride {stub.stride}), holds more values than its "
                             f"storage of {flat.size}; refusing it")


def _tensor(stub: _TensorStub, buffers: dict[str, np.ndarray], path: str) -> np.ndarray:
    """The tensor's values, copied out of its storage (checked by _check_fits)."""
    flat = _storage_values(stub, buffers)
    if stub.size and min(stub.size) == 0:
        return np.zeros(stub.size, flat.dtype)
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[stub.offset :], shape=stub.size,
                                           strides=[s * itemsize for s in stub.stride], writeable=False)
    return np.array(view)


def _as_float(array: np.ndarray, bfloat16: bool = False) -> np.ndarray:
    """Floats as float32 (bfloat16 is the top half of a float32); integers (num_batches_tracked) as they are."""
    if bfloat16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32) if array.dtype.kind == "f" else array


def _materialize(state: dict, buffers: dict[str, np.ndarray], path: str) -> dict:
    """The state dict's tensors as arrays (anything else in it is left out, as is the rest of a checkpoint:
    an optimizer's tensors are never built). Their total size is bounded before any is made."""
    stubs = {k: v for k, v in state.items() if isinstance(v, _TensorStub)}
    budget = ReadBudget.for_file(path)
    for key, stub in stubs.items():
        _check_fits(stub, _storage_values(stub, buffers), f"{path}: tensor {str(key)[:80]!r}")
        budget.take(int(np.prod(stub.size, dtype=np.int64)), f"{path}: tensor {str(key)[:80]!r}")
    bf16 = STORAGE_DTYPES["BFloat16Storage"]
    return {key: _as_float(_tensor(stub, buffers, path), bfloat16=stub.storage.dtype == bf16)
            for key, stub in stubs.items()}


def _check_storage(storage: _Storage, nbytes: int, path: str) -> None:
    if storage.numel < 0 or storage.numel * storage.dtype.itemsize != nbytes:
        raise ModelFileError(f"{path}: storage {storage.key!r} holds {nbytes} bytes, the pickle says "
                             f"{storage.numel} values of {storage.dtype.itemsize} bytes")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: str) -> bytes:
    if info.file_size > limit:
        raise ModelFileError(f"{path}: archive member {info.filename!r} is {info.file_size:,} bytes; refusing it")
    with archive.open(info) as member:
        data = member.read(info.file_size + 1)  # the header's size may lie: never read much past it
    if len(data) != info.file_size:
        raise ModelFileError(f"{path}: archive member {info.filename!r} is not the size its header says")
    return data


def _read_zip(path: str):
    try:
        archive = zipfile.ZipFile(path)
        members = zip_members(path, archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: the PyTorch zip archive is corrupt ({error})") from None
    with archive:
        pkl = _pickle_member(list(members))
        if pkl is None:
            raise ModelFileError(f"{path}: a zip archive without PyTorch's data.pkl")
        prefix = pkl[: -len("data.pkl")]
        order = members.get(prefix + "byteorder")
        if order is not None and _read_member(archive, order, 16, path).strip() != b"little":
            raise ModelFileError(f"{path}: written on a big-endian machine; npmobile reads little-endian files")
        unpickler = _StateDictUnpickler(io.BytesIO(_read_member(archive, members[pkl], MAX_PICKLE_BYTES, path)))
        obj = _unpickle(unpickler, path)
        buffers = {}
        infos = {key: members.get(f"{prefix}data/{key}") for key in unpickler.storages}
        missing = [key for key, info in infos.items() if info is None]
        if missing:
            raise ModelFileError(f"{path}: storage {missing[0]!r} is missing from the archive")
        # Deflated members can claim more than the file holds: all of them together, as their headers claim
        # (never decompressed past that), within what a file may be.
        claimed = sum(info.file_size for info in infos.values())
        if claimed > MAX_FILE_BYTES:
            raise ModelFileError(f"{path}: its storages add up to {claimed:,} bytes, more than {MAX_FILE_BYTES:,}; "
                                 "refusing it")
        for key, storage in unpickler.storages.items():
            data = _read_member(archive, infos[key], MAX_FILE_BYTES, path)
            _check_storage(storage, len(data), path)
            buffers[key] = np.frombuffer(data, storage.dtype)
    return obj, buffers


def _read_legacy(path: str):
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ModelFileError(f"{path}: over {MAX_FILE_BYTES:,} bytes; refusing it")
    stream = io.BytesIO(data)
    # Three small pickles (magic number, protocol version, system info), the object, the storage keys,
    # then each storage as its value count (int64) and its bytes.
    header = [_unpickle(_StateDictUnpickler(stream), path) for _ in range(3)]
    if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL_VERSION or not isinstance(header[2], dict):
        raise ModelFileError(f"{path}: not a PyTorch legacy file (wrong magic number or protocol)")
    if header[2].get("little_endian") is False:
        raise ModelFileError(f"{path}: written on a big-endian machine; npmobile reads little-endian files")
    unpickler = _StateDictUnpickler(stream)
    obj = _unpickle(unpickler, path)
    keys = _unpickle(_StateDictUnpickler(stream), path)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ModelFileError(f"{path}: the list of storages is corrupt")
    buffers = {}
    for key in keys:
        storage = unpickler.storages.get(key)
        if storage is None:
            raise ModelFileError(f"{path}: storage {key!r} is not used by any tensor")
        head = stream.read(8)
        if len(head) != 8:
            raise ModelFileError(f"{path}: the file is truncated (storage {key!r})")
        numel = int.from_bytes(head, "little", signed=True)
        nbytes = numel * storage.dtype.itemsize
        if numel != storage.numel or nbytes > len(data):
            raise ModelFileError(f"{path}: storage {key!r} holds {numel} values, the pickle says {storage.numel}")
        raw = stream.read(nbytes)
        if len(raw) != nbytes:
            raise ModelFileError(f"{path}: the file is truncated (storage {key!r})")
        buffers[key] = np.frombuffer(raw, storage.dtype)
    missing = set(unpickler.storages) - set(buffers)
    if missing:
        raise ModelFileError(f"{path}: storage {sorted(missing)[0]!r} is missing from the file")
    return obj, buffers


# --------------------------------------------------------------------------------------------------
# safetensors: an 8-byte header length, a JSON header, raw little-endian bytes
# --------------------------------------------------------------------------------------------------


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise ModelFileError(f"{path}: over {MAX_FILE_BYTES:,} bytes; refusing it")
        head = f.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or length > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ModelFileError(f"{path}: the safetensors header is truncated")
        header = parse_json(f.read(length), f"{path}: the safetensors header")
        if not isinstance(header, dict):
            raise ModelFileError(f"{path}: the safetensors header is not a JSON object")
        # Every entry is checked against the file's size and the caps before the tensors' bytes are read.
        entries = _safetensors_entries(header, size - 8 - length, size, path)
        body = memoryview(f.read(size - 8 - length))
    if len(body) != size - 8 - length:
        raise ModelFileError(f"{path}: the file is truncated")
    tensors = {}
    for name, (dtype_name, shape, begin, end) in entries.items():
        array = np.frombuffer(body[begin:end], SAFETENSORS_DTYPES[dtype_name]).reshape(shape)
        tensors[name] = _as_float(array, bfloat16=dtype_name == "BF16")
    return tensors


def _safetensors_entries(header: dict, body_bytes: int, file_size: int, path: str) -> dict[str, tuple]:
    """name -> (dtype, shape, begin, end) for every tensor of a safetensors header, each one within the body
    and all of them within the caps (npmobile.limits)."""
    budget = ReadBudget(file_size)
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = _ints(entry["shape"], "its shape")
            begin, end = _ints(entry["data_offsets"], "its data_offsets")
        except (KeyError, TypeError, ModelFileError) as error:
            raise ModelFileError(f"{where} has an invalid header entry ({error})") from None
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= body_bytes or end - begin != count * dtype.itemsize:
            raise ModelFileError(f"{where}: shape {shape} of {entry['dtype']} does not fit bytes {begin}..{end}")
        budget.take(count, where)
        entries[name] = (entry["dtype"], shape, begin, end)
    return entries


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """The state dict in a .pth (zip or legacy) or .safetensors file: tensors by PyTorch name.

    Accepts what ``torch.load(weights_only=True)`` gives for a state dict: a bare one, or one nested
    under ``state_dict`` / ``model_state_dict`` / ``model`` (a training checkpoint); ``module.``
    prefixes (DataParallel) are removed and ``num_batches_tracked`` counters are dropped.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise ModelFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    if size > MAX_FILE_BYTES:
        raise ModelFileError(f"{path}: {size:,} bytes, far more than any MobileNet; refusing it")
    kind = torch_format(path)
    try:
        if kind == "safetensors":
            return StateDict(_clean(_read_safetensors(path), path), path)
        if kind == "zip":
            obj, buffers = _read_zip(path)
        elif kind == "legacy":
            obj, buffers = _read_legacy(path)
        else:
            raise ModelFileError(f"{path}: not a PyTorch file (a .pth state dict or .safetensors)")
        return StateDict(_clean(_materialize(state_dict_of(obj, path), buffers, path), path), path)
    except NpmobileError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, zipfile.BadZipFile, EOFError, MemoryError) as error:
        raise ModelFileError(f"{path}: the file is corrupt ({type(error).__name__}: {str(error)[:120]})") from None


def state_dict_of(obj, path: str, is_tensor=lambda value: isinstance(value, _TensorStub)) -> dict:
    """The state dict in what a .pth unpickles to: the dict of tensors itself, or the one a training checkpoint
    nests under NESTED_KEYS. ``is_tensor`` says what a tensor is: this reader's stubs, or (verify, reading the
    file with torch.load) torch's own tensors."""
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    if not any(is_tensor(v) for v in obj.values()):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def without_module_prefix(name: str) -> str:
    """A tensor's name without the ``module.`` nn.DataParallel puts before every name it saves."""
    return name[len("module."):] if name.startswith("module.") else name


def _clean(tensors: dict, path: str) -> dict[str, np.ndarray]:
    """Tensors only, without DataParallel's ``module.`` and without BatchNorm's step counters."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            continue
        if name.endswith("num_batches_tracked"):
            continue
        out[without_module_prefix(name)] = value
    if not out:
        raise ModelFileError(f"{path}: holds no tensors")
    return out
