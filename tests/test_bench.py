"""Benchmark result files."""
import json

from erniegen.bench import write_results


def test_benchmark_results_carry_their_context_and_leave_no_temp_file(tmp_path):
    path = tmp_path / "out" / "speed.json"
    write_results(str(path), [{"label": "nar", "samples_per_s": 2.5}], threads=2)
    data = json.loads(path.read_text())
    assert data["rows"] == [{"label": "nar", "samples_per_s": 2.5}]
    assert data["meta"]["threads"] == 2 and {"date", "machine", "torch"} <= set(data["meta"])
    assert [p.name for p in path.parent.iterdir()] == ["speed.json"]


def test_interleaved_rounds_alternate_and_pair_each_round(tiny_model, monkeypatch):
    """Each round times both decoders back to back, the first of the pair alternating, and the ratio is ours
    over Hugging Face's of that round (so drift between rounds cancels within each)."""
    import statistics
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import inference_precision
    finally:
        sys.path.pop(0)
    calls, ms = [], iter([10.0, 40.0, 50.0, 20.0, 30.0, 60.0])
    monkeypatch.setattr(inference_precision, "bench_decoder",
                        lambda *a, **k: calls.append("ours") or {"median_ms_per_sample": next(ms)})
    monkeypatch.setattr(inference_precision, "bench_hf_baseline",
                        lambda *a, **k: calls.append("hf") or {"median_ms_per_sample": next(ms)})
    out = inference_precision.interleaved_ratio(tiny_model, None, [[5, 6]] * 4, length=3, rounds=3)
    assert calls == ["ours", "hf", "hf", "ours", "ours", "hf"]
    assert [r["ratio"] for r in out["rounds"]] == [0.25, 0.4, 0.5]
    assert (out["median_ratio"], out["min_ratio"], out["max_ratio"]) == (statistics.median([0.25, 0.4, 0.5]), 0.25, 0.5)
