"""`align pipeline run` with a train chain: [sft, dpo] runs end to end, the DPO link starts from and is referenced
to the SFT link's weights, a chain killed in its second link carries on without retraining the first, a changed
link reruns itself and the links after it, and single-stage configs keep the settings hashes their run dirs hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from align.data.io import sha256_of
from align.errors import ConfigError
from align.models import load_model, resolve_model
from align.pipeline import check_sections, load_pipeline_config, run_pipeline, stage_settings_hash
from tests.test_pipeline import _config, kill_when_written

REPO = Path(__file__).resolve().parent.parent

# Every stage's settings hash of the shipped single-stage pipeline configs, computed before train took a list.
# A run dir holds these in manifest.json: a changed one reruns that stage (and so every stage after it) once.
SHIPPED_SETTINGS_HASHES = {
    "quickstart.yaml": {"generate": "5702ef5da7a3519ce9657668ff7753ce", "pairs": "1781989f7e09448f1ecff33b0930d87a",
                        "train": "ee36368246d726a681df1e77941b4e15", "eval": "5f43849106edceb902ba0b3433b80152"},
    "pipeline-openai-judge.yaml": {"generate": "dea82e5772d2b066e70040435e889fec",
                                   "pairs": "1781989f7e09448f1ecff33b0930d87a",
                                   "train": "efbbdd0e4e143db221e6445cc5053131",
                                   "eval": "35a3bda25526842738bdd6eeed1d0929"},
    "pipeline-qwen-dpo.yaml": {"generate": "05143c96e59893850b694301721c2b2f",
                               "pairs": "0ba4a59c3c1eedee5f3133b9d9f7e827",
                               "train": "7ebd47393cbcf9a261e20ceae21b0dba", "eval": "68fe179f66367d23ec82dabdbd61053a"},
    "pipeline-qwen-kto.yaml": {"generate": "05143c96e59893850b694301721c2b2f",
                               "pairs": "0ba4a59c3c1eedee5f3133b9d9f7e827",
                               "train": "249f84582d0516704a931150ea6e1317", "eval": "68fe179f66367d23ec82dabdbd61053a"},
}

_SFT = {"method": "sft", "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 2, "max_length": 96}
_DPO = {"method": "dpo", "max_steps": 6, "save_steps": 2, "per_device_train_batch_size": 2, "max_length": 96}


def _chain_config(tmp_path: Path, tiny_model_dir: Path, *links: dict[str, Any], **eval_settings: Any) -> Path:
    """test_pipeline's config (tiny model, rules) with ``links`` as its train chain, the first from the tiny model."""
    path = _config(tmp_path, tiny_model_dir)
    config = yaml.safe_load(path.read_text())
    cache = config["train"]["ref_cache_dir"]
    config["train"] = [{**links[0], "model": str(tiny_model_dir), "ref_cache_dir": cache},
                       *({**link, "ref_cache_dir": cache} for link in links[1:])]
    config["eval"].update(eval_settings)
    path.write_text(yaml.safe_dump(config))
    return path


def _state(model: Any) -> dict[str, Any]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_an_sft_then_dpo_chain_starts_the_dpo_link_from_the_sft_weights_and_references_them(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    config = load_pipeline_config(_chain_config(tmp_path, tiny_model_dir, _SFT, _DPO, intermediate=True))
    run, train = tmp_path / "run", tmp_path / "run" / "train"
    first = run_pipeline(config)
    assert first.ran == ["generate", "label", "pairs", "select", "train", "eval"]
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    sft, dpo = stages["train/1-sft"], stages["train/2-dpo"]
    assert sft["status"] == dpo["status"] == "done"
    # Each link trained on its own data: the SFT rows select wrote, the pairs.
    assert stages["select"]["outputs"] == {"sft": str(run / "sft.jsonl")}
    assert sft["inputs"] == {"data": sha256_of(run / "sft.jsonl")}
    assert sft["outputs"] == {"weights": str(train / "1-sft" / "adapter"), "run_dir": str(train / "1-sft")}
    assert sft["summary"]["steps"] == 4 and sft["summary"]["reference_model"] is None

    # The DPO link started from the SFT link's weights: its run dir, no merged copy of it ...
    sft_run = train / "1-sft"
    assert dpo["inputs"] == {"data": sha256_of(run / "pairs.jsonl"), "start": sha256_of(sft_run / "adapter")}
    assert dpo["summary"]["started_from"] == str(sft_run)
    assert yaml.safe_load((train / "2-dpo" / "config.yaml").read_text())["model"] == str(sft_run)
    assert json.loads((train / "2-dpo" / "run.json").read_text())["started_from"]["adapters"] == [
        str(sft_run / "adapter")]
    assert not (sft_run / "merged").exists()
    sft_model = _state(load_model(str(sft_run), merge_adapter=True, device="cpu"))
    assert any(not torch.equal(sft_model[name], tensor)
               for name, tensor in _state(load_model(str(tiny_model_dir))).items()), "SFT changed nothing"
    # ... and its reference is that SFT model: the manifest, the log line and the run say so.
    assert dpo["summary"]["reference_model"] == str(sft_run)
    assert "1-sft" in dpo["summary"]["reference"]
    assert str(sft_run) in json.loads((train / "2-dpo" / "run.json").read_text())["reference"]
    assert [link["reference_model"] for link in first.links] == [None, str(sft_run)]
    # Its adapter loads on top of the SFT weights, not the original model's.
    dpo_source = resolve_model(str(train / "2-dpo"))
    assert (dpo_source.path, dpo_source.base_adapters) == (str(tiny_model_dir), (str((sft_run / "adapter").resolve()),))

    # Eval scored the last link, and with intermediate: true the SFT link, each against the original model.
    assert resolve_model(first.eval_metrics["model"]).adapter == str(train / "2-dpo" / "adapter")
    assert first.eval_metrics["reference"] == str(tiny_model_dir)
    assert list(first.intermediate) == ["1-sft"]
    assert resolve_model(first.intermediate["1-sft"]["model"]).adapter == str(train / "1-sft" / "adapter")
    assert first.intermediate["1-sft"]["reference"] == str(tiny_model_dir)
    assert stages["eval"]["outputs"]["1-sft/metrics"] == str(run / "eval" / "1-sft" / "metrics.json")
    shared = str(run / "eval" / "responses_original.jsonl")  # both compared with the same reference answers
    assert stages["eval"]["outputs"]["answers_reference"] == stages["eval"]["outputs"]["1-sft/answers_reference"] \
        == shared

    # A changed DPO link reruns alone; a changed SFT link reruns itself and the DPO link after it.
    sft_finished = sft["finished"]
    dpo_changed = run_pipeline(load_pipeline_config(_chain_config(tmp_path, tiny_model_dir, _SFT,
                                                                  {**_DPO, "beta": 0.2}, intermediate=True)))
    assert dpo_changed.ran == ["train", "eval"]
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["train/1-sft"]["finished"] == sft_finished
    assert stages["train/2-dpo"]["finished"] > sft_finished
    dpo_finished = stages["train/2-dpo"]["finished"]
    sft_changed = run_pipeline(load_pipeline_config(_chain_config(tmp_path, tiny_model_dir, {**_SFT, "max_steps": 2},
                                                                  {**_DPO, "beta": 0.2}, intermediate=True)))
    assert sft_changed.ran == ["train", "eval"]
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["train/1-sft"]["summary"]["steps"] == 2 and stages["train/1-sft"]["finished"] > dpo_finished
    assert stages["train/2-dpo"]["finished"] > stages["train/1-sft"]["finished"]
    assert stages["train/2-dpo"]["inputs"]["start"] == sha256_of(train / "1-sft" / "adapter")


@pytest.mark.reliability
def test_a_chain_killed_in_its_second_link_carries_on_without_retraining_the_first(tiny_model_dir: Path,
                                                                                   tmp_path: Path) -> None:
    config = _chain_config(tmp_path, tiny_model_dir, _SFT, {**_DPO, "max_steps": 10})
    run, train = tmp_path / "run", tmp_path / "run" / "train"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "align", "pipeline", "run", str(config)]
    kill_when_written(cmd, env, train / "2-dpo" / "checkpoints" / "checkpoint-4" / "trainer_state.json")
    before = json.loads((run / "manifest.json").read_text())["stages"]
    assert before["train/1-sft"]["status"] == "done" and before["train/2-dpo"]["status"] == "running"
    assert before["train"]["status"] == "running"
    sft_weights = train / "1-sft" / "adapter" / "adapter_model.safetensors"
    sft_mtime = sft_weights.stat().st_mtime_ns

    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert after["train/1-sft"] == before["train/1-sft"], "the finished SFT link was retrained"
    assert sft_weights.stat().st_mtime_ns == sft_mtime
    assert after["train/2-dpo"]["status"] == after["train"]["status"] == after["eval"]["status"] == "done"
    assert after["train/2-dpo"]["summary"]["steps"] == 10
    # It carried on from the checkpoint rather than starting the link over.
    log = [json.loads(line) for line in (train / "2-dpo" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in log if "loss" in row}) == list(range(1, 11))
    assert "skipped (up to date): generate, label, pairs, select" in done.stdout
    assert f"train link 2-dpo: from {train / '1-sft'}; reference: the 1-sft link's model" in done.stdout

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "stages run: none" in again.stdout


def test_single_stage_configs_keep_their_settings_hashes() -> None:
    for name, expected in SHIPPED_SETTINGS_HASHES.items():
        config = load_pipeline_config(REPO / "configs" / name)
        assert {stage: stage_settings_hash(config, stage) for stage in expected} == expected, name


def test_the_pairs_cap_reruns_all_pairs_only() -> None:
    """The per-prompt cap (a default since 8 candidates) changes what all-pairs writes, not best-worst's pairs."""
    quickstart = REPO / "configs" / "quickstart.yaml"  # best-worst
    best_worst = stage_settings_hash(load_pipeline_config(quickstart), "pairs")
    assert stage_settings_hash(load_pipeline_config(quickstart, ["pairs.max_pairs_per_prompt=2"]),
                               "pairs") == best_worst
    every = stage_settings_hash(load_pipeline_config(quickstart, ["pairs.strategy=all-pairs"]), "pairs")
    capped = stage_settings_hash(load_pipeline_config(quickstart, ["pairs.strategy=all-pairs",
                                                                   "pairs.max_pairs_per_prompt=2"]), "pairs")
    assert len({best_worst, every, capped}) == 3


def test_the_shipped_chain_config_validates_with_an_sft_then_a_dpo_link() -> None:
    config = load_pipeline_config(REPO / "configs" / "pipeline-sft-dpo.yaml", ["train.1.max_steps=3"])
    check_sections(config)
    assert [link["method"] for link in config.train] == ["sft", "dpo"] and config.train[1]["max_steps"] == 3


@pytest.mark.parametrize(("train", "eval_settings", "message"), [
    ([], {}, r"section 'train': the list of stages is empty"),
    ([{"method": "sft"}, {"method": "dpx"}], {}, r"section 'train': link 2 of the chain: .*method"),
    ([{"method": "sft"}, {"max_steps": 2}], {}, r"link 2 of the chain: 'method' is required"),
    ([{"method": "sft"}, {"method": "dpo", "model": "m"}], {}, r"link 2 of the chain: 'model' is set"),
    ([{"method": "sft"}, {"method": "dpo", "reference": "/no/such/model"}], {},
     r"link 2 of the chain: 'reference' cannot be resolved"),
    ([{"method": "sft"}, {"method": "orpo", "reference": "bundled:smollm2-135m-instruct"}], {},
     r"link 2 of the chain: .*ORPO uses no reference"),
    ({"method": "dpo"}, {"intermediate": True}, r"section 'eval': 'intermediate: true' .* train is one stage"),
])
def test_a_bad_chain_is_refused_before_anything_runs(train: Any, eval_settings: dict[str, Any], message: str,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": train, "generate": {"prompts": "p.jsonl"},
                                    "eval": {"prompts": "p.jsonl", "judge": "r.yaml", **eval_settings}}))
    with pytest.raises(ConfigError, match=message):
        run_pipeline(load_pipeline_config(path))
    assert not (tmp_path / "run").exists()


def test_a_select_section_without_an_sft_link_says_it_is_unused(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import align.pipeline.run

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "select": {"top_k": 2},
                                    "generate": {"prompts": str(tmp_path / "missing.jsonl")},
                                    "train": {"method": "dpo"}, "eval": {"prompts": "p.jsonl", "judge": "r.yaml"}}))
    monkeypatch.setattr(align.pipeline.run, "_generate", lambda *_: pytest.fail("generate ran"))
    with caplog.at_level("WARNING", logger="align.pipeline"), pytest.raises(ConfigError, match="does not exist"):
        run_pipeline(load_pipeline_config(path))
    assert "no train link is SFT" in caplog.text


def test_an_override_of_a_chain_names_the_link_by_its_index() -> None:
    path = REPO / "configs" / "pipeline-sft-dpo.yaml"
    with pytest.raises(ConfigError, match=r"train is a list of 2; name an item by its index from 0, "
                                          r"e\.g\. train\.0\.max_steps"):
        load_pipeline_config(path, ["train.max_steps=3"])
