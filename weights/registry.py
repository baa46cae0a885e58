"""The official keras-applications MobileNet weight files: names, addresses, checksums. Data only.

Facts as keras.applications uses them (keras/src/applications/mobilenet*.py). Keras publishes md5
hashes for the MobileNetV3 files only; V1/V2 files are checked as complete HDF5 files instead (cache.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from npmobile.errors import WeightsError

BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"

V1_ALPHAS = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}
V1_SIZES = (128, 160, 192, 224)
V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
V2_SIZES = (96, 128, 160, 192, 224)
# model name -> (md5 with top, md5 without top)
V3_HASHES = {
    "large_224_0.75_float": ("765b44a33ad4005b3ac83185abf1d0eb", "40af19a13ebea4e2ee0c676887f69a2e"),
    "large_224_1.0_float": ("59e551e166be033d707958cf9e29a6a7", "07fb09a5933dd0c8eaafa16978110389"),
    "large_minimalistic_224_1.0_float": ("675e7b876c45c57e9e63e6d90a36599c", "ec5221f64a2f6d1ef965a614bdae7973"),
    "small_224_0.75_float": ("cb65d4e5be93758266aa0a7f2c6708b7", "ebdb5cc8e0b497cd13a7c275d475c819"),
    "small_224_1.0_float": ("8768d4c2e7dee89b9d02b2d03d65d862", "d3e8ec802a04aa4fc771ee12a9a9b836"),
    "small_minimalistic_224_1.0_float": ("99cd97fb2fcdad2bf028eb838de69e37", "cde8136e733e811080d9fcd8a252f7e4"),
}
FAMILIES = ("mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")


# torchvision's ImageNet weights (IMAGENET1K_V1, the files the torchvision tutorials load). torch hub checks a
# download against the hex in its file name: the first digits of the file's sha256.
TORCHVISION_URL = "https://download.pytorch.org/models/"
TORCHVISION_FILES = {
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
    "mobilenet_v3_small": "mobilenet_v3_small-047dcff4.pth",
    "mobilenet_v3_large": "mobilenet_v3_large-8738ca79.pth",
}


@dataclass(frozen=True)
class WeightsFileInfo:
    filename: str
    url: str  # relative to base_url (NPMOBILE_WEIGHTS_URL overrides the base)
    md5: str | None
    sha256_prefix: str | None = None  # torch hub's check: the file's sha256 starts with these hex digits
    base_url: str = BASE_URL


def official_file(family: str, alpha: float, rows: int, include_top: bool,
                  minimalistic: bool = False) -> WeightsFileInfo:
    """The official file for a variant, or WeightsError saying which variants Keras publishes.

    ``family``: "mobilenet", "mobilenet_v2", "mobilenet_v3_small" or "mobilenet_v3_large".
    ``rows``: the input size the weights were trained at. MobileNetV3 has 224 only and Keras loads
    it at any input size (with a warning), so for V3 ``rows`` does not pick the file.
    """
    alpha = float(alpha)
    if family == "mobilenet":
        _check_published("MobileNet", alpha, rows, sorted(V1_ALPHAS), V1_SIZES)
        name = f"mobilenet_{V1_ALPHAS[alpha]}_{rows}_tf{'' if include_top else '_no_top'}.h5"
        return WeightsFileInfo(name, "mobilenet/" + name, None)
    if family == "mobilenet_v2":
        _check_published("MobileNetV2", alpha, rows, V2_ALPHAS, V2_SIZES)
        name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}{'' if include_top else '_no_top'}.h5"
        return WeightsFileInfo(name, "mobilenet_v2/" + name, None)
    if family in ("mobilenet_v3_small", "mobilenet_v3_large"):
        model_type = family.rsplit("_", 1)[1]
        key = f"{model_type}{'_minimalistic' if minimalistic else ''}_224_{alpha}_float"
        if key not in V3_HASHES:
            raise WeightsError(f"Keras publishes MobileNetV3 weights for alpha 0.75 and 1.0 (minimalistic: 1.0 only); "
                               f"not alpha={alpha}, minimalistic={minimalistic}")
        name = f"weights_mobilenet_v3_{key}{'' if include_top else '_no_top_v2'}.h5"
        return WeightsFileInfo(name, "mobilenet_v3/" + name, V3_HASHES[key][0 if include_top else 1])
    raise WeightsError(f"no official weights for {family!r} (families: {', '.join(FAMILIES)})")


def _check_published(family: str, alpha: float, rows: int, alphas: Sequence[float], sizes: Sequence[int]) -> None:
    """WeightsError, saying what Keras publishes, unless it has ``family``'s weights for this alpha and size."""
    if alpha not in alphas or rows not in sizes:
        raise WeightsError(f"Keras publishes {family} weights for alpha in {alphas} and sizes {sizes}; "
                           f"not alpha={alpha}, size={rows}")


def torchvision_file(family: str) -> WeightsFileInfo:
    """torchvision's official ImageNet state dict for ``family`` (width 1.0, 1000 classes)."""
    name = TORCHVISION_FILES.get(family)
    if name is None:
        raise WeightsError(f"torchvision publishes ImageNet weights for {', '.join(TORCHVISION_FILES)}; not {family!r}")
    return WeightsFileInfo(name, name, None, sha256_prefix=name.rsplit("-", 1)[1].split(".")[0],
                           base_url=TORCHVISION_URL)
