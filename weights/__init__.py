"""Where the official weights come from and where they are cached (no weight files live here)."""

from npmobile.weights.cache import resolve
from npmobile.weights.registry import WeightsFileInfo, official_file, torchvision_file

__all__ = ["WeightsFileInfo", "official_file", "resolve", "torchvision_file"]
