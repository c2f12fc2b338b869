"""How sure each of ELMER's off-ramps is: quantiles of the prediction entropy (nats) at every layer, over the
output slots of dev sources (a row's slots up to and including its first end token), every slot run through
every layer (δ = 0). Beside the exit thresholds δ it says why slots do or do not leave early (issue 12).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/elmer_entropy.py --model runs/qg-elmer/best \\
        --input ../shared/data/squad_qg_sent/dev.jsonl [--limit 128]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.batch import pad  # noqa: E402
from erniegen.decoding import encode_sources, options_from_settings  # noqa: E402
from erniegen.elmer import hard_exit, layer_logits, output_slots, slot_count  # noqa: E402
from erniegen.passes import encode_source  # noqa: E402

QUANTILES = (0.1, 0.25, 0.5, 0.75)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model fine-tuned with --method elmer")
    p.add_argument("--input", required=True, help="JSONL with a source field")
    p.add_argument("--limit", type=int, default=128, help="the first N examples (one batch)")
    args = p.parse_args()

    rows = [json.loads(line) for line in open(args.input, encoding="utf-8")][: args.limit]
    model = load(args.model)
    src, src_len = pad(encode_sources(model, [r["source"] for r in rows]), 0)
    source, _ = encode_source(model, src, src_len, hidden=False)
    out = hard_exit(model, source, slot_count(model), 0.0, options_from_settings(model), active_only=False)
    keep = output_slots(out.tokens, model.tokenizer.sep_token_id)
    for layer, x in enumerate(out.states):
        logp = torch.log_softmax(layer_logits(model, layer, x[keep]).float(), -1)
        entropy = -(logp.exp() * logp).sum(-1)
        q = torch.quantile(entropy, torch.tensor(QUANTILES)).tolist()
        print(json.dumps({"layer": layer + 1, "slots": int(keep.sum())}
                         | {f"q{int(k * 100)}": round(v, 2) for k, v in zip(QUANTILES, q)}), flush=True)


if __name__ == "__main__":
    main()
