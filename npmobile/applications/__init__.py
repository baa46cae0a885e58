"""keras.applications-style constructors for the MobileNet family.

>>> from npmobile.applications import MobileNetV2
>>> model = MobileNetV2(weights="imagenet")      # doctest: +SKIP
"""

from npmobile.applications.mobilenet import MobileNet
from npmobile.applications.mobilenet_v2 import MobileNetV2
from npmobile.applications.mobilenet_v3 import MobileNetV3Large, MobileNetV3Small

__all__ = ["MobileNet", "MobileNetV2", "MobileNetV3Large", "MobileNetV3Small"]
