"""Interoperability with other adapter formats (huggingface/peft)."""

from .peft_format import export_to_peft, import_from_peft

__all__ = ["export_to_peft", "import_from_peft"]
