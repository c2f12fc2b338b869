"""Inference precision (fp32 | bf16 | int8): every decoder decodes what fp32 decodes, or departs from it
only at a near tie of the fp32 model; the command line and the API take the flag; checkpoints stay fp32.

How "departs only at a near tie" is checked, on tiny random models whose word embeddings are scaled up so
that their predictions are far from uniform (with the usual 0.02 init every top-2 gap is a near tie and
the check would prove nothing):

* greedy (infilling, typical): at the first position where the two outputs differ, the fp32 model is
  teacher-forced along the common prefix; under its (constrained) log-probabilities there, the token
  the other precision chose must be within ``TOL`` nats of fp32's best, i.e. fp32's top two (or more)
  were within ``TOL``;
* beam: the other precision's output, scored by the fp32 model as beam search scores a finished
  hypothesis, is at most ``TOL`` per scored token below fp32's own output (each step's error adds up
  along a continuation that the other precision preferred);
* the non-autoregressive decoders: every decision a decoder takes (length, slot argmax, Mask-Predict's
  re-masking, ELMER's pick and soft-exit argmax) is recorded in order; at the first decision where the
  two runs differ, fp32's margin between its choice and the other's must be below ``TOL``, and if no
  decision differs the outputs must be equal.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from conftest import tiny_config
from safetensors.torch import load_file

import erniegen
from erniegen import elmer, mist, nar, precision, registry
from erniegen.decoding import DecodeOptions, generate_ids
from erniegen.model import Transformer
from erniegen.precision import (PRECISIONS, Bf16Linear, Fp16Linear, Linear, apply_precision, default_kept_dtype,
                                native_bf16)
from erniegen.search import Constraints, gnmt_penalty

SOURCES = [[4, 10, 11, 12, 5], [4, 20, 21, 5], [4, 30, 31, 32, 33, 34, 5], [4, 40, 41, 42, 43, 5],
           [4, 50, 51, 5], [4, 60, 61, 62, 63, 64, 65, 66, 5]]
SEP, T = 5, 6
BANNED = [0, 1, 3, 4, 6]
# nats: a flip is accepted where fp32's two candidates are this close. About the largest log-prob error
# each precision makes on this model (measured: bf16 <= 0.13, int8 <= 0.39 over the vocabulary, <= 0.09 at
# the top token), for fp32's median top-2 gap of 0.56: int8 per-tensor weights of a 32-wide model are coarse.
TOL = {"bf16": 0.25, "int8": 0.5}
LOWER = [p for p in PRECISIONS if p != "fp32"]
FIXED = DecodeOptions(max_length=8, min_length=8, banned_ids=BANNED)  # no early end: every step compared


def build(tokenizer, kind: str, precision: str) -> Transformer:
    """The same seeded tiny model for every precision; ``kind``: ar, nar, elmer (hard) or elmer-soft."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_hidden_layers=3))
    model.tokenizer = tokenizer
    with torch.no_grad():
        model.embeddings.word.weight.mul_(30)  # logits of std ~3 instead of ~0.1: real decisions, real gaps
        if kind != "ar":
            model.embeddings.position.weight.mul_(30)  # so that all-[MASK] slots still differ by position
    if kind == "nar":
        model.settings.method = "nat"
        with torch.no_grad():
            nar.length_head(model, 8).proj.weight.mul_(30)
    elif kind.startswith("elmer"):
        model.settings.method = kind
        model.settings.extra = {"max_target_len": T}
        elmer.attach(model, layer_heads=kind == "elmer", soft=kind == "elmer-soft")
    return apply_precision(model.eval(), precision)


# ---- the models are converted ------------------------------------------------------------------


def test_weights_are_converted_and_logits_stay_close(tiny_tokenizer):
    ref = build(tiny_tokenizer, "elmer", "fp32")
    ids = torch.tensor([SOURCES[2]])
    pos, types = torch.arange(ids.shape[1])[None], torch.zeros_like(ids)
    mask = torch.ones(1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    with torch.no_grad():
        h, _ = ref(ids, pos, types, mask)
        want = [torch.log_softmax(ref.logits(h).float(), -1),
                torch.log_softmax(elmer.layer_logits(ref, 0, h).float(), -1)]  # an off-ramp: same projection
    for precision in LOWER:
        low = build(tiny_tokenizer, "elmer", precision)
        assert low.precision == precision
        if precision == "bf16":
            assert all(p.dtype == torch.bfloat16 for p in low.parameters())
            assert low.head.quantized is None
        else:
            quantized = torch.ao.nn.quantized.dynamic.Linear
            assert isinstance(low.layers[0].attn.query, quantized) and isinstance(low.head.quantized, quantized)
            assert isinstance(low.layers[0].ffn_in, quantized)
            # kept out of int8 (precision.stays_wide)
            wide = {torch.bfloat16: Bf16Linear, torch.float16: Fp16Linear, torch.float32: Linear}[default_kept_dtype()]
            assert all(type(layer.ffn_out) is wide for layer in low.layers)
            assert isinstance(low.extras[elmer.HEADS][0].dense, quantized)
            assert low.embeddings.word.weight.dtype == torch.float32  # the input embedding stays fp32
            assert torch.equal(low.embeddings.word.weight, ref.embeddings.word.weight)
        with torch.no_grad():
            h, _ = low(ids, pos, types, mask)
            got = [torch.log_softmax(low.logits(h).float(), -1),
                   torch.log_softmax(elmer.layer_logits(low, 0, h).float(), -1)]
        for g, w in zip(got, want):
            err = (g - w).abs().max().item()
            assert 0 < err < 0.5, (precision, err)  # changed, but only by rounding


@pytest.mark.parametrize("native, fbgemm, kept", [(True, True, torch.bfloat16), (False, True, torch.float16),
                                                   (False, False, torch.float32)])
def test_int8_keeps_its_wide_layers_in_the_narrowest_dtype_this_cpu_multiplies(monkeypatch, native, fbgemm, kept):
    monkeypatch.setattr(erniegen.precision, "native_bf16", lambda device=None: native)
    monkeypatch.setattr(erniegen.precision, "fp16_products", lambda: fbgemm)
    assert default_kept_dtype() == kept
    wide = {torch.bfloat16: Bf16Linear, torch.float16: Fp16Linear, torch.float32: Linear}[kept]
    layers = OrderedDict(ffn_in=Linear(8, 16), ffn_out=Linear(16, 8))
    model = erniegen.precision._quantize_linears(nn.Sequential(layers))
    assert type(model.ffn_out) is wide and type(model.ffn_in) is erniegen.precision.Int8Linear


@pytest.mark.skipif(not erniegen.precision.fp16_products(), reason="fbgemm's float16 product is x86 only")
def test_fp16_linear_multiplies_float16_weights_in_fp32_eager_and_traced():
    """Only the weights are rounded (to float16); the input and the sums stay fp32. Traced by torch.compile (its
    eager backend: the graph, not Inductor's kernels), it multiplies the same weights as fp32."""
    torch.manual_seed(0)
    lin = Linear(64, 48).eval()
    x = torch.randn(3, 64)
    want = F.linear(x, lin.weight.detach().half().float(), lin.bias.detach())
    lin.qconfig = torch.ao.quantization.float16_dynamic_qconfig
    fp16 = Fp16Linear.from_float(lin)
    fp16.keep_plain_weight()
    exact = F.linear(x, lin.weight.detach(), lin.bias.detach())
    with torch.no_grad():
        eager, traced = fp16(x), torch.compile(fp16, backend="eager")(x)
    torch.testing.assert_close(eager, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(traced, want, rtol=0, atol=1e-5)
    assert 0 < (eager - exact).abs().max() < 1e-2  # rounded, by float16's 11 bits


def test_a_model_is_converted_once(tiny_model):
    apply_precision(tiny_model, "int8")
    with pytest.raises(ValueError, match="already in int8"):
        apply_precision(tiny_model, "bf16")
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose from fp32, bf16, int8"):
        apply_precision(tiny_model, "fp16")


@pytest.mark.parametrize("native, warns", [(False, True), (True, False)])
def test_bf16_without_native_support_warns_it_will_be_slow(tiny_model, monkeypatch, native, warns):
    monkeypatch.setattr(erniegen.precision, "native_bf16", lambda device=None: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_precision(tiny_model, "bf16")
    slow = [w for w in caught if "emulated and decodes slower than fp32" in str(w.message)]
    assert len(slow) == int(warns)
    assert tiny_model.precision == "bf16"  # a warning, not a refusal


def _int8_by_hand(q, x: torch.Tensor, levels: int) -> torch.Tensor:
    """What a dynamic int8 linear computes: x quantized per batch to ``levels`` steps over [min(x, 0),
    max(x, 0)], times the int8 weights with one scale per output row, plus the fp32 bias."""
    w = q.weight()
    w = w.int_repr().float() * w.q_per_channel_scales().float()[:, None]
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / levels
    zero = min(max(round(-lo / scale), 0), levels)
    xq = (torch.round(x / scale) + zero).clamp(0, levels)
    return ((xq - zero) * scale) @ w.T + q.bias()


@pytest.mark.parametrize("reduce_range, levels", [(True, 127), (False, 255)])
def test_int8_linear_quantizes_activations_to_7_or_8_bits_in_both_its_forms(reduce_range, levels):
    """fbgemm's packed product (eager) and the quantize/dequantize form that torch.compile takes
    (``Int8Linear._decomposed``, here run eagerly) both match the product by hand."""
    from erniegen.precision import Int8Linear, _quantize_linears, full_range_activations
    assert Int8Linear.reduce_range is not full_range_activations()  # 8 bits only where VNNI cannot overflow
    if not reduce_range and not full_range_activations():
        pytest.skip("8-bit activations saturate fbgemm's 16-bit pair sums on a CPU without VNNI (AVX2 only): "
                    "erniegen keeps 7 bits there, which the 7-bit case checks")
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    x = torch.randn(3, 64) * 2 + 0.5
    q = _quantize_linears(copy.deepcopy(lin), reduce_range=reduce_range)
    assert isinstance(q, Int8Linear) and q.reduce_range is reduce_range
    q.keep_plain_weight()
    with torch.no_grad():
        got, want, exact = q(x), _int8_by_hand(q, x, levels), lin(x)
        decomposed = q._decomposed(x)
    step = (x.max() - min(x.min(), 0)).item() / levels
    # equal up to an activation rounded the other way at a tie-break (one step times one weight)
    for form in (got, decomposed):
        assert (form - want).abs().max().item() <= step * lin.weight.abs().max().item() * 1.01
    err = (got - exact).abs().mean().item()
    assert err <= 1.2 * (want - exact).abs().mean().item()


def test_int8_activations_in_8_bits_are_closer_to_fp32():
    from erniegen.precision import _quantize_linears
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    x = torch.randn(8, 256).abs() ** 2  # GELU-like: non-negative with a few large values
    with torch.no_grad():
        exact = lin(x)
        err = {r: (_quantize_linears(copy.deepcopy(lin), reduce_range=r)(x) - exact).abs().mean().item()
               for r in (True, False)}
    assert err[False] < 0.7 * err[True]  # half the activation step: about half the error


# ---- fp32 on CPU: oneDNN-packed weights -------------------------------------------------------

needs_onednn = pytest.mark.skipif(not precision.ONEDNN_LINEAR, reason="this PyTorch has no oneDNN linear")


@pytest.fixture
def packing_fp32(monkeypatch):
    """fp32 packs on every CPU while a test runs (by default it does not where AMX makes the plain product the
    faster one), so that the packed path is tested everywhere."""
    monkeypatch.setattr(precision, "PACKED_DTYPES", (torch.float32, *precision.packed_dtypes(native_bf16(), True)))


def test_fp32_packs_except_with_amx_and_bf16_where_native():
    assert precision.packed_dtypes(bf16=False, amx=False) == (torch.float32,)
    assert set(precision.packed_dtypes(bf16=True, amx=False)) == {torch.float32, torch.bfloat16}
    assert precision.packed_dtypes(bf16=True, amx=True) == (torch.bfloat16,)
    assert precision.PACKED_DTYPES == precision.packed_dtypes(native_bf16(), torch.cpu._is_amx_tile_supported())


@needs_onednn
def test_packed_linear_equals_the_plain_product_and_follows_weight_updates(packing_fp32):
    torch.manual_seed(0)
    lin = Linear(24, 40).eval()
    for shape in [(1, 24), (2, 24), (3, 7, 24)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            got = lin(x)
        assert "weight" in precision._PACKED[lin]  # the packed path was taken
        torch.testing.assert_close(got, torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(-2)  # an in-place update (an optimizer step, load_state_dict): the packed copy is rebuilt
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    # training never packs: with gradients, or without them in train mode (GLAT's and MIST's first passes)
    fresh = Linear(24, 40)
    fresh(x).sum().backward()
    with torch.no_grad():
        fresh(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fresh.eval()(x).dtype == torch.bfloat16  # autocast keeps its own product
    assert fresh.weight.grad is not None and fresh not in precision._PACKED


PACKED_CASES = [("ar", "infilling", {"num_beams": 1}), ("ar", "infilling", {"num_beams": 3}),
                ("ar", "typical", {"num_beams": 1}), ("ar", "typical", {"num_beams": 3}),
                ("nar", "nar", {}), ("nar", "mask-predict", {"iterations": 3}),
                ("elmer", "elmer-hard", {"exit_threshold": 0.5}), ("elmer-soft", "elmer-soft", {})]


@needs_onednn
@pytest.mark.parametrize("kind,decoder,options", PACKED_CASES, ids=[f"{d}{o}" for _, d, o in PACKED_CASES])
def test_packed_fp32_decodes_what_the_plain_products_decode(tiny_tokenizer, monkeypatch, packing_fp32, kind, decoder,
                                                            options):
    """The packed products differ from MKL's only in summation order: the same text, logits within 1e-4; the
    checkpoint is untouched and the model still copies (the packed weights live outside it)."""
    opts = DecodeOptions(max_length=8, min_length=3 if kind == "ar" else 1, banned_ids=BANNED, **options)
    model = build(tiny_tokenizer, kind, "fp32")
    packed = generate_ids(model, SOURCES, decoder, opts=opts)
    assert {model.layers[0].ffn_in, model.layers[0].attn, model.head} <= set(precision._PACKED)
    packed_logprobs = _logprobs(model)
    monkeypatch.setattr(precision, "ONEDNN_LINEAR", False)
    plain = build(tiny_tokenizer, kind, "fp32")
    assert generate_ids(plain, SOURCES, decoder, opts=opts) == packed
    assert not set(plain.modules()) & set(precision._PACKED)
    torch.testing.assert_close(packed_logprobs, _logprobs(plain), atol=1e-4, rtol=1e-4)
    assert model.state_dict().keys() == plain.state_dict().keys()
    copy.deepcopy(model)


@needs_onednn
@pytest.mark.parametrize("low", LOWER)
def test_bf16_products_pack_where_native_and_quantized_ones_never(tiny_tokenizer, low):
    """Where the CPU multiplies bf16 natively, bf16 weights pack (a bf16 model's, and the bf16 ``ffn_out`` that
    int8 keeps out of int8); elsewhere int8 keeps ``ffn_out`` in fbgemm's float16 product, which never packs, as
    its quantized products never do. Packed, they decode what they decode plain."""
    model = build(tiny_tokenizer, "ar", low)
    got = generate_ids(model, SOURCES, "infilling", opts=FIXED)
    packed = set(model.modules()) & set(precision._PACKED)
    kept = default_kept_dtype()  # the dtype of int8's ffn_out
    assert bool(packed) == ((torch.bfloat16 if low == "bf16" else kept) in precision.PACKED_DTYPES)
    if low == "int8":
        assert all(isinstance(m, (Bf16Linear, Linear)) and m.weight.dtype == kept for m in packed)
    if packed:
        precision.ONEDNN_LINEAR = False
        try:
            assert generate_ids(build(tiny_tokenizer, "ar", low), SOURCES, "infilling", opts=FIXED) == got
        finally:
            precision.ONEDNN_LINEAR = True


# ---- autoregressive decoders -------------------------------------------------------------------


def _fp32_logprobs(model: Transformer, decoder: str, src: list[int], prefix: list[int],
                   opts: DecodeOptions) -> list[torch.Tensor]:
    """fp32's constrained log-probabilities at each step of ``prefix`` (teacher-forced) and the one after."""
    stepper = registry.decoder(decoder).stepper_cls(model, torch.tensor([src]), torch.tensor([len(src)]),
                                                    opts.max_length)
    out, prev, constrain = [], None, Constraints(opts, SEP, torch.device("cpu"))
    with torch.no_grad():
        for step in range(len(prefix) + 1):
            tokens = torch.tensor([prefix[:step]], dtype=torch.long)
            out.append(constrain(stepper.step(prev), tokens, step)[0])
            prev = torch.tensor(prefix[step:step + 1])
    return out


@pytest.mark.parametrize("precision", LOWER)
@pytest.mark.parametrize("decoder", ["infilling", "typical"])
def test_greedy_equals_fp32_or_flips_at_a_near_tie(tiny_tokenizer, decoder, precision):
    ref, low = build(tiny_tokenizer, "ar", "fp32"), build(tiny_tokenizer, "ar", precision)
    want = generate_ids(ref, SOURCES, decoder, opts=FIXED)
    got = generate_ids(low, SOURCES, decoder, opts=FIXED)
    assert all(len(x) == FIXED.max_length - 1 for x in want + got)
    for src, a, b in zip(SOURCES, want, got):
        p = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if p is None:
            continue
        logp = _fp32_logprobs(ref, decoder, src, a[:p], FIXED)[p]
        assert int(logp.argmax()) == a[p]  # the reference really is what fp32 greedy picks there
        gap = float(logp[a[p]] - logp[b[p]])
        assert gap < TOL[precision], f"{precision} {decoder}: step {p} chose {b[p]}, {gap:.3f} nats below fp32's {a[p]}"
    assert sum(a == b for a, b in zip(want, got)) >= len(SOURCES) // 2  # mostly the same text


def _fp32_beam_score(model: Transformer, decoder: str, src: list[int], seq: list[int], opts: DecodeOptions) -> float:
    """What beam search scores ``seq`` + end token with under the fp32 model (GNMT-normalised)."""
    logps = _fp32_logprobs(model, decoder, src, seq, opts)
    total = sum(float(lp[t]) for lp, t in zip(logps, seq + [SEP]))
    return total / gnmt_penalty(len(seq) + 1, opts.length_penalty)


@pytest.mark.parametrize("precision", LOWER)
@pytest.mark.parametrize("decoder", ["infilling", "typical"])
def test_beam_equals_fp32_or_scores_within_tolerance(tiny_tokenizer, decoder, precision):
    opts = DecodeOptions(num_beams=3, max_length=8, min_length=3, banned_ids=BANNED)
    ref, low = build(tiny_tokenizer, "ar", "fp32"), build(tiny_tokenizer, "ar", precision)
    want = generate_ids(ref, SOURCES, decoder, opts=opts)
    got = generate_ids(low, SOURCES, decoder, opts=opts)
    for src, a, b in zip(SOURCES, want, got):
        if a != b:
            loss = _fp32_beam_score(ref, decoder, src, a, opts) - _fp32_beam_score(ref, decoder, src, b, opts)
            per_token = max((len(x) + 1) / gnmt_penalty(len(x) + 1, opts.length_penalty) for x in (a, b))
            assert loss < TOL[precision] * per_token, f"{precision} {decoder} beam: {b} scores {loss:.3f} below fp32's {a}"
    assert sum(a == b for a, b in zip(want, got)) >= len(SOURCES) // 2


# ---- non-autoregressive decoders: their decisions, recorded ------------------------------------


class Decisions:
    """Every choice the NAR decoders take, in order: (kind, choice, margin) where ``margin(other)`` is,
    per item, how much worse ``other`` is than ``choice`` by the recording model's own scores."""

    def __init__(self, monkeypatch):
        self.log: list = []
        self._last_logits = None
        predict_slots, candidate_lengths = nar.predict_slots, nar.candidate_lengths
        lowest_confidence, pick, layer_logits, fuse = (mist.lowest_confidence, elmer.pick, elmer.layer_logits,
                                                       elmer.fuse)

        def slots(model, hidden, slot_len, where, eos, banned):
            tokens, scores = predict_slots(model, hidden, slot_len, where, eos, banned)
            w = where.shape[1]
            last = (torch.arange(w)[None, :] == (slot_len - 1)[:, None])[where]
            logp = torch.log_softmax(model.logits(hidden[where]).float(), -1)
            logp[:, list(banned) + [eos]] = float("-inf")
            self._argmax("slots", logp[~last], tokens[where][~last])
            return tokens, scores

        def lengths(logits, k, lo, hi):
            out = candidate_lengths(logits, k, lo, hi)
            n = torch.arange(logits.shape[1])[None, :]
            allowed = torch.log_softmax(logits.float(), -1).masked_fill((n < lo) | (n > hi[:, None]), float("-inf"))
            self._argmax("length", allowed, out[:, 0])
            return out

        def remask(scores, allowed, count):
            out = lowest_confidence(scores, allowed, count)
            s = scores.float().masked_fill(~allowed, float("inf")).sort(1).values
            c = count[:, None].clamp(1, s.shape[1] - 1)
            boundary = (s.gather(1, c) - s.gather(1, c - 1))[:, 0]  # the (count+1)-th lowest minus the count-th
            self.log.append(("remask", out.clone(), lambda other: boundary))
            return out

        def chosen(logp, slot, eos, opts):
            out = pick(logp, slot, eos, opts)
            allowed = logp.clone()
            allowed[:, list(opts.banned_ids)] = float("-inf")
            allowed[:, eos] = torch.where(slot + 1 < opts.min_length, float("-inf"), allowed[:, eos])
            self._argmax("pick", allowed, out)
            return out

        def ramp(model, layer, hidden):
            self._last_logits = layer_logits(model, layer, hidden)
            return self._last_logits

        def fused(model, hidden, ids):
            scores = torch.log_softmax(self._last_logits.float(), -1).flatten(0, 1)
            self._argmax("soft-exit", scores, ids.flatten())
            return fuse(model, hidden, ids)

        for module in (nar, mist):
            monkeypatch.setattr(module, "predict_slots", slots)
        monkeypatch.setattr(nar, "candidate_lengths", lengths)
        monkeypatch.setattr(mist, "lowest_confidence", remask)
        for name, f in [("pick", chosen), ("layer_logits", ramp), ("fuse", fused)]:
            monkeypatch.setattr(elmer, name, f)

    def _argmax(self, kind: str, scores: torch.Tensor, choice: torch.Tensor) -> None:
        choice = choice.clone()
        self.log.append((kind, choice, lambda other: (scores.gather(1, choice[:, None])
                                                      - scores.gather(1, other[:, None]))[:, 0]))

    def run(self, model, decoder: str, opts: DecodeOptions) -> tuple[list[list[int]], list]:
        self.log = []
        return generate_ids(model, SOURCES, decoder, opts=opts), self.log


def assert_departs_at_a_near_tie(ref: list, low: list, want, got, what: str, tol: float) -> None:
    """At the first decision where the two runs differ, fp32's margin is below TOL; none differ -> same output."""
    for (kind, a, margin), (kind_low, b, _) in zip(ref, low):
        assert (kind, a.shape) == (kind_low, b.shape), f"{what}: the runs took different decisions ({kind}, {kind_low})"
        differ = (a != b) if a.dim() == 1 else (a != b).any(1)
        if bool(differ.any()):
            worst = float(margin(b)[differ].max())
            assert worst < tol, f"{what}: a {kind} decision flipped where fp32's margin was {worst:.3f} nats"
            return
    assert len(ref) == len(low) and want == got, what


NAR_CASES = [("nar", "nar", {}), ("nar", "mist-iter", {"iterations": 3}), ("nar", "mask-predict", {"iterations": 3}),
             ("elmer", "elmer-hard", {"exit_threshold": 0.0}), ("elmer", "elmer-hard", {"exit_threshold": 1e9}),
             ("elmer-soft", "elmer-soft", {})]


@pytest.mark.parametrize("precision", LOWER)
@pytest.mark.parametrize("kind,decoder,options", NAR_CASES, ids=[f"{d}{o}" for _, d, o in NAR_CASES])
def test_nar_decoders_equal_fp32_or_depart_at_a_near_tie(tiny_tokenizer, monkeypatch, kind, decoder, options,
                                                         precision):
    """ELMER hard exit runs at thresholds 0 (every slot exits at the last layer) and 1e9 (every slot at
    layer 1, through an off-ramp): which slots exit at a threshold in between is not recorded as a decision."""
    opts = DecodeOptions(max_length=8, banned_ids=BANNED, **options)
    decisions = Decisions(monkeypatch)
    want, ref = decisions.run(build(tiny_tokenizer, kind, "fp32"), decoder, opts)
    got, low = decisions.run(build(tiny_tokenizer, kind, precision), decoder, opts)
    assert ref and sum(map(len, want)) >= 2 * len(SOURCES) and len({t for x in want for t in x}) >= 3
    assert_departs_at_a_near_tie(ref, low, want, got, f"{precision} {decoder}", TOL[precision])
    assert sum(a == b for a, b in zip(want, got)) >= len(SOURCES) // 2


def test_the_decision_check_catches_a_real_flip(tiny_tokenizer, monkeypatch):
    """The check is not vacuous: other weights (a different seed) flip decisions of large margin."""
    decisions = Decisions(monkeypatch)
    opts = DecodeOptions(max_length=8, banned_ids=BANNED)
    want, ref = decisions.run(build(tiny_tokenizer, "nar", "fp32"), "nar", opts)
    other = build(tiny_tokenizer, "nar", "fp32")
    with torch.no_grad():
        other.head.bias.add_(torch.randn_like(other.head.bias) * 5)
    got, low = decisions.run(other, "nar", opts)
    with pytest.raises(AssertionError, match="flipped"):
        assert_departs_at_a_near_tie(ref, low, want, got, "perturbed", TOL["int8"])


# ---- command line, API, checkpoints ------------------------------------------------------------


ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def saved_nar(tiny_tokenizer, tmp_path):
    """A tiny NAT model (with its length head) saved as a checkpoint, and an input file."""
    build(tiny_tokenizer, "nar", "fp32").save_pretrained(tmp_path / "model")
    rows = [{"source": s} for s in ("the city river", "who was the king", "the war of the year", "a new name")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_int8_loads_from_the_fp32_checkpoint_and_never_writes_one(saved_nar):
    folder = saved_nar / "model"
    before = _digest(folder)
    model = erniegen.load(str(folder), precision="int8")
    texts = model.generate(["the city river", "a new name"], max_length=6)
    # the length head, attached by the decoder after loading, was restored and then quantized
    assert isinstance(model.extras["length"].proj, torch.ao.nn.quantized.dynamic.Linear)
    assert _digest(folder) == before  # loading and decoding touched nothing
    assert {v.dtype for v in load_file(str(folder / "model.safetensors")).values()} == {torch.float32}
    with pytest.raises(ValueError, match="saved in fp32"):
        model.save_pretrained(saved_nar / "int8-copy")
    assert not (saved_nar / "int8-copy").exists()
    again = erniegen.load(str(folder), precision="int8")  # re-quantized on load: the same model again
    assert again.generate(["the city river", "a new name"], max_length=6) == texts
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        erniegen.load(str(folder), precision="int4")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erniegen.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def test_generate_and_bench_with_int8_from_the_command_line(saved_nar):
    out = saved_nar / "pred.jsonl"
    p = _cli("generate", "--model", str(saved_nar / "model"), "--input", str(saved_nar / "in.jsonl"), "--output",
             str(out), "--precision", "int8", "--max-length", "6")
    assert p.returncode == 0, p.stderr
    preds = [json.loads(x)["prediction"] for x in out.read_text().splitlines()]
    sources = [json.loads(x)["source"] for x in (saved_nar / "in.jsonl").read_text().splitlines()]
    assert preds == erniegen.load(str(saved_nar / "model"), precision="int8").generate(sources, max_length=6)
    p = _cli("bench", "--model", str(saved_nar / "model"), "--input", str(saved_nar / "in.jsonl"), "--precision",
             "bf16", "--num-samples", "2", "--batch-size", "1", "--max-length", "6")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["precision"] == "bf16" and result["num_samples"] == 2


def test_a_bad_precision_is_named(saved_nar):
    p = _cli("generate", "--model", str(saved_nar / "model"), "--input", str(saved_nar / "in.jsonl"), "--output",
             str(saved_nar / "x.jsonl"), "--precision", "fp16")
    assert p.returncode == 2
    assert "--precision: invalid choice: 'fp16' (choose from" in p.stderr, p.stderr
    assert all(name in p.stderr.splitlines()[-1] for name in ("fp32", "bf16", "int8"))
    assert not (saved_nar / "x.jsonl").exists()


# ---- int8 smoothing ------------------------------------------------------------------------------------

TEXTS = ["the city river", "who was the king", "the war of the year", "a new name"]


def _with_outliers(tokenizer) -> Transformer:
    """The tiny fp32 model with one hidden channel 20x the others at every LayerNorm output, as trained BERTs
    have (qg-e6: 16-18x the median channel): the case smoothing is for."""
    model = build(tokenizer, "ar", "fp32")
    with torch.no_grad():
        for name, norm in model.named_modules():
            if isinstance(norm, nn.LayerNorm) and name != "head.norm":
                norm.weight[3] *= 20
    return model


def _logprobs(model: Transformer) -> torch.Tensor:
    ids = torch.tensor([SOURCES[2]])
    pos, types = torch.arange(ids.shape[1])[None], torch.zeros_like(ids)
    with torch.no_grad():
        h, _ = model(ids, pos, types, torch.ones(1, ids.shape[1], ids.shape[1], dtype=torch.bool))
        return torch.log_softmax(model.logits(h).float(), -1)


def test_calibration_records_the_input_maximum_of_every_smoothed_linear(tiny_tokenizer):
    model = _with_outliers(tiny_tokenizer)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            x = out[0] if isinstance(out, tuple) else out
            if x is not None:  # a last layer asked for its keys/values only has no output
                a = x.abs().flatten(0, -2).amax(0)
                seen[name] = torch.maximum(seen[name], a) if name in seen else a
        return hook

    # independent witnesses: what each layer's input is the output of
    handles = [model.embeddings.register_forward_hook(keep("layers.0"))]
    handles += [model.layers[i].register_forward_hook(keep(f"layers.{i + 1}")) for i in range(2)]
    handles += [model.layers[i].attn_norm.register_forward_hook(keep(f"layers.{i}.ffn_in")) for i in range(3)]
    maxima = erniegen.precision.calibrate(model, TEXTS, batch_size=2)
    for h in handles:
        h.remove()
    assert set(maxima) == {f"layers.{i}" for i in range(3)} | {f"layers.{i}.ffn_in" for i in range(3)} | {"head.dense"}
    for name, want in seen.items():
        assert torch.equal(maxima[name], want), name
    assert maxima["layers.1.ffn_in"][3] > 5 * maxima["layers.1.ffn_in"].median()  # the outlier was seen
    # the head reads the last layer's outputs at the predicted positions only: a subset of its output
    assert maxima["head.dense"].shape == (32,) and bool((maxima["head.dense"] > 0).all())


def test_smoothing_brings_int8_closer_to_fp32_where_a_channel_stands_out(tiny_tokenizer):
    ref = _with_outliers(tiny_tokenizer)
    maxima = erniegen.precision.calibrate(ref, TEXTS, batch_size=2)
    plain, smoothed = copy.deepcopy(ref), copy.deepcopy(ref)
    with pytest.warns(UserWarning, match="no int8 calibration"):
        apply_precision(plain, "int8")
    smoothed.int8_calibration = maxima
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: no warning
        apply_precision(smoothed, "int8")
    assert smoothed.layers[0].attn.query.input_scale is not None and smoothed.head.dense.input_scale is not None
    assert plain.layers[0].ffn_in.input_scale is None
    want = _logprobs(ref)
    # mean |error| of the log-probabilities; measured here (no VNNI, 7-bit activations) 0.085 -> 0.033
    err_plain = (_logprobs(plain) - want).abs().mean().item()
    err_smoothed = (_logprobs(smoothed) - want).abs().mean().item()
    assert err_smoothed < 0.6 * err_plain, (err_smoothed, err_plain)
    # smoothing itself is exact: the scaled weights times the scaled input give fp32's product
    fp32 = copy.deepcopy(ref)
    inverses = erniegen.precision.smooth_and_quantize(fp32, maxima)
    x = torch.randn(5, 32)
    for name, inverse in inverses.items():
        got = fp32.get_submodule(name)(x * inverse)
        assert torch.allclose(got, ref.get_submodule(name)(x), atol=1e-5, rtol=1e-5), name


def test_calibration_travels_with_its_weights_only(tiny_tokenizer, tmp_path):
    folder = tmp_path / "m"
    ref = _with_outliers(tiny_tokenizer)
    ref.save_pretrained(folder)
    p = _cli("calibrate", "--model", str(folder), "--input", str(_texts_file(tmp_path)), "--num-samples", "3")
    assert p.returncode == 0, p.stderr
    assert "activation maxima over 3 training sources" in p.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = erniegen.load(str(folder), precision="int8")
    assert model.layers[2].ffn_in.input_scale is not None
    assert model.generate(TEXTS, max_length=6) == model.generate(TEXTS, max_length=6, batch_size=1)
    # weights saved again (here: changed) drop the statistics with the old folder ...
    with torch.no_grad():
        ref.layers[0].ffn_in.weight.add_(0.1)
    ref.save_pretrained(folder)
    assert not (folder / erniegen.precision.CALIBRATION_FILE).exists()
    # ... and statistics copied beside other weights are refused, not used
    other = tmp_path / "other"
    build(tiny_tokenizer, "ar", "fp32").save_pretrained(other)
    erniegen.precision.save_calibration(folder, erniegen.precision.calibrate(ref, TEXTS), 4)
    name = erniegen.precision.CALIBRATION_FILE
    (other / name).write_bytes((folder / name).read_bytes())
    with pytest.warns(UserWarning, match="computed for other weights"):
        assert erniegen.precision.read_calibration(other) is None


def _texts_file(tmp_path):
    file = tmp_path / "texts.jsonl"
    file.write_text("".join(json.dumps({"source": t}) + "\n" for t in TEXTS))
    return file
