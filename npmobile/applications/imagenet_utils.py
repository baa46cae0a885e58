"""ImageNet labels and decode_predictions, as keras.applications.imagenet_utils has them.

The 1000 class names ship inside the package (npmobile/data/imagenet_class_index.json, the same
file Keras downloads), so decoding never needs the network.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np

from npmobile.errors import InputShapeError


@functools.cache
def class_index() -> dict[int, tuple[str, str]]:
    """Class number -> (WordNet id, label), e.g. 281 -> ("n02123045", "tabby")."""
    text = resources.files("npmobile").joinpath("data/imagenet_class_index.json").read_text(encoding="utf-8")
    return {int(k): (v[0], v[1]) for k, v in json.loads(text).items()}


def decode_predictions(preds, top: int = 5) -> list[list[tuple[str, str, float]]]:
    """For each row of ``preds`` (N, 1000), the ``top`` most likely classes as (wnid, label, score),
    most likely first: Keras's format exactly (the score is the array's own scalar, as in Keras).

    A wrong shape raises InputShapeError, which is also a ValueError, as Keras raises."""
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != 1000:
        raise InputShapeError(
            "decode_predictions expects a batch of ImageNet predictions, shape (samples, 1000); "
            f"got {preds.shape}"
        )
    index = class_index()
    results = []
    for row in preds:
        best = row.argsort()[-top:][::-1]  # Keras's own ordering (ties resolved the same way)
        results.append([(*index[int(i)], row[i]) for i in best])
    return results
