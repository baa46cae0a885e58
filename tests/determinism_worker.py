"""Checks the determinism contract in a process of its own, where Numba may run up to 4 threads.

    NUMBA_NUM_THREADS=4 python tests/determinism_worker.py

For one model of each family (random weights, non-trivial BatchNorm statistics), an image's answer
-- the final output and intermediate layers -- must be bit-identical whatever the thread count
(1, 2, 3, 4), whatever the batch it comes in (1, 3 or 7 images) and whatever its position in it.
The kernels cap their threads at NUMBA_NUM_THREADS, which defaults to the CPUs this process may use:
hence a process of its own (on the JIT or the built module, as the test pass has it). Prints one JSON
line: {"checked": N, "threads": [...], "mismatches": [...]}.
"""

from __future__ import annotations

import json

import numpy as np

from npmobile import applications

SIZE = 64
# (builder, keyword arguments, intermediate layers to compare beside the output)
MODELS = [
    ("MobileNet", {"alpha": 0.25}, ["conv_pw_3_relu", "conv_dw_12_relu"]),
    ("MobileNetV2", {"alpha": 0.35}, ["block_3_depthwise", "block_13_expand_relu"]),
    ("MobileNetV3Small", {}, ["expanded_conv_3_squeeze_excite_mul", "expanded_conv_10_add"]),
    ("MobileNetV3Large", {"alpha": 0.75}, ["expanded_conv_5_project_bn", "expanded_conv_14_add"]),
]


def randomize_batchnorm(model, rng: np.random.Generator) -> None:
    """Give every BatchNormalization non-trivial statistics, so folding has work to do."""
    for node in model.graph.nodes:
        weights = node.weights
        if "moving_variance" in weights:
            c = weights["moving_variance"].shape
            weights["gamma"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            weights["beta"] = rng.uniform(-0.2, 0.2, c).astype(np.float32)
            weights["moving_mean"] = rng.uniform(-0.2, 0.2, c).astype(np.float32)
            weights["moving_variance"] = rng.uniform(0.5, 1.5, c).astype(np.float32)


def main() -> None:
    from npmobile.kernels.threads import max_threads

    threads = list(range(1, max_threads() + 1))[:4]
    rng = np.random.default_rng(0)
    mismatches: list[str] = []
    checked = 0
    for builder, kwargs, layers in MODELS:
        model = getattr(applications, builder)(weights=None, input_shape=(SIZE, SIZE, 3), **kwargs)
        randomize_batchnorm(model, rng)
        high = 255.0 if "V3" in builder else 1.0
        image = rng.uniform(-high if high == 1.0 else 0.0, high, (1, SIZE, SIZE, 3)).astype(np.float32)
        names = [*layers, model.graph.outputs[0]]
        alone = model.predict(image, outputs=names, threads=1)
        for n in threads:
            for batch, position in [(1, 0), (3, 0), (3, 2), (7, 3), (7, 6)]:
                x = rng.uniform(-high if high == 1.0 else 0.0, high, (batch, SIZE, SIZE, 3)).astype(np.float32)
                x[position] = image[0]
                got = model.predict(x, outputs=names, threads=n)
                for name in names:
                    checked += 1
                    if not np.array_equal(got[name][position], alone[name][0]):
                        differ = int(np.sum(got[name][position] != alone[name][0]))
                        mismatches.append(f"{builder} {name}: threads={n} batch={batch} position={position}: "
                                          f"{differ} of {alone[name][0].size} values differ")
    print(json.dumps({"checked": checked, "threads": threads, "mismatches": mismatches}))


if __name__ == "__main__":
    main()
