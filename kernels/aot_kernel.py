"""A kernel of the module built ahead of time: the export whose signature the arguments match, else the JIT twin.

numba.pycc's wrappers do not check their arguments (a float64 array given to a float32 signature would be read as
garbage), so a call runs an export only when its arguments' types (``type_key``: how kernels/build.py spells a
signature) are exactly one it was built for; any other goes to the JIT twin (kernels/backend.py ``jit_twin``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

_SCALAR_KEYS = {float: "float64", bool: "bool", np.float32: "float32", np.float64: "float64",
                np.int64: "int64", np.int32: "int32", np.bool_: "bool"}

_DTYPE_NAMES: dict[np.dtype, str] = {}


def type_key(value) -> str | None:
    """The exported-signature spelling of an argument's Numba type, or None for a type no export takes."""
    kind = type(value)
    if kind is np.ndarray:
        flags = value.flags
        if not flags.aligned:
            return None
        layout = "C" if flags.c_contiguous else "F" if flags.f_contiguous else "A"
        dtype = value.dtype
        name = _DTYPE_NAMES.get(dtype) or _DTYPE_NAMES.setdefault(dtype, dtype.name)  # .name is slow Python
        return f"{name}:{value.ndim}:{layout}:{'w' if flags.writeable else 'r'}"
    if kind is int:
        return "int64" if -(2**63) <= value < 2**63 else None
    return _SCALAR_KEYS.get(kind)


class AotKernel:
    """A kernel from the AOT module: the export whose signature the arguments match, else the JIT twin."""

    def __init__(self, function, options: dict, exports: dict, find_twin: Callable[[], Callable]):
        self.py_func = function
        self.options = options
        self.name = f"{function.__module__}.{function.__qualname__}"
        self.__name__, self.__qualname__, self.__doc__ = function.__name__, function.__qualname__, function.__doc__
        self.exports = exports  # signature (type_key of each argument) -> the module's function
        self._find_twin = find_twin
        self._twin = None

    def twin(self):
        """The JIT-compiled form of this kernel (imports Numba)."""
        if self._twin is None:
            self._twin = self._find_twin()
        return self._twin

    def resolve(self, *args):
        """The function to run on arguments of these types: the matching export, else the JIT twin."""
        export = self.exports.get(tuple(type_key(a) for a in args))
        return export if export is not None else self.twin()

    def __call__(self, *args, **kwargs):
        if kwargs:
            return self.twin()(*args, **kwargs)
        return self.resolve(*args)(*args)

    def __getattr__(self, name):  # a dispatcher's attributes (signatures, stats, ...): the twin's
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.twin(), name)

    def __repr__(self) -> str:
        return f"<AotKernel {self.name}: {len(self.exports)} exported signatures>"


def resolved(call):
    """A bound call (``partial(kernel, *args)``) with its AOT kernel chosen for these arguments, once."""
    if isinstance(call, partial) and isinstance(call.func, AotKernel) and not call.keywords:
        chosen = partial(call.func.resolve(*call.args), *call.args)
        if getattr(call, "calls_blas", False):  # kernels/entry.py's mark goes with it
            chosen.calls_blas = True
        return chosen
    return call
