"""keras.applications-style constructors for the MobileNet family.

>>> from npmobile.applications import MobileNetV2
>>> model = MobileNetV2(weights="imagenet")      # doctest: +SKIP
"""

from npmobile.applications import torchvision  # torchvision's MobileNetV2/V3 for PyTorch state dicts
from npmobile.applications.mobilenet import MobileNet
from npmobile.applications.mobilenet_v2 import MobileNetV2
from npmobile.applications.mobilenet_v3 import MobileNetV3Large, MobileNetV3Small
from npmobile.weights import registry

# The families by the names used everywhere else (the weights registry, the CLI's --model).
FAMILIES = dict(zip(registry.FAMILIES, (MobileNet, MobileNetV2, MobileNetV3Small, MobileNetV3Large), strict=True))

__all__ = ["FAMILIES", "MobileNet", "MobileNetV2", "MobileNetV3Large", "MobileNetV3Small", "torchvision"]
