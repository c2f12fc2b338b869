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
