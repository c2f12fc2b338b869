"""Where a fine-tuning step's time goes on this CPU: torch.profiler over real batches.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_profile.py [--data ../shared/data] [--profiled 3]
        [--method ernie-gen] [--precision fp32|bf16] [--keep-freed-memory] [--json]

Length-bucketed batches of 32 from the first 3,200 squad_qg_sent training pairs (as `erniegen finetune` draws
them), all-MiniLM-L6-v2, the squad_qg preset (its frozen word table and copying included, as `erniegen finetune
--method METHOD` with no other flag builds them), fused AdamW; ``--precision bf16`` runs the forward under bf16
autocast as the trainer does (``--precision auto`` on a CPU with native bf16). Prints the mean seconds per step
over 6 steps after 2 warm-up steps with the page faults and kernel CPU time they took, then the profiler's table
(self CPU time by operator) over ``--profiled`` more steps (none: no table). ``--keep-freed-memory``: glibc keeps freed
memory (erniegen.allocator, as the command line does); ``--json``: the timing as one JSON line.
Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from erniegen import registry  # noqa: E402
from erniegen.allocator import keep_freed_memory  # noqa: E402
from erniegen.batch import collate_pairs  # noqa: E402
from erniegen.finetune import FinetuneConfig, load_pairs, resolve_method_options, resolve_preset  # noqa: E402
from erniegen.model import Transformer  # noqa: E402
from erniegen.train import epoch_batches  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--profiled", type=int, default=3)
    p.add_argument("--method", default="ernie-gen", choices=list(registry.METHODS))
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--keep-freed-memory", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory: this C library is not glibc")

    torch.manual_seed(0)
    model = Transformer.from_pretrained("minilm")
    model.set_attention_dropout(0.0)
    cfg = FinetuneConfig(train=f"{args.data}/squad_qg_sent/train.jsonl", output="unused", method=args.method)
    preset = resolve_preset(cfg, model.config.max_position_embeddings)
    if preset.freeze_embeddings:  # as `erniegen finetune` does: no gradient for the tied word table
        model.embeddings.word.weight.requires_grad_(False)
    _, feats = load_pairs(cfg.train, preset, model.tokenizer, 3200)
    options = resolve_method_options(cfg)
    feats = registry.family(args.method).prepare_features(args.method, feats, options)
    lengths = [len(f.source_ids) + len(f.target_ids) for f in feats]
    order = epoch_batches(len(feats), 0, 0, 32, lengths=lengths)[:8 + args.profiled]
    batches = [collate_pairs([feats[i] for i in b], model.config.pad_token_id) for b in order]
    objective = registry.family(args.method).build_objective(args.method, model, preset, options).train()
    optimizer = torch.optim.AdamW([q for q in objective.parameters() if q.requires_grad], lr=1e-6, fused=True)

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = objective(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for b in batches[:2]:
        step(b)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for b in batches[2:8]:
        step(b)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    timing = {"precision": args.precision, "keep_freed_memory": args.keep_freed_memory, "s_per_step": (t1 - t0) / 6,
              "page_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / 6,
              "kernel_cpu_share": (r1.ru_stime - r0.ru_stime) / (r1.ru_stime - r0.ru_stime + r1.ru_utime - r0.ru_utime),
              "peak_rss_gb": r1.ru_maxrss / 2**20}
    if args.json:
        print(json.dumps(timing), flush=True)
    else:
        print(f"mean s/step over 6 steps: {timing['s_per_step']:.3f} ({timing['page_faults_per_step']:.0f} page "
              f"faults a step, {100 * timing['kernel_cpu_share']:.0f}% of CPU time in the kernel)")
    if not args.profiled:
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[8:]:
            step(b)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
