"""What each training-speed choice buys: one ERNIE-GEN fine-tuning step, with and without each, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_speed.py --output results/step_speed.json

A step (forward, backward, optimizer) of all-MiniLM-L6-v2 on the first pairs of squad_qg_sent (batch 32)
and of paragraph-level squad_qg (batch 8), for every combination of precision (fp32 / bf16 autocast),
attention in training (PyTorch's fused kernel / the explicit product erniegen now uses on CPU) and AdamW
(for-each / fused). Median of ``--repeats`` steps after ``--warmup`` steps, all in one process. Run it on
an idle machine: two OpenMP threads slow down many times over when anything else takes a core.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import erniegen.network as network  # noqa: E402
from erniegen import registry  # noqa: E402
from erniegen.batch import collate_pairs  # noqa: E402
from erniegen.bench import write_results  # noqa: E402
from erniegen.finetune import FinetuneConfig, load_pairs, resolve_preset  # noqa: E402
from erniegen.model import Transformer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--output", default="results/step_speed.json")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()

    torch.manual_seed(0)
    model = Transformer.from_pretrained("minilm")
    model.set_attention_dropout(0.0)
    use_math = network._use_math_attention
    explicit = network._math_attention_fits  # in fp32 too, which erniegen itself no longer does
    rows = []
    for dataset, batch_size in (("squad_qg_sent", 32), ("squad_qg", 8)):
        cfg = FinetuneConfig(train=f"{args.data}/{dataset}/train.jsonl", output="unused", noise_rate=0.0)
        preset = resolve_preset(cfg, model.config.max_position_embeddings)
        _, feats = load_pairs(cfg.train, preset, model.tokenizer, batch_size)
        batch = collate_pairs(feats, model.config.pad_token_id)
        objective = registry.family("ernie-gen").build_objective("ernie-gen", model, preset, {}).train()
        for dtype, attention, fused in itertools.product((torch.float32, torch.bfloat16), ("fused", "explicit"),
                                                         (False, True)):
            network._use_math_attention = explicit if attention == "explicit" else (lambda q, k: False)
            optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-6, fused=fused)
            times = []
            for i in range(args.warmup + args.repeats):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = objective(**batch)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            row = {"data": dataset, "batch": batch_size, "tokens": int(batch["src_len"].sum() + 2 * batch["tgt_len"].sum()),
                   "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "attention": attention,
                   "adamw": "fused" if fused else "foreach", "median_s": round(statistics.median(times), 4),
                   "min_s": round(min(times), 4), "max_s": round(max(times), 4)}
            rows.append(row)
            print(row, flush=True)
    network._use_math_attention = use_math
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    write_results(args.output, rows, cpu=cpu, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
