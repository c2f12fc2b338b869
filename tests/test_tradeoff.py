"""`erniegen tradeoff`: the front against points worked by hand, each choice's flags checked as `generate`
checks them, and the scores it reports equal to `generate` then `evaluate` on the same rows."""
import json
import shutil

import pytest

from erniegen.cli import _add_decoding, _choice_options
from erniegen.tradeoff import file_name, mark_fronts, markdown_table, pareto_front, parse_choice
from test_cli import run, tiny_minilm_dir  # noqa: F401  (a module fixture)


def test_file_names():
    assert file_name("beam 5 int8") == "beam-5-int8.jsonl" and file_name("NAT/KD: δ=0") == "NAT-KD-0.jsonl"


def test_pareto_front_by_hand():
    points = [(10, 5), (20, 7), (15, 4), (30, 7), (5, 1), (10, 5)]
    # lower x is better (latency): (15, 4) loses to (10, 5), (30, 7) to (20, 7); the two equal points both stay
    assert pareto_front(points) == [True, True, False, False, True, True]
    # higher x is better (throughput): (30, 7) is as good as any on quality and the fastest
    assert pareto_front(points, lower_x_is_better=False) == [False, False, False, True, False, False]


def test_fronts_and_table_mark_the_same_choices():
    rows = [{"label": "beam", "scores": {"bleu4": 9.0}, "b1_median_ms": 150.0, "b1_p90_ms": 160.0,
             "samples_per_s": 15.0, "batch_size": 32},
            {"label": "greedy", "scores": {"bleu4": 8.0}, "b1_median_ms": 110.0, "b1_p90_ms": 120.0,
             "samples_per_s": 55.0, "batch_size": 32},
            {"label": "slow greedy", "scores": {"bleu4": 8.0}, "b1_median_ms": 120.0, "b1_p90_ms": 130.0,
             "samples_per_s": 50.0, "batch_size": 32}]
    mark_fronts(rows, "bleu4")
    assert [r["front_latency"] for r in rows] == [True, True, False]
    assert [r["front_throughput"] for r in rows] == [True, True, False]
    table = markdown_table(rows, "bleu4").splitlines()
    assert table[2] == "| beam | 9.00 | 150.0 ◆ | 160.0 | 15.0 ◆ | 32 |"  # best quality first
    assert table[4] == "| slow greedy | 8.00 | 120.0 | 130.0 | 50.0 | 32 |"


def parse(text):
    return parse_choice(text, _add_decoding, _choice_options)


def test_a_choice_takes_generates_flags_and_their_checks():
    c = parse("beam 2 int8=runs/qg/best --num-beams 2 --precision int8 --batch-size 8")
    assert (c.label, c.model, c.precision, c.runtime, c.batch_size) == ("beam 2 int8", "runs/qg/best", "int8",
                                                                        "torch", 8)
    assert c.options == {"num_beams": 2} and c.decoder is None
    assert parse("NAR=runs/nat/best --decoder mask-predict --iterations 3").options == {"iterations": 3}
    for text, message in [("runs/qg/best", "expected 'LABEL=MODEL"), ("x=--num-beams 2", "expected 'LABEL=MODEL"),
                          ("x=m --num-beams 0", "--choice 'x': --num-beams must be >= 1, got 0"),
                          ("x=m --bogus 1", "--choice 'x': unrecognized arguments: --bogus 1"),
                          ("x=m --decoder nope", "--choice 'x': argument --decoder: invalid choice"),
                          ("x=m --runtime onnx --precision int8", "runtime 'onnx' runs fp32 weights only")]:
        with pytest.raises(ValueError) as e:
            parse(text)
        assert message in str(e.value), (text, str(e.value))


def squad_qg_copy(model, to):
    """The tiny model, saved as one trained for squad_qg (scored with BLEU-4 / METEOR / ROUGE-L)."""
    shutil.copytree(model, to)
    settings = json.loads((to / "erniegen_config.json").read_text())
    (to / "erniegen_config.json").write_text(json.dumps(settings | {"task": "squad_qg"}))
    return to


def test_tradeoff_reports_what_generate_and_evaluate_report(tmp_path, tiny_minilm_dir):  # noqa: F811
    model = squad_qg_copy(tiny_minilm_dir, tmp_path / "qg-model")
    rows = [{"source": f"the {w} sat on the mat number {i} [SEP] {w}", "target": f"what sat on mat {i}?"}
            for i, w in enumerate(["cat", "dog", "cow", "hen", "fox", "owl"])]
    inp = tmp_path / "dev.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = {"greedy": ["--num-beams", "1", "--max-length", "6", "--batch-size", "3"],
             "beam 2": ["--num-beams", "2", "--max-length", "6", "--batch-size", "2"]}
    out, plot = tmp_path / "tradeoff.json", tmp_path / "tradeoff.png"
    p = run("tradeoff", "--input", str(inp), "--output", str(out), "--plot", str(plot), "--latency-samples", "2",
            "--predictions", str(tmp_path / "preds"),
            *(a for label, f in flags.items() for a in ("--choice", f"{label}={model} {' '.join(f)}")))
    result = json.loads(out.read_text())
    assert result["meta"]["primary"] == "bleu4" and result["meta"]["cpu"]
    got = {r["label"]: r for r in result["rows"]}
    for label, f in flags.items():
        pred = tmp_path / f"{label}.jsonl"
        run("generate", "--model", str(model), "--input", str(inp), "--output", str(pred), *f)
        want = json.loads(run("evaluate", "--task", "squad_qg", "--predictions", str(pred)).stdout)
        row = got[label]
        kept = [json.loads(x) for x in (tmp_path / "preds" / file_name(label)).read_text().splitlines()]
        assert kept == [json.loads(x) for x in pred.read_text().splitlines()]
        assert {k: row["scores"][k] for k in ("bleu4", "meteor", "rougeL")} == \
            {k: want[k] for k in ("bleu4", "meteor", "rougeL")}
        assert row["n"] == 6 and row["b1_samples"] == 2 and row["samples_per_s"] > 0 and row["b1_median_ms"] > 0
        assert label in p.stdout
    fronts = pareto_front([(r["b1_median_ms"], r["scores"]["bleu4"]) for r in result["rows"]])
    assert [r["front_latency"] for r in result["rows"]] == fronts
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_tradeoff_refuses_before_measuring(tmp_path, tiny_minilm_dir):  # noqa: F811
    qg_model = squad_qg_copy(tiny_minilm_dir, tmp_path / "qg-model")
    inp = tmp_path / "dev.jsonl"
    inp.write_text(json.dumps({"source": "a b c", "target": "d"}) + "\n")
    out = tmp_path / "t.json"
    base = ["tradeoff", "--input", str(inp), "--output", str(out)]
    cases = [(["--choice", f"a={tiny_minilm_dir}", "--choice", f"a={tiny_minilm_dir} --num-beams 2"],
              "--choice labels must differ"),
             (["--choice", f"a={tiny_minilm_dir}", "--plot", str(tmp_path / "t.xyz")], "not 'xyz'"),
             (["--choice", f"a={tiny_minilm_dir} --max-length 0"], "--max-length must be >= 1"),
             (["--choice", f"a b={tiny_minilm_dir}", "--choice", f"a/b={tiny_minilm_dir}", "--predictions",
               str(tmp_path / "p")], "give the file names ['a-b.jsonl', 'a-b.jsonl']"),
             (["--choice", f"a={tiny_minilm_dir}", "--choice", f"b={tmp_path / 'absent'}"], "absent"),
             (["--choice", f"a={tiny_minilm_dir}", "--choice", f"qg={qg_model}"],
              "'a' (default: rouge), 'qg' (squad_qg: qg); compare models of one task")]
    for extra, message in cases:
        p = run(*base, *extra, check=False)
        assert p.returncode == 2 and message in p.stderr, p.stderr
        assert not out.exists()
