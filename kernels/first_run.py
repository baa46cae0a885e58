"""Whether a model's first run will compile kernels: what the command line's "compiling kernels" notice asks.

Each kernel module lists what its first run compiles (``FIRST_RUN_KERNELS``; depthwise also its row kernels of a
window size, ``row_kernels_of``) and the backend says whether a kernel is compiled already (``is_cached``: Numba's
on-disk cache, or the module built ahead of time). Imports every operator: nothing in kernels/ imports this.
"""

from __future__ import annotations

from . import backend, conv, depthwise, expand_depthwise, gemm
from . import squeeze_excite as squeeze_excite_module


def kernels_cached(depthwise_sizes: tuple[int, ...] = (3, 5), squeeze_excite: bool = True,
                   rescaled_input: bool = True, expand_depthwise_sizes: tuple[int, ...] = ()) -> bool:
    """True when the kernels a MobileNet runs are compiled already (Numba's on-disk cache, or the module built
    ahead of time), so no compile pause is coming.

    ``depthwise_sizes``, ``squeeze_excite``, ``rescaled_input``, ``expand_depthwise_sizes``: what the
    model has (V1 and V2: 3x3, no squeeze-excite, no Rescaling layer; V2 at 224: 3x3 expand + depthwise
    pairs fused), since a kernel a model never runs is never compiled. Each kernel module lists what its
    first run compiles (``FIRST_RUN_KERNELS``) and the backend says whether it is cached (``is_cached``); a
    False answer only means "expect a compile", never an error.
    """
    # Not checked: the OpenBLAS tiles some AVX2 products take (only models with 1x1 layers of 256+ channels each
    # way compile them, in the same first run as the GEMM drivers). Each group: one of its kernels compiled.
    groups = [(k,) for k in gemm.FIRST_RUN_KERNELS + (conv.FIRST_RUN_KERNELS if rescaled_input else ())]
    sizes = sorted({k for k in (*depthwise_sizes, *expand_depthwise_sizes) if depthwise.row_kernels_of(k)})
    if sizes:  # a row kernel of each window size, in any of its orders and activations
        groups += [(k,) for k in depthwise.FIRST_RUN_KERNELS] + [depthwise.row_kernels_of(k) for k in sizes]
    if squeeze_excite:
        groups += [(k,) for k in squeeze_excite_module.FIRST_RUN_KERNELS]
    if expand_depthwise_sizes:
        groups += [(k,) for k in expand_depthwise.FIRST_RUN_KERNELS]
    answers = [[backend.is_cached(k) for k in group] for group in groups]
    if any(None in group for group in answers):  # cannot tell (nowhere to cache: backend.py said so in one line)
        return True
    return all(any(group) for group in answers)
