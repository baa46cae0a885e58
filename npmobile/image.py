"""Images in, model input out: decode with Pillow, orient, make RGB, resize as Keras does.

``load_img`` returns what ``keras.utils.img_to_array(keras.utils.load_img(path, target_size=...))``
returns for ordinary photos (H x W x 3 float32, 0..255, the same Pillow resampling filters), and
goes further where Keras silently gets images wrong:
- the EXIF orientation is applied (a phone photo taken upright is upright);
- 16-bit images are scaled to 0..255 (Pillow's plain conversion would clip them to white);
- a palette image with transparency, or an image with alpha, is converted the way Keras converts
  it (alpha dropped, like ``Image.convert("RGB")``), so results match Keras on the same file;
- an animated GIF/WebP gives its first frame.
Any file that cannot be decoded raises ImageError with one line naming it. Pillow's guard against
decompression bombs stays on.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from npmobile.errors import ImageError

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
    path: str | os.PathLike,
    target_size: tuple[int, int] | None = None,
    interpolation: str = "nearest",
    crop: str | None = None,
) -> np.ndarray:
    """An image file as an H x W x 3 float32 RGB array with values 0..255.

    ``target_size``: (height, width) to resize to, with ``interpolation`` (Keras's default is
    nearest). ``crop="center"`` keeps the central 87.5% of the height and width before resizing, as
    the published MobileNet accuracies were measured.
    """
    if interpolation not in INTERPOLATIONS:
        raise ImageError(f"unknown interpolation {interpolation!r} (choose from {', '.join(INTERPOLATIONS)})")
    if crop not in (None, "center"):
        raise ImageError(f"unknown crop {crop!r} (choose 'center' or none)")
    image = _decode(Path(path))
    if crop == "center":
        image = center_crop(image, CENTER_CROP_FRACTION)
    if target_size is not None:
        height, width = (int(v) for v in target_size)
        if image.size != (width, height):
            image = image.resize((width, height), INTERPOLATIONS[interpolation])
    return np.asarray(image, dtype=np.float32)


def center_crop(image: Image.Image, fraction: float) -> Image.Image:
    """The central ``fraction`` of the image's height and width."""
    width, height = image.size
    crop_w, crop_h = max(1, round(width * fraction)), max(1, round(height * fraction))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def _decode(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns on images just under its bomb limit; we refuse those too, as errors.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)  # animated GIF / WebP: the first frame
                image.load()
                image = ImageOps.exif_transpose(image) or image
                return _to_rgb(image)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: refused: too many pixels (a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError/ValueError.
        raise ImageError(f"{path}: cannot be decoded ({error})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer greyscale: scale the full range to 0..255 instead of clipping.
        data = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or data.max() > 255 else 255.0
        grey = np.clip(np.round(data * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        data = np.asarray(image, dtype=np.float64)
        scale = 255.0 if data.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(data * scale), 0, 255).astype(np.uint8)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
