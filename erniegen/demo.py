"""``make demo``: fine-tune the default model on question generation for a few minutes, then show it.

It runs `erniegen finetune`'s default recipe for the squad_qg task (head warm-up, learning rate, frozen
word table, decoding), shortened to what fits ten minutes with set-up and scoring: the trainer's
``time_budget`` fits the number of steps (and the lr schedule with it) to the step time it measures, so the
demo keeps its ten minutes on a slow machine or a slow day, and trains longer on a fast one. The numbers it
prints are those of a short run, not of the converged recipe (BENCHMARKS.md section 1 has those).

``DATA`` may be a folder with ``train.jsonl`` (and ``dev.jsonl``), one JSONL file (its last 100 rows
become the dev set), or a ``datasets`` name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HOW_TO = """erniegen demo: no data at {data!r}.
Point DATA at any of:
  - a folder holding train.jsonl (and dev.jsonl) with "source"/"target" fields, e.g.
      make demo DATA=../shared/data/squad_qg_sent
  - one JSONL file of {{"source": ..., "target": ...}} rows (the last 100 become the dev set):
      make demo DATA=my_pairs.jsonl
  - a Hugging Face `datasets` name with source/target fields (needs the Hub or a local cache):
      make demo DATA=some_org/some_dataset"""

# At most this many optimizer steps (batch 32); the time budget fits fewer where they would not fit. Two CPU cores
# train ~360 in bf16 within the ten minutes (~1.3 epochs of squad_qg_sent), ~3x fewer in fp32 (a CPU without
# AVX512-BF16 or AMX): BENCHMARKS.md section 1, "make demo".
DEMO_STEPS = {"bf16": 600, "fp32": 250}
# Kept back from the budget for what follows training (loading the best model, beam decoding of the samples,
# METEOR's Java start: ~25 s measured), and a margin for step times that drift after they are measured.
AFTER_TRAINING_S, MARGIN_S = 35.0, 20.0


def _split(data: str, workdir: Path) -> tuple[str, str]:
    path = Path(data)
    if path.is_dir():
        if not (path / "train.jsonl").exists():
            raise SystemExit(HOW_TO.format(data=data))
        dev = path / "dev.jsonl"
        return str(path / "train.jsonl"), str(dev if dev.exists() else path / "train.jsonl")
    if path.is_file():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        (workdir / "train.jsonl").write_text("\n".join(lines[:-100]) + "\n")
        (workdir / "dev.jsonl").write_text("\n".join(lines[-100:]) + "\n")
        return str(workdir / "train.jsonl"), str(workdir / "dev.jsonl")
    if "/" in data and not data.startswith((".", "/")):
        return data, data  # a datasets name: read_examples takes its train split for both
    raise SystemExit(HOW_TO.format(data=data))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=os.environ.get("DATA", "../shared/data/squad_qg_sent"))
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="wall time of the whole demo; the training steps are fitted to what is left of it")
    p.add_argument("--started", type=float,
                   help="when the demo's minutes started, in seconds since the epoch (make demo passes its own "
                        "start, so that the install counts); default: now")
    p.add_argument("--steps", type=int, help="train exactly this many optimizer steps instead of fitting them to "
                                             "--minutes")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=100)
    args = p.parse_args(argv)
    started = time.time() if args.started is None else args.started
    if not Path(args.data).exists() and "/" not in args.data.strip("./"):
        raise SystemExit(HOW_TO.format(data=args.data))
    workdir = Path(tempfile.mkdtemp(prefix="erniegen-demo-"))
    train, dev = _split(args.data, workdir)

    import shutil

    import torch

    from . import load
    from .allocator import keep_freed_memory
    from .data import read_examples
    from .finetune import FinetuneConfig, finetune
    from .metrics import compute_metrics
    from .precision import native_bf16
    from .train import TrainConfig

    keep_freed_memory()  # as the command line does (erniegen.allocator)
    shutil.rmtree(args.output, ignore_errors=True)
    precision = "bf16" if native_bf16() or torch.cuda.is_available() else "fp32"
    steps, budget = args.steps or DEMO_STEPS[precision], None
    if args.steps is None:
        budget = max(0.0, 60 * args.minutes - (time.time() - started) - AFTER_TRAINING_S - MARGIN_S)
        length = (f"{budget:.0f} s of the {args.minutes:g} minutes, the number of steps (at most {steps}) fitted to "
                  "it every ten")
    else:
        length = f"{steps} steps"
    print(f"== fine-tuning all-MiniLM-L6-v2 with ERNIE-GEN on {train} for {length}, in {precision} "
          "(the default squad_qg recipe, shortened)", flush=True)
    t0 = time.time()
    trainer = TrainConfig(output_dir=args.output, max_steps=steps, log_every=10, eval_every=steps,
                          time_budget=budget)
    # the full recipe's task adaptation (~7 min) would not fit the demo's ten minutes, a moving average
    # with a ~500-step horizon would lag a run this short, and target noise, a regulariser against the
    # over-fitting of epochs 5-10, slows the first epochs (BENCHMARKS.md section 1): all three off here
    summary = finetune(FinetuneConfig(train=train, dev=dev, output=args.output, task="squad_qg", max_source_len=256,
                                      max_target_len=40, eval_samples=50, trainer=trainer, adapt_steps=0,
                                      ema_decay=0.0, noise_rate=0.0))
    print(f"== trained {summary['global_step']} steps in {time.time() - t0:.0f} s", flush=True)

    model = load(os.path.join(args.output, "best"))
    examples = read_examples(dev, "source", "target")[: args.eval_samples]
    preds = model.generate([e.source for e in examples], progress=True)
    print(f"\n== samples (the task's decoding: beam {model.settings.num_beams})")
    for e, pred in list(zip(examples, preds))[: args.samples]:
        answer = e.source.rsplit("[SEP]", 1)[-1].strip()
        print(f"answer     : {answer}\nreference  : {e.target}\nprediction : {pred}\n")
    scores = compute_metrics("qg", preds, [e.target for e in examples], [e.source for e in examples])
    print(f"== metrics on {len(examples)} dev examples (nqg convention):")
    print(json.dumps({k: round(v, 2) for k, v in scores.items()}))
    print(f"\n== {time.time() - started:.0f} s in all (of {args.minutes:g} minutes)")
    print(f"\nmodel saved in {args.output}/best — try: erniegen generate --model {args.output}/best "
          f"--input {dev} --output predictions.jsonl", file=sys.stderr)


if __name__ == "__main__":
    main()
