"""``npmobile build-kernels``: compile the kernels ahead of time, so that later runs start without Numba."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def add_parser(commands):
    parser = commands.add_parser(
        "build-kernels", help="compile the kernels ahead of time (faster start-up; needs a C compiler)",
        description="Compile the kernels ahead of time: every signature the MobileNets use, into one native "
                    "module for this CPU, Python and Numba, in the kernel cache ($NPMOBILE_KERNELS_DIR, else "
                    "$NPMOBILE_CACHE_DIR/kernels, else $XDG_CACHE_HOME/npmobile/kernels, else "
                    "~/.cache/npmobile/kernels), and print where. Later runs (classify, "
                    "predict, ...) load it instead of importing Numba: about 0.3-0.5 s and 100 MB less at "
                    "start-up, the same answers bit for bit. A call the module has no signature for, a changed "
                    "kernel source, CPU or Numba version, or NPMOBILE_KERNELS=jit: the JIT, as without it. "
                    "Takes a few minutes (the first time also Numba's compiles).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a small module (MobileNetV2 and V3-Small at 96 px, batch 1): for a quick try")
    return parser


def run(args) -> int:
    from npmobile.errors import NpmobileError

    # A process of its own, on the JIT: this one may already hold an AOT module, and numba.pycc
    # is patched while it compiles (kernels/build.py).
    command = [sys.executable, "-m", "npmobile.kernels.build"] + (["--quick"] if args.quick else []) + (
        ["--debug"] if getattr(args, "debug", False) else [])
    done = subprocess.run(command, env={**os.environ, "NPMOBILE_KERNELS": "jit"}, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        if done.returncode == 1:  # the child printed its one line
            return 1
        raise NpmobileError(f"building the kernels failed (exit status {done.returncode}; see above)")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{summary['module']}  ({summary['exports']} exported signatures of {summary['kernels']} kernels, "
          f"{summary['bytes'] / 2**20:.1f} MiB, built in {summary['workload_s'] + summary['compile_s']:.0f} s)")
    return 0
