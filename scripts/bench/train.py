"""DPO or KTO training throughput and memory: plain TRL vs `align train dpo|kto`, in one run.

Same data (the first rows of LLaMA-Factory's dpo_en_demo.json or
kto_en_demo.json: as many as the run trains on, one epoch, so that a
precomputed reference covers only trained rows), model (bundled SmolLM2-135M-Instruct), and hyper-parameters
(max_length 256, batch 4, 8 steps, seed 0, the same learning rate), for a full
fine-tune and for LoRA:

  (a) TRL's DPOTrainer (KTOTrainer) with its defaults, changing only what a CPU needs
      (use_cpu, no bf16);
  (a') TRL at its best for the job: the same, with the reference's log-probs
      computed once before training (precompute_ref_log_probs) and no
      activation recompute (gradient_checkpointing off; TRL 1.16 has no
      use_logits_to_keep, and padding_free needs flash attention);
  (b) align with its defaults (DPO's loss is [sigmoid, sft]; a held-out slice
      is scored before and after), with an empty reference cache, then (c)
      again with the cache from (b);
  (d) align doing (a)'s work: TRL's loss (sigmoid), no held-out slice, cold
      then warm cache; and, for the kinds in --ablate, (d) with each of
      align's speed-ups off in turn (DPO: prefix sharing, lean LM head,
      micro-batches, reference cache; KTO: lean LM head, reference cache), each
      from an empty cache.

Each variant runs in its own process (so peak RSS is its own) and is timed from
process start to finish, model loading and data preparation included. Ratios
are against the faster of the two TRL rows ("TRL's best").

    .venv/bin/python scripts/bench/train.py [--method kto] [--kinds lora] [--steps 8] [--out FILE]
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
DATA = {"dpo": REPO.parent / "shared" / "data" / "dpo_en_demo.json",
        "kto": REPO.parent / "shared" / "data" / "kto_en_demo.json"}
LEARNING_RATE = {"full": 5e-6, "lora": 5e-5}  # given to TRL and align alike, so both take the same steps


def trl_worker(method: str, kind: str, rows_file: str, steps: int, out: str) -> None:
    """Plain TRL, as a user would write it; ``kind`` "lora:best" or "full:best" switches on its own speed-ups."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from align.data.io import iter_rows
    from align.models import DEFAULT_MODEL, load_model, load_tokenizer

    kind, _, setting = kind.partition(":")
    best = {"precompute_ref_log_probs": True, "gradient_checkpointing": False} if setting == "best" else {}
    rows = [row for _, row in iter_rows(rows_file)]
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    peft_config = None
    if kind == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    config, trainer_class = (DPOConfig, DPOTrainer) if method == "dpo" else (KTOConfig, KTOTrainer)
    args = config(output_dir=out, max_steps=steps, per_device_train_batch_size=4, max_length=256,
                     learning_rate=LEARNING_RATE[kind], use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                     save_strategy="no", seed=0, **best)
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(out, "losses.json").write_text(json.dumps(losses))


# TRL's loss and no held-out slice scored: the work TRL does
SAME_WORK_AS_TRL = {"dpo": ("loss_type=sigmoid", "eval_split=0"), "kto": ("eval_split=0",)}
# align's speed-ups, each switched off in turn from the same-work row (same math: tests/test_train_equivalence.py)
ABLATIONS = {"dpo": {"prefix sharing": "prefix_sharing=false", "lean LM head": "lean_lm_head=false",
                     "micro-batches": "micro_batch_size=null", "reference cache": "ref_cache=false"},
             "kto": {"lean LM head": "lean_lm_head=false", "reference cache": "ref_cache=false"}}


def align_cmd(method: str, kind: str, data: str, steps: int, out: str, cache: str, *settings: str) -> list[str]:
    return [sys.executable, "-m", "align", "train", method, "--data", data, "-o", out, f"max_steps={steps}",
            "per_device_train_batch_size=4", "max_length=256", f"ref_cache_dir={cache}", "save_strategy=no",
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

    rows = [trl("TRL defaults", best=False), trl("TRL at its best", best=True),
            align("align defaults (cold cache)", "defaults-1", "defaults"),
            align("align defaults (warm cache)", "defaults-2", "defaults"),
            align("align, TRL's work (cold cache)", "same-1", "same", *SAME_WORK_AS_TRL[method]),
            align("align, TRL's work (warm cache)", "same-2", "same", *SAME_WORK_AS_TRL[method])]
    if ablate:
        rows += [align(f"  without {name}", f"no-{i}", f"no-{i}", *SAME_WORK_AS_TRL[method], setting)
                 for i, (name, setting) in enumerate(ABLATIONS[method].items())]
    return rows


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

    work = Path(tempfile.mkdtemp(prefix="align-bench-train-"))
    env = {**os.environ, "TQDM_DISABLE": "1", "ALIGN_CACHE_DIR": os.environ.get("ALIGN_CACHE_DIR", "")}
    env = {k: v for k, v in env.items() if v != ""}
    data = str(work / "rows.jsonl")
    subprocess.run([sys.executable, "-m", "align", "data", "convert", str(DATA[args.method]),
                    "-o", str(work / "all.jsonl")], check=True, env=env, stdout=subprocess.DEVNULL)
    trained_rows = args.steps * 4
    n_rows = args.rows or trained_rows
    lines = (work / "all.jsonl").read_text().splitlines()[:n_rows]
    Path(data).write_text("\n".join(lines) + "\n")

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
            results.append({"kind": kind, "variant": name, "wall_s": round(wall, 1),
                            "rows_per_s": round(trained_rows / wall, 4), "peak_rss_gb": round(rss, 2),
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
    header = f"{'kind':5} {'variant':34} {'wall s':>7} {unit + '/s':>8} {'peak GB':>8} {'speed x':>8} {'mem x':>6} " \
             f"{'x TRL best':>10} {'mem best':>8} {'loss@1':>8} {'loss@end':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['kind']:5} {r['variant']:34} {r['wall_s']:7.1f} {r['rows_per_s']:8.3f} {r['peak_rss_gb']:8.2f} "
              f"{r['speed_vs_trl']:8.2f} {r['memory_vs_trl']:6.2f} {r['speed_vs_trl_best']:10.2f} "
              f"{r['memory_vs_trl_best']:8.2f} {r['first_loss']:8.4f} {r['final_loss']:9.4f}")
    meta = {"method": args.method, "model": "bundled:smollm2-135m-instruct",
            "data": f"{DATA[args.method].name} first {n_rows} rows", "row": "a pair (DPO), a labelled answer (KTO)",
            "steps": args.steps, "batch": 4, "max_length": 256, "learning_rate": LEARNING_RATE,
            "threads": os.environ.get("OMP_NUM_THREADS", "default"), "cpus": os.cpu_count()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
