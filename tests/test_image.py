"""load_img gives keras.utils.load_img + img_to_array's pixels, and handles what Keras gets wrong."""

from __future__ import annotations

import io
import threading
import warnings
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


def _keras_pixels(path: Path) -> np.ndarray:
    import keras

    return keras.utils.img_to_array(keras.utils.load_img(path))


@pytest.mark.parametrize(
    "mode,suffix",
    [("L", ".png"), ("LA", ".png"), ("P", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"), ("1", ".png"),
     ("RGB", ".webp"), ("RGB", ".bmp"), ("P", ".gif"), ("L", ".tif")],
)
def test_any_mode_becomes_rgb_like_keras(tmp_path, mode, suffix):
    path = _save(tmp_path, _gradient().convert(mode), f"img{suffix}")
    with Image.open(path) as reopened:
        assert reopened.mode == mode or suffix in (".webp", ".gif")  # the file really holds that mode
    got = load_img(path)
    assert got.dtype == np.float32 and got.shape == (30, 40, 3)
    np.testing.assert_array_equal(got, _keras_pixels(path))


def test_alpha_is_dropped_as_keras_does_not_composited(tmp_path):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, :4, 3] = 0  # left half fully transparent: its stored colour shows, as in Keras
    rgba[:, 4:, 3] = 255
    path = _save(tmp_path, Image.fromarray(rgba, "RGBA"), "alpha.png")
    got = load_img(path)
    np.testing.assert_array_equal(got, _keras_pixels(path))
    assert np.all(got == (10, 200, 30))


def test_palette_with_transparency_like_keras(tmp_path):
    image = Image.new("P", (8, 6), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.paste(1, (4, 0, 8, 6))
    path = _save(tmp_path, image, "palette.png", transparency=0)
    with Image.open(path) as reopened:
        assert reopened.mode == "P" and "transparency" in reopened.info
    got = load_img(path)
    np.testing.assert_array_equal(got, _keras_pixels(path))
    assert tuple(got[0, 0]) == (255, 0, 0) and tuple(got[0, -1]) == (0, 0, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64).astype(np.uint16)[None, :]).repeat(8, axis=0)
    path = _save(tmp_path, Image.fromarray(ramp), "deep.png")
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I;16")
    got = load_img(path)
    assert got.shape == (8, 64, 3)
    np.testing.assert_array_equal(got[..., 0], np.round(ramp / 257.0))
    assert np.all(got[..., 0] == got[..., 2])


def test_thirty_two_bit_integer_greyscale(tmp_path):
    deep = (np.arange(48, dtype=np.int32) * 1300).reshape(6, 8)  # 16-bit values in a 32-bit image (mode I)
    shallow = (np.arange(48, dtype=np.int32) * 5).reshape(6, 8)  # 8-bit values in a 32-bit image
    for name, data, expected in (("deep.tif", deep, np.round(deep / 257.0)), ("shallow.tif", shallow, shallow)):
        path = _save(tmp_path, Image.fromarray(data), name)
        with Image.open(path) as reopened:
            assert reopened.mode == "I"
        np.testing.assert_array_equal(load_img(path)[..., 1], expected)


def test_float_greyscale(tmp_path):
    unit = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    for name, data in (("unit.tif", unit), ("bytes.tif", unit * 255)):
        path = _save(tmp_path, Image.fromarray(data), name)
        with Image.open(path) as reopened:
            assert reopened.mode == "F"
        np.testing.assert_array_equal(load_img(path)[..., 0], np.round(unit.astype(np.float64) * 255))


def test_exif_orientation_is_applied(tmp_path):
    image = _gradient((40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = _save(tmp_path, image, "phone.png", exif=exif)
    got = load_img(path)
    assert got.shape == (40, 30, 3)
    np.testing.assert_array_equal(got, np.asarray(image.transpose(Image.Transpose.ROTATE_270), np.float32))
    assert _keras_pixels(path).shape == (30, 40, 3)  # what Keras gets: on its side


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".png"])
def test_animation_gives_the_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (10, 10), color) for color in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / f"anim{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    with Image.open(path) as reopened:
        assert reopened.n_frames == 2
    got = load_img(path)
    assert got[0, 0, 0] > 200 and got[0, 0, 1] < 50


def test_file_objects_are_read_like_paths():
    path = SAMPLES / "coffee.jpg"
    np.testing.assert_array_equal(load_img(io.BytesIO(path.read_bytes()), target_size=(64, 64)),
                                  load_img(path, target_size=(64, 64)))


def test_center_crop_keeps_the_middle_seven_eighths(tmp_path):
    path = _save(tmp_path, _gradient((80, 64)), "wide.png")
    full = load_img(path)
    cropped = load_img(path, crop="center")
    assert cropped.shape == (56, 70, 3)
    np.testing.assert_array_equal(cropped, full[4:60, 5:75])
    assert load_img(path, target_size=(32, 32), crop="center").shape == (32, 32, 3)


@pytest.mark.parametrize("size", [(451, 300), (600, 400), (17, 9), (1, 1), (3, 200)])
def test_center_crop_is_tf_central_crop(tmp_path, size):
    import tensorflow as tf

    path = _save(tmp_path, _gradient(size), "any.png")
    expected = tf.image.central_crop(tf.constant(load_img(path)), 0.875).numpy()
    np.testing.assert_array_equal(load_img(path, crop="center"), expected)


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


# Pillow still warns at open between its limit and twice it; we refuse those images all the same.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_missing_file_directory_and_decompression_bomb(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="no such file"):
        load_img(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_img(tmp_path)
    path = _save(tmp_path, _gradient((200, 200)), "big.png")
    # Pillow's guard, scaled down for the test: 40000 pixels is past its warning at 30000 (where we
    # refuse) and past its own error at 2 x 1000.
    for pixels in (30000, 1000):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
        with pytest.raises(ImageError, match=f"over (twice )?the limit of {pixels:,}.*--max-pixels") as error:
            load_img(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
        assert "PIL.Image.MAX_IMAGE_PIXELS" not in str(error.value)  # the CLI has an option for it


def test_bad_options_are_image_errors():
    with pytest.raises(ImageError, match="interpolation"):
        load_img(SAMPLES / "chelsea.jpg", interpolation="cubic")
    with pytest.raises(ImageError, match="crop"):
        load_img(SAMPLES / "chelsea.jpg", crop="middle")


def test_loading_in_threads_leaves_warning_filters_alone():
    """The bomb guard changes no process-wide state (warnings.catch_warnings would, across threads)."""
    before = list(warnings.filters)
    results = []

    def work():
        results.extend(load_img(SAMPLES / "chelsea.jpg").shape for _ in range(50))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [(300, 451, 3)] * 400
    assert warnings.filters == before
