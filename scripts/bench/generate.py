"""Benchmark: align's transformers backend against transformers itself, naive and at its best, in one run.

    python scripts/bench/generate.py            # bundled model, 32 prompts x 4 candidates
    python scripts/bench/generate.py --max-new-tokens 64 --out /tmp/gen.json

The peers: (a) one `model.generate` call per prompt and candidate, as a first script does it; (c) batched
`model.generate`, left-padded batches of prompts, one greedy call and one sampled call with
`num_return_sequences` for the other candidates; (d) transformers' own continuous batching
(`model.generate_batch`, paged attention, the sampled candidates forked from one prompt). Every side uses the
same model, prompts, sampling mix (candidate 0 greedy, the rest temperature 0.8 / top-p 0.95) and
max_new_tokens, and counts only generated tokens (up to and including end-of-turn) and distinct candidates.
Model loading is timed apart from generation. The compute limit is the machine's measured fp32 matmul rate
divided by 2 x parameters FLOPs per token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def matmul_gflops(seconds: float = 3.0, size: int = 1024) -> float:
    """Sustained fp32 matmul rate with torch's current threads: the compute ceiling for a forward pass."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def naive_loop(model_spec: str, prompts: list[dict], num_candidates: int, max_new_tokens: int, seed: int) -> dict:
    """(a) One `model.generate` call per prompt and candidate, as a first script would do it."""
    import torch

    from align.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec).eval()
    eos = tokenizer.eos_token_id
    tokens, start = 0, time.perf_counter()
    for i, text in enumerate(_chat_texts(tokenizer, prompts)):
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        for j in range(num_candidates):
            torch.manual_seed(seed + 1000 * i + j)
            sampling = ({"do_sample": False} if j == 0 else {"do_sample": True, "temperature": 0.8, "top_p": 0.95})
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=eos, **sampling)
            tokens += len(_until_eos(out[0, inputs["input_ids"].shape[1]:].tolist(), eos))
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "params": model.num_parameters()}


def _chat_texts(tokenizer, prompts: list[dict]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                          tokenize=False) for row in prompts]


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def batched_generate(model_spec: str, prompts: list[dict], num_candidates: int, max_new_tokens: int, seed: int,
                     batch_prompts: int) -> dict:
    """(c) `model.generate` at its best without a server: left-padded batches of ``batch_prompts`` prompts, the
    greedy candidate in one call and the sampled ones in another with ``num_return_sequences``."""
    import torch

    from align.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_spec)
    tokenizer.padding_side = "left"
    model = load_model(model_spec).eval()
    eos = tokenizer.eos_token_id
    texts = _chat_texts(tokenizer, prompts)
    tokens, distinct, start = 0, 0, time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(texts), batch_prompts):
            inputs = tokenizer(texts[first:first + batch_prompts], return_tensors="pt", padding=True,
                               add_special_tokens=False)
            width = inputs["input_ids"].shape[1]
            greedy = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=eos)
            torch.manual_seed(seed + first)
            sampled = model.generate(**inputs, do_sample=True, temperature=0.8, top_p=0.95,
                                     max_new_tokens=max_new_tokens, num_return_sequences=num_candidates - 1,
                                     pad_token_id=eos)
            for i in range(greedy.shape[0]):
                rows = [greedy[i]] + [sampled[i * (num_candidates - 1) + j] for j in range(num_candidates - 1)]
                answers = [tuple(_until_eos(row[width:].tolist(), eos)) for row in rows]
                tokens += sum(map(len, answers))
                distinct += len(set(answers))
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "candidates": len(texts) * num_candidates,
            "distinct_candidates": distinct, "batch_prompts": batch_prompts}


def continuous_batching(model_spec: str, prompts: list[dict], num_candidates: int, max_new_tokens: int,
                        seed: int) -> dict:
    """(d) transformers' continuous batching (``generate_batch``): all prompts at once, the greedy candidates in one
    call, the sampled ones in another, forked from each prompt (``num_return_sequences``)."""
    import torch
    from transformers import GenerationConfig

    from align.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec).eval()
    eos = tokenizer.eos_token_id
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in _chat_texts(tokenizer, prompts)]
    common = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": eos}
    answers: dict[int, list[tuple[int, ...]]] = {i: [] for i in range(len(ids))}
    torch.manual_seed(seed)
    start = time.perf_counter()
    for config in (GenerationConfig(do_sample=False, **common),
                   GenerationConfig(do_sample=True, temperature=0.8, top_p=0.95,
                                    num_return_sequences=num_candidates - 1, **common)):
        outputs = model.generate_batch(inputs=ids, generation_config=config, progress_bar=False)
        for request_id, output in outputs.items():
            if output.error:
                raise RuntimeError(f"generate_batch: {request_id}: {output.error}")
            prompt = int(request_id.split("__")[0].removeprefix("req_"))  # children: req_3__child#0
            answers[prompt].append(tuple(_until_eos(list(output.generated_tokens), eos)))
    seconds = time.perf_counter() - start
    return {"tokens": sum(len(a) for rows in answers.values() for a in rows), "seconds": seconds,
            "candidates": sum(map(len, answers.values())),
            "distinct_candidates": sum(len(set(rows)) for rows in answers.values())}


def align_backend(model_spec: str, prompts_path: Path, num_candidates: int, max_new_tokens: int, seed: int,
                  batch_size: int) -> dict:
    """(b) `align generate` with the transformers backend (the same stage function the CLI calls)."""
    from align.generate import GenerateConfig, run_generate

    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "candidates.jsonl"
        result = run_generate(GenerateConfig(
            model=model_spec, prompts=prompts_path, output=output, num_candidates=num_candidates,
            max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=False))
        rows = [json.loads(line) for line in output.read_text().splitlines()]
    distinct = sum(len({c["text"] for c in r["responses"]}) for r in rows)
    return {"tokens": result.tokens, "seconds": result.seconds, "candidates": result.candidates,
            "distinct_candidates": distinct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=Path, default=REPO / "datasets/prompts/chat.jsonl")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--num-candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 128],
                        help="align's sequences per forward pass, each size a row: align generate's default (64) "
                             "first, then 128, every candidate of the 32 prompts in one batch as the best peer's call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--naive-prompts", type=int, default=None,
                        help="run the (slow) naive loop on only the first N prompts; tokens/s stay comparable, "
                             "wall time is then scaled to all prompts by tokens")
    parser.add_argument("--peer-batch-prompts", type=int, nargs="+", default=[16, 32],
                        help="prompts per batched model.generate call, each size a row (x num_candidates - 1 "
                             "sampled rows a call); 32 prompts x 3 sampled rows beat 16 and 8 here")
    parser.add_argument("--out", type=Path, default=REPO / "scripts/bench/results/generate.json")
    args = parser.parse_args()

    import torch

    from align.models import resolve_model

    resolve_model(args.model)  # convert the bundled model once, outside the timings
    prompts = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()][: args.num_prompts]
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "prompts.jsonl"
        subset.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        gflops = matmul_gflops()
        print(f"fp32 matmul: {gflops:.1f} GFLOP/s on {torch.get_num_threads()} threads", flush=True)
        aligns = {}
        for size in args.batch_size:
            aligns[f"align generate (batch {size})"] = run = align_backend(
                args.model, subset, args.num_candidates, args.max_new_tokens, args.seed, size)
            print(f"align (batch {size}) done: {run['tokens']} tokens in {run['seconds']:.1f} s", flush=True)
        default_name = next(iter(aligns))
        ours = aligns[default_name]
        naive_prompts = prompts[: args.naive_prompts or len(prompts)]
        naive = naive_loop(args.model, naive_prompts, args.num_candidates, args.max_new_tokens, args.seed)
        naive["prompts"] = len(naive_prompts)
        print(f"naive done: {naive['tokens']} tokens in {naive['seconds']:.1f} s", flush=True)
        batched = {}
        for size in args.peer_batch_prompts:  # the peer at its best: the batch size that serves it best here
            batched[f"batched model.generate ({size}/call)"] = run = batched_generate(
                args.model, prompts, args.num_candidates, args.max_new_tokens, args.seed, size)
            print(f"batched generate ({size} prompts a call) done: {run['tokens']} tokens in {run['seconds']:.1f} s",
                  flush=True)
        continuous = continuous_batching(args.model, prompts, args.num_candidates, args.max_new_tokens, args.seed)
        print(f"continuous batching done: {continuous['tokens']} tokens in {continuous['seconds']:.1f} s", flush=True)

    flops_per_token = 2 * naive["params"]
    limit = gflops * 1e9 / flops_per_token
    runs = {"naive model.generate loop": naive, **batched, "transformers generate_batch (CB)": continuous, **aligns}
    for run in runs.values():
        run["tokens_per_second"] = run["tokens"] / run["seconds"]
        run["fraction_of_compute_limit"] = run["tokens_per_second"] / limit
    ratio = ours["tokens_per_second"] / naive["tokens_per_second"]
    best_peer = max((*batched, "transformers generate_batch (CB)"), key=lambda name: runs[name]["tokens_per_second"])
    # A naive run on fewer prompts: its time for all of them, at its measured rate, for the same tokens as align's.
    naive_wall = naive["seconds"] if naive["prompts"] == len(prompts) else ours["tokens"] / naive["tokens_per_second"]
    naive["wall_seconds_for_all_prompts"] = naive_wall

    header = f"{'run':36} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'vs naive':>9} {'of limit':>9}"
    print(f"\n{len(prompts)} prompts x {args.num_candidates} candidates, max_new_tokens={args.max_new_tokens}, "
          f"{args.model}, {torch.get_num_threads()} threads; compute limit {limit:.0f} tok/s "
          f"({gflops:.0f} GFLOP/s / {flops_per_token / 1e6:.0f} MFLOP per token)")
    print(header)
    print("-" * len(header))
    for name, run in runs.items():
        speedup = run["tokens_per_second"] / naive["tokens_per_second"]
        print(f"{name:36} {run['tokens']:>7} {run['seconds']:>8.1f} {run['tokens_per_second']:>8.1f} "
              f"{speedup:>8.1f}x {100 * run['fraction_of_compute_limit']:>8.1f}%")
    if naive["prompts"] != len(prompts):
        print(f"naive loop measured on the first {naive['prompts']} prompts; for all {len(prompts)} it would take "
              f"~{naive_wall:.0f} s at that rate")
    print(f"wall-time ratio (naive / align): {naive_wall / ours['seconds']:.1f}x; "
          f"distinct candidates: {ours['distinct_candidates']}/{ours['candidates']}")
    best_rate = runs[best_peer]["tokens_per_second"]
    versus_best = {name: run["tokens_per_second"] / best_rate for name, run in aligns.items()}
    for name, ratio_to_best in versus_best.items():
        print(f"{name} vs the best peer ({best_peer}): {ratio_to_best:.2f}x tokens/s; distinct candidates "
              + ", ".join(f"{n} {runs[n]['distinct_candidates']}/{runs[n]['candidates']}" for n in (best_peer, name)))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": args.model, "prompts": str(args.prompts), "num_prompts": len(prompts),
        "num_candidates": args.num_candidates, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "matmul_gflops": gflops, "flops_per_token": flops_per_token, "compute_limit_tokens_per_second": limit,
        "runs": runs, "speedup_tokens_per_second": ratio, "best_peer": best_peer,
        "speedup_over_best_peer": versus_best[default_name], "speedup_over_best_peer_by_batch": versus_best,
        "speedup_wall_time": naive_wall / ours["seconds"],
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
