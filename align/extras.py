"""Optional packages: imported only by the feature that needs them, with one clear error when missing.

align's core (generate, label with rules or a judge, train, eval, the pipeline) runs without them.
``pip install 'align[argilla]'`` adds the Argilla SDK (people labeling: ``align argilla push/pull``,
a pipeline's ``label.argilla`` section); ``pip install 'align[wandb]'`` adds wandb (``report_to:
wandb`` in training and eval). ``make setup`` installs both (the ``dev`` extra pulls them in).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from align.errors import AlignError


class MissingExtra(AlignError):
    """A feature was asked for whose optional package is not installed."""


def require(package: str, feature: str, extra: str | None = None) -> ModuleType:
    """``import package``, or a :class:`MissingExtra` naming ``feature`` and the extra that installs it.

    Only a missing ``package`` itself becomes that error; an installed one that fails to import
    (a broken dependency of its own) raises as it is, so the real cause stays visible.
    """
    extra = extra or package
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != package.split(".")[0]:
            raise
        raise MissingExtra(f"{feature} needs the optional package '{package}', which is not installed: "
                           f"pip install 'align[{extra}]' (in a checkout: pip install -e '.[{extra}]')") from None


def argilla() -> ModuleType:
    """The Argilla SDK (``import argilla as rg``), or the error naming ``align[argilla]``."""
    return require("argilla", "labeling with people in Argilla")


def wandb() -> ModuleType:
    """wandb, or the error naming ``align[wandb]``."""
    return require("wandb", "report_to: wandb")
