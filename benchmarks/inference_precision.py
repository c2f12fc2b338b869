"""Inference precision (issue 13): fp32 / bf16 / int8 side by side in one run, on one machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference_precision.py --ar-model runs/qg-ernie-gen/best \
        [--nar-model runs/qg-mist/best] [--elmer-model RUN/best] [--elmer-soft-model RUN/best] \
        --input ../shared/data/squad_qg/dev.jsonl --output results/inference_precision.json

What it measures, every figure a median after warm-up:

1. the infilling decode step at batch 1 (one ``InfillingStepper.step`` on a cache holding the source)
   and the prefill (the source's pass that fills the cache), per precision;
2. the fp32 floor of that step: the bytes of the weights one step streams (every layer, the LM head's
   transform and the vocabulary projection; not the input embedding, of which a step reads two rows)
   divided by the bandwidth of a vector x matrix product over a matrix of the same size, measured in this
   run (so the matrix sits in the same level of cache as the model's weights would): the fastest of PyTorch's
   two layouts and oneDNN's packed product;
3. Hugging Face's step: a GPT-2 of the same shape (``erniegen.bench.hf_gpt2_like``) timed with
   ``generate()`` for ``--length`` tokens and for 1 token, the difference divided by ``--length`` - 1;
4. end to end, ms/sample at batch 1 and samples/s at ``--large-batch`` (32), for every decoder of the
   models given, in every precision, and the Hugging Face ``generate()`` baseline;
5. with ``--compile``: every precision also with ``runtime="compile"`` (erniegen.runtimes: the step compiled by
   ``torch.compile``), in the step rows (with the seconds its first two steps spend compiling, and the compiled
   step over the eager one of the same precision, timed alternately ``--ab-rounds`` times) and the infilling
   rows of 4;
6. with ``--onnx``: "fp32 onnx", the fp32 model loaded with ``runtime="onnx"`` (erniegen.onnx_runtime), in
   the step rows and the infilling rows of 4 (its export on load is timed too), beside a second floor: the
   same bytes over ONNX Runtime's bandwidth, a vector x matrix ``Gemm`` over a matrix of that size (needs
   ``pip install "erniegen[onnx]"``);
7. with ``--unpacked``: the step and prefill of each precision also with PyTorch's plain products (the oneDNN
   packed weights of ``erniegen.precision.packed_linear`` off), alternating with the packed ones;
8. with ``--ab-rounds N``: int8 infilling greedy at batch 1 against Hugging Face ``generate()`` on the same
   sources, alternated N times (which goes first alternates too), each round's ratio and their median: this
   VM's speed drifts by up to a quarter within minutes, which two blocks timed minutes apart would take for a
   difference between the decoders. The rounds of 5 too.

Prints the CPU model (``lscpu``) and the date, and writes every row to ``--output`` as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load, precision as precision_module  # noqa: E402
from erniegen.bench import bench_decoder, bench_hf_baseline, cpu_model, hf_gpt2_like, write_results  # noqa: E402
from erniegen.data import read_examples  # noqa: E402
from erniegen.decoding import DecodeOptions, default_banned_ids, encode_sources  # noqa: E402
from erniegen.ernie_gen import InfillingStepper  # noqa: E402
from erniegen.onnx_runtime import import_onnxruntime  # noqa: E402
from erniegen.precision import PRECISIONS  # noqa: E402
from erniegen.search import EXIT_THRESHOLD  # noqa: E402


def median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@contextmanager
def plain_products() -> Iterator[None]:
    """Models loaded and run inside multiply with PyTorch's plain products, not oneDNN's packed ones."""
    precision_module.ONEDNN_LINEAR = False
    try:
        yield
    finally:
        precision_module.ONEDNN_LINEAR = True


def streamed_weight_bytes(model) -> int:
    """Bytes of fp32 weights one decode step reads: layers, LM-head transform and vocabulary projection."""
    layers = sum(p.numel() for p in model.layers.parameters())
    head = sum(p.numel() for n, p in model.head.named_parameters() if not n.startswith("word."))
    return 4 * (layers + head + model.embeddings.word.weight.numel())


@torch.inference_mode()
def bandwidth_gb_s(n_bytes: int, repeats: int) -> float:
    """GB/s of a vector x matrix product over an fp32 matrix of ``n_bytes``: what a batch-1 step can reach.
    The fastest of the two layouts (matrix times vector, vector times matrix: they differ up to 2x here) and of
    oneDNN's product on the packed matrix (what erniegen's fp32 step multiplies with)."""
    cols = 1024
    w = torch.randn(max(1, n_bytes // (4 * cols)), cols)
    x, y = torch.randn(cols), torch.randn(w.shape[0])
    ms = min(median_ms(lambda: w @ x, repeats, warmup=3), median_ms(lambda: y @ w, repeats, warmup=3))
    if precision_module.ONEDNN_LINEAR:
        holder = torch.nn.Module().eval()
        ms = min(ms, median_ms(lambda: precision_module.packed_linear(x[None], w, None, holder), repeats, warmup=3))
    return w.numel() * 4 / (ms / 1000) / 1e9


def variant_name(precision: str, runtime: str) -> str:
    """A row's precision as the tables name it: "int8", ..., "fp32 onnx"."""
    return precision if runtime == "torch" else f"{precision} {runtime}"


def onnx_runtime_gemm(wt: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> x @ wt + b`` as an ONNX Runtime session over one ``Gemm`` node, or None without onnxruntime."""
    try:
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    n_in, n_out = wt.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"])], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n_out])],
        [numpy_helper.from_array(wt.numpy(), "W"), numpy_helper.from_array(b.numpy(), "B")])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), options,
        providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def onnx_bandwidth_gb_s(n_bytes: int, repeats: int) -> float:
    """GB/s of ONNX Runtime's vector x matrix ``Gemm`` over an fp32 (1024, n) matrix of ``n_bytes`` (one layout:
    the vocabulary projection's, input x output)."""
    rows = 1024
    wt = torch.randn(rows, max(1, n_bytes // (4 * rows)))
    gemm, x = onnx_runtime_gemm(wt, torch.zeros(wt.shape[1])), torch.randn(1, rows)
    return wt.numel() * 4 / (median_ms(lambda: gemm(x), repeats, warmup=3) / 1000) / 1e9


@torch.inference_mode()
def step_and_prefill_ms(model, source: list[int], steps: int) -> tuple[float, float]:
    """Median ms of one infilling step at batch 1 on ``source``'s cache, and of the prefill."""
    src, src_len = torch.tensor([source]), torch.tensor([len(source)])
    prefill = median_ms(lambda: InfillingStepper(model, src, src_len, steps + 4), max(3, steps // 4), warmup=1)
    stepper = InfillingStepper(model, src, src_len, 2 * steps + 4)
    stepper.step(None)
    prev = torch.tensor([source[1]])  # any word: a step costs the same whatever it feeds
    return median_ms(lambda: stepper.step(prev), steps, warmup=steps), prefill


def first_steps_s(model, source: list[int]) -> float:
    """Seconds of a stepper's first two steps at batch 1: for runtime compile, compiling them (a step
    itself takes milliseconds)."""
    stepper = InfillingStepper(model, torch.tensor([source]), torch.tensor([len(source)]), 8)
    t0 = time.perf_counter()
    with torch.inference_mode():
        stepper.step(stepper.step(None).argmax(-1))
    return time.perf_counter() - t0


@torch.inference_mode()
def interleaved_ratio(model, baseline, sources: list[list[int]], length: int, rounds: int) -> dict:
    """Rounds of erniegen's infilling greedy and HF ``generate()`` at batch 1, back to back, alternating which
    runs first; ms/sample of each and their ratio per round."""
    ours = lambda: bench_decoder(model, sources, "infilling", DecodeOptions(  # noqa: E731
        banned_ids=default_banned_ids(model), num_beams=1, max_length=length, min_length=length), 1, warmup=2)
    hf = lambda: bench_hf_baseline(baseline, sources, DecodeOptions(max_length=length, min_length=length), 1,  # noqa: E731
                                   warmup=2)
    per_round = []
    for r in range(rounds):
        first, second = (ours, hf) if r % 2 == 0 else (hf, ours)
        a, b = first()["median_ms_per_sample"], second()["median_ms_per_sample"]
        mine, theirs = (a, b) if r % 2 == 0 else (b, a)
        per_round.append({"ms_per_sample": mine, "hf_ms_per_sample": theirs, "ratio": round(mine / theirs, 3)})
    ratios = [x["ratio"] for x in per_round]
    return {"rounds": per_round, "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
            "max_ratio": max(ratios)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar-model", required=True, help="an ernie-gen model: infilling greedy and beam, typical")
    p.add_argument("--nar-model", help="a nat or mist model: nar, mist-iter, mask-predict")
    p.add_argument("--elmer-model", help="an elmer model: elmer-hard")
    p.add_argument("--elmer-soft-model", help="an elmer-soft model: elmer-soft")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--length", type=int, default=16, help="tokens every AR decoder and HF generate")
    p.add_argument("--steps", type=int, default=40, help="timed decode steps (after as many warm-up steps)")
    p.add_argument("--samples-b1", type=int, default=40)
    p.add_argument("--large-batch", type=int, default=32)
    p.add_argument("--batches-large", type=int, default=3)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="also time every precision with runtime compile (torch.compile): the step and infilling")
    p.add_argument("--unpacked", action="store_true",
                   help="also time each precision's step with the oneDNN-packed weights off")
    p.add_argument("--ab-rounds", type=int, default=0,
                   help="also alternate int8 infilling greedy and HF generate() at batch 1 this many rounds")
    p.add_argument("--onnx", action="store_true",
                   help="also time fp32 with runtime onnx: the step, and infilling greedy and beam end to end")
    args = p.parse_args()
    precisions = args.precisions.split(",")
    if args.onnx:
        import_onnxruntime()  # before anything is timed
    # (precision, runtime) pairs, labelled "fp32", ..., "fp32 onnx"; runtimes onnx and compile run the infilling
    # decoder only
    variants = ([(precision, "torch") for precision in precisions] + ([("fp32", "onnx")] if args.onnx else [])
                + [(precision, "compile") for precision in precisions if args.compile])
    torch.manual_seed(0)
    meta = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "length": args.length}
    print(f"# {meta['cpu']}, {meta['threads']} threads, {time.strftime('%Y-%m-%d')}", flush=True)

    fp32 = load(args.ar_model)
    texts = [e.source for e in read_examples(args.input, require_target=False)]
    big = args.large_batch
    sources = encode_sources(fp32, texts[:max(args.samples_b1 + 2, big * (args.batches_large + 2))])
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    # 1-3: the step beside its floor and Hugging Face's step
    n_bytes = streamed_weight_bytes(fp32)
    gb_s = bandwidth_gb_s(n_bytes, repeats=max(5, args.steps))
    floor = n_bytes / (gb_s * 1e9) * 1000
    emit({"label": "fp32 floor", "weight_mb": round(n_bytes / 1e6, 1), "bandwidth_gb_s": round(gb_s, 1),
          "step_ms": round(floor, 3)})
    onnx_floor = None
    if args.onnx:
        onnx_gb_s = onnx_bandwidth_gb_s(n_bytes, repeats=max(5, args.steps))
        onnx_floor = n_bytes / (onnx_gb_s * 1e9) * 1000
        emit({"label": "fp32 floor, ONNX Runtime", "weight_mb": round(n_bytes / 1e6, 1),
              "bandwidth_gb_s": round(onnx_gb_s, 1), "step_ms": round(onnx_floor, 3)})
    source = sources[0]
    for precision, runtime in variants:
        t0 = time.perf_counter()
        reuse = (precision, runtime) == ("fp32", "torch")
        model = fp32 if reuse else load(args.ar_model, precision=precision, runtime=runtime)
        load_s = time.perf_counter() - t0  # runtime onnx: with the export
        compile_s = first_steps_s(model, source) if runtime == "compile" else None
        step, prefill = step_and_prefill_ms(model, source, args.steps)
        vs_eager = None
        if runtime == "compile":  # against the eager step of the same precision, alternated: this VM drifts
            eager = fp32 if precision == "fp32" else load(args.ar_model, precision=precision)
            ratios = []
            for _ in range(max(1, args.ab_rounds)):
                eager_step = step_and_prefill_ms(eager, source, args.steps)[0]
                step_again = step_and_prefill_ms(model, source, args.steps)[0]
                ratios.append(round(step_again / eager_step, 3))
            vs_eager = {"compiled_over_eager": ratios, "median_compiled_over_eager": statistics.median(ratios)}
        if args.unpacked and runtime == "torch":
            with plain_products():
                plain_step, plain_prefill = step_and_prefill_ms(load(args.ar_model, precision=precision), source,
                                                                args.steps)
            # the packed ones once more after the plain ones, averaged: drift then favours neither
            again, again_prefill = step_and_prefill_ms(model, source, args.steps)
            step, prefill = (step + again) / 2, (prefill + again_prefill) / 2
            emit({"label": f"infilling step, {precision}, plain products", "precision": precision,
                  "runtime": runtime, "step_ms": round(plain_step, 3), "vs_floor": round(plain_step / floor, 2),
                  "prefill_ms": round(plain_prefill, 2)})
        row = {"label": f"infilling step, {variant_name(precision, runtime)}", "precision": precision,
               "runtime": runtime, "source_tokens": len(source), "step_ms": round(step, 3),
               "vs_floor": round(step / floor, 2), "prefill_ms": round(prefill, 2)}
        if onnx_floor is not None:
            row["vs_onnx_floor"] = round(step / onnx_floor, 2)
        if runtime == "onnx":
            row["load_s"] = round(load_s, 1)
        if compile_s is not None:
            row |= {"compile_s": round(compile_s, 1)} | vs_eager
        emit(row)
    baseline = None if args.no_baseline else hf_gpt2_like(fp32)
    if baseline is not None:
        timed = sources[:args.samples_b1 + 2]
        one, full = (bench_hf_baseline(baseline, timed, DecodeOptions(max_length=n, min_length=n), 1, warmup=2)
                     for n in (1, args.length))
        hf_step = (full["median_ms_per_sample"] - one["median_ms_per_sample"]) / max(1, args.length - 1)
        emit({"label": "HF GPT-2 step, fp32", "step_ms": round(hf_step, 3), "vs_floor": round(hf_step / floor, 2),
              "prefill_ms": one["median_ms_per_sample"]})  # generate() of one token

    # 4: end to end, every decoder of the models given, every precision
    fixed = dict(max_length=args.length, min_length=args.length)
    configs = [(args.ar_model, "infilling greedy", "infilling", dict(num_beams=1, **fixed)),
               (args.ar_model, "infilling beam 5", "infilling", dict(num_beams=5, **fixed)),
               (args.ar_model, "typical greedy", "typical", dict(num_beams=1, **fixed)),
               (args.nar_model, "NAR single pass", "nar", {}),
               (args.nar_model, "MIST iterative k=3", "mist-iter", dict(iterations=3)),
               (args.nar_model, "Mask-Predict k=3", "mask-predict", dict(iterations=3)),
               (args.elmer_model, f"ELMER hard exit δ={EXIT_THRESHOLD}", "elmer-hard", {}),
               # δ 0: no slot can exit early, so no off-ramp below the last runs: the plain pass, for the cost of exiting
               (args.elmer_model, "ELMER hard exit δ=0", "elmer-hard", dict(exit_threshold=0.0)),
               (args.elmer_soft_model, "ELMER soft exit", "elmer-soft", {})]
    for path in dict.fromkeys(c[0] for c in configs if c[0]):
        for precision, runtime in variants:
            if runtime != "torch" and path != args.ar_model:
                continue
            model = load(path, precision=precision, runtime=runtime)
            banned = default_banned_ids(model)
            for _, label, decoder, options in (c for c in configs if c[0] == path):
                if runtime != "torch" and decoder != "infilling":
                    continue
                for batch, n in ((1, args.samples_b1), (big, big * args.batches_large)):
                    opts = DecodeOptions(banned_ids=banned, **({"max_length": args.length} | options))
                    result = bench_decoder(model, sources[:n + 2 * batch], decoder, opts, batch, warmup=2)
                    emit({"label": f"{label}, {variant_name(precision, runtime)}", "precision": precision,
                          "runtime": runtime} | result)
    if args.unpacked:  # fp32 infilling end to end with the plain products, after the packed rows above
        with plain_products():
            plain = load(args.ar_model)
            banned = default_banned_ids(plain)
            for _, label, decoder, options in configs[:2]:
                for batch, n in ((1, args.samples_b1), (big, big * args.batches_large)):
                    opts = DecodeOptions(banned_ids=banned, **({"max_length": args.length} | options))
                    emit({"label": f"{label}, fp32 plain products", "precision": "fp32", "runtime": "torch"}
                         | bench_decoder(plain, sources[:n + 2 * batch], decoder, opts, batch, warmup=2))
    if baseline is not None:
        for batch, n in ((1, args.samples_b1), (big, big * args.batches_large)):
            opts = DecodeOptions(max_length=args.length, min_length=args.length)
            emit({"label": "HF GPT-2 generate greedy, fp32", "precision": "fp32"}
                 | bench_hf_baseline(baseline, sources[:n + 2 * batch], opts, batch, warmup=2))
    if args.ab_rounds and baseline is not None:
        for runtime in ("torch", "compile") if args.compile and "int8" in precisions else ("torch",):
            result = interleaved_ratio(load(args.ar_model, precision="int8", runtime=runtime), baseline,
                                       sources[:args.samples_b1 + 2], args.length, args.ab_rounds)
            emit({"label": f"{variant_name('int8', runtime)} infilling greedy / HF generate, batch 1, interleaved",
                  "precision": "int8", "runtime": runtime} | result)
    write_results(args.output, rows, **meta, ar_model=args.ar_model, nar_model=args.nar_model,
                  elmer_model=args.elmer_model, elmer_soft_model=args.elmer_soft_model)

    print("\n| row | step ms | x floor | x ONNX Runtime floor | prefill ms | ms/sample (batch 1) | samples/s (batch "
          f"{big}) |\n|---|---:|---:|---:|---:|---:|---:|")
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        b1 = next((r["median_ms_per_sample"] for r in mine if r.get("batch_size") == 1), "")
        bl = next((r["samples_per_s"] for r in mine if r.get("batch_size") == big), "")
        first = mine[0]
        print(f"| {label} | {first.get('step_ms', '')} | {first.get('vs_floor', '')} | "
              f"{first.get('vs_onnx_floor', '')} | {first.get('prefill_ms', '')} | {b1} | {bl} |")
    for r in (r for r in rows if "median_ratio" in r):
        print(f"\n{r['label']}: median {r['median_ratio']:.3f} (range {r['min_ratio']:.3f}-{r['max_ratio']:.3f}) "
              f"over {len(r['rounds'])} rounds")


if __name__ == "__main__":
    main()
