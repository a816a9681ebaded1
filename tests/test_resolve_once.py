"""export and DPO+KD's teacher resolve their model spec once and load from that one resolve."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from align.models import ModelError, load_model, load_tokenizer, loading, resolve_model


@pytest.fixture
def resolves(monkeypatch) -> list[str]:
    """Every spec resolve_model is called with, wherever align calls it from."""
    seen: list[str] = []
    real = loading.resolve_model

    def counting(spec: str):
        seen.append(spec)
        return real(spec)

    monkeypatch.setattr(loading, "resolve_model", counting)
    monkeypatch.setattr("align.models.resolve_model", counting)
    monkeypatch.setattr("align.export.merged.resolve_model", counting)
    return seen


def test_export_resolves_the_run_once(tiny_model_dir: Path, tmp_path: Path, resolves: list[str]) -> None:
    from align.export.merged import export_run

    out = export_run(str(tiny_model_dir), tmp_path / "exported")
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    assert resolves == [str(tiny_model_dir)]


def test_dpo_kd_resolves_the_teacher_once_up_front(tiny_model_dir: Path, tmp_path: Path, resolves: list[str],
                                                  monkeypatch) -> None:
    from align.train.distill.preference import PreferenceDistillConfig, train_with_distillation

    calls: list[tuple] = []
    monkeypatch.setattr("align.train.run.train", lambda config, *, resume=False, extra_mixins=(): calls.append(
        extra_mixins))
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    config = PreferenceDistillConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"),
                                     distill_weight=1.0, teacher=str(tiny_model_dir))
    train_with_distillation(config)
    (mixin,) = calls[0]
    settings = mixin.align_distill
    assert resolves == [str(tiny_model_dir)]  # the teacher, once (train() is stubbed: the student is its own)
    assert settings.teacher_source == resolve_model(str(tiny_model_dir))

    # A bad teacher spec fails before train() (and so before any model) is reached.
    with pytest.raises(ModelError, match="does not exist"):
        train_with_distillation(config.model_copy(update={"teacher": str(tmp_path / "no-such-teacher")}))
    assert len(calls) == 1

    # The trainer mixin loads the teacher's tokenizer and weights from that source, resolving nothing again.
    monkeypatch.setattr(loading, "resolve_model", lambda spec: pytest.fail(f"{spec} resolved again"))
    monkeypatch.setattr("align.models.resolve_model", lambda spec: pytest.fail(f"{spec} resolved again"))

    class FakeTrainer:
        def __init__(self) -> None:
            self.model = load_model(settings.teacher_source)
            self.processing_class = load_tokenizer(settings.teacher_source)
            self.accelerator = SimpleNamespace(prepare_model=lambda model, evaluation_mode: model)
            self.data_collator = None

    trainer = type("T", (mixin, FakeTrainer), {})()
    assert trainer.align_teacher.config.vocab_size == 49152
