"""ERNIE-GEN pre-training: example layout and span-flow masks, the combined loss, exact resume of a
streamed run, two-process DDP and FSDP under torchrun, and the output loading into finetune."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_minilm

import erniegen.pretrain as pt
from erniegen.batch import collate_pairs
from erniegen.ernie_gen import encode_context, placeholder_pass
from erniegen.masks import SPAN, target_roles
from erniegen.model import Transformer
from erniegen.pretrain_data import FragmentConfig, build_pretrain_example
from erniegen.spans import SpanVocab
from erniegen.train import ResumableStream, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
WORDS = ["the", "river", "flows", "past", "the", "old", "city", "where", "a", "king", "built", "towers", "of",
         "stone", "and", "glass", "while", "students", "of", "the", "university", "asked", "who", "first",
         "made", "the", "steam", "engine"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine extra threads only wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random model with the real MiniLM tokenizer (30,522 wordpieces), 128 positions."""
    return save_tiny_minilm(tmp_path_factory.mktemp("tiny-minilm"), 128)


def write_corpus(path: Path, n_docs: int) -> Path:
    """Documents of 8 to 16 words, each one sequence at max_len 64; doc i starts with a marker word."""
    lines = [f"doc{i} " + " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(8 + i % 9)) for i in range(n_docs)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


def config(tiny_dir: Path, corpus: Path, out: Path, **trainer) -> pt.PretrainConfig:
    base = {"max_steps": 8, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 2, "save_every": 3,
            "log_every": 1, "precision": "fp32", "seed": 5}
    return pt.PretrainConfig(model=str(tiny_dir), corpus=str(corpus), output=str(out), max_len=64,
                             trainer=TrainConfig(output_dir="", **(base | trainer)))


# ---- one example, its masks and its loss ----------------------------------------------------------


def test_example_layout_span_mask_rows_and_loss(tiny_dir):
    model = Transformer.from_pretrained(str(tiny_dir)).eval()
    cls_id, sep_id = model.tokenizer.cls_token_id, model.tokenizer.sep_token_id
    assert (cls_id, sep_id, model.attn_id) == (101, 102, 1)
    # S = 12 tokens; one fragment of 3 (γ = 0.25); the vocabulary holds every adjacent pair of S as a
    # bigram, so the fragment [a, a+1, a+2] is segmented as a bigram then a single token
    seq = list(range(2000, 2012))
    vocab = SpanVocab(n_tokens=12, unigrams={}, bigrams={(t, t + 1): (2, 1.0) for t in seq}, trigrams={})
    ex = build_pretrain_example(seq, vocab, FragmentConfig(distributions=((1.0, 3, 3),)), random.Random(0))
    a = ex["target_ids"][0]
    assert ex["target_ids"] == [a, a + 1, a + 2] and ex["span_starts"] == [0, 2]
    assert ex["source_ids"] == [t for t in seq if t not in ex["target_ids"]]
    feats = pt.pretrain_features(ex, cls_id, sep_id)
    assert feats == {"source_ids": [101, *ex["source_ids"], 102], "target_ids": [a, a + 1, a + 2, 102],
                     "span_starts": [0, 2, 3]}                  # the end [SEP] is a span of its own

    # the span flow's mask rows, captured from the objective's own call of the model
    obj = pt.build_objective(model, pt.PretrainConfig(model="-", corpus="-", output="-")).eval()
    assert (obj.cfg.word_weight, obj.cfg.noise_rate, obj.cfg.method) == (0.5, 0.05, "ernie-gen")
    masks = []
    hook = model.register_forward_pre_hook(lambda mod, args: masks.append(args[3]))
    batch = collate_pairs([feats])
    out = obj(**batch)
    hook.remove()
    assert batch["span_start"].tolist() == [[0, 0, 2, 3]]
    # keys: 11 source | 4 contextual t0..t3 | 4 word [A] | 4 span [A]; span [A]_i sees the source,
    # the contextual tokens before its span's start, and itself
    src = "1" * 11
    expected = [src + "0000" + "0000" + "1000",     # t0 = a      (span [a a+1] starts at 0)
                src + "0000" + "0000" + "0100",     # t1 = a+1    (same span: sees no target token)
                src + "1100" + "0000" + "0010",     # t2 = a+2    (span at 2: sees t0 t1)
                src + "1110" + "0000" + "0001"]     # t3 = [SEP]  (span at 3: sees t0 t1 t2)
    span_rows = masks[1][0, 4:]                     # second call = the placeholder pass; word rows first
    assert ["".join(str(int(v)) for v in row) for row in span_rows.tolist()] == expected

    # loss = 0.5 L_word + 0.5 L_span, L_span recomputed by hand from the span placeholders
    _, kv, roles = encode_context(model, batch["src_ids"], batch["src_len"], batch["tgt_ids"], batch["tgt_len"])
    span = target_roles(SPAN, batch["tgt_len"], 4, span_start=batch["span_start"])
    h = placeholder_pass(model, model.attn_id, batch["src_len"], span, kv, roles)
    l_span = F.cross_entropy(model.logits(h[0]), batch["tgt_ids"][0], label_smoothing=0.1)
    assert torch.allclose(out["loss_span"], l_span, atol=1e-6)
    assert torch.allclose(out["loss"], 0.5 * out["loss_word"] + 0.5 * l_span, atol=1e-6)


def test_ablation_switches_and_bad_settings(tiny_dir, tmp_path):
    model = Transformer.from_pretrained(str(tiny_dir))
    cfg = lambda **kw: pt.PretrainConfig(model="-", corpus="-", output="-", **kw)
    assert pt.build_objective(model, cfg(word_weight=1.0)).cfg.word_weight == 1.0      # no span flow
    assert pt.build_objective(model, cfg(noise_rate=0.0)).cfg.noise_rate == 0.0        # no noise
    typical = pt.build_objective(model, cfg(method="typical")).cfg
    assert (typical.method, typical.word_weight) == ("typical", 1.0)
    with pytest.raises(ValueError, match="typical"):
        pt.build_objective(model, cfg(method="typical", word_weight=0.5))
    with pytest.raises(ValueError, match="method='mist'"):
        cfg(method="mist").resolved_word_weight()
    corpus = write_corpus(tmp_path / "c.jsonl", 4)
    with pytest.raises(ValueError, match=r"max_steps \(--max-steps\) is required"):
        pt.pretrain(config(tiny_dir, corpus, tmp_path / "o", max_steps=None))
    with pytest.raises(ValueError, match="max_len=512 exceeds the 128 positions"):
        pt.pretrain(dataclasses.replace(config(tiny_dir, corpus, tmp_path / "o"), max_len=512))
    with pytest.raises(ValueError, match="fsdp=True shards the model over processes, but world_size=1"):
        pt.pretrain(config(tiny_dir, corpus, tmp_path / "o2", fsdp=True, max_steps=1))
    assert pt.fit_warmup(TrainConfig(output_dir="o", max_steps=20, warmup_steps=4000)).warmup_steps == 20
    assert pt.fit_warmup(TrainConfig(output_dir="o", max_steps=9000, warmup_steps=4000)).warmup_steps == 4000


# ---- exact resume of a streamed run -----------------------------------------------------------------


class Killed(Exception):
    pass


def test_a_spent_time_budget_fits_a_pretraining_stream_to_its_ten_timed_steps(tiny_dir, tmp_path):
    """A stream has no epochs: the fit bounds max_steps alone, and a budget spent before the first step ends the run
    at the fit (pre-training counts its span vocabulary and loading against the budget)."""
    summary = pt.pretrain(config(tiny_dir, write_corpus(tmp_path / "c.jsonl", 9), tmp_path / "o", max_steps=14,
                                 time_budget=0))
    assert (summary["global_step"], summary["total_steps"]) == (10, 10)
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["fitted_steps"]) for e in log if "fitted_steps" in e] == [(10, 10)]


def test_resume_equals_uninterrupted_run(tiny_dir, tmp_path, monkeypatch):
    """9 one-sequence documents, 2 per micro-batch, 2 micro-batches per step: a pass is 5 micro-batches
    (the last holds 1), so step 3 ends one micro-batch into the second pass."""
    corpus = write_corpus(tmp_path / "c.jsonl", 9)
    seen: list[list[list[int]]] = []
    real_collate = pt.collate_pairs
    monkeypatch.setattr(pt, "collate_pairs", lambda items, pad: seen.append([x["target_ids"] for x in items])
                        or real_collate(items, pad))

    out_a = tmp_path / "a"
    pt.pretrain(config(tiny_dir, corpus, out_a))
    batches_a, seen[:] = list(seen), []
    assert [len(b) for b in batches_a] == [2, 2, 2, 2, 1] * 3 + [2]          # 16 micro-batches, 3 passes + 1
    assert (out_a / "span_vocab.tsv").is_file()                             # built from the corpus
    vocab_text = (out_a / "span_vocab.tsv").read_text()
    with pytest.raises(ValueError, match="already holds a checkpoint"):   # forgot --resume: nothing rebuilt
        other = write_corpus(tmp_path / "other.jsonl", 3)
        pt.pretrain(dataclasses.replace(config(tiny_dir, corpus, out_a), corpus=str(other)))
    assert (out_a / "span_vocab.tsv").read_text() == vocab_text

    # run B dies while writing its second resumable checkpoint (step 6): step 3 is the last good one
    out_b = tmp_path / "b"
    real_save = Transformer.save_pretrained
    calls = []

    def dying_save(self, d):
        if Path(d).name.startswith("checkpoint-last"):
            calls.append(d)
            if len(calls) == 2:
                raise Killed
        real_save(self, d)
    monkeypatch.setattr(Transformer, "save_pretrained", dying_save)
    with pytest.raises(Killed):
        pt.pretrain(config(tiny_dir, corpus, out_b))
    monkeypatch.setattr(Transformer, "save_pretrained", real_save)
    state = torch.load(out_b / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 3
    # second pass, just past its first micro-batch: its first two documents in that pass's order, which is
    # drawn from the pass's seed and the window's first document (one window: 9 < the default 10,000)
    order = list(range(9))
    random.Random(f"{pt.pass_seed(5, 1)}:0").shuffle(order)
    assert order != list(range(9))
    assert state["streams"] == [{"epoch": 1, "data": {"epoch": 1, "stream": {
        "doc_index": order[1], "seq_offset": 1, "rank": 0, "world_size": 1}}}]

    seen[:] = []
    summary = pt.pretrain(config(tiny_dir, corpus, out_b, resume=True))
    assert summary["global_step"] == 8
    assert seen == batches_a[6:]                  # the resumed stream starts at the exact next example
    pa = Transformer.from_pretrained(str(out_a / "best")).state_dict()
    pb = Transformer.from_pretrained(str(out_b / "best")).state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["embeddings.word.weight"],
                           Transformer.from_pretrained(str(tiny_dir)).state_dict()["embeddings.word.weight"])
    logs = [[{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "examples_per_s")}
             for x in (o / "log.jsonl").read_text().splitlines()] for o in (out_a, out_b)]
    assert logs[0] == logs[1] and [e["step"] for e in logs[0]] == list(range(1, 9))
    assert {"loss", "loss_word", "loss_span"} <= set(logs[0][0])


def test_stream_is_a_resumable_stream(tiny_dir, tmp_path):
    model = Transformer.from_pretrained(str(tiny_dir))
    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    from erniegen.pretrain_data import CorpusSpec
    vocab = SpanVocab(n_tokens=1, unigrams={}, bigrams={}, trigrams={})
    make = lambda: pt.PretrainStream(CorpusSpec.from_arg(str(corpus)), model.tokenizer, vocab, 2, 64, 0)
    stream = make()
    assert isinstance(stream, ResumableStream)
    it = stream.batches(0, 0, 1)
    first = next(it)
    saved = stream.state_dict()
    assert saved == {"epoch": 0, "stream": {"doc_index": 1, "seq_offset": 1, "rank": 0, "world_size": 1}}
    rest = list(it)
    resumed = make()
    resumed.load_state_dict(saved)
    assert list(resumed.batches(0, 0, 1)) == rest and [len(b) for b in [first, *rest]] == [2, 2, 1]
    again = list(resumed.batches(1, 0, 1))           # a new pass starts at the beginning, new fragments
    tokens = lambda bs: [sorted(x["source_ids"][1:-1] + x["target_ids"][:-1]) for b in bs for x in b]
    assert tokens(again) == tokens([first, *rest])    # the same 5 documents, in order
    assert [x["target_ids"] for b in again for x in b] != [x["target_ids"] for b in [first, *rest] for x in b]


# ---- the output folder feeds finetune -------------------------------------------------------------


def test_output_loads_and_finetunes(tiny_dir, tmp_path):
    from erniegen import cli
    corpus = write_corpus(tmp_path / "c.jsonl", 6)
    out = tmp_path / "pre"
    cli.main(["pretrain", "--model", str(tiny_dir), "--corpus", str(corpus), "--output", str(out),
              "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--max-len", "64",
              "--precision", "fp32", "--noise-rate", "0", "--word-weight", "1"])
    model = Transformer.from_pretrained(str(out / "best"))
    assert model.settings.method == "ernie-gen"
    assert model.settings.extra["pretrain"] == {"word_weight": 1.0, "noise_rate": 0.0, "max_len": 64,
                                                "method": "ernie-gen"}
    rows = [{"source": f"the river flows past city {i}", "target": f"what flows past city {i} ?"} for i in range(4)]
    train_file = tmp_path / "qg.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli.main(["finetune", "--model", str(out / "best"), "--train", str(train_file), "--output", str(tmp_path / "ft"),
              "--max-steps", "1", "--batch-size", "2", "--max-source-len", "32", "--max-target-len", "16",
              "--precision", "fp32"])
    tuned = Transformer.from_pretrained(str(tmp_path / "ft" / "best"))
    assert tuned.settings.task == "squad_qg"
    # squad_qg keeps the word table frozen (its preset); the head trains
    assert not torch.equal(tuned.state_dict()["head.dense.weight"], model.state_dict()["head.dense.weight"])
    assert torch.equal(tuned.state_dict()["embeddings.word.weight"], model.state_dict()["embeddings.word.weight"])


def test_a_headless_checkpoint_warms_its_head_on_the_corpus_before_pretraining(tmp_path, monkeypatch, capsys):
    """all-MiniLM-L6-v2 has no masked-LM head: pre-training starts as fine-tuning does, [ATTN] from [MASK] and the
    head trained alone over the corpus's first sequences, so that the pre-training steps do not go to the head."""
    import transformers
    from erniegen.model import resolve_model_path
    torch.manual_seed(0)
    enc = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=64, max_position_embeddings=128))
    enc.save_pretrained(tmp_path / "enc")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(resolve_model_path("minilm")))
    tokenizer.save_pretrained(tmp_path / "enc")
    corpus = write_corpus(tmp_path / "c.jsonl", 6)
    texts = pt.head_warmup_texts(pt.CorpusSpec.from_arg(str(corpus)), tokenizer)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert texts == [tokenizer(d)["input_ids"] for d in docs]  # one short document each: [CLS] doc [SEP]

    seen = {}

    def record(objective, *args, **kwargs):  # the model as the pre-training loop receives it
        seen[steps] = {n: p.detach().clone() for n, p in objective.model.named_parameters()}
        return {}
    monkeypatch.setattr(pt, "train", record)
    for steps in (0, 3):
        cfg = dataclasses.replace(config(tmp_path / "enc", corpus, tmp_path / f"out{steps}"), head_warmup_steps=steps)
        with pytest.warns(UserWarning, match="no masked-LM head"):
            pt.pretrain(cfg)
    assert "head warm-up: 3 masked-LM steps over 6 texts" in capsys.readouterr().err
    cold, warm = seen[0], seen[3]
    moved = sorted(n for n in cold if not torch.equal(cold[n], warm[n]))
    assert moved == ["head.bias", "head.dense.bias", "head.dense.weight", "head.norm.bias", "head.norm.weight"]
    with pytest.warns(UserWarning, match="no masked-LM head"):
        model = Transformer.from_pretrained(str(tmp_path / "enc"))
    word = "embeddings.word.weight"
    attn, mask = model.attn_id, tokenizer.mask_token_id
    assert torch.equal(warm[word][attn], warm[word][mask]) and not torch.equal(model.state_dict()[word][attn],
                                                                                model.state_dict()[word][mask])


# ---- two processes --------------------------------------------------------------------------------


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], env=env or ENV, capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


SYNC_SCRIPT = """
import sys
from pathlib import Path
import torch, torch.distributed as dist
import erniegen.pretrain as pt
from erniegen.cli import main

dumps = Path(sys.argv[1])
real_train = pt.train
def train_and_dump(objective, data, *args, **kwargs):   # each rank's parameters and stream after the loop
    summary = real_train(objective, data, *args, **kwargs)
    torch.save({"params": objective.model.state_dict(), "stream": data.state_dict()},
               dumps / f"rank{dist.get_rank()}.pt")
    return summary
pt.train = train_and_dump
main(sys.argv[2:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ernie-gen", "lplm"])
def test_two_process_cli_pretrain_keeps_ranks_in_sync(objective, tiny_dir, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 11)
    out, dumps = tmp_path / "out", tmp_path / "dumps"
    dumps.mkdir()
    script = tmp_path / "sync_run.py"
    script.write_text(textwrap.dedent(SYNC_SCRIPT))
    torchrun(str(script), str(dumps), "pretrain", "--model", str(tiny_dir), "--corpus", str(corpus), "--output",
             str(out), "--max-steps", "3", "--batch-size", "2", "--grad-accum", "2", "--max-len", "64",
             "--lr", "1e-3", "--precision", "fp32", "--log-every", "1", "--shuffle-window", "1",
             "--objective", objective)
    r0, r1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in range(2))
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    init = Transformer.from_pretrained(str(tiny_dir)).state_dict()
    assert not torch.equal(r0["params"]["embeddings.word.weight"], init["embeddings.word.weight"])
    saved = Transformer.from_pretrained(str(out / "best")).state_dict()
    assert all(torch.equal(saved[k], r0["params"][k]) for k in saved)
    # 11 documents: rank 0 reads 0,2,..,10 as micro-batches [0 2] [4 6] [8 10], rank 1 reads 1,3,..,9 as
    # [1 3] [5 7] [9]; 3 steps x 2 micro-batches = 2 passes each, ending at its shard's last document
    assert r0["stream"] == {"epoch": 1, "stream": {"doc_index": 10, "seq_offset": 1, "rank": 0, "world_size": 2}}
    assert r1["stream"] == {"epoch": 1, "stream": {"doc_index": 9, "seq_offset": 1, "rank": 1, "world_size": 2}}
    state = torch.load(out / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert [s["data"] for s in state["streams"]] == [r0["stream"], r1["stream"]]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(e["tokens_per_s"] > 0 for e in log)


FSDP_SCRIPT = """
import dataclasses, json, shutil, sys
from pathlib import Path
import torch, torch.distributed as dist
import erniegen.train as tr
from erniegen.pretrain import pretrain
from erniegen.model import Transformer
from test_pretrain import config

tiny, corpus, vocab, out = (Path(a) for a in sys.argv[1:5])
dist.init_process_group("gloo")
real_write = tr._atomic_write_dir
def write_and_copy_step2(final, write):           # keep a copy of the step-2 checkpoint (rank 0 writes)
    real_write(final, write)
    if final.name == "checkpoint-last" and torch.load(final / "trainer_state.pt")["global_step"] == 2:
        shutil.copytree(final, out / "b" / "checkpoint-last")
tr._atomic_write_dir = write_and_copy_step2
run = lambda name, **kw: pretrain(dataclasses.replace(config(tiny, corpus, out / name, max_steps=4, save_every=2,
                                                             **kw), span_vocab=str(vocab)))
run("a", fsdp=True)
tr._atomic_write_dir = real_write
run("b", fsdp=True, resume=True)
run("ddp")
if dist.get_rank() == 0:
    a, b, d = (Transformer.from_pretrained(str(out / n / "best")).state_dict() for n in ("a", "b", "ddp"))
    result = {"resume_equal": all(torch.equal(a[k], b[k]) for k in a),
              "ddp_max_diff": max(float((a[k] - d[k]).abs().max()) for k in a),
              "moved": float((a["embeddings.word.weight"] - Transformer.from_pretrained(str(tiny)).state_dict()
                              ["embeddings.word.weight"]).abs().max()),
              "files": sorted(p.name for p in (out / "a" / "checkpoint-last").iterdir())}
    (out / "result.json").write_text(json.dumps(result))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_fsdp_matches_ddp_and_resumes_exactly(tiny_dir, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 11)
    vocab = tmp_path / "v.tsv"
    SpanVocab(n_tokens=1, unigrams={}, bigrams={}, trigrams={}).save(str(vocab))
    script = tmp_path / "fsdp_run.py"
    script.write_text(textwrap.dedent(FSDP_SCRIPT))
    torchrun(str(script), str(tiny_dir), str(corpus), str(vocab), str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["resume_equal"] is True
    assert result["ddp_max_diff"] < 1e-6 < result["moved"]      # same training, up to float summation order
    assert {"optimizer_0.pt", "optimizer_1.pt", "rng_state_0.pt", "rng_state_1.pt",
            "trainer_state.pt", "model.safetensors"} <= set(result["files"])


def test_pretraining_stopped_in_its_head_warm_up_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """--max-time during the head warm-up of a headless checkpoint: the state is saved, --resume warms on and
    pre-trains from the step-0 checkpoint, and the model equals an uninterrupted run's."""
    import itertools
    import transformers
    from safetensors.torch import load_file
    import erniegen.train as train_module
    from erniegen.model import resolve_model_path
    torch.manual_seed(0)
    enc = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=64, max_position_embeddings=128))
    enc.save_pretrained(tmp_path / "enc")
    transformers.AutoTokenizer.from_pretrained(str(resolve_model_path("minilm"))).save_pretrained(tmp_path / "enc")
    corpus = write_corpus(tmp_path / "c.jsonl", 12)

    def run(out, **trainer):
        cfg = dataclasses.replace(config(tmp_path / "enc", corpus, tmp_path / out, max_steps=4, **trainer),
                                  head_warmup_steps=6)
        with pytest.warns(UserWarning, match="no masked-LM head"):
            return pt.pretrain(cfg)

    run("whole")
    ticks = itertools.count()
    monkeypatch.setattr(train_module, "_clock", lambda: float(next(ticks)))
    stopped = run("cut", max_time=6)
    assert (stopped["stopped"], stopped["preparing"]) == ("max_time", "head warm-up") and 0 < stopped["step"] < 6
    monkeypatch.setattr(train_module, "_clock", time.monotonic)
    done = run("cut", resume=True)
    assert done["stopped"] is None and done["global_step"] == 4
    assert not (tmp_path / "cut" / "preparation.pt").exists()
    a, b = (load_file(tmp_path / out / "best" / "model.safetensors") for out in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
