"""``npmobile.verify``: the user's own proof that npmobile answers like Keras (or PyTorch) on their model.

``verify(path, ...)`` loads the same file in Keras (tf_keras for files tf_keras / Keras 2 wrote, when installed;
Keras 3 otherwise), or, for a PyTorch state dict, in PyTorch (torchvision's module built with
npmobile.applications.torchvision_modules, or the user's own, and the file read by torch's own loader); runs both on
the images (or seeded random inputs in the model's range) and compares, layer by layer in graph order (PyTorch: by
module path, in the order the modules finish), with the parity tolerances (``PROBABILITY_ATOL``, ``FEATURE_RTOL``);
then the final output of the fast, fused path ``predict`` uses, on its own; and each engine's distance from
npmobile's float64 reference, to show whose rounding a difference is. It returns a ``VerifyReport``; ``npmobile
verify`` prints it. It raises ``UsageProblem`` for arguments that cannot be used as given and ``CouldNotRun`` (or
npmobile's own errors) when the comparison cannot be made.

    from npmobile.verify import verify
    report = verify("my_model.keras")
    report.ok, report.first_layer_beyond_tolerance, report.as_dict()
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from npmobile.io.torch import torch_format
from npmobile.isolation import DEFAULT_TIMEOUT
from npmobile.opening import model_input, preprocess_for
from npmobile.verify.report import (
    EXIT_BEYOND,
    EXIT_COULD_NOT_RUN,
    EXIT_OK,
    EXIT_USAGE,
    FEATURE_RTOL,
    PROBABILITY_ATOL,
    CouldNotRun,
    Difference,
    FinalOutput,
    LayerRow,
    UsageProblem,
    VerifyReport,
    is_probability,
    top5_agreement,
)
from npmobile.verify.sides import KerasSide, NpmobileReference, Side, open_keras
from npmobile.verify.torch_side import import_torch, open_torch

__all__ = ["verify", "VerifyReport", "LayerRow", "Difference", "FinalOutput", "Side", "CouldNotRun",
           "UsageProblem", "PROBABILITY_ATOL", "FEATURE_RTOL", "EXIT_OK", "EXIT_BEYOND", "EXIT_USAGE",
           "EXIT_COULD_NOT_RUN", "is_probability", "top5_agreement"]


def verify(model: str | os.PathLike, images: Sequence[str | os.PathLike] = (), *,
           custom_objects: Mapping[str, str] | None = None, custom_objects_module: str | os.PathLike | None = None,
           torch_model: str | None = None, samples: int = 2, seed: int = 0, size: int = 224,
           without_keras: bool = False, load_timeout: float | None = DEFAULT_TIMEOUT,
           trusted: bool = False) -> VerifyReport:
    """Compare npmobile with Keras (a PyTorch state dict: with PyTorch) on ``model``, layer by layer.

    ``images``: files to run (prepared the model's way); none: ``samples`` seeded (``seed``) random inputs in the
    model's range, ``size`` px for a model that takes any size. ``custom_objects``: the model's own activation
    names -> npmobile's built-in (as ``npmobile.load_model``); ``custom_objects_module``: a Python file whose
    functions Keras runs instead of its built-ins (the user's code). ``torch_model``: ``"FILE.py:NAME"``, the
    module PyTorch runs for a state dict instead of torchvision's. ``without_keras``: compare the fast path with
    npmobile's own reference path only. ``load_timeout`` and ``trusted`` as ``npmobile.load_model``."""
    import npmobile
    from npmobile.activations import check_custom_objects

    path = str(model)
    mapping = check_custom_objects(dict(custom_objects or {}))
    module_path = None if custom_objects_module is None else str(custom_objects_module)
    if module_path is not None and not Path(module_path).is_file():
        raise UsageProblem(f"{module_path}: no such file")
    if not Path(path).is_file():
        raise UsageProblem(f"{path}: no such file")
    pytorch = torch_format(path) is not None
    _check_options_fit(path, pytorch, mapping, module_path, without_keras, torch_model)
    torch = import_torch() if pytorch else None  # before the load: without torch there is nothing to check
    loaded = npmobile.load_model(path, custom_objects=mapping, timeout=load_timeout, trusted=trusted)
    if len(loaded.graph.inputs) != 1:
        raise CouldNotRun(f"{path}: the model takes {len(loaded.graph.inputs)} inputs; verify runs models "
                          "with one input")
    x, inputs_text = _inputs(loaded, [str(image) for image in images], samples, seed, size)

    side: Side
    if pytorch:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NCHW: PyTorch's layout, and so the report's shapes
        side = open_torch(torch, path, loaded, torch_model, x[:1])
    else:
        keras = None if without_keras else open_keras(path, loaded.graph.keras_version, mapping, module_path)
        side = keras if isinstance(keras, KerasSide) else NpmobileReference(
            loaded, "--without-keras" if without_keras else keras)
    layers = _compare_layers(loaded, side, x)
    fast = np.asarray(loaded.predict(x, data_format=side.data_format))
    reference_final = np.asarray(side.predict(x))
    final = FinalOutput(top5_agree=top5_agreement(fast, reference_final,
                                                  logits=bool(getattr(loaded, "outputs_logits", False))))
    final.versus.add(fast, reference_final)
    exact = np.asarray(loaded.predict(x, reference=True, dtype=np.float64, data_format=side.data_format))
    to_exact = {"npmobile": Difference(), side.label: Difference()}
    to_exact["npmobile"].add(fast, exact)
    to_exact[side.label].add(reference_final, exact)
    if pytorch:
        writer = "PyTorch, a torchvision-named state dict"
    else:
        writer = "Keras 2 / tf_keras" if loaded.graph.keras_version < 3 else "Keras 3"
    return VerifyReport(model=path, model_name=loaded.name, writer=writer, inputs=inputs_text,
                        reference=side.label, reference_detail=side.detail, notes=side.notes, layers=layers,
                        skipped_layers=side.skipped, final=final,
                        float64={name: d.max_abs for name, d in to_exact.items()})


def _check_options_fit(path: str, pytorch: bool, mapping: Mapping[str, str], module_path: str | None,
                       without_keras: bool, torch_model: str | None) -> None:
    """Keras's options mean nothing to a state dict, --torch-model nothing to a Keras file: say so, not ignore."""
    if pytorch:
        keras_only = [option for option, given in (("--custom-object", mapping),
                                                    ("--custom-objects-module", module_path),
                                                    ("--without-keras", without_keras)) if given]
        if keras_only:
            raise UsageProblem(f"{path} is a PyTorch state dict: {keras_only[0]} is for Keras files")
    elif torch_model is not None:
        raise UsageProblem(f"{path} is not a PyTorch state dict: --torch-model is for .pth / .safetensors files")


def _inputs(model, images: list[str], samples: int, seed: int, size: int) -> tuple[np.ndarray, str]:
    """NHWC inputs as the model wants them: the images prepared its way, or seeded random ones in its range."""
    preprocessing = preprocess_for(model)
    if images:
        for path in images:
            if not Path(path).is_file():
                raise UsageProblem(f"{path}: no such file")
        x = np.concatenate([model_input(model, path, size) for path in images])
        prepared = {"none": "pixels 0..255", "tf": "preprocessed to -1..1",
                    "torchvision": "prepared the torchvision way (resize, center crop, ImageNet mean/std)"}
        return x, f"{len(images)} image(s), {prepared[preprocessing]}"
    shape = tuple(d or size for d in model.input_shape[1:])
    rng = np.random.default_rng(seed)
    if preprocessing == "torchvision":
        from npmobile.image import normalize_imagenet

        x = normalize_imagenet(rng.uniform(0.0, 1.0, (samples, *shape)).astype(np.float32))
        nchw = (shape[2], shape[0], shape[1])
        return x, (f"{samples} random input(s) {nchw} (pixels 0..1 normalized with the ImageNet mean and std, "
                   f"seed {seed})")
    low, high = (0.0, 255.0) if preprocessing == "none" else (-1.0, 1.0)
    x = rng.uniform(low, high, (samples, *shape)).astype(np.float32)
    return x, f"{samples} random input(s) {shape} in {low:g}..{high:g} (seed {seed})"



def _compare_layers(model, side: Side, x: np.ndarray) -> list[LayerRow]:
    """Every layer both engines know by name, one input at a time (all of a model's feature maps at once, for a
    whole batch, would not fit in memory at 224 px)."""
    rows: list[LayerRow] = []
    names = []
    for name, class_name in side.layers():
        try:
            model.graph.resolve(name)
        except KeyError:
            side.skipped.append(f"{name} ({class_name}: not a layer npmobile keeps by that name)")
            continue
        names.append(name)
        rows.append(LayerRow(name, class_name, ()))
    for n in range(x.shape[0]):
        one = x[n : n + 1]
        theirs = side.predict_layers(one, names)
        ours = model.predict(one, outputs=names, data_format=side.data_format)
        exact = model.predict(one, outputs=names, reference=True, dtype=np.float64, data_format=side.data_format)
        for row in rows:
            row.shape = tuple(theirs[row.name].shape[1:])
            row.versus.add(ours[row.name], theirs[row.name])
            row.npmobile_f64.add(ours[row.name], exact[row.name])
            row.reference_f64.add(theirs[row.name], exact[row.name])
        del theirs, ours, exact
    return rows

