from __future__ import annotations

import json
from pathlib import Path

import pytest

from erniegen.cli import main
from erniegen.data import DataError
from erniegen.plots import plot_runs, read_log, run_series, smooth


def write_log(run: Path, events: list[dict]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


PRETRAIN = [{"step": s, "loss": 10.0 - s, "loss_word": 9.0 - s, "loss_span": 11.0 - s, "lr": 1e-4,
             "tokens_per_s": 400.0} for s in (10, 20, 30)]
FINETUNE = [{"step": 1, "loss": 6.0}, {"step": 2, "loss": 4.0}, {"step": 2, "eval": {"bleu4": 0.1, "loss": 3.5}},
            {"step": 3, "loss": 5.0}, {"step": 4, "loss": 3.0}, {"step": 4, "eval": {"bleu4": 0.2, "loss": 3.0}}]


def test_smooth_is_a_trailing_moving_average():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([1.0, 3.0, 5.0, 7.0], 3) == [1.0, 2.0, 3.0, 5.0]
    assert smooth([4.0, 2.0], 1) == [4.0, 2.0]


def test_run_series_separates_losses_and_evaluations(tmp_path):
    run = write_log(tmp_path / "ft", FINETUNE)
    losses, metrics = run_series(run, window=2)
    assert losses == {"loss": ([1, 2, 3, 4], [6.0, 5.0, 4.5, 4.0])}
    assert metrics == {"bleu4": ([2, 4], [0.1, 0.2]), "loss": ([2, 4], [3.5, 3.0])}
    losses, metrics = run_series(write_log(tmp_path / "pt", PRETRAIN))
    assert losses == {"loss": ([10, 20, 30], [0.0, -10.0, -20.0]), "loss_span": ([10, 20, 30], [1.0, -9.0, -19.0]),
                      "loss_word": ([10, 20, 30], [-1.0, -11.0, -21.0])} and metrics == {}


def test_plot_writes_an_image_atomically_and_returns_its_data(tmp_path):
    runs = [str(write_log(tmp_path / "pt-span", PRETRAIN)), str(write_log(tmp_path / "qg", FINETUNE))]
    out = tmp_path / "curves.png"
    data = plot_runs(runs, str(out), labels=["a", "b"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "pt-span", "qg"]   # no temporary left
    assert data["b"][1]["bleu4"] == ([2, 4], [0.1, 0.2]) and set(data["a"][0]) == {"loss", "loss_span", "loss_word"}
    main(["plot", runs[0], "--output", str(tmp_path / "c.svg"), "--smooth", "2"])
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


def test_bad_logs_name_the_file_line_and_field(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n')
    with pytest.raises(DataError, match=r"bad/log.jsonl:2: field 'step' missing or not an integer"):
        read_log(run)
    (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss"\n')
    with pytest.raises(DataError, match=r"bad/log.jsonl:3: not JSON"):
        read_log(run)
    with pytest.raises(FileNotFoundError, match="no training log"):
        read_log(tmp_path / "missing")
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot_runs([str(write_log(tmp_path / "x", PRETRAIN))] * 2, str(tmp_path / "p.png"), labels=["x"])


def test_dev_loss_is_drawn_beside_the_training_losses(tmp_path):
    run = write_log(tmp_path / "ft", FINETUNE[:2] + [{"step": 2, "eval": {"bleu4": 0.1, "dev_loss": 4.5}}])
    losses, metrics = run_series(run)
    assert losses == {"loss": ([1, 2], [6.0, 4.0]), "dev_loss": ([2], [4.5])}
    assert metrics == {"bleu4": ([2], [0.1])}


def test_a_moving_average_run_draws_its_raw_weights_beside_it(tmp_path):
    events = [{"step": 1, "loss": 6.0},
              {"step": 1, "eval_raw": {"bleu4": 1.0, "dev_loss": 5.0}, "eval": {"bleu4": 2.0, "dev_loss": 4.5}}]
    losses, metrics = run_series(write_log(tmp_path / "ema", events))
    assert losses == {"loss": ([1], [6.0]), "dev_loss": ([1], [4.5]), "dev_loss (raw weights)": ([1], [5.0])}
    assert metrics == {"bleu4": ([1], [2.0]), "bleu4 (raw weights)": ([1], [1.0])}


def test_exit_share_plot_draws_one_bar_per_layer_and_threshold_or_gate_level(tmp_path, monkeypatch):
    import matplotlib.axes

    from erniegen.plots import plot_exit_shares
    bars = []
    real = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda ax, x, h, *a, **k: bars.append((list(x), list(h), k))
                        or real(ax, x, h, *a, **k))
    rows = [{"threshold": 0.25, "shares": [0.5, 0.25, 0.25], "bleu4": 3.0},
            {"gate": 0.9, "shares": [0.75, 0.25, 0.0]}]
    plot_exit_shares(rows, str(tmp_path / "exits.png"))
    assert (tmp_path / "exits.png").stat().st_size > 0 and not list(tmp_path.glob(".*tmp*"))
    assert [h for _, h, _ in bars] == [[50.0, 25.0, 25.0], [75.0, 25.0, 0.0]]  # percent of output slots
    assert bars[0][0] == pytest.approx([0.8, 1.8, 2.8]) and bars[1][0] == pytest.approx([1.2, 2.2, 3.2])
    assert [k["label"] for _, _, k in bars] == ["δ = 0.25 (BLEU-4 3.00)", "gate ≥ 0.9"]


def test_series_keeps_only_the_named_curves_and_rejects_unlogged_names(tmp_path):
    events = [{"step": 1, "loss": 6.0, "loss_nat": 3.0, "loss_length": 2.0},
              {"step": 1, "eval_raw": {"bleu4": 1.0, "dev_loss": 5.0}, "eval": {"bleu4": 2.0, "dev_loss": 4.5,
                                                                               "rougeL": 30.0}}]
    runs = [str(write_log(tmp_path / "mist", events)), str(write_log(tmp_path / "pt", PRETRAIN))]
    data = plot_runs(runs, str(tmp_path / "p.png"), series=["loss", "bleu4"])
    assert data["mist"] == ({"loss": ([1], [6.0])}, {"bleu4": ([1], [2.0]), "bleu4 (raw weights)": ([1], [1.0])})
    assert data["pt"] == ({"loss": ([10, 20, 30], [0.0, -10.0, -20.0])}, {})
    with pytest.raises(ValueError, match=r"--series blue4: not logged by these runs; they log "
                                         r"bleu4,dev_loss,loss,loss_length,loss_nat,loss_span,loss_word,rougeL"):
        plot_runs(runs, str(tmp_path / "q.png"), series=["loss", "blue4"])
    assert not (tmp_path / "q.png").exists()
    main(["plot", runs[0], "--output", str(tmp_path / "c.png"), "--series", "dev_loss,rougeL"])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_long_legend_sits_below_the_axis_labels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    runs = [str(write_log(tmp_path / f"r{i}", PRETRAIN)) for i in range(4)]      # 12 curves: legend beneath
    figures = []
    real = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    plot_runs(runs, str(tmp_path / "p.png"))
    fig, axes = figures[0]
    canvas = FigureCanvasAgg(fig)              # the figure was closed once saved: draw it again as saved
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = axes[0][0].get_legend().get_window_extent(renderer)
    label = axes[0][0].xaxis.label.get_window_extent(renderer)
    assert legend.y1 <= label.y0             # the legend's top is below the x-axis label's bottom
