"""Per-token log-probs of the LM head in small tiles, scoring only the tokens that carry a label.

TRL 1.16's DPO, KTO and SFT trainers never build the full ``[batch, seq, vocab]``
logits: their "fused LM head" (``trl.trainer.utils.add_fused_lm_head``) hands
the last hidden states to a chunked kernel. On a GPU that kernel is Triton and
scores only the labelled positions. Without Triton (CPU), it scores *every*
position (prompt and padding too) in tiles of up to ``4096 x 32768`` logits and
folds each tile with a dozen full-size temporaries: for a DPO batch of 4 pairs
at ``max_length=256`` with a 49k vocabulary that is ~2 GB in the backward pass
and twice the LM-head work the loss needs.

:class:`TokenLogProbs` computes the same quantities (log-prob of each label,
and the entropy, ``log sum p^2``, mean logit and top-1 flag TRL's metrics read)
over row tiles of at most :data:`TILE_ELEMENTS` logits, with one extra buffer
per tile, and recomputes each tile in the backward pass from the saved hidden
states (the idea of Liger's fused linear cross-entropy). :func:`use_lean_lm_head`
hooks it into TRL's fused head at the narrowest point: TRL's forward still runs
the backbone, gathers the labelled positions and builds its output; only the
kernel it calls, and the choice to score labelled positions only, are swapped,
for the duration of one forward call of one model. :class:`LeanHeadMixin` installs
it on a DPO/KTO/SFT trainer's models.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

# Logits per tile (rows x vocab): 4M fp32 values = 16 MB, and at most two such buffers live at once.
TILE_ELEMENTS = 1 << 22


def tile_rows(vocab: int, tile_elements: int | None = None) -> int:
    """How many token rows of ``vocab`` logits fit in one tile (at least one)."""
    return max(1, (tile_elements or TILE_ELEMENTS) // vocab)


def _transform(raw: torch.Tensor, logit_scale: float, softcap: float | None, inv_t: float,
               keep_tanh: bool = False) -> torch.Tensor | None:
    """In place: raw LM-head outputs [n, V] -> the logits z TRL's kernel samples from.

    z = softcap * tanh(raw * logit_scale / softcap) * inv_t, or raw * logit_scale * inv_t without a softcap.
    Returns a copy of tanh(.) when ``keep_tanh`` (the backward's 1 - tanh^2), else None.
    """
    if logit_scale != 1.0:
        raw.mul_(logit_scale)
    tanh = None
    if softcap is not None:
        raw.div_(softcap).tanh_()
        tanh = raw.clone() if keep_tanh else None
        raw.mul_(softcap)
    if inv_t != 1.0:
        raw.mul_(inv_t)
    return tanh


class TokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] per token, in row tiles; TRL's kernel signature and outputs.

    Args (as ``trl.kernels.ChunkedLogProbFunction.apply``): hidden [N, H], weight [V, H], bias [V] or None,
    targets [N] (all valid), temperature, chunk_size (ignored: tiles are sized by :data:`TILE_ELEMENTS`),
    final_logit_softcapping, logit_scale, outputs (names among entropy, log_sum_sq_probs, mean_logits, is_top1).
    Returns (log_probs [N], entropy [N] | None, log_sum_sq_probs [N] | None, mean_logits [N] | None,
    is_top1 [N] bool | None); only log_probs and entropy carry gradients.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, temperature: float = 1.0, chunk_size: int = 0,
                final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
                outputs: tuple[str, ...] = ("log_probs",)) -> tuple[torch.Tensor | None, ...]:
        ctx.set_materialize_grads(False)  # entropy is usually logged only: no zero gradient to fold in
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        device, n_tokens = hidden.device, hidden.shape[0]
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        inv_t = 1.0 / temperature
        f32 = {"device": device, "dtype": torch.float32}
        log_z = torch.empty(n_tokens, **f32)
        target_logit = torch.empty(n_tokens, **f32)
        entropy = torch.empty(n_tokens, **f32) if "entropy" in outputs else None
        log_sum_sq = torch.empty(n_tokens, **f32) if "log_sum_sq_probs" in outputs else None
        mean_logits = torch.empty(n_tokens, **f32) if "mean_logits" in outputs else None
        is_top1 = torch.empty(n_tokens, dtype=torch.bool, device=device) if "is_top1" in outputs else None
        with maybe_gather_lm_head_ctx(weight, bias):
            w = weight.to(dtype)
            step = tile_rows(weight.shape[0])
            for start in range(0, n_tokens, step):
                rows = slice(start, min(start + step, n_tokens))
                z = _logits_tile(hidden[rows], w, bias, dtype)
                _transform(z, logit_scale, final_logit_softcapping, inv_t)
                t = targets[rows].unsqueeze(1)
                target_logit[rows] = z.gather(1, t).squeeze(1)
                if mean_logits is not None:
                    mean_logits[rows] = z.mean(dim=1)
                if is_top1 is not None:
                    # argmax returns the first maximum: a tie with an earlier token is not a top-1 hit (as TRL)
                    is_top1[rows] = z.argmax(dim=1) == t.squeeze(1)
                log_z[rows] = torch.logsumexp(z, dim=1)
                if entropy is not None or log_sum_sq is not None:
                    log_p = z.sub_(log_z[rows].unsqueeze(1))
                    if log_sum_sq is not None:
                        log_sum_sq[rows] = torch.logsumexp(2 * log_p, dim=1)
                    if entropy is not None:
                        entropy[rows] = -(log_p.exp().mul_(log_p)).sum(dim=1)
        log_probs = target_logit - log_z
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy)
        ctx.settings = (dtype, inv_t, final_logit_softcapping, logit_scale)
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx: Any, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                 *_: Any) -> tuple[torch.Tensor | None, ...]:
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        dtype, inv_t, softcap, logit_scale = ctx.settings
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_entropy is not None and entropy is None:
            grad_entropy = None
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = grad_bias = None
        with maybe_gather_lm_head_ctx(weight, bias):
            if need_weight:
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_bias:
                grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            w = weight.to(dtype)
            step = tile_rows(weight.shape[0])
            for start in range(0, hidden.shape[0], step):
                rows = slice(start, min(start + step, hidden.shape[0]))
                h = hidden[rows].to(dtype)
                z = _logits_tile(h, w, bias, dtype)
                tanh = _transform(z, logit_scale, softcap, inv_t, keep_tanh=softcap is not None)
                grad = _logits_grad(z, targets[rows], log_z[rows],
                                    None if grad_log_probs is None else grad_log_probs[rows].float(),
                                    None if grad_entropy is None else grad_entropy[rows].float(),
                                    None if entropy is None else entropy[rows])
                # chain rule back through z = softcap * tanh(raw * scale / softcap) * inv_t
                grad.mul_(inv_t * logit_scale)
                if tanh is not None:
                    grad.mul_(1 - tanh.square_())
                grad = grad.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] += (grad @ w).float()
                if grad_weight is not None:
                    grad_weight.add_((grad.t() @ h).float())
                if grad_bias is not None:
                    grad_bias.add_(grad.sum(dim=0, dtype=torch.float32))
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None, None, None)


def _logits_tile(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """[n, H] x [V, H] -> fp32 logits [n, V] (computed in ``dtype``, as TRL's kernel does)."""
    z = hidden.to(dtype) @ weight.t()
    if bias is not None:
        z += bias.to(dtype)
    return z.float()


def _logits_grad(z: torch.Tensor, targets: torch.Tensor, log_z: torch.Tensor, grad_log_probs: torch.Tensor | None,
                 grad_entropy: torch.Tensor | None, entropy: torch.Tensor | None) -> torch.Tensor:
    """d loss / d z for one tile, reusing ``z``'s buffer.

    z [n, V] logits (overwritten), targets [n], log_z [n]; the incoming gradients [n] of log p(target)
    (d/dz_j = 1[j = target] - p_j) and of the entropy H (d/dz_j = -p_j (log p_j + H)).
    """
    log_p = z.sub_(log_z.unsqueeze(1))
    p = log_p.exp()
    if grad_entropy is not None:
        grad = log_p.add_(entropy.unsqueeze(1)).mul_(p).mul_(-grad_entropy.unsqueeze(1))
        if grad_log_probs is not None:
            grad.sub_(p.mul_(grad_log_probs.unsqueeze(1)))
    elif grad_log_probs is not None:
        grad = p.mul_(-grad_log_probs.unsqueeze(1))
    else:
        return p.zero_()
    if grad_log_probs is not None:
        grad.scatter_add_(1, targets.unsqueeze(1), grad_log_probs.unsqueeze(1))
    return grad


# ----------------------------------------------------------------------------- hooking into TRL's fused head


def _trl_head_module() -> Any | None:
    """TRL's module whose fused forward looks up the kernel and the compaction rule at call time, if it still does."""
    try:
        from trl.trainer import utils
    except ImportError:
        return None
    return utils if all(hasattr(utils, n) for n in ("_ChunkedLogProbFunction", "_use_triton")) else None


@contextlib.contextmanager
def _lean_kernel(utils: Any) -> Iterator[None]:
    kernel, use_triton = utils._ChunkedLogProbFunction, utils._use_triton
    # `compact` in TRL's forward is `_use_triton(device)`: say yes so only labelled positions reach the kernel.
    utils._ChunkedLogProbFunction, utils._use_triton = TokenLogProbs, lambda device: True
    try:
        yield
    finally:
        utils._ChunkedLogProbFunction, utils._use_triton = kernel, use_triton


def needs_lean_lm_head(device: torch.device) -> bool:
    """Where TRL's kernel has Triton (CUDA, XPU) it is already compact and fused; elsewhere align's is leaner."""
    from trl.kernels.chunked_logprob import _use_triton

    return not _use_triton(device)


def use_lean_lm_head(model: Any) -> bool:
    """Route ``model(..., fused_lm_head=True)`` (a model TRL patched) through :class:`TokenLogProbs`.

    Returns False (and leaves the model alone) when this TRL does not expose the hook.
    """
    utils = _trl_head_module()
    if utils is None:
        log.info("lean LM head off: this TRL version has no fused-head hook align knows")
        return False
    fused_forward = model.forward

    def forward(*args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        if not fused_lm_head:
            return fused_forward(*args, **kwargs)
        with _lean_kernel(utils):
            return fused_forward(*args, fused_lm_head=True, **kwargs)

    model.forward = forward
    model.align_lean_lm_head = True
    return True


class LeanHeadMixin:
    """Scores log-probs with :func:`use_lean_lm_head` on devices where TRL's head is not lean.

    Installed on the first reference forward (TRL precomputes the reference inside its ``__init__``, right
    after it patches the models) and at the end of ``__init__``, whichever comes first.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._align_lean_heads()

    def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
        self._align_lean_heads()
        return super()._precompute_ref_logps(*args, **kwargs)  # type: ignore[misc]

    def _align_lean_heads(self) -> None:
        trainer: Any = self
        if not needs_lean_lm_head(trainer.accelerator.device):
            return
        policy = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        for model in (policy, getattr(trainer, "ref_model", None)):  # SFT has no reference
            if model is not None and not getattr(model, "align_lean_lm_head", False):
                use_lean_lm_head(model)
