"""align's lean LM head against TRL's own kernel and TRL's trainers: same log-probs, losses and gradients."""

from __future__ import annotations

import pytest
import torch

from align.train import lm_head
from align.train.lm_head import TokenLogProbs

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


# ----------------------------------------------------------------------------- inside TRL's trainers


def _dpo_rows(n: int) -> list[dict]:
    topics = ["tea", "rain", "maps", "bread", "chess", "owls"]
    return [{"prompt": [{"role": "user", "content": f"Tell me one fact about {topics[i % 6]} (#{i})."}],
             "chosen": [{"role": "assistant", "content": f"{topics[i % 6].capitalize()} is interesting, truly." * (1 + i % 2)}],
             "rejected": [{"role": "assistant", "content": f"No idea about {topics[i % 6]}, sorry. " * (1 + i % 3)}]}
            for i in range(n)]


def _kto_rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Question number {i}?"}],
             "completion": [{"role": "assistant", "content": f"Answer {i}." * (1 + i % 3)}], "label": i % 3 != 0}
            for i in range(n)]


def _one_step(trainer_cls: type, method: str, model_dir, rows: list[dict], lora: bool, **settings) -> tuple:
    """Loss, gradients and logged metrics of one training step of a fresh trainer on a fixed batch."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from align.models import load_tokenizer
    from align.train.config import trl_config_class

    args = trl_config_class(method)(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to=[], max_length=64,
                                    per_device_train_batch_size=4, gradient_checkpointing=False, seed=0, **settings)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    trainer = trainer_cls(model=model, args=args, processing_class=load_tokenizer(str(model_dir)),
                          train_dataset=Dataset.from_list(rows), peft_config=peft_config)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    return loss.detach(), grads, metrics


CASES = {
    # full fine-tune, a separate reference copy (TRL's default without precompute), WPO weights (log sum p^2)
    "dpo-full": ("dpo", False, False, {"precompute_ref_log_probs": False, "use_weighting": True}),
    "dpo-lora-prefix-sharing": ("dpo", True, True, {"precompute_ref_log_probs": False}),
    "dpo-lora-precomputed-ref": ("dpo", True, False, {"precompute_ref_log_probs": True}),
    "kto-lora": ("kto", True, False, {"precompute_ref_log_probs": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainers_give_trls_loss_gradients_and_metrics(case: str, tiny_model_dir, monkeypatch) -> None:
    import trl

    from align.train.run import _trainer_class

    method, lora, prefix_sharing, settings = CASES[case]
    monkeypatch.setattr(lm_head, "TILE_ELEMENTS", 49152 * 7)  # 7 tokens per tile: many tiles per batch
    calls = []
    forward = TokenLogProbs.forward
    monkeypatch.setattr(TokenLogProbs, "forward", staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a)))
    rows = _dpo_rows(8) if method == "dpo" else _kto_rows(8)
    plain = {"dpo": trl.DPOTrainer, "kto": trl.KTOTrainer}[method]
    expected = _one_step(plain, method, tiny_model_dir, rows, lora, **settings)
    assert not calls
    ours = _one_step(_trainer_class(method, prefix_sharing, lean_lm_head=True), method, tiny_model_dir, rows, lora,
                     **settings)
    assert calls, "the lean head was not used"
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == expected[1].keys() and ours[1]
    for name, grad in expected[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ours[2].keys() == expected[2].keys()
    for name, value in expected[2].items():
        assert ours[2][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
