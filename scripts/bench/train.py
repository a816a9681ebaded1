"""DPO training throughput and memory: plain TRL vs `align train dpo`, in one run.

Same data (the first 64 pairs of LLaMA-Factory's dpo_en_demo.json), model
(bundled SmolLM2-135M-Instruct), and hyper-parameters (max_length 256, batch 4,
8 steps, seed 0, the same learning rate), for a full fine-tune and for LoRA:

  (a) TRL's DPOTrainer with its defaults, changing only what a CPU needs
      (use_cpu, no bf16);
  (a') TRL at its best for the job: the same, with the reference's log-probs
      computed once before training (precompute_ref_log_probs) and no
      activation recompute (gradient_checkpointing off; TRL 1.16 has no
      use_logits_to_keep, and padding_free needs flash attention);
  (b) align with its defaults, with an empty reference cache (first run);
  (c) align again (the reference cache from (b) is reused).

Each variant runs in its own process (so peak RSS is its own) and is timed from
process start to finish, model loading and data preparation included.

    .venv/bin/python scripts/bench/train.py [--steps 8] [--out scripts/bench/results/train.json]
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

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "dpo_en_demo.json"
LEARNING_RATE = {"full": 5e-6, "lora": 5e-5}  # align's defaults; given to TRL too so both take the same steps


def trl_worker(kind: str, pairs: str, steps: int, out: str) -> None:
    """Plain TRL, as a user would write it; ``kind`` "lora:best" or "full:best" switches on its own speed-ups."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from align.data.io import iter_rows
    from align.models import DEFAULT_MODEL, load_model, load_tokenizer

    kind, _, setting = kind.partition(":")
    best = {"precompute_ref_log_probs": True, "gradient_checkpointing": False} if setting == "best" else {}
    rows = [row for _, row in iter_rows(pairs)]
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    peft_config = None
    if kind == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, max_length=256,
                     learning_rate=LEARNING_RATE[kind], use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                     save_strategy="no", seed=0, **best)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(out, "losses.json").write_text(json.dumps(losses))


def align_cmd(kind: str, pairs: str, steps: int, out: str, cache: str) -> list[str]:
    return [sys.executable, "-m", "align", "train", "dpo", "--data", pairs, "-o", out, f"max_steps={steps}",
            "per_device_train_batch_size=4", "max_length=256", f"ref_cache_dir={cache}", "save_strategy=no",
            f"learning_rate={LEARNING_RATE[kind]}", *(["lora=false"] if kind == "full" else [])]


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
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--kinds", default="full,lora")
    parser.add_argument("--out", default=str(REPO / "scripts" / "bench" / "results" / "train.json"))
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "PAIRS", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, pairs, steps, out = args.worker
        return trl_worker(kind, pairs, int(steps), out)

    work = Path(tempfile.mkdtemp(prefix="align-bench-train-"))
    env = {**os.environ, "TQDM_DISABLE": "1", "ALIGN_CACHE_DIR": os.environ.get("ALIGN_CACHE_DIR", "")}
    env = {k: v for k, v in env.items() if v != ""}
    pairs = str(work / "pairs.jsonl")
    subprocess.run([sys.executable, "-m", "align", "data", "convert", str(DATA), "-o", str(work / "all.jsonl")],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    lines = (work / "all.jsonl").read_text().splitlines()[: args.pairs]
    Path(pairs).write_text("\n".join(lines) + "\n")
    trained_pairs = args.steps * 4

    results = []
    for kind in args.kinds.split(","):
        cache = str(work / f"ref-cache-{kind}")
        variants = [
            ("TRL defaults", [sys.executable, __file__, "--worker", kind, pairs, str(args.steps), str(work / f"trl-{kind}")],
             work / f"trl-{kind}" / "losses.json"),
            ("TRL at its best", [sys.executable, __file__, "--worker", f"{kind}:best", pairs, str(args.steps),
                                 str(work / f"trl-best-{kind}")], work / f"trl-best-{kind}" / "losses.json"),
            ("align (cold cache)", align_cmd(kind, pairs, args.steps, str(work / f"align-{kind}-1"), cache),
             work / f"align-{kind}-1" / "metrics.jsonl"),
            ("align (warm cache)", align_cmd(kind, pairs, args.steps, str(work / f"align-{kind}-2"), cache),
             work / f"align-{kind}-2" / "metrics.jsonl"),
        ]
        for name, cmd, loss_file in variants:
            print(f"running {kind} / {name} ...", file=sys.stderr, flush=True)
            wall, rss = run_measured(cmd, env)
            if loss_file.suffix == ".json":
                losses = json.loads(loss_file.read_text())
            else:
                losses = [json.loads(line)["loss"] for line in loss_file.read_text().splitlines() if '"loss"' in line]
            results.append({"kind": kind, "variant": name, "wall_s": round(wall, 1),
                            "pairs_per_s": round(trained_pairs / wall, 4), "peak_rss_gb": round(rss, 2),
                            "first_loss": losses[0], "final_loss": losses[-1]})
            # Each row as soon as it is measured: a long benchmark stopped part-way still says something.
            print(f"  {kind} / {name}: {results[-1]}", file=sys.stderr, flush=True)

    for row in results:
        for base_name, key in (("TRL defaults", "trl"), ("TRL at its best", "trl_best")):
            base = next(r for r in results if r["kind"] == row["kind"] and r["variant"] == base_name)
            row[f"speed_vs_{key}"] = round(row["pairs_per_s"] / base["pairs_per_s"], 2)
            row[f"memory_vs_{key}"] = round(row["peak_rss_gb"] / base["peak_rss_gb"], 2)

    header = f"{'kind':5} {'variant':20} {'wall s':>7} {'pairs/s':>8} {'peak GB':>8} {'speed x':>8} {'mem x':>6} " \
             f"{'x best':>7} {'mem best':>8} {'loss@1':>8} {'loss@end':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['kind']:5} {r['variant']:20} {r['wall_s']:7.1f} {r['pairs_per_s']:8.3f} {r['peak_rss_gb']:8.2f} "
              f"{r['speed_vs_trl']:8.2f} {r['memory_vs_trl']:6.2f} {r['speed_vs_trl_best']:7.2f} "
              f"{r['memory_vs_trl_best']:8.2f} {r['first_loss']:8.4f} {r['final_loss']:9.4f}")
    meta = {"model": "bundled:smollm2-135m-instruct", "data": f"dpo_en_demo.json first {args.pairs} pairs",
            "steps": args.steps, "batch": 4, "max_length": 256, "learning_rate": LEARNING_RATE,
            "threads": os.environ.get("OMP_NUM_THREADS", "default"), "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
