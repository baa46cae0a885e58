"""Kernel entry points that check their arguments once, for callers that run them many times.

A kernel's public function checks shapes (Numba does not check indices: a wrong shape would read
past an array, not raise) and chooses the compiled loop to run. The plan runs the same step on the
same buffers at every prediction, so it should check once. Each entry point is therefore written as
a *binder*: it checks, chooses, and returns the call to make -- a ``functools.partial`` of a
compiled kernel with every argument given -- and ``@entry`` turns it into the function people call:

    pointwise_conv2d(x, kernel, bias, out, act)           # checks, then runs
    call = pointwise_conv2d.bind(x, kernel, bias, out, act)   # checks, once
    call()                                                # runs: only the compiled kernel's dispatch
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from . import backend


def entry(binder: Callable[..., Callable[[], None]]) -> Callable[..., None]:
    """The function that binds and runs at once; the binder stays reachable as ``.bind``."""

    @functools.wraps(binder)
    def run(*args, **kwargs) -> None:
        binder(*args, **kwargs)()

    run.bind = _resolving(binder) if backend.AOT else binder
    return run


def _resolving(binder):
    """With AOT kernels (kernels/backend.py): a binder whose call has its kernel chosen once, at binding --
    the export for these argument types, else the JIT twin -- rather than at every call."""

    @functools.wraps(binder)
    def bind(*args, **kwargs):
        call = binder(*args, **kwargs)
        if isinstance(call, ByThreads):
            return ByThreads(backend.resolved(call.one), backend.resolved(call.many))
        return backend.resolved(call)

    return bind


class ByThreads(NamedTuple):
    """A bound call with a form for one thread: a plain loop over the same rows the parallel form
    spreads over the threads (starting a parallel region has a fixed cost beside a small layer's
    work). Both compute each row the same way, so the answers do not depend on which runs. The plan
    picks one per prediction (npmobile/plan.py); called directly, it asks Numba for the thread count."""

    one: Callable[[], None]
    many: Callable[[], None]

    def __call__(self) -> None:
        (self.one if backend.get_num_threads() == 1 else self.many)()


def no_work() -> None:
    """The bound call of a step with nothing to compute (an empty product)."""


def calls_blas(call):
    """Mark a bound call whose kernel calls BLAS (kernels/blas.py's sgemm, or NumPy's matmul): while a
    plan with such a step runs, BLAS is held to one thread (kernels/threads.py says why). Returns ``call``."""
    call.calls_blas = True
    return call


def needs_blas(call) -> bool:
    """Whether running a bound call may call BLAS: if marked by ``calls_blas``; a compiled kernel's partial
    otherwise not; any other callable (a NumPy reference step, say) may."""
    if isinstance(call, ByThreads):
        return needs_blas(call.one) or needs_blas(call.many)
    marked = getattr(call, "calls_blas", None)
    return (not isinstance(call, functools.partial)) if marked is None else marked


no_work.calls_blas = False


class InOrder(NamedTuple):
    """One call that makes two, in this order (a scratch filled, then the product that reads it)."""

    first: Callable[[], None]
    then: Callable[[], None]

    def __call__(self) -> None:
        self.first()
        self.then()

    @property
    def calls_blas(self) -> bool:
        return needs_blas(self.first) or needs_blas(self.then)


in_order = InOrder


def rebinder(call, old: np.ndarray) -> Callable[[np.ndarray], Callable[[], None]] | None:
    """A function ``new -> call'``: ``call`` with every array argument that is ``old``'s memory, in any shape,
    read from ``new`` instead (``new``: the same shape, dtype and layout as ``old``). None when ``call`` is not
    made of the bound calls this module knows (a kernel's partial, ``ByThreads``, ``InOrder``), whose arguments
    it can see.

    The plan binds the steps that read the model's input once, to a placeholder, and gives each prediction's
    input this way: binding again (checks, choosing a kernel) would cost more than the smallest steps run."""
    if isinstance(call, (ByThreads, InOrder)):
        parts = [rebinder(part, old) for part in call]
        if any(part is None for part in parts):
            return None
        kind = type(call)
        return lambda new: kind(*(part(new) for part in parts))
    if not isinstance(call, functools.partial) or call.keywords:
        return None
    start, size = old.ctypes.data, old.nbytes
    seen = [(i, a.shape) for i, a in enumerate(call.args)
            if isinstance(a, np.ndarray) and a.ctypes.data == start and a.nbytes == size]
    func, args, blas = call.func, list(call.args), getattr(call, "calls_blas", None)

    def rebound(new: np.ndarray) -> functools.partial:
        given = args.copy()
        for i, shape in seen:
            given[i] = new.reshape(shape)
        made = functools.partial(func, *given)
        if blas is not None:
            made.calls_blas = blas
        return made

    return rebound


def same_call(a, b) -> bool:
    """Whether two bound calls run the same kernels on the same memory with the same arguments."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (ByThreads, InOrder)):
        return all(same_call(x, y) for x, y in zip(a, b))
    if not isinstance(a, functools.partial):
        return a is b
    return a.func is b.func and not a.keywords and not b.keywords and len(a.args) == len(b.args) and all(
        _same_argument(x, y) for x, y in zip(a.args, b.args))


def _same_argument(x, y) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.ctypes.data == y.ctypes.data
                and x.shape == y.shape and x.strides == y.strides and x.dtype == y.dtype)
    if isinstance(x, (int, float, np.number, str)) or x is None:
        return type(x) is type(y) and x == y
    return x is y
