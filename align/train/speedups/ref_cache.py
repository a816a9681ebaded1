"""A disk cache of the reference model's log-probs, one entry per training example.

The reference is frozen, so its log-probs for a given tokenized example never
change. TRL recomputes them every step (or once per run with
``precompute_ref_log_probs``); align computes each one once per
(reference weights, settings) and keeps it on disk, so a second run, a resumed
run, a new epoch or a sweep over ``beta`` pays nothing for the reference.

Entries live under ``<cache>/ref-logps/<namespace>/`` where the namespace hashes
everything that changes the numbers besides the example itself: the reference
weights, the method, ``max_length`` and truncation, and TRL's version. Each
example is keyed by a hash of its token ids, which already encodes the
tokenizer, the chat template and the data. New entries are added as new shard
files (written atomically), so concurrent or killed runs never corrupt it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from align.data.io import atomic_path
from align.data.records import content_hash
from align.models import cache_dir

log = logging.getLogger(__name__)

# The tokenized columns that define one example for each method (TRL's names).
KEY_COLUMNS = {
    "dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "kto": ("prompt_ids", "completion_ids", "KL_completion_ids", "label"),
}
# The columns TRL's trainers read precomputed reference log-probs from, in the order
# their `compute_ref_log_probs` returns them.
VALUE_COLUMNS = {
    "dpo": ("ref_chosen_logps", "ref_rejected_logps"),
    "kto": ("ref_logps", "ref_KL_logps"),
}


def row_key(row: dict[str, Any], columns: Iterable[str]) -> str:
    payload = json.dumps([row.get(c) for c in columns], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def weights_fingerprint(folder: str | Path, extra: str = "") -> str:
    """A hash of a model folder's weight files, memoised by (path, size, mtime) so it is paid once."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no weight files in {folder}")
    stat_key = content_hash([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files], 32)
    memo = cache_dir() / "fingerprints" / f"{stat_key}.txt"
    if memo.exists():
        return memo.read_text().strip() + extra
    digest = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    value = digest.hexdigest()[:32]
    with atomic_path(memo) as tmp:
        tmp.write_text(value)
    return value + extra


def module_fingerprint(module: Any) -> str:
    """A hash of a module's parameters, for references that are not plain folders on disk."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class RefLogpStore:
    """Reference log-probs on disk, looked up by example key within one namespace."""

    def __init__(self, root: str | Path | None, namespace: dict[str, Any]):
        self.namespace = namespace
        self.key = content_hash(namespace, 24)
        self.folder = Path(root or cache_dir() / "ref-logps") / self.key

    def lookup(self, keys: list[str]) -> dict[str, dict[str, float]]:
        wanted = set(keys)
        found: dict[str, dict[str, float]] = {}
        if not self.folder.exists():
            return found
        for shard in sorted(self.folder.glob("shard-*.jsonl")):
            with open(shard, encoding="utf-8") as f:
                for line in f:
                    entry = json.loads(line)
                    if entry["key"] in wanted:
                        found[entry["key"]] = entry["values"]
        return found

    def add(self, entries: dict[str, dict[str, float]]) -> None:
        if not entries:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "namespace.json"
        if not meta.exists():
            with atomic_path(meta) as tmp:
                tmp.write_text(json.dumps(self.namespace, indent=1, sort_keys=True))
        name = f"shard-{os.getpid()}-{content_hash(sorted(entries), 12)}.jsonl"
        with atomic_path(self.folder / name) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for key, values in entries.items():
                f.write(json.dumps({"key": key, "values": values}) + "\n")


class RefCacheMixin:
    """Mixed into TRL's DPO/KTO trainers: serve ``_precompute_ref_logps`` from a :class:`RefLogpStore`.

    Only examples missing from the cache are computed, sorted by length so the
    reference batches carry little padding, with TRL's own
    ``compute_ref_log_probs`` (same math as an uncached run). The values are
    gathered in memory on every process, so multi-process runs need no shared
    temporary files.
    """

    align_ref_store: RefLogpStore | None = None
    align_method: str = "dpo"
    align_ref_report: dict[str, dict[str, int]] | None = None  # per dataset name ("train", "eval")

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        store = self.align_ref_store
        if store is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)  # type: ignore[misc]
        columns = [c for c in KEY_COLUMNS[self.align_method] if c in dataset.column_names]
        table = dataset.select_columns(columns).to_list()
        keys = [row_key(row, columns) for row in table]
        found = store.lookup(keys)
        missing = sorted({i for i, k in enumerate(keys) if k not in found},
                         key=lambda i: sum(len(v) for v in table[i].values() if isinstance(v, list)))
        if missing:
            computed = self._compute_reference(dataset.select(missing), name, batch_size)
            fresh = {keys[i]: {c: values[j] for c, values in computed.items()} for j, i in enumerate(missing)}
            if _is_main_process(self):
                store.add(fresh)
            found.update(fresh)
        reused = len(keys) - len(missing)
        self.align_ref_report = {**(self.align_ref_report or {}),
                                 name: {"rows": len(keys), "reused": reused, "computed": len(missing)}}
        log.info("reference log-probs for %s: %d of %d rows reused from the cache, %d computed (%s)",
                 name, reused, len(keys), len(missing), store.folder)
        from datasets import Value

        value_columns = sorted(next(iter(found.values())).keys()) if found else []
        for column in value_columns:
            # float32, as TRL stores its own precomputed values: cached and fresh runs see identical inputs.
            dataset = dataset.add_column(column, [found[k][column] for k in keys], feature=Value("float32"))
        return dataset


    def _compute_reference(self, dataset: Any, name: str, batch_size: int) -> dict[str, list[float]]:
        import torch
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        trainer: Any = self
        if trainer.ref_model is None and trainer.is_deepspeed_enabled:
            # ZeRO needs TRL's inference engine; use TRL's path (single shared filesystem assumed).
            computed = super()._precompute_ref_logps(dataset, name, batch_size)  # type: ignore[misc]
            columns = [c for c in computed.column_names if c not in dataset.column_names]
            return {c: [float(v) for v in computed[c]] for c in columns}
        loader = trainer.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                        collate_fn=trainer.data_collator))
        model = trainer.ref_model or trainer.model
        parts: list[list[Any]] = []
        for batch in tqdm(loader, desc=f"Reference log-probs ({name})", disable=not _is_main_process(self)):
            values = [v for v in trainer.compute_ref_log_probs(model, batch) if v is not None]
            parts.append([t.float().cpu() for t in trainer.accelerator.gather_for_metrics(tuple(values))])
        names = VALUE_COLUMNS[self.align_method]
        return {names[k]: torch.cat([p[k] for p in parts]).tolist() for k in range(len(parts[0]))}


def _is_main_process(trainer: Any) -> bool:
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator is None or accelerator.is_main_process
