"""argilla and wandb are optional extras: the core imports without them, and asking for one says what to install."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from align import extras
from align.extras import MissingExtra

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_argilla(monkeypatch):
    # A None entry makes `import argilla` (and any argilla.* submodule) fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "argilla", None)


@pytest.fixture
def no_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)


ARGILLA_HINT = r"labeling with people in Argilla needs the optional package 'argilla'.*pip install 'align\[argilla\]'"
WANDB_HINT = r"report_to: wandb needs the optional package 'wandb'.*pip install 'align\[wandb\]'"


def test_argilla_without_its_package_names_the_extra(no_argilla) -> None:
    from align.argilla.push import to_record
    from align.argilla.schema import dataset_settings
    from align.argilla.settings import ArgillaSettings, connect

    with pytest.raises(MissingExtra, match=ARGILLA_HINT):
        connect(ArgillaSettings(api_url="http://127.0.0.1:9", api_key="k"))
    with pytest.raises(MissingExtra, match=ARGILLA_HINT):
        dataset_settings("pairwise", responses=2)
    with pytest.raises(MissingExtra, match=ARGILLA_HINT):
        to_record(None)  # the SDK is needed before the item is read


def test_report_to_wandb_without_its_package_names_the_extra(no_wandb, tmp_path) -> None:
    from align.eval.stage import _log_wandb
    from align.train.tracking import configure_wandb

    assert configure_wandb([], str(tmp_path)) is None  # not asked for: nothing imported, no error
    with pytest.raises(MissingExtra, match=WANDB_HINT):
        configure_wandb(["wandb"], str(tmp_path))  # the run recorder calls it before any model loads
    with pytest.raises(MissingExtra, match=WANDB_HINT):
        _log_wandb(None, {}, tmp_path)


def test_an_installed_extra_that_fails_to_import_keeps_its_own_error(monkeypatch, tmp_path) -> None:
    # A broken dependency inside an installed package is not "install align[...]": the real cause shows.
    (tmp_path / "fake_extra").mkdir()
    (tmp_path / "fake_extra" / "__init__.py").write_text("import align_no_such_module_\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="align_no_such_module_"):
        extras.require("fake_extra", "a feature")


def test_the_core_and_the_argilla_modules_import_without_the_extras() -> None:
    code = ("import sys; sys.modules['argilla'] = None; sys.modules['wandb'] = None\n"
            "import align.argilla.push, align.argilla.pull, align.argilla.loop, align.train.tracking, align.cli\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_pyproject_declares_the_extras_and_dev_installs_them() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]]
    assert "argilla" not in names and "wandb" not in names and "lm-eval" not in names
    optional = project["optional-dependencies"]
    assert [d for d in optional["argilla"] if d.startswith("argilla")] and [d for d in optional["wandb"]
                                                                            if d.startswith("wandb")]
    assert [d for d in optional["harness"] if d.startswith("lm-eval")]
    assert "align[argilla,wandb,harness]" in optional["dev"]  # `make setup` installs .[dev]: the tests use all three
