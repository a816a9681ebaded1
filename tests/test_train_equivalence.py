"""align's DPO/KTO trainers against plain TRL on one step: same loss, gradients and logged metrics.

align's trainer classes add prefix sharing (DPO), the lean LM head and selective
recompute on top of TRL's DPOTrainer/KTOTrainer; none of them may change the math.
"""

from __future__ import annotations

import pytest
import torch

from align.train.speedups import lm_head, recompute
from align.train.speedups.lm_head import TokenLogProbs


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
    recomputing = sum(getattr(m, "align_selective_recompute", False) for m in trainer.model.modules())
    return loss.detach(), grads, metrics, recomputing


CASES = {
    # full fine-tune, a separate reference copy (TRL's default without precompute), WPO weights (log sum p^2)
    "dpo-full": ("dpo", False, False, {"precompute_ref_log_probs": False, "use_weighting": True}),
    "dpo-lora-prefix-sharing": ("dpo", True, True, {"precompute_ref_log_probs": False}),
    "dpo-lora-precomputed-ref": ("dpo", True, False, {"precompute_ref_log_probs": True}),
    "kto-lora": ("kto", True, False, {"precompute_ref_log_probs": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_align_trainers_give_trls_loss_gradients_and_metrics(case: str, tiny_model_dir, monkeypatch) -> None:
    import trl

    from align.train.run import _trainer_class

    method, lora, prefix_sharing, settings = CASES[case]
    monkeypatch.setattr(lm_head, "TILE_ELEMENTS", 49152 * 7)  # 7 tokens per tile: many tiles per batch
    monkeypatch.setattr(recompute, "MIN_KEPT_INNER_DIM", 8)  # the tiny model is 32 wide: keep its matmuls
    calls = []
    forward = TokenLogProbs.forward
    monkeypatch.setattr(TokenLogProbs, "forward", staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a)))
    rows = _dpo_rows(8) if method == "dpo" else _kto_rows(8)
    plain = {"dpo": trl.DPOTrainer, "kto": trl.KTOTrainer}[method]
    expected = _one_step(plain, method, tiny_model_dir, rows, lora, **settings)
    assert not calls
    ours = _one_step(_trainer_class(method, prefix_sharing, lean_lm_head=True, selective_recompute=True), method,
                     tiny_model_dir, rows, lora, **settings)
    assert calls, "the lean head was not used"
    assert expected[3] == 0 and ours[3] == 2, "selective recompute is not on for both decoder layers"
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == expected[1].keys() and ours[1]
    for name, grad in expected[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ours[2].keys() == expected[2].keys()
    for name, value in expected[2].items():
        assert ours[2][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_eval_rewards_read_from_trls_forward_equal_a_separate_pass(method: str, tiny_model_dir) -> None:
    """The held-out rewards (DPO margins, KTO rewards) align reads off TRL's own eval forwards are those of a
    pass of their own."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from align.models import load_tokenizer
    from align.train.config import trl_config_class
    from align.train.heldout import dpo_heldout_margins, evaluate_with_accuracy, kto_heldout_rewards
    from align.train.run import _trainer_class

    rows = _dpo_rows(12) if method == "dpo" else _kto_rows(12)
    args = trl_config_class(method)(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to=[], max_length=64,
                                    per_device_train_batch_size=4, per_device_eval_batch_size=3, max_steps=2,
                                    learning_rate=1e-3, gradient_checkpointing=False, precompute_ref_log_probs=True,
                                    save_strategy="no", seed=0)
    trainer = _trainer_class(method, prefix_sharing=True)(
        model=AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), args=args,
        processing_class=load_tokenizer(str(tiny_model_dir)), train_dataset=Dataset.from_list(rows[:8]),
        eval_dataset=Dataset.from_list(rows[8:]),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()  # rewards away from 0
    trainer.align_eval_rewards = []
    metrics = trainer.evaluate()
    read = trainer.align_eval_rewards
    assert read is not None and "eval_loss" in metrics
    if method == "dpo":
        separate = dpo_heldout_margins(trainer)
        assert len(read) == len(separate) == 4
        assert read == pytest.approx(separate, rel=1e-4, abs=1e-6)
        assert any(abs(m) > 1e-3 for m in read)
    else:
        rewards, labels = kto_heldout_rewards(trainer)
        assert len(read) == len(rewards) == 4
        assert [r for r, _ in read] == pytest.approx(rewards, rel=1e-4, abs=1e-6)
        assert [d for _, d in read] == labels == [row["label"] for row in rows[8:]]
        assert any(abs(r) > 1e-3 for r in rewards)
    assert evaluate_with_accuracy(trainer, tie_tolerance=0.0)[1] is not None
    if method == "dpo":  # the margin in standard errors counts each prompt once, in the eval dataset's order
        from align.train.heldout import margin_in_standard_errors

        keys = ["a", "a", "b", "c"]
        _, _, margin_z = evaluate_with_accuracy(trainer, tie_tolerance=0.0, prompts=keys)
        assert margin_z == pytest.approx(margin_in_standard_errors(separate, keys), rel=1e-3)
        assert evaluate_with_accuracy(trainer, tie_tolerance=0.0, prompts=keys[:3])[2] is None  # not one each


# ----------------------------------------------------------------------------- micro-batches and the sft term


def test_sft_term_scales_turn_per_pass_token_means_into_each_batchs_token_mean() -> None:
    """(1/K) sum_m c_m S_m / n_m equals (1/G) sum_g S_g / N_g: TRL's step over G whole batches."""
    from align.train.speedups.micro_batches import sft_term_scales

    assert sft_term_scales([2, 6, 3, 5], 4) == pytest.approx([0.5, 1.5, 0.75, 1.25])  # n_m * K / N
    nll = [3.0, 13.0, 5.5, 9.0, 4.0, 7.5, 2.0]  # S_m: summed NLL of each pass's chosen tokens
    for tokens, per_batch in (([2, 6, 3, 5, 1, 4, 2], 2), ([2, 6, 3, 5, 1, 4, 2], 3), ([2, 6, 3], 1)):
        scales = sft_term_scales(tokens, per_batch)
        passes = len(tokens)
        micro = sum(c * s / n for c, s, n in zip(scales, nll, tokens)) / passes
        batches = [slice(i, i + per_batch) for i in range(0, passes, per_batch)]  # the last one short
        whole = sum(sum(nll[b]) / sum(tokens[b]) for b in batches) / len(batches)
        assert micro == pytest.approx(whole, rel=1e-12)
    assert sft_term_scales([0, 4], 2) == [0.0, 2.0]  # a pass without chosen tokens adds nothing


def test_the_scale_enters_through_trls_loss_weights_for_one_pass_only() -> None:
    from types import SimpleNamespace

    from align.train.speedups.micro_batches import sft_term_scaled

    trainer = SimpleNamespace(loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    with sft_term_scaled(trainer, 1.5):
        assert (trainer.loss_types, trainer.loss_weights) == (["sigmoid", "sft"], [1.0, 0.75])
    with sft_term_scaled(trainer, 0.0):  # no chosen tokens: TRL's empty mean would be NaN, so the term is left out
        assert (trainer.loss_types, trainer.loss_weights) == (["sigmoid"], [1.0])
    assert (trainer.loss_types, trainer.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])


def _sft_rows(n: int) -> list[dict]:
    """Pairs whose chosen answers differ in length (1x to 4x), so a token mean per pass is not the batch's."""
    rows = _dpo_rows(n)
    for i, row in enumerate(rows):
        row["chosen"][0]["content"] = f"Fact {i}: it is quite remarkable. " * (1 + 3 * (i % 2)) + f"Number {i * 7}."
    return rows


def _micro_step(trainer_cls: type, model_dir, rows: list[dict], lora: bool, passes: int, *, mark: bool,
                **settings) -> tuple:
    """Loss (as the Trainer logs it), gradients and per-step metric means of one optimizer step of 4 pairs run
    as ``passes`` passes through the Trainer's own get_batch_samples and training_step; ``mark``: tell the
    trainer how many passes make up the batch (what build_trl_args does when it splits a batch)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from align.models import load_tokenizer
    from align.train.config import PASSES_PER_BATCH_ATTR, trl_config_class

    size = 4 // passes
    args = trl_config_class("dpo")(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to=[], max_length=64,
                                   per_device_train_batch_size=size, gradient_accumulation_steps=passes,
                                   gradient_checkpointing=False, seed=0, **settings)
    if mark:
        setattr(args, PASSES_PER_BATCH_ATTR, passes)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    trainer = trainer_cls(model=AutoModelForCausalLM.from_pretrained(str(model_dir)), args=args,
                          processing_class=load_tokenizer(str(model_dir)), train_dataset=Dataset.from_list(rows),
                          peft_config=peft_config)
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in range(j, j + size)])
               for j in range(0, 4, size)]
    samples, num_items = trainer.get_batch_samples(iter(batches), passes, trainer.args.device)
    trainer.current_gradient_accumulation_steps = len(samples)  # as the training loop sets it
    loss = sum(trainer.training_step(trainer.model, batch, num_items) for batch in samples)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}  # as TRL's log averages them
    return loss, grads, metrics


SFT_MICRO_CASES = {
    # LoRA with the reference as the adapter switched off, shared prompts, the lean LM head (CPU)
    "lora-prefix-sharing": (True, True, {"precompute_ref_log_probs": False}),
    # full fine-tune, ld_alpha (LD-DPO weighs the rewards' tail tokens; the sft term stays plain)
    "full-ld-alpha": (False, False, {"precompute_ref_log_probs": False, "ld_alpha": 0.5}),
}


@pytest.mark.parametrize("case", list(SFT_MICRO_CASES))
def test_micro_batches_give_trls_whole_batch_sft_loss_and_gradients(case: str, tiny_model_dir) -> None:
    """align's default loss [sigmoid, sft] on 4 pairs of unequal chosen lengths: 4 passes of one pair (or 2 of
    two) give TRL's loss and gradients on the whole batch; without the rescaling they would not."""
    import trl

    from align.train.run import _trainer_class

    lora, prefix_sharing, settings = SFT_MICRO_CASES[case]
    settings = {**settings, "loss_type": ["sigmoid", "sft"]}
    rows = _sft_rows(8)
    expected = _one_step(trl.DPOTrainer, "dpo", tiny_model_dir, rows, lora, **settings)
    ours_cls = _trainer_class("dpo", prefix_sharing, lean_lm_head=True)
    for passes in (4, 2):
        loss, grads, metrics = _micro_step(ours_cls, tiny_model_dir, rows, lora, passes, mark=True, **settings)
        torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
        assert grads.keys() == expected[1].keys() and grads
        for name, grad in expected[1].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{passes} passes: {name}")
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                     "logps/rejected"):  # per-pair means; token-weighted ones (entropy, logits/*) are per-pass means
            assert metrics[name] == pytest.approx(expected[2][name], rel=1e-5, abs=1e-6), name

    # The same passes with TRL's per-pass token mean (the trainer not told they make up one batch): the mean of
    # per-pair token means is not the batch's token mean, so the loss and gradients differ and the test can fail.
    loss, grads, _ = _micro_step(ours_cls, tiny_model_dir, rows, lora, 4, mark=False, **settings)
    assert abs(loss.item() - expected[0].item()) > 1e-3
    assert any(not torch.allclose(grads[name], grad, rtol=1e-2, atol=1e-5) for name, grad in expected[1].items())
