"""``npmobile build-kernels``: compile the kernels ahead of time, so that later runs start without Numba.

The command line also starts that build by itself (``start_in_background``), the way ``git gc --auto`` packs a
repository: after a command that ran a model on the JIT because no module is built for this machine yet, once,
detached, at low priority; it prints one line and does not wait. ``NPMOBILE_AUTO_BUILD=0`` turns that off,
``NPMOBILE_AUTO_BUILD=quick`` builds the small module (tests). The library never starts processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from npmobile.children import NEUTRAL_CWD, clean_environment, isolated_main

AUTO_BUILD_NOTE = ("npmobile: compiling the kernels ahead of time in the background (once, ~1 min); later runs "
                   "start faster. NPMOBILE_AUTO_BUILD=0 turns this off.")


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
                    "Takes 20-60 s (the first time also Numba's compiles). classify, profile, show and verify "
                    "start this build by themselves, in the background, after a run on the JIT when no module "
                    "is built yet (NPMOBILE_AUTO_BUILD=0 turns that off); this command builds in the "
                    "foreground, also after such a build failed, waits for a build that is running, and says "
                    "so and stops when the module there is current (--force rebuilds). It prints which models' "
                    "kernels the module covers. A module is loaded only after its size and SHA-256 are checked "
                    "and only from a folder that is yours (or root's) and not writable by others; "
                    "NPMOBILE_KERNELS_DIR names a module built beforehand (a container image), used read-only.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a small module (MobileNetV2 and V3-Small at 96 px, batch 1): for a quick try")
    parser.add_argument("--force", action="store_true",
                        help="build even when a current module is there (by default the command says so and stops)")
    return parser


def build_command(root: Path, *options: str) -> list[str]:
    """The kernel build as an isolated child (npmobile/children.py): ``python -I``, clean environment."""
    return isolated_main("npmobile.kernels.build", "--root", str(root), *options)


def run(args) -> int:
    from npmobile.errors import NpmobileError
    from npmobile.kernels.backend import kernel_cache_dir

    # A process of its own, on the JIT: this one may already hold an AOT module, and numba.pycc
    # is patched while it compiles (kernels/build.py). The build takes the cache's lock, as the background
    # build does, and says when a current module is there already.
    options = [name for name, wanted in (("--quick", args.quick), ("--force", getattr(args, "force", False)),
                                         ("--debug", getattr(args, "debug", False))) if wanted]
    done = subprocess.run(build_command(kernel_cache_dir().absolute(), *options), stdout=subprocess.PIPE, text=True,
                          env=clean_environment(NPMOBILE_KERNELS="jit"), cwd=NEUTRAL_CWD)
    if done.returncode != 0:
        if done.returncode == 1:  # the child printed its one line
            return 1
        raise NpmobileError(f"building the kernels failed (exit status {done.returncode}; see above)")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    if summary.get("current"):
        print(f"{summary['module']} is current: nothing to build (--force rebuilds it)")
    else:
        print(f"{summary['module']}  ({summary['exports']} exported signatures of {summary['kernels']} kernels, "
              f"{summary['bytes'] / 2**20:.1f} MiB, built in {summary['workload_s'] + summary['compile_s']:.0f} s)")
    print(f"covers the kernels of: {summary['covers']} (any other model or size also runs, on Numba's JIT for "
          "what the module lacks)")
    return 0


def start_in_background() -> bool:
    """After a command ran its kernels on the JIT: start the build of this machine's module, detached, if
    none is built (or the one built failed its check: kernels/backend.py ``rejected``), none is being built,
    none failed before for this key and nothing forbids it; say so in one line on stderr. Never fails the
    command: anything unexpected means no build."""
    setting = os.environ.get("NPMOBILE_AUTO_BUILD", "").strip().lower()
    backend = sys.modules.get("npmobile.kernels.backend")  # absent: no kernel ran in this process
    if setting == "0" or backend is None or backend.AOT or not backend.aot_wanted():
        return False
    try:
        from npmobile.kernels import build

        if build.missing_tools() is not None or importlib.util.find_spec("numba") is None:
            return False
        root, key = backend.kernel_cache_dir().absolute(), backend.cache_key()
        rejected = backend.rejected
        if rejected is not None and not rejected.rebuild:  # a build would land where it cannot be used
            return False
        if ((rejected is None and (root / key / backend.MANIFEST).exists())
                or build.failure_marker(root, key).exists()):
            return False
        build.make_cache_folder(root)
        lock = build.take_lock(root)
        if lock is None:  # another build is under way
            return False
        try:
            log = build.create_new(build.log_path(root, key))
            try:
                command = build_command(root, "--background", *(["--quick"] if setting == "quick" else []))
                child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=NEUTRAL_CWD,
                                         env=clean_environment(NPMOBILE_KERNELS="jit"))
            finally:
                os.close(log)
            build.hand_lock(lock, child.pid)
        except BaseException:
            build.release_lock(root)
            raise
        finally:
            os.close(lock)
    except Exception:  # a convenience: whatever goes wrong here, the command's own result stands
        return False
    print(AUTO_BUILD_NOTE, file=sys.stderr)
    return True
