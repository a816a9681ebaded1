"""align's lean LM head against TRL's own kernel and TRL's trainers: same log-probs, losses and gradients."""

from __future__ import annotations

import pytest
import torch

from align.train.speedups import lm_head
from align.train.speedups.lm_head import TokenLogProbs

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _trl_kernel(*args):
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(*args)


@pytest.mark.parametrize("temperature,softcap,scale,with_bias", [(1.0, None, 1.0, False), (0.7, 30.0, 0.5, True)])
def test_token_log_probs_match_trls_kernel(monkeypatch, temperature, softcap, scale, with_bias) -> None:
    """Values and gradients (log-probs and entropy both carry one) equal TRL's kernel, over several tiles."""
    monkeypatch.setattr(lm_head, "TILE_ELEMENTS", 3 * 1000 + 7)  # 3 rows per tile, a ragged last tile
    gen = torch.Generator().manual_seed(0)
    n, h, v = 11, 16, 1000
    hidden = (torch.randn(n, h, generator=gen) * 2).requires_grad_()
    weight = torch.randn(v, h, generator=gen).requires_grad_()
    bias = torch.randn(v, generator=gen).requires_grad_() if with_bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[3] = (hidden[3] @ weight.t()).argmax().detach()  # at least one top-1 hit
    g_logp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    results = []
    for kernel in (_trl_kernel, TokenLogProbs.apply):
        out = kernel(hidden, weight, bias, targets, temperature, 256, softcap, scale, OUTPUTS)
        params = [hidden, weight] + ([bias] if bias is not None else [])
        grads = torch.autograd.grad((out[0] * g_logp).sum() + (out[1] * g_ent).sum(), params)
        results.append((out, grads))
    (trl_out, trl_grads), (ours, our_grads) = results
    for name, a, b in zip(OUTPUTS, trl_out, ours):
        if name == "is_top1":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    for a, b in zip(trl_grads, our_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_only_requested_outputs_and_no_entropy_gradient_needed() -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen)
    targets = torch.randint(0, 50, (5,), generator=gen)
    log_probs, entropy, log_sum_sq, mean_logits, is_top1 = TokenLogProbs.apply(
        hidden, weight, None, targets, 1.0, 0, None, 1.0, ("log_probs",))
    assert entropy is None and log_sum_sq is None and mean_logits is None and is_top1 is None
    expected = torch.log_softmax(hidden @ weight.t(), dim=1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(log_probs, expected)
    (grad,) = torch.autograd.grad(log_probs.sum(), hidden)
    (expected_grad,) = torch.autograd.grad(expected.sum(), hidden)
    torch.testing.assert_close(grad, expected_grad)
