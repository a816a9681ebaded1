"""The pipeline's label section is the label stage's own settings type: every judge setting can be set from a
pipeline config and reaches the judge, and the shipped configs keep the settings hash their run dirs hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from align.data.validate import load_records
from align.label.judge import JudgeSettings, LocalBackend
from align.label.stages import label_judge
from align.pipeline import _label, load_pipeline_config, stage_settings_hash
from tests.test_label_judge import PROMPT, X, Y, write_candidates

REPO = Path(__file__).resolve().parent.parent

# The label stage's settings hashes of the shipped pipeline configs, computed before the label section took the
# label stage's settings type (scale, rubric, tie_margin, ...). A run dir holds its hash in manifest.json: a
# changed one relabels every existing run once.
SHIPPED_LABEL_HASHES = {
    "quickstart.yaml": "6f805dd8fec864810fa39fb2a991e481",
    "pipeline-openai-judge.yaml": "42ddeee9b532f2e4050f9ecfbe18e2ea",
    "pipeline-qwen-dpo.yaml": "32fea80c334efb3395451d41579e3b72",
    "pipeline-qwen-kto.yaml": "32fea80c334efb3395451d41579e3b72",
    "pipeline-sft-dpo.yaml": "6f805dd8fec864810fa39fb2a991e481",  # the quickstart's label settings
    "quickstart-rounds.yaml": "6f805dd8fec864810fa39fb2a991e481",  # the quickstart's label settings (round 1's)
}


def test_the_shipped_pipeline_configs_keep_their_label_stage_hash() -> None:
    shipped = {path.name for path in (REPO / "configs").glob("*.yaml") if "run_dir" in path.read_text()}
    assert shipped == set(SHIPPED_LABEL_HASHES), "a pipeline config was added or removed: pin its label hash"
    for name, expected in SHIPPED_LABEL_HASHES.items():
        assert stage_settings_hash(load_pipeline_config(REPO / "configs" / name), "label") == expected, name
    # The settings that were there before keep their hashes too when set (computed then as well).
    quickstart = REPO / "configs" / "quickstart.yaml"
    assert stage_settings_hash(load_pipeline_config(quickstart, ["label.mode=pointwise"]),
                               "label") == "d9c285db6f96b1df6674358b5b94a1b9"
    people = ["label.argilla.dataset=d", "label.argilla.target=3"]
    assert stage_settings_hash(load_pipeline_config(quickstart, people), "label") == "791cc01ff028d3687292e4e7c5c6e8eb"


def test_a_judge_setting_changes_the_label_hash_and_a_speed_setting_or_a_default_does_not() -> None:
    quickstart = REPO / "configs" / "quickstart.yaml"
    base = stage_settings_hash(load_pipeline_config(quickstart), "label")
    for judge_setting in ("label.scale=good-bad", "label.rubric=Be brief.", "label.tie_margin=0.1",
                          "label.length_penalty=0.5", "label.rules_margin=0.3", "label.max_response_tokens=64"):
        assert stage_settings_hash(load_pipeline_config(quickstart, [judge_setting]), "label") != base, judge_setting
    for same in ("label.concurrency=16", "label.batch_size=2", "label.tie_margin=0.05", "label.scale=10"):
        assert stage_settings_hash(load_pipeline_config(quickstart, [same]), "label") == base, same


def test_a_pipeline_config_bad_judge_setting_is_refused_with_its_field(tmp_path: Path) -> None:
    from align.errors import ConfigError

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "label": {"scale": "five"}}))
    with pytest.raises(ConfigError, match="scale"):
        load_pipeline_config(config)


def test_the_pipeline_labels_as_the_judge_stage_does_with_every_judge_setting_from_its_config(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    candidates = write_candidates(tmp_path / "c.jsonl", {"p": (PROMPT, [X, Y]), "q": ("Say hi.", ["Hi!"])})
    (tmp_path / "rubric.txt").write_text("Prefer short, correct answers.\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: short\n    max_chars: 40\n")
    label = {"judge_model": str(tiny_model_dir), "rules": str(rules), "mode": "pointwise", "scale": "good-bad",
             "rubric": f"@{tmp_path / 'rubric.txt'}", "tie_margin": 0.1, "length_penalty": 0.5,
             "rules_margin": 0.3, "max_response_tokens": 64, "batch_size": 2}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "label": label}))
    output = _label(load_pipeline_config(path), candidates, tmp_path / "pipeline.jsonl")
    assert output.files == {"judgements": tmp_path / "pipeline.jsonl"}

    # The same labeling straight through the judge stage, every setting given by hand.
    settings = JudgeSettings(mode="pointwise", scale="good-bad", rubric="Prefer short, correct answers.",
                             tie_margin=0.1, length_penalty=0.5)
    label_judge(candidates, tmp_path / "stage.jsonl", backend=LocalBackend(str(tiny_model_dir), batch_size=2,
                                                                           max_response_tokens=64),
                settings=settings, rules_path=rules, rules_margin=0.3, progress=False)
    by_pipeline = load_records(tmp_path / "pipeline.jsonl", "judgements")
    by_stage = load_records(tmp_path / "stage.jsonl", "judgements")
    assert len(by_pipeline) == 3 and all(j.label in ("good", "bad") for j in by_pipeline)  # scale reached it
    # The judge's config hash covers mode, scale, rubric, tie_margin, length_penalty and rules_margin.
    assert {j.judge.config_hash for j in by_pipeline} == {j.judge.config_hash for j in by_stage}
    assert [(j.id, j.label, j.score) for j in by_pipeline] == [(j.id, j.label, j.score) for j in by_stage]
