"""MISS: the generative Med-VQA architecture of the BLIP lineage (ViT | JTM encoder | answer decoder).

``peftmed.build_backbone("miss-tiny")`` builds one; ``peftmed.get_backbone("miss").from_pretrained(folder)``
loads a BLIP/MISS-format checkpoint folder (see :mod:`.checkpoint`).
"""

from .config import PRESETS, MissConfig
from .model import MissForVQA
from .tokenizer import MissTokenizer

__all__ = ["PRESETS", "MissConfig", "MissForVQA", "MissTokenizer"]
