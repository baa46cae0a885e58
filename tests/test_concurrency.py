"""predict from several threads at once returns exactly what serial calls return."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from npmobile import applications


def test_concurrent_predicts_match_serial_results():
    model = applications.MobileNetV3Small(weights=None, input_shape=(64, 64, 3))
    inputs = [np.random.default_rng(i).uniform(0, 255, (1 + i % 3, 64, 64, 3)).astype(np.float32) for i in range(6)]
    serial = [model.predict(x) for x in inputs]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(len(inputs))}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(4):
                results[i].append(model.predict(inputs[i], threads=1 + i % 2))
        except BaseException as error:  # surfaced below: a thread's exception would vanish otherwise
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert all(not t.is_alive() for t in threads)
    for i, expected in enumerate(serial):
        assert len(results[i]) == 4
        for got in results[i]:
            np.testing.assert_array_equal(got, expected)


def test_a_batch_on_two_cores_equals_one_core_exactly():
    model = applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), alpha=0.35)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 64, 64, 3)).astype(np.float32)
    one = model.predict(x, threads=1)
    np.testing.assert_array_equal(model.predict(x, threads=2), one)
    maps = model.predict(x, threads=2, outputs=["block_3_depthwise", "out_relu"])
    np.testing.assert_array_equal(maps["block_3_depthwise"],
                                  model.predict(x, threads=1, outputs=["block_3_depthwise"])["block_3_depthwise"])


def test_an_image_answers_the_same_on_1_to_4_threads_in_any_batch_and_position():
    """The determinism contract (README), on one model of each family: final and intermediate outputs
    bit-identical for threads 1-4, batches of 1, 3 and 7, the image at different positions.

    In a process of its own with NUMBA_NUM_THREADS=4: the kernels cap their threads at the CPUs this process
    may use."""
    worker = Path(__file__).with_name("determinism_worker.py")
    env = {**os.environ, "NUMBA_NUM_THREADS": "4"}
    result = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=600, env=env,
                            cwd=worker.parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["threads"] == [1, 2, 3, 4]
    assert report["checked"] == 4 * 3 * 4 * 5  # models x layers x thread counts x (batch, position)
    assert report["mismatches"] == []
