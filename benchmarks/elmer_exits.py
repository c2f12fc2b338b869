"""Where ELMER's hard exit lets slots leave, and what each threshold costs (issue 12; the paper's Figure 2).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/elmer_exits.py --model runs/qg-elmer/best \\
        --input ../shared/data/squad_qg_sent/dev.jsonl [--thresholds 0 0.25 0.5 1.0] [--gates 0.5 0.9] \\
        [--repeats 3] [--output results/elmer_exits.json] [--plot docs/img/elmer_exits.png]

For each entropy threshold δ (nats), and each level of the exit gate (``--gates``: a model whose gate
``erniegen exit-gate`` fitted), the dev sources are decoded with ``elmer-hard`` and every output slot (a
row's slots up to and including its first end token) is counted at the layer it exited; the row also
holds BLEU-4 / METEOR / ROUGE-L (nqg convention), the mean exit layer and the wall time of the decode
(batch 32, this machine, the median of ``--repeats`` after one warm-up batch; for comparison within the
run only). δ = 0 exits nothing before the last layer: the full-depth reference.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.bench import write_results  # noqa: E402
from erniegen.decoding import encode_sources, generate_ids, ids_to_text, options_from_settings  # noqa: E402
from erniegen.elmer import HardExitDecoder, exit_shares  # noqa: E402
from erniegen.metrics import qg_scores  # noqa: E402
from erniegen.plots import plot_exit_shares  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model fine-tuned with --method elmer")
    p.add_argument("--input", required=True, help="JSONL with source and target")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    p.add_argument("--gates", type=float, nargs="*", default=[], help="exit-gate levels (needs a fitted gate)")
    p.add_argument("--repeats", type=int, default=1, help="decodes timed per setting (the median is kept)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="the first N examples only")
    p.add_argument("--output", default="results/elmer_exits.json")
    p.add_argument("--plot", default="docs/img/elmer_exits.png")
    args = p.parse_args()

    rows = [json.loads(line) for line in open(args.input, encoding="utf-8")][: args.limit]
    sources, references = [r["source"] for r in rows], [r["target"] for r in rows]
    model = load(args.model)
    ids = encode_sources(model, sources)
    n_layers = len(model.layers)
    results = []
    settings = [{"threshold": delta} for delta in args.thresholds] + [{"gate": level} for level in args.gates]
    generate_ids(model, ids[: args.batch_size], HardExitDecoder(), batch_size=args.batch_size)  # warm-up
    for setting in settings:
        opts = options_from_settings(model, exit_threshold=setting.get("threshold"), exit_gate=setting.get("gate"))
        seconds = []
        for _ in range(args.repeats):
            decoder = HardExitDecoder(record_exits=True)
            t0 = time.perf_counter()
            out = generate_ids(model, ids, decoder, batch_size=args.batch_size, opts=opts)
            seconds.append(time.perf_counter() - t0)
        shares = exit_shares(decoder.exit_counts, n_layers)
        scores = qg_scores(ids_to_text(model, out), references, sources)
        row = setting | {"shares": [round(x, 4) for x in shares],
                         "mean_exit_layer": round(sum((i + 1) * x for i, x in enumerate(shares)), 3),
                         "decode_s": round(statistics.median(seconds), 2)}
        row |= {k: round(v, 2) for k, v in scores.items()}
        print(json.dumps(row), flush=True)
        results.append(row)
    write_results(args.output, results, model=args.model, input=args.input, examples=len(rows))
    plot_exit_shares(results, args.plot)
    print(f"wrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
