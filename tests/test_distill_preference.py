"""DPO plus a KD term on the chosen answers: TRL's DPO loss untouched, the term added with its weight."""

from __future__ import annotations

from pathlib import Path

import pytest

import align.train.distill
from align.data.io import iter_rows, write_records
from align.errors import ConfigError
from tests.clihelp import run_align


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from align.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=1)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    topics = ["tea", "rain", "maps", "bread", "chess", "owls", "salt", "moss"]
    write_records(path, [{"prompt": [{"role": "user", "content": f"One fact about {t}?"}],
                          "chosen": [{"role": "assistant", "content": f"{t.capitalize()} is old."}],
                          "rejected": [{"role": "assistant", "content": f"No idea about {t}, sorry, " * 2}]}
                         for t in topics])
    return path


def _losses(run_dir: str) -> list[dict]:
    return [row for _, row in iter_rows(Path(run_dir) / "metrics.jsonl") if "loss" in row]


def test_the_kd_term_is_added_to_the_untouched_dpo_loss(tiny_model_dir: Path, teacher_dir: Path, pairs_file: Path,
                                                        tmp_path: Path) -> None:
    common = {"model": str(tiny_model_dir), "data": str(pairs_file), "ref_cache_dir": str(tmp_path / "cache"),
              "max_steps": 2, "per_device_train_batch_size": 2, "max_length": 96}
    plain = align.train.dpo(output_dir=str(tmp_path / "dpo"), **common)
    same = align.train.distill.distill(method="dpo", output_dir=str(tmp_path / "w0"), distill_weight=0.0, **common)
    weight = 2.0
    with_kd = align.train.distill.distill(method="dpo", output_dir=str(tmp_path / "w2"), distill_weight=weight,
                                          teacher=str(teacher_dir), teacher_system_prompt="Be brief.", **common)
    plain_steps, same_steps, kd_steps = _losses(plain.run_dir), _losses(same.run_dir), _losses(with_kd.run_dir)
    assert [m["loss"] for m in same_steps] == [m["loss"] for m in plain_steps]  # weight 0: plain DPO, bit for bit
    assert "distill/divergence" not in same_steps[0]
    # step 1 sees the same weights in both runs: the difference is exactly weight x the logged divergence
    divergence = kd_steps[0]["distill/divergence"]
    assert divergence > 0
    assert kd_steps[0]["loss"] - plain_steps[0]["loss"] == pytest.approx(weight * divergence, rel=1e-4)
    assert kd_steps[0]["rewards/margins"] == pytest.approx(plain_steps[0]["rewards/margins"], abs=1e-6)
    assert (Path(with_kd.run_dir) / "adapter" / "adapter_config.json").exists()
    # the student's own starting weights as an unprompted teacher: the term starts at zero, so the student's and
    # the teacher's logits line up token for token on the chosen answers
    itself = align.train.distill.distill(method="dpo", output_dir=str(tmp_path / "self"), distill_weight=weight,
                                         teacher=str(tiny_model_dir), **common)
    assert _losses(itself.run_dir)[0]["distill/divergence"] == pytest.approx(0.0, abs=1e-6)


def test_the_kd_term_needs_a_teacher_and_dpo(pairs_file: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="'distill_weight' is set but no 'teacher' is given"):
        align.train.distill.load_distill_config({"method": "dpo", "data": str(pairs_file), "output_dir": "x",
                                                 "distill_weight": 0.5})
    with pytest.raises(ConfigError, match="the KD term is implemented for DPO only"):
        align.train.distill.load_distill_config({"method": "kto", "data": str(pairs_file), "output_dir": "x",
                                                 "distill_weight": 0.5, "teacher": "bundled:smollm2-135m-instruct"})
    config = tmp_path / "dpo-kd.yaml"
    config.write_text(f"method: dpo\ndata: {pairs_file}\noutput_dir: {tmp_path / 'never'}\ndistill_wieght: 0.5\n")
    code, _, err = run_align(capsys, "train", "distill", "--config", config)
    assert code != 0 and "unknown key 'distill_wieght' for DPO (did you mean 'distill_weight'?)" in err
