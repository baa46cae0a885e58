"""Does the transfer-learning tutorial's model cost more than its bare architecture? (issue 24)

Builds, with Keras 3 at 160 px, TensorFlow's tutorial model (RandomFlip + RandomRotation in a nested Sequential,
mobilenet_v2.preprocess_input on the tensor, MobileNetV2 base with training=False, GAP, Dropout, Dense(1)) and the
bare architecture (the same base, GAP, Dense(1), fed preprocessed pixels), loads both in npmobile and times batch-1
predictions paired: A, B, A, B, ... so that a busy neighbour slows both alike. Prints the medians and their ratio.

    python bench/transfer.py --rounds 15 --calls 20 --threads 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SIZE = 160


def build(folder: Path) -> tuple[Path, Path]:
    import keras

    L = keras.layers
    shape = (SIZE, SIZE, 3)
    base = keras.applications.MobileNetV2(input_shape=shape, include_top=False, weights=None)
    inputs = keras.Input(shape)
    x = keras.Sequential([L.RandomFlip("horizontal"), L.RandomRotation(0.2)])(inputs)
    x = keras.applications.mobilenet_v2.preprocess_input(x)
    x = base(x, training=False)
    x = L.Dropout(0.2)(L.GlobalAveragePooling2D()(x))
    tutorial = keras.Model(inputs, L.Dense(1)(x))
    bare_inputs = keras.Input(shape)
    bare = keras.Model(bare_inputs, L.Dense(1)(L.GlobalAveragePooling2D()(base(bare_inputs, training=False))))
    paths = folder / "tutorial.keras", folder / "bare.keras"
    tutorial.save(paths[0])
    bare.save(paths[1])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20, help="predictions per timing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import npmobile

    with tempfile.TemporaryDirectory() as folder:
        tutorial_path, bare_path = build(Path(folder))
        tutorial, bare = npmobile.load_model(tutorial_path), npmobile.load_model(bare_path)
    pixels = np.random.default_rng(0).uniform(0, 255, (1, SIZE, SIZE, 3)).astype(np.float32)
    inputs = {"tutorial": pixels, "bare": pixels / np.float32(127.5) - np.float32(1)}
    models = {"tutorial": tutorial, "bare": bare}
    for name, model in models.items():  # compile and warm
        model.predict(inputs[name], threads=args.threads)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                model.predict(inputs[name], threads=args.threads)
            times[name].append((time.perf_counter() - start) / args.calls)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    ops = [n.op for n in tutorial.optimized_graph().nodes]
    print(f"optimized tutorial graph: {len(ops)} nodes, starts {ops[:3]}; bare: {len(bare.optimized_graph().nodes)}")
    for name, median in medians.items():
        spread = np.percentile(times[name], [25, 75]) * 1e3
        print(f"{name:9s} median {median * 1e3:7.3f} ms per image (IQR {spread[0]:.3f}-{spread[1]:.3f} ms)")
    print(f"tutorial / bare: {medians['tutorial'] / medians['bare']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
