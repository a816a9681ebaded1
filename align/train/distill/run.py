"""The distillation stage: a DistillConfig in, a run dir out, laid out as `align train dpo`'s (by
:mod:`align.train.recorder`).

``config.yaml``, ``data.json``, ``trl_args.json``, ``metrics.jsonl`` (every logged step),
``curves.png``, ``adapter/`` or ``model/`` with the tokenizer, ``run.json``; and with ``eval_data``,
``eval_before.json`` / ``eval_after.json``: the student's KL to the teacher and its agreement with the
teacher's greedy answers on held-out prompts (see :mod:`align.train.distill.heldout`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from align.errors import ConfigError, DataError
from align.models import load_model, load_tokenizer, resolve_model
from align.train.distill.config import DistillConfig, build_gkd_args
from align.train.distill.data import DistillData, check_stored_tokens, encode_examples, load_distill_data
from align.train.recorder import RunRecorder, final_loss
from align.train.start import name_adapter_base, started_from

log = logging.getLogger(__name__)


@dataclass
class DistillResult:
    run_dir: str
    steps: int
    final_loss: float | None
    teacher: str  # where the teacher's distributions came from, in words
    eval_before: dict[str, Any] = field(default_factory=dict)
    eval_after: dict[str, Any] = field(default_factory=dict)
    weights: str = ""
    plot: str | None = None
    seconds: float = 0.0


def distill(config: DistillConfig, *, resume: bool = False) -> DistillResult:
    """Train ``config.model`` on the teacher's token distributions; see the module docstring for the run dir."""
    import datasets
    import torch
    import transformers
    from datasets import Dataset

    datasets.disable_progress_bars()
    started = time.time()
    on_gpu = torch.cuda.is_available()
    if config.lora is not None and config.lora.quantize:
        raise ConfigError("lora.quantize is not supported by align train distill yet; use plain LoRA (drop "
                          "lora.quantize) or a full fine-tune (lora: null)")
    # Everything that can fail on bad input is checked before any model is loaded.
    data = load_distill_data(config.data)
    system_prompt = _teacher_system_prompt(config, data)
    _check_signal(config, data)
    heldout = _heldout_prompts(config)
    args = build_gkd_args(config, config.output_dir, on_gpu=on_gpu, bf16_ok=on_gpu and torch.cuda.is_bf16_supported())
    # Resolved once, before any tokenizer or model loads (a bad student or teacher spec fails here, and bundled
    # weights convert once), and passed down.
    student = resolve_model(config.model)
    teacher_source = resolve_model(config.teacher) if config.teacher else None

    tokenizer = load_tokenizer(student, trust_remote_code=config.trust_remote_code)
    if teacher_source is not None:
        from align.train.distill.tokens import check_same_vocabulary

        check_same_vocabulary(tokenizer, load_tokenizer(teacher_source, trust_remote_code=config.trust_remote_code),
                              student_name=config.model, teacher_name=config.teacher)
    if config.uses_stored_logprobs:
        check_stored_tokens(data, tokenizer)
    rows, dropped = encode_examples(data.examples, tokenizer, teacher_system_prompt=system_prompt,
                                    max_length=args.max_length)
    if not rows:
        raise DataError.at(config.data, f"every prompt alone fills max_length={args.max_length}; raise max_length")
    if dropped:
        log.warning("%d of %d examples dropped: their prompt alone fills max_length=%d", dropped,
                    len(data.examples), args.max_length)
    recorder = RunRecorder(config.output_dir, resume=resume, report_to=args.report_to, started=started)
    run_dir = recorder.run_dir

    model = load_model(student, trust_remote_code=config.trust_remote_code, merge_adapter=True)
    teacher = None
    if teacher_source is not None:
        from align.train.distill.tokens import check_same_logit_width

        teacher = load_model(teacher_source, trust_remote_code=config.trust_remote_code, merge_adapter=True)
        teacher.requires_grad_(False).eval()
        check_same_logit_width(model, teacher, student_name=config.model, teacher_name=config.teacher)
    signal = _describe_signal(config, data, system_prompt)
    log.info("teacher signal: %s", signal)

    from align.train.distill.collate import DistillCollator
    from align.train.distill.trainer import DistillTrainer, LossSettings

    transformers.set_seed(args.seed)
    trainer = DistillTrainer(
        model=model, teacher_model=None if config.uses_stored_logprobs else teacher, args=args,
        data_collator=DistillCollator(tokenizer.pad_token_id, args.max_length),
        loss=LossSettings(alpha=config.alpha, sparse_tail=config.sparse_tail),
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=config.lora.peft_config() if config.lora else None,
        callbacks=[recorder.metrics_callback()],
    )
    name_adapter_base(trainer.model, student)  # a LoRA student from a LoRA run: see align.train.start
    recorder.record_setup(config, {
        "train": {"path": data.path, "sha256": data.file_sha256, "kind": data.kind, "examples": len(data.examples),
                  "rows_used": len(rows), "skipped": data.stats, "teacher_in_file": data.teacher},
        "eval": {"path": config.eval_data, "prompts": len(heldout)},
        "teacher_system_prompt": system_prompt,
    }, args)

    answers = None
    eval_before: dict[str, Any] = {}
    if heldout and teacher is not None:
        from align.train.distill.heldout import teacher_answers

        answers = teacher_answers(teacher, tokenizer, heldout, system_prompt=system_prompt,
                                  max_new_tokens=config.eval_max_new_tokens)
        eval_before = recorder.eval_before(lambda: _evaluate(trainer, teacher, tokenizer, answers, config, "before"))
    output = recorder.train(trainer)
    eval_after = _evaluate(trainer, teacher, tokenizer, answers, config, "after") if answers else {}
    if eval_after:
        recorder.record_eval_after(eval_after)

    weights_dir = recorder.save_weights(trainer, adapter=config.lora is not None)
    metrics = recorder.metrics()
    result = DistillResult(run_dir=str(run_dir), steps=output.global_step, final_loss=final_loss(metrics),
                           teacher=signal, eval_before=eval_before, eval_after=eval_after, weights=str(weights_dir),
                           seconds=recorder.seconds())
    recorder.finish(trainer, tokenizer, result, metrics, title=f"distill {run_dir.name}", method="distill",
                    started_from=started_from(student))
    return result


def _teacher_system_prompt(config: DistillConfig, data: DistillData) -> str | None:
    """The config's; for candidates written with a system prompt, the file's unless the config names one."""
    if data.system_prompt and config.teacher_system_prompt and data.system_prompt != config.teacher_system_prompt:
        if config.uses_stored_logprobs:
            raise ConfigError(f"{config.data} was written by a teacher with another system prompt than "
                              "teacher_system_prompt; its stored log-probs are conditioned on the file's: drop "
                              "teacher_system_prompt from the config")
        log.warning("teacher_system_prompt differs from the one %s was generated with; the teacher model "
                    "is prompted with the config's", config.data)
    if config.teacher_system_prompt is None and data.system_prompt:
        log.info("teacher system prompt: the one recorded in %s", config.data)
        return data.system_prompt
    return config.teacher_system_prompt


def _check_signal(config: DistillConfig, data: DistillData) -> None:
    if config.uses_stored_logprobs:
        if not data.has_logprobs:
            raise ConfigError(f"{config.data} holds {data.kind} without stored teacher log-probs, and no 'teacher' is "
                              "given: name a teacher model (teacher: MODEL), or distil from candidates written "
                              "with `align generate --logprobs K`")
    if config.eval_data and config.teacher is None:
        raise ConfigError("eval_data measures the KL to the teacher, which needs the teacher model: set 'teacher' "
                          "(with sparse: true the stored log-probs still drive the loss)")


def _heldout_prompts(config: DistillConfig) -> list[Any]:
    if not config.eval_data:
        return []
    from align.generate.stage import read_prompts

    records = read_prompts(config.eval_data)[: config.eval_max_prompts]
    return [r.prompt if isinstance(r.prompt, str) else [m.model_dump() for m in r.prompt] for r in records]


def _describe_signal(config: DistillConfig, data: DistillData, system_prompt: str | None) -> str:
    prompted = " with a system prompt" if system_prompt else ""
    if config.uses_stored_logprobs:
        widths = {len(alts) for e in data.examples for alts in (e.topk_ids or [])}
        return (f"top-k log-probs stored in {config.data} (k up to {max(widths, default=0)}, tail: "
                f"{config.sparse_tail}), written by {data.teacher or 'an unnamed teacher'}{prompted}; "
                "no teacher loaded")
    return f"{config.teacher}{prompted}, full distributions at every completion token"


def _evaluate(trainer: Any, teacher: Any, tokenizer: Any, answers: Any, config: DistillConfig,
              when: str) -> dict[str, Any]:
    from align.train.distill.heldout import compare_with_teacher

    metrics, _ = compare_with_teacher(trainer.model, teacher, tokenizer, answers,
                                      max_new_tokens=config.eval_max_new_tokens)
    log.info("held-out %s training: KL(teacher||student) %.4f/token, token agreement %.3f, exact match %.3f",
             when, metrics["kl_per_token"], metrics["token_agreement"], metrics["exact_match"])
    return metrics

