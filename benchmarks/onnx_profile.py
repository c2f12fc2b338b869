"""Where the ONNX Runtime infilling step's time goes (issue 13): ONNX Runtime's own profiler over decode steps.

    HF_HUB_OFFLINE=1 nice -n 19 .venv/bin/python benchmarks/onnx_profile.py --model runs/tiny/best \\
        [--source-len 24] [--steps 40] [--warmup 20] [--top 15] [--keep /tmp/ort-profile]

Loads the model with ``runtime="onnx"`` but with profiling switched on in the step's session, runs
``--warmup`` + ``--steps`` batch-1 greedy infilling steps the way decoding does (an ``InfillingStepper`` over a
``--source-len``-token source, fed the previous word and the placeholder) and aggregates the profiled steps:

* by op type: share of the nodes' time, node count, weight MB read (constant inputs of the nodes, but for
  a Gather's table, of which it reads a few rows);
* the top nodes by time, with the weights each reads;
* the run's time outside the nodes (``model_run`` minus the nodes' sum: feeding inputs, fetching outputs,
  scheduling), and the stepper's time around the session's run (binding, the cache's bookkeeping).

Shares are what to read: absolute times on a shared, noisy machine are not results. Node names and the
weights come from ONNX Runtime's optimized graph (saved with ``--keep``, beside the profile JSON).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.ernie_gen import InfillingStepper  # noqa: E402
from erniegen.onnx_runtime import OnnxInfillingStep, session_options  # noqa: E402


def weight_bytes_by_node(optimized: Path) -> tuple[dict[str, tuple[str, int, list[str]]], int]:
    """Node name -> (op type, bytes of the constant inputs it reads, their names) in the optimized graph, and
    the graph's node count. A Gather reads only the rows it picks (the embeddings' look-ups): counted as 0."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(optimized)).graph
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in graph.initializer}
    nodes = {}
    for node in graph.node:
        consts = [name for name in node.input if name in sizes]
        read = 0 if node.op_type == "Gather" else sum(sizes[name] for name in consts)
        nodes[node.name] = (node.op_type, read, consts)
    return nodes, len(graph.node)


def profiled_runs(events: list[dict], skip: int) -> tuple[list[dict], list[float]]:
    """The node events of every ``model_run`` after the first ``skip``, and those runs' durations (us)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"),
                  key=lambda e: e["ts"])[skip:]
    if not runs:
        raise SystemExit("no profiled runs: lower --warmup or raise --steps")
    start = runs[0]["ts"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
    return nodes, [r["dur"] for r in runs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--source-len", type=int, default=24, help="tokens of the source ([CLS] ... [SEP])")
    p.add_argument("--steps", type=int, default=40, help="steps aggregated")
    p.add_argument("--warmup", type=int, default=20, help="steps run first and left out")
    p.add_argument("--top", type=int, default=15, help="nodes listed")
    p.add_argument("--keep", help="folder to keep the profile JSON and the optimized graph in (default: dropped)")
    args = p.parse_args()

    model = load(args.model, precision="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        options = session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(out / "step")
        options.optimized_model_filepath = str(out / "step_optimized.onnx")
        model.step_runner = step = OnnxInfillingStep(model, options)
        nodes, node_count = weight_bytes_by_node(out / "step_optimized.onnx")

        source = [model.tokenizer.cls_token_id] + list(range(2000, 2000 + args.source_len - 2)) + \
            [model.tokenizer.sep_token_id]
        calls = []
        session_run = step.session.run_with_iobinding

        def timed_run(binding):
            t0 = time.perf_counter()
            session_run(binding)
            calls.append((time.perf_counter() - t0) * 1e6)

        step.session.run_with_iobinding = timed_run
        steps_us = []
        with torch.inference_mode():
            stepper = InfillingStepper(model, torch.tensor([source]), torch.tensor([len(source)]),
                                       args.warmup + args.steps + 2)
            prev = None
            for _ in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                logp = stepper.step(prev)
                steps_us.append((time.perf_counter() - t0) * 1e6)
                prev = logp.argmax(-1)
        events = json.loads(Path(step.session.end_profiling()).read_text())

    node_events, run_us = profiled_runs(events, args.warmup)
    by_node: dict[str, list[float]] = defaultdict(list)
    for e in node_events:
        by_node[e["name"].removesuffix("_kernel_time")].append(e["dur"])
    per_step = {name: sum(d) / len(run_us) for name, d in by_node.items()}
    total_nodes = sum(per_step.values())
    run = statistics.median(run_us)
    call = statistics.median(calls[args.warmup:])
    whole = statistics.median(steps_us[args.warmup:])

    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for name, us in per_step.items():
        op, n_bytes, _ = nodes.get(name, ("?", 0, []))
        by_op[op][0] += us
        by_op[op][1] += 1
        by_op[op][2] += n_bytes
    weights = sum(n for _, n, _ in nodes.values())
    print(f"{args.model}: source {len(source)} tokens, {args.steps} steps profiled after {args.warmup}; optimized "
          f"graph {node_count} nodes, {len(per_step)} of them run; weights read {weights / 1e6:.1f} MB")
    print(f"a step (median): stepper.step {whole:.0f} us = the session's run {call:.0f} us ({call / whole:.0%}) + "
          f"the rest; ORT model_run {run:.0f} us, its nodes {total_nodes:.0f} us ({total_nodes / run:.0%})")
    print("\n| op type | share of node time | nodes | weight MB | us/step |")
    print("|---|---:|---:|---:|---:|")
    for op, (us, count, n_bytes) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
        print(f"| {op} | {us / total_nodes:.1%} | {count} | {n_bytes / 1e6:.1f} | {us:.0f} |")
    print("\n| top node | op | share | us/step | weight MB | weights |")
    print("|---|---|---:|---:|---:|---|")
    for name, us in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        op, n_bytes, consts = nodes.get(name, ("?", 0, []))
        print(f"| {name} | {op} | {us / total_nodes:.1%} | {us:.0f} | {n_bytes / 1e6:.1f} | {', '.join(consts)} |")


if __name__ == "__main__":
    main()
