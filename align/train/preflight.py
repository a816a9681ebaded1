"""Pre-flight checks: the silent ways DPO/KTO runs go wrong, made loud before any step is taken.

Examples are rendered and tokenized the way TRL will (chat template for
conversational rows, plain text plus EOS otherwise), then checked for:
a duplicated BOS, completions that never end (no EOS / end-of-turn), the prompt
leaking into the completion, completions emptied or cut by ``max_length``,
pairs that become identical, and for KTO the batch size and class balance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.errors import AlignError

_LEAK_MARKERS = ("\n\nHuman:", "\n\nAssistant:", "<|im_start|>user", "<|start_header_id|>user", "[INST]")


class PreflightError(AlignError):
    pass


@dataclass
class PreflightReport:
    rows: int
    samples: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    emptied_rows: list[int] = field(default_factory=list)  # prompt alone fills max_length; TRL drops these

    def text(self) -> str:
        lines = [f"pre-flight: {self.rows} rows"]
        lines += [f"  {k}: {v}" for k, v in self.stats.items()]
        for sample in self.samples:
            lines.append("  example (as the model sees it):")
            lines += ["    | " + line for line in sample.splitlines()]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        lines += [f"  ERROR: {e}" for e in self.errors]
        lines.append("  result: " + ("FAILED" if self.errors else "ok"))
        return "\n".join(lines)


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def tokenize_like_trl(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as TRL's DPO/KTO preprocessing builds them."""
    if isinstance(prompt, list):
        prompt_ids = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        full_ids = _ids(tokenizer.apply_chat_template(prompt + completion, tokenize=True))
    else:
        eos = tokenizer.eos_token or ""
        text = completion if completion.endswith(eos) else completion + eos
        prompt_ids = _ids(tokenizer(prompt))
        full_ids = _ids(tokenizer(prompt + text))
    shared = 0
    while shared < min(len(prompt_ids), len(full_ids)) and prompt_ids[shared] == full_ids[shared]:
        shared += 1
    return prompt_ids[:shared], full_ids[shared:]


def _completions(row: dict[str, Any]) -> list[tuple[str, Any]]:
    if "chosen" in row:
        return [("chosen", row["chosen"]), ("rejected", row["rejected"])]
    return [("completion", row["completion"])]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def run_preflight(rows: list[dict[str, Any]], tokenizer: Any, *, method: str, max_length: int | None,
                  per_device_train_batch_size: int, num_samples: int = 1) -> PreflightReport:
    report = PreflightReport(rows=len(rows))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    duplicate_bos = missing_eos = leaked = starts_with_prompt = emptied = cut = identical_after_cut = 0
    completion_tokens: list[int] = []
    for i, row in enumerate(rows):
        tokenized = [(name, *tokenize_like_trl(tokenizer, row["prompt"], value)) for name, value in _completions(row)]
        prompt_ids = tokenized[0][1]
        if i < num_samples:
            report.samples.append(tokenizer.decode(prompt_ids + tokenized[0][2])[-600:])
        if bos is not None and len(prompt_ids) > 1 and prompt_ids[0] == prompt_ids[1] == bos:
            duplicate_bos += 1
        if max_length is not None and len(prompt_ids) >= max_length:
            emptied += 1
            report.emptied_rows.append(i)
            continue
        cut_ids = []
        for name, _, completion_ids in tokenized:
            completion_tokens.append(len(completion_ids))
            tail = completion_ids[-2:]
            if eos is not None and eos not in tail:
                missing_eos += 1
            if max_length is not None and len(prompt_ids) + len(completion_ids) > max_length:
                cut += 1
            cut_ids.append(completion_ids[: max(0, (max_length or 10**9) - len(prompt_ids))])
        for _, value in _completions(row):
            text = _text(value)
            prompt_text = _text(row["prompt"]).strip()
            if len(prompt_text) > 20 and text.strip().startswith(prompt_text):
                starts_with_prompt += 1
            elif any(m in text for m in _LEAK_MARKERS):
                leaked += 1
        if len(cut_ids) == 2 and cut_ids[0] == cut_ids[1]:
            identical_after_cut += 1

    n_completions = sum(len(_completions(r)) for r in rows)
    report.stats["completion tokens (median)"] = sorted(completion_tokens)[len(completion_tokens) // 2] if completion_tokens else 0
    report.stats["max_length"] = max_length
    report.stats["completions cut by max_length"] = f"{cut} of {n_completions}"
    report.stats["rows whose prompt fills max_length (dropped by TRL)"] = emptied

    if duplicate_bos:
        report.errors.append(f"{duplicate_bos} rows start with BOS twice: the chat template adds BOS and so does the "
                             "tokenizer; fix the template or set add_bos_token=False")
    if missing_eos:
        report.errors.append(f"{missing_eos} completions do not end with EOS/end-of-turn "
                             f"({tokenizer.eos_token!r}): the student would never learn to stop")
    # A data-shaping bug puts the prompt or another turn into every completion; a model echoing the
    # question or writing a turn marker itself does it now and then. Fail on the first, count the second.
    systematic = max(1, n_completions // 20)
    for count, what in ((starts_with_prompt, "start with their prompt"),
                        (leaked, "contain another turn's markers (e.g. '\\n\\nHuman:')")):
        message = f"{count} of {n_completions} completions {what}"
        if count > systematic:
            report.errors.append(message + ": a completion must hold only the final assistant answer "
                                           "(see `align data convert`)")
        elif count:
            report.warnings.append(message + "; a few generated ones are harmless, many would mean a data bug")
    if emptied == len(rows):
        report.errors.append(f"every prompt is at least max_length={max_length} tokens: nothing left to train on")
    elif emptied:
        report.warnings.append(f"{emptied} rows have prompts of max_length={max_length} tokens or more; "
                               "they are left out (raise max_length to keep them)")
    if cut:
        report.warnings.append(f"{cut} of {n_completions} completions are cut by max_length={max_length} "
                               "(they lose their EOS); raise max_length if that is many")
    if identical_after_cut:
        report.errors.append(f"{identical_after_cut} pairs are identical after truncation to max_length="
                             f"{max_length}: chosen and rejected differ only past the cut")
    if method == "kto":
        _check_kto(rows, per_device_train_batch_size, report)
    return report


def _check_kto(rows: list[dict[str, Any]], batch_size: int, report: PreflightReport) -> None:
    desirable = sum(bool(r["label"]) for r in rows)
    undesirable = len(rows) - desirable
    report.stats["desirable / undesirable"] = f"{desirable} / {undesirable}"
    if batch_size < 2:
        report.errors.append("KTO needs per_device_train_batch_size >= 2: its KL estimate pairs each prompt with "
                             "another row's completion in the same batch")
    if desirable == 0 or undesirable == 0:
        report.errors.append("KTO needs both desirable (label: true) and undesirable (label: false) rows")


def check_or_raise(report: PreflightReport) -> None:
    if report.errors:
        raise PreflightError("pre-flight check failed:\n" + report.text() +
                             "\n(set preflight=false to train anyway)")
