"""Speed-ups for DPO/KTO training: same math as TRL's path, less time or memory. Each has a switch in
:class:`align.train.config.TrainConfig`; all but selective recompute are on by default.

- reference cache (:mod:`.ref_cache`, ``ref_cache``): the frozen reference's log-probs are computed once
  per example and kept on disk, so a rerun, a resume or a sweep pays nothing for the reference.
- prefix sharing (:mod:`.prefix_sharing`, ``prefix_sharing``, DPO only): a pair's prompt goes through the
  model once, not once per answer (one sequence, block attention mask).
- lean LM head (:mod:`.lm_head`, ``lean_lm_head``): log-probs of the labelled tokens only, in small tiles,
  where TRL's fused head has no Triton (CPU); SFT's trainer gets it too (align.train.run._trainer_class).
- selective recompute (:mod:`.recompute`, ``selective_recompute``): each decoder layer keeps its matmul and
  attention outputs and recomputes the element-wise rest in the backward pass (less memory, slower steps).
- exact micro-batches (:mod:`.micro_batches`, ``micro_batch_size``, DPO and SFT): a batch run as several
  passes of gradient accumulation keeps TRL's ``sft`` term a mean over the whole batch's chosen tokens (the
  passes themselves are set up by :func:`align.train.config.build_trl_args`; SFT's loss is already a mean
  over the whole batch's tokens, through the ``num_items_in_batch`` transformers' Trainer passes it).

Each module holds the math and the trainer mixin that switches it on. The trainer class is TRL's
``DPOTrainer``/``KTOTrainer`` with mixins, outermost first (``align.train.run._trainer_class``)::

    extra mixins (e.g. distillation's KD term) | speedup_mixins(...) | HeldoutRewardsMixin | TRL trainer

``HeldoutRewardsMixin`` (align.train.heldout) is a measurement, not a speed-up.
"""

from __future__ import annotations

from align.train.speedups.lm_head import LeanHeadMixin
from align.train.speedups.micro_batches import ExactMicroBatchMixin
from align.train.speedups.prefix_sharing import PrefixSharingMixin
from align.train.speedups.recompute import SelectiveRecomputeMixin
from align.train.speedups.ref_cache import RefCacheMixin


def speedup_mixins(method: str, *, prefix_sharing: bool, lean_lm_head: bool,
                   selective_recompute: bool) -> tuple[type, ...]:
    """The speed-up mixins for a DPO/KTO trainer, outermost first.

    The reference cache mixin is always in: it does nothing until a store is set on the class
    (``align_ref_store``). So is DPO's exact micro-batch mixin: it does nothing unless the TRL config says
    the batches were split. The lean LM head's ``_precompute_ref_logps`` runs before the cache's.
    """
    mixins: list[type] = [ExactMicroBatchMixin] if method == "dpo" else []
    if method == "dpo" and prefix_sharing:
        mixins.append(PrefixSharingMixin)
    if lean_lm_head:
        mixins.append(LeanHeadMixin)
    if selective_recompute:
        mixins.append(SelectiveRecomputeMixin)
    return (*mixins, RefCacheMixin)


__all__ = ["ExactMicroBatchMixin", "LeanHeadMixin", "PrefixSharingMixin", "RefCacheMixin", "SelectiveRecomputeMixin",
           "speedup_mixins"]
