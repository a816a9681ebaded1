"""The distillation losses alone: sparse top-k equals dense when k covers the vocabulary; limits, tails, gradients."""

from __future__ import annotations

import pytest
import torch

from align.train.distill.losses import (ABSENT, dense_divergence, distillation_loss, masked_mean,
                                        sparse_topk_divergence, token_cross_entropy)

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (0.5, 1.0, 2.0)


def _logits(seed: int, shape=(3, 5, 11), scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_equals_dense_when_k_covers_the_vocabulary(tail: str) -> None:
    student, teacher = _logits(0), _logits(1)
    vocab = student.shape[-1]
    teacher_logp = torch.log_softmax(teacher, dim=-1)  # what align generate stores: temperature-1 log-probs
    # in the teacher's own order (descending, as top-k returns them), plus two absent (padding) slots
    order = teacher_logp.argsort(dim=-1, descending=True)
    ids = torch.cat([order, torch.zeros(*order.shape[:-1], 2, dtype=torch.long)], dim=-1)
    logprobs = torch.cat([teacher_logp.gather(-1, order), torch.full((*order.shape[:-1], 2), ABSENT,
                                                                     dtype=torch.float64)], dim=-1)
    assert ids.shape[-1] == vocab + 2
    for beta in BETAS:
        for temperature in TEMPERATURES:
            dense = dense_divergence(student, teacher, beta=beta, temperature=temperature)
            sparse = sparse_topk_divergence(student, ids, logprobs, beta=beta, temperature=temperature, tail=tail)
            assert torch.allclose(sparse, dense, atol=1e-12, rtol=1e-10), (beta, temperature)


def test_dense_is_trls_generalized_jsd_with_temperature() -> None:
    from align.train.distill import trainer  # noqa: F401  (imports TRL's GKD quietly)
    from trl.experimental.gkd import GKDTrainer

    student, teacher = _logits(2), _logits(3)
    labels = torch.ones(student.shape[:2], dtype=torch.long)
    labels[0, 3:] = -100
    mask = labels != -100
    for beta in BETAS:
        for temperature in TEMPERATURES:
            ours = masked_mean(dense_divergence(student, teacher, beta=beta, temperature=temperature), mask)
            trl = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
            assert float(ours) == pytest.approx(float(trl), rel=1e-9, abs=1e-12)


def test_beta_limits_are_forward_and_reverse_kl() -> None:
    student, teacher = _logits(4), _logits(5)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    forward = (p * (p.log() - q.log())).sum(-1)
    reverse = (q * (q.log() - p.log())).sum(-1)
    assert torch.allclose(dense_divergence(student, teacher, beta=0.0), forward)
    assert torch.allclose(dense_divergence(student, teacher, beta=1.0), reverse)
    middle = dense_divergence(student, teacher, beta=0.5)  # the JSD is bounded by log 2
    assert bool((middle >= 0).all()) and bool((middle <= torch.log(torch.tensor(2.0)) + 1e-12).all())
    assert torch.allclose(dense_divergence(teacher, teacher, beta=0.5), torch.zeros(middle.shape, dtype=middle.dtype))


def test_bucket_charges_the_mass_a_student_leaves_outside_the_teachers_top_k() -> None:
    teacher = _logits(6)
    top = torch.log_softmax(teacher, -1).topk(3, dim=-1)
    # a student with the teacher's logits on its top-3, but much more mass on every other token
    student = teacher.clone()
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, top.indices, False)
    student[outside] += 4.0
    renormalized = sparse_topk_divergence(student, top.indices, top.values, beta=0.0, tail="renormalize")
    bucket = sparse_topk_divergence(student, top.indices, top.values, beta=0.0, tail="bucket")
    assert torch.allclose(renormalized, torch.zeros_like(renormalized), atol=1e-12)  # same shape inside the top-k
    assert bool((bucket > 0.1).all())
    with pytest.raises(ValueError, match="tail"):
        sparse_topk_divergence(student, top.indices, top.values, beta=0.0, tail="drop")  # type: ignore[arg-type]


@pytest.mark.parametrize("beta", BETAS)
def test_gradients_stay_finite_with_absent_slots_and_a_small_tail(beta: float) -> None:
    student = _logits(7).float().requires_grad_()
    teacher_logp = torch.log_softmax(_logits(8, scale=8.0).float(), -1)  # peaked: the top-4 hold almost all mass
    top = teacher_logp.topk(4, dim=-1)
    values = top.values.clone()
    values[..., -1] = float("-inf")  # a slot the writer left empty
    for tail in ("bucket", "renormalize"):
        loss = masked_mean(sparse_topk_divergence(student, top.indices, values, beta=beta, temperature=1.5, tail=tail),
                           torch.ones(student.shape[:2]))
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and bool(torch.isfinite(grad).all()), tail


def test_hard_label_share_and_masking() -> None:
    student = _logits(9)
    labels = torch.randint(0, student.shape[-1], student.shape[:2], generator=torch.Generator().manual_seed(0))
    ce = token_cross_entropy(student, labels)
    reference = torch.nn.functional.cross_entropy(student.flatten(0, 1), labels.flatten(), reduction="none")
    assert torch.allclose(ce, reference.view_as(ce))
    divergence = torch.rand(student.shape[:2], dtype=torch.float64)
    mask = torch.ones(student.shape[:2], dtype=torch.bool)
    mask[1] = False
    mixed = distillation_loss(divergence, ce, mask, alpha=0.25)
    expected = 0.75 * divergence[mask].mean() + 0.25 * ce[mask].mean()
    assert float(mixed) == pytest.approx(float(expected))
    assert float(distillation_loss(divergence, ce, mask, alpha=0.0)) == pytest.approx(float(divergence[mask].mean()))
    assert float(masked_mean(divergence, torch.zeros_like(mask))) == 0.0
