"""The kernel cache's files and the children npmobile starts (kernels/build.py, npmobile/cli/build_kernels.py,
npmobile/children.py): builds that race or die, files never written through a link, nothing imported from the
working folder. No module is built here (tests/test_aot.py builds and loads one)."""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from kernel_cache_helpers import plant_imports, record_background_builds

from npmobile import isolation
from npmobile.cli import build_kernels
from npmobile.kernels import backend, build

NPMOBILE = Path(sys.executable).with_name("npmobile")
MODULE_FILE = backend.MODULE_NAME + importlib.machinery.EXTENSION_SUFFIXES[0]


def made_module(directory: Path, content: bytes) -> Path:
    """A module folder as a build leaves it (the bytes are not a library: nothing here loads them)."""
    directory.mkdir(parents=True)
    (directory / MODULE_FILE).write_bytes(content)
    manifest = {"key": backend.cache_key(), "module": {"file": MODULE_FILE, "bytes": len(content),
                                                       "sha256": hashlib.sha256(content).hexdigest()}}
    (directory / backend.MANIFEST).write_text(json.dumps(manifest))
    return directory


# --- two builders, a build killed halfway ------------------------------------------------------------------

def test_the_loser_of_two_builders_keeps_the_winners_module_without_failing(tmp_path, monkeypatch):
    final = tmp_path / backend.cache_key()
    ours = made_module(tmp_path / ".build-ours", b"ours")
    real_rename = os.rename

    def winner_first(source, target):  # the other builder renames its module into place just before ours
        if Path(target) == final and not final.exists():
            made_module(tmp_path / ".build-theirs", b"theirs")
            real_rename(tmp_path / ".build-theirs", final)
        return real_rename(source, target)

    monkeypatch.setattr(build.os, "rename", winner_first)
    assert build.install(ours, final) == final
    assert (final / MODULE_FILE).read_bytes() == b"theirs" and not ours.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_a_damaged_module_is_replaced_by_rename_and_force_replaces_a_sound_one(tmp_path):
    final = made_module(tmp_path / backend.cache_key(), b"sound")
    (final / MODULE_FILE).write_bytes(b"cut")  # no longer what its manifest says
    build.install(made_module(tmp_path / ".build-1", b"new"), final)
    assert (final / MODULE_FILE).read_bytes() == b"new"
    build.install(made_module(tmp_path / ".build-2", b"newer"), final)  # sound: kept
    assert (final / MODULE_FILE).read_bytes() == b"new"
    build.install(made_module(tmp_path / ".build-3", b"forced"), final, force=True)
    assert (final / MODULE_FILE).read_bytes() == b"forced"
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_the_staging_folder_of_a_build_killed_halfway_is_removed_by_the_next(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    host = build.this_host()
    killed = tmp_path / f".build-{host}-{gone.pid}-x1y2"
    replacing = tmp_path / f".old-{host}-{gone.pid}-a1b2"
    running = tmp_path / f".build-{host}-{os.getpid()}-c3d4"
    elsewhere = tmp_path / f".build-other-host-{gone.pid}-e5f6"
    for folder in (killed, replacing, running, elsewhere):
        (folder / "partial").mkdir(parents=True)
    assert sorted(build.clean_abandoned(tmp_path)) == sorted([killed, replacing])
    assert running.exists() and elsewhere.exists() and not killed.exists() and not replacing.exists()


# --- the lock ----------------------------------------------------------------------------------------------

def test_the_lock_names_its_host_and_a_lock_of_another_host_is_not_taken(tmp_path):
    fd = build.take_lock(tmp_path)
    os.close(fd)
    pid, _, host = (build.lock_text(tmp_path) or "").split()
    assert int(pid) == os.getpid() and host == build.this_host()
    build.release_lock(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    # a process that has ended on another host is not one this host can see: alive until the lock is old
    (tmp_path / build.LOCK).write_text(f"{gone.pid} {time.time():.0f} other-host\n")
    assert build.take_lock(tmp_path) is None
    assert build.wait_for_lock(tmp_path) is None  # nothing to wait for from here
    (tmp_path / build.LOCK).write_text(f"{gone.pid} {time.time() - build.STALE_LOCK_SECONDS - 60:.0f} other-host\n")
    fd = build.take_lock(tmp_path)
    assert fd is not None
    os.close(fd)


# --- the command line's background build ------------------------------------------------------------------

@pytest.fixture
def auto_build(monkeypatch, tmp_path):
    (tmp_path / "kernels").mkdir()
    return record_background_builds(monkeypatch, tmp_path / "kernels")


def test_a_symlinked_log_is_replaced_not_written_through(auto_build, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    log = build.log_path(auto_build.root, auto_build.key)
    log.symlink_to(victim)
    assert auto_build.start()
    assert victim.read_text() == "the user's file\n"
    assert not log.is_symlink() and log.is_file()


def test_a_module_that_failed_its_check_is_rebuilt_but_not_one_in_a_folder_others_may_write(auto_build, monkeypatch):
    made_module(auto_build.root / auto_build.key, b"damaged")
    assert not auto_build.start()  # a manifest, nothing refused: built
    monkeypatch.setattr(backend, "rejected", backend.ModuleRejected("cut short", rebuild=True))
    assert auto_build.start() and len(auto_build.started) == 1
    build.release_lock(auto_build.root, os.getpid())
    monkeypatch.setattr(backend, "rejected", backend.ModuleRejected("the cache is group-writable", rebuild=False))
    assert not auto_build.start() and len(auto_build.started) == 1


def test_a_cache_folder_that_cannot_be_made_starts_no_build(auto_build, monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NPMOBILE_KERNELS_DIR", str(blocker / "kernels"))  # read-only, or not a folder
    assert not auto_build.start() and auto_build.started == [] and capsys.readouterr().err == ""


def test_a_failed_background_build_writes_its_marker_by_rename_not_through_a_link(auto_build, monkeypatch, tmp_path):
    monkeypatch.setattr(build_kernels, "subprocess", subprocess)  # a real child ...
    monkeypatch.setattr(build, "missing_tools", lambda: None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))  # ... that finds no C compiler: fails at once
    victim = tmp_path / "victim.txt"
    marker = build.failure_marker(auto_build.root, auto_build.key)
    marker.symlink_to(victim)  # dangling: the run does not take it for a marker
    assert auto_build.start()
    deadline = time.monotonic() + 120
    while (auto_build.root / build.LOCK).exists():
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert not victim.exists() and not marker.is_symlink()
    assert marker.read_text().strip() == str(build.log_path(auto_build.root, auto_build.key))


def test_build_kernels_into_a_cache_it_cannot_write_says_so_in_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run([str(NPMOBILE), "build-kernels", "--quick"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NPMOBILE_KERNELS_DIR": str(blocker / "kernels")})
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and str(blocker) in done.stderr, done.stderr


def test_write_atomically_replaces_a_link_and_create_new_never_follows_one(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    link = tmp_path / "marker"
    link.symlink_to(victim)
    build.write_atomically(link, b"written")
    assert victim.read_text() == "keep" and link.read_text() == "written" and not link.is_symlink()
    link.unlink()
    link.symlink_to(victim)
    os.close(build.create_new(link))
    assert victim.read_text() == "keep" and not link.is_symlink()


# --- nothing from the working folder runs ------------------------------------------------------------------

def test_build_kernels_imports_nothing_from_the_working_folder(tmp_path):
    planted = plant_imports(tmp_path / "photos")
    done = subprocess.run([str(NPMOBILE), "build-kernels", "--quick"], capture_output=True, text=True, timeout=300,
                          cwd=planted, env={**os.environ, "CC": str(tmp_path / "no-such-cc"),
                                            "NPMOBILE_KERNELS_DIR": str(tmp_path / "kernels"),
                                            "PYTHONSTARTUP": str(planted / "json.py")})
    assert done.returncode == 1 and "C compiler" in done.stderr  # the child ran, and said why it cannot build
    assert not (planted / "imported").exists()


def test_the_isolated_reader_imports_nothing_from_the_working_folder(keras_files, tmp_path, monkeypatch):
    case = keras_files.get("MobileNetV2", "keras3_keras", input_shape=(96, 96, 3), alpha=0.35)
    planted = plant_imports(tmp_path / "photos")
    monkeypatch.chdir(planted)
    monkeypatch.setenv("PYTHONPATH", str(planted))
    relative = os.path.relpath(case.path, planted)  # a path relative to the working folder still reads
    spec = isolation.read_file(relative, "model")
    assert spec.layers and not (planted / "imported").exists()


def test_children_run_isolated_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("PYTHONSTARTUP", "/somewhere/startup.py")
    command = build_kernels.build_command(Path("/cache"), "--quick")
    assert command[:3] == [sys.executable, "-I", "-c"]
    env = isolation._child_env()
    assert "PYTHONPATH" not in env and "PYTHONSTARTUP" not in env and env["OMP_NUM_THREADS"] == "1"


def test_numba_with_nowhere_to_cache_compiles_in_memory_saying_so_once(monkeypatch, capsys):
    if backend.AOT:
        pytest.skip("the JIT's compiler only")

    def no_locator():
        raise RuntimeError("cannot cache function 'f': no locator available for file 'kernels/f.py'")

    monkeypatch.setattr(backend, "_said_uncached", False)
    assert backend._cached_or_in_memory(no_locator, lambda: "in memory") == "in memory"
    assert backend._cached_or_in_memory(no_locator, lambda: "again") == "again"
    [line] = capsys.readouterr().err.splitlines()
    assert "compile in memory" in line and "NUMBA_CACHE_DIR" in line
    with pytest.raises(RuntimeError, match="other"):
        backend._cached_or_in_memory(lambda: (_ for _ in ()).throw(RuntimeError("other")), lambda: None)


def test_a_background_build_on_a_full_disk_ends_cleanly_and_releases_the_lock(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build, "build", disk_full)
    monkeypatch.setattr(build, "write_atomically", disk_full)  # not even the failure marker fits
    monkeypatch.setattr(build.os, "nice", lambda n: 0)
    fd = build.take_lock(tmp_path)
    os.close(fd)
    args = SimpleNamespace(root=tmp_path, quick=True, force=False, debug=False)
    assert build.build_in_background(args) == 1
    assert not (tmp_path / build.LOCK).exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_the_cache_folder_is_made_private_under_a_group_writable_umask(tmp_path):
    previous = os.umask(0o002)  # Debian/Ubuntu's default for users with a group of their own
    try:
        build.make_cache_folder(tmp_path / "cache" / "kernels")
    finally:
        os.umask(previous)
    assert backend.private_enough(os.lstat(tmp_path / "cache" / "kernels")) is None
