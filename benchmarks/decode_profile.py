"""Where the infilling decode step's time goes at batch 1: torch.profiler over 50 steps on a trained model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decode_profile.py --model runs/qg-bf16-s42/best \
        [--input ../shared/data/squad_qg_sent/dev.jsonl] [--precision fp32|bf16|int8] [--runtime torch|compile]
        [--steps 50]

The step of ``benchmarks/inference_precision.py`` (one ``InfillingStepper.step`` on the cache of the first dev
source, after 30 warm-up steps); prints the profiler's table by operator and input shape, self CPU time first.
The profiler adds a few microseconds to every operator, so small operators look slower than they run.
Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.data import read_examples  # noqa: E402
from erniegen.decoding import encode_sources  # noqa: E402
from erniegen.ernie_gen import InfillingStepper  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", default="../shared/data/squad_qg_sent/dev.jsonl")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--runtime", default="torch", help="torch (eager) or compile (compiled in the warm-up steps)")
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    model = load(args.model, precision=args.precision, runtime=args.runtime)
    source = encode_sources(model, [next(iter(read_examples(args.input, require_target=False))).source])[0]
    with torch.inference_mode():
        stepper = InfillingStepper(model, torch.tensor([source]), torch.tensor([len(source)]), args.steps + 40)
        stepper.step(None)
        prev = torch.tensor([source[1]])  # any word: a step costs the same whatever it feeds
        for _ in range(30):
            stepper.step(prev)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.steps):
                stepper.step(prev)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
