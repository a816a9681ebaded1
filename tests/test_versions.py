"""align's hooks into TRL and transformers internals run only on the versions they were tested on."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

from align.versions import ALLOW_UNTESTED_ENV, TESTED_VERSIONS, UntestedVersionError, check_tested_versions


def test_the_installed_trl_and_transformers_are_the_tested_ones() -> None:
    # Fails, naming the package and the tested range, when pip brought another version.
    check_tested_versions()


def test_an_untested_version_stops_a_run_naming_the_package_and_the_range(monkeypatch) -> None:
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    fake = {"trl": "1.17.0", "transformers": "5.24.3"}.__getitem__
    with pytest.raises(UntestedVersionError, match=r"trl 1\.17\.0 is installed, but align was tested with "
                                                   r"trl>=1\.16,<1\.17") as caught:
        check_tested_versions(installed=fake)
    assert "transformers 5.24.3" not in str(caught.value)  # inside the tested range
    with pytest.raises(UntestedVersionError, match=r"transformers 5\.25\.0 is installed"):
        check_tested_versions(installed={"trl": "1.16.2", "transformers": "5.25.0"}.__getitem__)


def test_a_missing_package_is_named_and_the_override_only_warns(monkeypatch, caplog) -> None:
    def missing(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(UntestedVersionError, match="trl is not installed"):
        check_tested_versions(["trl"], installed=missing)
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    with caplog.at_level("WARNING", logger="align.versions"):
        check_tested_versions(installed={"trl": "2.0.0", "transformers": "6.0.0"}.__getitem__)
    assert "trl 2.0.0 is installed" in caplog.text


def test_pyproject_pins_the_ranges_the_check_enforces() -> None:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement).groups()
        pins[name.lower()] = spec.replace(" ", "")
    assert {name: pins[name] for name in TESTED_VERSIONS} == TESTED_VERSIONS


def test_align_and_its_tokenizer_work_without_sentencepiece_or_evaluate(tiny_model_dir: Path) -> None:
    # Neither is a dependency any more: nothing imports them, and SmolLM2's tokenizer is a GPT-2 style BPE.
    code = (
        "import sys; sys.modules['sentencepiece'] = sys.modules['evaluate'] = None\n"
        "import align.train.run, align.eval.stage, align.generate.stage, align.label.stages\n"
        "from align.models import load_tokenizer\n"
        f"tok = load_tokenizer({str(tiny_model_dir)!r})\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True)\n"
        "ids = ids if isinstance(ids, list) else ids['input_ids']\n"
        "assert tok.decode(ids).endswith('<|im_start|>assistant\\n'), tok.decode(ids)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
