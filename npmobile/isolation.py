"""Reading a file from a stranger where it can neither hang nor crash the caller: in a child process.

A corrupt HDF5 file can send libhdf5 into an endless loop (a damaged global heap under a
variable-length attribute: h5py 3.14 / HDF5 1.14.6 and h5py 3.16 / HDF5 2.0.0 loop forever) or, in
principle, crash it. No Python-level timeout can stop a loop inside a C library: it holds the
interpreter, so a signal handler never runs. So everything that touches the file -- opening it,
reading attributes, configs and datasets, unzipping a .keras -- runs in a fresh interpreter
(``subprocess`` with ``sys.executable``: never fork, the caller may already run Numba's and OpenMP's
thread pools, and a daemonic worker such as Dask's may not start ``multiprocessing`` children) with
a wall-clock limit and an address-space limit. Past the limit the child is killed and the caller
gets one ``ModelFileError``; a child that dies (a segfault) gives one too.

The child imports only the readers (h5py and NumPy, never Numba) and sends back what the reader
made -- a ModelSpec or a WeightsFile -- as a JSON header followed by the raw bytes of every array.
No pickle: a reader subverted by a hostile file must not be able to run code in the caller by what
it sends back; the header is plain data and the arrays are numbers, read into one buffer that the
caller's arrays are views of (no copy after the pipe). The caller holds that result to the caps of
npmobile.limits before it parses the header or allocates the buffer (npmobile.io.bounds): a reader that
went wrong, or a file the child's checks missed, cannot make the caller allocate more than the file may give.
The child also loads no HDF5 filter plugin (npmobile.io.lock_down).

    pending = start_read(path, "model", timeout=60)    # the child runs while the caller imports
    spec = pending.result()
"""

from __future__ import annotations

import json
import math
import numbers
import os
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from npmobile import errors
from npmobile.children import NEUTRAL_CWD, clean_environment, isolated_python
from npmobile.errors import ModelFileError, NpmobileError, UnsupportedLayerError
from npmobile.io.bounds import ALIGN, check_result_arrays, file_bytes, parse_json
from npmobile.limits import MAX_RESULT_DEPTH, MAX_RESULT_HEADER_BYTES, MAX_RESULT_VALUES
from npmobile.spec import CallSpec, LayerSpec, ModelSpec, StoredLayer, TensorRef, WeightsFile

if TYPE_CHECKING:
    from npmobile import read_cache

# Far above any real MobileNet file: a Keras-written MobileNetV3-Large .h5 is read, child start-up
# included, in about half a second on one core of a shared 2-core AMD EPYC.
DEFAULT_TIMEOUT = 60.0
# Address space for the child. A file may hold up to 256 M float32 values (1 GiB, limits.MAX_FILE_VALUES),
# read as float64 one dataset at a time, and a .keras member up to 512 MB: 4 GiB covers all of it.
MEMORY_LIMIT_BYTES = 4 * 2**30

# What is read: a whole model, weights only, or whatever the file holds (a model if it has one).
KINDS = ("model", "weights", "any")

_MAGIC = b"NPMOBILE-READ-1\n"
_PREFIX = struct.Struct("<16sQQ")  # magic, header length, data length
_ALIGN = ALIGN  # each array starts on a 64-byte boundary of the buffer
# Errors a child may report, by name; anything else becomes a ModelFileError.
_ERRORS = {cls.__name__: cls for cls in (errors.ModelFileError, errors.WeightsOnlyFileError, errors.WeightsError,
                                          errors.UnsupportedLayerError, errors.NpmobileError)}


def read_file(path: str | os.PathLike, kind: str, timeout: float | None = DEFAULT_TIMEOUT, trusted: bool = False):
    """What ``kind`` asks of the file at ``path``: a ModelSpec ("model"), a WeightsFile ("weights"), or for
    "any" a ModelSpec if the file holds a whole model, else its WeightsFile with ``model_error`` set to why
    it is not a whole model.

    ``trusted=True`` reads in this process (no start-up cost, no limit); otherwise a child reads it,
    bounded by ``timeout`` seconds (None: no time limit, only the memory limit).
    """
    return start_read(path, kind, timeout, trusted).result()


def start_read(path: str | os.PathLike, kind: str, timeout: float | None = DEFAULT_TIMEOUT, trusted: bool = False):
    """Start reading and return at once; ``.result()`` gives what ``read_file`` would. Untrusted, a child
    reads while the caller goes on (importing the engine, say); trusted, the reading happens in ``result()``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    from npmobile import read_cache

    timeout = check_timeout(timeout)
    path = os.fspath(path)
    # The path as the reader is given it: the child gets it absolute (it starts in another folder).
    entry = read_cache.entry_for(path if trusted else os.path.abspath(path), kind)
    cached = None if entry is None else read_entry(entry, path)
    if cached is not None:
        return _Read(cached)
    if trusted:
        return _InProcess(path, kind, entry)
    return PendingRead(path, kind, timeout, entry)


class _Read:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _InProcess:
    def __init__(self, path: str, kind: str, entry: read_cache.Entry | None):
        self.path, self.kind, self.entry = path, kind, entry

    def result(self):
        value = read_in_process(self.path, self.kind)
        if self.entry is not None:
            header, arrays = encode(value)
            try:
                check_result(header, arrays, self.path)  # an entry holds only what the child could have sent
            except NpmobileError:
                return value
            new = self.entry.new()
            if new is not None:
                for chunk in result_chunks(header, arrays):
                    new.write(chunk)
                new.keep()
        return value


def read_entry(entry: read_cache.Entry, path: str):
    """What the read cache's ``entry`` holds, received as the child's pipe is; None when there is no entry or it
    is not one whole result within the caps (then it is removed, and the file is read)."""
    stream = entry.open()
    if stream is None:
        return None
    with stream:
        try:
            return decode(*receive(stream.readinto, path), path)
        except (NpmobileError, _ChildDied, OSError, ValueError):
            entry.discard()
            return None


def read_in_process(path: str, kind: str):
    """The readers themselves, in this process: what the child runs."""
    from npmobile.io import read_model, read_weights
    from npmobile.io.torch import read_state_dict, torch_format

    if kind != "weights" and torch_format(path) is not None:
        return read_state_dict(path)  # a PyTorch state dict: its tensors by name, the caller finds the architecture
    if kind == "model":
        return read_model(path)
    if kind == "weights":
        return read_weights(path)
    try:
        return read_model(path)
    except UnsupportedLayerError:
        raise  # a whole model npmobile refuses (a Lambda): never its weights on another architecture
    except NpmobileError as model_error:
        try:
            weights = read_weights(path)
        except NpmobileError as weights_error:
            # Why the weights cannot be read is the answer for a weights-only file; for any other, why the model.
            raise (weights_error if isinstance(model_error, errors.WeightsOnlyFileError) else model_error) from None
        weights.model_error = model_error
        return weights


def check_timeout(timeout: float | None) -> float | None:
    """Seconds as a float, or None for no time limit (so is infinity)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
        raise NpmobileError(f"timeout must be a positive number of seconds or None; got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)


# --------------------------------------------------------------------------------------------------
# The caller's side
# --------------------------------------------------------------------------------------------------


def _package_root() -> str:
    """The folder that holds the npmobile package this process runs, so the child reads with the same code."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The child is isolated (npmobile/children.py: ``python -I``, no PYTHON* variables, started in a neutral folder),
# so a folder of downloaded files (where the hostile one may sit beside a planted ``numpy.py``) is never a place
# it imports from; it reads with the caller's npmobile, from the folder given first.
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from npmobile.isolation import child_main; child_main()"


def _child_env() -> dict[str, str]:
    # One thread for every pool the readers' libraries might start: less address space, nothing to share.
    return clean_environment(**{name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                       "NUMEXPR_NUM_THREADS")})


class PendingRead:
    """A child reading a file. ``result()`` waits for it (until the deadline set when it started)."""

    def __init__(self, path: str, kind: str, timeout: float | None, entry: read_cache.Entry | None = None):
        if not sys.executable:
            raise ModelFileError(f"{path}: cannot start a Python interpreter to read the file in isolation "
                                 "(sys.executable is empty); load a file you trust with trusted=True")
        self.path, self.kind, self.timeout, self.entry = path, kind, timeout, entry
        self._stderr = tempfile.TemporaryFile()
        self._started = time.monotonic()
        try:
            self._process = subprocess.Popen(
                isolated_python(_BOOT, _package_root(), kind, os.path.abspath(path), str(MEMORY_LIMIT_BYTES)),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0,
                env=_child_env(), close_fds=True, cwd=NEUTRAL_CWD,
            )
        except OSError as error:
            self._stderr.close()
            raise ModelFileError(f"{path}: cannot start the isolated reader ({error})") from None
        # Never leave a child behind, even if nobody asks for the result.
        self._finalizer = weakref.finalize(self, _reap, self._process, self._stderr)
        self._outcome: Any = None

    def result(self):
        if self._outcome is None:
            try:
                self._outcome = ("ok", self._collect())
            except NpmobileError as error:
                self._outcome = ("error", error)
            finally:
                self._finalizer()
        status, value = self._outcome
        if status == "error":
            raise value.with_traceback(None)
        return value

    def _deadline(self) -> float | None:
        return None if self.timeout is None else self._started + self.timeout

    def _collect(self):
        """The child's result (``receive``), kept in the read cache once decoded."""
        new = None if self.entry is None else self.entry.new()
        try:
            value = self._receive(new)
        except BaseException:
            if new is not None:
                new.discard()
            raise
        if new is not None:
            new.keep()
        return value

    def _receive(self, new: read_cache.NewEntry | None):
        stream, deadline = self._process.stdout, self._deadline()
        with selectors.DefaultSelector() as selector:
            selector.register(stream, selectors.EVENT_READ)

            def fill(view: memoryview) -> int:
                got = _read_some(selector, stream, view, deadline)
                if new is not None:
                    new.write(view[:got])  # written as it arrives, while the child is still sending
                return got

            try:
                message, data = receive(fill, self.path)
            except _TimedOut:
                raise ModelFileError(
                    f"{self.path}: reading the file did not finish in {self.timeout:g} seconds: it is corrupt or "
                    "hostile (for a file you trust, raise the time limit or load it as trusted)") from None
            except _ChildDied:
                raise self._death() from None
        return decode(message, data, self.path)

    def _death(self) -> ModelFileError:
        """Why a child stopped without a result: a signal (a crash inside a C library), or an error."""
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return ModelFileError(f"{self.path}: the reader crashed on this file ({name}): it is corrupt or hostile")
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
        last = lines[-1].strip()[:200] if lines else "no output"
        return ModelFileError(f"{self.path}: the isolated reader stopped (exit status {code}): {last}")


def _data_length(message: dict, path: str) -> int:
    """The byte length of the arrays the header's table lists, within the caps of the file at ``path``."""
    try:
        return check_result_arrays(message["arrays"], file_bytes(path), path)
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: the isolated reader sent a malformed result ({error})") from None


def receive(fill, path: str) -> tuple[dict, bytearray]:
    """A result as the child writes it (its pipe, or a read cache entry), bounded before anything is allocated
    for it: the header's length first, its JSON (size, number of values, depth) before it is parsed, the table
    of arrays (count, values, layout; the caps of the file at ``path``, npmobile.limits) before the buffer for
    their bytes exists. ``fill(view)`` fills a memoryview and says how many bytes it got (fewer only at the
    end). Returns the header's message and the arrays' bytes; _ChildDied if the result is cut short."""
    prefix = bytearray(_PREFIX.size)
    if _fill(fill, memoryview(prefix)) != _PREFIX.size:
        raise _ChildDied
    magic, header_length, data_length = _PREFIX.unpack(prefix)
    if magic != _MAGIC:
        raise _ChildDied
    if header_length > MAX_RESULT_HEADER_BYTES:
        raise ModelFileError(f"{path}: the isolated reader sent a {header_length:,}-byte result header, "
                             f"more than {MAX_RESULT_HEADER_BYTES:,}; refusing it")
    header = bytearray(header_length)
    if _fill(fill, memoryview(header)) != header_length:
        raise _ChildDied
    message = parse_json(header, f"{path}: the isolated reader's result", MAX_RESULT_HEADER_BYTES,
                         MAX_RESULT_VALUES, MAX_RESULT_DEPTH)
    if not isinstance(message, dict):
        raise ModelFileError(f"{path}: the isolated reader sent a malformed result")
    expected = 0 if "error" in message else _data_length(message, path)
    if data_length != expected:
        raise ModelFileError(f"{path}: the isolated reader sent a malformed result")
    data = bytearray(data_length)
    if _fill(fill, memoryview(data)) != data_length:
        raise _ChildDied
    return message, data


def _fill(fill, view: memoryview) -> int:
    """Call ``fill`` until ``view`` is full or it gives nothing (the end)."""
    filled = 0
    while filled < len(view):
        n = fill(view[filled:])
        if not n:
            break
        filled += n
    return filled


def check_result(header: bytes, arrays: _Arrays, path: str) -> None:
    """What the child is about to send, held to the bounds the parent will check (so that a file over them
    gets the reader's own message, not a refusal of the result)."""
    if len(header) > MAX_RESULT_HEADER_BYTES:
        raise ModelFileError(f"{path}: its configs and names take {len(header):,} bytes, more than "
                             f"{MAX_RESULT_HEADER_BYTES:,}; refusing it")
    check_result_arrays(arrays.table, file_bytes(path), path)


class _TimedOut(Exception):
    pass


class _ChildDied(Exception):
    pass


def _reap(process: subprocess.Popen, stderr) -> None:
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if process.stdout is not None:
        process.stdout.close()
    stderr.close()


def _read_some(selector, stream, view: memoryview, deadline: float | None) -> int:
    """What the child's stdout (registered with ``selector``) has for ``view`` once it has anything (0: the
    end), waiting no later than ``deadline``. A child that finished in time may still be writing into the pipe
    when the caller gets here late (busy importing the engine): past the deadline, what is ready is still read;
    only a pipe that stays empty past it is a timeout."""
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if selector.select(None if left is None else max(left, 0.0)):
            return stream.readinto(view) or 0
        if left is not None and left <= 0:
            raise _TimedOut


# --------------------------------------------------------------------------------------------------
# What crosses the pipe: plain JSON and raw arrays
# --------------------------------------------------------------------------------------------------


class _Arrays:
    """Collects arrays while a result is encoded: each becomes an index into a table of (dtype, shape, offset)."""

    def __init__(self) -> None:
        self.table: list[list] = []
        self.arrays: list[np.ndarray] = []
        self.size = 0

    def add(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        if array.dtype.kind not in "fiub" or array.dtype.hasobject:  # the readers make float32 only
            raise TypeError(f"an array of dtype {array.dtype} cannot be sent")
        self.size += -self.size % _ALIGN
        self.table.append([array.dtype.str, list(array.shape), self.size])
        self.arrays.append(array)
        self.size += array.nbytes
        return len(self.table) - 1


def _encode_model(spec: ModelSpec, arrays: _Arrays) -> dict:
    return {
        "name": spec.name,
        "layers": [_encode_layer(layer, arrays) for layer in spec.layers],
        "inputs": [_encode_ref(ref) for ref in spec.inputs],
        "outputs": [_encode_ref(ref) for ref in spec.outputs],
        "weights": {layer: {var: arrays.add(a) for var, a in variables.items()}
                    for layer, variables in spec.weights.items()},
        "keras_version": spec.keras_version,
        "source": spec.source,
    }


def _encode_layer(layer: LayerSpec, arrays: _Arrays) -> dict:
    return {
        "name": layer.name, "class_name": layer.class_name, "config": layer.config,
        # A TensorRef is a list [layer, node, tensor]; a scalar operand a number; a per-channel constant
        # (a tuple of floats) {"constant": [...]}.
        "inbound": [{"args": [_encode_arg(a) for a in call.args],
                     "kwargs": call.kwargs} for call in layer.inbound],
        "submodel": None if layer.submodel is None else _encode_model(layer.submodel, arrays),
    }


def _encode_ref(ref: TensorRef) -> list:
    return [ref.layer, ref.node_index, ref.tensor_index]


def _encode_arg(arg):
    if isinstance(arg, TensorRef):
        return _encode_ref(arg)
    return {"constant": list(arg)} if isinstance(arg, tuple) else arg


def _decode_arg(arg):
    if isinstance(arg, list):
        return _decode_ref(arg)
    if isinstance(arg, dict):
        return tuple(float(v) for v in arg["constant"])
    return float(arg)


def encode(result) -> tuple[bytes, _Arrays]:
    """A reader's result (ModelSpec, WeightsFile or a PyTorch StateDict) -> (JSON header, its arrays)."""
    from npmobile.io.torch import StateDict

    arrays = _Arrays()
    if isinstance(result, ModelSpec):
        message = {"model": _encode_model(result, arrays)}
    elif isinstance(result, WeightsFile):
        error = result.model_error
        message = {"weights": {
            "source": result.source,
            "layers": [[layer.name, [[name, arrays.add(a)] for name, a in layer.variables]] for layer in result.layers],
            "model_error": None if error is None else [type(error).__name__, str(error)],
        }}
    elif isinstance(result, StateDict):
        message = {"state_dict": {"source": result.source,
                                  "tensors": [[name, arrays.add(a)] for name, a in result.tensors.items()]}}
    else:
        raise TypeError(f"cannot send a {type(result).__name__}")
    message["arrays"] = arrays.table
    return json.dumps(message, separators=(",", ":")).encode("utf-8"), arrays


def encode_error(error: Exception) -> bytes:
    return json.dumps({"error": [type(error).__name__, str(error)]}).encode("utf-8")


def _error(pair: Any) -> NpmobileError:
    name, message = pair
    return _ERRORS.get(str(name), ModelFileError)(str(message))


def decode(message: dict, data: bytearray, path: str):
    """The child's message -> the ModelSpec or WeightsFile it encoded (arrays are views of ``data``), or the
    error it reported, raised."""
    if "error" in message:
        raise _error(message["error"])
    from npmobile.io.torch import StateDict

    try:
        arrays = [_array(entry, data) for entry in message["arrays"]]
        if "model" in message:
            return _decode_model(message["model"], arrays)
        if "state_dict" in message:
            body = message["state_dict"]
            return StateDict({str(name): arrays[index] for name, index in body["tensors"]}, str(body["source"]))
        body = message["weights"]
        layers = [StoredLayer(str(name), [(None if var is None else str(var), arrays[index]) for var, index in stored])
                  for name, stored in body["layers"]]
        model_error = body.get("model_error")
        return WeightsFile(layers, str(body["source"]), None if model_error is None else _error(model_error))
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: the isolated reader sent a malformed result ({error})") from None


def _array(entry: list, data: bytearray) -> np.ndarray:
    dtype_text, shape, offset = entry
    dtype = np.dtype(str(dtype_text))
    if dtype.kind not in "fiub" or dtype.hasobject:
        raise ValueError(f"dtype {dtype}")
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if min(shape, default=0) < 0 or offset < 0 or offset + count * dtype.itemsize > len(data):
        raise ValueError("an array outside the data")
    return np.frombuffer(data, dtype=dtype, count=count, offset=int(offset)).reshape(shape)


def _decode_model(body: dict, arrays: list[np.ndarray]) -> ModelSpec:
    layers = [LayerSpec(name=str(layer["name"]), class_name=str(layer["class_name"]), config=layer["config"],
                        inbound=[CallSpec(args=[_decode_arg(a) for a in call["args"]], kwargs=dict(call["kwargs"]))
                                 for call in layer["inbound"]],
                        submodel=None if layer["submodel"] is None else _decode_model(layer["submodel"], arrays))
              for layer in body["layers"]]
    if any(not isinstance(layer.config, dict) for layer in layers):
        raise ValueError("a layer config that is not a mapping")
    return ModelSpec(name=str(body["name"]), layers=layers,
                     inputs=[_decode_ref(r) for r in body["inputs"]], outputs=[_decode_ref(r) for r in body["outputs"]],
                     weights={str(layer): {str(var): arrays[i] for var, i in variables.items()}
                              for layer, variables in body["weights"].items()},
                     keras_version=int(body["keras_version"]), source=str(body["source"]))


def _decode_ref(ref: list) -> TensorRef:
    layer, node, tensor = ref
    return TensorRef(str(layer), int(node), int(tensor))


# --------------------------------------------------------------------------------------------------
# The child's side
# --------------------------------------------------------------------------------------------------


def child_main() -> None:
    """``python -c _BOOT ROOT KIND PATH MEMORY_LIMIT``: read, then write one result to stdout and exit."""
    kind, path, limit = sys.argv[2], sys.argv[3], int(sys.argv[4])
    _limit_memory(limit)
    from npmobile.io import lock_down

    lock_down()
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the result stream
    try:
        header, arrays = encode(read_in_process(path, kind))
        check_result(header, arrays, path)
    except NpmobileError as error:
        header, arrays = encode_error(error), _Arrays()
    except MemoryError:
        header, arrays = encode_error(ModelFileError(
            f"{path}: reading the file needs more than {limit / 2**30:g} GiB of memory: it is corrupt or "
            "hostile (for a file you trust, load it as trusted)")), _Arrays()
    except Exception as error:  # noqa: BLE001 -- any other failure on a hostile file is still one clean error
        header, arrays = encode_error(ModelFileError(
            f"{path}: the file cannot be read ({type(error).__name__}: {str(error)[:160]})")), _Arrays()
    for chunk in result_chunks(header, arrays):
        out.write(chunk)
    out.flush()


def result_chunks(header: bytes, arrays: _Arrays):
    """The result as it crosses the pipe: the prefix, the JSON header, then each array on its boundary."""
    yield _PREFIX.pack(_MAGIC, len(header), arrays.size)
    yield header
    written = 0
    for (_, _, offset), array in zip(arrays.table, arrays.arrays):
        yield bytes(offset - written)
        yield array.reshape(-1).view(np.uint8)
        written = offset + array.nbytes


def _limit_memory(limit: int) -> None:
    try:
        import resource
    except ImportError:  # not on this platform: the time limit still holds
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash on a hostile file leaves no core file behind
