"""Work through a queue of training runs across sessions that each end at a hard wall-clock limit.

A full squad_qg_sent run takes ~45 min on a CPU with native bf16 and ~2.3 h on an AVX2-only one, and a
session ends hard at 180 minutes, so the comparisons issues 10 and 12 ask for (3 seeds a side, a dozen
arms) span many sessions. Each call of this script spends one budget: it finishes what the last call
left (``--resume``), then starts the next queued run, and stops every training at the budget with
``--max-time`` (which saves checkpoint-last and exits 75) instead of letting the session kill it.
A finished fine-tuning run is scored at once on the full dev set with its default decoding, into the
results file with ``"label": "NAME default decoding"`` (as ``qg_recipe.sh score`` labels, so
``tables.py --seeds results/campaign.jsonl "default=qg-s42,qg-s1,qg-s2"`` reads it); a run already scored
there is skipped, unless a queued run reads its model and this runs folder lacks it: then it is trained again
(not scored again).

    .venv/bin/python benchmarks/campaign.py --budget 2:20:00          # spend 2 h 20 min, then stop cleanly
    .venv/bin/python benchmarks/campaign.py --status                  # where every queued run stands

Queue lines (``benchmarks/campaign.txt``): ``NAME finetune|pretrain [FLAGS...]``; ``{data}`` in a flag is
the ``--data`` folder (the shared benchmark data) and ``{runs}`` the ``--runs`` folder. A finetune run
gets ``--model minilm --task squad_qg`` and squad_qg_sent's train and dev files first, so its own flags
override them; it is scored on its own ``--dev`` file with its own ``--task``'s metric. ``NAME decode RUN [GENERATE FLAGS...]`` scores an
earlier finetune run's best model once more with other decoding (a decoder, its iterations), once RUN is
trained (and at least ``--min-train`` minutes are left, for the decoding). ``NAME distill RUN [GENERATE
FLAGS...]`` has RUN's best model write RUN's training questions (``erniegen distill``) into
``{runs}/NAME/distilled.jsonl``, which later lines pass as ``--train {runs}/NAME/distilled.jsonl``.
A run cut at the budget resumes only where its run folder survives, and a new session may start on a new
machine, so a training is not started when scored runs say it needs more time than is left: the queue goes on
to the next entry that fits (a stopped run is always continued). With ``--split`` a run that cannot finish is
started anyway, to be stopped at the budget and continued by the next call: for a runs folder that outlives
its session (/work/runs did from the fifteenth to the eighteenth session, not on the nineteenth's new machine),
so that a run longer than any session's budget (MIST, ~141 min on the AVX2 CPU) still gets trained. Each score row records ``train_minutes``.
One training at a time: this machine has two cores and two trainings side by side each crawl.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_STOPPED = 75  # erniegen's exit status for a run stopped by --max-time with its work saved
EG = [sys.executable, "-m", "erniegen.cli"]


READS_A_RUN = ("decode", "distill")  # entries whose first flag is an earlier finetune run


@dataclass
class Entry:
    name: str
    command: str        # finetune | pretrain | decode | distill
    flags: list[str]    # decode, distill: RUN, then generate's flags
    line: int


def read_queue(path: Path) -> list[Entry]:
    entries, seen = [], set()
    for i, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        if len(words) < 2 or words[1] not in ("finetune", "pretrain", *READS_A_RUN) or words[1:] in (
                [c] for c in READS_A_RUN):
            raise SystemExit(f"{path}:{i}: expected 'NAME finetune|pretrain [FLAGS...]' or 'NAME decode|distill "
                             f"RUN [FLAGS...]', got {raw.strip()!r}")
        if words[0] in seen:
            raise SystemExit(f"{path}:{i}: run name {words[0]!r} is queued twice")
        if words[1] in READS_A_RUN and words[2] not in {e.name for e in entries if e.command == "finetune"}:
            raise SystemExit(f"{path}:{i}: {words[0]} {words[1]}s with {words[2]!r}, which no earlier finetune line "
                             f"trains")
        seen.add(words[0])
        entries.append(Entry(words[0], words[1], words[2:], i))
    return entries


LABEL = "{} default decoding"


def label(e: Entry) -> str:
    return f"{e.name}: {e.flags[0]}/best, {shlex.join(e.flags[1:])}" if e.command == "decode" else LABEL.format(e.name)


def scored(results: Path) -> dict[str, dict]:
    """Entry name -> its latest score row (rows name their entry; the first sessions' rows only their label)."""
    if not results.exists():
        return {}
    rows = [json.loads(x) for x in results.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {r.get("name") or r["label"].removesuffix(LABEL.format("")): r for r in rows
            if "name" in r or r.get("label", "").endswith(LABEL.format(""))}


def flags_of(e: Entry, runs: Path, data: Path) -> list[str]:
    """The entry's erniegen arguments, defaults first (later flags win in argparse)."""
    base = []
    if e.command == "finetune":
        base = ["--model", "minilm", "--task", "squad_qg", "--train", str(data / "squad_qg_sent" / "train.jsonl"),
                "--dev", str(data / "squad_qg_sent" / "dev.jsonl")]
    return base + [f.replace("{data}", str(data)).replace("{runs}", str(runs)) for f in e.flags]


def needs(e: Entry) -> list[str]:
    """The runs ``e`` reads a model of: a decode entry's RUN, and every ``{runs}/NAME`` in a training's flags (a
    static MIST reads a trained NAT model's pseudo targets; a fine-tuning starts from a pre-training)."""
    if e.command in READS_A_RUN:
        return [e.flags[0]]
    return [m for f in e.flags for m in re.findall(r"\{runs\}/([^/\s]+)", f)]


def waits_for(e: Entry, runs: Path) -> list[str]:
    return [n for n in needs(e) if not (runs / f"{n}.done").exists()]


def to_retrain(entries: list[Entry], runs: Path, results: dict[str, dict]) -> set[str]:
    """Scored trainings whose model an unscored entry still reads but this runs folder lacks (run folders do not
    outlive a machine): trained again, not scored again."""
    unfinished = [e for e in entries if e.name not in results and not (runs / f"{e.name}.done").exists()]
    trainings = {e.name for e in entries if e.command not in READS_A_RUN}
    return {n for e in unfinished for n in waits_for(e, runs) if n in results and n in trainings}


def last_value(flags: list[str], flag: str, default: str | None = None) -> str | None:
    """The value of ``flag``'s last occurrence (later flags win in argparse), else ``default``."""
    return next((flags[i + 1] for i in range(len(flags) - 2, -1, -1) if flags[i] == flag), default)


def dev_file(flags: list[str]) -> str:
    return last_value(flags, "--dev")


def last_step(run: Path) -> int | None:
    log = run / "log.jsonl"
    if not log.exists():
        return None
    steps = [json.loads(x).get("step") for x in log.read_text(encoding="utf-8").splitlines() if x.strip()]
    return max((s for s in steps if isinstance(s, int)), default=None)


def stopped_at(run: Path) -> str:
    step = last_step(run)
    return "before fine-tuning (in its preparation)" if step is None else f"at step {step}"


def hms(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def resumable(run: Path) -> bool:
    """What erniegen would resume (its own test: a checkpoint-last, or one caught mid-swap by a kill; or the
    saved state of a preparation before fine-tuning)."""
    from erniegen.head_warmup import PREPARATION
    from erniegen.train import last_checkpoint
    return run.is_dir() and (last_checkpoint(run) is not None or (run / PREPARATION).is_file())


def status(entries: list[Entry], runs: Path, results: dict[str, dict], machine: str | None = None) -> None:
    """Where every entry stands; a queued training with the minutes :func:`expected_minutes` gives it on
    ``machine``, to plan a session by."""
    retrain = to_retrain(entries, runs, results)
    for e in entries:
        run = runs / e.name
        if e.name in results:
            r = results[e.name]
            state = f"scored: BLEU-4 {r.get('bleu4', float('nan')):.2f}  ROUGE-L {r.get('rougeL', float('nan')):.2f}"
            if e.name in retrain:
                state += "; its model is gone, trained again for the runs that read it"
        elif e.command in READS_A_RUN and not (runs / f"{e.name}.done").exists():
            state = f"waits for {e.flags[0]}" if waits_for(e, runs) else f"to {e.command}"
        elif (runs / f"{e.name}.done").exists():
            state = {"pretrain": "trained", "distill": "distilled"}.get(e.command, "trained, not scored")
        elif resumable(run):
            state = f"stopped {stopped_at(run)} (resumable)"
        elif missing := waits_for(e, runs):
            state = f"waits for {', '.join(missing)}"
        elif run.exists():
            state = "started, no checkpoint yet"
        else:
            state = "queued"
        if e.command not in READS_A_RUN and e.name not in results and (m := expected_minutes(e, results, machine)):
            state += f" (~{m:.0f} min here)"
        print(f"{e.name:24s} {e.command:9s} {state}")


def without_seed(flags: list[str]) -> list[str]:
    return [f for i, f in enumerate(flags) if f != "--seed" and (i == 0 or flags[i - 1] != "--seed")]


def speed_ratio(results: dict[str, dict], machine: str | None, other: str | None) -> float | None:
    """Minutes on ``machine`` per minute on ``other``: the median over methods trained on both of the ratio of
    their median times (a bf16 CPU trains ~0.55x the minutes of an AVX2 one), else None."""
    def by_method(cpu_name):
        groups: dict[str | None, list[float]] = {}
        for r in results.values():
            if r.get("cpu") == cpu_name and r.get("command") == "finetune" and "train_minutes" in r:
                groups.setdefault(last_value(shlex.split(r["flags"]), "--method"), []).append(r["train_minutes"])
        return {m: statistics.median(v) for m, v in groups.items()}
    mine, theirs = by_method(machine), by_method(other)
    ratios = [mine[m] / theirs[m] for m in mine.keys() & theirs.keys()]
    return statistics.median(ratios) if ratios else None


def expected_minutes(e: Entry, results: dict[str, dict], machine: str | None = None) -> float | None:
    """How long ``e`` should train, from scored runs of the same flags but the seed, else of the same method (the
    longest such run: runs are not cut in two on purpose), else unknown. At each level runs on ``machine`` (a
    :func:`cpu` string) come first; else runs on another CPU, scaled by :func:`speed_ratio` where methods timed on
    both give one; else any run as timed. Rows carry ``train_minutes``."""
    timed = [r for r in results.values() if "train_minutes" in r and r.get("command") == e.command]
    method = last_value(e.flags, "--method")  # None: the default method
    for same in (lambda f: without_seed(f) == without_seed(e.flags), lambda f: last_value(f, "--method") == method):
        rows = [r for r in timed if same(shlex.split(r["flags"]))]
        minutes = [r["train_minutes"] for r in rows if r.get("cpu") == machine]
        if not minutes:
            ratios = {c: speed_ratio(results, machine, c) for c in {r.get("cpu") for r in rows}}
            minutes = ([r["train_minutes"] * ratios[r.get("cpu")] for r in rows if ratios[r.get("cpu")] is not None]
                       or [r["train_minutes"] for r in rows])
        if minutes:
            return max(minutes)
    return None


def train_minutes(run: Path) -> float:
    """Wall minutes the campaign has spent on ``run`` so far, over every session that trained it."""
    spent = run.with_name(f"{run.name}.minutes")
    return float(spent.read_text()) if spent.exists() else 0.0


def train(e: Entry, runs: Path, data: Path, seconds: float) -> int:
    out = runs / e.name
    cmd = [*EG, e.command, *flags_of(e, runs, data), "--output", str(out), "--max-time", hms(seconds)]
    if resumable(out):
        cmd.append("--resume")
    elif out.exists():  # killed before its first checkpoint: nothing to resume, and erniegen refuses the leftovers
        aside = out.with_name(f"{out.name}.abandoned-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        print(f"{e.name}: {out} held no checkpoint (a run killed before its first save); moved to {aside}")
    print(f"[{time.strftime('%H:%M:%S')}] {e.name}: {shlex.join(cmd[2:])}", flush=True)
    with open(runs / f"{e.name}.out", "a", encoding="utf-8") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        start = time.monotonic()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    spent = train_minutes(out) + (time.monotonic() - start) / 60
    out.with_name(f"{out.name}.minutes").write_text(f"{spent:.1f}\n")
    return rc


def distill(e: Entry, teacher: Entry, runs: Path, data: Path) -> None:
    """The ``teacher`` run's best model writes the targets of its own training file into NAME/distilled.jsonl
    (resumed where a killed call left its partial file), then NAME.done."""
    out = runs / e.name / "distilled.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    resume = ["--resume"] if out.with_name(out.name + ".partial").exists() else []
    print(f"[{time.strftime('%H:%M:%S')}] {e.name}: distilling with {teacher.name}", flush=True)
    subprocess.run([*EG, "distill", "--model", str(runs / teacher.name / "best"), "--input",
                    last_value(flags_of(teacher, runs, data), "--train"), "--output", str(out), *e.flags[1:],
                    *resume], check=True, cwd=ROOT)
    (runs / f"{e.name}.done").write_text(json.dumps({"finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


def score(e: Entry, trained: Entry, runs: Path, data: Path, results: Path) -> None:
    """Full dev set of the ``trained`` run's best model, decoded by its default decoding (a finetune entry) or
    by ``e``'s generate flags (a decode entry); one JSON line naming ``e`` in ``results``."""
    pred = results.parent / f"{e.name}.jsonl"
    print(f"[{time.strftime('%H:%M:%S')}] {e.name}: scoring", flush=True)
    resume = ["--resume"] if pred.with_name(pred.name + ".partial").exists() else []  # a scoring cut short
    decoding = e.flags[1:] if e.command == "decode" else []
    subprocess.run([*EG, "generate", "--model", str(runs / trained.name / "best"), "--input",
                    dev_file(flags_of(trained, runs, data)), "--output", str(pred), *decoding, *resume],
                   check=True, cwd=ROOT)
    task = last_value(flags_of(trained, runs, data), "--task")
    out = subprocess.run([*EG, "evaluate", "--task", task, "--predictions", str(pred)], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    row = json.loads(out) | {"name": e.name, "label": label(e), "command": e.command, "flags": shlex.join(e.flags)}
    if e.command != "decode":
        done = json.loads((runs / f"{e.name}.done").read_text(encoding="utf-8"))
        row |= {k: done[k] for k in ("train_minutes", "cpu") if k in done}
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def cpu() -> str:
    """The CPU model, PyTorch's kernel level and the precision ``--precision auto`` trains in there (bf16 where
    the CPU has it natively, else fp32): seeds trained in different precisions are not the same recipe."""
    import torch

    from erniegen.precision import native_bf16
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}, auto = {'bf16' if native_bf16() else 'fp32'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=Path, default=ROOT / "benchmarks" / "campaign.txt")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="where run folders live (keep it outside a clone "
                                                                   "that CI deletes)")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "campaign.jsonl")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared benchmark data")
    p.add_argument("--budget", help="wall time to spend, [[DD:]HH:]MM:SS (required unless --status)")
    p.add_argument("--score-reserve", type=float, default=15.0,
                   help="minutes kept back from each training for scoring it if it finishes")
    p.add_argument("--min-train", type=float, default=10.0, help="minutes below which no training is started")
    p.add_argument("--split", action="store_true",
                   help="start a run even when it needs more time than is left (the next call continues it)")
    p.add_argument("--status", action="store_true", help="print where every queued run stands, and exit")
    args = p.parse_args()
    entries = read_queue(args.queue)
    sys.path.insert(0, str(ROOT))
    if args.status:
        status(entries, args.runs, scored(args.results), cpu())
        return
    if args.budget is None:
        p.error("--budget is required (or --status)")
    from erniegen.train import parse_duration
    deadline = time.monotonic() + parse_duration(args.budget)
    args.runs.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    by_name = {e.name: e for e in entries}
    machine = cpu()
    retrain = to_retrain(entries, args.runs, scored(args.results))
    for e in entries:
        if e.name in scored(args.results) and e.name not in retrain:
            continue
        if e.command in READS_A_RUN:
            if (args.runs / f"{e.name}.done").exists():
                continue
            if waits_for(e, args.runs):
                print(f"{e.name}: waits for {e.flags[0]} to be trained")
            elif deadline - time.monotonic() < 60 * args.min_train:
                print(f"{hms(deadline - time.monotonic())} left: not enough to {e.command} {e.name}")
                break
            elif e.command == "distill":
                distill(e, by_name[e.flags[0]], args.runs, args.data)
            else:
                score(e, by_name[e.flags[0]], args.runs, args.data, args.results)
            continue
        done = args.runs / f"{e.name}.done"
        if not done.exists():
            if not resumable(args.runs / e.name) and (missing := waits_for(e, args.runs)):
                # a model it reads is not trained in this runs folder (folders do not outlive a machine)
                print(f"{e.name}: waits for {', '.join(missing)} to be trained")
                continue
            reserve = 0.0 if e.command == "pretrain" else 60 * args.score_reserve
            left = deadline - time.monotonic() - reserve
            if left < 60 * args.min_train:
                print(f"{hms(deadline - time.monotonic())} left: not enough to start or continue {e.name}")
                break
            expected = expected_minutes(e, scored(args.results), machine)
            too_long = expected is not None and 60 * expected > left
            if too_long and not args.split and not resumable(args.runs / e.name):
                # a run cut at the budget resumes only on the same machine; start what can finish instead
                print(f"{e.name}: not started, it should take ~{expected:.0f} min and {hms(left)} is left")
                continue
            rc = train(e, args.runs, args.data, left)
            if rc == EXIT_STOPPED:
                print(f"{e.name}: stopped at the budget {stopped_at(args.runs / e.name)}; the next call resumes it")
                break
            if rc != 0:
                raise SystemExit(f"{e.name}: erniegen {e.command} failed with status {rc}; see "
                                 f"{args.runs / (e.name + '.out')}")
            done.write_text(json.dumps({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": machine,
                                        "train_minutes": round(train_minutes(args.runs / e.name), 1)}) + "\n")
        if e.command == "finetune" and e.name not in retrain:
            score(e, e, args.runs, args.data, args.results)
    status(entries, args.runs, scored(args.results), machine)


if __name__ == "__main__":
    main()
