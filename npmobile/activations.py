"""Every activation npmobile knows, in one table: its names, what it computes (and what it meant in files
Keras 2 / tf_keras wrote, where that differs), and whether a convolution's epilogue applies it.

The table answers what used to be answered in several places:
- what ``Activation('hard_sigmoid')`` in a file means (``activation_function``, by the writer's Keras version);
- which names a user may map a custom function to (``custom_objects={"hard_swish": "hard_swish"}``). A mapped
  name always means npmobile's built-in, which is Keras 3's of that name (``npmobile verify`` gives Keras
  ``keras.activations.<name>``), whoever wrote the file: a tutorial's ``h_sigmoid`` mapped to ``hard_sigmoid``
  is relu6(x + 3) / 6 in a tf_keras file too, not Keras 2's 0.2x + 0.5.

kernels/activations.py keeps the kernels' name -> ACT_* code dict (this table stays free of Numba: the readers'
child process imports it); the tests check the two agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from npmobile.errors import CustomObjectError, UnsupportedLayerError
from npmobile.kernels import reference as K
from npmobile.spec import ModelSpec

ActivationFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Activation:
    name: str
    reference: ActivationFn | None  # None: linear
    aliases: tuple[str, ...] = ()
    fusable: bool = False  # an Activation layer of it moves into the convolution before it (a kernel epilogue)
    keras2: ActivationFn | None = None  # its meaning in files Keras 2 / tf_keras wrote, when that differs
    user_name: bool = True  # a user may map a custom function to it (npmobile's own names are not offered)


ACTIVATIONS: tuple[Activation, ...] = (
    Activation("linear", None),
    Activation("relu", K.relu, fusable=True),
    Activation("relu6", K.relu6, fusable=True),
    Activation("sigmoid", K.sigmoid, fusable=True),
    # Keras 2 meant clip(0.2x + 0.5, 0, 1); Keras 3 means relu6(x + 3) / 6. A layer of it is not moved into the
    # conv (its meaning depends on the file's writer); a conv's own activation="hard_sigmoid" has an epilogue.
    Activation("hard_sigmoid", K.hard_sigmoid, keras2=K.hard_sigmoid_keras2),
    Activation("hard_swish", K.hard_swish, aliases=("hard_silu",), fusable=True),
    Activation("swish", K.swish, aliases=("silu",), fusable=True),
    Activation("softmax", K.softmax),
    Activation("tanh", np.tanh),
    # npmobile's own names. What the fuse_hard_swish_ops pass makes of tf_keras's hard-swish built from layers:
    Activation("hard_swish_from_ops", K.hard_swish_from_ops, user_name=False),
    # A custom function mapped to hard_sigmoid in a file Keras 2 wrote (the plain name would mean Keras 2's):
    Activation("hard_sigmoid_keras3", K.hard_sigmoid, user_name=False),
)

_BY_NAME: dict[str, Activation] = {alias: a for a in ACTIVATIONS for alias in (a.name, *a.aliases)}

# Names a conv epilogue can apply, as they appear in configs (aliases included).
FUSABLE_ACTIVATIONS: tuple[str, ...] = tuple(alias for a in ACTIVATIONS if a.fusable for alias in (a.name, *a.aliases))


def user_names() -> list[str]:
    """The names a custom function may be mapped to, aliases included."""
    return [alias for a in ACTIVATIONS if a.user_name for alias in (a.name, *a.aliases)]


def lookup(name) -> Activation | None:
    return _BY_NAME.get(name) if isinstance(name, str) else None


def custom_function_name(value) -> str | None:
    """The name of the user's own function when an activation config is one (Keras 3 and tf_keras both write
    ``{"class_name": "function", "config": "hard_swish", ...}``), else None."""
    if isinstance(value, dict) and (value.get("class_name") == "function" or isinstance(value.get("config"), str)):
        return str(value.get("config"))
    return None


def _how_to_map(name: str) -> str:
    builtin = name if name in user_names() else "<built-in>"
    return (f"name the built-in it computes, custom_objects={{{name!r}: {builtin!r}}} "
            f"(CLI: --custom-object {name}={builtin}; built-ins: {', '.join(user_names())})")


def activation_function(name, keras_version: int = 3) -> ActivationFn | None:
    """The reference kernel for an activation as a config writes it (None for linear).

    ``hard_sigmoid`` depends on who wrote the file: Keras 2 meant clip(0.2x + 0.5, 0, 1),
    Keras 3 means relu6(x + 3) / 6.
    """
    custom = custom_function_name(name)
    if custom is not None:
        raise UnsupportedLayerError(f"activation {custom!r} is a custom function; npmobile never runs code from a "
                                    f"file: {_how_to_map(custom)}")
    if isinstance(name, dict):  # {"class_name": "relu", "config": {...}}
        config = name.get("config")
        name = (config.get("name") if isinstance(config, dict) else None) or name.get("class_name") or str(name)
    if name is None:
        return None
    if not isinstance(name, str):
        raise UnsupportedLayerError(f"activation {str(name)[:40]!r} is not an activation name")
    found = _BY_NAME.get(name)
    if found is None:
        raise UnsupportedLayerError(f"activation {name!r} is not supported (supported: "
                                    f"{', '.join(_BY_NAME)}); if it is your own function, {_how_to_map(name)}")
    if keras_version < 3 and found.keras2 is not None:
        return found.keras2
    return found.reference


def check_custom_objects(custom_objects: Mapping | None) -> dict[str, str]:
    """Validate ``custom_objects``: each key a custom function's name in the file, each value the name of the
    built-in it computes. A Python function is refused: npmobile runs its own kernels, never user code."""
    if not custom_objects:
        return {}
    if not isinstance(custom_objects, Mapping):
        raise CustomObjectError(f"custom_objects must be a dict of names, e.g. {{'hard_swish': 'hard_swish'}}; "
                                f"got {type(custom_objects).__name__}")
    mapping: dict[str, str] = {}
    for key, value in custom_objects.items():
        if not isinstance(key, str):
            raise CustomObjectError(f"custom_objects: key {key!r} must be the function's name as the file writes it")
        if callable(value):
            builtin = getattr(value, "__name__", "")
            hint = builtin if builtin in user_names() else "<built-in>"
            raise CustomObjectError(f"custom_objects[{key!r}] is a Python function; npmobile never runs your code, "
                                    f"it runs the built-in you name: pass custom_objects={{{key!r}: {hint!r}}} "
                                    f"(built-ins: {', '.join(user_names())})")
        if not isinstance(value, str) or value not in user_names():
            raise CustomObjectError(f"custom_objects[{key!r}] = {value!r} is not a built-in activation npmobile knows "
                                    f"(built-ins: {', '.join(user_names())})")
        mapping[key] = value
    return mapping


def map_activation(value, mapping: Mapping[str, str], keras_version: int = 3):
    """An activation config with the user's custom function replaced by the built-in they named (a string), or
    unchanged. A plain string is mapped too: older writers, and a function named like a built-in (``relu6``),
    are written by name."""
    custom = custom_function_name(value)
    name = custom if custom is not None else value if isinstance(value, str) else None
    if name not in mapping:
        return value
    builtin = mapping[name]
    if keras_version < 3 and _BY_NAME[builtin].keras2 is not None:
        return f"{_BY_NAME[builtin].name}_keras3"  # the name in a Keras 2 file would mean Keras 2's function
    return builtin


def map_custom_functions(spec: ModelSpec, mapping: Mapping[str, str]) -> None:
    """Replace, in every layer's ``activation`` (nested models included), each custom function the user has
    named a built-in for by that built-in's name. Only names change: the function itself is not in the file
    and nothing is run; unmapped custom functions stay, for the graph to refuse with the way to map them."""
    for layer in spec.layers:
        if layer.submodel is not None:
            map_custom_functions(layer.submodel, mapping)
        elif "activation" in layer.config:
            layer.config["activation"] = map_activation(layer.config["activation"], mapping, spec.keras_version)
