"""The engines bench/run.py compares: how each loads its model file and answers, with its thread settings, and the
start-up child (``first_answer``). Apart from run.py so that a start-up child imports little beside the engine it
times: Python, NumPy and this file are the floor every engine's start-up shares.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np


def quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def load_engine(engine: str, files: dict, threads: int):
    """A callable x -> output for one engine and model file, using ``threads`` threads. "npmobile" reads its file
    in a child process, as ``load_model`` does by default; "npmobile_trusted" reads it here (``trusted=True``)."""
    if engine in ("npmobile", "npmobile_trusted"):
        import npmobile

        model = npmobile.load_model(files["keras"], trusted=engine == "npmobile_trusted")
        return lambda x: model.predict(x, threads=threads)
    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(files["onnx"], options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    if engine == "litert":
        return litert_runner(files["litert"], threads)
    if engine == "pytorch":
        import torch

        module = torch.jit.freeze(torch.jit.load(files["torchscript"]).eval())  # inlines weights, folds BN

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return run
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(files["keras"])
    if engine == "keras_predict":
        return lambda x: model.predict(x, verbose=0, batch_size=len(x))
    compiled = tf.function(lambda t: model(t, training=False), jit_compile=False, reduce_retracing=True)
    return lambda x: compiled(tf.constant(x)).numpy()


def litert_runner(path: str, threads: int):
    """LiteRT's interpreter with its default XNNPACK delegate; resized to the batch it is given."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    source = interpreter.get_input_details()[0]["index"]
    state = {"shape": None}

    def run(x: np.ndarray) -> np.ndarray:
        if state["shape"] != x.shape:
            interpreter.resize_tensor_input(source, x.shape)
            interpreter.allocate_tensors()
            state["shape"] = x.shape
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    return run


def model_input(key: str, batch: int) -> np.ndarray:
    x = np.random.default_rng(batch).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)
    return (x + 1) * np.float32(127.5) if key.startswith("v3") else x


def set_process_threads(engine: str, threads: int) -> None:
    """The thread settings TensorFlow and PyTorch take per process, before their first op (the other engines take
    them per session or call, in load_engine)."""
    if engine.startswith("keras"):
        quiet_tf()
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    if engine == "pytorch":
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)


def first_answer(engine: str, threads: str, files_path: str, key: str) -> None:
    """A start-up child: imports the engine, loads its file for model ``key``, answers one batch-1 input; prints
    when the harness was ready, when the answer came (time.monotonic) and its top 5."""
    ready = time.monotonic()
    set_process_threads(engine, int(threads))
    run = load_engine(engine, json.loads(Path(files_path).read_text())[key], int(threads))
    out = np.asarray(run(model_input(key, 1)))
    answered = time.monotonic()
    print(json.dumps({"ready": ready, "answered": answered, "top5": np.argsort(-out, 1)[0, :5].tolist()}))
