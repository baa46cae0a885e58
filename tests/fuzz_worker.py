"""Runs mutated model files and images through npmobile in a child process, so that a crash of a C
library (libhdf5, Pillow's decoders) or a hang shows up as a failed test instead of killing pytest.

    python tests/fuzz_worker.py KIND BASE_FILE COUNT SEED WORKDIR

KIND: "model" (load_model, then predict on a tiny input when it loads), "weights" (read_weights, isolated),
or "image" (load_img). Prints one JSON line: {"ran": N, "outcomes": {...}, "foreign": [...]}.
Every input must either work or raise npmobile's own error; anything else is "foreign". Each input's
reading is bounded on its own: the reader runs in npmobile's child process with a time limit
(npmobile.isolation), so a file that hangs libhdf5 ends in an error like any other.
"""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import numpy as np

# Seconds each input's reading may take (a 64-pixel MobileNetV3 file reads in well under one).
READ_SECONDS = 10


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation: flip bytes, overwrite a run, truncate, duplicate or delete a slice."""
    data = bytearray(data)
    kind = rng.choice(["flip", "flip", "overwrite", "truncate", "splice", "delete", "zero"])
    n = len(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(n)
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        i = rng.randrange(n)
        data[i:i + rng.randint(1, 64)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "truncate":
        data = data[: rng.randrange(n)]
    elif kind == "splice":
        i, j = sorted(rng.randrange(n) for _ in range(2))
        k = rng.randrange(n)
        data[k:k] = data[i:j][:4096]
    elif kind == "delete":
        i = rng.randrange(n)
        del data[i:i + rng.randint(1, 4096)]
    else:
        i = rng.randrange(n)
        data[i:i + rng.randint(1, 512)] = bytes(min(512, n - i))
    return bytes(data)


def attempt(kind: str, path: Path) -> str:
    import npmobile
    from npmobile.errors import NpmobileError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NaN/Inf weights warn; that is an outcome, not a failure
            if kind == "model":
                model = npmobile.load_model(path, timeout=READ_SECONDS)
                shape = [d or 32 for d in model.input_shape[1:]]
                if int(np.prod(shape)) <= 4_000_000:
                    model.predict(np.zeros([1, *shape], np.float32))
            elif kind == "weights":
                from npmobile.isolation import read_file

                read_file(path, "weights", timeout=READ_SECONDS)
            else:
                from npmobile.image import load_img

                load_img(path, target_size=(32, 32))
        return "ok"
    except NpmobileError as error:
        return "npmobile-timeout" if "did not finish" in str(error) else "npmobile-error"
    except MemoryError:
        return "foreign: MemoryError"
    except Exception as error:  # the point of the test: name anything that is not ours
        return f"foreign: {type(error).__name__}: {str(error)[:120]}"


def main() -> None:
    kind, base, count, seed, workdir = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(
        sys.argv[5])
    data = base.read_bytes()
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    foreign = []
    for i in range(count):
        mutated = mutate(data, rng)
        path = workdir / f"fuzz{i}{''.join(base.suffixes)}"
        path.write_bytes(mutated)
        outcome = attempt(kind, path)
        key = outcome.split(":")[0]
        outcomes[key] = outcomes.get(key, 0) + 1
        if outcome.startswith("foreign"):
            keep = workdir / f"crash-{i}{''.join(base.suffixes)}"
            path.rename(keep)
            foreign.append({"input": str(keep), "outcome": outcome})
        else:
            path.unlink()
    print(json.dumps({"ran": count, "outcomes": outcomes, "foreign": foreign}))


if __name__ == "__main__":
    main()
