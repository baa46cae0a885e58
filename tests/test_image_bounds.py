"""Images cost bounded memory: the pixel limit is checked on the header, deep greyscale is converted a
band at a time (never as float64 copies of the whole image), and large JPEGs can be decoded at reduced
size. The memory tests run in a child process under RLIMIT_AS, so that a regression fails there instead
of filling the machine, and measure the child's peak resident memory."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from npmobile.errors import ImageError
from npmobile.image import INTERPOLATIONS, load_img

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
MB = 1 << 20


# --- files written by hand, a row at a time: a few hundred KB that decode to hundreds of MB ------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_grey16_png(path: Path, width: int, height: int) -> Path:
    """A 16-bit greyscale PNG: a horizontal ramp over 0..65535, every row after the first filtered
    "Up" (all zero bytes), so it compresses about a thousand to one."""
    ramp = (np.arange(width, dtype=np.uint64) * 65535 // max(1, width - 1)).astype(">u2").tobytes()
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(b"\0" + ramp)]
    up = b"\2" + bytes(2 * width)
    parts += [compressor.compress(up) for _ in range(height - 1)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
                     + _chunk(b"IEND", b""))
    return path


def write_float_tiff(path: Path, width: int, height: int, rows_per_strip: int = 256) -> Path:
    """A 32-bit float greyscale TIFF (SampleFormat 3), deflate-compressed strips of a ramp over 0..1
    (repeated every 1000 pixels: inside deflate's window, so it compresses a few hundred to one)."""
    row = np.resize(np.linspace(0, 1, min(width, 1000), dtype="<f4"), width).tobytes()
    strips = [zlib.compress(row * min(rows_per_strip, height - top), 6) for top in range(0, height, rows_per_strip)]
    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [32]), (259, 3, [8]), (262, 3, [1]),
               (273, 4, None), (277, 3, [1]), (278, 4, [rows_per_strip]),
               (279, 4, [len(s) for s in strips]), (339, 3, [3])]
    ifd_size = 2 + 12 * len(entries) + 4
    arrays_at = 8 + ifd_size
    data_at = arrays_at + 8 * len(strips)  # the two LONG arrays: offsets and byte counts
    offsets, at = [], data_at
    for strip in strips:
        offsets.append(at)
        at += len(strip)
    ifd, arrays = [struct.pack("<H", len(entries))], b""
    for tag, kind, values in entries:
        values = offsets if values is None else values
        if len(values) == 1:  # the value itself in the entry: a LONG, or a SHORT padded to four bytes
            packed = struct.pack("<HHI", tag, kind, 1) + struct.pack("<I" if kind == 4 else "<HH",
                                                                     *([values[0]] if kind == 4 else [values[0], 0]))
        else:
            packed = struct.pack("<HHII", tag, kind, len(values), arrays_at + len(arrays))
            arrays += struct.pack(f"<{len(values)}I", *values)
        ifd.append(packed)
    ifd.append(struct.pack("<I", 0))
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + b"".join(ifd) + arrays + b"".join(strips))
    return path


# --- the pixel limit --------------------------------------------------------------------------------

def test_max_pixels_refuses_from_the_header_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(path)

    def decoding(*args, **kwargs):
        raise AssertionError("decoded an image past the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoding)
    with pytest.raises(ImageError, match=r"too many pixels \(300x200 = 60,000, over the limit of 59,999\)") as error:
        load_img(path, target_size=(32, 32), max_pixels=59_999)
    message = str(error.value)
    assert str(path) in message and "\n" not in message and "max_pixels=" in message and "--max-pixels" in message
    monkeypatch.undo()
    assert load_img(path, max_pixels=60_000).shape == (200, 300, 3)


def test_max_pixels_above_pillows_limit_lets_the_image_through(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (200, 200), 90).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse it at open (past twice this)
    with pytest.raises(ImageError, match="over twice the limit of 1,000"):
        load_img(path)
    assert np.all(load_img(path, max_pixels=40_000) == 90)
    assert Image.MAX_IMAGE_PIXELS == 40_000  # raised for the process, so Pillow's decoders agree
    load_img(path, max_pixels=5_000_000)
    with pytest.raises(ImageError, match="over the limit of 39,999"):
        load_img(path, max_pixels=39_999)
    assert Image.MAX_IMAGE_PIXELS == 5_000_000  # a smaller limit for one call never lowers Pillow's


def test_torchvision_preparation_takes_the_same_limit(tmp_path):
    from npmobile.image import load_torchvision

    path = tmp_path / "photo.png"
    Image.new("RGB", (300, 260), (1, 2, 3)).save(path)
    with pytest.raises(ImageError, match="too many pixels"):
        load_torchvision(path, max_pixels=300 * 260 - 1)
    assert load_torchvision(path, max_pixels=300 * 260).shape == (224, 224, 3)


def test_max_pixels_must_be_positive():
    with pytest.raises(ImageError, match="max_pixels must be at least 1"):
        load_img(SAMPLES / "chelsea.jpg", max_pixels=0)


# --- deep greyscale: resized while one channel, the same pixels -------------------------------------

@pytest.mark.parametrize("interpolation", list(INTERPOLATIONS))
def test_deep_greyscale_resized_as_one_channel_equals_resizing_its_rgb_copy(tmp_path, interpolation):
    files = [write_grey16_png(tmp_path / "deep.png", 97, 61), write_float_tiff(tmp_path / "float.tif", 97, 61, 8)]
    for path in files:
        with Image.open(path) as opened:
            assert opened.mode in ("I;16B", "I;16", "F")
        full = load_img(path)
        expected = np.asarray(Image.fromarray(full.astype(np.uint8)).resize((40, 33), INTERPOLATIONS[interpolation]),
                              np.float32)
        np.testing.assert_array_equal(load_img(path, target_size=(33, 40), interpolation=interpolation), expected)


def test_hand_written_files_hold_what_they_say(tmp_path):
    png = load_img(write_grey16_png(tmp_path / "deep.png", 256, 3))
    np.testing.assert_array_equal(png[0, :, 0], np.round(np.round(np.arange(256) * 65535 / 255) / 257.0))
    tif = load_img(write_float_tiff(tmp_path / "float.tif", 256, 5, 2))
    np.testing.assert_array_equal(tif[4, :, 1], np.round(np.linspace(0, 1, 256, dtype=np.float32).astype(np.float64)
                                                         * 255))


# --- JPEG draft -------------------------------------------------------------------------------------

def _large_jpeg(tmp_path) -> Path:
    path = tmp_path / "large.jpg"
    with Image.open(SAMPLES / "chelsea.jpg") as photo:
        photo.resize((1920, 1792), Image.Resampling.BICUBIC).save(path, quality=95)
    return path


def test_draft_decodes_a_large_jpeg_at_reduced_size_close_to_the_full_decode(tmp_path, monkeypatch):
    path = _large_jpeg(tmp_path)
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def load(image):
        decoded.append(image.size)
        return real_load(image)

    def sizes_decoded(**options) -> tuple[np.ndarray, set]:
        decoded.clear()
        return load_img(path, target_size=(224, 224), interpolation="bilinear", **options), set(decoded)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    full, sizes = sizes_decoded()
    assert sizes == {(1920, 1792)}
    drafted, sizes = sizes_decoded(draft=True)
    assert sizes == {(240, 224)}  # 1/8: still at least 224 on each side
    assert drafted.shape == full.shape == (224, 224, 3)
    assert np.abs(drafted - full).mean() < 4.0  # the same picture; not the same pixels (hence opt-in)
    cropped, sizes = sizes_decoded(draft=True, crop="center")
    assert sizes == {(480, 448)} and cropped.shape == (224, 224, 3)  # 1/8 would leave 196 px after the crop


def test_draft_leaves_other_formats_and_the_default_alone(tmp_path):
    png = tmp_path / "large.png"
    with Image.open(SAMPLES / "chelsea.jpg") as photo:
        photo.resize((1200, 800)).save(png)
    np.testing.assert_array_equal(load_img(png, target_size=(64, 64), draft=True), load_img(png, target_size=(64, 64)))


# --- memory, measured in a child under a resource limit ----------------------------------------------

MEASURE = r"""
import json, resource, sys

from npmobile.image import load_img


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


path, cap, draft = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "draft"
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + cap, resource.RLIM_INFINITY))
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
except OSError:  # not allowed here: the peak then counts the imports too (a stricter test)
    pass
before = status("VmRSS")
x = load_img(path, target_size=(224, 224), draft=draft, max_pixels=90_000_000)
print(json.dumps({"peak": status("VmHWM") - before, "shape": list(x.shape), "mean": float(x.mean())}))
"""


def _peak_memory(path: Path, cap: int, draft: bool = False) -> dict:
    env = {"OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    child = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(cap), "draft" if draft else "full"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout)


def test_a_16_bit_greyscale_png_of_88_megapixels_stays_in_bounds(tmp_path):
    """The attack of the security issue: ~172 KB of PNG, 88 Mpx of 16-bit grey. Pillow holds it in 2 bytes
    a pixel, the 8-bit copy takes 1 more: the bound is 4 bytes a pixel (float64 copies took 3 GB: 34 a pixel)."""
    width, height = 11_000, 8_000
    path = write_grey16_png(tmp_path / "bomb16.png", width, height)
    assert path.stat().st_size < 300_000
    result = _peak_memory(path, cap=1024 * MB)
    assert result["shape"] == [224, 224, 3] and 120 < result["mean"] < 135  # the ramp, scaled to 0..255
    assert result["peak"] < 4 * width * height, f"{result['peak'] / MB:.0f} MB"


def test_a_float_tiff_stays_in_bounds(tmp_path):
    """Float greyscale: 4 bytes a pixel decoded, 1 for the 8-bit copy; the bound 6 a pixel (float64 copies took
    2.7 GB for this one: 46 a pixel)."""
    width, height = 10_000, 6_000
    path = write_float_tiff(tmp_path / "bomb.tif", width, height)
    assert path.stat().st_size < 2_000_000
    result = _peak_memory(path, cap=1280 * MB)
    assert result["shape"] == [224, 224, 3] and 120 < result["mean"] < 135
    assert result["peak"] < 6 * width * height, f"{result['peak'] / MB:.0f} MB"


def test_draft_decodes_a_large_jpeg_in_a_fraction_of_the_memory(tmp_path):
    path = tmp_path / "photo.jpg"
    with Image.open(SAMPLES / "chelsea.jpg") as photo:
        photo.resize((6000, 4000)).save(path, quality=90)
    full = _peak_memory(path, cap=1024 * MB)
    drafted = _peak_memory(path, cap=1024 * MB, draft=True)
    assert full["peak"] > 4 * 6000 * 4000 * 0.9  # RGB held in 4 bytes a pixel
    assert drafted["peak"] < full["peak"] / 8, (drafted["peak"] / MB, full["peak"] / MB)


# --- the command line ---------------------------------------------------------------------------------

def _classify(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "npmobile", "classify", *args, "--weights", "none", "--alpha", "0.35",
               "--size", "96", "--json", "--threads", "1"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli_max_pixels_refuses_in_one_line_and_raises_pillows_limit(tmp_path):
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(small)
    Image.new("RGB", (400, 300), (30, 200, 30)).save(large)
    refused = _classify(str(small), str(large), "--max-pixels", "1200")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    rows = {Path(row["path"]).name: row for row in json.loads(refused.stdout)}
    assert "top" in rows["small.png"] and "too many pixels (400x300 = 120,000" in rows["large.png"]["error"]
    lines = [line for line in refused.stderr.splitlines() if "large.png" in line]
    assert len(lines) == 1 and "--max-pixels" in lines[0] and "MAX_IMAGE_PIXELS" not in lines[0]
    # Past Pillow's own limit (here by a 200 Mpx header on a tiny file): --max-pixels lets it through.
    claims = tmp_path / "claims.png"
    Image.new("L", (1, 1)).save(claims)
    data = bytearray(claims.read_bytes())
    struct.pack_into(">II", data, 16, 20_000, 10_000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    claims.write_bytes(bytes(data))
    default = _classify(str(claims))
    assert default.returncode == 1 and "too many pixels" in default.stderr and "Traceback" not in default.stderr
    allowed = _classify(str(claims), "--max-pixels", "200000000")
    assert "too many pixels" not in allowed.stderr and "cannot be decoded" in allowed.stderr  # decoding was tried
