"""Benchmark: a generative judge (rationale, then verdict) against align's probability judge (both orders).

    flock /tmp/align-cpu.lock .venv/bin/python scripts/bench/judge.py [--pairs 64] [--out scripts/bench/results/judge.json]

Both judges use the same model (the bundled SmolLM2-135M-Instruct by default),
loaded once, on the same 64 candidate pairs from LLaMA-Factory's
``dpo_en_demo.json`` (read in place from ../shared/data; prompts and responses
cut to ``--prompt-tokens``/``--response-tokens`` so both judges see exactly
the same text). The dataset's ``chosen`` answer is shown as A in even pairs and
as B in odd ones, so a judge that always says "A" scores 50% against it.

(a) generative, the distilabel/UltraFeedback way: one question per pair, the
    judge writes a short rationale and then "Verdict: A" or "Verdict: B"
    (greedy, batched, up to ``--max-new-tokens``); the verdict is parsed from
    the text, and a missing one counts as unparsed.
(b) align: ``align.label.judge`` reads P(A) from the next-token distribution,
    both orders, batched, and combines them; the two orders share the forward
    pass over their common beginning (align.label.shared_prefix).

Printed: a table (pairs/s, the ratio b/a), how often the two agree (on pairs
both decided), and each judge's agreement with the dataset's preference.
Written: the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dpo_en_demo.json"

GENERATIVE_SYSTEM = ("You are a careful judge of answers to a user's request. Prefer the answer that is more helpful, "
                     "correct and honest. First explain your reasoning in two or three sentences. Then, on the "
                     "last line, write 'Verdict: A' or 'Verdict: B'.")
_VERDICT = re.compile(r"verdict\W{0,3}\s*(?:answer\s*)?\**\s*([AB])\b", re.IGNORECASE)


def load_pairs(path: Path, n: int, tokenizer: Any, prompt_tokens: int, response_tokens: int) -> list[dict[str, Any]]:
    def cut(text: str, limit: int) -> str:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= limit else tokenizer.decode(ids[:limit]) + " …"

    rows = json.loads(path.read_text(encoding="utf-8"))
    pairs = []
    for row in rows:
        turns = row.get("conversations") or []
        if len(turns) != 1 or turns[0].get("from") != "human":
            continue  # single-turn prompts only
        chosen, rejected = row["chosen"]["value"], row["rejected"]["value"]
        if not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip():
            continue
        pairs.append({"prompt": cut(turns[0]["value"], prompt_tokens), "chosen": cut(chosen, response_tokens),
                      "rejected": cut(rejected, response_tokens)})
        if len(pairs) == n:
            break
    if len(pairs) < n:
        sys.exit(f"only {len(pairs)} usable pairs in {path}, asked for {n}")
    for i, pair in enumerate(pairs):  # alternate the dataset's preferred answer between the A and B slots
        pair["a"], pair["b"] = (pair["chosen"], pair["rejected"]) if i % 2 == 0 else (pair["rejected"], pair["chosen"])
        pair["reference"] = "a" if i % 2 == 0 else "b"
    return pairs


def generative_judge(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], batch_size: int,
                     max_new_tokens: int) -> tuple[list[str | None], list[str], int]:
    import torch

    texts = []
    for p in pairs:
        user = (f"[Request]\n{p['prompt']}\n\n[Answer A]\n{p['a']}\n\n[Answer B]\n{p['b']}\n\n"
                "Which answer is better? Explain briefly, then end with 'Verdict: A' or 'Verdict: B'.")
        texts.append(tokenizer.apply_chat_template([{"role": "system", "content": GENERATIVE_SYSTEM},
                                                    {"role": "user", "content": user}],
                                                   tokenize=False, add_generation_prompt=True))
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    generated = 0
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    by_index: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        for row, i in enumerate(chunk):
            tokens = [t for t in new[row].tolist() if t != tokenizer.pad_token_id]
            generated += len(tokens)
            by_index[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    outputs = [by_index[i] for i in range(len(texts))]
    verdicts: list[str | None] = []
    for text in outputs:
        found = _VERDICT.findall(text)
        verdicts.append(found[-1].lower() if found else None)
    return verdicts, outputs, generated


def agreement(x: list[str | None], y: list[str | None]) -> tuple[float | None, int]:
    both = [(a, b) for a, b in zip(x, y) if a in ("a", "b") and b in ("a", "b")]
    if not both:
        return None, 0
    return sum(a == b for a, b in both) / len(both), len(both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="judge model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the generative judge's budget")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "bench" / "results" / "judge.json")
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(REPO))
    from align.label.agreement import cohen_kappa
    from align.label.judge import Judge, JudgeSettings, LocalBackend
    from align.models import DEFAULT_MODEL

    model_spec = args.model or DEFAULT_MODEL
    backend = LocalBackend(model_spec, batch_size=args.batch_size, max_response_tokens=10_000)
    model, tokenizer = backend.model, backend.tokenizer
    pairs = load_pairs(args.data, args.pairs, tokenizer, args.prompt_tokens, args.response_tokens)
    judge = Judge(backend, JudgeSettings(mode="pairwise", tie_margin=0.0))
    judge.compare([(pairs[0]["prompt"], pairs[0]["a"], pairs[0]["b"])])  # warm-up: first-call overheads

    start = time.perf_counter()
    verdicts = judge.compare([(p["prompt"], p["a"], p["b"]) for p in pairs])
    prob_seconds = time.perf_counter() - start
    prob_labels: list[str | None] = [v.label if v.label in ("a", "b") else None for v in verdicts]

    # The same judge with every question its own sequence: what sharing the common beginnings saves.
    backend.share_prefixes = False
    start = time.perf_counter()
    separate = judge.compare([(p["prompt"], p["a"], p["b"]) for p in pairs])
    separate_seconds = time.perf_counter() - start
    backend.share_prefixes = True
    largest_gap = max(abs(a.score - b.score) for a, b in zip(verdicts, separate))

    start = time.perf_counter()
    gen_labels, gen_texts, generated = generative_judge(model, tokenizer, pairs, args.batch_size, args.max_new_tokens)
    gen_seconds = time.perf_counter() - start

    # How much of (a) is reading the question (the one forward pass it shares with any judge) and how much
    # is writing: the same batches, generating a single token.
    start = time.perf_counter()
    generative_judge(model, tokenizer, pairs, args.batch_size, 1)
    read_seconds = time.perf_counter() - start

    reference: list[str | None] = [p["reference"] for p in pairs]
    agree, agree_n = agreement(gen_labels, prob_labels)
    both = [(g, p) for g, p in zip(gen_labels, prob_labels) if g and p]
    kappa = cohen_kappa([g for g, _ in both], [p for _, p in both]) if both else None
    gen_rate, prob_rate = len(pairs) / gen_seconds, len(pairs) / prob_seconds
    results = {
        "model": model_spec, "device": str(backend.device), "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(), "pairs": len(pairs), "batch_size": args.batch_size,
        "prompt_tokens_max": args.prompt_tokens, "response_tokens_max": args.response_tokens,
        "generative": {"seconds": round(gen_seconds, 2), "pairs_per_s": round(gen_rate, 3),
                       "questions": len(pairs), "max_new_tokens": args.max_new_tokens,
                       "generated_tokens": generated, "unparsed": sum(v is None for v in gen_labels),
                       "reading_seconds": round(read_seconds, 2),
                       "agreement_with_dataset": agreement(gen_labels, reference)[0]},
        "probability_both_orders": {"seconds": round(prob_seconds, 2), "pairs_per_s": round(prob_rate, 3),
                                    "questions": 2 * len(pairs), "ties": sum(v is None for v in prob_labels),
                                    "position_inconsistent": sum(bool(v.details.get("position_inconsistent"))
                                                                 for v in verdicts),
                                    "agreement_with_dataset": agreement(prob_labels, reference)[0]},
        "separate_questions": {"seconds": round(separate_seconds, 2),
                               "pairs_per_s": round(len(pairs) / separate_seconds, 3),
                               "largest_score_gap_to_shared": largest_gap},
        "speedup": round(prob_rate / gen_rate, 2),
        "agreement_between_judges": agree, "agreement_pairs": agree_n,
        "kappa_between_judges": None if kappa is None or kappa != kappa else round(kappa, 3),
        "generative_samples": gen_texts[:3],
    }
    g, p = results["generative"], results["probability_both_orders"]
    lines = [
        f"judge benchmark: {len(pairs)} pairs from {args.data.name}, model {model_spec}, {results['device']}, "
        f"{results['torch_threads']} threads, batch {args.batch_size}",
        f"{'judge':<40} {'seconds':>8} {'pairs/s':>8} {'unparsed/ties':>14} {'vs dataset':>11}",
        f"{'(a) generative: rationale + verdict':<40} {g['seconds']:>8.1f} {g['pairs_per_s']:>8.3f} "
        f"{g['unparsed']:>14} {_pct(g['agreement_with_dataset']):>11}",
        f"{'(b) align: answer probs, both orders':<40} {p['seconds']:>8.1f} {p['pairs_per_s']:>8.3f} "
        f"{p['ties']:>14} {_pct(p['agreement_with_dataset']):>11}",
        f"{'(b) without shared beginnings':<40} {separate_seconds:>8.1f} {len(pairs) / separate_seconds:>8.3f} "
        f"{'':>14} {'':>11}",
        f"speed-up (b)/(a): {results['speedup']:.1f}x   "
        f"(a) generated {generated} tokens ({generated / len(pairs):.0f}/pair, max {args.max_new_tokens}); "
        f"(b) {2 * len(pairs)} questions (both orders), {p['position_inconsistent']} position-inconsistent",
        f"sharing beginnings: {separate_seconds / prob_seconds:.2f}x faster, verdict scores within {largest_gap:.1e}",
        f"(a) spends {read_seconds:.1f} s reading its questions (one forward pass each, one order) and "
        f"{gen_seconds - read_seconds:.1f} s writing",
        f"agreement between (a) and (b): {_pct(agree)} of {agree_n} pairs both decided"
        f" (Cohen's kappa {results['kappa_between_judges']})",
    ]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**results, "table": lines}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    main()
