"""The training stage: a TrainConfig in, a run dir out (weights, metrics, plot, config, data hashes).

One recipe for every method on TRL: DPO and KTO against a frozen reference, SFT, and the reference-free
preference losses ORPO and SimPO (for these three nothing of a reference is loaded, computed or cached).
The run dir is laid out by :mod:`align.train.recorder`, plus ``preflight.txt`` and (preference methods)
``diagnosis.json``. What makes DPO/KTO faster without changing the math is in :mod:`align.train.speedups`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from align.data.io import write_json, write_text
from align.errors import ConfigError
from align.models import ModelSource, load_model, load_tokenizer, resolve_model
from align.train.config import REFERENCE_METHODS, TrainConfig, build_trl_args, trl_trainer_class
from align.train.data import (AUTO_EVAL_MIN_PROMPTS, auto_eval_split, count_prompts, load_training_data, prompt_key,
                              sample_for_run, shuffled, split_holdout)
from align.train.diagnosis import Diagnosis, diagnose
from align.train.heldout import (HeldoutRewardsMixin, evaluate_with_accuracy, figures_at_reference,
                                 reward_tie_tolerance)
from align.train.preflight import check_or_raise, run_preflight
from align.train.recorder import RunRecorder, final_loss
from align.train.speedups import LeanHeadMixin, speedup_mixins
from align.train.speedups.ref_cache import ANSWERS, RefLogpStore, module_fingerprint, weights_fingerprint
from align.train.start import name_adapter_base, started_from

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: str
    method: str
    steps: int
    final_loss: float | None
    reference: str
    ref_cache: dict[str, int] | None
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    weights: str = ""
    plot: str | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # align.train.diagnosis: memorised, drifted (diagnosis.json)
    # align.train.start.started_from: the model spec, the plain model under it, the adapters merged into it
    started_from: dict[str, Any] = field(default_factory=dict)


def _trainer_class(method: str, prefix_sharing: bool, lean_lm_head: bool = True,
                   selective_recompute: bool = False, extra_mixins: Sequence[type] = ()) -> type:
    """TRL's trainer for ``method`` with align's mixins, outermost first: ``extra_mixins``, the speed-ups
    (align.train.speedups), the held-out reward measurement (align.train.heldout). The speed-ups and the
    measurement are DPO/KTO's (reference log-probs, implicit rewards). SFT gets the lean LM head (TRL's
    SFTTrainer scores its tokens with the same fused head); ORPO and SimPO run TRL's trainer."""
    base = trl_trainer_class(method)
    if method not in REFERENCE_METHODS:
        lean = (LeanHeadMixin,) if method == "sft" and lean_lm_head else ()
        return type(f"Align{base.__name__}", (*extra_mixins, *lean, base), {"align_method": method})
    speedups = speedup_mixins(method, prefix_sharing=prefix_sharing, lean_lm_head=lean_lm_head,
                              selective_recompute=selective_recompute)
    mixins = (*extra_mixins, *speedups, HeldoutRewardsMixin)
    return type(f"Align{base.__name__}", (*mixins, base), {"align_method": method})


def rows_needed(max_steps: int, batch_size: int, grad_accum: int, world_size: int) -> int | None:
    """How many examples a run of ``max_steps`` consumes (None: unbounded, i.e. epochs)."""
    if max_steps is None or max_steps <= 0:
        return None
    return max_steps * batch_size * grad_accum * world_size


def _describe_reference(config: TrainConfig, student: ModelSource) -> str:
    if config.method not in REFERENCE_METHODS:
        return f"none ({config.method.upper()} uses no reference model)"
    if config.reference != "base":
        return f"separate model {config.reference} (frozen)"
    if student.kind == "adapter":
        merged = "its adapter merged" if len(student.adapters) == 1 else f"its {len(student.adapters)} adapters merged"
        return f"the model it starts from, {config.model} ({merged}): the earlier run's weights"
    if config.lora is not None:
        return f"{config.model} with the LoRA adapter switched off (no second copy in memory)"
    return f"{config.model} as loaded before training (reference log-probs computed once, no copy kept)"


def train(config: TrainConfig, *, resume: bool = False, extra_mixins: Sequence[type] = ()) -> TrainResult:
    """Train on TRL as ``config`` says; see the module docstring for what lands in the run dir.

    ``extra_mixins`` extend the trainer class (in front of align's own), e.g. the KD term of
    :mod:`align.train.distill.preference`; one that adds a loss term names it in ``align_extra_loss``
    (DPO's micro-batches are then off: they are exact only for means of per-pair terms).
    """
    import datasets
    import torch
    import transformers
    from datasets import Dataset

    datasets.disable_progress_bars()  # per-map bars drown the log; TRL's own progress bars stay
    started = time.time()
    on_gpu = torch.cuda.is_available()
    if config.lora is not None and config.lora.quantize and not on_gpu:
        raise ConfigError("QLoRA (lora.quantize: 4bit) needs a CUDA GPU with bitsandbytes; on CPU drop "
                          "lora.quantize (plain LoRA) or use a GPU machine")
    # Everything that can fail on bad input is checked before any model is loaded.
    data = load_training_data(config.data, config.method, split=config.split, limit=config.limit)
    extra_losses = [m.align_extra_loss for m in extra_mixins if getattr(m, "align_extra_loss", None)]
    args = build_trl_args(config, config.output_dir, on_gpu=on_gpu, bf16_ok=on_gpu and torch.cuda.is_bf16_supported(),
                          extra_loss=", ".join(extra_losses) or None)
    init = model_init_kwargs(args)
    train_rows, heldout_rows = _split_heldout(config, data.rows, args.seed)
    if config.method == "kto":
        # TRL's KTOTrainer reads its rows in order (a sequential sampler: each row's KL completion is its batch
        # neighbour's, fixed before training). Files list a prompt's answers together, so in file order every step
        # fit one or two prompts' answers and the KL estimate came from those same answers, not mismatched ones.
        train_rows, heldout_rows = shuffled(train_rows, args.seed), shuffled(heldout_rows, args.seed)
    # Resolved once here (a bad spec fails before any model loads; bundled weights convert once) and passed down.
    student = resolve_model(config.model)
    reference = resolve_model(config.reference) if config.reference != "base" else None
    recorder = RunRecorder(config.output_dir, resume=resume, report_to=args.report_to, started=started)
    run_dir = recorder.run_dir

    tokenizer = load_tokenizer(student, trust_remote_code=config.trust_remote_code)
    if config.method == "kto":
        _set_kto_weights(config, args, train_rows)
    preflight = run_preflight(train_rows, tokenizer, method=config.method, max_length=args.max_length,
                              per_device_train_batch_size=args.per_device_train_batch_size)
    write_text(run_dir / "preflight.txt", preflight.text() + "\n")
    log.info("%s", preflight.text())
    if config.preflight:
        check_or_raise(preflight)

    if preflight.emptied_rows:
        dropped = set(preflight.emptied_rows)
        train_rows = [row for i, row in enumerate(train_rows) if i not in dropped]
    needed = rows_needed(args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                         args.world_size)
    if needed is not None and needed < len(train_rows):
        # A run shorter than an epoch only ever sees `needed` examples; choosing them up front (seeded) means
        # the reference is computed for those alone instead of for the whole file.
        train_rows = sample_for_run(train_rows, needed, args.seed,
                                    stratify_by="label" if config.method == "kto" else None)
        log.info("%d steps use %d training rows%s", args.max_steps, needed,
                 "; reference log-probs are computed for those only" if config.method in REFERENCE_METHODS else "")

    reference_text = _describe_reference(config, student)
    log.info("reference: %s", reference_text)
    model = load_model(student, trust_remote_code=config.trust_remote_code, merge_adapter=True,
                       **_quantization_kwargs(config), **init)
    ref_model = None
    if reference is not None:  # loaded as the student is, as TRL loads its reference
        ref_model = load_model(reference, trust_remote_code=config.trust_remote_code, merge_adapter=True, **init)
        ref_model.requires_grad_(False).eval()
    peft_config = config.lora.peft_config() if config.lora else None

    store = None
    if config.ref_cache and getattr(args, "precompute_ref_log_probs", False):
        weights = (_fingerprint_source(student, model) if reference is None
                   else _fingerprint_source(reference, ref_model))
        store = RefLogpStore(config.ref_cache_dir, _ref_namespace(config, args, weights, model, init))
    trainer_cls = _trainer_class(config.method, config.prefix_sharing, config.lean_lm_head,
                                 _selective_recompute(config, on_gpu), extra_mixins)
    trainer_cls.align_ref_store = store
    transformers.set_seed(args.seed)
    reference_kwargs = {"ref_model": ref_model} if config.method in REFERENCE_METHODS else {}
    trainer = trainer_cls(
        model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(heldout_rows) if heldout_rows else None,
        peft_config=peft_config, callbacks=[recorder.metrics_callback()], **reference_kwargs,
    )
    # the held-out rows' prompts in the eval dataset's order (TRL evaluates it in order), to count each prompt once
    trainer.align_eval_prompts = [prompt_key(row) for row in heldout_rows]
    # A LoRA run from a LoRA run: its adapter names the earlier adapter as its base, so it loads with the
    # earlier run's training under it (align.train.start says why a chain, not the earlier adapter trained on).
    name_adapter_base(trainer.model, student)
    recorder.record_setup(config, {
        "train": {"path": data.path, "sha256": data.file_sha256, "rows_in_file": len(data.rows),
                  "rows_used": len(train_rows), "converted_from": data.converted_from},
        "eval": {"path": config.eval_data, "rows": len(heldout_rows), "prompts": count_prompts(heldout_rows),
                 "split": config.eval_split},
    }, args)

    eval_before = recorder.eval_before(lambda: _evaluate_before(trainer, config)) if heldout_rows else {}
    output = recorder.train(trainer)
    eval_after = _evaluate(trainer, "after") if heldout_rows else {}

    weights_dir = recorder.save_weights(trainer, adapter=peft_config is not None)
    metrics = recorder.metrics()
    diagnosis = _diagnose(config, args, heldout_rows, tokenizer, eval_before, eval_after, metrics)
    result = TrainResult(
        run_dir=str(run_dir), method=config.method, steps=output.global_step, final_loss=final_loss(metrics),
        reference=reference_text, ref_cache=(getattr(trainer, "align_ref_report", None) or {}).get("train"),
        eval_before=eval_before, eval_after=eval_after, weights=str(weights_dir),
        seconds=recorder.seconds(), warnings=diagnosis.warnings if diagnosis else [],
        started_from=started_from(student),
    )
    if trainer.accelerator.is_main_process and diagnosis is not None:
        _report(diagnosis)
        write_json(run_dir / "diagnosis.json", diagnosis.to_json())
    recorder.finish(trainer, tokenizer, result, metrics, title=f"{config.method.upper()} {run_dir.name}")
    return result


def _split_heldout(config: TrainConfig, rows: list[dict[str, Any]], seed: int) -> tuple[list, list]:
    """(training rows, held-out rows): eval_data when given, else a prompt-disjoint eval_split of the data."""
    if config.eval_data:
        return rows, load_training_data(config.eval_data, config.method, split=config.eval_data_split).rows
    fraction = auto_eval_split(rows) if config.eval_split == "auto" else float(config.eval_split)
    train_rows, heldout_rows = split_holdout(rows, fraction, seed)
    if heldout_rows:
        log.info("held out %d prompts (%d rows) for %s before/after training; eval_split=0 turns it off",
                 count_prompts(heldout_rows), len(heldout_rows), _heldout_figure(config.method))
    elif config.eval_split == "auto":
        log.info("eval_split=auto: %d distinct prompts, too few to hold some out (auto needs %d); no held-out %s, "
                 "so nothing will tell learning from memorising (eval_data gives one)",
                 count_prompts(rows), AUTO_EVAL_MIN_PROMPTS, _heldout_figure(config.method))
    return train_rows, heldout_rows


def _heldout_figure(method: str) -> str:
    return "loss on the completions" if method == "sft" else "reward accuracy"


def _diagnose(config: TrainConfig, args: Any, heldout_rows: list[dict[str, Any]], tokenizer: Any,
              eval_before: dict[str, float], eval_after: dict[str, float],
              metrics: list[dict[str, Any]]) -> Diagnosis | None:
    """align.train.diagnosis's verdict for preference methods; None for SFT (no rewards to read)."""
    if config.method == "sft":
        return None
    shape = _heldout_shape(heldout_rows, config.method, tokenizer, args.max_length)
    if getattr(args, "ld_alpha", None) is not None:
        shape.pop("completion_tokens", None)  # LD-DPO's log-probs down-weight long tails: not per-token sums
    if config.method not in REFERENCE_METHODS and "completion_tokens" in shape:
        # ORPO and SimPO log mean per-token log-probs, not sums: the change per token is the change itself.
        shape["completion_tokens"] = {side: 1.0 for side in shape["completion_tokens"]}
    return diagnose(eval_before, eval_after, metrics, reference_free=config.method not in REFERENCE_METHODS, **shape)


def _heldout_shape(rows: list[dict[str, Any]], method: str, tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """The held-out set's size (pairs, or desirable/undesirable rows) and mean completion tokens per side, as
    align.train.diagnosis takes them; TRL's truncation to max_length is approximated by cutting the completion."""
    from align.train.preflight import tokenize_like_trl

    if not rows:
        return {}
    sides: dict[str, list[int]] = {"chosen": [], "rejected": []}
    for row in rows:
        answers = ([("chosen", row["chosen"]), ("rejected", row["rejected"])] if method != "kto"
                   else [("chosen" if row["label"] else "rejected", row["completion"])])
        for side, completion in answers:
            prompt_ids, completion_ids = tokenize_like_trl(tokenizer, row["prompt"], completion)
            room = len(completion_ids) if max_length is None else max(0, max_length - len(prompt_ids))
            sides[side].append(min(len(completion_ids), room))
    tokens = {side: sum(n) / len(n) for side, n in sides.items() if n}
    size = {"pairs": len(rows)} if method != "kto" else {"desirable": len(sides["chosen"]),
                                                          "undesirable": len(sides["rejected"])}
    return {"heldout": size, "completion_tokens": tokens}


def _report(diagnosis: Diagnosis) -> None:
    for warning in diagnosis.warnings:
        log.warning("%s", warning)
    for note in diagnosis.notes:
        log.info("%s", note)


def _selective_recompute(config: TrainConfig, on_gpu: bool) -> bool:
    # null leaves the choice to align: on for CPU (where it was measured), off on a GPU.
    return config.selective_recompute if config.selective_recompute is not None else not on_gpu


def starts_at_reference(config: TrainConfig, trainer: Any) -> bool:
    """Whether the policy before its first step is its reference, with the reference's held-out log-probs at hand.

    A DPO/KTO run whose reference is its starting weights ("base") starts as that model: a full fine-tune holds
    those weights, and a fresh LoRA adapter adds exactly 0 (peft starts B at 0). LD-DPO is left out: its logged
    log-probs weigh the answers' tails, so they are not the reference's plain sums."""
    columns = _reference_columns(config.method)
    eval_dataset = getattr(trainer, "eval_dataset", None)
    return (columns is not None and config.reference == "base" and getattr(trainer, "ld_alpha", None) is None
            and hasattr(eval_dataset, "column_names") and set(columns) <= set(eval_dataset.column_names))


def _reference_columns(method: str) -> list[str] | None:
    """The precomputed reference log-prob columns of a DPO/KTO row's own answers (not KTO's mismatched KL ones)."""
    if method not in ANSWERS:
        return None
    return [value for ids, value in ANSWERS[method] if ids != "KL_completion_ids"]


def _evaluate_before(trainer: Any, config: TrainConfig) -> dict[str, float]:
    """The held-out figures before training: from the reference's precomputed log-probs where the policy is its
    reference (an evaluation pass would only repeat them, to float noise: ~18 s a run on the quality suite),
    else measured."""
    if not starts_at_reference(config, trainer):
        return _evaluate(trainer, "before")
    dataset = trainer.eval_dataset
    columns = {name: list(dataset[name]) for name in _reference_columns(config.method)}
    figures = figures_at_reference(
        config.method, columns, trainer.args.per_device_eval_batch_size * trainer.accelerator.num_processes,
        desirable=list(dataset["label"]) if config.method == "kto" else None,
        estimates_kl=config.method == "kto" and getattr(trainer, "calculate_KL", False))
    log.info("held-out before training: the policy is its reference, so every reward is 0 (%s)",
             ", ".join(f"{k}={v:.4f}" for k, v in sorted(figures.items())))
    return figures


def _evaluate(trainer: Any, when: str) -> dict[str, float]:
    if trainer.align_method in REFERENCE_METHODS:
        # Ties count half, so that "before" reads 0.5 rather than TRL's strict count of float noise
        # (align.train.heldout).
        metrics, accuracy, margin_z = evaluate_with_accuracy(trainer, reward_tie_tolerance(trainer.beta),
                                                             trainer.align_eval_prompts)
    else:
        # SFT: TRL's loss on the completion tokens and its token accuracy. ORPO/SimPO: their rewards are the
        # policy's own mean log-probs, which differ before training too, so TRL's strict accuracy needs no ties.
        metrics, accuracy, margin_z = trainer.evaluate(), None, None
    skip = ("runtime", "per_second", "preparation_time", "num_tokens")
    keep = {k.removeprefix("eval_"): v for k, v in metrics.items()
            if k.startswith("eval_") and isinstance(v, (int, float)) and not any(s in k for s in skip)}
    if accuracy is not None:
        keep["rewards/accuracies"] = accuracy
    if margin_z is not None:
        keep["rewards/margin_z"] = margin_z
    log.info("held-out %s training: %s", when, ", ".join(f"{k}={v:.4f}" for k, v in sorted(keep.items())))
    return keep


def _set_kto_weights(config: TrainConfig, args: Any, rows: list[dict[str, Any]]) -> None:
    from align.data.pairs import kto_class_weights, kto_weight_ratio

    n_d = sum(bool(r["label"]) for r in rows)
    n_u = len(rows) - n_d
    explicit = {"desirable_weight", "undesirable_weight"} & set(config.trl_overrides)
    if not explicit and n_d and n_u:
        args.desirable_weight, args.undesirable_weight = kto_class_weights(n_d, n_u)
    if n_d and n_u:
        ratio = kto_weight_ratio(n_d, n_u, args.desirable_weight, args.undesirable_weight)
        log.info("KTO class balance: %d desirable / %d undesirable; weights %.4g / %.4g (%s); "
                 "lambda_D*n_D/(lambda_U*n_U) = %.3f (KTO paper Eq. 8 asks for [1, 4/3])",
                 n_d, n_u, args.desirable_weight, args.undesirable_weight,
                 "set by you" if explicit else "set automatically", ratio)


def model_init_kwargs(args: Any) -> dict[str, Any]:
    """TRL's ``model_init_kwargs`` (dtype, attention implementation, revision...) as align's model layer takes
    them: TRL applies them only to a model it loads from a name, and align loads the model itself. A dtype name
    ("bfloat16") becomes the torch dtype; "auto" stays."""
    import json

    import torch

    init = getattr(args, "model_init_kwargs", None) or {}
    init = dict(json.loads(init) if isinstance(init, str) else init)
    if "trust_remote_code" in init:
        raise ConfigError("model_init_kwargs: set trust_remote_code at the top level of the config, not here")
    dtype = init.get("dtype", init.pop("torch_dtype", None))
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"model_init_kwargs: dtype {dtype!r} is not a torch dtype (e.g. bfloat16, float32, "
                              "auto)")
        dtype = getattr(torch, dtype)
    if dtype is not None:
        init["dtype"] = dtype
    return init


def _quantization_kwargs(config: TrainConfig) -> dict[str, Any]:
    if config.lora is None or not config.lora.quantize:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                                      bnb_4bit_use_double_quant=True)}


def _ref_namespace(config: TrainConfig, args: Any, weights: str, model: Any,
                   init: dict[str, Any]) -> dict[str, Any]:
    """Everything besides the example itself that changes the reference log-probs (``weights``: the
    reference's fingerprint)."""
    import trl

    return {
        "method": config.method, "reference_weights": weights, "max_length": args.max_length,
        "truncation_mode": getattr(args, "truncation_mode", None), "ld_alpha": getattr(args, "ld_alpha", None),
        "dtype": str(next(model.parameters()).dtype), "trl": trl.__version__.split(".")[0],
        # eager and sdpa attention round differently; named only when asked for, so earlier caches keep their keys
        **({"attention": model.config._attn_implementation}
           if init.get("attn_implementation") else {}),
    }


def _fingerprint_source(source: ModelSource, module: Any) -> str:
    # Every adapter of a chain counts (a DPO run from an SFT run is referenced to the SFT weights); one adapter
    # gives the key it always had.
    try:
        base = weights_fingerprint(source.path)
        return base + "".join(":" + weights_fingerprint(adapter) for adapter in source.adapters)
    except (FileNotFoundError, NotADirectoryError):
        return module_fingerprint(module)
