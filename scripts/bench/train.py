"""DPO, KTO or SFT training throughput and memory: plain TRL vs `align train dpo|kto|sft`, in one run.

Same data (the first rows of LLaMA-Factory's dpo_en_demo.json, or kto_en_demo.json for KTO, whose prompt
fits max_length; SFT trains on dpo_en_demo's chosen answers: as many rows as the run trains on, one epoch, so
that a precomputed reference covers only trained rows and no row is dropped), model (bundled
SmolLM2-135M-Instruct), and hyper-parameters (max_length 256, batch 4, 8 steps, seed 0, the same learning
rate), for a full fine-tune and for LoRA:

  (a) TRL's DPOTrainer (KTOTrainer, SFTTrainer) with its defaults, changing only what a CPU needs
      (use_cpu, no bf16);
  (a') TRL at its best for the job: the same, with the reference's log-probs
      computed once before training (precompute_ref_log_probs; not SFT's) and no
      activation recompute (gradient_checkpointing off; TRL 1.16 has no
      use_logits_to_keep, padding_free needs flash attention, and packing would
      train other batches);
  (b) align with its defaults (DPO's loss is [sigmoid, sft]; KTO's class weights from the KTO paper's Eq. 8;
      a held-out slice is scored before and after), with an empty reference cache, then (c)
      again with the cache from (b);
  (d) align doing (a)'s work: TRL's loss (sigmoid; KTO: TRL's class weights of 1), no held-out slice, cold
      then warm cache; and, for the kinds in --ablate, (d) with each of
      align's speed-ups off in turn (DPO: prefix sharing, lean LM head,
      micro-batches, reference cache; KTO: lean LM head, reference cache; SFT: lean LM head, micro-batches),
      each from an empty cache. SFT has no reference, so no warm rows.

The share of the machine: the rows' tokens (as TRL trains them, cut at max_length) times the model FLOPs a
token costs (2 x parameters a forward pass, counting the passes each method needs: the reference's, the
policy's, and its backward, 2 passes' worth for a full fine-tune and 1 for LoRA, whose frozen weights get no
gradient), per second, over the machine's fp32 matmul rate measured in the same run.

Each variant runs in its own process (so peak RSS is its own) and is timed from
process start to finish, model loading and data preparation included. Ratios
are against the faster of the two TRL rows ("TRL's best").

    .venv/bin/python scripts/bench/train.py [--method kto|sft] [--kinds lora] [--steps 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DATA = {"dpo": REPO.parent / "shared" / "data" / "dpo_en_demo.json",
        "kto": REPO.parent / "shared" / "data" / "kto_en_demo.json",
        "sft": REPO.parent / "shared" / "data" / "dpo_en_demo.json"}  # its chosen answers
MAX_LENGTH = 256
LEARNING_RATE = {"full": 5e-6, "lora": 5e-5}  # given to TRL and align alike, so both take the same steps


def trl_worker(method: str, kind: str, rows_file: str, steps: int, out: str) -> None:
    """Plain TRL, as a user would write it; ``kind`` "lora:best" or "full:best" switches on its own speed-ups."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    from align.data.io import iter_rows
    from align.models import DEFAULT_MODEL, load_model, load_tokenizer

    kind, _, setting = kind.partition(":")
    best = {"gradient_checkpointing": False} if setting == "best" else {}
    if setting == "best" and method != "sft":
        best["precompute_ref_log_probs"] = True
    rows = [row for _, row in iter_rows(rows_file)]
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    peft_config = None
    if kind == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    config, trainer_class = {"dpo": (DPOConfig, DPOTrainer), "kto": (KTOConfig, KTOTrainer),
                             "sft": (SFTConfig, SFTTrainer)}[method]
    args = config(output_dir=out, max_steps=steps, per_device_train_batch_size=4, max_length=MAX_LENGTH,
                     learning_rate=LEARNING_RATE[kind], use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                     save_strategy="no", seed=0, **best)
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(out, "losses.json").write_text(json.dumps(losses))


# TRL's loss (and KTO's class weights) and no held-out slice scored: the work TRL does
SAME_WORK_AS_TRL = {"dpo": ("loss_type=sigmoid", "eval_split=0"),
                    "kto": ("desirable_weight=1.0", "undesirable_weight=1.0", "eval_split=0"),
                    "sft": ("eval_split=0",)}
# align's speed-ups, each switched off in turn from the same-work row (same math: tests/test_train_equivalence.py)
ABLATIONS = {"dpo": {"prefix sharing": "prefix_sharing=false", "lean LM head": "lean_lm_head=false",
                     "micro-batches": "micro_batch_size=null", "reference cache": "ref_cache=false"},
             "kto": {"lean LM head": "lean_lm_head=false", "reference cache": "ref_cache=false"},
             "sft": {"lean LM head": "lean_lm_head=false", "micro-batches": "micro_batch_size=null"}}


def align_cmd(method: str, kind: str, data: str, steps: int, out: str, cache: str, *settings: str) -> list[str]:
    return [sys.executable, "-m", "align", "train", method, "--data", data, "-o", out, f"max_steps={steps}",
            "per_device_train_batch_size=4", f"max_length={MAX_LENGTH}", f"ref_cache_dir={cache}", "save_strategy=no",
            f"learning_rate={LEARNING_RATE[kind]}", *(["lora=false"] if kind == "full" else []), *settings]


def variants(method: str, kind: str, data: str, steps: int, work: Path,
             ablate: bool) -> list[tuple[str, list[str], Path]]:
    """(name, command, loss file) of each row of one kind, in the order they run (a warm row after its cold one)."""
    def trl(name: str, best: bool) -> tuple[str, list[str], Path]:
        out = work / f"trl{'-best' if best else ''}-{kind}"
        worker_kind = f"{kind}:best" if best else kind
        return name, [sys.executable, __file__, "--worker", method, worker_kind, data, str(steps), str(out)], \
            out / "losses.json"

    def align(name: str, run: str, cache: str, *settings: str) -> tuple[str, list[str], Path]:
        out = work / f"align-{kind}-{run}"
        cache_dir = str(work / f"ref-cache-{kind}-{cache}")
        return name, align_cmd(method, kind, data, steps, str(out), cache_dir, *settings), out / "metrics.jsonl"

    rows = [trl("TRL defaults", best=False), trl("TRL at its best", best=True)]
    if method == "sft":  # no reference, so nothing to cache
        rows += [align("align defaults", "defaults-1", "defaults"),
                 align("align, TRL's work", "same-1", "same", *SAME_WORK_AS_TRL[method])]
    else:
        rows += [align("align defaults (cold cache)", "defaults-1", "defaults"),
                 align("align defaults (warm cache)", "defaults-2", "defaults"),
                 align("align, TRL's work (cold cache)", "same-1", "same", *SAME_WORK_AS_TRL[method]),
                 align("align, TRL's work (warm cache)", "same-2", "same", *SAME_WORK_AS_TRL[method])]
    if ablate:
        rows += [align(f"  without {name}", f"no-{i}", f"no-{i}", *SAME_WORK_AS_TRL[method], setting)
                 for i, (name, setting) in enumerate(ABLATIONS[method].items())]
    return rows


# Forward passes' worth of model FLOPs per trained token (2 x parameters each): the reference's (DPO, KTO), the
# policy's, and its backward (LoRA: activation gradients only, 1 pass; full: those and weight gradients, 2).
# KTO also runs the policy (no gradient) and the reference on its mismatched KL completions, about as many tokens.
PASSES = {("dpo", "lora"): 3, ("dpo", "full"): 4, ("kto", "lora"): 5, ("kto", "full"): 6,
          ("sft", "lora"): 2, ("sft", "full"): 3}


def _chat_length(tokenizer: Any, messages: list[dict], **kwargs: Any) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def rows_that_train(tokenizer: Any, rows: list[dict], max_length: int) -> list[dict]:
    """The rows whose prompt leaves room for an answer under max_length: TRL drops the others, and a benchmark
    of one epoch should train every row it is given."""
    return [r for r in rows if _chat_length(tokenizer, r["prompt"], add_generation_prompt=True) < max_length]


def trained_tokens(tokenizer: Any, method: str, rows: list[dict], max_length: int) -> int:
    """Tokens of the rows as TRL trains them: each sequence (DPO: chosen and rejected, each with its prompt) cut
    at max_length."""
    def length(prompt: list[dict], completion: list[dict]) -> int:
        return min(_chat_length(tokenizer, prompt + completion), max_length)

    if method == "dpo":
        return sum(length(r["prompt"], r["chosen"]) + length(r["prompt"], r["rejected"]) for r in rows)
    return sum(length(r["prompt"], r["completion"]) for r in rows)


def model_parameters() -> int:
    from align.models import DEFAULT_MODEL, load_model

    return sum(p.numel() for p in load_model(DEFAULT_MODEL).parameters())


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one child process."""
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    stderr = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024 / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(DATA), default="dpo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, help="pairs (KTO: rows) in the data (default: steps x 4, one epoch)")
    parser.add_argument("--kinds", default="full,lora")
    parser.add_argument("--ablate", default="lora", help="kinds that get the ablation rows ('' for none)")
    parser.add_argument("--out", help="results JSON (default: scripts/bench/results/train[-kto].json)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, kind, rows_file, steps, out = args.worker
        return trl_worker(method, kind, rows_file, int(steps), out)
    out = Path(args.out or REPO / "scripts" / "bench" / "results" /
               ("train.json" if args.method == "dpo" else f"train-{args.method}.json"))
    from generate import matmul_gflops  # the same measurement as the generation benchmark's compute limit


    work = Path(tempfile.mkdtemp(prefix="align-bench-train-"))
    env = {**os.environ, "TQDM_DISABLE": "1", "ALIGN_CACHE_DIR": os.environ.get("ALIGN_CACHE_DIR", "")}
    env = {k: v for k, v in env.items() if v != ""}
    data = str(work / "rows.jsonl")
    subprocess.run([sys.executable, "-m", "align", "data", "convert", str(DATA[args.method]),
                    "-o", str(work / "all.jsonl")], check=True, env=env, stdout=subprocess.DEVNULL)
    trained_rows = args.steps * 4
    n_rows = args.rows or trained_rows
    from align.models import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    rows = rows_that_train(tokenizer, [json.loads(line) for line in (work / "all.jsonl").read_text().splitlines()],
                           MAX_LENGTH)[:n_rows]
    if args.method == "sft":  # the chosen answers: what `align data select` would keep
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    Path(data).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = trained_tokens(tokenizer, args.method, rows[:trained_rows], MAX_LENGTH)
    flops_per_pass = 2 * model_parameters() * tokens
    gflops = matmul_gflops()
    print(f"{tokens} tokens trained; fp32 matmul rate {gflops:.1f} GFLOP/s", file=sys.stderr, flush=True)

    results = []
    for kind in args.kinds.split(","):
        rows = variants(args.method, kind, data, args.steps, work, ablate=kind in args.ablate.split(","))
        for name, cmd, loss_file in rows:
            print(f"running {kind} / {name} ...", file=sys.stderr, flush=True)
            wall, rss = run_measured(cmd, env)
            if loss_file.suffix == ".json":
                losses = json.loads(loss_file.read_text())
            else:
                losses = [json.loads(line)["loss"] for line in loss_file.read_text().splitlines() if '"loss"' in line]
            flops = flops_per_pass * PASSES[args.method, kind]
            results.append({"kind": kind, "variant": name, "wall_s": round(wall, 1),
                            "rows_per_s": round(trained_rows / wall, 4), "tokens_per_s": round(tokens / wall, 1),
                            "matmul_share": round(flops / wall / (gflops * 1e9), 3), "peak_rss_gb": round(rss, 2),
                            "first_loss": losses[0], "final_loss": losses[-1]})
            # Each row as soon as it is measured: a long benchmark stopped part-way still says something.
            print(f"  {kind} / {name}: {results[-1]}", file=sys.stderr, flush=True)

    for row in results:
        same_kind = [r for r in results if r["kind"] == row["kind"]]
        defaults = next(r for r in same_kind if r["variant"] == "TRL defaults")
        best = max((r for r in same_kind if r["variant"].startswith("TRL")), key=lambda r: r["rows_per_s"])
        for base, key in ((defaults, "trl"), (best, "trl_best")):
            row[f"speed_vs_{key}"] = round(row["rows_per_s"] / base["rows_per_s"], 2)
            row[f"memory_vs_{key}"] = round(row["peak_rss_gb"] / base["peak_rss_gb"], 2)
        row["trl_best_is"] = best["variant"]

    unit = "pairs" if args.method == "dpo" else "rows"
    header = f"{'kind':5} {'variant':34} {'wall s':>7} {unit + '/s':>8} {'matmul':>7} {'peak GB':>8} {'speed x':>8} " \
             f"{'mem x':>6} {'x TRL best':>10} {'mem best':>8} {'loss@1':>8} {'loss@end':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['kind']:5} {r['variant']:34} {r['wall_s']:7.1f} {r['rows_per_s']:8.3f} {r['matmul_share']:7.1%} "
              f"{r['peak_rss_gb']:8.2f} "
              f"{r['speed_vs_trl']:8.2f} {r['memory_vs_trl']:6.2f} {r['speed_vs_trl_best']:10.2f} "
              f"{r['memory_vs_trl_best']:8.2f} {r['first_loss']:8.4f} {r['final_loss']:9.4f}")
    meta = {"method": args.method, "model": "bundled:smollm2-135m-instruct",
            "data": f"{DATA[args.method].name}: the first {n_rows} rows whose prompt fits max_length"
                    + (" (their chosen answers)" if args.method == "sft" else ""),
            "row": {"dpo": "a pair", "kto": "a labelled answer", "sft": "a prompt and answer"}[args.method],
            "tokens_trained": tokens, "matmul_gflops": round(gflops, 1),
            "passes_per_token": {kind: PASSES[args.method, kind] for kind in args.kinds.split(",")},
            "steps": args.steps, "batch": 4, "max_length": MAX_LENGTH, "learning_rate": LEARNING_RATE,
            "threads": os.environ.get("OMP_NUM_THREADS", "default"), "cpus": os.cpu_count()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
