"""Turn a run dir into a standalone model folder (merging a LoRA adapter on request)."""

from __future__ import annotations

from pathlib import Path

from align.data.io import atomic_path
from align.errors import AlignError
from align.models import load_model, load_tokenizer, resolve_model


def export_run(run: str, output: str | Path, *, merge: bool = False) -> Path:
    source = resolve_model(run)
    if source.kind == "adapter" and not merge:
        raise AlignError(f"{run} is a LoRA adapter: pass --merge to write a full model folder "
                         f"(or use the adapter folder {source.adapter} as it is)")
    model = load_model(source, merge_adapter=merge, device="cpu")  # loaded from the one resolve above
    tokenizer = load_tokenizer(source)
    output = Path(output)
    if output.exists():
        raise AlignError(f"{output} exists; choose a new folder")
    with atomic_path(output) as tmp:
        tmp.unlink()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output


__all__ = ["export_run"]
