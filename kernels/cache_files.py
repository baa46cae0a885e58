"""The kernel cache's files: where a build writes, who may build, and how a module is put in place.

- **Where it goes.** A build writes into a staging folder beside ``kernel_cache_dir() / cache_key()``
  (``.build-<host>-<pid>-...``), flushed to disk, then renamed into place (``install``): a reader sees a
  complete module or none, and a module is never rewritten in place. Folders are made readable by others (umask
  permitting) and writable only by their owner: a module built by root into a container image is loaded by the
  unprivileged user the container runs as.
- **Who builds.** One build at a time per kernel cache: foreground or background, a build holds the cache's
  lock (``build.lock``: pid, start time, host). A foreground build waits for a build of this host and stops in
  one line for another host's; a build removes the staging folders of builds that were killed halfway
  (``clean_abandoned``).
- **After a background build.** Its output in ``<key>.log``, and on failure a ``<key>.failed`` marker (holding
  the log's path) so that no later run starts it again for this key; a build that succeeds removes the marker.

Files in the cache are made by exclusive creation or a temporary name and a rename, never written through a link.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

from npmobile.errors import NpmobileError

from . import aot_module
from .module_key import cache_key

# The kernel cache's build lock: "pid start-time"; older than this, or its process gone, it is stale.
LOCK = "build.lock"
STALE_LOCK_SECONDS = 30 * 60


# --- the build's files in the kernel cache ---------------------------------------------------------------
# Every file here is made by exclusive creation (O_EXCL: never through a planted link) or under a temporary
# name and renamed into place; a module folder is only ever replaced by rename, never rewritten in place.

def log_path(root: Path, key: str) -> Path:
    return Path(root) / f"{key}.log"


def failure_marker(root: Path, key: str) -> Path:
    """Present after a background build for ``key`` failed: it holds the log's path."""
    return Path(root) / f"{key}.failed"


def create_new(path: Path, mode: int = 0o644) -> int:
    """A descriptor of a new, empty file at ``path``: whatever was there (a file, a planted symlink) is
    removed first, and the file is created exclusively, so nothing is ever written through a link."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``path`` holds ``data``: written to a new temporary file beside it, flushed to disk, renamed over it."""
    fd, temporary = tempfile.mkstemp(prefix=f".{Path(path).name}-", dir=Path(path).parent)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def make_cache_folder(root: Path) -> None:
    """Make the kernel cache folder, writable by its owner only whatever the umask (a group-writable folder,
    which a umask of 002 gives, is one aot_module.verify_module refuses to load from)."""
    Path(root).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(root, 0o755 & ~current_umask())
    except FileExistsError:
        pass


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_small(path: Path, limit: int = 4096) -> str:
    """The start of a small text file, never through a symlink (a lock, a marker)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


def this_host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else "localhost"


def _lock_holder(text: str, modified: float) -> tuple[int, float, str]:
    """(pid, start time, host) of a lock's text; a lock still being written: no pid, its file's time."""
    fields = text.split()
    try:
        return int(fields[0]), float(fields[1]), fields[2] if len(fields) > 2 else this_host()
    except (ValueError, IndexError):
        return 0, modified, this_host()


def lock_is_stale(text: str, modified: float) -> bool:
    """Whether a lock's holder is gone: older than STALE_LOCK_SECONDS, or a process of this host that has
    ended. A lock of another host (a kernel cache on a shared file system) is alive until it is that old."""
    pid, started, host = _lock_holder(text, modified)
    if time.time() - started > STALE_LOCK_SECONDS:
        return True
    if pid <= 0 or host != this_host():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # someone else's process: alive
        return False
    return False


def lock_text(root: Path) -> str | None:
    """Who holds the build lock of ``root`` ("pid start-time host"), or None."""
    try:
        return read_small(Path(root) / LOCK)
    except FileNotFoundError:
        return None


def take_lock(root: Path) -> int | None:
    """The build lock of ``root`` as an open descriptor holding this process's pid, or None if a live build
    holds it. A stale lock is moved aside and checked, so that two processes cannot both replace it."""
    path = Path(root) / LOCK
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            try:
                text, modified = read_small(path), os.lstat(path).st_mtime
            except FileNotFoundError:  # released meanwhile
                continue
            except OSError:  # not a file we would have made (a symlink, a folder): remove it as stale
                text, modified = "", 0.0
            if not lock_is_stale(text, modified):
                return None
            aside = path.with_name(f"{LOCK}.{os.getpid()}.stale")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            try:
                replaced = read_small(aside) != text
            except OSError:
                replaced = False
            if replaced:  # another process replaced it first: put its lock back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink()
                return None
            shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
            continue
        hand_lock(fd, os.getpid())
        return fd
    return None


def wait_for_lock(root: Path, say=None, poll: float = 1.0) -> int | None:
    """The build lock of ``root``, waiting while a build of this host holds it (``say(text)`` once, when it
    starts waiting); None when another host's build holds it (that one cannot be checked from here)."""
    said = False
    while True:
        fd = take_lock(root)
        if fd is not None:
            return fd
        text = lock_text(root)
        if text is None:
            continue
        if _lock_holder(text, 0)[2] != this_host():
            return None
        if say is not None and not said:
            say(text)
            said = True
        time.sleep(poll)


def hand_lock(fd: int, pid: int) -> None:
    """Make the lock open as ``fd`` say that process ``pid`` of this host holds it (the starter hands it to
    the build)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid} {time.time():.0f} {this_host()}\n".encode(), 0)


def release_lock(root: Path, pid: int | None = None) -> None:
    """Remove the build lock if process ``pid`` (default: this one) of this host holds it."""
    path = Path(root) / LOCK
    try:
        pid_held, _, host = _lock_holder(read_small(path), 0)
        if pid_held == (pid or os.getpid()) and host == this_host():
            path.unlink()
    except OSError:
        pass


# Staging folders: ".build-<host>-<pid>-<random>" while a build writes a module, ".old-..." while one is
# replaced. One whose process is gone (a build killed halfway) is removed by the next build.
def staging_prefix(kind: str) -> str:
    return f".{kind}-{this_host()}-{os.getpid()}-"


def clean_abandoned(root: Path) -> list[Path]:
    """Remove the staging folders of builds of this host that ended without finishing (killed, power cut);
    returns them. Called with the lock held: no build of this cache is running but this one."""
    removed = []
    for path in Path(root).iterdir():
        parts = path.name.split("-")
        if not path.name.startswith((".build-", ".old-")) or len(parts) < 4:
            continue
        host, pid = "-".join(parts[1:-2]), parts[-2]
        try:
            alive = host != this_host() or int(pid) == os.getpid() or _alive(int(pid))
        except ValueError:
            continue
        if not alive and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(staging: Path, final: Path, force: bool = False) -> Path:
    """Rename the complete module folder ``staging`` to ``final`` (root / key). A damaged module there (or any,
    with ``force``) is moved aside first and dropped; a complete one, which another builder of the same key put
    there meanwhile, is as good as this one (the same sources, CPU and versions) and is kept, this one dropped:
    the loser of that race neither fails nor leaves a failure marker."""
    root = final.parent
    for _ in range(5):
        try:
            os.rename(staging, final)
            break
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
        if not force and _is_complete(final):
            break  # the same build, by another process: use theirs
        old = Path(tempfile.mkdtemp(prefix=staging_prefix("old"), dir=root))
        try:
            os.rename(final, old / final.name)
        except FileNotFoundError:  # the other builder moved it meanwhile: try again
            pass
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        raise NpmobileError(f"{final}: could not replace the kernel module there (another process keeps writing it)")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fsync_path(root, directory=True)
    except OSError:
        pass
    return final


def _is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a module that its manifest's checksum vouches for."""
    try:
        return aot_module.verify_module(directory) is not None
    except aot_module.ModuleRejected:
        return False



def current_module(root: Path) -> tuple[Path, dict] | None:
    """The module in ``root`` for this machine if it is complete and checks out, with its manifest."""
    directory = Path(root) / cache_key()
    try:
        found = aot_module.verify_module(directory)
    except aot_module.ModuleRejected:
        return None
    if found is None:
        return None
    manifest = found[0]
    return directory / manifest["module"]["file"], manifest

