"""The repository root works however the project was installed: editable, non-editable or not at all.

kernels/ and weights/ sit at the top of the repository and are installed as npmobile.kernels and
npmobile.weights. Run from the root, the source folder npmobile/ shadows any installed copy, so the
package must find its two top-level subpackages by itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREDICT = ("import numpy as np, npmobile.kernels, npmobile.weights; from npmobile import applications; "
           "m = applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3)); "
           "p = m.predict(np.zeros((1, 32, 32, 3), np.float32)); print(npmobile.kernels.__file__, p.shape)")


def _venv_seeing_our_packages(where: Path) -> Path:
    """A new venv whose site-packages sees this environment's packages (numba, h5py, ...) but not
    its npmobile: a .pth line adds the directory without running the .pth files inside it, so an
    editable install's import hook stays out."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "test-environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_the_source_tree_runs_with_nothing_installed(tmp_path):
    python = _venv_seeing_our_packages(tmp_path / "venv")
    assert _run(python, "-c", "import importlib.util as u; print(u.find_spec('npmobile'))",
                cwd=tmp_path).stdout.strip() == "None"  # really not installed there
    help_ = _run(python, "-m", "npmobile", "--help", cwd=REPO)
    assert help_.returncode == 0, help_.stderr
    assert "classify" in help_.stdout
    run = _run(python, "-c", PREDICT, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == str(REPO / "kernels" / "__init__.py")
    assert run.stdout.split(maxsplit=1)[1].strip() == "(1, 1000)"


def test_a_non_editable_install_works_from_the_repository_root_and_elsewhere(tmp_path):
    python = _venv_seeing_our_packages(tmp_path / "venv")
    install = _run(python, "-m", "pip", "install", "-q", "--no-deps", str(REPO), cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    for cwd in (REPO, tmp_path):  # the root (source shadows the install) and elsewhere (the install)
        help_ = _run(python, "-m", "npmobile", "--help", cwd=cwd)
        assert help_.returncode == 0, help_.stderr
        run = _run(python, "-c", PREDICT, cwd=cwd)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split(maxsplit=1)[1].strip() == "(1, 1000)"
    installed = _run(python, "-c", PREDICT, cwd=tmp_path).stdout.split()[0]
    assert installed.startswith(str(tmp_path / "venv")) and installed.endswith("npmobile/kernels/__init__.py")
