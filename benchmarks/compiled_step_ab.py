"""The compiled infilling step (``--runtime compile``) against variants of its runner, in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compiled_step_ab.py --model runs/qg-ad1/best \
        [--input ../shared/data/squad_qg_sent/dev.jsonl] [--precisions fp32,bf16,int8] \
        [--variants eager,all-guards,cpp-wrapper,python-wrapper,fbgemm-op,fbgemm-op-autotune] \
        [--rounds 10] [--batch-size 1] \
        [--output results/compiled_step_ab.json]

For each precision, the model is compiled once as erniegen compiles it (``runtimes.CompiledInfillingStep``) and
once per variant, and its steps at batch 1 (``--batch-size``: rows, the first dev sources; on their cache, a new
one each round, holding as many target slots as generate's, after its first step and 6 warm-up steps) are timed in
alternated rounds of 40 (median of each round): the ratio variant / erniegen's step per round, and their median.
Until session 46 the cache held 84 target slots and rounds began after 10 warm-up steps (results of sessions 44-45).
Processes on these VMs differ by 10-20% in step time for the same code, so the comparison stays inside one.

- ``eager``: the step as ``--runtime torch`` runs it (no step runner): what compiling buys at this batch size,
  which end-to-end runs of few batches on a drifting VM could not settle at 32 rows (session 44).
- ``all-guards``: dynamo's default guards (every module, parameter and global the step reads; erniegen's runner
  before session 44 checked these on every call), the graphs cached on the one shared ``FlatStep.forward``.
- ``cpp-wrapper`` / ``python-wrapper``: Inductor's C++ wrapper (``cpp_wrapper``) or its Python one around the
  kernels (erniegen's int8 step uses the C++ one since session 44, fp32 and bf16 the Python one; a variant equal to
  erniegen's runner gives a null comparison: how far two identical runners differ in this run).
- ``fbgemm-op`` / ``fbgemm-op-autotune`` (int8 only): each int8 product as fbgemm's eager one (the product eager int8
  runs), wrapped in a custom operator that the compiled graph calls opaquely, instead of Inductor's oneDNN int8
  product (slow without VNNI); with Inductor's Python wrapper, and with fp32's ``max_autotune`` settings on top
  (session 48: 0.65x eager int8's step on an AVX2-only EPYC, but NaN at the source's words of a model that copies).

Also checks that each variant's log-probabilities equal erniegen's (the largest difference and the variant's NaN count
are printed).
Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load, precision, runtimes  # noqa: E402
from erniegen.batch import pad  # noqa: E402
from erniegen.bench import write_results  # noqa: E402
from erniegen.data import read_examples  # noqa: E402
from erniegen.decoding import encode_sources  # noqa: E402
from erniegen.ernie_gen import InfillingStepper  # noqa: E402


class AllGuards(runtimes.CompiledInfillingStep):
    """The runner with dynamo's default guards, its graphs on the class's shared forward (as before session 44)."""

    def __init__(self, model):
        super().__init__(model)
        self.flat = runtimes.FlatStep(model).eval()
        self._step = torch.compile(self.flat, dynamic=False)


def wrapper(cpp: bool) -> type[runtimes.CompiledInfillingStep]:
    class Wrapper(runtimes.CompiledInfillingStep):
        def __init__(self, model):
            super().__init__(model)
            self.inductor_config = {**self.inductor_config, "cpp_wrapper": cpp}
    return Wrapper


_FBGEMM = torch.library.Library("erniegen_bench", "DEF")
_FBGEMM.define("int8_linear(Tensor x, int key, int out_features, bool reduce_range) -> Tensor")
_INT8_MODULES: weakref.WeakValueDictionary[int, precision.Int8Linear] = weakref.WeakValueDictionary()
_KEYS = itertools.count()
_FBGEMM.impl("int8_linear", lambda x, key, out_features, reduce_range: torch.ops.quantized.linear_dynamic(
    x, _INT8_MODULES[key]._packed_params._packed_params, reduce_range=reduce_range), "CPU")
torch.library.register_fake("erniegen_bench::int8_linear")(
    lambda x, key, out_features, reduce_range: x.new_empty(*x.shape[:-1], out_features))


class OpaqueInt8Linear(precision.Int8Linear):
    """Int8Linear whose compiled product is fbgemm's, called through the opaque operator above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        if self.input_scale is not None:
            x = x * self.input_scale
        return torch.ops.erniegen_bench.int8_linear(x, self.key, self.out_features, self.reduce_range).to(x.dtype)


def fbgemm_op(autotune: bool) -> type[runtimes.CompiledInfillingStep]:
    class FbgemmOp(runtimes.CompiledInfillingStep):
        def __init__(self, model):
            for m in model.modules():
                if isinstance(m, precision.Int8Linear):
                    m.__class__, m.key = OpaqueInt8Linear, next(_KEYS)
                    _INT8_MODULES[m.key] = m
            super().__init__(model)
            self.inductor_config = dict(runtimes.INDUCTOR_CONFIG) if autotune else {"freezing": True}
    return FbgemmOp


# a variant is use_runtime's (runtime, runner)
VARIANTS = {"eager": ("torch", None), "all-guards": ("compile", AllGuards), "cpp-wrapper": ("compile", wrapper(True)),
            "python-wrapper": ("compile", wrapper(False)), "fbgemm-op": ("compile", fbgemm_op(False)),
            "fbgemm-op-autotune": ("compile", fbgemm_op(True))}
STEPS = 40  # timed in a round, as in inference_precision.py
WARMUP = 6  # steps before a round's: 1 + WARMUP + STEPS fit the 48 target slots of squad_qg's decoding


def stepper(model, sources: list[list[int]], warmup: int = WARMUP) -> InfillingStepper:
    """A stepper on the cache of ``sources`` (one row each, padded) after its first step and ``warmup`` more: each
    round starts a new one, so that positions stay within the model's, and its cache holds as many target slots as
    generate's (the model's ``max_decode_len``: the compiled step attends over the whole buffer, eager over the
    filled part)."""
    slots = model.settings.max_decode_len
    if 1 + warmup + STEPS > slots:
        raise SystemExit(f"{1 + warmup + STEPS} steps do not fit the model's {slots} target slots (max_decode_len)")
    ids, lengths = pad(sources, model.config.pad_token_id)
    out = InfillingStepper(model, ids, lengths, slots)
    out.step(None)
    prev = ids[:, 1]  # any words: a step costs the same whatever it feeds
    for _ in range(warmup):
        out.step(prev)
    return out


def round_ms(stepper: InfillingStepper, prev: torch.Tensor, steps: int = STEPS) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        stepper.step(prev)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", default="../shared/data/squad_qg_sent/dev.jsonl")
    p.add_argument("--precisions", default="fp32,bf16,int8")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1, help="rows of a step: the first dev sources")
    p.add_argument("--output", default="results/compiled_step_ab.json")
    args = p.parse_args()
    rows = []
    for precision in args.precisions.split(","):
        base = load(args.model, precision=precision)
        examples = iter(read_examples(args.input, require_target=False))
        sources = encode_sources(base, [next(examples).source for _ in range(args.batch_size)])
        prev = torch.tensor([s[1] for s in sources])
        for name in args.variants.split(","):
            runners = {"erniegen": runtimes.use_runtime(copy.deepcopy(base), "compile"),
                       name: runtimes.use_runtime(copy.deepcopy(base), *VARIANTS[name])}
            compile_s, times = {}, {k: [] for k in runners}
            with torch.inference_mode():
                for key, model in runners.items():
                    start = time.perf_counter()
                    stepper(model, sources).step(prev)
                    compile_s[key] = time.perf_counter() - start
                last = [stepper(model, sources, warmup=1).step(prev) for model in runners.values()]
                diff = (last[0] - last[1]).abs().max().item()
                nan = int(torch.isnan(last[1]).sum())
                for r in range(args.rounds):
                    for key in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
                        times[key].append(round_ms(stepper(runners[key], sources), prev))
            ratios = [v / e for v, e in zip(times[name], times["erniegen"])]
            row = {"precision": precision, "variant": name, "batch_size": args.batch_size,
                   "erniegen_step_ms": round(statistics.median(times["erniegen"]), 3),
                   "variant_step_ms": round(statistics.median(times[name]), 3),
                   "variant_over_erniegen": round(statistics.median(ratios), 3),
                   "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                   "compile_s": {k: round(v, 1) for k, v in compile_s.items()}, "max_logp_diff": diff,
                   "nan_log_probs": nan}
            print(row, flush=True)
            rows.append(row)
    write_results(args.output, rows, model=args.model, rounds=args.rounds)


if __name__ == "__main__":
    main()
