"""How npmobile starts a Python child (the kernel build, the isolated reader): nothing the user did not write runs.

A child started as ``python -m pkg`` or ``python -c`` puts its working folder first on ``sys.path``, so a
``numpy.py`` (or ``json.py``, ``sitecustomize.py``, ...) lying in a folder of downloaded photos would run with the
user's rights. So every child runs ``python -I`` (no working folder or script folder on ``sys.path``, no
``PYTHON*`` variables, no user site-packages), with those variables also removed from its environment (a
grandchild gets none either), from a neutral working folder (the file-system root). It imports npmobile from the
folder this process found it in, and nothing else beyond Python's own start-up.
"""

from __future__ import annotations

import os
import sys

# The working folder of every child: nothing in it is imported or written.
NEUTRAL_CWD = os.path.abspath(os.sep)


def isolated_python(code: str, *args: str) -> list[str]:
    """The command that runs ``code`` (a ``-c`` program) in an isolated interpreter like this one."""
    return [sys.executable, "-I", "-c", code, *args]


def clean_environment(**changes: str) -> dict[str, str]:
    """This process's environment without Python's own variables (PYTHONPATH, PYTHONSTARTUP, PYTHONHOME,
    PYTHONUSERBASE, ...), with ``changes``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTHON")}
    env.update(changes)
    return env


def npmobile_site() -> str:
    """The folder an isolated child adds to find this npmobile: where its distribution is installed (a
    site-packages, the user's included when npmobile was installed there; for an editable install the one that
    holds its finder), else the folder holding the package."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        return os.path.abspath(str(distribution("npmobile").locate_file("")))
    except (ImportError, PackageNotFoundError, OSError):
        return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The boot of an isolated child that runs ``module.main(argv)``: the folder npmobile is installed in is added
# (processing its .pth files, as Python's start-up would) only when -I left it out.
BOOT_MAIN = ("import site, sys; where, module = sys.argv.pop(1), sys.argv.pop(1); "
             "where in sys.path or site.addsitedir(where); import importlib; "
             "sys.exit(importlib.import_module(module).main(sys.argv[1:]))")


def isolated_main(module: str, *args: str) -> list[str]:
    """The command that runs ``module.main(args)`` in an isolated interpreter (``python -I``)."""
    return isolated_python(BOOT_MAIN, npmobile_site(), module, *args)
