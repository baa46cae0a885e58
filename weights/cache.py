"""Where official weight files are found, and how one is fetched when it is nowhere.

Order: $NPMOBILE_WEIGHTS_DIR, then the Keras cache ($KERAS_HOME/models or ~/.keras/models — anyone
who ran Keras once has the files), then npmobile's cache ($NPMOBILE_CACHE_DIR or ~/.cache/npmobile),
then a download into npmobile's cache. A download is written to a temporary file beside its final
name and renamed into place only once complete and checked, so a broken transfer never leaves a
half file that looks whole; a cached file that fails its check is fetched again.
The standard library's urllib is enough for one HTTPS GET, so no download package is needed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from npmobile.errors import WeightsError
from npmobile.weights.registry import BASE_URL, WeightsFileInfo

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
CHUNK = 1 << 20
TIMEOUT_SECONDS = 30

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


def search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("NPMOBILE_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["NPMOBILE_WEIGHTS_DIR"]))
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    dirs.append(Path(keras_home) / "models")
    dirs.append(cache_dir())
    return dirs


def cache_dir() -> Path:
    return Path(os.environ.get("NPMOBILE_CACHE_DIR") or Path.home() / ".cache" / "npmobile")


def file_ok(path: Path, info: WeightsFileInfo) -> bool:
    """The file is what the registry says: the published md5 where there is one, HDF5 otherwise."""
    try:
        if not path.is_file():
            return False
        if info.md5 is not None:
            return md5(path) == info.md5
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(info: WeightsFileInfo, *, progress: Progress | None = None) -> Path:
    """A local path to the official file ``info``, downloading it once if it is nowhere."""
    for directory in search_dirs():
        candidate = directory / info.filename
        if file_ok(candidate, info):
            return candidate
    return download(info, progress=progress if progress is not None else terminal_progress(info.filename))


def download(info: WeightsFileInfo, progress: Progress | None = None) -> Path:
    base = os.environ.get("NPMOBILE_WEIGHTS_URL") or BASE_URL
    url = base.rstrip("/") + "/" + info.url
    target_dir = cache_dir()
    target = target_dir / info.filename
    where = f"put {info.filename} in $NPMOBILE_WEIGHTS_DIR or ~/.keras/models"
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsError(f"cannot create the weights cache {target_dir} ({error.strerror}); {where}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{info.filename}.", suffix=".part", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out, progress)
        tmp = Path(tmp_name)
        if not file_ok(tmp, info):
            raise WeightsError(f"downloaded {info.filename} from {url} but it fails its checksum; {where}")
        os.replace(tmp, target)  # atomic: the final name only ever holds a complete, checked file
        return target
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        raise WeightsError(f"cannot download {info.filename} ({reason}); offline? {where}") from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _fetch(url: str, out, progress: Progress | None) -> None:
    if not url.startswith(("https://", "http://")):
        raise WeightsError(f"refusing to fetch weights from {url!r}: only http(s) addresses")
    with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        done = 0
        while block := response.read(CHUNK):
            out.write(block)
            done += len(block)
            if progress is not None:
                progress(done, total)


def terminal_progress(label: str, stream=None) -> Progress | None:
    """A one-line progress bar on stderr when it is a terminal; None (silent) otherwise."""
    stream = stream or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return None

    def show(done: int, total: int | None) -> None:
        if total:
            filled = int(30 * done / total)
            stream.write(f"\rdownloading {label} [{'#' * filled}{'.' * (30 - filled)}] {done / 2**20:.1f} MB")
            if done >= total:
                stream.write("\n")
        else:
            stream.write(f"\rdownloading {label} {done / 2**20:.1f} MB")
        stream.flush()

    return show
