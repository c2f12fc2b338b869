"""Issue 11: a hostile but realistic user, through the real command line.

Every case asserts the exit code, the message and what is left on disk: bad numeric options and
damaged model files stop before any work with one line naming the option or the file; outputs are
checked before the work; a killed ``generate`` keeps its finished rows and ``--resume`` completes
them exactly; a fresh training run never appends to another run's log; one seed gives one run.
"""
import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import WORDS, save_tiny_minilm

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "erniegen.cli", *map(str, args)]


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, env=ENV, timeout=600)


def assert_refused(p: subprocess.CompletedProcess, command: str, message: str, before_work: bool = True) -> None:
    """Exit code 2 and one line ``erniegen COMMAND: error: ...MESSAGE...``, no traceback; ``before_work``:
    the only line (nothing was loaded or decoded)."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(lines) == 1 or not before_work, p.stderr[-3000:]
    assert lines[-1].startswith(f"erniegen {command}: error: ") and message in lines[-1], lines[-1]


def write_rows(path: Path, n: int, seed: int = 0, target: bool = True) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"id": i, "source": " ".join(rng.choices(WORDS[:60], k=rng.randint(3, 30)))}
            if target:
                row["target"] = " ".join(rng.choices(WORDS[:60], k=rng.randint(2, 8))) + " ?"
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random model with the real MiniLM tokenizer (30,522 wordpieces)."""
    return save_tiny_minilm(tmp_path_factory.mktemp("robust") / "tiny", 128)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rows") / "in.jsonl", 6)


# ---- numeric options: checked first, named as typed ---------------------------------------------


def test_every_numeric_option_has_a_range():
    from erniegen.cli import OPTION_RANGES, build_parser
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    numeric = {(name, a.dest) for name, sub in commands.items() for a in sub._actions if a.type in (int, float)}
    assert numeric and {dest for _, dest in numeric} <= set(OPTION_RANGES), \
        sorted(x for x in numeric if x[1] not in OPTION_RANGES)


BAD_OPTIONS = [
    ("generate", ["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
    ("generate", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("generate", ["--length-penalty", "nan"], "--length-penalty must be a finite number, got nan"),
    ("generate", ["--num-beams", "0"], "--num-beams must be >= 1, got 0"),
    ("generate", ["--min-length", "5", "--max-length", "3"], "--min-length 5 exceeds --max-length 3"),
    ("bench", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("bench", ["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
    ("finetune", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("finetune", ["--lr", "inf"], "--lr must be > 0, got inf"),
    ("finetune", ["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1], got 1.5"),
    ("finetune", ["--seed", "-1"], "--seed must be in [0, 4294967296), got -1"),
    ("pretrain", ["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    ("evaluate", ["--resamples", "0"], "--resamples must be >= 1, got 0"),
]


@pytest.mark.parametrize("command, options, message", BAD_OPTIONS, ids=[f"{c} {' '.join(o)}" for c, o, _ in BAD_OPTIONS])
def test_bad_numeric_option_stops_before_any_work(command, options, message, tmp_path, rows):
    """The model does not exist: any work before the check would fail on it instead."""
    missing = tmp_path / "no-such-model"
    args = {"generate": ["--model", missing, "--input", rows, "--output", tmp_path / "o.jsonl"],
            "bench": ["--model", missing, "--input", rows],
            "finetune": ["--model", missing, "--train", rows, "--output", tmp_path / "run"],
            "pretrain": ["--model", missing, "--corpus", rows, "--output", tmp_path / "run"],
            "evaluate": ["--predictions", missing, "--baseline", missing]}[command]
    assert_refused(run(command, *args, *options), command, message)
    assert sorted(os.listdir(tmp_path)) == []


def test_library_functions_raise_clear_value_errors(tiny_model, tmp_path):
    from erniegen.decoding import DecodeOptions, generate_ids
    from erniegen.finetune import FinetuneConfig, finetune
    from erniegen.train import TrainConfig
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        generate_ids(tiny_model, [[4, 10, 5]], batch_size=0)
    with pytest.raises(ValueError, match="length_penalty must be a finite number, got nan"):
        DecodeOptions(length_penalty=math.nan)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):   # before the (missing) model loads
        finetune(FinetuneConfig(train="t.jsonl", output=str(tmp_path / "run"), model=str(tmp_path / "none"),
                                trainer=TrainConfig(output_dir="", batch_size=0)))
    assert not (tmp_path / "run").exists()


# ---- model folders: every file that fails to load is named -----------------------------------------


def damaged_copy(tiny_dir: Path, dest: Path, damage: str) -> tuple[Path, str]:
    """A copy of the tiny model with one kind of damage, and the message fragment it must cause."""
    shutil.copytree(tiny_dir, dest)
    if damage == "no tokenizer":
        for name in TOKENIZER_FILES:
            (dest / name).unlink(missing_ok=True)
        return dest, f"{dest}: no tokenizer files"
    if damage == "truncated weights":
        data = (dest / "model.safetensors").read_bytes()
        (dest / "model.safetensors").write_bytes(data[: len(data) // 2])
        return dest, f"{dest / 'model.safetensors'}: cannot be read, the file is damaged or truncated"
    if damage == "bad config.json":
        (dest / "config.json").write_text("{\n")
        return dest, f"{dest / 'config.json'}: not valid JSON"
    (dest / "erniegen_config.json").write_text('{"methd": "ernie-gen"}')
    return dest, f"{dest / 'erniegen_config.json'}: "


@pytest.mark.parametrize("damage", ["no tokenizer", "truncated weights", "bad config.json", "bad settings"])
def test_damaged_model_folder_is_named_and_nothing_is_written(damage, tiny_dir, rows, tmp_path):
    model, message = damaged_copy(tiny_dir, tmp_path / "model", damage)
    out = tmp_path / "o.jsonl"
    assert_refused(run("generate", "--model", model, "--input", rows, "--output", out), "generate", message)
    assert not out.exists() and not Path(f"{out}.partial").exists()


# ---- generate: inputs and outputs ---------------------------------------------------------------


def test_empty_input_is_an_error(tiny_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    out = tmp_path / "o.jsonl"
    p = run("generate", "--model", tiny_dir, "--input", tmp_path / "empty.jsonl", "--output", out)
    assert_refused(p, "generate", f"{tmp_path / 'empty.jsonl'}: holds no rows")
    assert not out.exists()


def test_rows_without_target_are_flagged_as_unscorable(tiny_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"source": "the city of the king", "target": "what city ?"}\n{"source": "a river in a war"}\n')
    out = tmp_path / "o.jsonl"
    p = run("generate", "--model", tiny_dir, "--input", inp, "--output", out, "--max-length", "4")
    assert p.returncode == 0, p.stderr
    assert f"note: 1 of 2 rows have no 'target' field, so `erniegen evaluate` cannot score {out}" in p.stderr
    assert [json.loads(x)["source"] for x in out.read_text().splitlines()] == ["the city of the king",
                                                                              "a river in a war"]


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder that refuses new files: mode 555, or, for root (who ignores mode bits), sysfs."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        return folder
    (folder / "probe").unlink()
    try:
        Path("/sys/erniegen-probe").touch()
    except OSError:
        return Path("/sys")
    pytest.skip("no folder here refuses new files to this user")


def test_output_is_checked_before_any_decoding(tiny_dir, rows, tmp_path):
    before = rows.read_bytes()
    p = run("generate", "--model", tiny_dir, "--input", rows, "--output", rows)
    assert_refused(p, "generate", f"--output {rows} is the input file {rows}; writing it would destroy the input")
    assert rows.read_bytes() == before

    p = run("generate", "--model", tiny_dir, "--input", rows, "--output", tmp_path / "o.txt")
    assert_refused(p, "generate", "unsupported suffix '.txt'; use .jsonl (or .json, JSON lines), .csv or .tsv")

    p = run("generate", "--model", tiny_dir, "--input", rows, "--output", rows / "o.jsonl")
    assert_refused(p, "generate", f"output folder {rows} is a file, not a folder")

    folder = unwritable_folder(tmp_path)
    p = run("generate", "--model", tiny_dir, "--input", rows, "--output", folder / "o.jsonl")
    assert_refused(p, "generate", f"output folder {folder} is not writable")
    assert not (folder / "o.jsonl").exists()
    assert sorted(os.listdir(tmp_path)) == ["read-only"]

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the city of the king\n")
    p = run("span-vocab", "--corpus", corpus, "--output", corpus)
    assert_refused(p, "span-vocab", f"--output {corpus} is the input file")
    assert corpus.read_text() == "the city of the king\n"


def test_missing_output_folder_is_created(tiny_dir, rows, tmp_path):
    out = tmp_path / "new" / "deeper" / "o.jsonl"
    p = run("generate", "--model", tiny_dir, "--input", rows, "--output", out, "--max-length", "4")
    assert p.returncode == 0, p.stderr
    assert len(out.read_text().splitlines()) == 6 and os.listdir(out.parent) == ["o.jsonl"]


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_output_format_follows_the_suffix(suffix, delimiter, tiny_dir, rows, tmp_path):
    jsonl, table = tmp_path / "o.jsonl", tmp_path / f"o{suffix}"
    for out in (jsonl, table):
        p = run("generate", "--model", tiny_dir, "--input", rows, "--output", out, "--max-length", "4")
        assert p.returncode == 0, p.stderr
    expected = [{k: str(v) for k, v in json.loads(x).items()} for x in jsonl.read_text().splitlines()]
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        assert reader.fieldnames == ["id", "source", "target", "prediction"]
        assert list(reader) == expected
    scores = json.loads(run("evaluate", "--task", "default", "--predictions", table).stdout)
    assert scores["n"] == 6


def partial_rows(path: Path) -> int:
    """Finished rows in a partial file: complete lines after the settings line."""
    return max(path.read_bytes().count(b"\n") - 1, 0) if path.exists() else 0


@pytest.mark.slow
def test_killed_generate_keeps_its_rows_and_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    inp = write_rows(tmp_path / "in.jsonl", 400, seed=1)
    decode = ["--batch-size", "2", "--max-length", "8"]
    full = tmp_path / "full.jsonl"
    p = run("generate", "--model", tiny_dir, "--input", inp, "--output", full, *decode)
    assert p.returncode == 0, p.stderr

    out = tmp_path / "out.jsonl"
    partial = Path(f"{out}.partial")
    proc = subprocess.Popen(cli("generate", "--model", tiny_dir, "--input", inp, "--output", out, *decode),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 300
    while proc.poll() is None and partial_rows(partial) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "generate ended before it could be killed"
    kept = partial_rows(partial)
    assert 20 <= kept < 400 and not out.exists()
    with open(partial, "a") as f:           # as if the kill had cut a write short
        f.write('{"i": 3, "predic')

    p = run("generate", "--model", tiny_dir, "--input", inp, "--output", out, *decode)
    assert_refused(p, "generate", f"{partial} holds {kept} rows finished by an interrupted run: pass --resume")
    assert partial_rows(partial) == kept
    p = run("generate", "--model", tiny_dir, "--input", inp, "--output", out, "--batch-size", "2",
            "--max-length", "6", "--resume")
    assert_refused(p, "generate", "was written with other settings (saved, now): "
                                  "{'options': ({'max_length': 8}, {'max_length': 6})}")

    p = run("generate", "--model", tiny_dir, "--input", inp, "--output", out, *decode, "--resume")
    assert p.returncode == 0, p.stderr
    assert f"resuming {partial}: {kept} of 400 rows already decoded" in p.stderr
    assert out.read_bytes() == full.read_bytes()
    assert not partial.exists()

    p = run("generate", "--model", tiny_dir, "--input", inp, "--output", out, *decode, "--resume")
    assert_refused(p, "generate", f"--resume: no interrupted run to continue ({partial} is missing or empty)")
    assert out.read_bytes() == full.read_bytes()


def test_resume_follows_file_contents_not_their_modification_times(tmp_path):
    """Data or a model copied to a new disk gets a new mtime and must still resume; a same-size rewrite must not."""
    from erniegen.outputs import PartialPredictions, file_digests
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"source": "a b", "target": "c"}\n{"source": "d e", "target": "f"}\n')
    out = str(tmp_path / "out.jsonl")
    first = PartialPredictions(out, {"input": file_digests([inp])}, 2)
    assert first.start(resume=False) == {}
    first.open()
    first.append([0], ["what?"])
    first._file.close()

    os.utime(inp, ns=(1, 1))
    assert PartialPredictions(out, {"input": file_digests([inp])}, 2).start(resume=True) == {0: "what?"}
    inp.write_text(inp.read_text().replace("d e", "d x"))
    with pytest.raises(ValueError, match="was written with other settings"):
        PartialPredictions(out, {"input": file_digests([inp])}, 2).start(resume=True)


def test_an_input_of_several_parts_is_fixed_by_each_part_in_order(tmp_path):
    """Parts may share a file name (``a/dev.jsonl,b/dev.jsonl``): a change to either, or another order, is another
    input to a resume."""
    from erniegen.outputs import input_digests
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "dev.jsonl", tmp_path / "b" / "dev.jsonl"
    a.write_text('{"source": "a"}\n')
    b.write_text('{"source": "b"}\n')
    both = input_digests([a, b])
    assert len(both) == 2 and both[0] != both[1] and list(both[0]) == list(both[1]) == ["dev.jsonl"]
    assert input_digests([b, a]) == both[::-1]
    a.write_text('{"source": "x"}\n')
    assert input_digests([a, b])[1] == both[1] and input_digests([a, b])[0] != both[0]


# ---- training output folders, damaged checkpoints, seeds --------------------------------------------


def finetune_args(model: Path, train: Path, out: Path, *extra) -> list:
    return ["finetune", "--model", model, "--train", train, "--output", out, "--task", "default", "--max-steps", "3",
            "--batch-size", "4", "--log-every", "1", "--max-source-len", "48", "--max-target-len", "16", *extra]


def test_finetune_names_an_empty_training_file(tiny_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    p = run(*finetune_args(tiny_dir, tmp_path / "empty.jsonl", tmp_path / "run"))
    assert_refused(p, "finetune", f"{tmp_path / 'empty.jsonl'}: holds no rows")
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_fresh_run_never_appends_to_a_leftover_log(tiny_dir, rows, tmp_path):
    """A run killed before its first save leaves only log.jsonl: nothing to resume, and not to be extended."""
    out = tmp_path / "run"
    out.mkdir()
    old_log = '{"step": 1, "epoch": 0.1, "loss": 10.5}\n'
    (out / "log.jsonl").write_text(old_log)
    p = run(*finetune_args(tiny_dir, rows, out))
    assert_refused(p, "finetune", f"output_dir {out} holds log.jsonl of an earlier run that saved no checkpoint")
    assert (out / "log.jsonl").read_text() == old_log and sorted(os.listdir(out)) == ["log.jsonl"]

    p = run(*finetune_args(tiny_dir, rows, out, "--resume"))
    assert_refused(p, "finetune", f"resume: {out} holds no checkpoint-last/trainer_state.pt to resume from")


def test_max_time_saves_exits_75_and_resume_finishes(tiny_dir, rows, tmp_path):
    """A zero budget stops after the first step with its work saved; the same command plus --resume
    finishes the run (exit 0); a budget that is not a duration is refused before any work."""
    out = tmp_path / "run"
    p = run(*finetune_args(tiny_dir, rows, out, "--max-time", "0"))
    assert p.returncode == 75, p.stderr[-3000:]
    assert "stopped by --max-time after step 1 of 3" in p.stderr and "--resume" in p.stderr.splitlines()[-1]
    assert json.loads(p.stdout.splitlines()[-1])["stopped"] == "max_time"
    assert sorted(os.listdir(out)) == ["checkpoint-last", "log.jsonl"]
    p = run(*finetune_args(tiny_dir, rows, out, "--max-time", "1:00:00", "--resume"))
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.splitlines()[-1])
    assert (summary["global_step"], summary["stopped"]) == (3, None) and (out / "best").is_dir()
    p = run(*finetune_args(tiny_dir, rows, tmp_path / "other", "--max-time", "1h"))
    assert_refused(p, "finetune", "--max-time: '1h' is not a duration")


def test_time_budget_fits_the_run_and_finishes_it(tiny_dir, rows, tmp_path):
    """A budget spent before training still finishes the run, fitted to the ten timed steps (exit 0, best/
    saved, the fit logged); a budget that is not a duration is refused before any work."""
    out = tmp_path / "run"
    p = run(*finetune_args(tiny_dir, rows, out, "--max-steps", "12", "--time-budget", "0"))
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.splitlines()[-1])
    assert (summary["global_step"], summary["total_steps"], summary["stopped"]) == (10, 10, None)
    fits = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "fitted_steps" in e]
    assert [(e["step"], e["fitted_steps"]) for e in fits] == [(10, 10)] and (out / "best").is_dir()
    assert "time budget: 10 steps (of at most 12)" in p.stdout + p.stderr
    p = run(*finetune_args(tiny_dir, rows, tmp_path / "other", "--time-budget", "1h"))
    assert_refused(p, "finetune", "--time-budget: '1h' is not a duration")


@pytest.mark.slow
@pytest.mark.parametrize("file", ["trainer_state.pt", "rng_state_0.pt", "model.safetensors"])
def test_damaged_checkpoint_file_is_named_on_resume(file, tiny_dir, rows, tmp_path):
    out = tmp_path / "run"
    p = run(*finetune_args(tiny_dir, rows, out, "--max-steps", "2"))
    assert p.returncode == 0, p.stderr
    damaged = out / "checkpoint-last" / file
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    log = (out / "log.jsonl").read_text()
    p = run(*finetune_args(tiny_dir, rows, out, "--max-steps", "4", "--resume"))
    assert_refused(p, "finetune", f"{damaged}: cannot be read", before_work=False)
    assert (out / "log.jsonl").read_text() == log


def headless_copy(tiny_dir: Path, dest: Path) -> Path:
    """The tiny model without its masked-LM head, like all-MiniLM-L6-v2: loading creates one."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(tiny_dir, dest)
    weights = load_file(str(dest / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("cls.")}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    return dest


@pytest.mark.slow
def test_one_seed_gives_one_run(tiny_dir, tmp_path):
    """The head created at load time draws from the seed: the same command gives bit-identical losses."""
    model = headless_copy(tiny_dir, tmp_path / "headless")
    train = write_rows(tmp_path / "train.jsonl", 24, seed=2)

    def losses(name: str, seed: str) -> list[float]:
        p = run(*finetune_args(model, train, tmp_path / name, "--seed", seed))
        assert p.returncode == 0 and "no masked-LM head in checkpoint" in p.stderr, p.stderr[-3000:]
        return [json.loads(x)["loss"] for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]

    first, again, other = losses("a", "7"), losses("b", "7"), losses("c", "8")
    assert len(first) == 3 and first == again
    assert (tmp_path / "a" / "best" / "model.safetensors").read_bytes() == \
           (tmp_path / "b" / "best" / "model.safetensors").read_bytes()
    assert other != first
