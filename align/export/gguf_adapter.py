"""A PEFT LoRA adapter as a GGUF adapter file, which llama.cpp applies on top of a GGUF model at run time
(``llama-server --lora FILE``, Ollama's ``ADAPTER``).

Why: a DPO step is smaller than a 4-bit quantisation step. Merged into the base and then rounded to 4 bits, most
of the adapter's change rounds away (in the quickstart's student 43% of the Q4_1 blocks came out identical to the
untrained model's). Kept beside a 4-bit base, the adapter keeps its change at full precision.

The file follows what llama.cpp's ``convert_lora_to_gguf.py`` writes: ``general.type = adapter``,
``adapter.type = lora``, per target weight a ``.lora_a`` (rank x in) and a ``.lora_b`` (out x rank) with the
base weight's llama.cpp name, B's rows in llama.cpp's rotary order for Q and K. One difference: PEFT's scaling
(``lora_alpha / r``, or its rsLoRA and per-module variants) is folded into B and ``adapter.lora.alpha`` is left
out, which llama.cpp reads as "apply B·A as it is", so every PEFT scaling rule comes out exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.export.gguf import GGUFExportError, check_convertible, rotary_heads, rotary_rows_to_interleaved

ADAPTER_DTYPE = "F16"  # half of F32 on disk; the change B·A makes is far above F16's precision


def lora_weights(peft_model: Any) -> dict[str, tuple[Any, Any]]:
    """Each LoRA-adapted weight of a PEFT model, by the base weight's Hugging Face name: (A, B x scaling) as fp32
    NumPy arrays, so that the weight with the adapter applied is ``W + B @ A``."""
    from peft.tuners.lora import LoraLayer

    found: dict[str, tuple[Any, Any]] = {}
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or not module.lora_A:
            continue
        if module.lora_embedding_A or len(module.lora_A) != 1:
            raise GGUFExportError(f"GGUF adapter export: {module_name} holds an embedding adapter or several "
                                  "adapters; merge it instead (--merge)")
        (adapter_name,) = module.lora_A
        a = module.lora_A[adapter_name].weight.detach().float().cpu().numpy()
        b = module.lora_B[adapter_name].weight.detach().float().cpu().numpy() * module.scaling[adapter_name]
        found[module_name.removeprefix("base_model.model.") + ".weight"] = (a, b)
    if not found:
        raise GGUFExportError("GGUF adapter export: the model holds no LoRA weights")
    return found


def write_gguf_adapter(lora: dict[str, tuple[Any, Any]], config: Any, path: str | Path, *, name: str) -> None:
    """Write ``lora`` (from :func:`lora_weights`) for a Llama-family base with ``config`` to ``path``."""
    import gguf
    import numpy as np

    check_convertible(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    qtype = gguf.GGMLQuantizationType[ADAPTER_DTYPE]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    for hf_name, (a, b) in lora.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise GGUFExportError(f"GGUF adapter export: no llama.cpp name for the adapted weight {hf_name!r}")
        heads = rotary_heads(hf_name, config.num_attention_heads, config.num_key_value_heads)
        if heads:  # B's rows are the weight's output rows: the same reordering as the weight's
            b = rotary_rows_to_interleaved(b, heads)
        for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
            writer.add_tensor(gguf_name + suffix, gguf.quants.quantize(np.ascontiguousarray(tensor), qtype),
                              raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


__all__ = ["lora_weights", "write_gguf_adapter"]
