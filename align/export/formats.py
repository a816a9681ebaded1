"""The quantised formats ``align export --quantize`` writes, and what each needs to be written and run."""

from __future__ import annotations

from dataclasses import dataclass

from align.errors import ConfigError


@dataclass(frozen=True)
class ExportFormat:
    name: str
    bits: int
    family: str          # "gguf" | "bitsandbytes" | "llm-compressor"
    needs_gpu: bool      # to write it (GPTQ's calibration passes, bitsandbytes' kernels) and to run it
    runs_with: str
    package: str | None  # the pip package the writer needs beyond align's own dependencies


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("q8_0", 8, "gguf", False, "llama.cpp, Ollama, align serve", None),
    ExportFormat("q4_0", 4, "gguf", False, "llama.cpp, Ollama, align serve", None),
    ExportFormat("q4_1", 4, "gguf", False, "llama.cpp, Ollama, align serve", None),
    ExportFormat("bnb-4bit", 4, "bitsandbytes", True, "transformers, vLLM", "bitsandbytes"),
    ExportFormat("gptq-w4a16", 4, "llm-compressor", True, "vLLM, transformers", "llmcompressor"),
    ExportFormat("fp8", 8, "llm-compressor", True, "vLLM (Ada/Hopper GPUs)", "llmcompressor"),
)}


def describe_formats() -> str:
    return "; ".join(f"{f.name} ({f.bits}-bit {f.family}, {'GPU' if f.needs_gpu else 'CPU'}: {f.runs_with})"
                     for f in FORMATS.values())


def export_format(name: str, *, gpu_visible: bool) -> ExportFormat:
    """The format called ``name``, refused before any work when it is unknown or needs a GPU that is not there."""
    found = FORMATS.get(name.lower())
    if found is None:
        raise ConfigError(f"--quantize {name!r}: unknown format. Known: {describe_formats()}")
    if found.needs_gpu and not gpu_visible:
        cpu = ", ".join(f.name for f in FORMATS.values() if not f.needs_gpu)
        raise ConfigError(f"--quantize {found.name} needs a CUDA GPU (to calibrate and to run) and none is visible; "
                          f"on this machine use one of {cpu}")
    return found


__all__ = ["FORMATS", "ExportFormat", "describe_formats", "export_format"]
