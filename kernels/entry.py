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


def in_order(first: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    """One call that makes two, in this order (a scratch filled, then the product that reads it)."""

    def both() -> None:
        first()
        then()

    both.calls_blas = needs_blas(first) or needs_blas(then)
    return both
