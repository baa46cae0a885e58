"""What a server needs: ``Model.warmup`` leaves nothing to compile for the first request, and concurrent
``predict`` calls are safe (docs/serving.md promises both)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from npmobile.applications import MobileNetV2, MobileNetV3Small
from npmobile.errors import InputShapeError

# Runs in a fresh process, so that no kernel is loaded before warmup: counts the compiled signatures of
# every kernel (Numba dispatchers and the C functions of kernels/backend.py) and Numba's compile events
# around a warmup, then around the first predict after it.
CHILD = r"""
import json, sys
import numpy as np
from numba.core import event
from numba.core.registry import CPUDispatcher

from npmobile.applications import MobileNetV2


def loaded_signatures():
    dispatchers = {id(v): v for name, module in list(sys.modules.items()) if name.startswith("npmobile.kernels")
                   for v in vars(module).values() if isinstance(v, CPUDispatcher)}
    from npmobile.kernels import backend
    return sum(len(d.overloads) for d in dispatchers.values()) + len(backend.CFUNCS)


model = MobileNetV2(alpha=0.35, input_shape=(None, None, 3), weights=None)
x = np.random.default_rng(7).uniform(-1, 1, (2, 64, 80, 3)).astype(np.float32)
before = loaded_signatures()
with event.install_recorder("numba:compile") as warming:
    shapes = model.warmup(sizes=[(64, 80)], batch_sizes=(1, 2), threads=int(sys.argv[1]))
warmed = loaded_signatures()
with event.install_recorder("numba:compile") as serving:
    y = model.predict(x, threads=int(sys.argv[1]))
json.dump({"before": before, "warmed": warmed, "after": loaded_signatures(), "shapes": shapes,
           "compiled_while_warming": len(warming.buffer), "compiled_while_serving": len(serving.buffer),
           "y": y.tolist()}, sys.stdout)
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_after_warmup_predict_compiles_nothing_and_gives_the_same_bits(threads):
    child = subprocess.run([sys.executable, "-c", CHILD, str(threads)], capture_output=True, text=True,
                           timeout=600, check=True)
    report = json.loads(child.stdout)
    assert report["shapes"] == [[1, 64, 80, 3], [2, 64, 80, 3]]
    assert report["warmed"] > report["before"]  # warmup loaded (or compiled) the kernels...
    assert report["after"] == report["warmed"]  # ...and predict needed no other
    assert report["compiled_while_serving"] == 0
    # The same bits as a model here that was never warmed up.
    model = MobileNetV2(alpha=0.35, input_shape=(None, None, 3), weights=None)
    x = np.random.default_rng(7).uniform(-1, 1, (2, 64, 80, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(report["y"], np.float32), model.predict(x, threads=threads))


def test_warmup_defaults_to_the_models_own_input_size():
    model = MobileNetV3Small(alpha=0.75, input_shape=(48, 48, 3), weights=None)
    assert model.warmup() == [(1, 48, 48, 3)]
    assert model.warmup(batch_sizes=(1, 4)) == [(1, 48, 48, 3), (4, 48, 48, 3)]


def test_warmup_of_a_model_of_any_size_needs_sizes():
    model = MobileNetV2(alpha=0.35, input_shape=(None, None, 3), weights=None)
    with pytest.raises(InputShapeError, match=r"warmup needs sizes=") as error:
        model.warmup()
    assert "\n" not in str(error.value)
    with pytest.raises(InputShapeError, match="batch sizes of at least 1"):
        model.warmup(sizes=[(32, 32)], batch_sizes=(0,))


def test_concurrent_predicts_are_safe_and_each_gets_its_own_answer():
    """The guarantee docs/serving.md states: predict may be called from many threads at once (they run one
    at a time in a process), and each caller gets the answer for its own input."""
    model = MobileNetV2(alpha=0.35, input_shape=(64, 64, 3), weights=None)
    inputs = [np.random.default_rng(seed).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32) for seed in range(6)]
    expected = [model.predict(x, threads=1) for x in inputs]
    got: dict[int, list] = {k: [] for k in range(len(inputs))}

    def serve(k: int) -> None:
        for _ in range(5):
            got[k].append(model.predict(inputs[k], threads=1))

    workers = [threading.Thread(target=serve, args=(k,)) for k in range(len(inputs))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for k, answers in got.items():
        assert len(answers) == 5
        for answer in answers:
            np.testing.assert_array_equal(answer, expected[k])
