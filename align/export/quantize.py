"""``align export RUN --quantize FORMAT -o DIR``: a quantised copy of a student, with a record of what it cost.

The folder holds the quantised model (a ``.gguf`` file, or a transformers folder for the GPU formats) and
``export.json``: the format, sizes before and after, the calibration prompts (the run's own training prompts
unless ``--calibration`` names a file), and the check :mod:`align.export.check` ran on them (KL per token
against the float model, next-token agreement, one smoke answer). A LoRA run is merged into its base first, except
at 4 bits in GGUF, where its adapter stays beside the quantised base (``lora/``) so that the alignment survives.
Nothing is written at ``DIR`` until the export is whole.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from align.data.io import atomic_path, iter_rows, write_json
from align.errors import AlignError
from align.export.formats import ExportFormat, export_format
from align.models import load_model, load_tokenizer, resolve_model

log = logging.getLogger(__name__)

CALIBRATION_PROMPTS = 8
# For a model with no training data of its own (a hub model, the bundled one) and no --calibration file.
GENERAL_PROMPTS = (
    "Explain why the sky is blue in two sentences.",
    "Give me three tips for a good night's sleep.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short, friendly reply declining a meeting invitation.",
)


def quantize_run(run: str, format_name: str, output: str | Path, *, calibration: str | None = None,
                 calibration_prompts: int = CALIBRATION_PROMPTS, merge: bool | None = None) -> Path:
    """``merge``: merge a LoRA run's adapter into the weights before quantising (True), or keep it beside the
    quantised base at 16 bits (False, GGUF only). None chooses by the numbers: merged at 8 bits, which keep a DPO
    step; kept at 4 bits, which round most of it away (see :mod:`align.export.gguf_adapter`)."""
    import torch

    fmt = export_format(format_name, gpu_visible=torch.cuda.is_available())
    output = Path(output)
    if output.exists():
        raise AlignError(f"{output} exists; choose a new folder")
    source = resolve_model(run)
    if source.kind == "gguf":
        raise AlignError(f"{run} is already a GGUF file; quantise the float model it came from")
    prompts, prompts_from = _calibration(run, calibration, calibration_prompts)
    keep_adapter = _keeps_adapter(fmt, source, merge)
    if source.adapter:
        log.warning("%s is a LoRA run: %s", run, "keeping its adapter beside the quantised base, at 16 bits "
                    "(--merge merges it first)" if keep_adapter else "merging its adapter into the base model "
                    "before quantising")
    started = time.monotonic()
    device = "cuda" if fmt.needs_gpu else "cpu"
    model = load_model(source, merge_adapter=not keep_adapter, device=device, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    name = Path(run).name or run
    with atomic_path(output) as tmp:
        tmp.unlink()
        tmp.mkdir()
        if keep_adapter:
            weights, model, quantised, adapter = _write_gguf_keeping_adapter(fmt, model, tokenizer, tmp, name=name)
        else:
            (weights, quantised), adapter = _write(fmt, model, tokenizer, tmp, prompts, name=name), None
        from align.export.check import quantisation_check

        check = quantisation_check(model, quantised, tokenizer, prompts)
        write_json(tmp / "export.json", {
            "source": run, "merged_adapter": bool(source.adapter) and not keep_adapter, "adapter": adapter,
            "format": fmt.name, "bits": fmt.bits, "family": fmt.family, "runs_with": fmt.runs_with,
            "file": weights.name if weights != tmp else None,  # None: the folder is the model (transformers)
            # what the runtime loads: the quantised model, and the adapter when it is kept apart
            "size_bytes": _size(weights) + (adapter["size_bytes"] if adapter else 0),
            "float_size_bytes": _float_size(model),
            "calibration": {"from": prompts_from, "prompts": len(prompts),
                            "used_for": "the check only: round-to-nearest needs no calibration"
                            if fmt.family == "gguf" or fmt.name == "fp8" else "calibration and the check"},
            "check": check, "seconds": round(time.monotonic() - started, 1),
        })
    return output


def _keeps_adapter(fmt: ExportFormat, source: Any, merge: bool | None) -> bool:
    if merge is None:
        return bool(source.adapter) and fmt.family == "gguf" and fmt.bits < 8
    if not merge and not (source.adapter and fmt.family == "gguf"):
        raise AlignError(f"--keep-adapter: {source.spec} is not a LoRA run" if not source.adapter else
                         f"--keep-adapter: the adapter can be kept apart in GGUF formats only, not {fmt.name}")
    return not merge


def _write_gguf_keeping_adapter(fmt: ExportFormat, peft_model: Any, tokenizer: Any, folder: Path, *, name: str
                                ) -> tuple[Path, Any, Any, dict[str, Any]]:
    """The base quantised, the adapter beside it: ``lora/`` holds it as PEFT saves it (what align and
    transformers load) and as a GGUF adapter (what llama.cpp loads). Returns the GGUF file, the float model with
    the adapter merged, the quantised one as align loads the folder (dequantised base + adapter), and what the
    adapter is."""
    import copy

    from peft import PeftModel

    from align.export.gguf_adapter import ADAPTER_DTYPE, lora_weights, write_gguf_adapter
    from align.models import GGUF_ADAPTER_FOLDER

    adapter_dir = folder / GGUF_ADAPTER_FOLDER
    peft_model.save_pretrained(adapter_dir)
    adapter_file = adapter_dir / f"adapter-{ADAPTER_DTYPE.lower()}.gguf"
    write_gguf_adapter(lora_weights(peft_model), peft_model.get_base_model().config, adapter_file, name=name)
    float_model = copy.deepcopy(peft_model).merge_and_unload()
    path, quantised_base = _write_gguf(fmt, peft_model.unload(), tokenizer, folder, name=name)
    quantised = PeftModel.from_pretrained(quantised_base, adapter_dir).merge_and_unload()
    adapter = {"folder": GGUF_ADAPTER_FOLDER, "gguf": f"{GGUF_ADAPTER_FOLDER}/{adapter_file.name}",
               "dtype": ADAPTER_DTYPE, "size_bytes": adapter_file.stat().st_size,
               "why": f"a {fmt.bits}-bit step is larger than a DPO step: merged, most of the change rounds away"}
    return path, float_model, quantised, adapter


def _write(fmt: ExportFormat, model: Any, tokenizer: Any, folder: Path, prompts: list[Any], *, name: str
           ) -> tuple[Path, Any]:
    """Write the quantised weights into ``folder``: what :func:`resolve_model` loads them from, and the quantised
    model to check them with."""
    import copy

    if fmt.family == "gguf":
        return _write_gguf(fmt, model, tokenizer, folder, name=name)
    from align.extras import require

    require(fmt.package, f"--quantize {fmt.name}", extra="gpu")
    if fmt.family == "bitsandbytes":
        _write_bitsandbytes(model, tokenizer, folder)
    else:
        _write_llm_compressor(fmt, copy.deepcopy(model), tokenizer, folder, prompts)  # it quantises in place
    return folder, load_model(resolve_model(str(folder)), device="cuda")


def _write_bitsandbytes(model: Any, tokenizer: Any, folder: Path) -> None:
    """NF4 weights as transformers saves them (``BitsAndBytesConfig(load_in_4bit=True)``), bf16 compute."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory(dir=folder.parent) as merged:
        model.save_pretrained(merged)  # bitsandbytes quantises as it loads
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        quantised = AutoModelForCausalLM.from_pretrained(merged, quantization_config=config, device_map="cuda")
        quantised.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_llm_compressor(fmt: ExportFormat, model: Any, tokenizer: Any, folder: Path, prompts: list[Any]) -> None:
    """GPTQ W4A16 calibrated on the run's prompts, or FP8 (dynamic activations, no calibration), saved as
    compressed-tensors, which vLLM loads directly; the output layer stays in full precision."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    from align.models.tokens import prompt_token_ids

    if fmt.name == "fp8":
        oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]))
    else:
        rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
                for ids in (prompt_token_ids(tokenizer, p) for p in prompts)]
        oneshot(model=model, dataset=Dataset.from_list(rows), num_calibration_samples=len(rows),
                recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))
    model.save_pretrained(folder, save_compressed=True)
    tokenizer.save_pretrained(folder)


def _write_gguf(fmt: ExportFormat, model: Any, tokenizer: Any, folder: Path, *, name: str) -> tuple[Path, Any]:
    """``model`` as ``folder/model-<format>.gguf`` with the tokenizer's files beside it, and a copy of ``model``
    holding the weights llama.cpp computes with (checked without parsing the file again)."""
    import copy

    from align.export.gguf import GGUF_QUANTS, write_gguf

    path = folder / f"model-{fmt.name}.gguf"
    dequantised = write_gguf(model, tokenizer, path, GGUF_QUANTS[fmt.name], name=name)
    # The tokenizer's own files beside it: loaded without parsing the GGUF again, and what vLLM's GGUF loader
    # asks for (--tokenizer).
    tokenizer.save_pretrained(folder)
    quantised = copy.deepcopy(model)
    quantised.load_state_dict(dequantised, strict=False)
    return path, quantised


def _calibration(run: str, calibration: str | None, limit: int) -> tuple[list[Any], str]:
    """Up to ``limit`` prompts, and where they came from: ``calibration`` (any align data file with a
    ``prompt`` field), else the run's own training data, else a few general prompts."""
    path = calibration or _training_data(run)
    if path is None:
        return list(GENERAL_PROMPTS[:limit]), "general prompts (the model has no training data of its own)"
    prompts: list[Any] = []
    for location, row in iter_rows(path):
        if not isinstance(row, dict) or "prompt" not in row:
            raise AlignError(f"{location}: field 'prompt' is missing; calibration rows need one (any align "
                             "prompts, pairs or SFT file)")
        if row["prompt"] not in prompts:
            prompts.append(row["prompt"])
        if len(prompts) == limit:
            break
    if not prompts:
        raise AlignError(f"{path}: no rows to calibrate on")
    return prompts, str(path)


def _training_data(run: str) -> str | None:
    """The run's training data: where data.json says it was resolved, or (a run moved with its data, or recorded
    before data.json had it) the config's relative path, from here or a folder the run dir sits in."""
    import yaml

    recorded = Path(run) / "data.json"
    if recorded.is_file():
        resolved = (json.loads(recorded.read_text()).get("train") or {}).get("resolved")
        if resolved and Path(resolved).is_file():
            return resolved
    config = Path(run) / "config.yaml"
    if not config.is_file():
        return None
    data = (yaml.safe_load(config.read_text()) or {}).get("data")
    if not isinstance(data, str):
        return None
    for base in (Path.cwd(), *Path(run).resolve().parents):
        if (base / data).is_file():
            return str(base / data)
    return None


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _float_size(model: Any) -> int:
    """Bytes of the float weights as saved (a tied embedding once)."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict().values():
        seen.setdefault(tensor.untyped_storage().data_ptr(), tensor.numel() * tensor.element_size())
    return sum(seen.values())


__all__ = ["GENERAL_PROMPTS", "quantize_run"]
