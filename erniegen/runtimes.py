"""What runs the infilling decode step: PyTorch eager (``torch``), ONNX Runtime (``onnx``, erniegen.onnx_runtime)
or ``torch.compile`` (``compile``): ``erniegen.load(path, runtime=...)``, ``--runtime``.

Each runtime other than eager sets ``model.step_runner``, which :class:`erniegen.ernie_gen.InfillingStepper` calls
instead of the network: the step's tokens against every layer's whole cache buffer, the slots not committed
masked out (``KVCache.step_mask(..., whole=True)``), so that a step never copies or slices the cache and has the
same shapes from one step to the next; the runner writes the step's keys and values into the buffers. The
prefill, the search and the cache's bookkeeping stay eager PyTorch for every runtime.

Why ``compile``: a decode step at batch 1 is ~150 small operations around 26 products; Inductor fuses the
small ones (residual adds into LayerNorms, GELUs, the attention's masking and softmax), and with
``max_autotune`` over its own C++ GEMM template (``INDUCTOR_CONFIG``) it writes the products for the step's
few rows itself, over weights it packs once at compile time. Both are needed: compiled with Inductor's default
products (MKL's packed product, slow at two rows), the fp32 step was 1.24x eager's time and bf16 0.74x; with
the template fp32 took 0.49x (1.17x the fp32 floor) and bf16 0.45x (BENCHMARKS.md section 3). int8 compiles
through the quantize/dequantize form of its products (``precision.Int8Linear``), which Inductor turns into
oneDNN's int8 products (``INT8_INDUCTOR_CONFIG``, called from Inductor's C++ wrapper): fbgemm's packed products,
which eager int8 calls, are opaque to it and broke the graph in every layer. Without VNNI (7-bit activations)
oneDNN's int8 products are the slower ones: the compiled int8 step took 1.56x eager int8's on an AVX2-only EPYC,
so compiling int8 there warns. Each call checks only the guards on
the step's inputs and the global state, each model's graphs cached on a code object of its own (``own_forward``).
Compiling, products autotuned, takes ~1.5 min on first use (~30 s once Inductor's on-disk cache holds the
autotuned choices; int8 ~40 s), once per batch-size class (1 or more), step length (the first step has one
token, the others two) and grad mode (no_grad or inference_mode); source length and batch size are symbolic, so
a run over many batches does not compile again.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from types import FunctionType, MethodType

import torch
from torch import nn

from .ernie_gen import CopySource, copy_head, step_log_probs
from .network import Network, PastSlot
from .precision import Fp16Linear, Int8Linear, full_range_activations
from .registry import default_decoder

RUNTIMES: tuple[str, ...] = ("torch", "onnx", "compile")
STEP_RUNTIMES: tuple[str, ...] = ("onnx", "compile")  # the runtimes that run the infilling step only
STEP_DECODERS: tuple[str, ...] = ("infilling",)
# Inductor settings of the compiled step (module docstring). freezing makes the weights constants of the compiled
# code, which the template packs; it is set around the call, where the compile happens: torch.compile's own
# options={"freezing": True} did not take effect here
INDUCTOR_CONFIG = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
# int8: the template's int8 product corrupted the heap while being autotuned (torch 2.13, an AVX512-VNNI EPYC; known
# fragile upstream, pytorch/pytorch#134449), so int8 products are oneDNN's (onednn.qlinear_pointwise) and the rest
# of the step is fused without autotuning. Inductor's C++ wrapper calls those ~20 products a step directly instead of
# through Python's operator dispatch: the int8 step 0.82x the Python wrapper's (fp32 and bf16, whose products the
# template writes, gained nothing from it; BENCHMARKS.md section 3)
INT8_INDUCTOR_CONFIG = {"freezing": True, "cpp_wrapper": True}


def check_runtime(runtime: str, precision: str = "fp32", decoder: str | None = None) -> str:
    """``runtime`` if it runs ``precision`` and ``decoder`` (None: not chosen yet), else an error naming them."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "onnx" and precision != "fp32":
        raise ValueError(f"runtime 'onnx' runs fp32 weights only, got precision {precision!r}; use precision fp32, "
                         "or runtime torch")
    if runtime in STEP_RUNTIMES and decoder is not None and decoder not in STEP_DECODERS:
        raise ValueError(f"runtime {runtime!r} runs the {' and '.join(STEP_DECODERS)} decoder only (greedy and "
                         f"beam search), got decoder {decoder!r}; use runtime torch for it")
    return runtime


def runtime_of(model: Network) -> str:
    """The runtime of ``model``'s infilling steps."""
    return "torch" if model.step_runner is None else model.step_runner.runtime


def use_runtime(model: Network, runtime: str, runner: Callable[[Network], Callable] | None = None) -> Network:
    """Run ``model``'s infilling steps with ``runtime`` from now on; returns the model. ``runner`` makes the step
    runner of a runtime defined elsewhere (erniegen.onnx_runtime's). The runner works from the weights as they are
    now: a model changed afterwards needs this again."""
    check_runtime(runtime, model.precision, default_decoder(model.settings.method))
    if runner is None:
        runner = {"torch": lambda _: None, "compile": CompiledInfillingStep}[runtime]
    model.step_runner = runner(model)
    return model


class FlatStep(nn.Module):
    """:func:`~erniegen.ernie_gen.step_log_probs` with the past (and the copy source of a model that copies) as
    flat inputs and the keys/values as flat outputs: the form an exporter or a compiler takes."""

    def __init__(self, model: Network):
        super().__init__()
        self.model = model
        self.copies = copy_head(model) is not None

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, types: torch.Tensor, mask: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        source, past = (CopySource(*rest[:3]), rest[3:]) if self.copies else (None, rest)
        logp, kv = step_log_probs(self.model, ids, pos, types, mask, list(zip(past[0::2], past[1::2])), source)
        return (logp, *(x for pair in kv for x in pair))


def flat_inputs(ids: torch.Tensor, pos: torch.Tensor, types: torch.Tensor, mask: torch.Tensor,
                past: list[PastSlot], source: CopySource | None, copies: bool) -> list[torch.Tensor]:
    """:class:`FlatStep`'s inputs in order; ``source`` for (and only for) a model that ``copies``."""
    if (source is not None) != copies:
        raise ValueError("the step " + ("copies: it needs the copy source" if copies
                                        else "does not copy: it takes no copy source"))
    rest = [] if source is None else [source.keys, source.ids, source.valid]
    return [ids, pos, types, mask, *rest, *(x for slot in past for x in (slot.k, slot.v))]


def own_forward(module: nn.Module) -> nn.Module:
    """``module`` with a ``forward`` whose code object is its own: dynamo caches graphs on the code object, so the
    graphs of each model compiled in the process are kept apart from every other model's, and dynamo's recompile
    limit counts one model's graphs only."""
    f = type(module).forward
    code = f.__code__.replace()  # a copy: a new object, with no cached graphs
    module.forward = MethodType(FunctionType(code, f.__globals__, f.__name__, f.__defaults__, f.__closure__), module)
    return module


class CompiledInfillingStep:
    """``model``'s infilling step under ``torch.compile`` (Inductor with ``INDUCTOR_CONFIG``: the weights are
    constants of the compiled code, packed for products it writes itself). Called as
    :class:`erniegen.ernie_gen.InfillingStepper` calls a step runner; returns the log-probabilities and writes
    the step's keys/values into the buffers."""

    runtime = "compile"

    def __init__(self, model: Network):
        self.copies = copy_head(model) is not None
        if model.precision == "int8" and not full_range_activations():
            warnings.warn("int8 under runtime 'compile' on a CPU without VNNI runs oneDNN's int8 products, which are "
                          "slow here: the compiled step took 1.2-2.0x eager int8's time on an AVX2-only EPYC "
                          "(BENCHMARKS.md section 3); runtime torch is faster on this CPU", stacklevel=3)
        for m in model.modules():
            if isinstance(m, (Int8Linear, Fp16Linear)):
                m.keep_plain_weight()
        self.inductor_config = INT8_INDUCTOR_CONFIG if model.precision == "int8" else INDUCTOR_CONFIG
        self.flat = own_forward(FlatStep(model).eval())
        # each call checks the guards on its inputs (dtypes, shapes, strides) and the global state (grad mode,
        # autocast) only, not the ~360 a graph on the model's modules and parameters and on the code's globals,
        # which took ~0.3 ms a step: the weights are constants of the compiled code and each model's graphs are
        # cached apart (own_forward), so those guards could only catch a model or code changed after compiling,
        # which needs use_runtime again anyway
        self._step: Callable[..., tuple[torch.Tensor, ...]] = torch.compile(
            self.flat, dynamic=False, options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, types: torch.Tensor, mask: torch.Tensor,
                 past: list[PastSlot], source: CopySource | None = None) -> torch.Tensor:
        # contiguous: a view's strides would be guarded on too (the copy source's keys are a view in a first step)
        inputs = [x.contiguous() for x in flat_inputs(ids, pos, types, mask, past, source, self.copies)]
        # rows, cache capacity and source length vary between batches, the step's token count (1 or 2) does not
        # within one: sizes that vary are symbolic in the graph, so that new ones need no new compile
        copy = 3 if self.copies else 0
        dims = [(0,), (0,), (0,), (0, 2)] + [(0, 1)] * copy + [(0, 2)] * (len(inputs) - 4 - copy)
        for x, varying in zip(inputs, dims):
            for dim in varying:
                torch._dynamo.maybe_mark_dynamic(x, dim)
        # a model has at most 8 graphs (first step or later x one row or several x no_grad or inference_mode):
        # dynamo's default recompile limit, which counts the graphs cached on one code object (own_forward)
        with torch._inductor.config.patch(self.inductor_config):
            logp, *kv = self._step(*inputs)
        for slot, k, v in zip(past, kv[0::2], kv[1::2]):
            slot.extend(k, v)
        return logp
