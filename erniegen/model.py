"""The model users load: the network (network.py) with ``generate``, strings in and strings out.

``Transformer`` is :class:`erniegen.network.Network` plus one method. It has a module of its own
because ``generate`` needs every method's decoders while every method needs the network: the network
sits below the methods and decoders, this class above them, so no import runs back up.
"""
from __future__ import annotations

import torch

from .decoding import generate_text
# names older code imports from here
from .network import DEFAULT_MODEL, GenerationSettings, ModelConfig, Network, _math_attention, resolve_model_path

__all__ = ["DEFAULT_MODEL", "GenerationSettings", "ModelConfig", "Transformer", "_math_attention",
           "resolve_model_path"]


class Transformer(Network):
    """A :class:`~erniegen.network.Network` that generates text; ``from_pretrained`` returns one."""

    @torch.no_grad()
    def generate(self, sources: list[str], decoder: str | None = None, batch_size: int = 32,
                 progress: bool = False, **options) -> list[str]:
        """Generate one string per source; ``options`` are :class:`erniegen.decoding.DecodeOptions`."""
        return generate_text(self, sources, decoder=decoder, batch_size=batch_size, progress=progress, **options)
