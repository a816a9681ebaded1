"""`align train distill` settings: align's own keys plus any TRL ``GKDConfig`` field, by TRL's names.

Flat, as TRL's configs are: ``beta``, ``lmbda``, ``temperature``, ``seq_kd``, ``max_new_tokens``,
``max_length``, ``learning_rate``, ``max_steps`` ... sit beside align's keys (``model``, ``teacher``,
``teacher_system_prompt``, ``data``, ``alpha``, ``lora``). A key that is neither is an error with the
closest valid name.

Meanings that differ from TRL's GKD: ``temperature`` softens both distributions in the loss as well
as sampling (as in TRL's ``DistillationTrainer``), and align's default is 1.0 rather than 0.9, so the
default loss is the plain divergence.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from align.config import StrictConfig, as_number, text_or_file
from align.errors import ConfigError
from align.models import DEFAULT_MODEL
from align.train.config import LoraSettings, LoraSwitch, _check_simple_type, run_defaults
from align.train.distill.losses import SparseTail
from align.versions import check_tested_versions

# GKDConfig fields that align sets from its own keys (a second way to say them would only confuse).
_OWNED_BY_ALIGN = {"teacher_model_init_kwargs": "teacher",
                   "output_dir": "output_dir", "dataset_kwargs": None, "remove_unused_columns": None}


class DistillConfig(LoraSwitch):
    """Everything a distillation run needs. Unknown keys are checked against TRL's ``GKDConfig``."""

    model_config = StrictConfig.model_config | {"extra": "allow"}

    method: Literal["kd"] = Field("kd", description="'kd'; 'dpo' makes it a DPO run with a KD term (see preference)")
    model: str = Field(DEFAULT_MODEL, description="the student")
    teacher: str | None = Field(None, description="teacher model spec; unset: the data's stored top-k log-probs")
    teacher_system_prompt: str | None = Field(None, description="seen by the teacher only: text or @file")
    data: str
    eval_data: str | None = Field(None, description="held-out prompts: KL to the teacher before/after training")
    eval_max_prompts: int | None = Field(None, ge=1, description="use only the first N held-out prompts")
    eval_max_new_tokens: int = Field(64, ge=1, description="length of the greedy answers compared on held-out prompts")
    output_dir: str
    lora: LoraSettings | None = Field(default_factory=LoraSettings, description="null for a full fine-tune")
    alpha: float = Field(0.0, ge=0.0, le=1.0, description="share of hard-label cross-entropy: (1-alpha)*KD + alpha*CE")
    sparse: bool | None = Field(None, description="use the stored top-k log-probs; default: when no teacher is given")
    sparse_tail: SparseTail = Field("bucket", description="the mass outside the teacher's top-k: bucket | renormalize")
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _trl_script_names(cls, data: Any) -> Any:
        """TRL's names (``model_name_or_path``, ``teacher_model_name_or_path``, ``use_peft``...) as align's."""
        from align.train.trl_names import from_trl_names

        return from_trl_names(data, distillation=True) if isinstance(data, dict) else data

    @field_validator("teacher_system_prompt")
    @classmethod
    def _read_system_prompt(cls, value: str | None) -> str | None:
        return text_or_file(value, "system prompt")

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        fields = gkd_fields()
        own = set(type(self).model_fields)
        for key, value in list((self.model_extra or {}).items()):
            value = self.model_extra[key] = as_number(value)  # `learning_rate: 5e-6` in YAML is a string
            if key in _OWNED_BY_ALIGN:
                instead = _OWNED_BY_ALIGN[key]
                raise ValueError(f"'{key}' is set by align" + (f": use '{instead}'" if instead else ""))
            if key not in fields:
                close = difflib.get_close_matches(key, sorted(set(fields) | own), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown key '{key}' for distillation{hint}")
            _check_simple_type(key, value, fields[key])
        if self.uses_stored_logprobs:
            for key in ("lmbda", "seq_kd"):
                if self.trl_overrides.get(key):
                    raise ValueError(f"'{key}' needs completions the stored log-probs do not cover (student or "
                                     "teacher generations): give a teacher model and sparse: false, or set "
                                     f"{key} to 0/false")
        if self.sparse is False and self.teacher is None:
            raise ValueError("'sparse' is false but no 'teacher' is given: name a teacher model")
        return self

    @property
    def uses_stored_logprobs(self) -> bool:
        return self.sparse if self.sparse is not None else self.teacher is None

    @property
    def trl_overrides(self) -> dict[str, Any]:
        """The TRL settings the user gave explicitly."""
        return dict(self.model_extra or {})


def gkd_fields() -> dict[str, Any]:
    from trl.experimental.gkd import GKDConfig

    return {f.name: f.type for f in dataclasses.fields(GKDConfig) if f.init}


def distill_trl_defaults(config: DistillConfig, *, on_gpu: bool, bf16_ok: bool) -> dict[str, Any]:
    """align's defaults over TRL's, each for a reason.

    - ``temperature`` 1.0: it is also the loss temperature here (see the module docstring).
    - ``lmbda`` 0 without a teacher model: stored log-probs cannot score the student's own samples.
    - A LoRA update needs roughly ten times a full fine-tune's learning rate.
    - CPU needs fp32 (``use_cpu``, no bf16); a GPU gets bf16 and TF32.
    - The rest as every align trainer has it (:func:`align.train.config.run_defaults`).
    """
    defaults: dict[str, Any] = {
        **run_defaults(),
        "temperature": 1.0,
        "learning_rate": 1e-4 if config.lora is not None else 1e-5,
    }
    if config.uses_stored_logprobs:
        defaults.update(lmbda=0.0, seq_kd=False)
    if on_gpu:
        defaults.update(bf16=bf16_ok, tf32=True)
    else:
        defaults.update(use_cpu=True, bf16=False)
    return defaults


def build_gkd_args(config: DistillConfig, run_dir: str | Path, *, on_gpu: bool, bf16_ok: bool) -> Any:
    """The TRL ``GKDConfig``: align's defaults, then the user's explicit settings."""
    from trl.experimental.gkd import GKDConfig

    check_tested_versions()  # every distillation run passes here before a model is loaded (align.versions: why)
    args = distill_trl_defaults(config, on_gpu=on_gpu, bf16_ok=bf16_ok)
    args.update(config.trl_overrides)
    args["output_dir"] = f"{run_dir}/checkpoints"
    if isinstance(args.get("report_to"), str):
        args["report_to"] = [args["report_to"]]
    try:
        return GKDConfig(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"TRL rejected the distillation settings: {exc}") from exc
