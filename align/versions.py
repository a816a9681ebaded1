"""The TRL and transformers versions align was tested on, and a check that says so before a run starts.

align reaches under these libraries' public APIs, so a new minor version can change what a run
computes without an error:

- TRL: ``align.train.speedups.ref_cache`` overrides ``_precompute_ref_logps``, ``align.train.heldout``
  ``_compute_loss``, ``align.train.speedups.lm_head`` swaps TRL's fused LM-head kernel, and
  ``align.train.speedups.prefix_sharing`` its collation and forward; distillation subclasses
  ``trl.experimental.gkd``.
- transformers: ``align.generate.decode`` edits ``DynamicCache`` layers in place (select, merge,
  left-pad rows).

pyproject.toml pins the same ranges (a test keeps the two equal). A run on another version stops
with what to install; ``ALIGN_ALLOW_UNTESTED_VERSIONS=1`` runs anyway, with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version

from align.errors import AlignError

log = logging.getLogger(__name__)

# package -> the version range align's private hooks were tested on (as pyproject.toml pins it)
TESTED_VERSIONS = {
    "trl": ">=1.16,<1.17",
    "transformers": ">=5.24,<5.25",
}
ALLOW_UNTESTED_ENV = "ALIGN_ALLOW_UNTESTED_VERSIONS"


class UntestedVersionError(AlignError):
    """An installed library is outside the range align's hooks into its internals were tested on."""


def untested_versions(packages: Iterable[str] = tuple(TESTED_VERSIONS),
                      installed: Callable[[str], str] = version) -> list[str]:
    """One line per package whose installed version is outside its tested range (empty: all tested)."""
    from packaging.specifiers import SpecifierSet

    problems = []
    for name in packages:
        tested = TESTED_VERSIONS[name]
        try:
            found = installed(name)
        except PackageNotFoundError:
            problems.append(f"{name} is not installed (align was tested with {name}{tested})")
            continue
        if found not in SpecifierSet(tested):
            problems.append(f"{name} {found} is installed, but align was tested with {name}{tested}")
    return problems


def check_tested_versions(packages: Iterable[str] = tuple(TESTED_VERSIONS),
                          installed: Callable[[str], str] = version) -> None:
    """Raise :class:`UntestedVersionError` naming each package outside its tested range (see the module docstring)."""
    problems = untested_versions(packages, installed)
    if not problems:
        return
    pins = " ".join(f'"{name}{TESTED_VERSIONS[name]}"' for name in packages)
    message = ("; ".join(problems) + ". align overrides private methods of these libraries, so an untested version "
               f"can compute something else without an error. Install the tested ones (pip install {pins}), "
               f"or set {ALLOW_UNTESTED_ENV}=1 to run anyway.")
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        log.warning("%s", message)
        return
    raise UntestedVersionError(message)
