"""Training configs: align's own settings plus any field of TRL's config for the method, by TRL's names.

Methods: ``dpo`` and ``kto`` (against a frozen reference), ``sft`` (``SFTConfig``), and the reference-free
preference losses ``orpo`` (``trl.experimental.orpo.ORPOConfig``) and ``simpo`` (``trl.experimental.cpo.CPOConfig``
with SimPO's loss).

A config is flat, as TRL's are: ``beta``, ``loss_type``, ``max_length``,
``learning_rate``, ``max_steps``, ``per_device_train_batch_size`` ... sit beside
align's keys (``model``, ``data``, ``reference``, ``lora``). A key that is
neither is an error with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from align.config import StrictConfig, as_number
from align.errors import ConfigError
from align.models import DEFAULT_MODEL
from align.versions import check_tested_versions

log = logging.getLogger(__name__)

Method = Literal["dpo", "kto", "sft", "orpo", "simpo"]
# Methods trained against a frozen reference model (the KL anchor). SFT, ORPO and SimPO use none: nothing of a
# reference is loaded, computed or cached for them.
REFERENCE_METHODS = frozenset({"dpo", "kto"})


class LoraSettings(StrictConfig):
    """peft LoRA settings (names as in ``peft.LoraConfig``). ``quantize: 4bit`` makes it QLoRA (GPU only)."""

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    quantize: Literal["4bit"] | None = None

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM")


class LoraSwitch(StrictConfig):
    """A config with a ``lora`` field that also takes ``lora: false`` / ``lora: true``, the natural ways to say it
    on a command line (false: a full fine-tune; true: the default LoRA settings)."""

    @model_validator(mode="before")
    @classmethod
    def _lora_switch(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("lora"), bool):
            data = {**data, "lora": {} if data["lora"] else None}
        return data


class TrainConfig(LoraSwitch):
    """Everything a training run needs (DPO, KTO, SFT, ORPO, SimPO). Unknown keys are checked against TRL's config
    for the method."""

    model_config = StrictConfig.model_config | {"extra": "allow"}

    method: Method = "dpo"
    model: str = DEFAULT_MODEL
    data: str
    split: str = Field("train", description="the split to train on when data is a dataset folder or a hub id")
    limit: PositiveInt | None = Field(None, description="train on the first N rows of data only")
    eval_data: str | None = None
    eval_data_split: str = Field("train", description="the split of eval_data when it is a dataset folder or a hub id")
    eval_split: float | Literal["auto"] = Field(
        "auto", description="fraction of the prompts held out (prompt-disjoint) for reward accuracy before/after "
        "training; 0: none. auto: 0.2 when the data has at least 20 distinct prompts, none otherwise "
        "(align.train.data.AUTO_EVAL_MIN_PROMPTS); eval_data, when given, is used instead")
    output_dir: str
    reference: str = Field("base", description="'base' (the student's starting weights) or a model/run spec")
    lora: LoraSettings | None = Field(default_factory=LoraSettings, description="null for a full fine-tune")
    ref_cache: bool = True
    ref_cache_dir: str | None = None
    preflight: bool = True
    prefix_sharing: bool = Field(True, description="DPO: compute each pair's shared prompt once (same math)")
    lean_lm_head: bool = Field(True, description="log-probs of completion tokens only, in small LM-head tiles "
                               "(devices without Triton, e.g. CPU; same math as TRL's fused head)")
    # Off by default: it trades time for memory, and on a 2-core CPU a LoRA DPO step of 4 pairs took
    # 57-68 s with it against 21-28 s without (same losses). Turn it on when memory is what runs out.
    selective_recompute: bool | None = Field(
        False, description="keep only matmul/attention outputs of each decoder layer and recompute the rest in the "
        "backward pass (same math, less memory, slower steps); null: on for CPU, off on GPU")
    micro_batch_size: PositiveInt | Literal["auto"] | None = Field(
        "auto", description="DPO and SFT: pairs (SFT: rows) per forward/backward pass; the optimizer still steps on "
        "per_device_train_batch_size of them (gradient accumulation, same math). auto: 1 on CPU, where one pair "
        "already keeps the cores busy and a smaller batch means less activation memory and padding; the whole "
        "batch on a GPU. null: the whole batch")
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _trl_script_names(cls, data: Any) -> Any:
        """TRL's CLI names (``model_name_or_path``, ``dataset_name``, ``use_peft``, ``lora_r``...) as align's."""
        from align.train.trl_names import from_trl_names

        return from_trl_names(data) if isinstance(data, dict) else data

    @field_validator("eval_split", mode="before")
    @classmethod
    def _check_eval_split(cls, value: Any) -> Any:
        if value == "auto":
            return value
        number = as_number(value)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number < 1:
            raise ValueError("must be 'auto' or a fraction of the prompts in [0, 1) (0: none held out)")
        return float(number)

    @model_validator(mode="after")
    def _check_trl_keys(self) -> "TrainConfig":
        fields = trl_fields(self.method)
        own = set(type(self).model_fields)
        for key, value in list((self.model_extra or {}).items()):
            value = self.model_extra[key] = as_number(value)  # `learning_rate: 5e-6` in YAML is a string
            if key not in fields:
                close = difflib.get_close_matches(key, sorted(set(fields) | own), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown key '{key}' for {self.method.upper()}{hint}")
            _check_simple_type(key, value, fields[key])
        if self.method not in REFERENCE_METHODS and self.reference != "base":
            raise ValueError(f"'reference' is set, but {self.method.upper()} uses no reference model: remove it "
                             "(DPO and KTO take one)")
        if self.method == "simpo" and self.trl_overrides.get("loss_type", "simpo") != "simpo":
            raise ValueError("method simpo is TRL's CPO trainer with loss_type simpo; remove loss_type (CPO's other "
                             "losses are not offered)")
        return self

    @property
    def trl_overrides(self) -> dict[str, Any]:
        """The TRL settings the user gave explicitly."""
        return dict(self.model_extra or {})


def trl_classes(method: str) -> tuple[type, type]:
    """(TRL's config class, TRL's trainer class) for ``method``; SimPO is CPO's, with its ``simpo`` loss."""
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOConfig, CPOTrainer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    return {"dpo": (DPOConfig, DPOTrainer), "kto": (KTOConfig, KTOTrainer), "sft": (SFTConfig, SFTTrainer)}[method]


def trl_config_class(method: str) -> type:
    return trl_classes(method)[0]


def trl_trainer_class(method: str) -> type:
    return trl_classes(method)[1]


def trl_fields(method: str) -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(trl_config_class(method)) if f.init}


# DPO losses that are a mean of per-pair terms: for these a batch split into micro-batches whose losses are
# averaged (what gradient accumulation does) gives the batch's loss and gradient. The others look across the
# batch (aot sorts it, bco_pair keeps a running mean, sft averages over tokens).
PER_PAIR_DPO_LOSSES = frozenset({"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "sppo_hard",
                                 "apo_zero", "apo_down", "discopop", "sigmoid_norm"})
# DPO losses that average over the batch's chosen tokens (TRL's sft) but stay exact under micro-batches:
# align.train.speedups.micro_batches scales each pass's term by the whole batch's token count. Not with
# use_weighting, which multiplies the term by the batch's mean pair weight.
TOKEN_MEAN_DPO_LOSSES = frozenset({"sft"})
# The TRL config attribute on which build_trl_args tells the trainer how many passes make up one of TRL's
# batches (align.train.speedups.micro_batches reads it); not a config field, so not in trl_args.json.
PASSES_PER_BATCH_ATTR = "align_passes_per_batch"


def micro_batches(batch_size: int, accumulation: int, micro: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) that run ``batch_size * accumulation`` examples per optimizer step
    in passes of ``micro``; unchanged when ``micro`` does not divide the batch."""
    if micro <= 0 or micro >= batch_size or batch_size % micro:
        return batch_size, accumulation
    return micro, accumulation * (batch_size // micro)


def resolve_micro_batch(config: TrainConfig, args: dict[str, Any], *, on_gpu: bool,
                        extra_loss: str | None = None) -> int | None:
    """The micro-batch size to split each DPO batch into, or None to keep TRL's batches as they are.

    ``extra_loss`` names a term added to TRL's loss that is not a mean of per-pair terms (e.g. a KD term
    averaged over the batch's tokens): micro-batches would change it too. TRL's ``sft`` term is a token mean
    too, but align's trainer keeps it exact (:data:`TOKEN_MEAN_DPO_LOSSES`), except with ``use_weighting``.
    """
    setting = config.micro_batch_size
    if setting is None or config.method not in ("dpo", "sft"):
        return None
    if setting == "auto":
        if on_gpu:
            return None
        setting = 1
    if config.method == "sft":
        return _sft_micro_batch(config, args, int(setting))
    loss_types = args.get("loss_type", "sigmoid")
    loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    exact = PER_PAIR_DPO_LOSSES | (frozenset() if args.get("use_weighting") else TOKEN_MEAN_DPO_LOSSES)
    not_per_pair = [t if t not in TOKEN_MEAN_DPO_LOSSES else f"{t} with use_weighting"
                    for t in loss_types if t not in exact] + ([extra_loss] if extra_loss else [])
    if not_per_pair:
        if config.micro_batch_size != "auto":
            raise ConfigError(f"micro_batch_size: the loss ({', '.join(not_per_pair)}) is not a mean of per-pair "
                              "terms, so micro-batches would change it; remove micro_batch_size")
        return None
    return int(setting)


# SFT losses that TRL sums over tokens and divides by the whole batch's count of them (``num_items_in_batch``,
# which transformers' Trainer counts across all passes of an optimizer step): exact under micro-batches.
TOKEN_SUM_SFT_LOSSES = frozenset({"nll", "dft"})


def _sft_micro_batch(config: TrainConfig, args: dict[str, Any], setting: int) -> int | None:
    """SFT's micro-batch size: TRL's nll/dft loss is already a mean over the whole batch's tokens (label smoothing
    takes another path, a mean per pass)."""
    loss_type = args.get("loss_type", _trl_default("sft", "loss_type"))
    reason = (f"loss_type {loss_type}" if loss_type not in TOKEN_SUM_SFT_LOSSES
              else "label_smoothing_factor" if args.get("label_smoothing_factor") else None)
    if reason is None:
        return setting
    if config.micro_batch_size != "auto":
        raise ConfigError(f"micro_batch_size: with {reason} SFT's loss is not a sum over tokens divided by the "
                          "batch's token count, so micro-batches would change it; remove micro_batch_size")
    return None


def _trl_default(method: str, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(trl_config_class(method)) if f.name == name)


def _check_simple_type(key: str, value: Any, annotation: Any) -> None:
    """Catch the common mistakes (a string where TRL wants a number) before any model is loaded."""
    text = str(annotation)
    if value is None:
        return
    if text in ("int", "<class 'int'>") and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"'{key}' must be an integer, got {value!r}")
    if text in ("float", "<class 'float'>") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"'{key}' must be a number, got {value!r}")
    if text in ("bool", "<class 'bool'>") and not isinstance(value, bool):
        raise ValueError(f"'{key}' must be true or false, got {value!r}")


def run_defaults() -> dict[str, Any]:
    """What every align trainer (DPO, KTO, distillation) sets the same way: no activation recompute (TRL's
    gradient checkpointing only costs time on a model that fits), a metrics row every step and two checkpoints
    (readable curves, resume), no tracker unless asked, seed 0."""
    return {"gradient_checkpointing": False, "logging_steps": 1, "save_strategy": "steps", "save_steps": 50,
            "save_total_limit": 2, "report_to": [], "seed": 0}


def align_trl_defaults(method: str, *, on_gpu: bool, bf16_ok: bool, lora: bool = True) -> dict[str, Any]:
    """align's defaults over TRL's, each for a reason.

    - The reference is computed once (``precompute_ref_log_probs``) and cached on
      disk, so no step pays for a reference forward and no reference copy stays in
      memory.
    - Gradient checkpointing (TRL's default) recomputes every activation in the
      backward pass; for models that fit comfortably it only costs time, so it is
      off (``gradient_checkpointing: true`` turns it on). ``selective_recompute: true`` keeps each
      layer's matmul and attention outputs and recomputes only the element-wise
      rest (align.train.speedups.recompute): less memory, but slower steps on a CPU, so it
      is off unless asked for.
    - CPU needs fp32 (``use_cpu``, no bf16); a GPU gets bf16 and TF32.
    - Learning rate and DPO loss were chosen on the quality suite (scripts/bench/quality.py: held-out prompts,
      rules nobody tuned for, beside a random-label control), 40 LoRA steps of 4 on the bundled 135M model. The
      first default, lr 5e-5 with one best-vs-worst pair per prompt, fit its training pairs (train reward accuracy
      1.0) and moved held-out answers no more than random labels did (rule score +0.045 vs +0.019 on concise,
      +0.004 vs +0.014 on caution; KL 0.002-0.005 per token). TRL's ``sft`` term beside the sigmoid loss (RPO,
      https://arxiv.org/abs/2404.19733: the NLL of the chosen answer keeps the student writing answers like the
      good ones, not only further from the bad ones) kept the held-out score from falling where the sigmoid loss
      alone lowered it (caution -0.036). lr 2e-4 on all pairs of 4 candidates beat random labels on concise only
      (scripts/bench/results/quality-settings-4-candidates-all-pairs-lr-2e-4.json); at 2e-4 the 4 widest pairs of
      8 candidates did no better (mean gain +0.054 against +0.056). At 4e-4 on them (align generate's and align
      pairs build's defaults) DPO beat random labels on all five tasks (scripts/bench/results/quality.json, 3
      seeds: concise +0.155 against random labels' +0.080, caution +0.092 against +0.046, list +0.087 against
      -0.004, example +0.060 against -0.002, warm +0.048 against +0.009; every paired advantage's interval above
      0; the same on another machine, quality-settings-kto-lr-4e-4.json), at KL 0.10-0.13 per token and shorter
      answers (0.55-0.88x). TRL's own 1e-6 barely moves a LoRA adapter (KL 0.000 per token).
    - KTO's LoRA rate is twice DPO's, 8e-4. A KTO step of 4 rows sees 4 answers where DPO's sees 8 (4 pairs)
      plus the sft term. On its rows in a seeded shuffle (align.train.run: TRL's KTOTrainer reads them in order)
      KTO at 8e-4 beat random labels on four tasks of five (quality-kto-shuffled.json: concise +0.084
      over random labels, list +0.128, example +0.065, warm +0.042, each interval above 0; caution -0.016, not;
      from a fresh clone, quality.json: +0.084, +0.127, +0.068, +0.039 and -0.022, warm's interval from 0.003)
      at KL 0.09-0.37 per token and shorter answers (0.37-0.98x); at DPO's 4e-4 on two (concise and example;
      caution, list and warm barely moved, KL 0.03-0.05 per token; quality-settings-kto-shuffled-lr-4e-4.json).
      Before the shuffle (rows in file order) 8e-4 held on three or four tasks and 4e-4 on two
      (quality-settings-kto-lr-4e-4.json); TRL's ``apo_zero_unpaired`` loss at 4e-4 did not
      (quality-settings-kto-apo-zero-unpaired.json). The README says where it does not hold.
    - SFT, ORPO and SimPO have no reference. SFT's loss is on completion tokens only (TRL decides that from the
      data's shape; set here so ``trl_args.json`` says it) at 2e-4 with LoRA, or TRL's 2e-5 for a full
      fine-tune. SimPO is CPO's trainer with ``loss_type: simpo`` and no behaviour-cloning term (``cpo_alpha``
      0) at SimPO's beta 2.0 and target margin gamma 1.0 (gamma/beta 0.5; Meng et al. 2024,
      https://arxiv.org/abs/2405.14734): its rewards are mean per-token log-probs, so TRL's beta 0.1 would
      barely separate them. ORPO keeps TRL's beta (its lambda) of 0.1, the paper's. Their LoRA rate is 2e-4,
      DPO's when they were measured (not re-run at 4e-4): on the quality suite (concise and caution, seed 0)
      neither cleared the random-label control on caution, and SimPO's concise gain came at 3.5x DPO's KL
      per token (README, SFT/ORPO/SimPO subsection).
    - The rest as every align trainer has it (:func:`run_defaults`).
    """
    full_finetune_rate = 2e-5 if method == "sft" else 5e-6
    lora_rate = {"dpo": 4e-4, "kto": 8e-4}.get(method, 2e-4)
    defaults: dict[str, Any] = {**run_defaults(), "learning_rate": lora_rate if lora else full_finetune_rate}
    if method in REFERENCE_METHODS:
        defaults["precompute_ref_log_probs"] = True
    if on_gpu:
        defaults.update(bf16=bf16_ok, tf32=True)
    else:
        defaults.update(use_cpu=True, bf16=False)
    if method == "dpo":
        defaults["loss_type"] = ["sigmoid", "sft"]  # equal weights (TRL: loss_weights None)
    if method == "kto":
        defaults["per_device_train_batch_size"] = 4
    if method == "sft":
        defaults["completion_only_loss"] = True
    if method == "simpo":
        defaults.update(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0)
    return defaults


def build_trl_args(config: TrainConfig, run_dir: str, *, on_gpu: bool, bf16_ok: bool,
                   extra_loss: str | None = None) -> Any:
    """The TRL config object: align's defaults, then the user's explicit settings (``extra_loss``: see
    :func:`resolve_micro_batch`)."""
    check_tested_versions()  # every run of align.train.run passes here before a model is loaded (align.versions: why)
    args = align_trl_defaults(config.method, on_gpu=on_gpu, bf16_ok=bf16_ok, lora=config.lora is not None)
    args.update(config.trl_overrides)
    args["output_dir"] = f"{run_dir}/checkpoints"
    micro = resolve_micro_batch(config, args, on_gpu=on_gpu, extra_loss=extra_loss)
    passes = 1
    if micro is not None:
        batch = args.get("per_device_train_batch_size", _trl_default(config.method, "per_device_train_batch_size"))
        accumulation = args.get("gradient_accumulation_steps", 1)
        args["per_device_train_batch_size"], args["gradient_accumulation_steps"] = micro_batches(
            batch, accumulation, micro)
        passes = batch // args["per_device_train_batch_size"]
        if passes > 1 and config.method in REFERENCE_METHODS and args.get("precompute_ref_log_probs"):
            # The reference pass keeps no activations for a backward, so it runs on the whole batches (TRL's
            # default is the train batch, here the micro-batch): 41 s -> 32 s for 32 pairs of the bundled model.
            args.setdefault("precompute_ref_batch_size", batch)
        if passes > 1:
            log.info("each batch of %d examples runs as %d passes of %d (gradient accumulation: same math, less "
                     "activation memory and padding; micro_batch_size: null turns it off)",
                     batch, passes, micro)
    if isinstance(args.get("report_to"), str):
        args["report_to"] = [args["report_to"]]
    try:
        trl_args = trl_config_class(config.method)(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"TRL rejected the {config.method.upper()} settings: {exc}") from exc
    if passes > 1:
        setattr(trl_args, PASSES_PER_BATCH_ATTR, passes)  # the sft term's token mean spans these passes
    return trl_args
