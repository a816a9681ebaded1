"""Getting a student out of align: a standalone model folder (:func:`export_run`, a LoRA adapter merged on
request), or a quantised copy with a record of what quantising cost (:func:`quantize_run`)."""

from align.export.formats import FORMATS, describe_formats
from align.export.merged import export_run
from align.export.quantize import quantize_run

__all__ = ["FORMATS", "describe_formats", "export_run", "quantize_run"]
