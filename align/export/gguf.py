"""A Llama-family model as a GGUF file for llama.cpp and Ollama, quantised round-to-nearest in NumPy.

The file follows what llama.cpp's own converter writes for these models (the bundled SmolLM2 GGUF is the
reference the tests compare with): the same tensor names, the Q/K rows reordered for llama.cpp's rotary
layout, norms kept in F32, the tokenizer as a byte-level BPE vocabulary with its merges, special ids and
chat template. The quantisers are gguf-py's (the ones llama.cpp's Python tools use); K-quants and
importance-matrix quantisation need llama.cpp's C++ ``llama-quantize`` and are not offered here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import AlignError

log = logging.getLogger(__name__)

# Architectures whose weights map one to one onto llama.cpp's "llama" graph.
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# llama.cpp names a tokenizer's pre-tokenizer; it recognises it by hashing how a test string tokenises, a table
# align does not carry. Vocabularies align knows are named here; any other gets llama.cpp's default regex.
KNOWN_PRE_TOKENIZERS = {("<|im_start|>", 49152): "smollm"}


class GGUFExportError(AlignError):
    pass


@dataclass(frozen=True)
class GGUFQuant:
    """One GGUF file type: the quant of the 2-D weights, and that of the token embedding (which is also the
    output layer of a tied model: llama.cpp keeps it at 8 bits in its 4-bit files, as in the bundled Q4_1)."""

    name: str
    weights: str
    embedding: str
    file_type: str


GGUF_QUANTS = {
    "q8_0": GGUFQuant("q8_0", "Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    "q4_0": GGUFQuant("q4_0", "Q4_0", "Q8_0", "MOSTLY_Q4_0"),
    "q4_1": GGUFQuant("q4_1", "Q4_1", "Q8_0", "MOSTLY_Q4_1"),
}


def rotary_rows_to_interleaved(weight: Any, n_heads: int) -> Any:
    """Reorder a Q or K projection's rows from Hugging Face's rotary layout to llama.cpp's.

    Hugging Face rotates the first half of each head's dimensions against the second half; llama.cpp
    rotates neighbouring pairs. Within each head, row i of the first half and row i of the second half
    become rows 2i and 2i+1. (K uses the key-value head count.)
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def interleaved_rows_to_rotary(weight: Any, n_heads: int) -> Any:
    """The inverse of :func:`rotary_rows_to_interleaved`."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def check_convertible(config: Any) -> None:
    """Refuse, before any work, a model this writer cannot express exactly."""
    architectures = getattr(config, "architectures", None) or []
    if not set(architectures) & set(LLAMA_ARCHITECTURES):
        raise GGUFExportError(
            f"GGUF export supports Llama-family models ({', '.join(LLAMA_ARCHITECTURES)}); this model is "
            f"{', '.join(architectures) or 'of an unknown architecture'}. Export it with --merge and convert that "
            "folder with llama.cpp's convert_hf_to_gguf.py, or choose a transformers format (--quantize list)")
    if getattr(config, "sliding_window", None):
        raise GGUFExportError("GGUF export: sliding-window attention is not written by align; use llama.cpp's "
                              "convert_hf_to_gguf.py on an --merge export")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("GGUF export: projections with biases are not written by align; use llama.cpp's "
                              "convert_hf_to_gguf.py on an --merge export")


def write_gguf(model: Any, tokenizer: Any, path: str | Path, quant: GGUFQuant, *, name: str) -> dict[str, Any]:
    """Write ``model`` (a Llama-family ``PreTrainedModel``, fp32 weights) and its tokenizer to ``path``.

    Returns the weights as llama.cpp will compute with them, dequantised and back in Hugging Face's names and
    layout (a state dict): loaded into a copy of ``model`` they give the quantised model's outputs without
    parsing the file again.
    """
    import gguf
    import numpy as np
    import torch

    config = model.config
    check_convertible(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_hyperparameters(writer, config, quant, name)
    _add_tokenizer(writer, tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    head_count, kv_head_count = config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    dequantised: dict[str, Any] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads a tied output layer from token_embd
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"GGUF export: no llama.cpp name for the tensor {hf_name!r}")
        heads = rotary_heads(hf_name, head_count, kv_head_count)
        data = tensor.detach().float().cpu().numpy()
        if heads:
            data = rotary_rows_to_interleaved(data, heads)
        qtype = _tensor_quant(gguf_name, data, quant)
        packed = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
        writer.add_tensor(gguf_name, packed, raw_dtype=qtype)
        back = gguf.quants.dequantize(packed, qtype).reshape(data.shape)
        dequantised[hf_name] = torch.from_numpy(interleaved_rows_to_rotary(back, heads) if heads else back)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantised


def rotary_heads(hf_name: str, head_count: int, kv_head_count: int) -> int:
    """The heads whose rows llama.cpp wants reordered: Q's, K's (key-value heads), none elsewhere (0)."""
    return head_count if hf_name.endswith("q_proj.weight") else kv_head_count if hf_name.endswith(
        "k_proj.weight") else 0


def _tensor_quant(gguf_name: str, data: Any, quant: GGUFQuant) -> Any:
    """F32 for vectors (norms), the embedding's and output's quant for those, the weights' quant elsewhere; F16
    for a matrix whose rows do not fill whole quant blocks (as llama.cpp falls back)."""
    import gguf

    if data.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    kind = quant.embedding if gguf_name.startswith(("token_embd.", "output.")) else quant.weights
    qtype = gguf.GGMLQuantizationType[kind]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block_size:
        log.warning("%s: rows of %d values do not fill %s blocks of %d; kept as F16", gguf_name, data.shape[-1],
                    kind, block_size)
        return gguf.GGMLQuantizationType.F16
    return qtype


def _add_hyperparameters(writer: Any, config: Any, quant: GGUFQuant, name: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(gguf.LlamaFileType[quant.file_type])
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    scaling = _rope_scaling(config)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise GGUFExportError(f"GGUF export: rope scaling {scaling} is not written by align; use llama.cpp's "
                              "convert_hf_to_gguf.py on an --merge export")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(config: Any) -> float:
    # transformers 5 keeps rope settings in config.rope_parameters; older configs in rope_theta
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta") or getattr(config, "rope_theta", 10000.0)


def _rope_scaling(config: Any) -> dict[str, Any] | None:
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)


def _add_tokenizer(writer: Any, tokenizer: Any) -> None:
    """The vocabulary as llama.cpp's "gpt2" (byte-level BPE) tokenizer: tokens in id order, added special
    tokens as CONTROL, other added tokens as USER_DEFINED; merges, special ids and the chat template from the
    tokenizer's own files (gguf-py's SpecialVocab reads them)."""
    import tempfile

    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if not backend or backend["model"]["type"] != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, as Llama 3, SmolLM and "
                              "Qwen use); this one is not. Use llama.cpp's convert_hf_to_gguf.py on an --merge export")
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = tokenizer.added_tokens_decoder
    types = [gguf.TokenType.NORMAL] * size
    for token_id, token in added.items():
        types[token_id] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    pre = KNOWN_PRE_TOKENIZERS.get((tokenizer.bos_token, size))
    if pre is None:
        log.warning("GGUF export: llama.cpp does not know this tokenizer's pre-tokenizer by a name align carries; "
                    "it will split text with its default rule, which can tokenise some text differently. For an "
                    "exact match convert an --merge export with llama.cpp's convert_hf_to_gguf.py")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)  # byte-level BPE marks spaces itself
    with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads the tokenizer's files, not the object
        tokenizer.save_pretrained(folder)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=size).add_to_gguf(writer, quiet=True)


__all__ = ["GGUF_QUANTS", "GGUFExportError", "GGUFQuant", "check_convertible", "interleaved_rows_to_rotary",
           "rotary_heads", "rotary_rows_to_interleaved", "write_gguf"]
