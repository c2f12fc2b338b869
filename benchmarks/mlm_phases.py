"""The recipe's two masked-LM phases (head warm-up, task adaptation) on their own: time and what they teach.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mlm_phases.py [--data ../shared/data] \\
        [--head-steps 100] [--adapt-steps 200] [--output results/mlm_phases.json]

Runs ``warm_up_head`` then ``adapt_to_task`` on all-MiniLM-L6-v2 over squad_qg_sent's training texts exactly as
`erniegen finetune`'s defaults do (same texts, seeds and learning rates; fewer steps if asked), then scores
the adapted model's masked-LM loss on the dev set's texts (sources and questions; 15% of tokens masked with a
fixed seed, dropout off), the quantity the two phases exist to lower. Prints and writes seconds per phase,
seconds per step and the held-out loss. For A/B runs of two commits, run this file from each commit's worktree
(it only calls functions that every commit since the phases exist has).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from erniegen.batch import pad  # noqa: E402
from erniegen.finetune import FinetuneConfig, load_pairs, resolve_preset  # noqa: E402
from erniegen.head_warmup import MASK_PROB, adapt_to_task, init_attn_embedding, mask_tokens, warm_up_head  # noqa: E402
from erniegen.model import Transformer  # noqa: E402
from erniegen.passes import encode_context  # noqa: E402


def texts_of(feats, cls_id: int) -> list[list[int]]:
    """The phases' texts, as `prepare_untrained_checkpoint` builds them."""
    return [f.source_ids for f in feats] + [[cls_id, *f.target_ids] for f in feats]


@torch.no_grad()
def heldout_mlm_loss(model: Transformer, texts: list[list[int]], seed: int = 0, batch_size: int = 64) -> float:
    """Mean masked-LM cross-entropy per masked token over ``texts`` with fixed masks, dropout off."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # padding does not change the loss
    total, count = 0.0, 0
    for s in range(0, len(order), batch_size):
        ids, lengths = pad([texts[i] for i in order[s: s + batch_size]], model.config.pad_token_id)
        inner = torch.arange(ids.shape[1])[None, :]
        where = mask_tokens(ids, (inner > 0) & (inner < lengths[:, None] - 1), model.tokenizer.mask_token_id,
                            MASK_PROB, gen)
        hidden, _, _ = encode_context(model, ids.masked_fill(where, model.tokenizer.mask_token_id), lengths)
        total += float(F.cross_entropy(model.logits(hidden[where]).float(), ids[where], reduction="sum"))
        count += int(where.sum())
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--head-steps", type=int, default=100)
    p.add_argument("--adapt-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=42, help="finetune's --seed (its default)")
    p.add_argument("--output")
    args = p.parse_args()

    torch.manual_seed(args.seed)  # as `erniegen finetune` seeds before loading: the missing head starts from it
    model = Transformer.from_pretrained("minilm")
    cfg = FinetuneConfig(train=f"{args.data}/squad_qg_sent/train.jsonl", output="unused")
    preset = resolve_preset(cfg, model.config.max_position_embeddings)
    if preset.freeze_embeddings:
        model.embeddings.word.weight.requires_grad_(False)
    init_attn_embedding(model)
    cls_id = model.tokenizer.cls_token_id
    _, train = load_pairs(cfg.train, preset, model.tokenizer, None)
    _, dev = load_pairs(f"{args.data}/squad_qg_sent/dev.jsonl", preset, model.tokenizer, None)
    texts, dev_texts = texts_of(train, cls_id), texts_of(dev, cls_id)
    n_dev = len(dev)

    def heldout(when: str) -> dict[str, float]:
        """All dev texts (a token-weighted mean, three quarters source tokens), then sources and questions apart:
        the questions are what fine-tuning will predict."""
        return {f"heldout_loss_{when}": heldout_mlm_loss(model, dev_texts),
                f"heldout_sources_{when}": heldout_mlm_loss(model, dev_texts[:n_dev]),
                f"heldout_questions_{when}": heldout_mlm_loss(model, dev_texts[n_dev:])}

    result: dict = {"head_steps": args.head_steps, "adapt_steps": args.adapt_steps, "seed": args.seed,
                    **heldout("before")}
    for name, run, steps, seed in (("head", warm_up_head, args.head_steps, args.seed),
                                   ("adapt", adapt_to_task, args.adapt_steps, args.seed + 1)):
        t0 = time.perf_counter()
        run(model, texts, steps, seed=seed, progress=False)
        seconds = time.perf_counter() - t0
        result[f"{name}_s"], result[f"{name}_s_per_step"] = round(seconds, 1), round(seconds / max(steps, 1), 3)
    result.update(heldout("after"))
    result["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip()
    result["cpu"] = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name")), platform.processor())
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
