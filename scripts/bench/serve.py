"""Benchmark: serving a student, unquantised and quantised, against plain transformers `generate`, in one run.

    python scripts/bench/serve.py --student runs/quickstart/train            # exports q8_0 and q4_1 first
    python scripts/bench/serve.py --student DIR --export q4_1=DIR --export q8_0=DIR --out /tmp/serve.json

For each model: its size on disk, the server's peak memory (VmHWM of its process), and for 1 client and for 16
concurrent clients (each sends its requests one after another) the generated tokens/s and p50/p95 latency. The
same prompts (held-out quickstart questions), greedy decoding and max_tokens for every row; only generated
tokens count. The servers are `align serve` processes: the float student on align's own server; a GGUF export
on llama.cpp's llama-server when it is installed (`LLAMA_SERVER` or the PATH), else on align's server
(dequantised, said so in the row). The baseline is plain transformers in this process on the same threads:
`model.generate` one request at a time (what a first server does), and one left-padded batch of all requests
(generate at its best, without a server's arrivals). Run it alone on the machine: `flock /tmp/align-cpu.lock`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PROMPTS = REPO / "datasets" / "prompts" / "concise_heldout.jsonl"


def load_prompts(limit: int) -> list[str]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    texts = [r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"] for r in rows]
    return texts[:limit]


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class ServerProcess:
    """`align serve MODEL` in a child process, on a free port, until stopped."""

    def __init__(self, model: str, engine: str, threads: int) -> None:
        from align.generate.serving import ServeConfig

        self.port = ServeConfig(port=0).external_port()
        argv = [sys.executable, "-m", "align", "serve", model, "--port", str(self.port), "--engine", engine,
                "--max-batch", "16", "--served-model-name", "m", "--num-threads", str(threads)]
        if engine == "llama.cpp":
            argv.remove("--num-threads")
            argv.remove(str(threads))
            argv += ["--llamacpp-arg=--threads", f"--llamacpp-arg={threads}"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.base_url + "/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server did not come up")

    def stop(self) -> float | None:
        peak = peak_rss_mb(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return peak


def load(base_url: str, prompts: list[str], clients: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` threads share the prompts, each sending its requests one after another."""
    import httpx

    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    queue = list(prompts)

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    prompt = queue.pop(0)
                start = time.perf_counter()
                response = http.post(base_url + "/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0})
                response.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "tokens": tokens[0], "seconds": round(elapsed, 2),
            "tokens_per_s": round(tokens[0] / elapsed, 2),
            "p50_s": round(statistics.median(ordered), 2),
            "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2)}


def transformers_baseline(model: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """Plain transformers in this process: one `generate` per request, then one left-padded batch of all."""
    import resource

    import torch

    from align.models import load_model, load_tokenizer, resolve_model
    from align.models.tokens import eos_token_ids

    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    net = load_model(source, device="cpu", merge_adapter=bool(source.adapter)).eval()
    stop = eos_token_ids(net, tokenizer)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    rows = {}
    with torch.inference_mode():
        tokens, latencies, start = 0, [], time.perf_counter()
        for text in texts:
            t0 = time.perf_counter()
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            out = net.generate(**ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stop,
                               pad_token_id=tokenizer.pad_token_id)
            tokens += _generated(out[0, ids["input_ids"].shape[1]:].tolist(), stop)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        rows["one at a time"] = {"tokens": tokens, "seconds": round(elapsed, 2),
                                 "tokens_per_s": round(tokens / elapsed, 2),
                                 "p50_s": round(statistics.median(latencies), 2)}
        tokenizer.padding_side = "left"
        start = time.perf_counter()
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = net.generate(**batch, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stop,
                           pad_token_id=tokenizer.pad_token_id)
        elapsed = time.perf_counter() - start
        tokens = sum(_generated(row[batch["input_ids"].shape[1]:].tolist(), stop) for row in out)
        rows["one batch"] = {"tokens": tokens, "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 2),
                             "p50_s": round(elapsed, 2)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "peak_rss_mb": round(peak, 1)}


def _generated(ids: list[int], stop: list[int]) -> int:
    """Tokens up to and including the first end-of-turn (the rest of a batch row is padding)."""
    for i, token in enumerate(ids):
        if token in stop:
            return i + 1
    return len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True, help="the float student: run dir or model folder")
    parser.add_argument("--export", action="append", default=[], help="FORMAT=DIR of an existing export "
                                                                       "(default: q8_0 and q4_1 are exported)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/align-bench-serve"))
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "bench" / "results" / "serve.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from align.export import quantize_run
    from align.generate.serving.llamacpp import server_binary

    prompts = load_prompts(args.prompts)
    exports = dict(item.split("=", 1) for item in args.export)
    for fmt in ("q8_0", "q4_1"):
        if fmt not in exports:
            folder = args.work / fmt
            if not folder.exists():
                quantize_run(args.student, fmt, folder)
            exports[fmt] = str(folder)
    llama = server_binary()
    # The float student's size is its merged weights' (a LoRA run dir holds only the adapter), as its exports
    # recorded it.
    float_bytes = json.loads((Path(next(iter(exports.values()))) / "export.json").read_text())["float_size_bytes"]
    models = [("float (align serve)", args.student, "align", float_bytes)]
    for fmt, folder in exports.items():
        engine = "llama.cpp" if llama else "align"
        report = json.loads((Path(folder) / "export.json").read_text())
        adapter = " + LoRA" if report.get("adapter") else ""
        label = f"{fmt}{adapter} ({'llama-server' if llama else 'align serve, dequantised'})"
        models.append((label, folder, engine, report["size_bytes"]))  # what the server loads, adapter included

    results: dict[str, Any] = {"meta": {
        "cpus": os.cpu_count(), "threads": args.threads, "prompts": len(prompts), "max_tokens": args.max_tokens,
        "machine": platform.machine(), "load_before": os.getloadavg()[0], "llama_server": llama,
        "date": time.strftime("%Y-%m-%d %H:%M")}, "servers": [], "transformers": None}
    base = transformers_baseline(args.student, prompts, args.max_tokens)
    results["transformers"] = base
    for label, model, engine, size in models:
        server = ServerProcess(model, engine, args.threads)
        try:
            server.wait_ready()
            one = load(server.base_url, prompts[:8], 1, args.max_tokens)
            many = load(server.base_url, prompts, 16, args.max_tokens)
        finally:
            peak = server.stop()
        results["servers"].append({"model": label, "size_mb": round(size / 1e6, 1),
                                   "peak_rss_mb": peak and round(peak, 1), "one_client": one, "16_clients": many})
    reference = base["rows"]["one at a time"]["tokens_per_s"]
    print(f"{'model':42} {'size MB':>8} {'peak MB':>8} {'tok/s 1':>8} {'tok/s 16':>9} {'p50 16':>7} {'p95 16':>7} "
          f"{'x plain':>8}")
    for row in results["servers"]:
        many = row["16_clients"]
        print(f"{row['model']:42} {row['size_mb']:8.1f} {row['peak_rss_mb'] or 0:8.1f} "
              f"{row['one_client']['tokens_per_s']:8.1f} {many['tokens_per_s']:9.1f} {many['p50_s']:7.2f} "
              f"{many['p95_s']:7.2f} {many['tokens_per_s'] / reference:8.2f}")
    for name, row in base["rows"].items():
        print(f"{'transformers generate, ' + name:42} {'':8} {base['peak_rss_mb']:8.1f} {'':8} "
              f"{row['tokens_per_s']:9.1f} {row['p50_s']:7.2f} {'':7} {row['tokens_per_s'] / reference:8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
