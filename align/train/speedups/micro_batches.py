"""Micro-batches that keep TRL's ``sft`` term exact: its token mean is taken over the whole batch, not per pass.

On a CPU align runs each DPO batch of ``B`` pairs as ``s`` passes (micro-batches) of gradient accumulation
(:func:`align.train.config.micro_batches`; ``micro_batch_size``). For a loss that is a mean of per-pair terms
(TRL's ``sigmoid``) that is the same math: the Trainer divides each pass's loss by the number of passes.
TRL's ``sft`` term (the RPO recipe's NLL of the chosen answers, ``loss_type: [sigmoid, sft]``, align's
default) is not such a mean: on a batch ``g`` it is ``S_g / N_g``, the summed NLL of the batch's chosen
tokens over their number, and a step of ``G`` batches averages ``(1/G) sum_g S_g / N_g``. Run as ``K``
passes, TRL computes ``S_m / n_m`` per pass ``m`` (its own tokens only), so pairs with short answers would
weigh as much as pairs with long ones.

The Trainer fetches all passes of an optimizer step before it runs the first (``get_batch_samples``), so
their chosen-token counts ``n_m`` are known up front. Scaling pass ``m``'s ``sft`` term by

    c_m = n_m * K / (G * N_g(m))        (N_g: the chosen tokens of the passes that make up batch g)

gives, after the Trainer's division by ``K``, ``(1/K) sum_m c_m S_m / n_m = (1/G) sum_g S_g / N_g``: TRL's
whole-batch term, and so its gradient. The scale goes in through TRL's own ``loss_weights`` for the duration
of that pass (the term enters TRL's loss as ``weight * term``), so TRL's loss code runs unchanged, and
whatever feeds its per-token log-probs (prefix sharing, the lean LM head) does not matter. ``ld_alpha``
weighs the rewards' log-probs, not the ``sft`` term's, and changes nothing here.

Not exact with ``use_weighting`` (WPO): TRL multiplies the ``sft`` term by the batch's mean pair weight,
a product of two batch means (:func:`align.train.config.resolve_micro_batch` keeps such batches whole).
Under DDP each process's passes make up that process's batch, as in TRL, where each process takes its
own token mean.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from align.train.config import PASSES_PER_BATCH_ATTR

log = logging.getLogger(__name__)


def sft_term_scales(chosen_tokens: Sequence[int], passes_per_batch: int) -> list[float]:
    """The factor ``c_m`` for TRL's ``sft`` term in each pass of one optimizer step (see the module docstring).

    chosen_tokens: [K] chosen-completion tokens per pass, in the order the step runs them; every
    ``passes_per_batch`` consecutive passes are one of TRL's batches (the last may have fewer, at the end of
    an epoch). A pass without chosen tokens gets 0 (its term adds nothing to the batch's token mean).
    """
    if passes_per_batch < 1:
        raise ValueError(f"passes_per_batch must be at least 1, got {passes_per_batch}")
    passes = len(chosen_tokens)
    groups = [chosen_tokens[i: i + passes_per_batch] for i in range(0, passes, passes_per_batch)]
    scales = []
    for group in groups:
        total = sum(group)
        scales += [n * passes / (len(groups) * total) if n else 0.0 for n in group]
    return scales


def chosen_completion_tokens(batch: dict[str, Any]) -> int:
    """Chosen-completion tokens in a TRL DPO batch (``[chosen rows; rejected rows]``), counted as TRL's ``sft``
    term counts them: the completion mask shifted by one (position t holds the log-prob of token t+1)."""
    mask = batch["completion_mask"]
    return int(mask[: mask.shape[0] // 2, 1:].sum())


@contextlib.contextmanager
def sft_term_scaled(trainer: Any, scale: float) -> Iterator[None]:
    """For one pass: TRL's ``sft`` weight times ``scale`` (TRL reads ``loss_types``/``loss_weights`` per call).

    With ``scale`` 0 (no chosen tokens in the pass) the term is left out instead: TRL's mean over no tokens
    is NaN, and 0 * NaN is NaN. It stays when it is the only term (TRL's own NaN for such a pass).
    """
    types, weights = trainer.loss_types, trainer.loss_weights
    kept = [(t, w * scale if t == "sft" else w) for t, w in zip(types, weights, strict=True) if t != "sft" or scale]
    if kept:
        trainer.loss_types, trainer.loss_weights = [t for t, _ in kept], [w for _, w in kept]
    try:
        yield
    finally:
        trainer.loss_types, trainer.loss_weights = types, weights


class ExactMicroBatchMixin:
    """Scales TRL's ``sft`` term per pass so that a DPO batch split into passes gives TRL's whole-batch term.

    Does nothing unless align split the batches (``build_trl_args`` puts the passes per batch on the TRL
    config as ``align_passes_per_batch``) and the loss has an ``sft`` term.
    """

    _align_sft_scales: Sequence[tuple[Any, float]] = ()  # (batch, c_m) for the passes of the current step
    _align_sft_unmatched_warned = False

    def _align_passes_per_batch(self) -> int | None:
        trainer: Any = self
        passes = getattr(trainer.args, PASSES_PER_BATCH_ATTR, None)
        if not passes or passes < 2 or "sft" not in getattr(trainer, "loss_types", ()):
            return None
        if getattr(trainer, "use_weighting", False):
            return None  # not exact (see the module docstring); resolve_micro_batch does not split these
        return int(passes)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        passes = self._align_passes_per_batch()
        self._align_sft_scales = ()
        if passes and batches and "completion_mask" in batches[0]:
            scales = sft_term_scales([chosen_completion_tokens(b) for b in batches], passes)
            self._align_sft_scales = list(zip(batches, scales))
        return batches, num_items  # num_items stays None: the Trainer keeps dividing each pass's loss by K

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        scale = next((s for batch, s in self._align_sft_scales if batch is inputs), None)
        if scale is None:
            if self._align_sft_scales and not self._align_sft_unmatched_warned:
                self._align_sft_unmatched_warned = True
                log.warning("a training pass was not among the batches fetched for its step: its sft term is "
                            "TRL's per-pass token mean, not the whole batch's")
            return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
        with sft_term_scaled(self, scale):
            return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
