"""End to end through the command line: fine-tune a tiny model on real squad_qg rows, generate,
evaluate, bench, reload; and every bad-input case stops with file, line and field."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_shared, save_tiny_minilm

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "erniegen.cli", *args], capture_output=True, text=True, env=ENV,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"erniegen {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def tiny_minilm_dir(tmp_path_factory):
    """A tiny random model with the real MiniLM tokenizer (30,522 wordpieces)."""
    return save_tiny_minilm(tmp_path_factory.mktemp("tiny-minilm"), 512)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_minilm_dir):
    data = needs_shared("squad_qg")
    out = tmp_path_factory.mktemp("ft") / "run"
    run("finetune", "--model", str(tiny_minilm_dir), "--train", str(data / "train.jsonl"), "--dev",
        str(data / "dev.jsonl"), "--task", "squad_qg", "--output", str(out), "--max-steps", "6", "--batch-size", "4",
        "--max-train-examples", "48", "--eval-samples", "6", "--eval-every", "3", "--max-source-len", "96",
        "--lr", "1e-3")
    return out


@pytest.mark.slow
def test_finetune_generate_evaluate_bench(finetuned, tmp_path):
    data = needs_shared("squad_qg")
    best = finetuned / "best"
    assert (best / "model.safetensors").exists() and (finetuned / "checkpoint-last").exists()
    # the best model carries the activation maxima that int8 smooths with, tied to its weights
    from erniegen.precision import read_calibration
    maxima = read_calibration(best)
    assert maxima is not None and "head.dense" in maxima and "layers.0.ffn_in" in maxima
    log = [json.loads(x) for x in (finetuned / "log.jsonl").read_text().splitlines()]
    assert any("eval" in x for x in log) and any("loss" in x for x in log)
    # the model keeps its task's decoding, which generate, serve and the API start from
    from erniegen.data import get_task
    saved, task = json.loads((best / "erniegen_config.json").read_text()), get_task("squad_qg")
    decoding = ("num_beams", "length_penalty", "no_repeat_ngram_size", "max_token_run", "block_repeated_words")
    assert {k: saved[k] for k in decoding} == {k: getattr(task, k) for k in decoding}
    assert saved["block_repeated_words"] is True
    rows = [json.loads(x) for x in (data / "dev.jsonl").read_text().splitlines()[:5]]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pred = tmp_path / "pred.jsonl"
    run("generate", "--model", str(best), "--input", str(inp), "--output", str(pred), "--num-beams", "2",
        "--max-length", "8", "--batch-size", "2")
    out = [json.loads(x) for x in pred.read_text().splitlines()]
    assert [o["id"] for o in out] == [r["id"] for r in rows]  # rows written back, in order
    assert all(isinstance(o["prediction"], str) for o in out)
    # several comma-separated inputs are decoded in turn into one output, and none of them may be the output
    parts = [tmp_path / "in-a.jsonl", tmp_path / "in-b.jsonl"]
    parts[0].write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    parts[1].write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    both = tmp_path / "pred-both.jsonl"
    run("generate", "--model", str(best), "--input", f"{parts[0]},{parts[1]}", "--output", str(both),
        "--num-beams", "2", "--max-length", "8", "--batch-size", "2")
    assert both.read_text() == pred.read_text()
    p = run("generate", "--model", str(best), "--input", f"{parts[0]},{parts[1]}", "--output", str(parts[1]),
            check=False)
    assert p.returncode == 2 and f"is the input file {parts[1]}" in p.stderr, p.stderr
    scores = json.loads(run("evaluate", "--task", "squad_qg", "--predictions", str(pred)).stdout)
    assert set(scores) >= {"bleu4", "meteor", "rougeL"} and scores["n"] == 5
    bench = json.loads(run("bench", "--model", str(best), "--input", str(inp), "--num-samples", "2",
                           "--batch-size", "1", "--fixed-length", "4").stdout)
    assert bench["num_samples"] == 2 and bench["median_ms_per_sample"] > 0 and bench["samples_per_s"] > 0

    # the Python API reloads the checkpoint and generates exactly what the CLI wrote
    import erniegen
    model = erniegen.load(str(best))
    again = model.generate([r["source"] for r in rows], num_beams=2, max_length=8)
    assert again == [o["prediction"] for o in out]


BAD = {
    "malformed.jsonl": ('{"source": "a", "target": "b"}\n{"source": "a", \n', "malformed.jsonl:2"),
    "missing.jsonl": ('{"source": "a", "target": "b"}\n{"source": "a"}\n', "missing.jsonl:2: field 'target'"),
    "empty.jsonl": ('{"source": "a", "target": "  "}\n',
                    "empty.jsonl:1: field 'target' is empty (--skip-empty-rows leaves such rows out)"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_training_input_stops_with_file_line_field(name, tmp_path, tiny_minilm_dir):
    text, expected = BAD[name]
    (tmp_path / name).write_text(text)
    p = run("finetune", "--model", str(tiny_minilm_dir), "--train", str(tmp_path / name), "--output",
            str(tmp_path / "out"), "--max-steps", "1", check=False)
    assert p.returncode == 2 and expected in p.stderr, p.stderr
    assert not (tmp_path / "out" / "best").exists()


def test_skip_empty_rows_trains_on_the_rest_and_names_what_it_left(tmp_path, tiny_minilm_dir):
    rows = [{"source": "the cat sat [SEP] cat", "target": "what sat?"}, {"source": "", "target": "orphan"},
            {"source": "paris is in france [SEP] paris", "target": "what city?"}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run("finetune", "--model", str(tiny_minilm_dir), "--train", str(train), "--output", str(tmp_path / "out"),
            "--max-steps", "1", "--skip-empty-rows")
    assert f"skipped 1 row(s) with an empty field ({train}:2: field 'source' is empty)" in p.stderr
    assert f"{train}: 2 examples" in p.stderr


def test_unreadable_input_and_missing_prediction_field(tmp_path, tiny_minilm_dir):
    p = run("generate", "--model", str(tiny_minilm_dir), "--input", str(tmp_path / "nope.jsonl"), "--output",
            str(tmp_path / "o.jsonl"), check=False)
    assert p.returncode == 2 and "nope.jsonl" in p.stderr
    assert not (tmp_path / "o.jsonl").exists()
    (tmp_path / "p.jsonl").write_text('{"source": "s", "target": "t"}\n')
    p = run("evaluate", "--predictions", str(tmp_path / "p.jsonl"), check=False)
    assert p.returncode == 2 and "p.jsonl:1: field 'prediction'" in p.stderr


def test_distill_writes_the_teachers_outputs_as_targets(tmp_path, tiny_minilm_dir):
    """`erniegen distill` = `generate`'s outputs as the targets, every other field and the order kept, the
    reference under 'reference'; an unlabelled row gets a target too, and a student trains on the file."""
    rows = [{"id": "a", "source": "the cat sat on the mat [SEP] cat", "target": "what sat on the mat?"},
            {"id": "b", "source": "paris is in france [SEP] paris", "target": "what city is in france?"},
            {"id": "c", "source": "water boils at 100 degrees [SEP] 100"}]
    inp = tmp_path / "train.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--model", str(tiny_minilm_dir), "--input", str(inp), "--max-length", "6", "--min-length", "3"]
    run("generate", *flags, "--output", str(tmp_path / "pred.jsonl"))
    run("distill", *flags, "--output", str(tmp_path / "kd.jsonl"))
    pred = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    kd = [json.loads(x) for x in (tmp_path / "kd.jsonl").read_text().splitlines()]
    assert [r["target"] for r in kd] == [p["prediction"] for p in pred] and all(r["target"].strip() for r in kd)
    assert [r.get("reference") for r in kd] == ["what sat on the mat?", "what city is in france?", None]
    assert [{k: v for k, v in r.items() if k not in ("target", "reference")} for r in kd] == \
        [{k: v for k, v in r.items() if k != "target"} for r in rows]
    # distilling a distilled file keeps the human reference
    run("distill", *flags[:3], str(tmp_path / "kd.jsonl"), *flags[4:], "--output", str(tmp_path / "kd2.jsonl"))
    again = [json.loads(x) for x in (tmp_path / "kd2.jsonl").read_text().splitlines()]
    assert [r.get("reference") for r in again] == [r.get("reference") for r in kd]
    # an output of nothing (the end token first) keeps the reference as the target; the note says how many
    p = run("distill", *flags[:4], "--max-length", "1", "--output", str(tmp_path / "blank.jsonl"))
    blank = [json.loads(x) for x in (tmp_path / "blank.jsonl").read_text().splitlines()]
    assert [r.get("target") for r in blank] == [r.get("target") for r in rows]
    assert "nothing for 3 rows" in p.stderr
    run("finetune", "--model", str(tiny_minilm_dir), "--train", str(tmp_path / "kd.jsonl"), "--output",
        str(tmp_path / "student"), "--max-steps", "1", "--batch-size", "3", "--head-warmup-steps", "0",
        "--adapt-steps", "0")
    assert (tmp_path / "student" / "best" / "model.safetensors").exists()


@pytest.mark.slow
def test_finetune_under_torchrun_with_two_processes(tmp_path, tiny_minilm_dir):
    """The real recipe under torchrun/gloo: two ranks, rank 0 writes, the result reloads."""
    data = needs_shared("squad_qg")
    out = tmp_path / "ddp"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "erniegen.cli", "finetune", "--model", str(tiny_minilm_dir), "--train",
                        str(data / "train.jsonl"), "--task", "squad_qg", "--output", str(out), "--max-steps", "3",
                        "--batch-size", "2", "--max-train-examples", "16", "--max-source-len", "64"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    state = torch.load(out / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 3
    assert sorted(x.name for x in (out / "checkpoint-last").glob("rng_state_*.pt")) == ["rng_state_0.pt",
                                                                                        "rng_state_1.pt"]
    import erniegen
    assert isinstance(erniegen.load(str(out / "best")).generate(["a passage [SEP] an answer"], max_length=4)[0], str)


def import_campaign():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import campaign
    finally:
        sys.path.pop(0)
    return campaign


def test_every_campaign_run_is_a_valid_command():
    """benchmarks/campaign.txt spends whole sessions: a line erniegen would refuse must fail here, not there."""
    from erniegen import registry
    from erniegen.cli import build_parser, check_options, method_options_of
    campaign = import_campaign()
    entries = campaign.read_queue(ROOT / "benchmarks" / "campaign.txt")
    assert len({e.name for e in entries}) == len(entries) > 0
    parser = build_parser()
    for e in entries:
        flags = campaign.flags_of(e, Path("runs"), Path("data"))
        if e.command == "decode":  # scores RUN's best model on RUN's dev file with these generate flags
            args = parser.parse_args(["generate", "--model", f"runs/{flags[0]}/best", "--input", "dev.jsonl",
                                      "--output", f"results/{e.name}.jsonl", *flags[1:]])
            check_options(args)
            assert args.decoder is None or args.decoder in registry.DECODERS  # None: the model's default
            continue
        if e.command == "distill":  # RUN's best model writes RUN's training targets
            args = parser.parse_args(["distill", "--model", f"runs/{flags[0]}/best", "--input", "train.jsonl",
                                      "--output", f"runs/{e.name}/distilled.jsonl", *flags[1:]])
            check_options(args)
            continue
        args = parser.parse_args([e.command, *flags, "--output", f"runs/{e.name}"])
        check_options(args)
        if e.command == "finetune":
            registry.check_options(args.method, method_options_of(args))
            assert campaign.dev_file(flags).endswith("dev.jsonl")


def test_method_option_overrides_the_config(tmp_path):
    """--method-option KEY=VALUE reads VALUE as YAML and wins over --config's method_options."""
    from erniegen.cli import build_parser, method_options_of
    config = tmp_path / "c.yaml"
    config.write_text("method_options:\n  mixing: dynamic\n  mask_mode: all\n")
    args = build_parser().parse_args(["finetune", "--model", "m", "--train", "t.jsonl", "--output", "o",
                                      "--method", "mist", "--config", str(config), "--method-option", "mixing=static",
                                      "--method-option", "pseudo_from=runs/qg-nat/best", "--method-option", "x=0.5"])
    assert method_options_of(args) == {"mixing": "static", "mask_mode": "all", "pseudo_from": "runs/qg-nat/best",
                                       "x": 0.5}
    p = run("finetune", "--model", "m", "--train", "t.jsonl", "--output", str(tmp_path / "o"), "--method-option",
            "mixing", check=False)
    assert p.returncode == 2 and "--method-option: expected KEY=VALUE, got 'mixing'" in p.stderr, p.stderr


def test_campaign_queue_errors_name_the_line(tmp_path):
    campaign = import_campaign()
    queue = tmp_path / "q.txt"
    queue.write_text("a finetune --seed 1\nb decode c --decoder nar\n")
    with pytest.raises(SystemExit, match=r"q.txt:2: b decodes with 'c', which no earlier finetune line trains"):
        campaign.read_queue(queue)
    queue.write_text("a finetune --seed 1\nb distill c\n")
    with pytest.raises(SystemExit, match=r"q.txt:2: b distills with 'c', which no earlier finetune line trains"):
        campaign.read_queue(queue)
    for line in ("b decode", "b distill"):
        queue.write_text(f"a finetune --seed 1\n{line}\n")
        with pytest.raises(SystemExit, match=r"q.txt:2: expected"):
            campaign.read_queue(queue)
    queue.write_text("a finetune --seed 1\nb decode a --decoder nar\n")
    e = campaign.read_queue(queue)[1]
    assert (e.command, e.flags, campaign.label(e)) == ("decode", ["a", "--decoder", "nar"], "b: a/best, --decoder nar")


def test_campaign_expects_a_run_to_take_as_long_as_its_scored_twin():
    """The same flags but the seed first, else the same method (the longest), else unknown."""
    campaign = import_campaign()
    rows = {"a": {"command": "finetune", "flags": "--method mist --seed 42", "train_minutes": 101.0},
            "b": {"command": "finetune", "flags": "--method nat --seed 42", "train_minutes": 64.0},
            "c": {"command": "finetune", "flags": "--method nat --noise-rate 0", "train_minutes": 70.0},
            "d": {"command": "decode", "flags": "a --decoder nar"},
            "e": {"command": "finetune", "flags": "--seed 1"}}  # scored before rows carried minutes
    entry = lambda flags: campaign.Entry("x", "finetune", flags.split(), 1)  # noqa: E731
    assert campaign.expected_minutes(entry("--method nat --seed 1"), rows) == 64.0
    assert campaign.expected_minutes(entry("--seed 7 --method nat --noise-rate 0"), rows) == 70.0
    assert campaign.expected_minutes(entry("--method nat --epochs 3"), rows) == 70.0
    assert campaign.expected_minutes(entry("--method mist --seed 1"), rows) == 101.0
    assert campaign.expected_minutes(entry("--seed 2"), rows) is None
    assert campaign.expected_minutes(campaign.Entry("p", "pretrain", ["--method", "nat"], 1), rows) is None
    assert campaign.without_seed(["--seed", "1", "--method", "nat"]) == ["--method", "nat"]
    # a run timed on this machine's kind of CPU wins over a longer one timed elsewhere
    rows["f"] = {"command": "finetune", "flags": "--method nat --seed 2", "train_minutes": 40.0, "cpu": "bf16 CPU"}
    assert campaign.expected_minutes(entry("--method nat --seed 1"), rows, "bf16 CPU") == 40.0
    assert campaign.expected_minutes(entry("--method nat --seed 1"), rows, "other CPU") == 64.0
    # a run timed only on another CPU is scaled by how much faster this one trained the methods timed on both
    rows = {"mist": {"command": "finetune", "flags": "--method mist", "train_minutes": 140.0, "cpu": "avx2"},
            "nat": {"command": "finetune", "flags": "--method nat --seed 1", "train_minutes": 60.0, "cpu": "avx2"},
            "nat2": {"command": "finetune", "flags": "--method nat --seed 2", "train_minutes": 70.0, "cpu": "avx2"},
            "nat-here": {"command": "finetune", "flags": "--method nat", "train_minutes": 39.0, "cpu": "bf16"},
            "eg": {"command": "finetune", "flags": "--seed 1", "train_minutes": 80.0, "cpu": "avx2"},
            "eg-here": {"command": "finetune", "flags": "--seed 2", "train_minutes": 40.0, "cpu": "bf16"}}
    assert campaign.speed_ratio(rows, "bf16", "avx2") == pytest.approx((39 / 65 + 40 / 80) / 2)
    assert campaign.speed_ratio(rows, "bf16", "unseen CPU") is None
    assert campaign.expected_minutes(entry("--method mist --seed 2"), rows, "bf16") == pytest.approx(140 * 0.55)
    assert campaign.expected_minutes(entry("--method mist --seed 2"), rows, "unseen CPU") == 140.0


def test_campaign_distills_a_trained_runs_training_file(tmp_path, tiny_minilm_dir):
    """A distill entry runs `erniegen distill` with RUN's best model over RUN's --train file, into
    RUNS/NAME/distilled.jsonl, marks NAME.done, and a later call skips it."""
    import shutil
    rows = [{"source": "the cat sat on the mat [SEP] cat", "target": "what sat?"},
            {"source": "paris is in france [SEP] paris", "target": "what city?"}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    shutil.copytree(tiny_minilm_dir, runs / "t" / "best")
    (runs / "t.done").write_text("{}")
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"name": "t", "label": "t default decoding", "bleu4": 0.0}) + "\n")
    queue = tmp_path / "q.txt"
    queue.write_text(f"t finetune --train {train}\nk distill t --max-length 4\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "campaign.py"), "--queue", str(queue), "--runs", str(runs),
           "--results", str(results), "--budget", "20:00", "--min-train", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    kd = [json.loads(x) for x in (runs / "k" / "distilled.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in kd] == ["what sat?", "what city?"] and (runs / "k.done").exists()
    p = subprocess.run(cmd + ["--status"], capture_output=True, text=True, env=ENV, timeout=600)
    assert "k                        distill   distilled" in p.stdout


def test_campaign_waits_for_the_runs_an_entry_reads(tmp_path):
    """A static MIST reads a NAT model and a decode entry its run's: neither starts before that run is trained
    in the same runs folder (run folders do not outlive a machine)."""
    campaign = import_campaign()
    queue = tmp_path / "q.txt"
    queue.write_text("nat finetune --method nat\n"
                     "static finetune --method mist --method-option pseudo_from={runs}/nat/best\n"
                     "plain finetune --seed 3\n"
                     "again decode nat --decoder nar\n"
                     "kd distill nat\n"
                     "student finetune --method nat --train {runs}/kd/distilled.jsonl\n")
    nat, static, plain, again, kd, student = campaign.read_queue(queue)
    assert [campaign.needs(e) for e in (nat, static, plain, again, kd, student)] == \
        [[], ["nat"], [], ["nat"], ["nat"], ["kd"]]
    runs = tmp_path / "runs"
    runs.mkdir()
    assert [campaign.waits_for(e, runs) for e in (static, again, kd)] == [["nat"]] * 3
    (runs / "nat.done").write_text("{}")
    assert [campaign.waits_for(e, runs) for e in (static, again, kd)] == [[]] * 3
    assert campaign.waits_for(student, runs) == ["kd"]


def test_evaluate_reads_a_local_summarization_file_under_the_xsum_preset(tmp_path, capsys):
    """xsum's fields are the Hub dataset's (document, summary); `generate` writes a local source/target file back
    as it read it, and `evaluate --task xsum` scores that file with ROUGE."""
    from erniegen.cli import main
    rows = [{"source": "the cat sat on the mat all day .", "target": "a cat sat on a mat .",
             "prediction": "a cat sat on a mat ."},
            {"source": "paris is the capital of france .", "target": "paris is in france .",
             "prediction": "france has a capital ."}]
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["evaluate", "--task", "xsum", "--predictions", str(pred)])
    scores = json.loads(capsys.readouterr().out)
    assert scores["task"] == "xsum" and scores["n"] == 2
    assert 50 < scores["rougeL"] < 100  # one exact summary, one partial
    # the model that wrote them names the task; without either, squad_qg's metric, and a note says so
    model = tmp_path / "xsum-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))  # evaluate reads no weights
    (model / "erniegen_config.json").write_text(json.dumps({"task": "xsum"}))
    main(["evaluate", "--model", str(model), "--predictions", str(pred)])
    assert json.loads(capsys.readouterr().out) == scores
    main(["evaluate", "--predictions", str(pred)])
    out, err = capsys.readouterr()
    assert json.loads(out)["task"] == "squad_qg" and "bleu4" in json.loads(out)
    assert "note: scored with the squad_qg preset's metric" in err


def test_generate_and_distill_read_the_fields_of_the_models_task(tmp_path, tiny_minilm_dir):
    """A model fine-tuned with --task xsum reads the Hub layout (document/summary) without field flags, and
    distill writes the teacher's output back under the target field each row has."""
    import shutil
    model = tmp_path / "xsum-model"
    shutil.copytree(tiny_minilm_dir, model)
    (model / "erniegen_config.json").write_text(json.dumps({"task": "xsum", "max_decode_len": 4}))
    hub, local = tmp_path / "hub.jsonl", tmp_path / "local.jsonl"
    hub.write_text(json.dumps({"id": "1", "document": "the cat sat on the mat .", "summary": "a cat sat ."}) + "\n")
    local.write_text(json.dumps({"source": "paris is in france .", "target": "paris ."}) + "\n")
    flags = ["--model", str(model), "--min-length", "2"]
    run("generate", *flags, "--input", str(hub), "--output", str(tmp_path / "pred.jsonl"))
    pred = json.loads((tmp_path / "pred.jsonl").read_text())
    assert pred["document"] == "the cat sat on the mat ." and pred["prediction"].strip()
    run("distill", *flags, "--input", str(hub), "--output", str(tmp_path / "kd-hub.jsonl"))
    run("distill", *flags, "--input", str(local), "--output", str(tmp_path / "kd-local.jsonl"))
    kd_hub = json.loads((tmp_path / "kd-hub.jsonl").read_text())
    kd_local = json.loads((tmp_path / "kd-local.jsonl").read_text())
    assert kd_hub["summary"] == pred["prediction"] and kd_hub["reference"] == "a cat sat ." and "target" not in kd_hub
    assert kd_local["reference"] == "paris ." and kd_local["target"] != "paris ." and "summary" not in kd_local
    # the flags still win: a model of any task reads the fields it is told to
    p = run("generate", *flags, "--input", str(hub), "--output", str(tmp_path / "o.jsonl"), "--source-field",
            "id", check=False)
    assert p.returncode == 0 and json.loads((tmp_path / "o.jsonl").read_text())["id"] == "1"
    p = run("generate", *flags, "--input", str(hub), "--output", str(tmp_path / "o2.jsonl"), "--source-field",
            "text", check=False)
    assert p.returncode == 2 and "hub.jsonl:1: field 'text' is missing" in p.stderr


def test_campaign_resumes_a_run_stopped_in_its_preparation(tmp_path):
    """A run stopped before fine-tuning holds only preparation.pt: the campaign resumes it (erniegen would
    refuse to start over it), and says where it stopped."""
    campaign = import_campaign()
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    assert not campaign.resumable(run_dir)
    (run_dir / "preparation.pt").write_bytes(b"")
    assert campaign.resumable(run_dir) and campaign.stopped_at(run_dir) == "before fine-tuning (in its preparation)"
    (run_dir / "log.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    assert campaign.stopped_at(run_dir) == "at step 4"


STEPPED_CLOCK = """
import itertools, os, sys
import erniegen.train as t
from erniegen.cli import main
ticks = itertools.count(0, 1 + 2 * int(os.environ["RANK"]))  # rank 1's clock runs 3x: alone it would stop first
t._clock = lambda: float(next(ticks))
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_finetune_stopped_in_its_preparation_resumes_exactly(tmp_path, tiny_minilm_dir):
    """Under torchrun the ranks' clocks disagree, yet every rank stops the task adaptation after rank 0's step
    (a rank left behind would wait for the others forever); --resume then ends where an uninterrupted run ends."""
    rows = [{"source": f"word{i % 5} city river {i} [SEP] city", "target": f"what city {i % 3} ?"} for i in range(16)]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["finetune", "--model", str(tiny_minilm_dir), "--train", str(data), "--max-steps", "2", "--batch-size",
             "4", "--adapt-steps", "12", "--max-source-len", "32"]
    (tmp_path / "clock.py").write_text(STEPPED_CLOCK)

    def launch(*args, script=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *([str(script)] if script else ["-m", "erniegen.cli"]), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)

    whole = launch(*flags, "--output", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = launch(*flags, "--output", str(tmp_path / "cut"), "--max-time", "0:00:16", script=tmp_path / "clock.py")
    assert cut.returncode != 0 and "stopped by --max-time during the task adaptation" in cut.stderr, cut.stderr[-3000:]
    state = torch.load(tmp_path / "cut" / "preparation.pt", weights_only=True)
    assert 0 < state["step"] < 12 and not (tmp_path / "cut" / "checkpoint-last").exists()
    done = launch(*flags, "--output", str(tmp_path / "cut"), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming the preparation from {tmp_path / 'cut' / 'preparation.pt'}: task adaptation" in done.stderr
    assert not (tmp_path / "cut" / "preparation.pt").exists()
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / run / "best" / "model.safetensors") for run in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_against_a_baseline_prints_both_scores_and_refuses_other_rows(tmp_path, capsys):
    from erniegen.cli import main
    rows = [{"source": f"sentence {i} about the river [SEP] river", "target": "what is the river called ?",
             "prediction": "what is the river ?" if i % 2 else "what is the river called ?"} for i in range(12)]
    base = [r | {"prediction": "the the river"} for r in rows]
    pred, baseline = tmp_path / "pred.jsonl", tmp_path / "base.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    baseline.write_text("".join(json.dumps(r) + "\n" for r in base))
    main(["evaluate", "--task", "squad_qg", "--predictions", str(baseline)])
    alone = json.loads(capsys.readouterr().out)
    main(["evaluate", "--task", "squad_qg", "--predictions", str(pred), "--baseline", str(baseline),
          "--resamples", "300"])
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["baseline"] == {k: v for k, v in alone.items() if k not in ("task", "n")}
    boot = result["paired_bootstrap"]
    assert boot["resamples"] == 300 and boot["bleu4"]["delta"] == pytest.approx(result["bleu4"] - alone["bleu4"])
    assert boot["rougeL"]["low"] > 0 and boot["rougeL"]["not_better"] == 0.0
    assert "rougeL: " in err and "of 300 paired resamples" in err
    base[7]["target"] = "who is the king ?"
    baseline.write_text("".join(json.dumps(r) + "\n" for r in base))
    with pytest.raises(SystemExit):
        main(["evaluate", "--task", "squad_qg", "--predictions", str(pred), "--baseline", str(baseline)])
    assert f"{baseline}:8: field 'target' differs from {pred}:8's" in capsys.readouterr().err


def test_campaign_trains_a_scored_run_again_when_a_queued_run_reads_its_lost_model(tmp_path):
    """Run folders do not outlive a machine: a scored first stage is trained again for a second stage still queued,
    and left alone once the second stage is scored or the model is in the runs folder."""
    campaign = import_campaign()
    queue = tmp_path / "q.txt"
    queue.write_text("a finetune --seed 1\nb finetune --model {runs}/a/best\nc decode a --decoder nar\n"
                     "d finetune --seed 2\n")
    entries, runs = campaign.read_queue(queue), tmp_path / "runs"
    runs.mkdir()
    results = {"a": {}, "d": {}}
    assert campaign.to_retrain(entries, runs, results) == {"a"}
    assert campaign.to_retrain(entries, runs, {"a": {}, "b": {}}) == {"a"}  # c still decodes a's model
    assert campaign.to_retrain(entries, runs, {"a": {}, "b": {}, "c": {}}) == set()
    (runs / "a.done").write_text("{}\n")
    assert campaign.to_retrain(entries, runs, results) == set()
