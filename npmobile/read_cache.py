"""What the bounded reader made of a file, kept once per file and machine: the next load of the same bytes
starts no child and parses no HDF5.

An entry holds exactly what the isolated reader's child sends through its pipe (npmobile/isolation.py: a
prefix, a JSON header, the arrays' bytes) for one file. It is named by a SHA-256 of the file's bytes, the path
the reader was given (messages and ``source`` name it), what was asked of it ("model", "weights", "any") and
the sources of this npmobile (``sources_digest``: a reader that changes makes new entries). The caller reads an
entry the way it reads the pipe: held to the same caps before its header is parsed or its buffer allocated,
then decoded the same way. So using an entry is as safe as reading the file in the child: what comes out is
what the child sent for those bytes, checked again; nothing in an entry is code, and an entry that is not
whole is read as none (and the file is read).

Only results are kept, never an error: a file that hangs or fails is read, and fails, every time. An entry is
written only when the file was not changed or replaced while it was read (its device, inode, size, modification
and change times the same when it was hashed and when the result came), under a temporary name, flushed, then
renamed into place. Entries live in a private folder, ``$NPMOBILE_CACHE_DIR/reads`` else
``~/.cache/npmobile/reads`` (mode 700, entries 600: they hold the weights of files other users may not read);
a folder that is a symlink, belongs to another user or is writable by others is neither read nor written. The
least recently used entries go once the folder holds more than ``MAX_BYTES``. ``NPMOBILE_READ_CACHE=0`` turns
the cache off (the test suite does, but for the tests of the cache itself). The caller hashes the file with
no time limit, so only a regular file of at most MAX_FILE_BYTES (512 MB, far above any MobileNet) is looked up:
a FIFO, a device or a larger file is read by the child as without the cache.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import time
from pathlib import Path

from npmobile.kernels.aot_module import private_enough
from npmobile.limits import MAX_FILE_BYTES

# The folder's size past which the least recently used entries are removed (a MobileNet's entry: 10-25 MB).
MAX_BYTES = 1 << 30
_SUFFIX = ".read"
_TEMPORARY = ".entry-"
_CHUNK = 1 << 20
_sources_digest: list[str] = []


def enabled() -> bool:
    return os.environ.get("NPMOBILE_READ_CACHE", "1") != "0"


def cache_dir() -> Path:
    """$NPMOBILE_CACHE_DIR/reads, else ~/.cache/npmobile/reads (beside the downloaded weights)."""
    root = os.environ.get("NPMOBILE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "npmobile")
    return Path(root).expanduser() / "reads"


def sources_digest() -> str:
    """SHA-256 of npmobile's own source files, names included: what the readers are (another version, or an
    edit in a checkout, is another digest)."""
    if not _sources_digest:
        digest = hashlib.sha256()
        package = Path(__file__).resolve().parent
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
        _sources_digest.append(digest.hexdigest())
    return _sources_digest[0]


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Entry:
    """The cache's place for one file as read (``path``, ``kind``) and its bytes as hashed just now."""

    def __init__(self, path: str, folder: Path, name: str, identity: tuple[int, ...]):
        self.path, self.folder, self.name, self.identity = path, folder, name, identity

    def open(self):
        """The entry as a binary file, or None when there is none (or none this process may trust)."""
        try:
            folder = os.lstat(self.folder)
            if not stat.S_ISDIR(folder.st_mode) or private_enough(folder) is not None:
                return None
            fd = os.open(self.folder / self.name,
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or private_enough(st) is not None:
            os.close(fd)
            return None
        try:
            os.utime(fd)  # used now: the last to be removed
        except OSError:
            pass
        return open(fd, "rb", buffering=0)

    def discard(self) -> None:
        """Remove an entry that did not read back whole."""
        try:
            os.unlink(self.folder / self.name)
        except OSError:
            pass

    def new(self) -> NewEntry | None:
        """This entry, to be written (``NewEntry``); None when it cannot be (a read-only home, a folder others
        may write to): then there is only no entry."""
        try:
            if not _private_folder(self.folder):
                return None
            fd, temporary = tempfile.mkstemp(prefix=_TEMPORARY, dir=self.folder)
        except OSError:
            return None
        return NewEntry(self, open(fd, "wb", buffering=0), Path(temporary))


class NewEntry:
    """An entry being written under a temporary name, as the child's message arrives (``write``); ``keep`` puts
    it in place once the message decoded, if the file is still the one hashed. Writing that fails (a full disk)
    only means no entry."""

    def __init__(self, entry: Entry, stream, temporary: Path):
        self.entry, self.stream, self.temporary = entry, stream, temporary

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(chunk)
        except OSError:
            self.discard()

    def keep(self) -> None:
        if self.stream is None:
            return
        entry = self.entry
        try:
            unchanged = _identity(os.stat(entry.path)) == entry.identity
            if unchanged:
                os.fsync(self.stream.fileno())
            self.stream.close()
            if unchanged:
                os.replace(self.temporary, entry.folder / entry.name)
                _trim(entry.folder)
        except OSError:
            pass
        self.stream = None
        self.temporary.unlink(missing_ok=True)  # when not renamed into place

    def discard(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.temporary.unlink(missing_ok=True)


def entry_for(path: str, kind: str) -> Entry | None:
    """The cache's entry for reading ``path`` as ``kind``, named after the file's bytes now; None when the
    cache is off or the file cannot be read here (the reader then says why)."""
    if not enabled():
        return None
    try:  # never waiting on a FIFO (nor reading a device): only a regular file is hashed
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode) or before.st_size > MAX_FILE_BYTES:
            return None
        digest = hashlib.sha256()
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        if _identity(os.fstat(fd)) != _identity(before):
            return None
    except OSError:
        return None
    finally:
        os.close(fd)
    key = hashlib.sha256("\0".join((digest.hexdigest(), path, kind, sources_digest())).encode()).hexdigest()
    return Entry(path, cache_dir(), key[:40] + _SUFFIX, _identity(before))


def _private_folder(folder: Path) -> bool:
    """``folder`` exists (made mode 700 if not) as a real folder of this user's (or root's) that nobody else
    may write to."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and private_enough(st) is None


def _trim(folder: Path) -> None:
    """Remove the least recently used entries while the folder holds more than MAX_BYTES, and what writers
    that died left (temporary files an hour old)."""
    entries, now = [], time.time_ns()
    try:
        for item in os.scandir(folder):
            if not item.is_file(follow_symlinks=False):
                continue
            st = item.stat(follow_symlinks=False)
            if item.name.endswith(_SUFFIX):
                entries.append((st.st_mtime_ns, st.st_size, item.path))
            elif item.name.startswith(_TEMPORARY) and now - st.st_mtime_ns > 3600 * 10**9:
                os.unlink(item.path)
    except OSError:
        return
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= MAX_BYTES:
            break
        try:
            os.unlink(path)
        except OSError:
            pass
        total -= size
