"""The AVX2 build of the kernels, on any x86-64 machine that runs AVX2: the environment that makes Numba compile them
for Haswell and NumPy's OpenBLAS run its Haswell kernels, and the check that the compiled code holds no AVX-512
instruction (which a real AVX2 CPU could not run).

What runs in it: tests/test_avx2.py (the AVX2 pass), which tests/conftest.py checks at its start and end.
"""

from __future__ import annotations

import re

# NUMBA_CPU_FEATURES set, to nothing (the CPU name's own features): unset, Numba compiles for Haswell with this
# machine's features, AVX-512's included (numba.core.codegen), and that code is no AVX2 build.
AVX2_TARGET = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "", "OPENBLAS_CORETYPE": "Haswell"}

# What only AVX-512 has, in LLVM's assembly (AT&T syntax): its registers (zmm, the upper sixteen xmm and ymm, the
# mask registers), embedded broadcasts, and instructions with no AVX2 form.
AVX512_ASM = re.compile(
    r"%zmm\d|%[xy]mm(?:1[6-9]|2\d|3[01])\b|%k[0-7]\b|\{1to\d+\}"
    r"|^\s+(?:vpternlog|vrndscale|vrcp14|vrsqrt14|vpermt2|vpermi2|vscalef|vgetexp|vgetmant|vfixupimm|vp?compress"
    r"|vp?expand|vpconflict|vplzcnt|valign|vcvtt?ps2udq|vcvtudq2ps|k(?:mov|and|or|xor|not|shift|test|unpck))",
    re.MULTILINE)


def kernels_using_avx512() -> tuple[list[str], int]:
    """The compiled kernels (by name and signature) whose machine code holds an AVX-512 instruction, and how many
    compiled kernels were read: every signature of every kernel dispatcher, and every C function the kernels made
    (depthwise's row kernels)."""
    from npmobile.kernels import backend, build

    found, read = [], 0
    for name, dispatcher in build.kernel_dispatchers().items():
        for signature in dispatcher.signatures:
            read += 1
            if AVX512_ASM.search(dispatcher.inspect_asm(signature)):
                found.append(f"{name}{signature}")
    for function, compiled in backend.CFUNCS.items():
        read += 1
        if AVX512_ASM.search(compiled._library.get_asm_str()):
            found.append(f"{function.__module__}.{function.__qualname__} (C function)")
    return found, read
