"""Where official weight files are found, and how one is fetched when it is nowhere.

Order: $NPMOBILE_WEIGHTS_DIR, then the Keras cache ($KERAS_HOME/models or ~/.keras/models — anyone
who ran Keras once has the files), then npmobile's cache (``cache_dir=``, $NPMOBILE_CACHE_DIR or
~/.cache/npmobile), then a download into npmobile's cache.

A download is written to a temporary file beside its final name and renamed into place only once
complete and checked, so a broken transfer never leaves a half file that looks whole; a cached file
that fails its check is skipped and fetched again. Nothing is ever written outside npmobile's cache,
and a link planted there that points out of it is neither read nor written through.

The standard library's urllib is enough for one HTTP(S) GET, so no download package is needed; it is imported
only for a download (a run that finds its file does not pay for it).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

from npmobile.errors import WeightsError
from npmobile.io.kinds import HDF5_SIGNATURE
from npmobile.weights.registry import WeightsFileInfo

CHUNK = 1 << 20
TIMEOUT_SECONDS = 30

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None when unknown)


def resolve(info: WeightsFileInfo, *, cache_dir: str | os.PathLike | None = None,
            progress: Progress | None = None) -> Path:
    """A local path to the official file ``info``, downloading it once if it is nowhere.

    ``cache_dir`` replaces npmobile's own cache ($NPMOBILE_CACHE_DIR or ~/.cache/npmobile).
    ``progress(done, total)`` is called as bytes arrive; by default a bar is drawn on stderr when it
    is a terminal, and nothing otherwise.
    """
    own = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dirs = search_dirs(own)
    if info.sha256_prefix is not None:  # a torchvision file: torch hub's cache is the Keras cache's twin
        dirs.insert(-1, torch_hub_dir())
    for directory in dirs:
        candidate = directory / info.filename
        if directory == own and not _inside(candidate, own):
            continue  # a link planted in our cache pointing elsewhere: never read through it
        if file_ok(candidate, info):
            return candidate
    return download(info, own, progress=progress if progress is not None else terminal_progress(info.filename))


def search_dirs(own_cache: Path | None = None) -> list[Path]:
    """The directories looked in, in order; the last one is npmobile's cache (where downloads go)."""
    dirs = []
    if os.environ.get("NPMOBILE_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["NPMOBILE_WEIGHTS_DIR"]).expanduser())
    dirs.append(keras_cache_dir())
    dirs.append(own_cache if own_cache is not None else default_cache_dir())
    return dirs


def keras_cache_dir() -> Path:
    """Where keras.utils.get_file keeps the application weights."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home).expanduser() / "models"


def torch_hub_dir() -> Path:
    """Where torch.hub.load_state_dict_from_url keeps torchvision's weights."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def default_cache_dir() -> Path:
    return Path(os.environ.get("NPMOBILE_CACHE_DIR") or Path.home() / ".cache" / "npmobile").expanduser()


def file_ok(path: Path, info: WeightsFileInfo) -> bool:
    """The file is what the registry says: the published md5 where there is one (MobileNetV3).

    Keras publishes no hash for the MobileNet V1/V2 files (keras/src/applications/mobilenet.py and
    mobilenet_v2.py call get_file without one), so for those we check what we can: the file is
    HDF5 and as long as its own superblock says it is (a copy cut short is refused).
    """
    try:
        if not path.is_file():
            return False
        if info.sha256_prefix is not None:
            return sha256(path).startswith(info.sha256_prefix)
        if info.md5 is not None:
            return md5(path) == info.md5
        return hdf5_complete(path)
    except OSError:
        return False


def hdf5_complete(path: Path) -> bool:
    """HDF5 signature at the start, and the file at least as long as the superblock's end-of-file
    address (a truncated file is shorter). A superblock we cannot parse is judged by its signature."""
    with open(path, "rb") as f:
        head = f.read(96)
        size = os.fstat(f.fileno()).st_size
    if not head.startswith(HDF5_SIGNATURE) or len(head) < 9:
        return False
    version = head[8]
    if version in (0, 1):  # HDF5 spec, "Superblock Format Version 0 and 1"
        offset_size, first_address = head[13] if len(head) > 13 else 0, 24 if version == 0 else 28
    elif version in (2, 3):  # "Superblock Format Version 2 and 3"
        offset_size, first_address = head[9], 12
    else:
        return True
    if offset_size not in (2, 4, 8) or len(head) < first_address + 3 * offset_size:
        return True

    def address(index: int) -> int:
        start = first_address + index * offset_size
        return int.from_bytes(head[start : start + offset_size], "little")

    base, end_of_file = address(0), address(2)  # base address, (free-space | extension), end of file
    if end_of_file == (1 << (8 * offset_size)) - 1:  # "undefined address"
        return True
    return size >= base + end_of_file


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # Keras's published checksum, not a security measure
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(info: WeightsFileInfo, target_dir: Path, progress: Progress | None = None) -> Path:
    """Fetch ``info`` into ``target_dir`` atomically, checked; WeightsError in one line if impossible."""
    if Path(info.filename).name != info.filename:
        raise WeightsError(f"refusing weights file name {info.filename!r}: not a plain file name")
    base = os.environ.get("NPMOBILE_WEIGHTS_URL") or info.base_url
    url = base.rstrip("/") + "/" + info.url
    target = target_dir / info.filename
    where = where_to_put(info.filename)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsError(f"cannot create the weights cache {target_dir} ({error.strerror}); {where}") from None
    import http.client
    import urllib.error

    # mkstemp creates a new file (O_EXCL), so it never opens an existing name or a link.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{info.filename}.", suffix=".part", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out, progress)
        tmp = Path(tmp_name)
        if not file_ok(tmp, info):
            what = ("sha256 check" if info.sha256_prefix else "md5 checksum" if info.md5
                    else "check (not a complete HDF5 file)")
            raise WeightsError(f"downloaded {info.filename} from {url} but it fails its {what}; {where}")
        os.replace(tmp, target)  # atomic; replaces a planted link itself, never the file it points to
        return target
    # ValueError: urllib's word for an address it cannot parse (a mistyped $NPMOBILE_WEIGHTS_URL).
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise WeightsError(f"cannot download {info.filename} from {url} ({_reason(error)}); offline? {where}") from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def where_to_put(filename: str) -> str:
    """The fix for a file we cannot fetch: the directories resolve() reads it from, as they are now
    (~/.keras/models unless $KERAS_HOME moves it; $NPMOBILE_WEIGHTS_DIR with its value when set)."""
    keras = keras_cache_dir()
    shown = "~/.keras/models" if keras == Path.home() / ".keras" / "models" else str(keras)
    weights_dir = os.environ.get("NPMOBILE_WEIGHTS_DIR")
    first = f"$NPMOBILE_WEIGHTS_DIR ({weights_dir})" if weights_dir else "$NPMOBILE_WEIGHTS_DIR"
    return f"put {filename} in {first} or {shown}"


def _fetch(url: str, out: BinaryIO, progress: Progress | None) -> None:
    import http.client
    import urllib.request

    if not url.startswith(("https://", "http://")):
        raise WeightsError(f"refusing to fetch weights from {url!r}: only http(s) addresses")
    with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        done = 0
        while block := response.read(CHUNK):
            out.write(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    # http.client returns a short body without complaint when the connection drops; count it ourselves.
    if total is not None and done != total:
        raise http.client.IncompleteRead(b"", total - done)
    if progress is not None and total is None:
        progress(done, done)  # now the total is known: lets a bar finish its line


def _reason(error: BaseException) -> str:
    import http.client
    import urllib.error

    if isinstance(error, urllib.error.HTTPError):
        reason = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, http.client.IncompleteRead):
        reason = f"connection closed with {error.expected} bytes still to come"
    else:
        reason = str(getattr(error, "reason", None) or getattr(error, "strerror", None) or error)
    return " ".join(reason.split()) or type(error).__name__  # one line, whatever the OS said


def _inside(path: Path, directory: Path) -> bool:
    """``path`` (links followed) is still inside ``directory`` (links followed)."""
    try:
        return path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a link loop
        return False


def terminal_progress(label: str, stream: TextIO | None = None) -> Progress | None:
    """tqdm's bar on ``stream`` (stderr) when it is a terminal; None (silent) otherwise."""
    stream = stream if stream is not None else sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return None
    from tqdm import tqdm

    bar = tqdm(desc=f"downloading {label}", unit="B", unit_scale=True, unit_divisor=1024, file=stream)

    def show(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()

    return show
