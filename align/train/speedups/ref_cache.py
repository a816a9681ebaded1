"""A disk cache of the reference model's log-probs, one entry per training example.

The reference is frozen, so its log-probs for a given tokenized example never
change. TRL recomputes them every step (or once per run with
``precompute_ref_log_probs``); align computes each one once per
(reference weights, settings) and keeps it on disk, so a second run, a resumed
run, a new epoch or a sweep over ``beta`` pays nothing for the reference.

Entries live under ``<cache>/ref-logps/<namespace>/`` where the namespace hashes
everything that changes the numbers besides the example itself: the reference
weights, the method, ``max_length`` and truncation, and TRL's version. Each entry
is one answer's log-prob given its prompt, keyed by a hash of their token ids
(which already encode the tokenizer, the chat template and the data): TRL sums
each sequence's log-probs on its own, so the same answer to the same prompt has
one value in whichever pair or row it comes, and a pair seen the other way round
(a label flipped, a random-label control) or an answer met in a new pair costs
nothing. LD-DPO (``ld_alpha``) weighs an answer's tail by the other answer's
length, so there each entry is keyed by the whole pair. New entries are added
as new shard files (written atomically), so concurrent or killed runs never
corrupt it.
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

# Each method's answers in an example: (the column of the answer's token ids, the column TRL reads its
# precomputed reference log-prob from), in the order TRL's `compute_ref_log_probs` returns them. The prompt is
# always "prompt_ids" (TRL's names).
ANSWERS = {
    "dpo": (("chosen_ids", "ref_chosen_logps"), ("rejected_ids", "ref_rejected_logps")),
    "kto": (("completion_ids", "ref_logps"), ("KL_completion_ids", "ref_KL_logps")),
}
# Bumped when what an entry holds changes, so a cache written the old way is never read the new way.
ENTRY_FORMAT = "answer-logp/2"


def answer_keys(row: dict[str, Any], answer_columns: Iterable[str], pairwise: bool) -> list[str]:
    """The cache key of each answer of a tokenized example: its prompt's and its own token ids; with ``pairwise``
    (the value depends on the other answers too, as LD-DPO's does) every answer column and which answer it is."""
    columns = list(answer_columns)
    if pairwise:
        return [content_hash([[row.get(c) for c in ["prompt_ids", *columns]], column], 32) for column in columns]
    return [content_hash([row.get("prompt_ids"), row.get(column)], 32) for column in columns]


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
    """Reference log-probs on disk, one per answer key, within one namespace."""

    def __init__(self, root: str | Path | None, namespace: dict[str, Any]):
        self.namespace = {**namespace, "entries": ENTRY_FORMAT}
        self.key = content_hash(self.namespace, 24)
        self.folder = Path(root or cache_dir() / "ref-logps") / self.key

    def lookup(self, keys: Iterable[str]) -> dict[str, float]:
        wanted = set(keys)
        found: dict[str, float] = {}
        if not self.folder.exists():
            return found
        for shard in sorted(self.folder.glob("shard-*.jsonl")):
            with open(shard, encoding="utf-8") as f:
                for line in f:
                    entry = json.loads(line)
                    if entry["key"] in wanted:
                        found[entry["key"]] = entry["logp"]
        return found

    def add(self, entries: dict[str, float]) -> None:
        if not entries:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "namespace.json"
        if not meta.exists():
            with atomic_path(meta) as tmp:
                tmp.write_text(json.dumps(self.namespace, indent=1, sort_keys=True))
        name = f"shard-{os.getpid()}-{content_hash(sorted(entries), 12)}.jsonl"
        with atomic_path(self.folder / name) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for key, logp in entries.items():
                f.write(json.dumps({"key": key, "logp": logp}) + "\n")


def rows_to_compute(keys: list[list[str]], known: set[str], lengths: list[int]) -> list[int]:
    """The examples whose reference pass covers every answer not in ``known``, shortest first (little padding in a
    batch): an example is skipped where its answers are known or come with an example already taken."""
    covered = set(known)
    chosen = []
    for i in sorted(range(len(keys)), key=lambda i: lengths[i]):
        if not covered.issuperset(keys[i]):
            chosen.append(i)
            covered.update(keys[i])
    return chosen


class RefCacheMixin:
    """Mixed into TRL's DPO/KTO trainers: serve ``_precompute_ref_logps`` from a :class:`RefLogpStore`.

    Only examples with an answer missing from the cache are computed, sorted by
    length so the reference batches carry little padding, with TRL's own
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
        answers = self._answers(dataset.column_names)
        columns = ["prompt_ids", *(ids for ids, _ in answers)]
        table = dataset.select_columns(columns).to_list()
        pairwise = getattr(self, "ld_alpha", None) is not None
        keys = [answer_keys(row, [ids for ids, _ in answers], pairwise) for row in table]
        found = store.lookup(k for row_keys in keys for k in row_keys)
        cached = sum(all(k in found for k in row_keys) for row_keys in keys)
        lengths = [sum(len(row[c] or []) for c in columns) for row in table]
        missing = rows_to_compute(keys, set(found), lengths)
        if missing:
            computed = self._compute_reference(dataset.select(missing), name, batch_size, len(answers))
            fresh = {keys[i][a]: computed[a][j] for j, i in enumerate(missing) for a in range(len(answers))
                     if keys[i][a] not in found}
            if _is_main_process(self):
                store.add(fresh)
            found.update(fresh)
        # rows neither reused nor computed had every answer in a computed row (the same answer in several pairs)
        self.align_ref_report = {**(self.align_ref_report or {}),
                                 name: {"rows": len(keys), "reused": cached, "computed": len(missing)}}
        log.info("reference log-probs for %s: %d of %d rows reused from the cache, %d computed (%s)",
                 name, cached, len(keys), len(missing), store.folder)
        from datasets import Value

        for a, (_, value_column) in enumerate(answers):
            # float32, as TRL stores its own precomputed values: cached and fresh runs see identical inputs.
            dataset = dataset.add_column(value_column, [found[row_keys[a]] for row_keys in keys],
                                         feature=Value("float32"))
        return dataset

    def _answers(self, column_names: list[str]) -> list[tuple[str, str]]:
        """(ids column, value column) of each answer TRL scores here: KTO's mismatched answers only where it
        estimates its KL term."""
        present = [(ids, value) for ids, value in ANSWERS[self.align_method] if ids in column_names]
        if self.align_method == "kto" and not getattr(self, "calculate_KL", True):
            present = [(ids, value) for ids, value in present if ids != "KL_completion_ids"]
        return present

    def _compute_reference(self, dataset: Any, name: str, batch_size: int, answers: int) -> list[list[float]]:
        """Each answer's reference log-probs over ``dataset``, in the order of :data:`ANSWERS`."""
        import torch
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        trainer: Any = self
        if trainer.ref_model is None and trainer.is_deepspeed_enabled:
            # ZeRO needs TRL's inference engine; use TRL's path (single shared filesystem assumed).
            computed = super()._precompute_ref_logps(dataset, name, batch_size)  # type: ignore[misc]
            return [[float(v) for v in computed[value]] for _, value in self._answers(dataset.column_names)]
        loader = trainer.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                        collate_fn=trainer.data_collator))
        model = trainer.ref_model or trainer.model
        parts: list[list[Any]] = []
        for batch in tqdm(loader, desc=f"Reference log-probs ({name})", disable=not _is_main_process(self)):
            values = [v for v in trainer.compute_ref_log_probs(model, batch) if v is not None][:answers]
            parts.append([t.float().cpu() for t in trainer.accelerator.gather_for_metrics(tuple(values))])
        return [torch.cat([p[a] for p in parts]).tolist() for a in range(answers)]


def _is_main_process(trainer: Any) -> bool:
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator is None or accelerator.is_main_process
