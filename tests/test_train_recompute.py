"""Selective recompute: same gradients, matmuls not redone, the cheap rest recomputed."""

from __future__ import annotations

import torch
from align.train.speedups import recompute
from align.train.speedups.recompute import enable_selective_recompute, keep_output

aten = torch.ops.aten


def test_keep_output_policy() -> None:
    wide, narrow = torch.empty(5, 576), torch.empty(5, 16)
    assert keep_output(aten.mm.default, (wide, torch.empty(576, 8)))
    assert not keep_output(aten.mm.default, (narrow, torch.empty(16, 576)))  # LoRA's rank-16 up-projection
    assert keep_output(aten.addmm.default, (torch.empty(8), wide, torch.empty(576, 8)))
    assert keep_output(aten._scaled_dot_product_flash_attention_for_cpu.default, ())
    assert not keep_output(aten.mul.Tensor, (wide, wide)) and not keep_output(aten.silu.default, (wide,))


def test_same_gradients_without_redoing_matmuls(tiny_model_dir, monkeypatch) -> None:
    from torch.utils.checkpoint import CheckpointPolicy
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(recompute, "MIN_KEPT_INNER_DIM", 8)  # the tiny model is 32 wide
    policy, recomputed = recompute._policy, []  # ops whose outputs the backward recomputes

    def spy(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if decision != CheckpointPolicy.MUST_SAVE:
            recomputed.append(op)
        return decision

    monkeypatch.setattr(recompute, "_policy", spy)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for selective in (False, True):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).train()
        activations = []
        model.model.layers[0].mlp.act_fn.register_forward_hook(lambda *_: activations.append(1))
        if selective:
            assert enable_selective_recompute(model) == 2
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(activations)))
    (loss, grads, acts), (loss_s, grads_s, acts_s) = results
    torch.testing.assert_close(loss_s, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert (acts, acts_s) == (1, 2)  # the backward redoes the element-wise steps (here: SiLU) ...
    assert aten.silu.default in recomputed and aten.rsqrt.default in recomputed
    assert not {aten.mm.default, aten.addmm.default, aten.bmm.default} & set(recomputed)  # ... but no matmul
