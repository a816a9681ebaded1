"""TRL's GKD trainer, taught three things: the teacher's own prompt, a teacher known only by stored
top-k log-probs, and a loss with temperature and a hard-label share.

What stays TRL's: the training loop, the config (``lmbda``, ``beta``, ``temperature``, ``seq_kd``,
``max_new_tokens``), the on-policy draw, generation (``generate_on_policy_outputs``) and the teacher's
placement on the device. What changes, and why:

- The teacher may see a system prompt the student does not (context distillation), so every batch
  carries two prompts and one shared completion (see :mod:`align.train.distill.collate`); TRL's
  version feeds both models the same ids.
- ``temperature`` softens both distributions in the loss, not only sampling (TRL's GKD samples at
  ``temperature`` but computes the divergence at 1).
- Prompt-only data has no completion to score, so the off-policy branch asks the teacher for one
  (TRL's ``seq_kd`` path), with the teacher's prompt.
"""

# Why trl.experimental.gkd and not TRL 1.16's stable ``trl.DistillationTrainer`` (read in TRL 1.16's
# trl/trainer/distillation_trainer.py and distillation_config.py; not yet tried as a base class here):
# - It is on-policy only: every step the student generates a completion for each prompt and trains on
#   that. The dataset's "prompt" column is all it reads (other columns are dropped), and its config has
#   no ``lmbda`` and no ``seq_kd``: no training on the data's own completions, no teacher-written ones,
#   no mixing of the three as ``completion_source`` does.
# - Its loss needs a loaded teacher model: ``_compute_loss`` takes both models' last hidden states and
#   ``lm_head`` weights and computes the generalized JSD (``beta``, at ``temperature`` on both sides, as
#   here) over the full vocabulary in chunks. Nothing takes stored teacher log-probs, so the sparse top-k
#   loss from a file (``teacher_model=None``, ``sparse_topk_divergence``) has no place to go.
# - Student and teacher see the same ids (one ``input_ids``), so a teacher-only system prompt (context
#   distillation) is not possible, and there is no hard-label cross-entropy share (``alpha``).
# What it has that GKD lacks: the chunked loss never builds the (batch, length, vocab) logits, vLLM
# generation, tool calls. Moving would mean overriding its data path, generation and _compute_loss,
# i.e. most of it; align stays on GKD (not deprecated in 1.16; align/versions.py pins TRL 1.16.x) until
# the stable trainer takes dataset completions and stored log-probs, or GKD leaves trl.experimental.

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from trl.experimental.gkd import GKDTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.sft_trainer import SFTTrainer
from trl.trainer.utils import disable_dropout_in_model

from align.train.distill.collate import DistillCollator
from align.train.distill.losses import (SparseTail, dense_divergence, distillation_loss, masked_mean,
                                        sparse_topk_divergence, token_cross_entropy)


@dataclass(frozen=True)
class LossSettings:
    alpha: float = 0.0  # share of the hard-label cross-entropy
    sparse_tail: SparseTail = "bucket"


class DistillTrainer(GKDTrainer):
    """Knowledge distillation from a teacher model (dense) or from stored top-k log-probs (``teacher_model=None``)."""

    def __init__(self, model: Any, teacher_model: Any, args: Any, *, data_collator: DistillCollator,
                 loss: LossSettings = LossSettings(), **kwargs: Any) -> None:
        self.align_loss = loss
        if teacher_model is not None:
            super().__init__(model, teacher_model, args, data_collator=data_collator, **kwargs)
            return
        # No teacher model: GKDTrainer.__init__ insists on one, so do its share here. Generation is never
        # needed (the run refuses lmbda > 0 and seq_kd without a teacher).
        args.remove_unused_columns = False
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        SFTTrainer.__init__(self, model, args=args, data_collator=data_collator, **kwargs)
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        self.teacher_model = None
        self.lmbda, self.beta, self.temperature, self.seq_kd = args.lmbda, args.beta, args.temperature, args.seq_kd

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        mode = "train" if self.model.training else "eval"
        width = inputs["completion_ids"].shape[1]
        # Only the positions that predict the completion need the LM head (V wide): the last width + 1.
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        position_ids=inputs["position_ids"], logits_to_keep=width + 1, use_cache=False)
        student_logits = outputs.logits[:, :-1]
        mask = inputs["completion_mask"].bool()
        divergence, kl = self._divergence(student_logits, inputs, width)
        cross_entropy = token_cross_entropy(student_logits, inputs["completion_ids"]) if self.align_loss.alpha else None
        loss = distillation_loss(divergence, cross_entropy, mask, self.align_loss.alpha)

        gather = self.accelerator.gather_for_metrics
        self._metrics[mode]["divergence"].append(gather(masked_mean(divergence.detach(), mask)).mean().item())
        self._metrics[mode]["kl"].append(gather(masked_mean(kl, mask)).mean().item())
        if cross_entropy is not None:
            self._metrics[mode]["cross_entropy"].append(gather(masked_mean(cross_entropy.detach(), mask)).mean().item())
        if mode == "train":
            self._total_train_tokens += int(gather(inputs["attention_mask"].sum()).sum().item())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    def _divergence(self, student_logits: torch.Tensor, inputs: dict[str, torch.Tensor],
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss's divergence, KL(teacher || student) at temperature 1 for the logs), each ``[B, C]``."""
        plain = self.beta == 0.0 and self.temperature == 1.0  # then the divergence is that KL already
        if self.teacher_model is None:
            def sparse(beta: float, temperature: float, logits: torch.Tensor) -> torch.Tensor:
                return sparse_topk_divergence(logits, inputs["topk_ids"], inputs["topk_logprobs"], beta=beta,
                                              temperature=temperature, tail=self.align_loss.sparse_tail)
            divergence = sparse(self.beta, self.temperature, student_logits)
            return divergence, divergence.detach() if plain else sparse(0.0, 1.0, student_logits.detach())
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_logits = self.teacher_model(
                input_ids=inputs["teacher_input_ids"], attention_mask=inputs["teacher_attention_mask"],
                position_ids=inputs["teacher_position_ids"], logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
        divergence = dense_divergence(student_logits, teacher_logits, beta=self.beta, temperature=self.temperature)
        kl = divergence.detach() if plain else dense_divergence(student_logits.detach(), teacher_logits, beta=0.0)
        return divergence, kl

    # ------------------------------------------------------------------ where completions come from

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        source = self.completion_source(inputs)
        if source != "data":
            inputs = self._generate(model, inputs, source)
        self._metrics["train"]["on_policy"].append(float(source == "student"))
        # Not GKDTrainer.training_step: it would draw again and generate from the student's prompt for the
        # teacher as well. Straight to SFTTrainer's (activation offloading, then Trainer's step).
        return SFTTrainer.training_step(self, model, inputs, num_items_in_batch)

    def completion_source(self, inputs: dict[str, Any]) -> str:
        """'student' with probability lmbda (on-policy, GKD), else 'teacher' (seq_kd, or no completion in the data)
        or 'data'."""
        if self.lmbda > 0 and random.random() < self.lmbda:
            return "student"
        if self.seq_kd or "completion_ids" not in inputs:
            return "teacher"
        return "data"

    def _generate(self, model: Any, inputs: dict[str, Any], source: str) -> dict[str, Any]:
        if source == "student":
            context = unwrap_model_for_generation(model, self.accelerator, generation_kwargs=self.generation_kwargs,
                                                  gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
            prompts, prompt_mask = inputs["prompts"], inputs["prompt_attention_mask"]
        else:
            context = unwrap_model_for_generation(self.teacher_model, self.accelerator,
                                                  generation_kwargs=self.generation_kwargs)
            prompts, prompt_mask = inputs["teacher_prompts"], inputs["teacher_prompt_attention_mask"]
        with context as generator:
            tokens, attention, _ = self.generate_on_policy_outputs(
                generator, {"prompts": prompts, "prompt_attention_mask": prompt_mask}, self.generation_config)
        start = prompts.shape[1]
        completions = [row[keep.bool()].tolist() for row, keep in zip(tokens[:, start:], attention[:, start:])]
        return self.data_collator.with_completions(inputs, completions)
