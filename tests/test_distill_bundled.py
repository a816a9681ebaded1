"""The done-when on the real bundled model: context distillation lowers the student's KL to the prompted teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

import align.train.distill

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_context_distillation_lowers_the_held_out_kl_to_the_prompted_teacher(bundled_model: str, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    result = align.train.distill.distill(
        REPO / "configs" / "distill.yaml", output_dir=str(tmp_path / "run"), max_steps=2, lmbda=0.0,
        per_device_train_batch_size=2, max_new_tokens=16, eval_max_prompts=3, eval_max_new_tokens=16,
        learning_rate=5e-4, save_strategy="no")
    before, after = result.eval_before, result.eval_after
    assert before["tokens"] == after["tokens"] > 0
    assert before["kl_per_token"] > 0.01  # the constitution changes the bundled model's distributions
    assert after["kl_per_token"] < before["kl_per_token"]
    assert (Path(result.run_dir) / "adapter" / "adapter_config.json").exists()
