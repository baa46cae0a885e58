"""load_img gives keras.utils.load_img + img_to_array's pixels, and handles what Keras gets wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from npmobile.errors import ImageError
from npmobile.image import INTERPOLATIONS, load_img

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.mark.parametrize("interpolation", list(INTERPOLATIONS))
@pytest.mark.parametrize("photo", ["chelsea.jpg", "coffee.jpg"])
def test_same_pixels_as_keras(photo, interpolation):
    import keras

    path = SAMPLES / photo
    expected = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(224, 160), interpolation=interpolation))
    got = load_img(path, target_size=(224, 160), interpolation=interpolation)
    assert got.dtype == np.float32 and got.shape == (224, 160, 3)
    np.testing.assert_array_equal(got, expected)


def _save(tmp_path, image: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _gradient(mode_size=(40, 30)) -> Image.Image:
    w, h = mode_size
    data = np.zeros((h, w, 3), np.uint8)
    data[..., 0] = np.linspace(0, 255, w)[None, :]
    data[..., 1] = np.linspace(0, 255, h)[:, None]
    data[..., 2] = 128
    return Image.fromarray(data)


@pytest.mark.parametrize(
    "mode,suffix",
    [("L", ".png"), ("LA", ".png"), ("P", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"), ("RGB", ".webp"),
     ("RGB", ".bmp"), ("P", ".gif")],
)
def test_any_mode_becomes_rgb_like_keras(tmp_path, mode, suffix):
    import keras

    path = _save(tmp_path, _gradient().convert(mode), f"img{suffix}")
    got = load_img(path)
    assert got.shape == (30, 40, 3)
    np.testing.assert_array_equal(got, keras.utils.img_to_array(keras.utils.load_img(path)))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64).astype(np.uint16)[None, :]).repeat(8, axis=0)
    path = _save(tmp_path, Image.fromarray(ramp), "deep.png")
    got = load_img(path)
    assert got.shape == (8, 64, 3)
    assert got[0, 0, 0] == 0 and got[0, -1, 0] == 255 and np.all(np.diff(got[0, :, 0]) >= 0)


def test_exif_orientation_is_applied(tmp_path):
    image = _gradient((40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = _save(tmp_path, image, "phone.jpg", exif=exif, quality=95)
    assert load_img(path).shape == (40, 30, 3)


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), color) for color in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    got = load_img(path)
    assert got[0, 0, 0] > 200 and got[0, 0, 1] < 50


def test_center_crop_keeps_the_middle_seven_eighths(tmp_path):
    path = _save(tmp_path, _gradient((80, 64)), "wide.png")
    full = load_img(path)
    cropped = load_img(path, crop="center")
    assert cropped.shape == (56, 70, 3)
    np.testing.assert_array_equal(cropped, full[4:60, 5:75])
    assert load_img(path, target_size=(32, 32), crop="center").shape == (32, 32, 3)


@pytest.mark.parametrize(
    "content,expected",
    [(b"", "not an image"), (b"hello, not an image", "not an image"), (None, "cannot be decoded")],
    ids=["empty", "text", "truncated-jpeg"],
)
def test_broken_files_raise_one_line_image_error(tmp_path, content, expected):
    path = tmp_path / "photo.jpg"
    path.write_bytes(content if content is not None else (SAMPLES / "chelsea.jpg").read_bytes()[:600])
    with pytest.raises(ImageError, match=expected) as error:
        load_img(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_and_decompression_bomb(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="no such file"):
        load_img(tmp_path / "nope.jpg")
    path = _save(tmp_path, _gradient((200, 200)), "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's guard, scaled down for the test
    with pytest.raises(ImageError, match="too many pixels"):
        load_img(path)
