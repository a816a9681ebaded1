"""What quantising cost, measured on the run's own prompts: per-token KL(float || quantised) over the float model's
greedy answers, how often the two agree on the next token, and one answer from the quantised model to read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from align.models.tokens import eos_token_ids, prompt_token_ids

ANSWER_TOKENS = 64


def token_kl(reference_logp: Any, other_logp: Any) -> Any:
    """KL(reference || other) at each position, from log-probabilities over the vocabulary (last dim)."""
    return (reference_logp.exp() * (reference_logp - other_logp)).sum(-1)


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[Any], max_new_tokens: int) -> list[list[int]]:
    """Greedy answer ids for each prompt, one prompt at a time (a left-padded batch would change the float
    model's answers slightly with padding; the check compares like with like)."""
    import torch

    stop = eos_token_ids(model, tokenizer)
    answers = []
    model.eval()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt_token_ids(tokenizer, prompt)], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
            answers.append(out[0, ids.shape[1]:].tolist())
    return answers


def quantisation_check(float_model: Any, quantised_model: Any, tokenizer: Any, prompts: Sequence[Any]
                       ) -> dict[str, Any]:
    """KL per token and next-token agreement of ``quantised_model`` against ``float_model`` on the float model's
    greedy answers to ``prompts``, and the quantised model's own greedy answer to the first prompt."""
    import torch

    answers = greedy_answers(float_model, tokenizer, prompts, ANSWER_TOKENS)
    kl_sum, agree, tokens = 0.0, 0, 0
    with torch.inference_mode():
        for prompt, answer in zip(prompts, answers):
            if not answer:
                continue
            prompt_ids = prompt_token_ids(tokenizer, prompt)
            ids = torch.tensor([prompt_ids + answer])
            start = len(prompt_ids) - 1  # the logits that predict the answer's tokens
            ref = _answer_logp(float_model, ids, start, len(answer))
            other = _answer_logp(quantised_model, ids, start, len(answer))
            kl_sum += float(token_kl(ref, other).sum())
            agree += int((ref.argmax(-1) == other.argmax(-1)).sum())
            tokens += len(answer)
    smoke = greedy_answers(quantised_model, tokenizer, prompts[:1], ANSWER_TOKENS)[0]
    return {
        "prompts": len(prompts), "tokens": tokens,
        "kl_per_token": float(f"{kl_sum / tokens:.3g}") if tokens else None,
        "next_token_agreement": round(agree / tokens, 4) if tokens else None,
        "smoke": {"prompt": prompts[0], "answer": tokenizer.decode(smoke, skip_special_tokens=True)},
    }


def _answer_logp(model: Any, ids: Any, start: int, length: int) -> Any:
    import torch

    logits = model(input_ids=ids.to(model.device)).logits[0, start:start + length].float().cpu()
    return torch.log_softmax(logits, dim=-1)


__all__ = ["quantisation_check", "token_kl"]
