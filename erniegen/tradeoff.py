"""What each decoding choice costs: quality on a labelled set beside latency and throughput, in one process.

Users pick a model, a decoder, its options and a precision for production by trading quality against time;
``erniegen tradeoff`` measures every choice they name the same way on the same rows (the full set decoded
at the choice's batch size and scored with the model's task metric, then batch-1 latency over the first
rows after a warm-up) and marks the choices no other beats on both axes: the Pareto front.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .bench import bench_decoder, write_results

# the headline number of each task metric (erniegen.data.TaskPreset.metric): what the front is drawn on
PRIMARY_METRIC = {"qg": "bleu4", "rouge": "rougeL"}


@dataclass(frozen=True)
class Choice:
    """One way to decode: a label, a model folder, and the decoding flags of ``erniegen generate``."""

    label: str
    model: str
    flags: tuple[str, ...] = ()
    decoder: str | None = None
    precision: str = "fp32"
    runtime: str = "torch"
    batch_size: int = 32
    options: dict = field(default_factory=dict, compare=False, hash=False)


class _ChoiceParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit the process; a bad --choice is the caller's error
        raise ValueError(message)


def parse_choice(text: str, add_decoding: Callable[[argparse.ArgumentParser], None],
                 check: Callable[[argparse.Namespace], dict]) -> Choice:
    """``LABEL=MODEL [decoding flags]``, the flags parsed and checked exactly as ``erniegen generate``'s
    (``add_decoding`` adds them; ``check`` validates the namespace and returns the decoding options)."""
    label, sep, rest = text.partition("=")
    words = shlex.split(rest) if sep else []
    if not label.strip() or not words or words[0].startswith("-"):
        raise ValueError(f"--choice {text!r}: expected 'LABEL=MODEL [decoding flags]', e.g. "
                         "'beam 5 int8=runs/qg/best --num-beams 5 --precision int8'")
    parser = _ChoiceParser(prog="--choice", add_help=False)
    add_decoding(parser)
    try:
        ns = parser.parse_args(words[1:])
        options = check(ns)
    except ValueError as e:
        raise ValueError(f"--choice {label.strip()!r}: {e}") from None
    return Choice(label.strip(), words[0], tuple(words[1:]), ns.decoder, ns.precision, ns.runtime, ns.batch_size,
                  options)


def pareto_front(points: Sequence[tuple[float, float]], lower_x_is_better: bool = True) -> list[bool]:
    """For each (x, quality) point: True unless another is at least as good on both and better on one."""
    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        ax, bx = (a[0], b[0]) if lower_x_is_better else (-a[0], -b[0])
        return ax <= bx and a[1] >= b[1] and (ax < bx or a[1] > b[1])
    return [not any(beats(q, p) for q in points) for p in points]  # no point beats itself: that needs a strict win


def file_name(label: str) -> str:
    """A choice's predictions file: its label with anything but letters, digits, ``.``, ``_``, ``-`` as ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") + ".jsonl"


@torch.inference_mode()
def measure(model, choice: Choice, sources: Sequence[str], references: Sequence[str], metric: str,
            latency_samples: int, warmup: int = 2) -> tuple[dict, list[str]]:
    """Quality and throughput from decoding every row at the choice's batch size (after one batch of
    warm-up), then median / p90 latency at batch 1 over the first ``latency_samples`` rows; and the
    predictions."""
    from .decoding import encode_sources, generate_ids, ids_to_text
    from .metrics import compute_metrics
    from .registry import default_decoder
    from .search import options_from_settings
    decoder = choice.decoder or default_decoder(model.settings.method)
    opts = options_from_settings(model, **choice.options)
    ids = encode_sources(model, sources)
    generate_ids(model, ids[:choice.batch_size], decoder, choice.batch_size, opts)
    t0 = time.perf_counter()
    out = generate_ids(model, ids, decoder, choice.batch_size, opts, progress=True)
    seconds = time.perf_counter() - t0
    predictions = ids_to_text(model, out)
    scores = compute_metrics(metric, predictions, references, sources)
    latency = bench_decoder(model, ids[:warmup + latency_samples], decoder, opts, batch_size=1, warmup=warmup)
    return {"label": choice.label, "model": choice.model, "flags": shlex.join(choice.flags), "decoder": decoder,
            "num_beams": opts.num_beams, "precision": choice.precision, "runtime": choice.runtime,
            "n": len(sources), "scores": scores,
            "mean_output_words": sum(len(p.split()) for p in predictions) / max(1, len(predictions)),
            "batch_size": choice.batch_size, "samples_per_s": len(sources) / seconds,
            "b1_median_ms": latency["median_ms_per_sample"], "b1_p90_ms": latency["p90_ms_per_sample"],
            "b1_samples": latency["num_samples"]}, predictions


def task_metric(choices: Sequence[Choice]) -> str:
    """The metric every choice's model is scored with, read before any weights load: a missing model folder
    or models of different tasks stop the run before its first measurement, not in the middle."""
    from .data import get_task
    from .network import read_settings
    metrics = {c.label: (get_task(s.task).metric, s.task) for c in choices for s in [read_settings(c.model)]}
    if len({m for m, _ in metrics.values()}) > 1:
        raise ValueError("the choices' models are scored with different metrics: " + ", ".join(
            f"{label!r} ({task}: {m})" for label, (m, task) in metrics.items()) + "; compare models of one task")
    return next(iter(metrics.values()))[0]


def mark_fronts(rows: list[dict], primary: str) -> None:
    """Each row's place on the two fronts: quality against batch-1 latency, and against throughput."""
    quality = [r["scores"][primary] for r in rows]
    for key, x, lower in (("front_latency", "b1_median_ms", True), ("front_throughput", "samples_per_s", False)):
        for row, on in zip(rows, pareto_front([(r[x], q) for r, q in zip(rows, quality)], lower)):
            row[key] = on


def markdown_table(rows: list[dict], primary: str) -> str:
    """The rows as a Markdown table, best quality first; ◆ marks a choice on a front."""
    others = [k for k in ("bleu4", "meteor", "rouge1", "rouge2", "rougeL") if k != primary
              and all(k in r["scores"] for r in rows)]
    head = ["choice", primary, *others, "ms/sample, batch 1 (median)", "p90", "samples/s at its batch", "batch"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    def mark(on: bool | None) -> str:
        return " ◆" if on else ""
    for r in sorted(rows, key=lambda r: -r["scores"][primary]):
        lines.append("| " + " | ".join([
            r["label"], f"{r['scores'][primary]:.2f}", *(f"{r['scores'][k]:.2f}" for k in others),
            f"{r['b1_median_ms']:.1f}{mark(r.get('front_latency'))}", f"{r['b1_p90_ms']:.1f}",
            f"{r['samples_per_s']:.1f}{mark(r.get('front_throughput'))}", str(r["batch_size"])]) + " |")
    return "\n".join(lines)


def run_tradeoff(choices: Sequence[Choice], input_path: str, output: str, plot: str | None = None,
                 latency_samples: int = 20, limit: int | None = None, source_field: str = "source",
                 target_field: str = "target", predictions_dir: str | None = None) -> list[dict]:
    """Measure every choice on the rows of ``input_path``; write the JSON (after each choice, so a stopped
    run keeps what it measured), each choice's predictions into ``predictions_dir`` (input rows with a
    ``prediction`` field, named by :func:`file_name`), the plot, and print the table."""
    from . import load
    from .data import read_examples
    from .outputs import ensure_writable_dir, write_predictions
    from .plots import plot_tradeoff
    labels = [c.label for c in choices]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--choice labels must differ, got {labels}")
    if predictions_dir is not None:
        names = [file_name(label) for label in labels]
        if len(set(names)) != len(names) or ".jsonl" in names:
            raise ValueError(f"--predictions: the labels {labels} give the file names {names}; make them differ "
                             "in letters or digits")
        ensure_writable_dir(predictions_dir, "--predictions folder")
    examples = read_examples(input_path, source_field, target_field)
    examples = examples[:limit] if limit else examples
    sources, references = [e.source for e in examples], [e.target for e in examples]
    metric = task_metric(choices)
    rows = []
    for i, choice in enumerate(choices):
        print(f"[{i + 1}/{len(choices)}] {choice.label}: {choice.model} {shlex.join(choice.flags)}", file=sys.stderr)
        torch.manual_seed(0)
        model = load(choice.model, precision=choice.precision, runtime=choice.runtime)
        row, predictions = measure(model, choice, sources, references, metric, latency_samples)
        rows.append(row)
        del model
        if predictions_dir is not None:
            write_predictions(str(Path(predictions_dir) / file_name(choice.label)), "jsonl",
                              [e.row | {"prediction": p} for e, p in zip(examples, predictions)])
        mark_fronts(rows, PRIMARY_METRIC[metric])
        write_results(output, rows, input=input_path, metric=metric, primary=PRIMARY_METRIC[metric],
                      threads=torch.get_num_threads(), latency_samples=latency_samples)
    if plot:
        plot_tradeoff(rows, PRIMARY_METRIC[metric], plot)
    print(markdown_table(rows, PRIMARY_METRIC[metric]))
    return rows
