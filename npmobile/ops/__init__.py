"""What each kind of layer means: one record per layer type.

A ``LayerType`` holds everything npmobile knows about one layer class, in one place:

- ``weights(config, in_channels)``: the weights it needs, name -> shape, in the order Keras creates
  them (the order of ``layer.weights`` and of ``vars/0, vars/1`` in a .weights.h5 file);
- ``validate(node, keras_version)``: config checks beyond the common ones (npmobile.layers.validate_config);
- ``output_shape(node, input_shapes)``: its output's shape (NHWC; None where unknown);
- ``reference(node, inputs, keras_version)``: what it computes, with the plain NumPy kernels of
  kernels/reference.py -- the definition the fast path is checked against;
- ``prepare(node, in_shapes, out_shape, keras_version)``: the fast path for the plan, a Binder
  ``(args, out) -> call``: given the step's input arrays and its preallocated output buffer, it checks
  them once and returns the call with no arguments that computes the step (kernels/entry.py), which
  the plan then makes at every prediction; or None where the reference must run;
- ``macs(node, in_shape, out_shape)``: multiply-accumulates per image, for ``summary --costs``;
- ``kind(node)``: its bucket in ``profile`` (pointwise, depthwise, conv, expand+dw, dense, se, other);
- what the rest of the engine asks of a layer type, each in one field (record.py says what each means): whether
  it is the model's input (``graph_input``), its spatial ``window``, whether it is a ``global_pool``, ``flattens``,
  ``multiplies``, ``pads``, applies its config's ``activation``, is part of a model's own ``preprocessing``,
  moves values only (``moves_values_only``: padding, views, the identity), and which kernels its fast path
  compiles on a model's first run (``first_run_kernels``).

Records are built with keyword arguments: a record reads as the list of what it says.

A layer class without a record is refused when a file is loaded (npmobile.graph.check_supported),
never given a default. Records are framework-neutral: a PyTorch model built on the same operations
states its padding and activations explicitly in the node's config.

Records import the fast kernels (Numba) only inside ``prepare``: the readers and the architectures
use the records, and they run without Numba (a file is read in a child process that never loads it).

Adding a layer type: write its record in the module of its kind (or a new one imported below), its
reference function in kernels/reference.py, a kernel if it is on a hot path, and its tests.
"""

from __future__ import annotations

# The records, by kind. Imported last: each module registers its records on import.
from npmobile.ops import (  # noqa: E402, F401
    activation,
    arithmetic,
    convolution,
    core,
    expand_depthwise,
    input_layer,
    merge,
    normalization,
    pooling,
    preprocessing,
    reshaping,
    squeeze_excite,
)
from npmobile.ops.input_layer import INPUT_LAYER  # noqa: F401
from npmobile.ops.record import (  # noqa: F401 (the records' public names)
    LAYER_TYPES,
    Binder,
    LayerType,
    Shape,
    canonical_class,
    file_classes,
    is_identity,
    is_input,
    layer_type,
    register,
)
