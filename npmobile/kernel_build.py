"""Build the ahead-of-time kernel module for the MobileNets (what ``npmobile build-kernels`` runs, in a process of
its own).

    python -m npmobile.kernel_build [--quick] [--root DIR]

Which models run to collect the kernels' signatures is known here, where the models are: every family of
npmobile.applications with random weights, at a few sizes and batches, on one thread and on all
(``run_workload``). The model-agnostic part -- export what the dispatchers hold, compile, write the manifest,
install by rename (kernels/build.py) and the cache's files and lock (kernels/cache_files.py) -- is in kernels/.

A foreground build waits for a build of this host, stops in one line for another host's, says when a current
module is there already (``--force`` builds anyway), and removes the staging folders of builds killed halfway.
``--background`` is how the command line starts it by itself after a run on the JIT (npmobile/cli/build_kernels.py:
``start_in_background``): at low priority, holding the cache's build lock (taken by the starter, handed to this
process, released here when done), its output in ``<key>.log``, and on failure a ``<key>.failed`` marker so that
no later run starts it again for this key. The build runs as an isolated child (npmobile/children.py: ``python
-I``, no PYTHON* variables, started in ``/``): nothing in the user's working folder is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from npmobile.errors import NpmobileError

# (family, alpha, sizes, batches): what the export table is derived from. 224 runs V2's fused expand+depthwise
# blocks; 128 and 96 the smaller maps (other tiles, the serial forms); batch 2 the batched forms. V3-Large at
# alpha 0.75 has 3x3 hard-swish depthwise layers whose channels take the by-pixel row order, which no
# alpha-1 family has: without it that row kernel would come from the JIT twin (Numba's import, at start-up).
WORKLOAD = tuple((family, 1.0, (224, 128, 96), (1, 2)) for family in
                 ("mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")) + (
    ("mobilenet_v3_large", 0.75, (224,), (1,)),)
# A small module (tests, a quick try): the two models tests/test_aot.py checks, at one size.
QUICK_WORKLOAD = (("mobilenet_v2", 1.0, (96,), (1,)), ("mobilenet_v3_small", 1.0, (96,), (1,)))


def run_workload(workload) -> None:
    """Run every model of ``workload`` through the JIT, on one thread and on all of them."""
    import numpy as np

    from npmobile.applications import FAMILIES
    from npmobile.kernels.threads import max_threads

    rng = np.random.default_rng(0)
    threads = sorted({1, max_threads()})
    for family, alpha, sizes, batches in workload:
        for size in sizes:
            model = FAMILIES[family](weights=None, input_shape=(size, size, 3), alpha=alpha)
            for batch in batches:
                x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
                for n in threads:
                    model.predict(x, threads=n)



def build(root: Path | None = None, workload=WORKLOAD, force: bool = False) -> tuple[Path, dict]:
    """Build the module for this machine from ``workload``'s models into ``root`` / cache_key() (default root:
    the kernel cache); returns the module's path and a summary (exports, seconds, bytes). Runs in JIT mode only."""
    from npmobile.kernels import build as kernels_build

    return kernels_build.build(lambda: run_workload(workload), describe_workload(workload), root, force=force)


def describe_workload(workload) -> list[dict]:
    """The workload as the manifest records it: which models' kernels the module covers."""
    return [{"family": family, "alpha": alpha, "sizes": list(sizes), "batches": list(batches)}
            for family, alpha, sizes, batches in workload]


def covers(manifest: dict) -> str:
    """Which models' kernels a module holds, in words (from its manifest's workload)."""
    workload = manifest.get("workload")
    if not workload:
        return "unknown models"
    return "; ".join(f"{w['family']}{alpha_words(w.get('alpha', 1.0))} at {'/'.join(map(str, w['sizes']))} px, "
                     f"batch {'/'.join(map(str, w['batches']))}" for w in workload)


def alpha_words(alpha: float) -> str:
    return "" if alpha == 1.0 else f" alpha {alpha:g}"


def holds_workload(manifest: dict, workload) -> bool:
    """Whether a module's manifest says its build ran at least ``workload`` (every family, alpha, size and batch)."""
    ran = {(w["family"], w.get("alpha", 1.0), size, batch) for w in manifest.get("workload") or ()
           for size in w["sizes"] for batch in w["batches"]}
    return all((family, alpha, size, batch) in ran for family, alpha, sizes, batches in workload for size in sizes
               for batch in batches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npmobile.kernel_build", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, help="the kernel cache directory (default: backend.kernel_cache_dir())")
    parser.add_argument("--quick", action="store_true", help="a small module: V2 and V3-Small at 96 px, batch 1")
    parser.add_argument("--force", action="store_true", help="build even if a current module is there")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    parser.add_argument("--background", action="store_true",
                        help="started by the command line: low priority; release the build lock when done, and "
                             "on failure leave <key>.failed in the cache")
    args = parser.parse_args(argv)
    os.environ["NPMOBILE_KERNELS"] = "jit"  # the build runs the JIT (before the kernels are first imported)
    from npmobile.kernels import backend, cache_files

    root = args.root if args.root is not None else backend.kernel_cache_dir()
    args.root = root
    if args.background:
        return build_in_background(args)
    try:
        cache_files.make_cache_folder(root)
        lock = cache_files.wait_for_lock(root, say=lambda text: print(
            f"npmobile: another build of the kernels (pid {text.split()[0]}) is running; waiting for it",
            file=sys.stderr))
    except OSError as error:
        print(f"npmobile: cannot build the kernels into {root}: {error.strerror or error}", file=sys.stderr)
        return 1
    if lock is None:
        holder = cache_files.lock_text(root)
        print(f"npmobile: the kernel cache {root} is locked by a build on another host ({holder!r}); if "
              f"none runs there, remove {root / cache_files.LOCK}", file=sys.stderr)
        return 1
    try:
        os.close(lock)
        cache_files.clean_abandoned(root)
        workload = QUICK_WORKLOAD if args.quick else WORKLOAD
        current = None if args.force else cache_files.current_module(root)
        if current is not None and holds_workload(current[1], workload):
            print(json.dumps({"module": str(current[0]), "current": True, "covers": covers(current[1])}))
            return 0
        return build_and_report(args)
    finally:
        cache_files.release_lock(root)


def build_in_background(args) -> int:
    """The build the command line started (its lock handed to this process): at low priority, a failure's
    traceback into the log and a failure marker beside it, the lock released at the end."""
    from npmobile.kernels import backend, cache_files

    os.nice(10)  # the user's own work first
    root = args.root
    args.debug, code = True, 1  # the log gets a failure's traceback
    try:
        cache_files.clean_abandoned(root)
        code = build_and_report(args)
    except Exception:
        traceback.print_exc()
    finally:
        if code != 0:
            key = backend.cache_key()
            try:
                log = f"{cache_files.log_path(root, key)}\n".encode()
                cache_files.write_atomically(cache_files.failure_marker(root, key), log)
            except OSError:  # a full or read-only cache: nothing more to leave
                traceback.print_exc()
        cache_files.release_lock(root)
    return code


def build_and_report(args) -> int:
    """Build as ``args`` say; print the summary as one JSON line, or a failure as one line on stderr."""
    try:
        workload = QUICK_WORKLOAD if args.quick else WORKLOAD
        module, summary = build(args.root, workload, force=args.force)
        summary["covers"] = covers({"workload": describe_workload(workload)})
    except NpmobileError as error:
        if args.debug:
            raise
        print(f"npmobile: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a read-only or full cache folder
        if args.debug:
            raise
        print(f"npmobile: building the kernels failed: {error}".splitlines()[0], file=sys.stderr)
        return 1
    except Exception as error:  # pycc, the compiler or the linker: one line (--debug for the traceback)
        if args.debug:
            raise
        print(f"npmobile: building the kernels failed: {type(error).__name__}: {error}".splitlines()[0],
              file=sys.stderr)
        return 1
    print(json.dumps({"module": str(module), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
