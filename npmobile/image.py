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
it.

Memory is bounded before anything is decoded: the pixel count is read from the file's header and
an image past the limit (``max_pixels``, default Pillow's ``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 M)
is refused in one line. Pillow holds a decoded image in at most 4 bytes a pixel; converting it
to RGB adds 4 bytes a pixel (1 for 16-bit and float greyscale, converted a band of rows at a time,
never as a whole float64 copy); the float32 array returned is 12 bytes a pixel of the *output*
size (resize with ``target_size`` first: a server should). ``draft=True`` lets the JPEG decoder
scale a large photo down by 2, 4 or 8 while decoding (Pillow's ``draft``): a fraction of the
memory and time, but not Keras's pixels, hence off by default.
"""

from __future__ import annotations

import math
import os
import threading
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
# Deep greyscale is converted this many pixels at a time: its float64 temporaries stay at 8 MB.
BAND_PIXELS = 1 << 20
EXIF_ORIENTATION = 0x0112


def load_img(
    path: str | os.PathLike | BinaryIO,
    target_size: tuple[int, int] | None = None,
    interpolation: str = "nearest",
    crop: str | None = None,
    max_pixels: int | None = None,
    draft: bool = False,
) -> np.ndarray:
    """An image file (a path, or a binary file object as ``io.BytesIO``) as an H x W x 3 float32 RGB
    array with values 0..255.

    ``target_size``: (height, width) to resize to, with ``interpolation`` (Keras's default is
    nearest). ``crop="center"`` keeps the central 87.5% of the height and width before resizing,
    exactly as ``tf.image.central_crop(image, 0.875)`` in the TF-Slim evaluation the published
    MobileNet accuracies were measured with.

    ``max_pixels``: refuse (ImageError, one line) an image of more pixels, from its header, before
    decoding it; default Pillow's process-wide ``PIL.Image.MAX_IMAGE_PIXELS``. A server taking
    uploads should set it to what it expects (a 12-megapixel phone photo: ``12_000_000``). A value
    above Pillow's limit raises that limit for the process (Pillow checks it in its decoders too,
    where no per-call limit reaches); it is never lowered.

    ``draft=True`` (with ``target_size``): decode a JPEG at 1/2, 1/4 or 1/8 of its size where that
    still leaves at least the target size (after the crop) on each side -- less memory and time for
    large photos, pixels close to but not those of Keras's ``load_img``, which decodes in full; other
    formats are decoded in full either way.
    """
    if interpolation not in INTERPOLATIONS:
        raise ImageError(f"unknown interpolation {interpolation!r} (choose from {', '.join(INTERPOLATIONS)})")
    if crop not in (None, "center"):
        raise ImageError(f"unknown crop {crop!r} (choose 'center' or none)")
    draft_size = _draft_size(target_size, crop) if draft and target_size is not None else None
    image = _decode(path if hasattr(path, "read") else Path(path), max_pixels, draft_size)
    if crop == "center":
        image = center_crop(image, CENTER_CROP_FRACTION)
    if target_size is not None:
        height, width = (int(v) for v in target_size)
        if image.size != (width, height):
            image = image.resize((width, height), INTERPOLATIONS[interpolation])
    return _rgb_array(image)


def _rgb_array(image: Image.Image) -> np.ndarray:
    """The decoded image (RGB, or L from deep greyscale, resized while it is one channel) as float32 RGB."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.float32)


def _draft_size(target_size: tuple[int, int], crop: str | None) -> tuple[int, int]:
    """What to ask Pillow's JPEG draft for: a square of the target's longer side (before the crop), so
    that whichever way the EXIF orientation turns the image, both sides stay at least the target's."""
    side = max(int(v) for v in target_size)
    if crop == "center":
        side = math.ceil(side / CENTER_CROP_FRACTION)
    return side, side


# torchvision's ImageNet statistics (torchvision.transforms.Normalize in every ImageNet recipe).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_torchvision(path: str | os.PathLike | BinaryIO, crop_size: int = 224, resize_size: int = 256,
                     max_pixels: int | None = None) -> np.ndarray:
    """An image prepared as torchvision's ImageNet models want it, as an H x W x 3 float32 array (NHWC
    once batched; ``predict(x, data_format="channels_first")`` after ``x.transpose(0, 3, 1, 2)`` for NCHW).

    The steps of ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor()``, ``Normalize(mean, std)``: the
    shorter side resized to ``resize_size`` with Pillow's bilinear filter (antialiased, as torchvision
    resizes PIL images), the longer one to ``int(resize_size * long / short)``; the central
    ``crop_size`` square, its corner at ``round((size - crop_size) / 2)``; pixels / 255, then minus
    the mean and over the std per channel, in float32. Decoding is npmobile's (EXIF orientation
    applied, 16-bit greyscale scaled, first frame), where torchvision's tutorials open files with
    ``Image.open(path).convert("RGB")``: the same pixels for ordinary photos. ``max_pixels`` as in
    ``load_img``.
    """
    image = _decode(path if hasattr(path, "read") else Path(path), max_pixels)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize_size, int(resize_size * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    image = _center_square(image, crop_size)
    return normalize_imagenet(_rgb_array(image) / np.float32(255.0))


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


def _decode(source: Path | BinaryIO, max_pixels: int | None = None,
            draft_size: tuple[int, int] | None = None) -> Image.Image:
    """The first frame, upright, as RGB (or L, for greyscale deeper than 8 bits): what ``load_img``
    resizes. The pixel count is checked on the header, before any pixel is decoded."""
    name = source if isinstance(source, Path) else getattr(source, "name", "<image stream>")
    limit = _pixel_limit(max_pixels)
    try:
        with Image.open(source) as image:  # raises DecompressionBombError past twice Pillow's limit
            _refuse_too_many(image, limit, name)
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.seek(0)  # animated GIF / WebP / PNG: the first frame
            image.load()
            return _to_rgb(_upright(image))
    except (FileNotFoundError, IsADirectoryError) as error:
        raise unreadable(ImageError, name, error, "an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: refused: too many pixels (over twice the limit of {limit:,})"
                         f"{_ALLOW_MORE}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError/ValueError/EOFError.
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageError(f"{name}: cannot be decoded ({reason})") from None


_ALLOW_MORE = (" (a decompression bomb?); if you trust the file, allow more: load_img(..., max_pixels=N), "
               "or --max-pixels N on the command line")
_LIMIT_LOCK = threading.Lock()


def _pixel_limit(max_pixels: int | None) -> int | None:
    """The limit of this call: ``max_pixels``, else Pillow's. A limit above Pillow's raises Pillow's
    (its decoders check it too, and would refuse what the caller allows); under a lock, so that two
    threads raising it at once leave the larger."""
    if max_pixels is None:
        return Image.MAX_IMAGE_PIXELS
    max_pixels = int(max_pixels)
    if max_pixels < 1:
        raise ImageError(f"max_pixels must be at least 1; got {max_pixels}")
    with _LIMIT_LOCK:
        if Image.MAX_IMAGE_PIXELS and Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
    return max_pixels


def _refuse_too_many(image: Image.Image, limit: int | None, name: object) -> None:
    """Refuse, from the header's size and before decoding, an image past ``limit`` pixels, where
    Pillow itself only warns (between its limit and twice it). Checked here rather than by turning
    the warning into an error with warnings.catch_warnings, which changes process-wide state and is
    not thread-safe."""
    pixels = image.width * image.height
    if limit and pixels > limit:
        raise ImageError(f"{name}: refused: too many pixels ({image.width}x{image.height} = {pixels:,}, over the "
                         f"limit of {limit:,}){_ALLOW_MORE}")


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (itself when upright: exif_transpose would copy it)."""
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return image
        return ImageOps.exif_transpose(image) or image
    except Exception:  # malformed EXIF can fail in many ways; Keras ignores EXIF anyway
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB, or L for greyscale deeper than 8 bits (resized while it is one
    channel: the same pixels as resizing its RGB copy, a third of the memory).

    Integer greyscale deeper than 8 bits (I;16*, and I holding values above 255, as 16-bit PNG, PGM
    and TIFF files open) is scaled from 0..65535 to 0..255 rather than clipped; values past 16 bits
    clip. Floating point greyscale (F) is taken as 0..1 when it stays within that, else as 0..255.
    Everything else is Pillow's own conversion, as Keras does it.
    """
    if image.mode.startswith("I"):
        deep = image.mode.startswith("I;16") or image.getextrema()[1] > 255
        return _grey_to_l(image, 255.0 / 65535.0 if deep else 1.0)
    if image.mode == "F":
        top = max((_finite_max(band) for band in _bands(image)), default=0.0)
        return _grey_to_l(image, 255.0 if top <= 1.0 else 1.0, finite=True)
    return image if image.mode == "RGB" else image.convert("RGB")


def _bands(image: Image.Image):
    """The image's pixels as arrays of whole rows, BAND_PIXELS at a time (never a copy of it all)."""
    width, height = image.size
    rows = max(1, BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield np.asarray(image.crop((0, top, width, min(height, top + rows))))


def _finite_max(band: np.ndarray) -> float:
    finite = band[np.isfinite(band)]
    return float(finite.max()) if finite.size else 0.0


def _grey_to_l(image: Image.Image, scale: float, finite: bool = False) -> Image.Image:
    """Greyscale deeper than 8 bits as 8-bit L: value x scale, rounded and clipped to 0..255 (NaN as
    0 and infinities clipped, with ``finite``), a band of rows at a time in float64."""
    out = Image.new("L", image.size)
    top = 0
    for band in _bands(image):
        values = np.nan_to_num(band.astype(np.float64)) if finite else band.astype(np.float64)
        out.paste(Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L"), (0, top))
        top += band.shape[0]
    return out
