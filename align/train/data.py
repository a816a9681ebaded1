"""Training data: any file `align data convert` reads, checked and shaped for TRL, with its hash."""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.data.formats import CONVERTERS, OUTPUT_TYPES, FieldError, detect_format, pairs_to_unpaired, trl_kind
from align.data.io import DEFAULT_SPLIT, Malformed, is_hub_id, iter_rows, sha256_of
from align.data.records import content_hash, detect_kind, to_plain
from align.data.validate import parse_row
from align.errors import DataError, Location, Problem

log = logging.getLogger(__name__)

TRL_COLUMNS = {"pairs": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label"),
               "sft": ("prompt", "completion")}
NEEDED_KIND = {"dpo": "pairs", "kto": "unpaired", "sft": "sft", "orpo": "pairs", "simpo": "pairs"}
_HOLDS = {"pairs": "pairs (prompt/chosen/rejected)", "unpaired": "unpaired (KTO) rows (prompt/completion/label)",
          "sft": "SFT rows (prompt/completion, no label)"}
# What to do when a file holds another kind than the method reads (pairs given to KTO are unpaired on the fly).
_INSTEAD = {
    "pairs": "Build pairs from judgements with `align pairs build judgements.jsonl -o pairs.jsonl`",
    "sft": "SFT learns one good answer per prompt: select them from judgements with `align data select "
           "judgements.jsonl -o sft.jsonl` (the best answer of each prompt by the labelers' scores)",
}


@dataclass
class TrainingData:
    rows: list[dict[str, Any]]
    kind: str
    path: str
    file_sha256: str
    converted_from: str | None = None  # source format when the file was not already TRL-shaped


def load_training_data(path: str | Path, method: str, *, split: str = DEFAULT_SPLIT, limit: int | None = None,
                       max_problems: int = 20) -> TrainingData:
    """Rows in TRL's shape for ``method`` (pairs for DPO, ORPO and SimPO, unpaired for KTO, prompt/completion for
    SFT), only TRL's columns.

    Pairs given to KTO are unpaired on the fly (chosen -> desirable, rejected ->
    undesirable, as TRL's ``unpair_preference_dataset`` does); any other mismatch
    is an error that says how to make the rows the method needs.
    """
    needed = NEEDED_KIND[method]
    rows, kind, source_format = _read_any(path, max_problems, split, limit)
    if kind == "pairs" and needed == "unpaired":
        log.info("%s holds pairs; KTO uses each pair as a desirable and an undesirable row", path)
        rows = list(pairs_to_unpaired(rows))
        kind = "unpaired"
    if kind != needed:
        methods = sorted(m for m, k in NEEDED_KIND.items() if k == kind or (kind == "pairs" and k == "unpaired"))
        raise DataError.at(path, f"holds {_HOLDS[kind]}; {method.upper()} needs {_HOLDS[needed]}. "
                                 f"{_INSTEAD[needed]}, or train on these rows with "
                                 + " / ".join(f"`align train {m}`" for m in methods) + ".")
    columns = TRL_COLUMNS[kind]
    shaped = [{c: to_plain(row[c]) for c in columns} for row in rows]
    return TrainingData(shaped, kind, str(path), _source_hash(path, split, limit, shaped), source_format)


def _source_hash(path: str | Path, split: str, limit: int | None, rows: list[dict[str, Any]]) -> str:
    """The SHA-256 of the data file or folder (of the rows themselves for a hub dataset), and of the split and
    limit when they are not the defaults: a run dir's data.json and resume checks compare it."""
    whole = content_hash(rows, 64) if is_hub_id(path) else sha256_of(path)
    if split == DEFAULT_SPLIT and limit is None:
        return whole
    return content_hash({"data": whole, "split": split, "limit": limit}, 64)


def _read_any(path: str | Path, max_problems: int, split: str = DEFAULT_SPLIT,
              limit: int | None = None) -> tuple[list[dict[str, Any]], str, str | None]:
    problems: list[Problem] = []
    rows: list[dict[str, Any]] = []
    kind: str | None = None
    source_format: str | None = None
    for location, row in itertools.islice(iter_rows(path, yield_malformed=True, split=split), limit):
        try:
            for converted in _to_trl(row, location, source_format):
                row_kind = trl_kind(converted)
                if kind is None:
                    kind = row_kind
                elif row_kind != kind:
                    raise DataError(Problem(location, None, f"row is {row_kind} but earlier rows were {kind}"))
                rows.append(parse_row(OUTPUT_TYPES[kind], converted, location).to_json())
            if source_format is None and isinstance(row, dict) and detect_kind(row) not in TRL_COLUMNS:
                source_format = detect_format(row)
        except DataError as exc:
            problems.extend(exc.problems)
            if len(problems) >= max_problems:
                break
    if problems:
        raise DataError(problems[:max_problems])
    if not rows or kind is None:
        raise DataError.at(path, "no training rows")
    return rows, kind, source_format


def _to_trl(row: Any, location: Location, known_format: str | None) -> list[dict[str, Any]]:
    if isinstance(row, Malformed):
        raise DataError(Problem(location, None, str(row)))
    if not isinstance(row, dict):
        raise DataError(Problem(location, None, f"expected a JSON object, got {type(row).__name__}"))
    if detect_kind(row) in TRL_COLUMNS:
        return [row]
    fmt = known_format or detect_format(row)
    if fmt is None:
        kind = detect_kind(row)
        what = f"{kind} records" if kind else f"rows with keys {sorted(row)}"
        raise DataError(Problem(location, None, f"holds {what}, not training data: DPO needs pairs "
                                "(prompt/chosen/rejected), KTO unpaired rows (prompt/completion/label), SFT "
                                "prompt/completion rows; `align pairs build` makes the first two from judgements, "
                                "`align data select` the third"))
    try:
        return CONVERTERS[fmt](row)
    except FieldError as exc:
        raise DataError(Problem(location, exc.field, exc.message)) from None


# eval_split: auto holds out AUTO_EVAL_FRACTION of the prompts when there are at least AUTO_EVAL_MIN_PROMPTS,
# i.e. at least 4 held-out prompts. Why 4: a held-out accuracy that moved by chance alone spreads by 0.5/sqrt(n)
# on n pairs (0.25 on 4), so on 4 pairs only a perfect score clears the one-sided 95% bar that
# align.train.diagnosis uses (and 4/4 still comes by luck 1 time in 16); on 3 or fewer nothing can. A run with
# fewer than 20 prompts has none to spare for a figure that says so little: it trains on all of them, and says so.
AUTO_EVAL_FRACTION = 0.2
AUTO_EVAL_MIN_PROMPTS = 20


def prompt_key(row: dict[str, Any]) -> str:
    """One prompt's identity, whatever its shape (text or messages): what the held-out split keeps apart."""
    return hashlib.sha256(repr(row["prompt"]).encode()).hexdigest()


def count_prompts(rows: list[dict[str, Any]]) -> int:
    """Distinct prompts among ``rows`` (as :func:`split_holdout` tells them apart)."""
    return len({prompt_key(r) for r in rows})


def auto_eval_split(rows: list[dict[str, Any]]) -> float:
    """The fraction ``eval_split: auto`` holds out: AUTO_EVAL_FRACTION from AUTO_EVAL_MIN_PROMPTS prompts on, else 0."""
    return AUTO_EVAL_FRACTION if count_prompts(rows) >= AUTO_EVAL_MIN_PROMPTS else 0.0


def split_holdout(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded, prompt-disjoint split: no prompt appears on both sides."""
    if fraction <= 0:
        return rows, []
    import random

    prompts = sorted({prompt_key(r) for r in rows})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(len(prompts) * fraction))])
    train, heldout = [], []
    for row in rows:
        (heldout if prompt_key(row) in held else train).append(row)
    return train, heldout


def shuffled(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The rows in a seeded random order (the same on resume)."""
    import random

    out = list(rows)
    random.Random(seed).shuffle(out)
    return out


def sample_for_run(rows: list[dict[str, Any]], n: int, seed: int, *, stratify_by: str | None = None) -> list:
    """A seeded sample of ``n`` rows, for runs shorter than an epoch (the reference is computed for these alone).

    With ``stratify_by`` (KTO's ``label``) each class keeps its share of the file, so the class weights set
    from the whole file still satisfy the KTO paper's Eq. 8 on the rows trained on.
    """
    import random

    if n >= len(rows):
        return rows
    rng = random.Random(seed)
    if stratify_by is None:
        return rng.sample(rows, n)
    classes: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        classes.setdefault(row[stratify_by], []).append(row)
    keys = sorted(classes, key=repr)
    shares = {k: round(n * len(classes[k]) / len(rows)) for k in keys}
    shares[keys[-1]] = n - sum(shares[k] for k in keys[:-1])  # rounding leftovers go to the last class
    picked = [row for k in keys for row in rng.sample(classes[k], min(shares[k], len(classes[k])))]
    rng.shuffle(picked)  # mixed classes in every batch (KTO pairs each row with another of its batch for KL)
    return picked
