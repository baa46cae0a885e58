"""Graph passes: small functions graph -> graph that make the graph cheaper to run, never different.

Each pass rewrites nodes that Keras wrote as separate layers into fewer nodes (BatchNorm folded into
the convolution before it, the activation and the residual add moved into the convolution's
epilogue, ZeroPadding2D moved into the convolution's padding, a Rescaling -- or constant arithmetic
that is exactly one -- into the way the convolution reads its input), and drops the layers that are
the identity at inference (Dropout, the random augmentations). A node that absorbs another appends
the absorbed layer's name to ``keras_names``: its output is now that layer's output, so asking for
it by name still works. Layers named in ``keep`` (outputs the user asked for) are never absorbed,
since their values would no longer exist.

``optimize`` runs them all in order on a copy of the graph.
"""

from npmobile.passes.fuse import (
    drop_dropout,
    drop_identities,
    fold_batchnorm,
    fold_rescaling,
    fuse_activation,
    fuse_hard_swish_ops,
    fuse_residual_add,
    fuse_squeeze_excite,
    fuse_zero_padding,
    optimize,
    scalar_ops_to_rescaling,
)

__all__ = [
    "drop_dropout",
    "drop_identities",
    "fold_batchnorm",
    "fold_rescaling",
    "fuse_activation",
    "fuse_hard_swish_ops",
    "fuse_residual_add",
    "fuse_squeeze_excite",
    "fuse_zero_padding",
    "optimize",
    "scalar_ops_to_rescaling",
]
