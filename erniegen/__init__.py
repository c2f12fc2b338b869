"""erniegen: turn any BERT-family checkpoint into a text generator.

>>> import erniegen
>>> model = erniegen.load("runs/qg/best")
>>> model.generate(["the passage ... [SEP] the answer"], num_beams=5)
"""
from __future__ import annotations

__version__ = "0.1.0"


def load(path: str = "minilm", **settings):
    """Load an erniegen (or any BERT-family) checkpoint; ``.generate(sources, **options)`` returns strings."""
    from .model import Transformer
    return Transformer.from_pretrained(path, **settings).eval()
