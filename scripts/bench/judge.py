"""Benchmark: a generative judge (rationale, then verdict) against align's probability judge (both orders).

    flock /tmp/align-cpu.lock .venv/bin/python scripts/bench/judge.py [--pairs 64] [--candidates candidates.jsonl]
        [--out scripts/bench/results/judge.json]

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

With ``--candidates FILE`` (what ``align generate`` writes), the same is
measured again on the first ``--pairs`` pairs that ``align label judge``
would ask about there (all pairs of each prompt's answers, whole): there the
pairs that show the same answer first share it too.

The pairs go 16 at a time (as ``align label judge`` sends them), and each
chunk is run every way in turn, so a machine that gets busier during the run
slows every way alike. Each chunk also times a plain forward pass of the
model on full rows (no mask, no padding): the fastest any judge that reads
(b)'s tokens could go on this machine.

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
CHUNK_PAIRS = 16  # pairs per judge call, as align label judge sends them (about 32 questions)

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


def load_candidate_pairs(path: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` pairs ``align label judge`` asks about in a candidates file: all pairs of each prompt's answers."""
    from itertools import combinations

    from align.data.validate import read_records
    from align.label.judge import render_prompt
    from align.label.stages import judgeable

    pairs: list[dict[str, Any]] = []
    for candidates in read_records(path, "candidates"):
        answers = [c.text for c in judgeable(candidates)]
        pairs += [{"prompt": render_prompt(candidates.prompt), "a": a, "b": b} for a, b in combinations(answers, 2)]
        if len(pairs) >= n:
            return pairs[:n]
    sys.exit(f"only {len(pairs)} candidate pairs in {path}, asked for {n}")


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
    parser.add_argument("--candidates", type=Path, default=None, help="candidates.jsonl from align generate")
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "bench" / "results" / "judge.json")
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(REPO))
    from align.label.judge import Judge, JudgeSettings, LocalBackend
    from align.models import DEFAULT_MODEL

    model_spec = args.model or DEFAULT_MODEL
    backend = LocalBackend(model_spec, batch_size=args.batch_size, max_response_tokens=10_000)
    pairs = load_pairs(args.data, args.pairs, backend.tokenizer, args.prompt_tokens, args.response_tokens)
    judge = Judge(backend, JudgeSettings(mode="pairwise", tie_margin=0.0))
    judge.compare([(pairs[0]["prompt"], pairs[0]["a"], pairs[0]["b"])])  # warm-up: first-call overheads

    results: dict[str, Any] = {
        "model": model_spec, "device": str(backend.device), "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_max": args.prompt_tokens, "response_tokens_max": args.response_tokens,
        "dataset_pairs": compare_judges(judge, pairs, args.batch_size, args.max_new_tokens),
    }
    lines = [f"judge benchmark: model {model_spec}, {results['device']}, {results['torch_threads']} threads, "
             f"batch {args.batch_size}",
             *table(f"{len(pairs)} pairs from {args.data.name}", results["dataset_pairs"], args.max_new_tokens)]
    if args.candidates:
        candidate_pairs = load_candidate_pairs(args.candidates, args.pairs)
        results["candidate_pairs"] = compare_judges(judge, candidate_pairs, args.batch_size, args.max_new_tokens)
        lines += table(f"{len(candidate_pairs)} pairs of {args.candidates.name} (all pairs of each prompt's answers)",
                       results["candidate_pairs"], args.max_new_tokens)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**results, "table": lines}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


def compare_judges(judge: Any, pairs: list[dict[str, Any]], batch_size: int, max_new_tokens: int) -> dict[str, Any]:
    """(a) and (b), and (b) without shared beginnings, on the same pairs; the speed-up and the agreement."""
    from align.label.agreement import cohen_kappa

    backend = judge.backend
    seconds: dict[str, float] = dict.fromkeys(("shared", "separate", "generative", "reading", "plain"), 0.0)
    tokens = {"shared": 0, "separate": 0}  # read by align's judge
    verdicts, separate, gen_labels, gen_texts, generated, plain_tokens = [], [], [], [], 0, 0

    def timed(name: str, run: Any) -> Any:
        backend.tokens_read = 0
        start = time.perf_counter()
        out = run()
        seconds[name] += time.perf_counter() - start
        if name in tokens:
            tokens[name] += backend.tokens_read
        return out

    # Chunk by chunk, every way in turn: a machine that gets busier during the run slows them all alike.
    for at in range(0, len(pairs), CHUNK_PAIRS):
        chunk = pairs[at:at + CHUNK_PAIRS]
        items = [(p["prompt"], p["a"], p["b"]) for p in chunk]
        verdicts += timed("shared", lambda: judge.compare(items))
        # The same judge with every question its own sequence: what sharing the common beginnings saves.
        backend.share_prefixes = False
        separate += timed("separate", lambda: judge.compare(items))
        backend.share_prefixes = True
        labels, texts, count = timed("generative", lambda: generative_judge(
            backend.model, backend.tokenizer, chunk, batch_size, max_new_tokens))
        gen_labels, gen_texts, generated = gen_labels + labels, gen_texts + texts, generated + count
        # How much of (a) is reading the question (the one forward pass it shares with any judge) and how much
        # is writing: the same batches, generating a single token.
        timed("reading", lambda: generative_judge(backend.model, backend.tokenizer, chunk, batch_size, 1))
        # The fastest any reading judge could go here: the model's forward pass on full rows, no mask, no padding.
        plain_tokens += timed("plain", lambda: forward_pass(backend.model, batch_size))
    prob_labels: list[str | None] = [v.label if v.label in ("a", "b") else None for v in verdicts]
    plain_rate = plain_tokens / seconds["plain"]
    gen_seconds, read_seconds, prob_seconds = seconds["generative"], seconds["reading"], seconds["shared"]
    separate_seconds, prob_tokens, separate_tokens = seconds["separate"], tokens["shared"], tokens["separate"]

    reference: list[str | None] = [p.get("reference") for p in pairs]
    agree, agree_n = agreement(gen_labels, prob_labels)
    both = [(g, p) for g, p in zip(gen_labels, prob_labels) if g and p]
    kappa = cohen_kappa([g for g, _ in both], [p for _, p in both]) if both else None
    n = len(pairs)
    return {
        "pairs": n,
        "generative": {"seconds": round(gen_seconds, 2), "pairs_per_s": round(n / gen_seconds, 3),
                       "questions": n, "generated_tokens": generated, "unparsed": gen_labels.count(None),
                       "reading_seconds": round(read_seconds, 2),
                       "agreement_with_dataset": agreement(gen_labels, reference)[0]},
        "probability_both_orders": {"seconds": round(prob_seconds, 2), "pairs_per_s": round(n / prob_seconds, 3),
                                    "questions": 2 * n, "tokens_read": prob_tokens,
                                    "tokens_per_s": round(prob_tokens / prob_seconds, 1),
                                    "ties": prob_labels.count(None),
                                    "position_inconsistent": sum(bool(v.details.get("position_inconsistent"))
                                                                 for v in verdicts),
                                    "agreement_with_dataset": agreement(prob_labels, reference)[0]},
        "separate_questions": {"seconds": round(separate_seconds, 2), "pairs_per_s": round(n / separate_seconds, 3),
                               "tokens_read": separate_tokens,
                               "largest_score_gap_to_shared": max(abs(a.score - b.score)
                                                                  for a, b in zip(verdicts, separate))},
        "speedup": round(gen_seconds / prob_seconds, 2),
        "plain_forward_tokens_per_s": round(plain_rate, 1),
        "speedup_ceiling": round(gen_seconds / (prob_tokens / plain_rate), 2),
        "agreement_between_judges": agree, "agreement_pairs": agree_n,
        "kappa_between_judges": None if kappa is None or kappa != kappa else round(kappa, 3),
        "generative_samples": gen_texts[:3],
    }


def forward_pass(model: Any, batch_size: int, length: int = 384) -> int:
    """One forward pass of the model on full rows of random tokens; returns the number of tokens."""
    import torch

    ids = torch.randint(100, model.config.vocab_size - 100, (batch_size, length), device=model.device)
    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1)
    return ids.numel()


def table(title: str, r: dict[str, Any], max_new_tokens: int) -> list[str]:
    g, p, s = r["generative"], r["probability_both_orders"], r["separate_questions"]
    n, generated = r["pairs"], g["generated_tokens"]
    return [
        "",
        title,
        f"{'judge':<40} {'seconds':>8} {'pairs/s':>8} {'unparsed/ties':>14} {'vs dataset':>11}",
        f"{'(a) generative: rationale + verdict':<40} {g['seconds']:>8.1f} {g['pairs_per_s']:>8.3f} "
        f"{g['unparsed']:>14} {_pct(g['agreement_with_dataset']):>11}",
        f"{'(b) align: answer probs, both orders':<40} {p['seconds']:>8.1f} {p['pairs_per_s']:>8.3f} "
        f"{p['ties']:>14} {_pct(p['agreement_with_dataset']):>11}",
        f"{'(b) without shared beginnings':<40} {s['seconds']:>8.1f} {s['pairs_per_s']:>8.3f} {'':>14} {'':>11}",
        f"speed-up (b)/(a): {r['speedup']:.1f}x   (a) generated {generated} tokens ({generated / n:.0f}/pair, "
        f"max {max_new_tokens}); (b) {2 * n} questions (both orders), {p['position_inconsistent']} "
        "position-inconsistent",
        f"sharing beginnings: {s['seconds'] / p['seconds']:.2f}x faster ({p['tokens_read']} tokens read instead of "
        f"{s['tokens_read']}), verdict scores within {s['largest_score_gap_to_shared']:.1e}",
        f"(b) reads {p['tokens_per_s']:.0f} tokens/s; the model's plain forward pass {r['plain_forward_tokens_per_s']:.0f}"
        f": at that speed (b) would be {r['speedup_ceiling']:.1f}x faster than (a), the most this machine allows it",
        f"(a) spends {g['reading_seconds']:.1f} s reading its questions (one forward pass each, one order) and "
        f"{g['seconds'] - g['reading_seconds']:.1f} s writing",
        f"agreement between (a) and (b): {_pct(r['agreement_between_judges'])} of {r['agreement_pairs']} pairs both "
        f"decided (Cohen's kappa {r['kappa_between_judges']})",
    ]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    main()
