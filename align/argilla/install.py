"""The Argilla server's own virtual environment.

argilla-server 2.8 pins ``click<8.2`` and an older FastAPI stack that clash
with the project's dependencies, so the server, its worker and the
``noida-db`` binary (which stands in for Elasticsearch and Redis) live in a
separate venv: ``.venv-argilla/`` beside the source checkout, or
``$ALIGN_ARGILLA_HOME/venv`` for an installed package (``ALIGN_ARGILLA_VENV``
overrides both). ``make argilla-setup`` and ``align argilla up`` both call
:func:`ensure_server_venv`; a stamp file holding the pins makes a second call
free and a change of pins reinstall.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from align.errors import AlignError

log = logging.getLogger(__name__)

SERVER_REQUIREMENTS = ("argilla-server==2.8.0", "argilla==2.8.0", "click<8.2", "noida-db")
_STAMP = ".align-argilla-stamp"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_home() -> Path:
    """Where the local stack keeps its data, logs and state (survives restarts)."""
    return Path(os.environ.get("ALIGN_ARGILLA_HOME") or Path.home() / ".cache" / "align" / "argilla").expanduser()


def default_venv(home: Path | None = None) -> Path:
    if os.environ.get("ALIGN_ARGILLA_VENV"):
        return Path(os.environ["ALIGN_ARGILLA_VENV"]).expanduser()
    if (_REPO_ROOT / "pyproject.toml").is_file():  # running from a source checkout
        return _REPO_ROOT / ".venv-argilla"
    return (home or default_home()) / "venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_installed(venv: Path) -> bool:
    stamp = venv / _STAMP
    return venv_python(venv).is_file() and stamp.is_file() and stamp.read_text() == "\n".join(SERVER_REQUIREMENTS)


def ensure_server_venv(venv: Path | None = None, *, quiet: bool = True) -> Path:
    """Create the server venv and install the pinned server stack into it, unless already done."""
    venv = venv or default_venv()
    if is_installed(venv):
        return venv
    log.info("installing the Argilla server stack into %s (once; about a minute)", venv)
    pip_quiet = ["--quiet"] if quiet else []
    steps = [[sys.executable, "-m", "venv", str(venv)]] if not venv_python(venv).is_file() else []
    steps.append([str(venv_python(venv)), "-m", "pip", "install", *pip_quiet, *SERVER_REQUIREMENTS])
    for step in steps:
        done = subprocess.run(step, capture_output=quiet, text=True)
        if done.returncode != 0:
            tail = (done.stderr or "")[-2000:] if quiet else ""
            raise AlignError(f"installing the Argilla server into {venv} failed ({' '.join(step[:4])} ...):\n{tail}\n"
                             "check that PyPI is reachable, then run `make argilla-setup` again")
    (venv / _STAMP).write_text("\n".join(SERVER_REQUIREMENTS))
    return venv


def noida_binary(venv: Path) -> Path:
    """The noida-db executable shipped inside its wheel (pip does not keep its exec bit everywhere)."""
    found = sorted(venv.glob("lib/python*/site-packages/noida_db/noida-db"))
    if not found:
        raise AlignError(f"noida-db is not installed in {venv}; run `make argilla-setup`")
    binary = found[0]
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return binary


if __name__ == "__main__":  # `make argilla-setup`
    logging.basicConfig(level=logging.INFO, format="align: %(message)s")
    print(ensure_server_venv())
