"""The shared training loop: learning, lr schedule, exact resume, atomic saves and two-process DDP."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from erniegen.config import config_from_dict, dataclass_to_dict, load_config_yaml
from erniegen.train import (TrainConfig, epoch_batches, is_main_process, last_checkpoint, lr_factor,
                            make_optimizer, selection_score, setup_distributed, train)

ROOT = Path(__file__).resolve().parents[1]


class TinyObjective(nn.Module):
    """Bag-of-embeddings regression with dropout, so the RNG stream matters for exact resume."""

    def __init__(self, vocab: int = 20, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(0.2)
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, input_ids: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(self.drop(self.emb(input_ids)).mean(1))
        pred = self.out(torch.relu(self.hidden(h))).squeeze(-1)
        return {"loss": F.mse_loss(pred, target), "loss_abs": (pred - target).abs().mean()}


def make_data(n: int = 64, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (n, 6), generator=g)
    return [{"input_ids": row, "target": float(row.float().mean() - 9.5) / 3} for row in ids]


def noisy_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Adds noise from torch, python and numpy RNGs, as masking/noising collates do."""
    target = torch.tensor([e["target"] for e in examples])
    noise = 0.01 * (torch.rand(len(examples)) + random.random() + float(np.random.rand()))
    return {"input_ids": torch.stack([e["input_ids"] for e in examples]), "target": target + noise}


def make_model(seed: int = 0) -> TinyObjective:
    torch.manual_seed(seed)
    return TinyObjective()


def saver(model: nn.Module):
    def save_model(d: str) -> None:
        torch.save(model.state_dict(), Path(d) / "model.pt")
    return save_model


def evaluator(model: nn.Module, dev: list[dict]):
    def evaluate() -> dict[str, float]:
        torch.rand(3), random.random(), np.random.rand()   # must not shift the training RNG stream
        out = model(**noisy_collate(dev))
        return {"loss": float(out["loss"]), "neg_abs": -float(out["loss_abs"])}
    return evaluate


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


TIMING = ("tokens_per_s", "examples_per_s")


def comparable(events: list[dict]) -> list[dict]:
    """Log events without the timing fields."""
    return [{k: v for k, v in e.items() if k not in TIMING} for e in events]


def cfg_for(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), batch_size=6, grad_accum=2, lr=1e-2, warmup_steps=3, log_every=1,
                precision="fp32", seed=7)
    return TrainConfig(**(base | kw))


# ---- pure pieces --------------------------------------------------------------------------------


def test_lr_factor_and_epoch_batches():
    assert [lr_factor(s, 3, 10) for s in range(11)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0])
    assert [lr_factor(s, 0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    shards = [epoch_batches(11, epoch=1, seed=3, batch_size=2, rank=r, world=2) for r in range(2)]
    flat = [sum(b, []) for b in shards]
    assert [len(f) for f in flat] == [5, 5] and not set(flat[0]) & set(flat[1])
    assert [len(b) for b in shards[0]] == [2, 2, 1]
    assert epoch_batches(11, 1, 3, 2, 0, 2) == shards[0]          # deterministic
    assert epoch_batches(11, 2, 3, 2, 0, 2) != shards[0]          # a new order each epoch


def test_single_process_is_rank_zero(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert setup_distributed()[:2] == (0, 1) and is_main_process()


def test_weight_decay_skips_biases_and_norms():
    model = make_model()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"emb.weight", "hidden.weight", "out.weight"}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_config_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nlr: 5e-5\nmax_steps: 7\n")
    cfg = load_config_yaml(path, TrainConfig)
    assert (cfg.lr, cfg.max_steps, cfg.epochs) == (5e-5, 7, None)  # epochs unset: max_steps decides
    assert dataclass_to_dict(cfg)["lr"] == 5e-5
    assert config_from_dict(dataclass_to_dict(cfg), TrainConfig) == cfg
    path.write_text("output_dir: out\nlearning_rate: 1e-4\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config_yaml(path, TrainConfig)


@pytest.mark.parametrize("kw, match", [
    (dict(grad_accum=0), "grad_accum=0"),
    (dict(precision="fp16"), "fp16"),
    (dict(precision="half"), "precision='half'"),
    (dict(metric_for_best="rougeL"), "rougeL"),
    (dict(warmup_steps=50, max_steps=10), "warmup_steps=50"),
])
def test_incompatible_options_raise(tmp_path, kw, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        train(model, make_data(), noisy_collate, cfg_for(tmp_path / "o", **kw), save_model=saver(model))


# ---- training -----------------------------------------------------------------------------------


def full_loss(model: nn.Module, data: list[dict]) -> float:
    model.eval()
    with torch.no_grad():
        loss = float(model(**noisy_collate(data))["loss"])
    model.train()
    return loss


def test_loss_decreases_and_lr_follows_schedule(tmp_path):
    model, data = make_model(), make_data()
    out = tmp_path / "run"
    before = full_loss(model, data)
    summary = train(model, data, noisy_collate, cfg_for(out, max_steps=30, warmup_steps=3, lr=3e-2),
                    save_model=saver(model))
    assert before > 0.5 and full_loss(model, data) < 0.35 * before
    log = [e for e in read_log(out) if "loss" in e]
    assert [e["step"] for e in log] == list(range(1, 31))
    losses = [e["loss"] for e in log]
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    expected = [3e-2 * s / 3 if s <= 3 else 3e-2 * (30 - s + 1) / 27 for s in range(1, 31)]
    assert [e["lr"] for e in log] == pytest.approx(expected, rel=1e-12)
    assert all(e["tokens_per_s"] > 0 and "loss_abs" in e for e in log)
    # rates over the same window: their ratio is the window's tokens per example, exactly known here
    per_example = data[0]["input_ids"].numel()
    assert [e["tokens_per_s"] / e["examples_per_s"] for e in log] == pytest.approx([per_example] * 30, rel=1e-2)
    assert summary["global_step"] == 30 and summary["train_loss"] == losses[-1]


def test_warmup_ratio_and_epochs(tmp_path):
    model = make_model()
    out = tmp_path / "run"
    # 64 examples / 6 per micro-batch = 11 micro-batches = 6 optimizer steps per epoch (last one has 1)
    train(model, make_data(), noisy_collate, cfg_for(out, epochs=5, warmup_steps=None, warmup_ratio=0.1),
          save_model=saver(model))
    log = [e for e in read_log(out) if "loss" in e]
    assert log[-1]["step"] == 30 and log[5]["epoch"] == 1.0
    assert [e["lr"] for e in log[:4]] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])


class Killed(Exception):
    pass


def test_selection_score_rounds_then_breaks_ties_in_key_order():
    assert selection_score({"bleu4": 1.9e-9, "rougeL": 10.36, "x": 1}, "bleu4,rougeL") == [0.0, 10.36]
    assert selection_score({"bleu4": 1.9e-9, "rougeL": 12.0}, "bleu4,rougeL") > [0.0, 10.36]
    assert selection_score({"bleu4": 0.01, "rougeL": 1.0}, "bleu4,rougeL") > [0.0, 10.36]
    with pytest.raises(ValueError, match=r"\['rougeL'\] not among the evaluate\(\) results \['bleu4'\]"):
        selection_score({"bleu4": 0.0}, "bleu4,rougeL")


def test_best_checkpoint_follows_the_tie_breaking_key(tmp_path):
    # BLEU-4 falls by 1e-9 (noise at reporting precision) while ROUGE-L rises: step 4 is the best
    evals = iter([{"bleu4": 2e-9, "rougeL": 10.0}, {"bleu4": 1e-9, "rougeL": 20.0}, {"bleu4": 1e-9, "rougeL": 15.0}])
    model, out = make_model(), tmp_path / "o"
    summary = train(model, make_data(), noisy_collate,
                    cfg_for(out, max_steps=6, eval_every=2, metric_for_best="bleu4,rougeL", greater_is_better=True),
                    evaluate=lambda: next(evals), save_model=saver(model))
    assert (summary["best_step"], summary["best_metric"]) == (4, 1e-9)
    assert json.loads((out / "best" / "eval_results.json").read_text()) == {"step": 4, "bleu4": 1e-9, "rougeL": 20.0}
    state = torch.load(out / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert state["best_score"] == [0.0, 20.0]


def run_resume_case(tmp_path: Path, num_workers: int = 0, **extra) -> None:
    data, dev = make_data(), make_data(12, seed=1)
    kw = dict(max_steps=14, save_every=4, log_every=3, metric_for_best="neg_abs", greater_is_better=True,
              num_workers=num_workers, **extra)

    model_a = make_model()
    out_a = tmp_path / "a"
    extra_a = {"note": "hi"}
    sum_a = train(model_a, data, noisy_collate, cfg_for(out_a, **kw), evaluate=evaluator(model_a, dev),
                  save_model=saver(model_a), extra_state=extra_a)

    # run B is "killed" while writing its second resumable checkpoint (step 8): step 4 is the last
    # complete one, i.e. epoch 0 after micro-batch 8 of 11
    model_b = make_model()
    out_b = tmp_path / "b"
    calls = []

    def dying_save(d: str) -> None:
        if Path(d).name.startswith("checkpoint-last"):
            calls.append(d)
            if len(calls) == 2:
                (Path(d) / "model.pt").write_bytes(b"half")
                raise Killed
        saver(model_b)(d)
    with pytest.raises(Killed):
        train(model_b, data, noisy_collate, cfg_for(out_b, **kw), evaluate=evaluator(model_b, dev),
              save_model=dying_save, extra_state={"note": "hi"})
    assert not list(out_b.glob("*.tmp-*"))
    (out_b / "checkpoint-last.tmp-zz").mkdir()               # debris of a real kill
    ckpt = last_checkpoint(out_b)
    state = torch.load(Path(ckpt) / "trainer_state.pt", weights_only=True)
    assert (state["global_step"], state["epoch"], state["micro_step"]) == (4, 0, 8)

    model_c = make_model(seed=123)                           # fresh init: weights must come from ckpt
    model_c.load_state_dict(torch.load(Path(ckpt) / "model.pt", weights_only=True))
    extra_c: dict = {}
    sum_c = train(model_c, data, noisy_collate, cfg_for(out_b, resume=True, **kw),
                  evaluate=evaluator(model_c, dev), save_model=saver(model_c), extra_state=extra_c)

    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(pa, pc), name
    log_a, log_b = comparable(read_log(out_a)), comparable(read_log(out_b))
    assert log_a == log_b
    assert [e["step"] for e in log_b if "loss" in e] == [3, 6, 9, 12, 14]
    assert [e["step"] for e in log_b if "eval" in e] == [6, 12, 14]
    assert extra_c == {"note": "hi"}
    assert (sum_c["global_step"], sum_c["best_metric"], sum_c["best_step"]) == \
           (sum_a["global_step"], sum_a["best_metric"], sum_a["best_step"])
    best_a, best_b = (torch.load(o / "best" / "model.pt", weights_only=True) for o in (out_a, out_b))
    assert torch.equal(best_a["out.weight"], best_b["out.weight"])
    assert json.loads((out_b / "best" / "eval_results.json").read_text())["step"] == sum_a["best_step"]


def test_resume_is_bit_identical(tmp_path):
    run_resume_case(tmp_path)


def test_resume_is_bit_identical_with_a_moving_average(tmp_path):
    run_resume_case(tmp_path, ema_decay=0.8, eval_raw_weights=True)
    log = read_log(tmp_path / "b")
    evals = [e for e in log if "eval" in e]
    assert all("eval_raw" in e and e["eval_raw"] != e["eval"] for e in evals)


def test_moving_average_follows_its_formula_and_leaves_the_raw_weights(tmp_path):
    model = make_model()
    steps, decay = 6, 0.7
    snapshots = []
    original = model.forward

    def forward(**batch):
        if model.training:
            snapshots.append(model.out.weight.detach().clone())  # the weights a step starts from
        return original(**batch)
    model.forward = forward
    train(model, make_data(), noisy_collate, cfg_for(tmp_path / "o", max_steps=steps, grad_accum=1,
                                                      ema_decay=decay), save_model=saver(model))
    assert len(snapshots) == steps
    thetas = snapshots + [model.out.weight.detach().clone()]     # theta_0 .. theta_N (raw, restored)
    expected = thetas[0]
    for n in range(1, steps + 1):
        d = min(decay, n / (n + 9))
        expected = d * expected + (1 - d) * thetas[n]
    best = torch.load(tmp_path / "o" / "best" / "model.pt", weights_only=True)["out.weight"]
    assert torch.allclose(best, expected, atol=1e-6)
    assert not torch.allclose(best, thetas[-1])


def test_moving_average_settings_are_checked(tmp_path):
    model = make_model()
    for kw, match in ((dict(ema_decay=1.0), "ema_decay=1.0 must be in"),
                      (dict(eval_raw_weights=True), "set ema_decay")):
        with pytest.raises(ValueError, match=match):
            train(model, make_data(), noisy_collate, cfg_for(tmp_path / "x", max_steps=2, **kw),
                  save_model=saver(model))


@pytest.mark.slow
def test_resume_is_bit_identical_with_workers(tmp_path):
    run_resume_case(tmp_path, num_workers=2)


def test_atomic_saves_and_output_dir_guards(tmp_path):
    out = tmp_path / "run"
    model = make_model()
    with pytest.raises(ValueError, match="no checkpoint-last"):
        train(model, make_data(), noisy_collate, cfg_for(out, max_steps=3, resume=True), save_model=saver(model))
    train(model, make_data(), noisy_collate, cfg_for(out, max_steps=3), save_model=saver(model))
    assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint-last", "log.jsonl"]
    assert sorted(p.name for p in (out / "checkpoint-last").iterdir()) == \
           ["model.pt", "rng_state_0.pt", "trainer_state.pt"]
    assert torch.equal(torch.load(out / "best" / "model.pt", weights_only=True)["out.weight"], model.out.weight)
    assert last_checkpoint(out) == str(out / "checkpoint-last")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(model, make_data(), noisy_collate, cfg_for(out, max_steps=3), save_model=saver(model))

    # a kill between the two renames of a swap leaves only the previous checkpoint, moved aside
    os.rename(out / "checkpoint-last", out / "checkpoint-last.old-abc")
    assert last_checkpoint(out) == str(out / "checkpoint-last.old-abc")
    summary = train(model, make_data(), noisy_collate, cfg_for(out, max_steps=5, resume=True),
                    save_model=saver(model))
    assert summary["global_step"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint-last", "log.jsonl"]
    state = torch.load(out / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 5
    assert [e["step"] for e in read_log(out)] == [1, 2, 3, 4, 5]
    with pytest.warns(UserWarning, match="weights differ"):   # caller forgot to load checkpoint-last
        fresh = make_model(seed=9)
        train(fresh, make_data(), noisy_collate, cfg_for(out, max_steps=6, resume=True), save_model=saver(fresh))


def test_evaluation_does_not_shift_training(tmp_path):
    """evaluate() draws random numbers on rank 0 only; training must not notice."""
    data, dev = make_data(), make_data(12, seed=1)
    plain, evaluated = make_model(), make_model()
    train(plain, data, noisy_collate, cfg_for(tmp_path / "a", max_steps=8), save_model=saver(plain))
    train(evaluated, data, noisy_collate, cfg_for(tmp_path / "b", max_steps=8, eval_every=1),
          evaluate=evaluator(evaluated, dev), save_model=saver(evaluated))
    for pa, pb in zip(plain.parameters(), evaluated.parameters()):
        assert torch.equal(pa, pb)
    assert [e["step"] for e in read_log(tmp_path / "b") if "eval" in e] == list(range(1, 9))


# ---- two processes ------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {tests!r})
from test_train import TinyObjective, make_data, noisy_collate, saver, evaluator
from erniegen.train import TrainConfig, train

out = sys.argv[1]
torch.manual_seed(int(os.environ["RANK"]))      # different inits: DDP must broadcast rank 0's
model = TinyObjective()
init = {{k: v.clone() for k, v in model.state_dict().items()}}
seen = []
def collate(examples):
    seen.extend(e["idx"] for e in examples)
    return noisy_collate(examples)
data = [dict(d, idx=i) for i, d in enumerate(make_data(33))]
cfg = TrainConfig(output_dir=out, max_steps=4, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=1,
                  log_every=1, precision="fp32", seed=3)
summary = train(model, data, collate, cfg, evaluate=evaluator(model, make_data(8, seed=1)),
                save_model=saver(model))
rank = os.environ["RANK"]
torch.save({{"init": init, "final": model.state_dict(), "seen": seen, "summary": summary}},
           os.path.join(out, f"params_{{rank}}.pt"))
"""


def run_two_ranks(tmp_path: Path, script_text: str) -> Path:
    """Run ``script_text`` (formatted with this folder as ``tests``) on two torchrun ranks; returns its output
    folder."""
    script = tmp_path / "ddp_script.py"
    script.write_text(textwrap.dedent(script_text.format(tests=str(Path(__file__).parent))))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_process_torchrun(tmp_path):
    out = run_two_ranks(tmp_path, DDP_SCRIPT)
    r0, r1 = (torch.load(out / f"params_{r}.pt", weights_only=False) for r in range(2))
    for k in r0["final"]:
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    assert not torch.equal(r0["final"]["out.weight"], r0["init"]["out.weight"])
    assert not torch.equal(r1["final"]["emb.weight"], r1["init"]["emb.weight"])
    # 33 examples -> 16 per rank, 4 micro-batches of 4 -> 2 steps per epoch: 2 epochs, disjoint shards
    assert len(r0["seen"]) == len(r1["seen"]) == 32
    for epoch in range(2):
        shard0, shard1 = (set(r["seen"][16 * epoch: 16 * (epoch + 1)]) for r in (r0, r1))
        assert len(shard0) == len(shard1) == 16 and not shard0 & shard1
    assert r0["summary"]["global_step"] == r1["summary"]["global_step"] == 4
    assert r0["summary"]["best_metric"] is not None and r1["summary"]["best_metric"] is None
    assert sorted(p.name for p in (out / "checkpoint-last").iterdir()) == \
           ["model.pt", "rng_state_0.pt", "rng_state_1.pt", "trainer_state.pt"]
    log = read_log(out)
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in log if "eval" in e] == [2, 4]


DDP_BUDGET_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
import erniegen.train as train_module
from test_train import TinyObjective, make_data, noisy_collate, saver
from erniegen.train import TrainConfig, train

out, rank, now = sys.argv[1], int(os.environ["RANK"]), [0.0]
train_module._clock = lambda: now[0]
model = TinyObjective()
forward = model.forward
def ticking(**batch):                  # rank 1's steps look three times slower than rank 0's
    now[0] += 1.0 if rank == 0 else 3.0
    return forward(**batch)
model.forward = ticking
cfg = TrainConfig(output_dir=out, max_steps=100, batch_size=4, lr=1e-2, log_every=5, precision="fp32", seed=3,
                  time_budget=30)
summary = train(model, make_data(33), noisy_collate, cfg, save_model=saver(model))
torch.save(summary, os.path.join(out, f"summary_{{rank}}.pt"))
"""


@pytest.mark.slow
def test_two_process_time_budget_follows_rank_0(tmp_path):
    """Each rank times its own steps, but all take rank 0's fit: 10 steps at 1 s, 20 more fit in 30 s (rank 1,
    at 3 s a step, would stop at once), and both end at step 30 together."""
    out = run_two_ranks(tmp_path, DDP_BUDGET_SCRIPT)
    for rank in range(2):
        summary = torch.load(out / f"summary_{rank}.pt", weights_only=False)
        assert (summary["global_step"], summary["total_steps"]) == (30, 30), rank
    assert [(e["step"], e["fitted_steps"]) for e in read_log(out) if "fitted_steps" in e] == [(10, 30)]


def test_length_grouped_batches_cover_every_example_once_and_group_lengths():
    from erniegen.train import epoch_batches
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = epoch_batches(1000, 0, 1, 10, lengths=lengths)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of 10 would spread ~80
    assert batches == epoch_batches(1000, 0, 1, 10, lengths=lengths)  # deterministic for resume
    assert batches != epoch_batches(1000, 1, 1, 10, lengths=lengths)


@pytest.mark.parametrize("native, precision, noted", [(False, "auto", True), (True, "auto", False),
                                                       (False, "fp32", False)])
def test_auto_precision_says_when_it_falls_back_to_fp32(tmp_path, monkeypatch, capsys, native, precision, noted):
    """A CPU without native bf16 trains several times slower; ``auto`` says why instead of leaving it silent."""
    import erniegen.train as train_module
    monkeypatch.setattr(train_module, "native_bf16", lambda device=None: native)
    model = make_model()
    train(model, make_data(), noisy_collate, cfg_for(tmp_path / "run", max_steps=1, warmup_steps=0,
                                                     precision=precision), save_model=saver(model))
    assert ("note: training in fp32: this CPU has no native bf16" in capsys.readouterr().err) is noted


def test_max_time_saves_and_stops_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """A clock that moves one second per reading: max_time=5 ends the run after step 5, mid-epoch and
    between two periodic saves; checkpoint-last holds step 5, and a resume ends where run A ends."""
    import erniegen.train as train_module
    data, dev = make_data(), make_data(12, seed=1)
    kw = dict(max_steps=14, save_every=4, log_every=3, eval_every=6, metric_for_best="neg_abs",
              greater_is_better=True)
    model_a = make_model()
    train(model_a, data, noisy_collate, cfg_for(tmp_path / "a", **kw), evaluate=evaluator(model_a, dev),
          save_model=saver(model_a))

    ticks = iter(range(10_000))
    monkeypatch.setattr(train_module, "_clock", lambda: float(next(ticks)))
    model_b, out_b = make_model(), tmp_path / "b"
    stopped = train(model_b, data, noisy_collate, cfg_for(out_b, max_time=5, **kw), evaluate=evaluator(model_b, dev),
                    save_model=saver(model_b))
    assert (stopped["stopped"], stopped["global_step"], stopped["total_steps"]) == ("max_time", 5, 14)
    state = torch.load(out_b / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert (state["global_step"], state["epoch"], state["micro_step"]) == (5, 0, 10)
    assert read_log(out_b)[-1] == {"step": 5, "stopped": "max_time"}
    assert not (out_b / "best").exists()                     # no evaluation ran before the stop

    model_c = make_model(seed=123)
    model_c.load_state_dict(torch.load(out_b / "checkpoint-last" / "model.pt", weights_only=True))
    done = train(model_c, data, noisy_collate, cfg_for(out_b, resume=True, max_time=1000, **kw),
                 evaluate=evaluator(model_c, dev), save_model=saver(model_c))
    assert done["stopped"] is None and done["global_step"] == 14
    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(pa, pc), name
    log_b = [e for e in read_log(out_b) if "stopped" not in e]
    assert comparable(read_log(tmp_path / "a")) == comparable(log_b)


class FakeClock:
    """Train's clock, moved only by work: one second per micro-batch, ``eval_s`` per evaluation."""

    def __init__(self, monkeypatch):
        import erniegen.train as train_module
        self.now = 0.0
        monkeypatch.setattr(train_module, "_clock", lambda: self.now)

    def objective(self, seconds=lambda n: 1.0) -> TinyObjective:
        """A model whose n-th forward takes ``seconds(n)``."""
        clock, model, calls = self, make_model(), iter(range(1, 10**6))
        forward = model.forward

        def ticking(**batch):
            clock.now += seconds(next(calls))
            return forward(**batch)
        model.forward = ticking
        return model

    def evaluator(self, model: nn.Module, eval_s: float):
        inner = evaluator(model, make_data(12, seed=1))

        def evaluate() -> dict[str, float]:
            self.now += eval_s
            return inner()
        return evaluate


def test_time_budget_fits_the_length_and_the_schedule_after_ten_steps(tmp_path, monkeypatch):
    """1 s a step, 30 s: after step 10 (10 s spent) 20 more steps fit; the warm-up becomes 10% of 30 and
    the decay ends at lr 0 on step 30 instead of 100."""
    clock = FakeClock(monkeypatch)
    model = clock.objective()
    out = tmp_path / "run"
    summary = train(model, make_data(), noisy_collate,
                    cfg_for(out, max_steps=100, grad_accum=1, warmup_steps=None, warmup_ratio=0.1, time_budget=30),
                    save_model=saver(model))
    assert (summary["global_step"], summary["total_steps"], clock.now) == (30, 30, 30.0)
    log = read_log(out)
    assert [e for e in log if "fitted_steps" in e] == [{"step": 10, "fitted_steps": 30, "step_s": 1.0, "eval_s": 0.0}]
    lrs = {e["step"]: e["lr"] for e in log if "lr" in e}
    expected = {s: 1e-2 * (s / 10 if s <= 10 else (30 - s + 1) / 27) for s in range(1, 31)}
    assert lrs.keys() == expected.keys()
    for s, lr in lrs.items():
        assert lr == pytest.approx(expected[s], rel=1e-9), s


def test_time_budget_counts_the_evaluations_it_has_seen(tmp_path, monkeypatch):
    """Evaluations every 8 steps cost 5 s each. At step 10 (15 s spent, one evaluation seen) the longest
    run that fits 60 s is 35 steps: 25 steps + 4 evaluations (16, 24, 32, 35) = 45 s; the refits every ten
    steps and after each evaluation keep it, and the run ends, its last evaluation included, at 60 s."""
    clock = FakeClock(monkeypatch)
    model = clock.objective()
    out = tmp_path / "run"
    summary = train(model, make_data(), noisy_collate,
                    cfg_for(out, max_steps=100, grad_accum=1, eval_every=8, time_budget=60),
                    evaluate=clock.evaluator(model, eval_s=4),  # + its forward's 1 s
                    save_model=saver(model))
    assert (summary["global_step"], summary["total_steps"], clock.now) == (35, 35, 60.0)
    fits = [(e["step"], e["fitted_steps"], e["eval_s"]) for e in read_log(out) if "fitted_steps" in e]
    assert fits == [(10, 35, 5.0)]                     # the refits after each evaluation change nothing


def test_time_budget_follows_steps_that_slow_down(tmp_path, monkeypatch):
    """Steps 1-20 take 1 s, then 2 s: the fit at step 10 plans 60 steps for 60 s; the refits every ten steps
    shrink it (step 30: mean 38/28 s a step, 20 s left: 44 steps) until the time is spent at step 40."""
    clock = FakeClock(monkeypatch)
    model = clock.objective(seconds=lambda n: 1.0 if n <= 20 else 2.0)
    out = tmp_path / "run"
    summary = train(model, make_data(), noisy_collate, cfg_for(out, max_steps=100, grad_accum=1, time_budget=60),
                    save_model=saver(model))
    assert (summary["global_step"], summary["total_steps"], clock.now) == (40, 40, 60.0)
    assert [(e["step"], e["fitted_steps"]) for e in read_log(out) if "fitted_steps" in e] == [(10, 60), (30, 44),
                                                                                             (40, 40)]


def test_time_budget_never_outgrows_the_planned_length_nor_stops_before_the_fit(tmp_path, monkeypatch):
    clock = FakeClock(monkeypatch)
    model = clock.objective()
    summary = train(model, make_data(), noisy_collate, cfg_for(tmp_path / "a", max_steps=40, grad_accum=1,
                                                               time_budget=1000), save_model=saver(model))
    assert (summary["global_step"], summary["total_steps"]) == (40, 40)
    model = clock.objective()
    summary = train(model, make_data(), noisy_collate, cfg_for(tmp_path / "b", max_steps=40, grad_accum=1,
                                                               time_budget=0), save_model=saver(model))
    assert (summary["global_step"], summary["total_steps"]) == (10, 10)   # the fit's ten steps, then done


def test_a_resume_keeps_the_fitted_length_and_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    clock = FakeClock(monkeypatch)
    kw = dict(max_steps=100, grad_accum=1, warmup_steps=None, time_budget=30)
    model_a = clock.objective()
    train(model_a, make_data(), noisy_collate, cfg_for(tmp_path / "a", **kw), save_model=saver(model_a))

    clock.now = 0.0
    model_b, out_b = clock.objective(), tmp_path / "b"
    stopped = train(model_b, make_data(), noisy_collate, cfg_for(out_b, max_time=15, **kw), save_model=saver(model_b))
    assert (stopped["stopped"], stopped["global_step"], stopped["total_steps"]) == ("max_time", 15, 30)
    model_c = clock.objective()
    model_c.load_state_dict(torch.load(out_b / "checkpoint-last" / "model.pt", weights_only=True))
    done = train(model_c, make_data(), noisy_collate, cfg_for(out_b, resume=True, **kw), save_model=saver(model_c))
    assert (done["global_step"], done["total_steps"]) == (30, 30)   # not refitted to a fresh 30 s
    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(pa, pc), name


@pytest.mark.parametrize("text, seconds", [("45", 45), ("2:30", 150), ("1:50:00", 6600), ("01:00:00:00", 86400),
                                           ("0", 0), ("1.5:00", 90)])
def test_parse_duration(text, seconds):
    from erniegen.train import parse_duration
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4:5", "-1:00", "nan", "1::00"])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    from erniegen.train import parse_duration
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_save_first_then_a_kill_before_step_one_resumes_to_the_uninterrupted_run(tmp_path):
    """save_first writes checkpoint-last at step 0 (a prepared model's weights); a run killed right after
    resumes from it to exactly the weights of a run never saved or stopped."""
    data = make_data()
    kw = dict(max_steps=6, save_every=3, log_every=2)
    model_a = make_model()
    train(model_a, data, noisy_collate, cfg_for(tmp_path / "a", **kw), save_model=saver(model_a))

    def killed_collate(examples):
        raise KeyboardInterrupt  # the first batch never trains: the kill lands right after the step-0 save

    model_b, out_b = make_model(), tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(model_b, data, killed_collate, cfg_for(out_b, **kw), save_model=saver(model_b), save_first=True)
    state = torch.load(out_b / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert (state["global_step"], state["epoch"], state["micro_step"]) == (0, 0, 0)
    model_c = make_model(seed=123)
    model_c.load_state_dict(torch.load(out_b / "checkpoint-last" / "model.pt", weights_only=True))
    done = train(model_c, data, noisy_collate, cfg_for(out_b, resume=True, **kw), save_model=saver(model_c))
    assert done["global_step"] == 6
    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(pa, pc), name
