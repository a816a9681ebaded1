"""Every section checked before anything runs: a typo in `train` or a bad link fails now, not after generation."""

from __future__ import annotations

from align.config import load_config
from align.errors import ConfigError
from align.pipeline.config import PipelineConfig, _eval_settings, _evaluates_intermediate, _is_chain
from align.pipeline.links import TrainLink, _link_config, _train_links


def check_sections(config: PipelineConfig) -> None:
    """Validate every stage's settings up front: a typo in `train` fails now, not after generation."""
    from align.generate import GenerateConfig

    run = config.run_dir
    for name, check in (
        ("generate", lambda: load_config(GenerateConfig, None, (), defaults={**config.generate, "output": run / "c"})),
        ("train", lambda: _check_train(config)),
        ("eval", lambda: _check_eval(config)),
        ("export", lambda: _check_export(config)),
    ):
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"section '{name}': {exc}") from None


def _check_export(config: PipelineConfig) -> None:
    """Unknown formats and a format this machine cannot write fail before generation, as export would later."""
    import torch

    from align.eval.retention import task_config
    from align.export.formats import export_format

    if config.export.quantize and config.rounds > 1:
        raise ConfigError("quantised exports after rounds are not run yet: export the last round's student with "
                          "align export RUN --quantize FORMAT")
    for name in config.export.quantize:
        export_format(name, gpu_visible=torch.cuda.is_available())
    for task in config.export.tasks:
        task_config(task)


def _check_train(config: PipelineConfig) -> None:
    if _is_chain(config) and not config.train:
        raise ConfigError("the list of stages is empty: give one stage (a mapping) or a list of them")
    for link in _train_links(config):
        try:
            _check_link(config, link)
        except ConfigError as exc:
            raise ConfigError(f"link {link.index} of the chain: {exc}" if _is_chain(config) else str(exc)) from None


def _check_link(config: PipelineConfig, link: TrainLink) -> None:
    if _is_chain(config) and "method" not in link.settings:
        raise ConfigError("'method' is required in each link: dpo, kto, sft, orpo or simpo")
    if link.index > 1 and "model" in link.settings:
        raise ConfigError("'model' is set, but a later link starts from the weights of the link before it: remove "
                          "it (the first link names the model the chain starts from)")
    train_config = _link_config(config, link, config.run_dir / "data.jsonl", config.run_dir / "train")
    if train_config.reference != "base":
        _check_reference(train_config.reference)


def _check_reference(spec: str) -> None:
    """A reference that names no model fails now, before generation and before any link trains (a bundled name is
    looked up without converting it; a folder must exist)."""
    from align.models import BUNDLED_PREFIX, ModelError, bundled_gguf, resolve_model

    try:
        if spec.startswith(BUNDLED_PREFIX):
            bundled_gguf(spec.removeprefix(BUNDLED_PREFIX))
        else:
            resolve_model(spec)
    except ModelError as exc:
        raise ConfigError(f"'reference' cannot be resolved: {exc}") from None


def _check_eval(config: PipelineConfig) -> None:
    from align.eval import EvalConfig

    _evaluates_intermediate(config)
    load_config(EvalConfig, None, (), defaults={"model": "m", "reference": "r", "output_dir": config.run_dir / "eval",
                                                **_eval_settings(config)})
