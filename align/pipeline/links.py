"""The train section as links: one stage (a mapping) or a chain (a list), each link a TrainConfig of its own, the
data it reads, the weights it starts from and the reference it is anchored to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from align.train.config import TrainConfig


# What each method trains on, by the name the stage before gave that file, and which stage that is.
_DATA_OF_METHOD = {"dpo": "pairs", "orpo": "pairs", "simpo": "pairs", "kto": "unpaired", "sft": "sft"}
_STAGE_OF_DATA = {"pairs": "pairs", "unpaired": "pairs", "sft": "select"}


@dataclass(frozen=True)
class TrainLink:
    """One stage of the train section: the section itself, or one item of a chain (``index`` counts from 1)."""

    index: int
    settings: dict[str, Any]

    @property
    def method(self) -> str:
        from align.train.config import TrainConfig

        return self.settings.get("method", TrainConfig.model_fields["method"].default)

    @property
    def name(self) -> str:
        """Its folder under the run dir's train/ (a chain's links only)."""
        return f"{self.index}-{self.method}"

    @property
    def key(self) -> str:
        """Its entry in the manifest (a chain's links only)."""
        return f"train/{self.name}"

    @property
    def data(self) -> str:
        return _DATA_OF_METHOD[self.method]


def _train_links(config: PipelineConfig) -> list[TrainLink]:
    sections = config.train if isinstance(config.train, list) else [config.train]
    return [TrainLink(index, settings) for index, settings in enumerate(sections, 1)]


def _original_model(config: PipelineConfig) -> str:
    """The model training starts from (the first link's): eval compares the trained student with it."""
    from align.train.config import TrainConfig

    return _train_links(config)[0].settings.get("model", TrainConfig.model_fields["model"].default)


def _train_config(config: PipelineConfig, data: Path, output_dir: Path) -> TrainConfig:
    """The train section (one stage) as the train stage's own TrainConfig (its defaults, its validation)."""
    return _link_config(config, _train_links(config)[0], data, output_dir)


def _link_config(config: PipelineConfig, link: TrainLink, data: Path, output_dir: Path, *,
                 start: Path | None = None, reference: str | None = None) -> TrainConfig:
    """A train link as the train stage's own TrainConfig; ``start``: the weights it starts from instead of a
    ``model`` of its own (a later link of a chain, or any link of a round after the first); ``reference``: the
    reference a round after the first anchors it to ("base": the weights it starts from), instead of its own."""
    from align.train import load_train_config

    settings = {"seed": config.seed, **{k: v for k, v in link.settings.items() if k != "method"}}
    if start is not None:
        settings["model"] = str(start)
    if reference is not None:
        settings["reference"] = reference
    return load_train_config(link.method, settings, data=str(data), output_dir=str(output_dir))


def _link_reference(link: TrainLink, train_config: TrainConfig, previous: TrainLink | None, *,
                    round_reference: str | None = None) -> tuple[str, str | None]:
    """(how the log and manifest say it, the model spec) of the reference a link's KL term anchors to: for DPO/KTO
    the weights the link starts from (the link before's model) unless the link sets one. ``round_reference``: in a
    round after the first, the pipeline's ``reference`` (original | previous) when it chose this link's reference."""
    from align.train.config import REFERENCE_METHODS

    if link.method not in REFERENCE_METHODS:
        return f"none ({link.method.upper()} uses no reference model)", None
    if round_reference == "original":
        return f"{train_config.reference}, round 1's reference (reference: original)", train_config.reference
    if round_reference == "previous" and previous is None:
        return (f"the previous round's student {train_config.model}, where this round starts (reference: previous)",
                train_config.model)
    if train_config.reference != "base":
        return f"{train_config.reference} (set in the link)", train_config.reference
    if previous is None:
        return f"the original model {train_config.model}, where the chain starts", train_config.model
    return f"the {previous.name} link's model {train_config.model}, where this link starts", train_config.model
