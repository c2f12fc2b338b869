"""Training curves from runs' ``log.jsonl``: compare runs at a glance instead of reading numbers.

``erniegen plot RUN [RUN ...] --output curves.png`` draws each run's training losses (``loss`` and its
named parts, e.g. ``loss_word`` / ``loss_span``) and its clean dev loss (``dev_loss``, dots) against the
optimizer step, and its other dev evaluations in a second panel when the runs have any. ``--series`` keeps
only the named curves: runs of a multi-loss method compared on every curve are unreadable.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .data import DataError

LOG_FILE = "log.jsonl"
LINE_STYLES = ("-", "--", ":", "-.")        # one colour per run, one line style per loss or metric
Series = dict[str, tuple[list[int], list[float]]]
RAW = " (raw weights)"                      # suffix of a moving-average run's raw-weight evaluations
LEGEND_DROP_PT = 40                         # a legend beneath a panel starts this far below its axis


def read_log(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(training events, evaluation events) of a run folder, or of a log file given directly."""
    path = Path(run)
    if path.is_dir():
        path = path / LOG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training log (expected a run folder holding {LOG_FILE})")
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(str(path), f"not JSON ({e.msg})", line=n) from None
            if not isinstance(event, dict) or not isinstance(event.get("step"), int):
                raise DataError(str(path), "missing or not an integer", line=n, field="step")
            (evals if "eval" in event else train).append(event)
    return train, evals


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over up to ``window`` points; noisy small-batch losses read better."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def run_series(run: str | Path, window: int = 1) -> tuple[Series, Series]:
    """(loss series, eval-metric series) of one run, each name -> (steps, values)."""
    train, evals = read_log(run)
    losses: Series = {}
    for key in sorted({k for e in train for k in e if k == "loss" or k.startswith("loss_")}):
        points = [(e["step"], float(e[key])) for e in train if key in e]
        losses[key] = ([s for s, _ in points], smooth([v for _, v in points], window))
    metrics: Series = {}
    # "eval_raw": the raw weights' scores of a run that evaluates a moving average ("eval")
    for field, suffix in (("eval", ""), ("eval_raw", RAW)):
        for key in sorted({k for e in evals for k in e.get(field, {})}):
            points = [(e["step"], float(e[field][key])) for e in evals if key in e.get(field, {})]
            # the dev loss is drawn beside the training losses, on their scale
            (losses if key.startswith("dev_loss") else metrics)[key + suffix] = ([s for s, _ in points],
                                                                                [v for _, v in points])
    return losses, metrics


def _legend(ax) -> None:
    """Inside the panel for up to eight curves; beneath it, in two columns, for more (several runs), where
    it would otherwise cover the curves. Placed a fixed distance below the axis (clear of its tick labels
    and axis label), not a fraction of the panel's height, which shrinks as the legend grows."""
    if len(ax.get_legend_handles_labels()[1]) > 8:
        from matplotlib.transforms import offset_copy
        below = offset_copy(ax.transAxes, fig=ax.figure, y=-LEGEND_DROP_PT, units="points")
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below)
    else:
        ax.legend(fontsize=7)


def select_series(data: dict[str, tuple[Series, Series]], names: list[str]) -> dict[str, tuple[Series, Series]]:
    """Only the curves named (a name keeps its raw-weight twin too); a name no run logged is an error that
    lists what the runs have, so a typo does not draw an empty panel."""
    logged = {key.removesuffix(RAW) for losses, metrics in data.values() for key in (*losses, *metrics)}
    unknown = [n for n in names if n not in logged]
    if unknown:
        raise ValueError(f"--series {','.join(unknown)}: not logged by these runs; they log {','.join(sorted(logged))}")
    keep = set(names)
    return {label: tuple({k: v for k, v in series.items() if k.removesuffix(RAW) in keep} for series in pair)
            for label, pair in data.items()}


def plot_runs(runs: list[str], output: str, window: int = 1, labels: list[str] | None = None,
              series: list[str] | None = None) -> dict:
    """Draw the runs' curves into ``output`` (any format matplotlib knows, by its suffix); returns the data.
    ``series``: the curve names to draw (default: every one logged)."""
    plt = _pyplot()
    labels = labels or [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    data = {label: run_series(run, window) for label, run in zip(labels, runs)}
    if series:
        data = select_series(data, series)
    has_eval = any(metrics for _, metrics in data.values())
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(12 if has_eval else 7, 4.5), squeeze=False)
    loss_ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, (label, (losses, metrics)) in enumerate(data.items()):
        panels = [(loss_ax, losses, None)] + ([(axes[0][1], metrics, "o")] if has_eval else [])
        for ax, series, marker in panels:
            styles = {}
            for key, (steps, values) in series.items():
                base = key.removesuffix(RAW)  # a raw-weight curve: its average's line style, faded, crosses
                style = styles.setdefault(base, LINE_STYLES[len(styles) % len(LINE_STYLES)])
                raw = key != base
                ax.plot(steps, values, color=colors[r % len(colors)], linestyle=style, alpha=0.45 if raw else 1.0,
                        marker="x" if raw else "o" if key.startswith("dev_") else marker, label=f"{label} {key}")
    loss_ax.set(xlabel="optimizer step", ylabel="loss (dev_loss: evaluations)"
                + (f" (moving average of {window} logs)" if window > 1 else ""), title="training")
    _legend(loss_ax)
    loss_ax.grid(alpha=0.3)
    if has_eval:
        axes[0][1].set(xlabel="optimizer step", ylabel="dev metric", title="evaluation")
        _legend(axes[0][1])
        axes[0][1].grid(alpha=0.3)
    _save(fig, plt, output)
    return data


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("erniegen's plots need matplotlib: pip install 'erniegen[plot]'") from None
    return plt


def check_image_path(output: str, option: str = "--plot") -> None:
    """Before a long measurement: matplotlib is there and writes ``output``'s format (not at the end)."""
    plt = _pyplot()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    suffix = Path(output).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ValueError(f"{option} {output}: matplotlib writes {', '.join(sorted(formats))}, not {suffix or 'no suffix'!r}")


def _save(fig, plt, output: str) -> None:
    """Write the figure under a temporary name, then rename: a reader never sees half a file."""
    fig.tight_layout()
    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")  # legends placed beneath a panel included
    plt.close(fig)
    os.replace(tmp, out)


def plot_exit_shares(rows: list[dict], output: str) -> None:
    """ELMER's Figure 2: for each threshold δ or exit-gate level, the share of output slots exiting at each
    layer, one bar group per layer; ``rows`` hold ``threshold`` or ``gate``, ``shares`` (layer 1..L) and
    optionally ``bleu4``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        layers = range(1, len(row["shares"]) + 1)
        rule = f"gate ≥ {row['gate']:g}" if "gate" in row else f"δ = {row['threshold']:g}"
        label = rule + (f" (BLEU-4 {row['bleu4']:.2f})" if "bleu4" in row else "")
        ax.bar([x + (i - (len(rows) - 1) / 2) * width for x in layers], [100 * v for v in row["shares"]],
               width, label=label)
    ax.set(xlabel="exit layer", ylabel="% of output slots", title="ELMER hard exit: where slots leave")
    ax.set_xticks(list(range(1, max(len(r["shares"]) for r in rows) + 1)))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, plt, output)


METRIC_NAMES = {"bleu4": "BLEU-4", "rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "meteor": "METEOR"}


def plot_tradeoff(rows: list[dict], primary: str, output: str) -> None:
    """``erniegen tradeoff``'s picture: quality against batch-1 latency (log scale) and against throughput.
    One colour a choice, one marker shape a model, named in one legend beneath (labels written beside the
    points overlap where choices cluster); the choices no other beats are ringed and joined as the front."""
    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colours = plt.get_cmap("tab20" if len(rows) > 10 else "tab10")
    models = list(dict.fromkeys(r.get("model", "") for r in rows))
    markers = "osD^vPX*<>"
    panels = ((axes[0], "b1_median_ms", "front_latency", "ms a sample at batch 1 (median, log scale)"),
              (axes[1], "samples_per_s", "front_throughput", "samples a second at the choice's batch size"))
    for ax, x, front, xlabel in panels:
        for i, r in enumerate(rows):
            on = r.get(front, False)
            ax.scatter(r[x], r["scores"][primary], color=colours(i % colours.N), zorder=3, s=60 if on else 36,
                       marker=markers[models.index(r.get("model", "")) % len(markers)],
                       edgecolors="black" if on else "none", linewidths=1.2, label=r["label"])
        on = sorted((r for r in rows if r.get(front)), key=lambda r: r[x])
        ax.plot([r[x] for r in on], [r["scores"][primary] for r in on], color="black", alpha=0.35, zorder=2,
                drawstyle="steps-post" if x == "b1_median_ms" else "steps-pre", label="_front")
        if x == "b1_median_ms":
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(METRIC_NAMES.get(primary, primary))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    fig.suptitle("What each decoding choice costs (ringed and joined: the front, where no other choice is both "
                 "better and faster)", fontsize=11)
    _save(fig, plt, output)
