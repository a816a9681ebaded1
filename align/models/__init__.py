"""The model layer every stage stands on: which weights a spec means, loading them, prompt -> token ids,
the ids that end an answer, and one OpenAI-compatible HTTP client.

- :mod:`align.models.loading`: a model spec (bundled, folder, run dir, hub id) resolved once into a
  ``ModelSource``, which ``load_model`` and ``load_tokenizer`` take as well as the spec.
- :mod:`align.models.tokens`: a prompt rendered into token ids the one way generation, distillation,
  eval and the judge all use, and ``eos_token_ids``.
- :mod:`align.models.openai_client`: chat completions over HTTP for the teacher backend and the judge.

Nothing here imports a stage (generate, label, train, eval): they import this.
"""

from align.models.loading import (
    BUNDLED,
    BUNDLED_PREFIX,
    DEFAULT_MODEL,
    GGUF_ADAPTER_FOLDER,
    BundledModel,
    ModelError,
    ModelSource,
    accepts_block_masks,
    build_tiny_model,
    bundled_gguf,
    bundled_model_path,
    cache_dir,
    cache_kwarg,
    default_dtype,
    load_model,
    load_tokenizer,
    resolve_model,
)
from align.models.tokens import eos_token_ids, prompt_token_ids

__all__ = [
    "BUNDLED", "BUNDLED_PREFIX", "DEFAULT_MODEL", "GGUF_ADAPTER_FOLDER", "BundledModel", "ModelError", "ModelSource",
    "accepts_block_masks", "build_tiny_model", "bundled_gguf", "bundled_model_path", "cache_dir", "cache_kwarg",
    "default_dtype", "eos_token_ids", "load_model", "load_tokenizer", "prompt_token_ids", "resolve_model",
]
