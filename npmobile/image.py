"""Images in, model input out: decode with Pillow, orient, make RGB, resize as Keras does.

``load_img`` returns what ``keras.utils.img_to_array(keras.utils.load_img(path, target_size=...))``
returns for ordinary photos (H x W x 3 float32, 0..255, the same Pillow resampling filters), and
goes further where Keras silently gets images wrong:
- the EXIF orientation is applied (a phone photo taken upright is upright; Keras ignores it);
- 16-bit greyscale is scaled to 0..255 (Pillow's plain conversion, which Keras uses, clips it to white);
- an animated GIF/WebP/PNG gives its first frame.
Where Keras is merely a convention we keep it, so results match Keras on the same file: an image
with alpha (RGBA, LA, a palette with transparency) is converted like ``Image.convert("RGB")`` —
the alpha channel is dropped, not composited on a background, so a transparent pixel shows
whatever colour it stores. Any file that cannot be decoded raises ImageError with one line naming
it. Pillow's guard against decompression bombs stays on (and refuses, rather than warns, from
``PIL.Image.MAX_IMAGE_PIXELS`` up).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from npmobile.errors import ImageError, unreadable

# keras.utils.load_img's names for Pillow's resampling filters.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}
CENTER_CROP_FRACTION = 0.875  # the "central crop" of the slim/TF-Slim evaluation


def load_img(
    path: str | os.PathLike | BinaryIO,
    target_size: tuple[int, int] | None = None,
    interpolation: str = "nearest",
    crop: str | None = None,
) -> np.ndarray:
    """An image file (a path, or a binary file object as ``io.BytesIO``) as an H x W x 3 float32 RGB
    array with values 0..255.

    ``target_size``: (height, width) to resize to, with ``interpolation`` (Keras's default is
    nearest). ``crop="center"`` keeps the central 87.5% of the height and width before resizing,
    exactly as ``tf.image.central_crop(image, 0.875)`` in the TF-Slim evaluation the published
    MobileNet accuracies were measured with.
    """
    if interpolation not in INTERPOLATIONS:
        raise ImageError(f"unknown interpolation {interpolation!r} (choose from {', '.join(INTERPOLATIONS)})")
    if crop not in (None, "center"):
        raise ImageError(f"unknown crop {crop!r} (choose 'center' or none)")
    image = _decode(path if hasattr(path, "read") else Path(path))
    if crop == "center":
        image = center_crop(image, CENTER_CROP_FRACTION)
    if target_size is not None:
        height, width = (int(v) for v in target_size)
        if image.size != (width, height):
            image = image.resize((width, height), INTERPOLATIONS[interpolation])
    return np.asarray(image, dtype=np.float32)


# torchvision's ImageNet statistics (torchvision.transforms.Normalize in every ImageNet recipe).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_torchvision(path: str | os.PathLike | BinaryIO, crop_size: int = 224, resize_size: int = 256) -> np.ndarray:
    """An image prepared as torchvision's ImageNet models want it, as an H x W x 3 float32 array (NHWC
    once batched; ``predict(x, data_format="channels_first")`` after ``x.transpose(0, 3, 1, 2)`` for NCHW).

    The steps of ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor()``, ``Normalize(mean, std)``: the
    shorter side resized to ``resize_size`` with Pillow's bilinear filter (antialiased, as torchvision
    resizes PIL images), the longer one to ``int(resize_size * long / short)``; the central
    ``crop_size`` square, its corner at ``round((size - crop_size) / 2)``; pixels / 255, then minus
    the mean and over the std per channel, in float32. Decoding is npmobile's (EXIF orientation
    applied, 16-bit greyscale scaled, first frame), where torchvision's tutorials open files with
    ``Image.open(path).convert("RGB")``: the same pixels for ordinary photos.
    """
    image = _decode(path if hasattr(path, "read") else Path(path))
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize_size, int(resize_size * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    image = _center_square(image, crop_size)
    return normalize_imagenet(np.asarray(image, dtype=np.float32) / np.float32(255.0))


def normalize_imagenet(x: np.ndarray) -> np.ndarray:
    """torchvision's ``Normalize(IMAGENET_MEAN, IMAGENET_STD)`` on NHWC (or HWC) pixels in 0..1, in float32."""
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def _center_square(image: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop on an image at least ``size`` on each side (Resize makes sure of it)."""
    width, height = image.size
    if width < size or height < size:
        raise ImageError(f"image of {width}x{height} is smaller than the {size}x{size} crop")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def center_crop(image: Image.Image, fraction: float) -> Image.Image:
    """The central ``fraction`` of the image's height and width, with tf.image.central_crop's
    rounding: the margin is ``int((size - size * fraction) / 2)`` on each side."""
    width, height = image.size
    left, top = int((width - width * fraction) / 2), int((height - height * fraction) / 2)
    return image.crop((left, top, width - left, height - top))


def _decode(source: Path | BinaryIO) -> Image.Image:
    name = source if isinstance(source, Path) else getattr(source, "name", "<image stream>")
    try:
        with Image.open(source) as image:  # raises DecompressionBombError past twice Pillow's limit
            _refuse_bomb(image)
            image.seek(0)  # animated GIF / WebP / PNG: the first frame
            image.load()
            return _to_rgb(_upright(image))
    except (FileNotFoundError, IsADirectoryError) as error:
        raise unreadable(ImageError, name, error, "an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: refused: too many pixels, over Pillow's limit of {Image.MAX_IMAGE_PIXELS} "
                         "(a decompression bomb?); raise PIL.Image.MAX_IMAGE_PIXELS if you trust it") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError/ValueError/EOFError.
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageError(f"{name}: cannot be decoded ({reason})") from None


def _refuse_bomb(image: Image.Image) -> None:
    """Refuse, before decoding, images past Pillow's limit, where Pillow itself only warns (between
    the limit and twice it). Checked here rather than by turning the warning into an error with
    warnings.catch_warnings, which changes process-wide state and is not thread-safe."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise Image.DecompressionBombError(f"{image.width * image.height} pixels")


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says."""
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # malformed EXIF can fail in many ways; Keras ignores EXIF anyway
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB.

    Integer greyscale deeper than 8 bits (I;16*, and I holding values above 255, as 16-bit PNG, PGM
    and TIFF files open) is scaled from 0..65535 to 0..255 rather than clipped; values past 16 bits
    clip. Floating point greyscale (F) is taken as 0..1 when it stays within that, else as 0..255.
    Everything else is Pillow's own conversion, as Keras does it.
    """
    if image.mode.startswith("I"):
        data = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or data.max(initial=0) > 255 else 255.0
        return _grey_to_rgb(data * (255.0 / top))
    if image.mode == "F":
        data = np.asarray(image, dtype=np.float64)
        finite = data[np.isfinite(data)]
        return _grey_to_rgb(np.nan_to_num(data) * (255.0 if finite.size and finite.max() <= 1.0 else 1.0))
    return image if image.mode == "RGB" else image.convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8)).convert("RGB")
