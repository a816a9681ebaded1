"""DPO plus a knowledge-distillation term on the chosen answers: for teachers whose answers are good
and whose preferences are known.

    loss = DPO loss (TRL's, untouched) + distill_weight * divergence(teacher || student on prompt + chosen)

The divergence is :func:`align.train.distill.losses.dense_divergence` (``distill_beta`` 0 is forward
KL, as in GKD) at ``distill_temperature``, averaged over the chosen answers' tokens, with the teacher
prompted by ``teacher_system_prompt`` and the student by the prompt alone. It costs one more student
forward on the chosen half of the batch and one teacher forward; with ``distill_weight: 0`` nothing is
added, loaded or computed, and the run is a plain `align train dpo` run.

The run itself is `align train dpo`'s (:func:`align.train.run.train`: pre-flight, reference cache,
run dir), with :class:`ChosenDistillMixin` as an extra trainer mixin.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from align.config import text_or_file
from align.train.config import TrainConfig

if TYPE_CHECKING:
    from align.models import ModelSource

log = logging.getLogger(__name__)

TEACHER_COLUMN = "teacher_prompt_ids"
_TEACHER_KEYS = ("teacher_prompts", "teacher_prompt_attention_mask")


class PreferenceDistillConfig(TrainConfig):
    """A DPO config (TRL's DPOConfig keys) plus the KD term's settings."""

    distill_weight: float = Field(0.0, ge=0.0, description="weight of the KD term on the chosen answers (0: plain DPO)")
    teacher: str | None = Field(None, description="teacher model spec (same vocabulary as the student)")
    teacher_system_prompt: str | None = Field(None, description="seen by the teacher only: text or @file")
    distill_beta: float = Field(0.0, ge=0.0, le=1.0, description="GKD's beta: 0 forward KL, 1 reverse KL")
    distill_temperature: float = Field(1.0, gt=0.0)

    @field_validator("teacher_system_prompt")
    @classmethod
    def _read_system_prompt(cls, value: str | None) -> str | None:
        return text_or_file(value, "system prompt")

    @model_validator(mode="after")
    def _check_distill(self) -> "PreferenceDistillConfig":
        if self.distill_weight and not self.teacher:
            raise ValueError("'distill_weight' is set but no 'teacher' is given: name a teacher model")
        if self.distill_weight and self.method != "dpo":
            raise ValueError(f"'distill_weight' with method '{self.method}': the KD term is implemented for DPO "
                             "only; use method: dpo, or align train kto without it")
        return self


@dataclass(frozen=True)
class ChosenDistillSettings:
    weight: float
    teacher: str
    system_prompt: str | None = None
    beta: float = 0.0
    temperature: float = 1.0
    trust_remote_code: bool = False
    teacher_source: ModelSource | None = None  # ``teacher`` resolved once (None: the mixin resolves it)


def teacher_prompt_ids(tokenizer: Any, prompt: Any, system_prompt: str | None) -> list[int]:
    """The prompt as the teacher sees it: chat messages through the template (system prompt first); plain
    text as TRL tokenizes it (no template), the system prompt as a first paragraph."""
    from align.train.distill.tokens import chat_prompt_ids

    if isinstance(prompt, list):
        return chat_prompt_ids(tokenizer, prompt, system_prompt)
    text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    return list(tokenizer(text)["input_ids"])


class _WithTeacherPrompts:
    """Wraps TRL's preference collator: the teacher's prompt ids travel beside its batch, left padded."""

    def __init__(self, inner: Any, pad_token_id: int):
        self.inner = inner
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from align.train.distill.collate import _left

        batch = self.inner([{k: v for k, v in ex.items() if k != TEACHER_COLUMN} for ex in examples])
        if all(TEACHER_COLUMN in ex for ex in examples):
            batch["teacher_prompts"], batch["teacher_prompt_attention_mask"] = _left(
                [list(ex[TEACHER_COLUMN]) for ex in examples], self.pad_token_id)
        return batch


class ChosenDistillMixin:
    """Mixed in before TRL's DPOTrainer: adds ``weight * KD`` on the chosen answers to its loss.

    ``align_distill`` is set on a subclass (see :func:`train_with_distillation`), not in ``__init__``,
    because TRL's ``__init__`` prepares the datasets before a mixin's own ``__init__`` body runs.
    """

    align_distill: ChosenDistillSettings | None = None
    # A mean over the batch's chosen tokens, not over pairs: DPO's micro-batches would weigh it differently.
    align_extra_loss = "KD on the chosen tokens"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        from align.models import load_model, load_tokenizer, resolve_model
        from align.train.distill.tokens import check_same_logit_width, check_same_vocabulary

        trainer: Any = self
        settings = self._settings()
        source = settings.teacher_source or resolve_model(settings.teacher)
        student_name = getattr(trainer.model.config, "name_or_path", "the student")
        check_same_vocabulary(trainer.processing_class,
                              load_tokenizer(source, trust_remote_code=settings.trust_remote_code),
                              student_name=student_name, teacher_name=settings.teacher)
        teacher = load_model(source, merge_adapter=True, trust_remote_code=settings.trust_remote_code)
        teacher.requires_grad_(False).eval()
        check_same_logit_width(trainer.model, teacher, student_name=student_name, teacher_name=settings.teacher)
        trainer.align_teacher = trainer.accelerator.prepare_model(teacher, evaluation_mode=True)
        trainer.data_collator = _WithTeacherPrompts(trainer.data_collator, trainer.processing_class.pad_token_id)

    def _settings(self) -> ChosenDistillSettings:
        if self.align_distill is None:
            raise TypeError("ChosenDistillMixin needs align_distill set on the trainer class")
        return self.align_distill

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)  # type: ignore[misc]
        if TEACHER_COLUMN in dataset.column_names:
            return dataset
        system_prompt = self._settings().system_prompt
        return dataset.map(
            lambda ex: {TEACHER_COLUMN: teacher_prompt_ids(processing_class, ex["prompt"], system_prompt)})

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        trainer: Any = self
        if TEACHER_COLUMN not in trainer._signature_columns:
            trainer._signature_columns = [*trainer._signature_columns, TEACHER_COLUMN]

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        inputs, _ = _split(inputs)
        return super().compute_ref_log_probs(model, inputs)  # type: ignore[misc]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs, teacher_inputs = _split(inputs)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                      num_items_in_batch=num_items_in_batch)
        settings = self._settings()
        if not settings.weight or teacher_inputs is None:
            return result
        divergence = self._chosen_divergence(model, inputs, teacher_inputs)
        trainer: Any = self
        mode = "train" if trainer.model.training else "eval"
        trainer._metrics[mode]["distill/divergence"].append(
            trainer.accelerator.gather_for_metrics(divergence.detach()).mean().item())
        if return_outputs:
            loss, outputs = result
            return loss + settings.weight * divergence, outputs
        return result + settings.weight * divergence

    def _chosen_divergence(self, model: Any, inputs: dict[str, Any], teacher_inputs: dict[str, Any]) -> Any:
        """The divergence on the chosen half of TRL's ``[chosen; rejected]`` batch, averaged over its tokens."""
        import torch

        from align.train.distill.collate import collate
        from align.train.distill.losses import dense_divergence, masked_mean

        trainer: Any = self
        settings = self._settings()
        rows = []
        pairs = inputs["input_ids"].shape[0] // 2
        for i in range(pairs):
            real = inputs["attention_mask"][i].bool()
            answer = inputs["completion_mask"][i].bool()
            rows.append({"prompt_ids": inputs["input_ids"][i][real & ~answer].tolist(),
                         "teacher_prompt_ids": teacher_inputs["teacher_prompts"][i][
                             teacher_inputs["teacher_prompt_attention_mask"][i].bool()].tolist(),
                         "completion_ids": inputs["input_ids"][i][answer].tolist()})
        device = inputs["input_ids"].device
        batch = {k: v.to(device) for k, v in collate(rows, trainer.processing_class.pad_token_id).items()}
        width = batch["completion_ids"].shape[1]
        student_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"], logits_to_keep=width + 1,
                               use_cache=False).logits[:, :-1]
        with torch.no_grad():
            teacher_logits = trainer.align_teacher(
                input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                position_ids=batch["teacher_position_ids"], logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
        divergence = dense_divergence(student_logits, teacher_logits, beta=settings.beta,
                                      temperature=settings.temperature)
        return masked_mean(divergence, batch["completion_mask"])


def _split(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(TRL's batch, the teacher's prompts or None): TRL passes every key it does not know to the model."""
    if not all(k in inputs for k in _TEACHER_KEYS):
        return inputs, None
    return {k: v for k, v in inputs.items() if k not in _TEACHER_KEYS}, {k: inputs[k] for k in _TEACHER_KEYS}


def train_with_distillation(config: PreferenceDistillConfig, *, resume: bool = False) -> Any:
    """`align train dpo` with the KD term; a plain DPO run when ``distill_weight`` is 0."""
    from align.models import resolve_model
    from align.train.run import train

    if not config.distill_weight:
        return train(config, resume=resume)
    assert config.teacher is not None
    # Resolved once, before any model loads (a bad teacher spec fails first); the mixin loads from it.
    settings = ChosenDistillSettings(weight=config.distill_weight, teacher=config.teacher,
                                     system_prompt=config.teacher_system_prompt, beta=config.distill_beta,
                                     temperature=config.distill_temperature,
                                     trust_remote_code=config.trust_remote_code,
                                     teacher_source=resolve_model(config.teacher))
    log.info("DPO + %.3g x KD(teacher %s%s) on the chosen answers", config.distill_weight, config.teacher,
             ", with a system prompt" if config.teacher_system_prompt else "")
    kd_mixin = type("ChosenDistill", (ChosenDistillMixin,), {"align_distill": settings})
    return train(config, resume=resume, extra_mixins=(kd_mixin,))
