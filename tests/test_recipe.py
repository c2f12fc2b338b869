"""The fine-tuning recipe's pieces for checkpoints that were never trained to generate, and its speed paths:
[ATTN] initialisation, the masked-LM head warm-up, the noise ramp, the clean dev loss, training attention."""
import json
from dataclasses import replace

import pytest
import torch
import transformers

from erniegen.batch import collate_pairs
from erniegen.ernie_gen import ErnieGenConfig, ErnieGenObjective, noise_at, replacement_vocab
from erniegen.finetune import dev_loss
from erniegen.data import Features, get_task
from erniegen.head_warmup import adapt_to_task, head_parameters, init_attn_embedding, masked_lm_batches, warm_up_head
from erniegen.model import Transformer, _math_attention

from conftest import VOCAB

ITEMS = [{"source_ids": [4, 10, 11, 12, 5], "target_ids": [20, 21, 22, 5]},
         {"source_ids": [4, 30, 5], "target_ids": [40, 5]}]


def _objective(model, **cfg):
    repl = replacement_vocab(model.tokenizer, model.config.vocab_size, [model.attn_id])
    return ErnieGenObjective(model, ErnieGenConfig(**cfg), model.attn_id, repl)


@pytest.fixture
def headless(tmp_path, tiny_tokenizer):
    """A saved BERT encoder without a masked-LM head (like all-MiniLM-L6-v2), loaded by erniegen."""
    torch.manual_seed(2)
    enc = transformers.BertModel(transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=64))
    enc.save_pretrained(tmp_path / "enc")
    tiny_tokenizer.save_pretrained(tmp_path / "enc")
    with pytest.warns(UserWarning, match="no masked-LM head"):
        return Transformer.from_pretrained(str(tmp_path / "enc"))


def test_attn_row_starts_as_the_mask_row(tiny_model):
    word = tiny_model.embeddings.word.weight
    attn, mask = tiny_model.attn_id, tiny_model.tokenizer.mask_token_id
    before = word.detach().clone()
    assert VOCAB[attn] == "[unused0]" and not torch.equal(word[attn], word[mask])
    assert init_attn_embedding(tiny_model)
    assert torch.equal(word[attn], before[mask])
    changed = (word != before).any(1).nonzero().flatten().tolist()
    assert changed == [attn]  # no other row moved


def test_head_warm_up_trains_the_head_alone_and_lowers_its_loss(headless):
    assert headless.head_was_missing and not headless.trained_by_erniegen
    names = {id(p): n for n, p in headless.named_parameters()}
    head = {id(p) for p in head_parameters(headless)}
    assert sorted(names[i] for i in head) == ["head.bias", "head.dense.bias", "head.dense.weight",
                                             "head.norm.bias", "head.norm.weight"]
    before = {n: p.detach().clone() for n, p in headless.named_parameters()}
    rng = torch.get_rng_state()
    texts = [[4, 10 + i % 20, 11 + i % 7, 30, 12, 5] for i in range(64)]
    stats = warm_up_head(headless, texts, 40, batch_size=16, lr=1e-2, seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # its own generator: the caller's stream is untouched
    for n, p in headless.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (id(p) in head), n
        assert p.requires_grad  # frozen parameters are given back
    assert stats["steps"] == 40 and stats["loss_last"] < stats["loss_first"] - 0.5


def test_masked_lm_batches_group_lengths_and_use_every_text_once_a_pass():
    lengths = [3, 30] * 16  # short questions and long sources, interleaved as the recipe's texts are not
    batches = masked_lm_batches(lengths, batch_size=8, seed=0)
    passes = [[next(batches) for _ in range(4)] for _ in range(2)]
    for one_pass in passes:
        assert sorted(i for b in one_pass for i in b) == list(range(32))
        assert all(len({lengths[i] for i in b}) == 1 for b in one_pass)  # no batch pads a 3 to 30
    assert passes[0] != passes[1]  # each pass is drawn afresh
    again = masked_lm_batches(lengths, batch_size=8, seed=0)
    assert [next(again) for _ in range(4)] == passes[0]


def test_recipe_skips_the_warm_up_when_a_head_exists(tmp_path, tiny_model, capsys):
    from erniegen.finetune import FinetuneConfig, prepare_untrained_checkpoint
    feats = [Features(source_ids=[4, 10, 11, 5], target_ids=[20, 5])] * 8
    cfg = FinetuneConfig(train="unused", output=str(tmp_path))
    tiny_model.head_was_missing, tiny_model.trained_by_erniegen = False, False
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    preset = replace(get_task("squad_qg"), adapt_steps=0)  # the head warm-up alone (adaptation: tested above)
    prepare_untrained_checkpoint(tiny_model, cfg, preset, feats, seed=0)
    assert "head warm-up" not in capsys.readouterr().err
    moved = [n for n, p in tiny_model.named_parameters() if not torch.equal(p, before[n])]
    assert moved == ["embeddings.word.weight"]  # the [ATTN] row only
    # an erniegen checkpoint keeps its trained [ATTN] row and head untouched
    tiny_model.trained_by_erniegen, tiny_model.head_was_missing = True, True
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    prepare_untrained_checkpoint(tiny_model, cfg, get_task("squad_qg"), feats, seed=0)
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())


def test_task_adaptation_trains_everything_but_a_frozen_word_table(headless):
    word = headless.embeddings.word.weight
    word.requires_grad_(False)  # as finetune() leaves it when the preset freezes the word table
    before = {n: p.detach().clone() for n, p in headless.named_parameters()}
    rng = torch.get_rng_state()
    texts = [[4, 10 + i % 20, 11 + i % 7, 30, 12, 5] for i in range(64)]
    stats = adapt_to_task(headless, texts, 100, batch_size=16, lr=1e-2, seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in headless.named_parameters():
        assert torch.equal(p, before[n]) == (p is word), n
    assert not word.requires_grad and headless.head.dense.weight.requires_grad  # freezing is given back as it was
    assert stats["steps"] == 100 and stats["loss_last"] < stats["loss_first"] - 0.5


def test_task_adaptation_runs_for_fresh_checkpoints_or_when_asked(tmp_path, tiny_model, capsys):
    from erniegen.finetune import FinetuneConfig, prepare_untrained_checkpoint
    feats = [Features(source_ids=[4, 10, 11, 5], target_ids=[20, 5])] * 8
    preset = replace(get_task("squad_qg"), adapt_steps=3)
    cfg = FinetuneConfig(train="unused", output=str(tmp_path), head_warmup_steps=0)
    tiny_model.trained_by_erniegen = True  # an erniegen checkpoint: the preset's adaptation is skipped
    prepare_untrained_checkpoint(tiny_model, cfg, preset, feats, seed=0)
    assert "task adaptation" not in capsys.readouterr().err
    prepare_untrained_checkpoint(tiny_model, replace(cfg, adapt_steps=2), preset, feats, seed=0)
    assert "task adaptation: 2 masked-LM steps" in capsys.readouterr().err  # asked for: any checkpoint
    tiny_model.trained_by_erniegen = False
    prepare_untrained_checkpoint(tiny_model, cfg, preset, feats, seed=0)
    assert "task adaptation: 3 masked-LM steps" in capsys.readouterr().err


def test_recipe_flags_survive_a_save(tmp_path, headless):
    headless.save_pretrained(tmp_path / "m")
    again = Transformer.from_pretrained(str(tmp_path / "m"))
    assert again.trained_by_erniegen and not again.head_was_missing
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]


def test_noise_ramp_reaches_rho_at_the_step_it_says(tiny_model):
    assert [noise_at(0.7, 0.25, s, 100) for s in (0, 5, 24, 25, 60, 99)] == \
        pytest.approx([0.0, 0.14, 0.672, 0.7, 0.7, 0.7])
    assert noise_at(0.7, 0.0, 0, 100) == 0.7  # no ramp: ρ_f from the first step
    obj = _objective(tiny_model, noise_rate=0.5, noise_ramp=0.5)
    assert obj.current_noise == 0.0
    obj.set_progress(10, 40)
    assert obj.current_noise == pytest.approx(0.25)
    obj.set_progress(20, 40)
    assert obj.current_noise == 0.5
    # at step 0 of a ramp the training loss is the clean loss (same dropout-free model)
    obj.set_progress(0, 40)
    batch = collate_pairs(ITEMS)
    assert torch.equal(obj.train()(**batch)["loss"], obj.eval()(**batch)["loss"])
    with pytest.raises(ValueError, match="noise_ramp"):
        ErnieGenConfig(noise_ramp=1.5)


def test_dev_loss_is_clean_and_leaves_the_training_rng_alone(tiny_model):
    noisy = _objective(tiny_model, noise_rate=0.9).train()
    clean = _objective(tiny_model, noise_rate=0.0).eval()
    batch = collate_pairs(ITEMS)
    with torch.no_grad():
        expected = float(clean(**batch)["loss"])
    torch.manual_seed(5)
    state = torch.get_rng_state()
    got = dev_loss(noisy, ITEMS, collate_pairs, batch_size=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert noisy.training  # its mode is given back
    # batches of one: the mean of the per-example losses
    with torch.no_grad():
        per_example = [float(clean(**collate_pairs([x]))["loss"]) for x in ITEMS]
    assert got == pytest.approx(sum(per_example) / 2, abs=1e-6)
    assert dev_loss(noisy, ITEMS, collate_pairs, batch_size=2) == pytest.approx(expected, abs=1e-6)


def test_training_attention_path_equals_the_fused_kernel():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) < 0.6
    mask[..., 0] = True  # every row sees something
    ours = _math_attention(q, k, v, mask, 0.0)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert torch.allclose(ours, ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))


def test_model_uses_the_same_attention_in_training_and_inference(tiny_model):
    """A training forward (explicit product) equals the no-grad forward (fused kernel)."""
    ids = torch.tensor([[4, 10, 11, 12, 5, 20, 21]])
    pos = torch.arange(7)[None]
    mask = torch.ones(1, 7, 7, dtype=torch.bool).tril()
    with torch.no_grad():
        fused, _ = tiny_model(ids, pos, torch.zeros_like(ids), mask)
    tiny_model.train()  # the tiny config has no dropout
    explicit, _ = tiny_model(ids, pos, torch.zeros_like(ids), mask)
    assert explicit.requires_grad
    assert torch.allclose(explicit, fused, atol=1e-5)


def test_training_evaluation_scores_the_text_that_generate_writes(tiny_model):
    """One detokenization: the dev evaluator scored "rhine ' s" while `generate` wrote "rhine's"."""
    from erniegen.data import Example, Features
    from erniegen.decoding import DecodeOptions, default_banned_ids, ids_to_text
    from erniegen.data import get_task
    from erniegen.finetune import dev_evaluator
    from erniegen.metrics import qg_scores
    tok = tiny_model.tokenizer
    assert ids_to_text(tiny_model, [tok.convert_tokens_to_ids(["who", "'", "s", "king", "?"])]) == ["who's king?"]
    sources = ["the king of the city [SEP] king", "steam engine power [SEP] steam"]
    targets = ["who's the king?", "what is steam?"]
    feats = [Features(source_ids=tok(s)["input_ids"], target_ids=tok(t)["input_ids"][1:]) for s, t in zip(sources, targets)]
    examples = [Example(source=s, target=t, row={}, where="x") for s, t in zip(sources, targets)]
    opts = DecodeOptions(num_beams=1, max_length=6, min_length=1, banned_ids=default_banned_ids(tiny_model))
    got = dev_evaluator(tiny_model, get_task("squad_qg"), examples, feats, "infilling", opts)()
    preds = tiny_model.generate(sources, num_beams=1, max_length=6, min_length=1)
    assert got == qg_scores(preds, targets, sources, meteor=False)


def test_freeze_embeddings_and_dropout_reach_the_trained_model(tmp_path, tiny_model):
    """--freeze-embeddings keeps the tied word table bit-identical while everything else trains;
    --dropout sets every hidden-state dropout and is saved with the model."""
    from erniegen.finetune import FinetuneConfig, finetune
    from erniegen.train import TrainConfig
    tiny_model.save_pretrained(tmp_path / "m")
    words = ["the city", "river water", "steam engine", "harvard university", "black death", "the king"]
    with open(tmp_path / "t.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"source": f"{words[i % 6]} was built in the year one [SEP] {words[i % 6]}",
                                "target": f"what was built in the year one ?"}) + "\n")
    trainer = TrainConfig(output_dir="", max_steps=3, batch_size=8, lr=1e-2, precision="fp32", log_every=1)
    cfg = FinetuneConfig(train=str(tmp_path / "t.jsonl"), output=str(tmp_path / "run"), model=str(tmp_path / "m"),
                         trainer=trainer, freeze_embeddings=True, hidden_dropout=0.3)
    finetune(cfg)
    done = Transformer.from_pretrained(str(tmp_path / "run" / "best"))
    before = dict(tiny_model.named_parameters())
    moved = {n for n, p in done.named_parameters() if not torch.equal(p, before[n])}
    assert "embeddings.word.weight" not in moved
    assert moved == {n for n, _ in done.named_parameters()} - {"embeddings.word.weight"}
    assert done.config.hidden_dropout_prob == 0.3
    assert {m.p for m in done.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}


def test_answer_marker_is_trained_with_stored_and_used_by_generate(tmp_path, tiny_model, capsys):
    """The marker reaches training features, is saved with the model, marks generate's inputs the same
    way and is never generated; 'none' turns a preset's marker off."""
    from erniegen.decoding import encode_sources
    from erniegen.finetune import FinetuneConfig, finetune, resolve_preset
    from erniegen.search import default_banned_ids
    from erniegen.train import TrainConfig
    tiny_model.save_pretrained(tmp_path / "m")
    with open(tmp_path / "t.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"source": "the river was built in the year one [SEP] river",
                                "target": "what was built in the year one ?"}) + "\n")
    trainer = TrainConfig(output_dir="", max_steps=2, batch_size=8, lr=1e-2, precision="fp32", log_every=1)
    cfg = FinetuneConfig(train=str(tmp_path / "t.jsonl"), output=str(tmp_path / "run"), model=str(tmp_path / "m"),
                         trainer=trainer, answer_marker="[unused1]")
    finetune(cfg)
    assert "marked the answer in 8/8 sources" in capsys.readouterr().err
    done = Transformer.from_pretrained(str(tmp_path / "run" / "best"))
    assert done.settings.answer_marker == "[unused1]"
    assert done.settings.extra["copy"] is get_task("squad_qg").copy  # the preset's copying, recorded with the model
    tok = done.tokenizer
    m = tok.convert_tokens_to_ids("[unused1]")
    [src] = encode_sources(done, ["the river was built [SEP] river"])
    assert src == [tok.cls_token_id, *tok.convert_tokens_to_ids(["the", "[unused1]", "river", "[unused1]",
                                                                  "was", "built"]),
                   tok.sep_token_id, tok.convert_tokens_to_ids("river"), tok.sep_token_id]
    assert m in default_banned_ids(done) and m not in default_banned_ids(tiny_model)
    assert resolve_preset(replace(cfg, answer_marker="none"), 512).answer_marker is None
    assert resolve_preset(replace(cfg, answer_marker=None), 512).answer_marker == get_task("squad_qg").answer_marker


def test_training_takes_the_explicit_product_only_in_reduced_precision():
    from erniegen.network import MATH_ATTENTION_MAX_SCORES, _use_math_attention
    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    assert _use_math_attention(q.bfloat16(), q.bfloat16())
    assert not _use_math_attention(q, q)  # fp32: the fused kernel is faster (BENCHMARKS.md section 2)
    with torch.no_grad():
        assert not _use_math_attention(q.bfloat16(), q.bfloat16())  # inference keeps the fused kernel
    side = int(MATH_ATTENTION_MAX_SCORES ** 0.5) + 1
    big = torch.randn(1, 1, side, 8, dtype=torch.bfloat16, requires_grad=True)
    assert not _use_math_attention(big, big)  # too many scores to keep for backward


def test_copying_is_settled_by_the_flag_then_the_yaml_then_the_task_preset(monkeypatch):
    from erniegen import data
    from erniegen.finetune import FinetuneConfig, resolve_method_options
    base = FinetuneConfig(train="t.jsonl", output="out", task="squad_qg")
    copying = replace(get_task("squad_qg"), copy=True)
    monkeypatch.setitem(data.TASKS, "squad_qg", copying)
    assert resolve_method_options(base) == {"copy": True}
    assert resolve_method_options(replace(base, method="typical")) == {"copy": True}
    assert resolve_method_options(replace(base, copy=False)) == {"copy": False}
    assert resolve_method_options(replace(base, method_options={"copy": False, "word_weight": 0.5})) == \
        {"copy": False, "word_weight": 0.5}
    for nar in ("nat", "mist", "elmer", "elmer-soft"):  # a preset that copies leaves the NAR methods as they are
        assert resolve_method_options(replace(base, method=nar)) == {}
    monkeypatch.setitem(data.TASKS, "squad_qg", replace(copying, copy=False))
    assert resolve_method_options(base) == {"copy": False}
    assert resolve_method_options(replace(base, copy=True)) == {"copy": True}
    with pytest.raises(ValueError, match=r"--copy: --method nat cannot copy source words \(the methods that can: "
                                         r"ernie-gen, typical\)"):
        resolve_method_options(replace(base, method="nat", copy=True))
    with pytest.raises(ValueError, match="--no-copy contradicts method_options copy: True"):
        resolve_method_options(replace(base, copy=False, method_options={"copy": True}))
    assert base.method_options == {}  # the caller's dict is left as it was


def _stepped_clock(monkeypatch):
    """train.now() moves one second per reading, so a deadline falls after a known amount of work."""
    import erniegen.train as train_module
    ticks = iter(range(1_000_000))
    monkeypatch.setattr(train_module, "_clock", lambda: float(next(ticks)))


def test_preparation_stopped_twice_then_resumed_equals_an_uninterrupted_one(tmp_path, tiny_tokenizer, headless,
                                                                            monkeypatch):
    """Stopped at a deadline in the head warm-up, then again in the task adaptation, and resumed to the end,
    the preparation leaves every weight as one uninterrupted preparation does; the caller's random stream is
    left alone throughout."""
    from erniegen.head_warmup import PreparationStopped, Resumable, prepare_checkpoint
    from erniegen.train import now
    texts = [[4, 10 + i % 20, 11 + i % 7, 30, 12, 5] for i in range(48)]

    def fresh():
        torch.manual_seed(0)  # the missing head's start, as finetune() seeds it
        with pytest.warns(UserWarning, match="no masked-LM head"):
            return Transformer.from_pretrained(str(tmp_path / "enc"))

    def prepare(model, resumable=None):
        return prepare_checkpoint(model, lambda: texts, 6, 8, seed=3, progress=False, resumable=resumable)

    whole = fresh()
    assert prepare(whole)
    _stepped_clock(monkeypatch)
    state = tmp_path / "run" / "preparation.pt"
    state.parent.mkdir()
    (state.parent / "preparation.pt.tmp-4242").write_bytes(b"half a state")  # a save killed mid-write
    stops = []
    for deadline_in in (8, 12):
        with pytest.raises(PreparationStopped) as stop:
            prepare(fresh(), Resumable(state, deadline=now() + deadline_in))
        stops.append((stop.value.phase, stop.value.step))
    assert stops[0][0] == "head warm-up" and 0 < stops[0][1] < 6
    assert stops[1][0] == "task adaptation" and 0 < stops[1][1] < 8
    assert torch.load(state, weights_only=True)["step"] == stops[1][1]
    assert [p.name for p in state.parent.iterdir()] == ["preparation.pt"]  # the leftover is gone
    resumed = fresh()
    rng = torch.get_rng_state()
    assert prepare(resumed, Resumable(state))
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # the saved state belongs to these settings: other steps or other texts cannot resume it
    again = tmp_path / "again.pt"
    with pytest.raises(PreparationStopped):
        prepare(fresh(), Resumable(again, deadline=now() + 8))
    with pytest.raises(ValueError, match=r"again.pt: cannot resume this preparation exactly.*'adapt_steps': \(8, 9\)"):
        prepare_checkpoint(fresh(), lambda: texts, 6, 9, seed=3, progress=False, resumable=Resumable(again))
    again.write_bytes(again.read_bytes()[:1000])  # cut short by a full disk
    with pytest.raises(ValueError, match=r"again.pt: cannot be read, the checkpoint is damaged or incomplete"):
        prepare(fresh(), Resumable(again))


def test_preparation_saves_now_and_then_for_a_kill(tmp_path, headless, monkeypatch):
    """Between deadlines the state is saved every ``every`` seconds (a kill loses no more than that); each
    phase's end is saved as the next phase's start."""
    from erniegen.head_warmup import Resumable, prepare_checkpoint
    texts = [[4, 10 + i % 20, 11 + i % 7, 30, 12, 5] for i in range(48)]
    saved = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (saved.append((obj["phase"], obj["step"])),
                                                                 real_save(obj, f, *a, **k)))
    _stepped_clock(monkeypatch)
    prepare_checkpoint(headless, lambda: texts, 6, 8, seed=3, progress=False,
                       resumable=Resumable(tmp_path / "p.pt", every=4))
    assert (1, 0) in saved and (2, 0) == saved[-1]  # the end of each phase
    assert any(phase == 0 and 0 < step < 6 for phase, step in saved)  # periodic, within a phase
    assert any(phase == 1 and 0 < step < 8 for phase, step in saved)


def test_finetune_stopped_in_its_preparation_resumes_to_the_uninterrupted_result(tmp_path, headless, monkeypatch,
                                                                                  capsys):
    """--max-time during the preparation: the summary says where it stopped and a fresh run over it is
    refused; --resume prepares on from the saved state and trains; the trained weights equal an uninterrupted
    run's, and the preparation's state is gone once checkpoint-last holds the prepared weights."""
    from erniegen.finetune import FinetuneConfig, finetune
    from erniegen.train import TrainConfig
    words = ["the city", "river water", "steam engine", "the king"]
    with open(tmp_path / "t.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"source": f"{words[i % 4]} was built [SEP] {words[i % 4]}",
                                "target": "what was built ?"}) + "\n")

    def cfg(out, **trainer):
        t = TrainConfig(output_dir="", max_steps=3, batch_size=8, lr=1e-2, precision="fp32", log_every=1, **trainer)
        return FinetuneConfig(train=str(tmp_path / "t.jsonl"), output=str(tmp_path / out), model=str(tmp_path / "enc"),
                              trainer=t, head_warmup_steps=4, adapt_steps=6)

    with pytest.warns(UserWarning, match="no masked-LM head"):
        finetune(cfg("whole"))
    _stepped_clock(monkeypatch)
    with pytest.warns(UserWarning, match="no masked-LM head"):
        stopped = finetune(cfg("cut", max_time=10))
    assert stopped["stopped"] == "max_time" and stopped["preparing"] in ("head warm-up", "task adaptation")
    assert (tmp_path / "cut" / "preparation.pt").is_file() and not (tmp_path / "cut" / "checkpoint-last").exists()
    with pytest.raises(ValueError, match="preparation.pt holds the state of a run stopped while preparing"):
        finetune(cfg("cut"))
    with pytest.warns(UserWarning, match="no masked-LM head"):
        done = finetune(cfg("cut", resume=True))
    assert done["stopped"] is None and done["global_step"] == 3
    assert "resuming the preparation from" in capsys.readouterr().err
    assert not (tmp_path / "cut" / "preparation.pt").exists()
    whole = Transformer.from_pretrained(str(tmp_path / "whole" / "best"))
    cut = Transformer.from_pretrained(str(tmp_path / "cut" / "best"))
    for (name, a), b in zip(whole.state_dict().items(), cut.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_preset_says_when_its_epochs_meet_far_more_data_than_measured(capsys):
    from erniegen.finetune import note_recipe_epochs
    from erniegen.train import TrainConfig
    tcfg = TrainConfig(output_dir="", epochs=20, batch_size=32)
    note_recipe_epochs(get_task("xsum"), 899 * 4, tcfg)  # within reach of the measured set: nothing to say
    assert capsys.readouterr().err == ""
    note_recipe_epochs(get_task("xsum"), 204_045, tcfg)
    assert ("the xsum preset's 20 epochs were measured on 899 training pairs; over these 204,045 they are about "
            "127,540 optimizer steps") in capsys.readouterr().err
    note_recipe_epochs(get_task("default"), 60_000, replace(tcfg, epochs=6))  # measured on 10,875 pairs
    assert "the default preset's 6 epochs were measured on 10,875 training pairs" in capsys.readouterr().err
