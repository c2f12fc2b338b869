"""Inference precision: the weights every decoder runs on, fp32, bf16 or int8.

:func:`apply_precision` is the one way a precision reaches a model: ``erniegen.load(path,
precision=...)`` and ``erniegen generate/bench --precision`` call it on a freshly loaded fp32 model, and
:meth:`erniegen.network.Network.add_extra` passes a method head attached later (NAR's length head,
ELMER's off-ramps and fusion layer, which decoders attach on first use) through :func:`convert_module`,
so a head restored after loading runs in the model's precision too.

* ``fp32``: on CPU, in inference (eval mode, no gradients, no autocast, not exporting), every linear layer of
  the network, the fused query/key/value product and the tied vocabulary projection multiply through oneDNN
  with their weight reordered once into its blocked layout (:func:`packed_linear`, the products PyTorch's own
  ``torch.compile`` freezing emits on CPU): MKL's plain product of 2 rows ran at half a vector's bandwidth
  here, which made a decode step 2.5x its bandwidth floor. The packed copy is derived, cached beside the
  module (never saved) and rebuilt when the weights change; training never takes this path. bf16 weights
  take it too on a CPU with native bf16; fp32 does not on a CPU with AMX, where the plain product is faster
  (:func:`packed_dtypes`).
* ``bf16``: every weight (embeddings and LayerNorms too) cast to bfloat16. Decoders already take
  ``log_softmax`` of ``logits.float()``, so scores, argmax and beam comparisons are in fp32.
* ``int8``: PyTorch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``): the weights of
  every ``nn.Linear`` are int8 with a scale per output channel, activations are quantized batch by batch
  at run time, to 8 bits on CPUs with VNNI and to 7 elsewhere (:class:`Int8Linear`); each layer's
  ``ffn_out`` stays out of int8 (:func:`stays_wide`), in bf16 where native, else with float16 weights
  (:class:`Fp16Linear`). Under ``torch.compile`` (``--runtime compile``) the same products are traced as
  quantize/dequantize operators, which Inductor lowers to oneDNN's int8 product (:meth:`Int8Linear._decomposed`).
  The tied vocabulary
  projection gets a quantized *copy* of the word-embedding matrix (``LMHead.quantized``, shared by ELMER's
  off-ramps); the input embedding stays fp32. torchao 0.18 installs beside torch 2.13 here, but its eager
  int8 linear on CPU took 91 ms for the 384 x 30,522 projection at batch 1 against fp32's 7.5 ms and
  ``quantize_dynamic``'s 0.2 ms (a rough check on the busy machine, 1 thread), so the in-tree API is used;
  its deprecation warnings are silenced where it is called.
* int8 *smoothing* (SmoothQuant, Xiao et al. 2023): where a model folder holds activation statistics
  (:data:`CALIBRATION_FILE`, written by :func:`calibrate` through ``erniegen calibrate`` and at the end of
  ``erniegen finetune``), the inputs of the query/key/value, ``ffn_in`` and the LM head's ``dense`` are
  divided channel-wise by s_j = max|x_j|^α / max|W_:j|^(1-α) (α: :data:`SMOOTHING_ALPHA`) and the weight's
  columns multiplied by it before quantizing: exact in real arithmetic, and the few input channels 16-18x
  larger than the median (LayerNorm outputs) stop taking the whole 7- or 8-bit range of the batch's one
  activation scale. Greedy dev questions identical to fp32's, of 150, without VNNI: qg-e6 77 -> 114,
  qg-typical-s1 70 -> 107, qg-nat-s1 37 -> 91 (BENCHMARKS.md section 3). Without statistics int8 runs
  unsmoothed and says so.

Checkpoints are always saved in fp32 and a precision is applied on every load (int8 re-quantizes the fp32
weights, well under a second for MiniLM): a model in bf16 or int8 refuses ``save_pretrained``, and training
is not meant to run on one.
"""
from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed operators)
import torch.nn.functional as F
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


# ---- fp32 inference on CPU: oneDNN-packed weights ----------------------------------------------------------

ONEDNN_LINEAR: bool = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# module -> {slot: (packed weight, what it was packed from)}: outside the module, so that neither the state dict
# nor a deepcopy sees the opaque oneDNN tensors
_PACKED: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[torch.Tensor, tuple]]] = weakref.WeakKeyDictionary()


def values_key(*tensors: torch.Tensor) -> tuple:
    """What a copy derived from ``tensors`` is valid for: an in-place update (an optimizer step,
    ``load_state_dict``, ``copy_`` under no_grad) moves a tensor's version counter, a move, cast or replacement
    gives it a new address or dtype. Writes through ``.data`` move none of them, so they are not seen; nor do
    tensors made under ``torch.inference_mode``, which keep no version counter."""
    return tuple((-1 if t.is_inference() else t._version, t.data_ptr(), t.dtype) for t in tensors)


def packs(x: torch.Tensor, weight: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``x @ weight.T`` in ``module`` runs on a oneDNN-packed weight: inference on CPU in fp32 (or native
    bf16) in eval mode (the no-grad passes of training, GLAT's and MIST's, run in train mode on weights that
    change every step), outside autocast, tracing, ONNX export and ``torch.compile``, which would not see
    through the opaque copy."""
    return (ONEDNN_LINEAR and not module.training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == weight.dtype and x.dtype in PACKED_DTYPES and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling())


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module: nn.Module,
                  slot: str = "weight", key: tuple | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through oneDNN, ``weight`` reordered once per ``key`` (default: its
    :func:`values_key`; a weight derived from others passes theirs) and kept under ``module``'s ``slot``. Call
    where :func:`packs` holds."""
    cache = _PACKED.setdefault(module, {})
    key = values_key(weight) if key is None else key
    if slot not in cache or cache[slot][1] != key:
        # the layout chosen for 2 rows (a decode step: the new word and its [ATTN]); any row count multiplies
        cache[slot] = (torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 2), key)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), cache[slot][0],
                                           None if bias is None else bias.detach(), "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoints) whose fp32 inference on CPU runs on a oneDNN-packed
    weight (:func:`packs`): at the 2 rows of a decode step, 1.4-2x MKL's product of the same weight here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if packs(x, self.weight, self):
            return packed_linear(x, self.weight, self.bias, self)
        return F.linear(x, self.weight, self.bias)


def _plain_linear(mod: nn.Module) -> nn.Module:
    """``mod`` as PyTorch's own ``nn.Linear`` (same parameters and qconfig): its quantized modules take only their
    own float classes."""
    if type(mod) is not Linear:
        return mod
    plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=mod.weight.device)
    plain.weight, plain.bias, plain.qconfig = mod.weight, mod.bias, mod.qconfig
    return plain


class Int8Linear(torch.ao.nn.quantized.dynamic.Linear):
    """PyTorch's dynamic int8 linear, with the activations' range a setting instead of always 7 bits, and an
    optional channel-wise scale of its input (the smoothing's other half, :func:`smooth_and_quantize`)."""

    reduce_range = not full_range_activations()
    input_scale: torch.Tensor | None = None

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> Int8Linear:
        return super().from_float(_plain_linear(mod), use_precomputed_fake_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        if torch.compiler.is_compiling():
            return self._decomposed(x)
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=self.reduce_range)
        return y.to(x.dtype)

    def keep_plain_weight(self) -> None:
        """Keep the int8 weight, its scales and the bias as plain tensors (not saved) beside fbgemm's packed copy,
        which ``torch.compile`` cannot trace through: :meth:`_decomposed` multiplies from them."""
        if hasattr(self, "int8_weight"):
            return
        weight, bias = self._packed_params._weight_bias()
        if weight.qscheme() != torch.per_channel_affine:
            raise ValueError(f"a compiled int8 product takes per-channel weights, got {weight.qscheme()}")
        self.register_buffer("int8_weight", weight.int_repr(), persistent=False)
        self.register_buffer("weight_scales", weight.q_per_channel_scales().float(), persistent=False)
        self.register_buffer("weight_zero_points", weight.q_per_channel_zero_points(), persistent=False)
        self.register_buffer("float_bias", bias, persistent=False)

    def _decomposed(self, x: torch.Tensor) -> torch.Tensor:
        """The same dynamic product as quantize/dequantize operators over plain tensors, the form PyTorch's
        export quantization (PT2E) produces: Inductor's freezing passes turn it into one oneDNN int8 product
        (``onednn.qlinear_pointwise``, VNNI or AMX) over a weight it packs once, and fuse the activation's
        quantization into the operators before it. Same activation parameters as fbgemm's (min/max over the
        batch, 8 or 7 bits), so it differs from eager only by the kernels' rounding."""
        qd = torch.ops.quantized_decomposed
        top = 127 if self.reduce_range else 255
        scale, zero = qd.choose_qparams.tensor(x, 0, top, torch.finfo(torch.float32).eps, torch.uint8)
        xq = qd.dequantize_per_tensor.tensor(qd.quantize_per_tensor.tensor(x, scale, zero, 0, top, torch.uint8),
                                             scale, zero, 0, top, torch.uint8)
        w = qd.dequantize_per_channel(self.int8_weight, self.weight_scales, self.weight_zero_points, 0, -128, 127,
                                      torch.int8)
        return F.linear(xq, w, self.float_bias).to(x.dtype)


class Bf16Linear(nn.Module):
    """A linear layer whose weights are bfloat16 inside an fp32 model: input cast down, output back up."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16),
                                                                  requires_grad=False)
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.to(torch.bfloat16)
        if packs(low, self.weight, self):  # F.linear took 185 us here for int8's ffn_out at 2 rows, ~4x oneDNN's
            return packed_linear(low, self.weight, self.bias, self).to(x.dtype)
        return F.linear(low, self.weight, self.bias).to(x.dtype)


class Fp16Linear(torch.ao.nn.quantized.dynamic.Linear):
    """fbgemm's product over float16 weights (activations and sums stay fp32: each weight rounded to 11 significant
    bits, nothing else): the dtype int8 keeps its wide layers in (:func:`stays_wide`) where bf16 is not native.
    They stream half fp32's bytes: an int8 decode step at batch 1 took 0.78-0.89x the time with them in fp16
    rather than fp32 on an AVX2-only EPYC (BENCHMARKS.md section 3, session 48). Under ``torch.compile`` the weight is
    cast up and multiplied as fp32 (fbgemm's packed copy is opaque to it)."""

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> Fp16Linear:
        return super().from_float(_plain_linear(mod), use_precomputed_fake_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            weight, bias = self.plain_weight_bias
            return F.linear(x, weight.float(), bias)
        return torch.ops.quantized.linear_dynamic_fp16(x, self._packed_params._packed_params).to(x.dtype)

    def keep_plain_weight(self) -> None:
        """Keep the float16 weight and the bias as plain tensors (not saved), which ``torch.compile`` can read."""
        if not hasattr(self, "plain_weight_bias"):
            weight, bias = self._packed_params._weight_bias()
            self.plain_weight_bias = (weight.to(torch.float16), bias)


def fp16_products() -> bool:
    """Whether fbgemm's float16 product runs here (x86 CPUs; not qnnpack's ARM ones)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def native_bf16(device: torch.device | None = None) -> bool:
    """Whether ``device`` (default: the CPU) multiplies bfloat16 in hardware: CUDA with bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32 (an AVX2-only EPYC: 2.9 s an fp32
    training step), so ``precision="auto"`` stays in fp32 there."""
    if device is not None and device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def packed_dtypes(bf16: bool, amx: bool) -> tuple[torch.dtype, ...]:
    """What :func:`packs` multiplies through oneDNN on a CPU with native ``bf16`` and ``amx`` tiles: bf16 where
    native; fp32 except with AMX, where MKL's plain fp32 product of 2 rows beat oneDNN's packed one 2.4-3.9x
    (the whole model sits in such a CPU's cache) and the packed fp32 decode step was 1.3x the plain one, while
    bf16 packed stayed 1.2x faster (BENCHMARKS.md section 3, session 42)."""
    return ((torch.bfloat16,) if bf16 else ()) + (() if amx else (torch.float32,))


PACKED_DTYPES: tuple[torch.dtype, ...] = packed_dtypes(native_bf16(), torch.cpu._is_amx_tile_supported())


def stays_wide(name: str) -> bool:
    """The linear layers int8 leaves out: each layer's second feed-forward matrix, whose input (the GELU
    output) has a few large values that make one activation scale per batch coarse for the rest. On
    qg-n02's model: greedy dev questions identical to fp32's 71/150 -> 87/150, full-dev BLEU-4 loss 0.64 ->
    0.27 (BENCHMARKS.md section 3). They run in bf16 where the CPU has it natively (in fp32 they took a
    third of an int8 decode step), else with float16 weights (:class:`Fp16Linear`), else in fp32."""
    return name.endswith("ffn_out")


def _quantize_linears(module: nn.Module, qconfig=INT8_QCONFIG, keep: Callable[[str], bool] = stays_wide,
                      reduce_range: bool | None = None, kept_dtype: torch.dtype | None = None) -> nn.Module:
    """``module`` with every ``nn.Linear`` (itself included) replaced by a dynamic int8 one, except those
    whose name ``keep`` picks (default :func:`stays_wide`), which become ``kept_dtype`` (default
    :func:`default_kept_dtype`); activations in 7 bits if ``reduce_range``, else 8 (default: 8 where the CPU has
    VNNI). benchmarks/int8_agreement.py compares such variants."""
    holder = nn.ModuleDict({"m": module})  # quantize_dynamic swaps children, never the root it is given
    linears = {n: x for n, x in module.named_modules() if isinstance(x, nn.Linear)}
    kept = [n for n in linears if keep(n)]

    def in_holder(name: str) -> str:
        return f"m.{name}" if name else "m"

    with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated in favour of torchao (see above)
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(holder, {in_holder(n): qconfig for n in linears if n not in kept},
                                               dtype=torch.qint8, inplace=True,
                                               mapping={nn.Linear: Int8Linear, Linear: Int8Linear})
    if reduce_range is not None:
        for m in holder.modules():
            if isinstance(m, Int8Linear):
                m.reduce_range = reduce_range
    kept_dtype = kept_dtype or default_kept_dtype()
    if kept and kept_dtype == torch.float16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(
                holder, {in_holder(n): torch.ao.quantization.float16_dynamic_qconfig for n in kept},
                dtype=torch.float16, inplace=True, mapping={nn.Linear: Fp16Linear, Linear: Fp16Linear})
    elif kept and kept_dtype == torch.bfloat16:
        for name in kept:
            parent, _, child = in_holder(name).rpartition(".")
            setattr(holder.get_submodule(parent), child, Bf16Linear(linears[name]))
    return holder["m"]


def default_kept_dtype() -> torch.dtype:
    """The dtype of the layers int8 leaves out (:func:`stays_wide`) on this CPU."""
    return torch.bfloat16 if native_bf16() else torch.float16 if fp16_products() else torch.float32


# ---- smoothing statistics ------------------------------------------------------------------------------

CALIBRATION_FILE = "int8_calibration.safetensors"
# migration strength α: SmoothQuant's default is 0.5 (Xiao et al. 2023, §4); here 0.8 kept more greedy dev
# questions identical to fp32's on every model and dev slice tried (qg-e6 104 -> 114 and 96 -> 111 of 150,
# qg-typical-s1 103 -> 107, qg-nat-s1 81 -> 91; 0.65 / 0.9 / 1.0 on qg-e6: 107 / 111 / 102; BENCHMARKS.md section 3)
SMOOTHING_ALPHA = 0.8
def _recorded_name(linear_name: str) -> str | None:
    """The module whose input ``linear_name`` reads (recorded by :func:`calibrate`), or None if that linear is
    not smoothed. For q/k/v it is their layer: a layer's input reaches its keys and values also where only
    those are computed (``keys_values_only``), which bypasses the attention module."""
    if linear_name.endswith((".attn.query", ".attn.key", ".attn.value", ".attn.packed")):
        return linear_name.rsplit(".", 2)[0]
    if linear_name.endswith(".ffn_in") or linear_name == "head.dense":
        return linear_name
    return None


def calibrate(model, sources: Iterable[str], batch_size: int = 32, progress: bool = False) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel j of every smoothed linear, over ``model``'s own (fp32, default-decoder,
    greedy) decoding of ``sources``: the activations int8 will meet. Keys are the names of the modules whose
    input is recorded (``layers.0`` for its query/key/value, ``layers.0.ffn_in``, ``head.dense``).
    Method heads (``extras``) are not recorded, and stay unsmoothed."""
    if model.precision != "fp32":
        raise ValueError(f"calibrate an fp32 model (this one runs in {model.precision})")
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args):
            a = args[0].detach().float().abs().flatten(0, -2).amax(0)
            maxima[name] = torch.maximum(maxima[name], a) if name in maxima else a
        return hook

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("extras.")]
    recorded = sorted({r for r in map(_recorded_name, linears) if r})
    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in recorded]
    try:
        was_training = model.training
        model.eval()
        model.generate(list(sources), batch_size=batch_size, num_beams=1, progress=progress)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return maxima


def weights_digest(folder: Path) -> str:
    """sha256 of a checkpoint's weights file: statistics from other weights are stale."""
    from .outputs import file_digest
    return file_digest(folder / "model.safetensors")


def save_beside_weights(folder: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor],
                        **meta: str) -> Path:
    """Write ``tensors`` as ``folder/name`` beside a checkpoint's weights, tied to them by digest (temporary name,
    then rename): statistics or heads computed from a trained model that must not rewrite its weights."""
    from safetensors.torch import save_file
    folder = Path(folder)
    final = folder / name
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"weights_sha256": weights_digest(folder)} | meta)
    os.replace(tmp, final)
    return final


def read_beside_weights(folder: str | os.PathLike, name: str, made: str, hint: str = ""
                        ) -> dict[str, torch.Tensor] | None:
    """The tensors of ``folder/name`` (:func:`save_beside_weights`), or None if there are none or they were
    ``made`` ("computed for", "fitted to") other weights, said in a warning."""
    from safetensors import safe_open
    folder = Path(folder)
    file = folder / name
    if not file.exists():
        return None
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("weights_sha256") != weights_digest(folder):
        warnings.warn(f"{file}: {made} other weights than {folder / 'model.safetensors'}; ignored{hint}",
                      stacklevel=3)
        return None
    return tensors


def save_calibration(folder: str | os.PathLike, maxima: dict[str, torch.Tensor], num_sources: int) -> Path:
    """Write ``maxima`` beside the checkpoint in ``folder``, tied to its weights."""
    return save_beside_weights(folder, CALIBRATION_FILE, maxima, num_sources=str(num_sources))


def read_calibration(folder: Path) -> dict[str, torch.Tensor] | None:
    """The statistics saved in ``folder``, or None if there are none or they belong to other weights."""
    return read_beside_weights(folder, CALIBRATION_FILE, "computed for", " (run `erniegen calibrate` again)")


def smooth_and_quantize(module: nn.Module, maxima: dict[str, torch.Tensor], alpha: float = SMOOTHING_ALPHA
                        ) -> dict[str, torch.Tensor]:
    """Scale the weight columns of every smoothed linear of ``module`` (in place) by s and return the 1/s that
    the int8 linear replacing it must multiply its input by, by linear name. Call before quantizing."""
    inverses = {}
    with torch.no_grad():
        for name, linear in module.named_modules():
            source = _recorded_name(name) if isinstance(linear, nn.Linear) else None
            if source is None or source not in maxima:
                continue
            a = maxima[source].to(linear.weight).clamp(min=1e-5)
            s = (a ** alpha / linear.weight.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            linear.weight.mul_(s)
            inverses[name] = 1 / s
    return inverses


def _pack_attention_products(model: nn.Module) -> None:
    """Give every attention a plain linear holding its fused query/key/value product, for int8 to quantize:
    three dynamic int8 products each quantize the same input again."""
    for attn in [m for m in model.modules() if hasattr(m, "fused_qkv") and m.packed is None]:
        weight, bias = attn.fused_qkv()
        packed = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
        with torch.no_grad():
            packed.weight.copy_(weight)
            packed.bias.copy_(bias)
        attn.packed = packed


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
    if precision == "bf16" and not native_bf16(next(model.parameters()).device):
        warnings.warn("bf16 on a CPU without AVX512-BF16 or AMX is emulated and decodes slower than fp32 (1.4-14x "
                      "a step on an AVX2-only EPYC, BENCHMARKS.md section 3); fp32 or int8 will be faster here",
                      stacklevel=2)
    inverses = {}
    if precision == "int8":
        word = model.embeddings.word.weight
        copy = nn.Linear(word.shape[1], word.shape[0], bias=False, device=word.device)
        with torch.no_grad():
            copy.weight.copy_(word)
        model.head.quantized = copy
        _pack_attention_products(model)
        if model.int8_calibration:
            inverses = smooth_and_quantize(model, model.int8_calibration)
        else:
            warnings.warn(f"{getattr(model, 'name_or_path', 'this model')}: no int8 calibration, so activations are "
                          f"quantized unsmoothed (without VNNI, greedy dev questions identical to fp32's on qg-e6: "
                          f"77 of 150 unsmoothed, 114 smoothed; BENCHMARKS.md section 3); `erniegen calibrate "
                          f"--model MODEL --input TRAIN.jsonl` adds one", stacklevel=2)
    convert_module(model, precision)  # converts in place: the model's own root is never replaced
    for name, inverse in inverses.items():
        model.get_submodule(name).input_scale = inverse
    model.precision = precision
    return model
