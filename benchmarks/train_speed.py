"""Training throughput (tokens/s) of fine-tuning and pre-training, one and two processes, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_speed.py --output results/train_speed.json

Each configuration trains all-MiniLM-L6-v2 for ``--steps`` optimizer steps in a fresh process (or two,
under torchrun) and logs tokens/s every ``--log-every`` steps; the first window (start-up, warm-up) is
dropped and the median of the rest reported. Tokens are every position the model processes: source,
contextual target and each flow's placeholders. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from erniegen.bench import write_results  # noqa: E402


def run(label: str, args: list[str], processes: int, threads: int, out_dir: Path, log_every: int) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    cmd = [*launcher, "-m", "erniegen.cli", *args, "--output", str(out_dir), "--log-every", str(log_every)]
    print(f"{label}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    windows = [r for r in map(json.loads, open(out_dir / "log.jsonl")) if "tokens_per_s" in r][1:]
    rates = [r["tokens_per_s"] for r in windows]
    row = {"label": label, "processes": processes, "threads_per_process": threads,
           "median_tokens_per_s": statistics.median(rates),
           "median_examples_per_s": statistics.median(r["examples_per_s"] for r in windows), "windows": rates}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data", help="folder with squad_qg/ and corpus/")
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=4)
    args = p.parse_args()
    data = Path(args.data).resolve()
    qg, corpus = data / "squad_qg", data / "corpus" / "train.jsonl"
    if not qg.exists() or not corpus.exists():
        sys.exit(f"{data}: needs squad_qg/ and corpus/train.jsonl (pass --data)")
    finetune = ["finetune", "--model", "minilm", "--train", str(qg / "train.jsonl"), "--task", "squad_qg",
                "--max-steps", str(args.steps), "--batch-size", "32", "--max-source-len", "256",
                "--max-target-len", "40", "--precision", "fp32"]
    pretrain = ["pretrain", "--model", "minilm", "--corpus", str(corpus), "--max-steps", str(args.steps),
                "--max-len", "256", "--batch-size", "8", "--warmup-steps", "4", "--precision", "fp32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "span_vocab.tsv"
        subprocess.run([sys.executable, "-m", "erniegen.cli", "span-vocab", "--corpus", str(corpus), "--output",
                        str(vocab), "--max-len", "256"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       env=os.environ | {"HF_HUB_OFFLINE": "1"})
        pretrain += ["--span-vocab", str(vocab)]
        cores = os.cpu_count() or 1
        plan = [("finetune ernie-gen, batch 32", [*finetune, "--method", "ernie-gen"], 1, cores),
                ("finetune typical, batch 32", [*finetune, "--method", "typical"], 1, cores),
                ("finetune mist, batch 32", [*finetune, "--method", "mist"], 1, cores),
                ("pretrain, 1 process, 8 x 2 sequences", [*pretrain, "--grad-accum", "2"], 1, cores),
                ("pretrain, 2 processes, 8 x 1 sequences each", [*pretrain, "--grad-accum", "1"], 2,
                 max(1, cores // 2))]
        for i, (label, cmd, procs, threads) in enumerate(plan):
            rows.append(run(label, cmd, procs, threads, Path(tmp) / f"run{i}", args.log_every))
    write_results(args.output, rows, steps=args.steps)
    print("\n| run | processes x threads | median tokens/s | median examples/s |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['processes']} x {r['threads_per_process']} | {r['median_tokens_per_s']:.0f} "
              f"| {r['median_examples_per_s']:.1f} |")


if __name__ == "__main__":
    main()
