"""TRL's script names for align's settings, so a TRL recipe YAML or command line trains as it is written.

TRL's CLI (``trl dpo --config recipe.yaml``) reads three argument classes: the trainer's config (``DPOConfig``:
align reads every field of it by its own name), ``ScriptArguments`` (the dataset) and ``ModelConfig`` (the model,
LoRA, quantisation). The last two have names of their own for what align calls ``model``, ``data`` and ``lora``;
:func:`from_trl_names` reads them as align's. What has no align counterpart is an error that says what to use,
never a setting silently dropped.
"""

from __future__ import annotations

from typing import Any

# TRL name -> align's key (top level).
_SAME_AS = {"model_name_or_path": "model", "dataset_name": "data", "dataset_train_split": "split",
            "ref_model": "reference"}
# ModelConfig's LoRA names -> peft's, as align's ``lora`` section has them.
_LORA = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
         "lora_target_modules": "target_modules"}
# ModelConfig's model-loading names -> from_pretrained's, which TRL passes on through ``model_init_kwargs``.
_MODEL_INIT = {"dtype": "dtype", "torch_dtype": "dtype", "attn_implementation": "attn_implementation",
               "model_revision": "revision"}
# TRL names align does not take, and what to do instead.
_INSTEAD = {
    "dataset_config": "load that configuration yourself (datasets.load_dataset(name, config).save_to_disk(folder)) "
                      "and set data to the folder",
    "load_in_8bit": "align quantises for LoRA in 4 bits only (QLoRA): use load_in_4bit: true",
    "use_dora": "not offered: align's LoRA is peft's plain LoRA",
    "use_rslora": "not offered: align's LoRA is peft's plain LoRA",
}


def from_trl_names(data: dict[str, Any], *, distillation: bool = False) -> dict[str, Any]:
    """A training config given with TRL's script names, as align's: ``model_name_or_path`` -> ``model``,
    ``dataset_name`` -> ``data``, ``dataset_train_split`` -> ``split``, ``dataset_test_split`` -> ``eval_data_split``
    (of ``eval_data``, the training dataset unless set), ``ref_model`` -> ``reference``,
    ``use_peft``/``lora_*``/``load_in_4bit`` -> ``lora``, ``dtype``/``attn_implementation``/``model_revision`` ->
    ``model_init_kwargs``. Raises ValueError naming the key when both names of one setting disagree, or a TRL name
    has no counterpart.

    One difference stays: without ``use_peft``, align trains LoRA (its default), where TRL's CLI would train every
    weight; ``use_peft: false`` asks for a full fine-tune. With ``distillation``, GKD's
    ``teacher_model_name_or_path`` is align's ``teacher``.
    """
    data = dict(data)
    if distillation and "teacher_model_name_or_path" in data:
        _take(data, "teacher_model_name_or_path", "teacher", data.pop("teacher_model_name_or_path"))
    for name, advice in _INSTEAD.items():
        if data.get(name) not in (None, False):
            raise ValueError(f"'{name}' (a TRL name) is not read by align: {advice}")
        data.pop(name, None)
    for name, key in _SAME_AS.items():
        if name in data:
            _take(data, name, key, data.pop(name))
    if "dataset_test_split" in data:  # TRL evaluates on that split of the training dataset
        _take(data, "dataset_test_split", "eval_data_split", data.pop("dataset_test_split"))
        data.setdefault("eval_data", data.get("data"))
    _lora(data)
    init = {_MODEL_INIT[name]: data.pop(name) for name in list(data) if name in _MODEL_INIT}
    if init:
        given = data.get("model_init_kwargs") or {}
        for key, value in init.items():
            if key in given and given[key] != value:
                raise ValueError(f"'{key}' is set twice, as {value!r} and in model_init_kwargs as {given[key]!r}: "
                                 "keep one")
        data["model_init_kwargs"] = {**init, **given}
    return data


def _take(data: dict[str, Any], name: str, key: str, value: Any) -> None:
    if data.get(key) is not None and data[key] != value:
        raise ValueError(f"'{name}' ({value!r}, TRL's name) and '{key}' ({data[key]!r}) are both set: keep one")
    data[key] = value


def _lora(data: dict[str, Any]) -> None:
    """``use_peft``, ``lora_*`` and ``load_in_4bit`` into align's ``lora`` section (None: a full fine-tune)."""
    use_peft = data.pop("use_peft", None)
    settings = {_LORA[name]: data.pop(name) for name in list(data) if name in _LORA}
    if data.pop("load_in_4bit", False):
        settings["quantize"] = "4bit"
    if use_peft is None and not settings:
        return
    lora = data.get("lora", {})
    if isinstance(lora, bool):
        lora = {} if lora else None
    if use_peft is False and lora:
        raise ValueError("'use_peft' is false, a full fine-tune, but a lora section is given: keep one")
    if use_peft is False or lora is None:
        if settings:
            names = ", ".join(sorted(settings))
            raise ValueError(f"'use_peft' is false (or lora is null), a full fine-tune, but LoRA settings are given "
                             f"({names}): remove them, or train LoRA")
        data["lora"] = None
        return
    for key, value in settings.items():
        if key in lora and lora[key] != value:
            raise ValueError(f"'{key}' is set twice, in lora as {lora[key]!r} and by its TRL name as {value!r}: "
                             "keep one")
    data["lora"] = {**lora, **settings}
