"""Inference precision: the weights every decoder runs on, fp32, bf16 or int8.

:func:`apply_precision` is the one way a precision reaches a model: ``erniegen.load(path,
precision=...)`` and ``erniegen generate/bench --precision`` call it on a freshly loaded fp32 model, and
:meth:`erniegen.network.Network.add_extra` passes a method head attached later (NAR's length head,
ELMER's off-ramps and fusion layer, which decoders attach on first use) through :func:`convert_module`,
so a head restored after loading runs in the model's precision too.

* ``bf16``: every weight (embeddings and LayerNorms too) cast to bfloat16. Decoders already take
  ``log_softmax`` of ``logits.float()``, so scores, argmax and beam comparisons are in fp32.
* ``int8``: PyTorch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``): the weights of
  every ``nn.Linear`` are int8 with a scale per output channel, activations are quantized batch by batch
  at run time, to 8 bits on CPUs with VNNI and to 7 elsewhere (:class:`Int8Linear`). The tied vocabulary
  projection gets a quantized *copy* of the word-embedding matrix (``LMHead.quantized``, shared by ELMER's
  off-ramps); the input embedding stays fp32. torchao 0.18 installs beside torch 2.13 here, but its eager
  int8 linear on CPU took 91 ms for the 384 x 30,522 projection at batch 1 against fp32's 7.5 ms and
  ``quantize_dynamic``'s 0.2 ms (a rough check on the busy machine, 1 thread), so the in-tree API is used;
  its deprecation warnings are silenced where it is called.

Checkpoints are always saved in fp32 and a precision is applied on every load (int8 re-quantizes the fp32
weights, well under a second for MiniLM): a model in bf16 or int8 refuses ``save_pretrained``, and training
is not meant to run on one.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")


def check_precision(name: str) -> str:
    """``name`` if it is an inference precision, else an error naming it and the choices."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    return name


# per-channel weight scales (one per output row): on qg-v3's model, 32 of 150 greedy dev questions came out
# identical to fp32's with them against 14 with one scale per matrix (BENCHMARKS.md section 3)
INT8_QCONFIG = torch.ao.quantization.per_channel_dynamic_qconfig


def full_range_activations() -> bool:
    """Whether this CPU multiplies int8 with VNNI (32-bit accumulation). Without it, fbgemm's u8 x s8 pair
    sums saturate at 16 bits unless activations keep to 7 bits, which is why PyTorch's dynamic linear always
    quantizes them to 0..127 (``reduce_range``); with it the eighth bit is free precision."""
    return torch.cpu._is_vnni_supported()


class Int8Linear(torch.ao.nn.quantized.dynamic.Linear):
    """PyTorch's dynamic int8 linear, with the activations' range a setting instead of always 7 bits."""

    reduce_range = not full_range_activations()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=self.reduce_range)
        return y.to(x.dtype)


def _quantize_linears(module: nn.Module, qconfig=INT8_QCONFIG,
                      keep_fp32: Callable[[str], bool] = lambda name: False,
                      reduce_range: bool | None = None) -> nn.Module:
    """``module`` with every ``nn.Linear`` (itself included) replaced by a dynamic int8 one, except those
    whose name ``keep_fp32`` picks; activations in 7 bits if ``reduce_range``, else 8 (default: 8 where the
    CPU has VNNI). benchmarks/int8_agreement.py compares such variants."""
    holder = nn.ModuleDict({"m": module})  # quantize_dynamic swaps children, never the root it is given
    spec = {f"m.{n}" if n else "m": qconfig for n, x in module.named_modules()
            if isinstance(x, nn.Linear) and not keep_fp32(n)}
    with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated in favour of torchao (see above)
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(holder, spec, dtype=torch.qint8, inplace=True,
                                               mapping={nn.Linear: Int8Linear})
    if reduce_range is not None:
        for m in holder.modules():
            if isinstance(m, Int8Linear):
                m.reduce_range = reduce_range
    return holder["m"]


def convert_module(module: nn.Module, precision: str) -> nn.Module:
    """``module``'s weights in ``precision`` (fp32 leaves it as it is); may return a new module."""
    check_precision(precision)
    if precision == "bf16":
        return module.to(torch.bfloat16)
    if precision == "int8":
        return _quantize_linears(module)
    return module


def apply_precision(model, precision: str):
    """Put an fp32 :class:`~erniegen.network.Network` (in eval mode) into ``precision``, in place; returns it.

    int8 first gives the LM head a bias-free ``nn.Linear`` holding a copy of the word embeddings, so the
    one quantization pass covers the vocabulary projection with the other linear layers.
    """
    check_precision(precision)
    if model.precision != "fp32":
        raise ValueError(f"this model is already in {model.precision}; load the fp32 checkpoint again to "
                         f"change its precision")
    model.eval()
    if precision == "int8":
        word = model.embeddings.word.weight
        copy = nn.Linear(word.shape[1], word.shape[0], bias=False, device=word.device)
        with torch.no_grad():
            copy.weight.copy_(word)
        model.head.quantized = copy
    convert_module(model, precision)  # converts in place: the model's own root is never replaced
    model.precision = precision
    return model
