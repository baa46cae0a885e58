"""What tests/test_aot.py and tests/test_kernel_cache.py share: the command line's background build with its
children recorded, and a working folder with planted modules."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

from npmobile.cli import build_kernels
from npmobile.kernels import backend

PHOTO = Path(__file__).resolve().parents[1] / "samples" / "chelsea.jpg"


def record_background_builds(monkeypatch, root: Path) -> SimpleNamespace:
    """start_in_background as after a CLI run on the JIT, with its kernel cache in ``root``; the children it
    would start are recorded (``started``), each a live process (this one)."""
    monkeypatch.delenv("NPMOBILE_KERNELS", raising=False)
    monkeypatch.delenv("NPMOBILE_AUTO_BUILD", raising=False)
    monkeypatch.setenv("NPMOBILE_KERNELS_DIR", str(root))
    started = []

    def popen(command, **options):
        started.append((command, options))
        return SimpleNamespace(pid=os.getpid())

    monkeypatch.setattr(build_kernels, "subprocess", SimpleNamespace(
        Popen=popen, DEVNULL=subprocess.DEVNULL, STDOUT=subprocess.STDOUT))
    return SimpleNamespace(start=build_kernels.start_in_background, started=started, root=root,
                           key=backend.cache_key())


def plant_imports(folder: Path) -> Path:
    """A folder (of downloaded photos, say) holding a photo and a numpy.py, json.py, struct.py and
    sitecustomize.py that record being imported in ``folder/imported``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("numpy", "json", "sitecustomize", "struct"):
        (folder / f"{name}.py").write_text(f"open({str(folder / 'imported')!r}, 'a').write('{name}\\n')\n")
    shutil.copy(PHOTO, folder / "photo.jpg")
    return folder
