"""Token ids a model reads and writes: a prompt rendered into ids, and the ids that end an answer.

Every stage that turns a prompt into ids goes through :func:`prompt_token_ids`: the transformers teacher
and the server (generation), distillation (a teacher re-run on stored answers), eval (the student's
samples scored under the reference for KL) and the logit judge. One rendering is what makes a log-prob
computed later condition on the very ids an answer was sampled from.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

_warned_plain_text: set[str] = set()
_warned_lock = threading.Lock()


def chat_messages(prompt: str | Sequence[Any]) -> list[dict[str, str]]:
    """A prompt as chat messages: text is one user turn; messages (dicts or records) keep role and content only.

    Extra fields a record may carry (``name``, tool data) are dropped, as generation always did: a template
    that printed them would give other ids to the same prompt in another stage.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} if isinstance(m, Mapping)
            else {"role": m.role, "content": m.content} for m in prompt]


def prompt_token_ids(tokenizer: Any, prompt: str | Sequence[Any]) -> list[int]:
    """The prompt's token ids, ending where the assistant's answer starts.

    With a chat template: the template with its generation prompt, as text, then tokenized without
    special tokens (the template writes its own BOS; tokenizing with them would add a second one).

    Without one (a base model): the messages' contents as plain text, a blank line between them, with the
    tokenizer's special tokens as any plain text gets them. A warning names the model, once.
    """
    messages = chat_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    _warn_plain_text(tokenizer)
    return list(tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"])


def _warn_plain_text(tokenizer: Any) -> None:
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    with _warned_lock:  # the judge and the HTTP teacher render from several threads
        if name in _warned_plain_text:
            return
        _warned_plain_text.add(name)
    log.warning("%s has no chat template: its prompts are plain text, the messages' contents separated by "
                "blank lines (roles are not shown). Use an instruct model, or set tokenizer.chat_template, "
                "for chat prompts.", name)


def eos_token_ids(model_or_generation_config: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the generation config's (a list for some chat models, e.g. an
    end-of-turn and an end-of-text id) and the tokenizer's ``eos_token_id``. Sorted, no ``None``."""
    config = getattr(model_or_generation_config, "generation_config", model_or_generation_config)
    eos = getattr(config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    ids.add(getattr(tokenizer, "eos_token_id", None))
    return sorted(i for i in ids if i is not None)
