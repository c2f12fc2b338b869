"""The infilling decode step run by ONNX Runtime: ``erniegen.load(path, runtime="onnx")``, ``--runtime onnx``.

Why: an infilling step multiplies two rows (the previous word and the [ATTN] placeholder) by every weight
matrix. Every PyTorch kernel tried reads a matrix once per row, so the fp32 step paid twice for its weights;
ONNX Runtime's Gemm reads the matrix once for both rows. Exported, the step's work ran at 0.7-0.9x the fp32
memory-bandwidth floor against PyTorch's 1.8-2.1x (BENCHMARKS.md section 3).

How: :func:`use_onnx_runtime` exports :func:`erniegen.ernie_gen.step_log_probs` (the step's tokens through
every layer over each layer's cached keys/values, then the next-token log-probabilities at the last token)
with PyTorch's TorchScript exporter, in memory, and opens one ONNX Runtime CPU session on it, on as many
threads as PyTorch uses. :class:`erniegen.ernie_gen.InfillingStepper` calls the session instead of the
network when the model carries one (``model.step_runner``); the prefill (the source's pass that fills the
cache), the search and the cache's bookkeeping (commit, beam expansion and reordering, all
:class:`erniegen.passes.KVCache`) stay PyTorch's. The session reads each layer's whole cache buffer in place
through an IOBinding (bound again only when a beam reorder moves the buffers), with the slots not committed
masked out (``KVCache.step_mask(..., whole=True)``), and returns the step tokens' keys/values into bound
tensors (reused while their shape holds), which are written into the buffer where the PyTorch network writes them
(:meth:`erniegen.network.PastSlot.extend`). Inside the graph, each layer's attention is
:class:`erniegen.network.Attention`'s inference path, exported as PyTorch runs it: one matrix product for the
query, key and value (one constant weight, 1/sqrt(d) folded into the query's rows), and the buffer's keys
scored apart from the step's own, so that the buffer is never concatenated with them (a copy of the whole
cache per layer and step, which at batch 32 made the merged export slower than PyTorch, BENCHMARKS.md
section 3).

A model that copies source words (``copy: true``, the squad_qg default) exports its pointer-generator too:
the copy source (the source tokens' last-layer keys, ids and which of them may be copied, taken from the
prefill by :func:`erniegen.ernie_gen.copy_source`) is three more inputs, and the mixture is computed inside the
graph as :func:`erniegen.ernie_gen.next_token_log_probs` computes it.

fp32 and the infilling decoder (greedy and beam search) only. The session holds its own copy of the weights,
taken when it is made: a model changed afterwards needs :func:`use_onnx_runtime` again.
"""
from __future__ import annotations

import io
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from .ernie_gen import CopySource, copy_head
from .network import Network, PastSlot
from .runtimes import FlatStep, flat_inputs, use_runtime

if TYPE_CHECKING:
    import onnxruntime

OPSET = 17
_NUMPY_TYPES = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_}


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, or an error saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError('runtime onnx needs ONNX Runtime: pip install "erniegen[onnx]"') from e
    return onnxruntime


def use_onnx_runtime(model: Network) -> Network:
    """Run ``model``'s infilling steps with ONNX Runtime from now on (exported here); returns the model."""
    return use_runtime(model, "onnx", OnnxInfillingStep)


def session_options() -> onnxruntime.SessionOptions:
    """The step session's options: PyTorch's thread count, so the two runtimes share the same cores."""
    options = import_onnxruntime().SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return options


COPY_NAMES: tuple[str, ...] = ("copy_keys", "copy_ids", "copy_valid")  # the copy source's inputs, in order


def _logaddexp(g, a, b):
    """``aten::logaddexp``, which the TorchScript exporter lacks (the copy mixture uses it), as
    max(a, b) + softplus(-|a - b|)."""
    return g.op("Add", g.op("Max", a, b), g.op("Softplus", g.op("Neg", g.op("Abs", g.op("Sub", a, b)))))


def export_step(model: Network) -> bytes:
    """:func:`~erniegen.ernie_gen.step_log_probs` of ``model`` as an ONNX model: inputs ``ids``, ``pos``,
    ``types``, ``mask``, for a model that copies :data:`COPY_NAMES`, and each layer's ``past_k_<i>``,
    ``past_v_<i>``; outputs ``logp`` and each layer's ``new_k_<i>``, ``new_v_<i>``."""
    cfg = model.config
    heads, width = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    past_names = [f"past_{kv}_{i}" for i in range(cfg.num_hidden_layers) for kv in "kv"]
    new_names = [f"new_{kv}_{i}" for i in range(cfg.num_hidden_layers) for kv in "kv"]
    # any sizes will do, every axis is dynamic; distinct ones, so that the tracer cannot confuse two axes
    b, t, cached = 3, 2, 5
    ids = torch.full((b, t), model.attn_id)
    pos = torch.arange(t).expand(b, t)
    types = torch.full((b, t), model.target_type_id)
    mask = torch.ones(b, t, cached + t, dtype=torch.bool)
    past = [torch.zeros(b, heads, cached, width) for _ in past_names]
    step = FlatStep(model).eval()
    source_len = 4
    copy_inputs = [torch.zeros(b, source_len, cfg.hidden_size), torch.zeros(b, source_len, dtype=torch.long),
                   torch.ones(b, source_len, dtype=torch.bool)] if step.copies else []
    copy_names = list(COPY_NAMES) if step.copies else []
    tokens, batch, sources = {0: "batch", 1: "tokens"}, {0: "batch"}, {0: "batch", 1: "source"}
    axes = ({"ids": tokens, "pos": tokens, "types": tokens, "mask": tokens | {2: "keys"}, "logp": batch}
            | {name: sources for name in copy_names}
            | {name: batch | {2: "cached"} for name in past_names}
            | {name: batch | {2: "tokens"} for name in new_names})
    onnx_model = io.BytesIO()
    torch.onnx.register_custom_op_symbolic("aten::logaddexp", _logaddexp, OPSET)
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of torch.export's, which would also need onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        # the copy mixture's 1/sqrt(hidden size), a Python float the trace keeps as a constant: it is one
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(step, (ids, pos, types, mask, *copy_inputs, *past), onnx_model, dynamo=False,
                          input_names=["ids", "pos", "types", "mask", *copy_names, *past_names],
                          output_names=["logp", *new_names], dynamic_axes=axes, opset_version=OPSET)
    return with_symbolic_shapes(onnx_model.getvalue())


def with_symbolic_shapes(onnx_model: bytes) -> bytes:
    """``onnx_model`` with every intermediate tensor's shape annotated in the graph's symbolic sizes (ONNX
    Runtime's symbolic shape inference). The exporter's reshapes to runtime sizes hide the hidden states' shape,
    and ONNX Runtime fuses each residual add, bias add and LayerNorm into one SkipLayerNormalization only where
    both inputs' shapes are known to match: with the shapes, 13 of 13 instead of 1 (188 -> 164 nodes)."""
    import logging

    import onnx
    from onnxruntime.tools import symbolic_shape_infer
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # the inference logs each comparison of sizes it cannot decide, all harmless: quiet its own logger only
    logger = logging.getLogger(symbolic_shape_infer.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        inferred = SymbolicShapeInference.infer_shapes(onnx.load_from_string(onnx_model), auto_merge=True)
    finally:
        logger.setLevel(level)
    return inferred.SerializeToString()


class OnnxInfillingStep:
    """An ONNX Runtime session running ``model``'s infilling step. Called with ``step_log_probs``' inputs, but the
    mask over the cache's whole buffers; returns the log-probabilities and writes the step's keys/values into
    the buffers itself.

    Inputs and outputs go through one IOBinding kept across calls: ONNX Runtime reads the tensors' memory and
    writes into tensors made here, with no numpy arrays made or outputs copied per call, and an input is bound
    again only when its memory or shape changed (the cache buffers stay the same between beam reorders)."""

    runtime = "onnx"

    def __init__(self, model: Network, options: onnxruntime.SessionOptions | None = None):
        """``options``: ONNX Runtime SessionOptions to use instead of :func:`session_options`' (a profiler's)."""
        ort = import_onnxruntime()
        cfg = model.config
        self.past_names = [f"past_{kv}_{i}" for i in range(cfg.num_hidden_layers) for kv in "kv"]
        self.new_names = [f"new_{kv}_{i}" for i in range(cfg.num_hidden_layers) for kv in "kv"]
        self.heads, self.vocab = cfg.num_attention_heads, cfg.vocab_size
        self.copies = copy_head(model) is not None
        self.session = ort.InferenceSession(export_step(model), options or session_options(),
                                            providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self._bound: dict[str, tuple[int, tuple[int, ...]]] = {}  # input name -> (address, shape) bound
        self._new: list[torch.Tensor] = []  # the step's keys/values as bound, reused while their shape holds

    def _bind(self, name: str, x: torch.Tensor) -> None:
        """Bind input ``name`` to contiguous ``x``'s memory, unless that memory with that shape already is."""
        key = (x.data_ptr(), tuple(x.shape))
        if self._bound.get(name) != key:
            self.binding.bind_input(name, "cpu", 0, _NUMPY_TYPES[x.dtype], key[1], key[0])
            self._bound[name] = key

    def feed(self, ids: torch.Tensor, pos: torch.Tensor, types: torch.Tensor, mask: torch.Tensor,
             past: list[PastSlot], source: CopySource | None) -> dict[str, torch.Tensor]:
        """The session's inputs by name, each contiguous; ``source``: the copy source, for (and only for) a
        model that copies."""
        names = ["ids", "pos", "types", "mask", *(COPY_NAMES if self.copies else ()), *self.past_names]
        feed = dict(zip(names, flat_inputs(ids, pos, types, mask, past, source, self.copies)))
        return {name: x.contiguous() for name, x in feed.items()}

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, types: torch.Tensor, mask: torch.Tensor,
                 past: list[PastSlot], source: CopySource | None = None) -> torch.Tensor:
        """The (N, V) next-token log-probabilities; the step's keys/values go into ``past``'s buffers, after the
        committed ones. ``mask`` is (N, T, capacity + T), ``KVCache.step_mask(..., whole=True)``; ``source`` as
        :meth:`feed` takes it."""
        feed = self.feed(ids, pos, types, mask, past, source)  # held until the run is over
        for name, x in feed.items():
            self._bind(name, x)
        n, t = ids.shape
        shape = (n, self.heads, t, past[0].k.shape[3])
        if not self._new or self._new[0].shape != shape:
            self._new = [past[0].k.new_empty(shape) for _ in self.new_names]
            for name, x in zip(self.new_names, self._new):
                self.binding.bind_output(name, "cpu", 0, _NUMPY_TYPES[x.dtype], shape, x.data_ptr())
        logp = torch.empty(n, self.vocab)  # the caller's to keep: a new one every step
        self.binding.bind_output("logp", "cpu", 0, _NUMPY_TYPES[logp.dtype], tuple(logp.shape), logp.data_ptr())
        self.session.run_with_iobinding(self.binding)
        for slot, new_k, new_v in zip(past, self._new[0::2], self._new[1::2]):
            slot.extend(new_k, new_v)
        return logp
