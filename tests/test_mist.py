"""MIST / NAT: masks, length head and beam, MIST inputs, decoders' equivalences, training steps."""
import dataclasses
import math
import types

import pytest
import torch

from erniegen.batch import collate_pairs
from erniegen.data import Features, get_task
from erniegen.decoding import DECODERS, DecodeOptions, generate_ids
from erniegen.masks import SOURCE, attention_mask, source_roles
from erniegen.mist import (MistConfig, add_static_pseudo_targets, build_mist_objective, candidate_lengths, dedup_consecutive, encode_source,
                           length_head, make_static_pseudo_targets, masked_slots, mist_source, predict_slots,
                           remask_count, select_length_beam, slot_pass, slot_roles, slot_valid)
from erniegen.model import Transformer
from erniegen.nar import drop_repeated_words, finish_row
from erniegen.search import word_token_mask

SOURCES = [[4, 10, 11, 12, 5], [4, 20, 21, 5], [4, 30, 31, 32, 33, 34, 5]]
ITEMS = [{"source_ids": [4, 10, 11, 12, 5], "target_ids": [20, 21, 22, 5]},
         {"source_ids": [4, 30, 5], "target_ids": [40, 5]}]
CLS, SEP, MASK = 4, 5, 6
PRESET = dataclasses.replace(get_task("squad_qg"), max_target_len=8, label_smoothing=0.0)


@pytest.fixture
def nat_model(tiny_model):
    """The tiny model with a fresh length head over lengths 0..8."""
    length_head(tiny_model, 8)
    return tiny_model


def force_length(model, n):
    head = length_head(model)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        head.proj.bias[n] = 10.0


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---- layout ------------------------------------------------------------------------------------


def test_nar_mask_by_hand():
    """Row 0: 3-token source + 3 slots; row 1: 2-token source + 2 slots (one pad of each)."""
    roles = source_roles(torch.tensor([3, 2]), 3).cat(slot_roles(torch.tensor([3, 2]), 3))
    got = attention_mask(roles, roles)
    #                 s1 s2 s3 y1 y2 y3
    assert torch.equal(got[0], _m([[1, 1, 1, 0, 0, 0],
                                   [1, 1, 1, 0, 0, 0],
                                   [1, 1, 1, 0, 0, 0],
                                   [1, 1, 1, 1, 1, 1],
                                   [1, 1, 1, 1, 1, 1],
                                   [1, 1, 1, 1, 1, 1]]))
    assert torch.equal(got[1], _m([[1, 1, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0, 0],  # padding query: sees the source only
                                   [1, 1, 0, 1, 1, 0],
                                   [1, 1, 0, 1, 1, 0],
                                   [1, 1, 0, 0, 0, 0]]))


def _joint_pass(model, src_ids, src_len, slot_ids, slot_len):
    """Reference: source and slots in one call, no cache."""
    b, ls = src_ids.shape
    w = slot_ids.shape[1]
    roles = source_roles(src_len, ls).cat(slot_roles(slot_len, w))
    ids = torch.cat([src_ids, slot_ids], 1)
    pos = torch.cat([torch.arange(ls).expand(b, ls), src_len[:, None] + torch.arange(w)[None, :]], 1)
    types = torch.cat([torch.zeros_like(src_ids), torch.full_like(slot_ids, model.target_type_id)], 1)
    hidden, _ = model(ids, pos, types, attention_mask(roles, roles))
    return hidden[:, ls:]


def test_cached_source_equals_joint_pass(tiny_model):
    batch = collate_pairs([{"source_ids": s, "target_ids": [7] * (n - 1) + [SEP]}
                           for s, n in zip(SOURCES, [4, 6, 2])])
    src_ids, src_len, slot_len = batch["src_ids"], batch["src_len"], batch["tgt_len"]
    slots = masked_slots(slot_len, MASK)
    slots[0, 1] = 20  # an observed token, as mask-predict feeds them
    source, _ = encode_source(tiny_model, src_ids, src_len)
    cached = slot_pass(tiny_model, source, slots, slot_len)
    joint = _joint_pass(tiny_model, src_ids, src_len, slots, slot_len)
    valid = slot_valid(slot_len)
    assert torch.allclose(cached[valid], joint[valid], atol=1e-5)
    # MIST's mixed source and ELMER read only the cache: the last layer's keys/values alone, the same numbers
    keys_only, none = encode_source(tiny_model, src_ids, src_len, hidden=False)
    assert none is None
    for (k, v), (k0, v0) in zip(keys_only.kv, source.kv):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert torch.equal(slot_pass(tiny_model, keys_only, slots, slot_len), cached)


# ---- length ------------------------------------------------------------------------------------


def test_length_label_counts_the_end_sep_and_head_is_saved(nat_model, tmp_path):
    obj = build_mist_objective("nat", nat_model, PRESET, {}).eval()
    batch = collate_pairs(ITEMS)
    assert batch["tgt_len"].tolist() == [4, 2]  # [20 21 22 SEP] -> 4, [40 SEP] -> 2
    force_length(nat_model, 4)
    got = obj(**batch)["loss_length"]
    # logits are 10 at class 4 and 0 elsewhere (9 classes): label 4 and label 2
    expected = (-math.log(math.exp(10) / (math.exp(10) + 8)) - math.log(1 / (math.exp(10) + 8))) / 2
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    assert nat_model.settings.extra["max_target_len"] == 8
    nat_model.settings.method = "nat"  # as finetune records it
    nat_model.save_pretrained(tmp_path / "m")
    loaded = Transformer.from_pretrained(str(tmp_path / "m"))
    assert torch.equal(length_head(loaded).proj.bias, length_head(nat_model).proj.bias)


def test_candidate_lengths_by_hand():
    logits = torch.tensor([[9.0, 5.0, 1.0, 3.0, 4.0], [9.0, 1.0, 2.0, 0.0, 0.0]])
    # class 0 and lengths above hi are never candidates; row 1 has only lengths 1..2
    got = candidate_lengths(logits, 3, 1, torch.tensor([3, 2]))
    assert got.tolist() == [[1, 3, 2], [2, 1, 2]]


def test_length_beam_keeps_best_average_logprob():
    """Three candidate lengths of one source, scored by hand."""
    tokens = torch.tensor([[10, SEP, 0, 0], [11, 12, SEP, 0], [13, 14, 15, SEP]])
    scores = torch.tensor([[-1.0, -1.0, 0, 0],  # mean -1.0
                           [-0.5, -0.5, -0.8, 0],  # mean -0.6  <- best
                           [-0.1, -0.1, -0.1, -3.0]])  # mean -0.825 (highest sum of content, worse mean)
    assert select_length_beam(tokens, scores, torch.tensor([2, 3, 4]), 3, SEP) == [[11, 12]]
    # two sources with two candidates each; ties keep the first
    assert select_length_beam(tokens[[0, 1, 2, 2]], scores[[0, 1, 2, 2]], torch.tensor([2, 3, 4, 4]), 2,
                              SEP) == [[11, 12], [13, 14, 15]]


def test_length_beam_on_model_matches_hand_choice(nat_model):
    opts = DecodeOptions(max_length=8, length_beam=3, banned_ids=[0, 1, 2, 3, 4, 6])
    for src in SOURCES:
        src_ids, src_len = torch.tensor([src]), torch.tensor([len(src)])
        with torch.no_grad():
            source, hidden = encode_source(nat_model, src_ids, src_len)
            logits = length_head(nat_model)(hidden, source.roles.code == SOURCE)[0]
            best = None
            for n in logits[1:].topk(3).indices.add(1).tolist():
                lengths = torch.tensor([n])
                h = slot_pass(nat_model, source, masked_slots(lengths, MASK), lengths)
                tok, lp = predict_slots(nat_model, h, lengths, slot_valid(lengths), SEP, opts.banned_ids)
                if best is None or lp.mean().item() > best[0]:
                    best = (lp.mean().item(), tok[0, : n - 1].tolist())
        assert generate_ids(nat_model, [src], "nar", opts=opts) == [best[1]]


def test_output_length_follows_length_head_not_reference(nat_model):
    """Decoders take only sources; a reference of 7 ids cannot pull the output away from length 3."""
    force_length(nat_model, 3)
    batch = collate_pairs([{"source_ids": SOURCES[0], "target_ids": [20, 21, 22, 23, 24, 25, SEP]}])
    assert batch["tgt_len"].tolist() == [7]
    for name in ("nar", "mist-iter", "mask-predict"):
        out = DECODERS[name]()(nat_model, batch["src_ids"], batch["src_len"],
                               DecodeOptions(max_length=8, iterations=3, banned_ids=[0, 3, 4, 6]))
        assert len(out[0]) == 2, name  # length 3 = two tokens + the end [SEP]
        assert SEP not in out[0] and not set(out[0]) & {0, 3, 4, 6}


# ---- MIST input --------------------------------------------------------------------------------


def test_mist_source_puts_pseudo_target_first_and_truncates_it():
    assert mist_source([40, 41], [CLS, 10, 11, SEP], 20, CLS, SEP) == [CLS, 40, 41, SEP, 10, 11, SEP]
    assert mist_source([40, 41, 42], [CLS, 10, 11, SEP], 6, CLS, SEP) == [CLS, 40, SEP, 10, 11, SEP]
    assert mist_source([40], [CLS, 10, 11, 12, SEP], 5, CLS, SEP) == [CLS, SEP, 10, 11, SEP]


def test_mist_pass_inputs_and_no_gradient_through_first_pass(nat_model):
    """Dynamic MIST runs: source, NAT slots, pseudo slots (no grad), [CLS] Y_p [SEP] X [SEP], MIST slots."""
    obj = build_mist_objective("mist", nat_model, PRESET, {"mask_mode": "all"}).train()  # GLAT's: test_glat.py
    batch = collate_pairs(ITEMS[1:])  # source [CLS 30 SEP], target [40 SEP]
    calls = []
    hook = nat_model.register_forward_hook(
        lambda m, args, out: calls.append([a.clone() for a in args[:4]] + [out[1][-1][0].requires_grad]))
    try:
        out = obj(**batch)
    finally:
        hook.remove()
    assert [c[4] for c in calls] == [True, True, False, True, True]
    pseudo = obj.pseudo_targets(encode_source(nat_model, batch["src_ids"], batch["src_len"])[0], batch["tgt_len"])
    assert len(pseudo[0]) == 1  # target length 2 minus the end [SEP]
    ids, pos, types, mask = calls[3][:4]
    assert ids.tolist() == [[CLS, pseudo[0][0], SEP, 30, SEP]]
    assert pos.tolist() == [[0, 1, 2, 3, 4]] and types.tolist() == [[0] * 5]
    assert bool(mask.all())  # one bidirectional SOURCE segment
    ids, pos, types, _ = calls[4][:4]
    assert ids.tolist() == [[MASK, MASK]] and pos.tolist() == [[5, 6]] and types.tolist() == [[1, 1]]
    assert set(out) == {"loss", "loss_nat", "loss_mist", "loss_length", "num_tokens"}

    # Gradients equal those of a run fed the same pseudo target as fixed data (static mixing).
    nat_model.zero_grad()
    out["loss"].backward()
    dynamic = [p.grad.clone() for p in obj.parameters()]
    static = build_mist_objective("mist", nat_model, PRESET, {"mixing": "static"}).train()
    nat_model.zero_grad()
    out_s = static(**batch, pseudo_ids=torch.tensor(pseudo), pseudo_len=torch.tensor([1]))
    out_s["loss"].backward()
    assert torch.allclose(out["loss"], out_s["loss"], atol=1e-6)
    for g, p in zip(dynamic, static.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_options_are_checked(nat_model):
    with pytest.raises(ValueError, match="mixingg"):
        build_mist_objective("mist", nat_model, PRESET, {"mixingg": "static"})
    with pytest.raises(ValueError, match="mixing"):
        build_mist_objective("nat", nat_model, PRESET, {"mixing": "dynamic"})
    ablation = build_mist_objective("mist", nat_model, PRESET, {"mixing": "none"}).eval()(**collate_pairs(ITEMS))
    assert "loss_mist" not in ablation
    with pytest.raises(ValueError, match="mask_mode"):
        MistConfig(mask_mode="some")
    with pytest.raises(ValueError, match="pseudo_ids"):
        build_mist_objective("mist", nat_model, PRESET, {"mixing": "static"})(**collate_pairs(ITEMS))


def test_static_pseudo_targets_reach_the_batch(nat_model, tmp_path):
    pseudo = make_static_pseudo_targets(nat_model, ITEMS)
    assert pseudo == generate_ids(nat_model, [x["source_ids"] for x in ITEMS], "nar",
                                  opts=DecodeOptions(max_length=nat_model.settings.max_decode_len))
    # what finetune does for `method_options: {mixing: static, pseudo_from: DIR}`
    nat_model.settings.method = "nat"
    nat_model.save_pretrained(tmp_path / "trained")
    feats = [Features(x["source_ids"], x["target_ids"]) for x in ITEMS]
    assert add_static_pseudo_targets(feats, {}) == feats
    mixed = add_static_pseudo_targets(feats, {"mixing": "static", "pseudo_from": str(tmp_path / "trained")})
    assert [f.pseudo_ids for f in mixed] == pseudo and mixed[0].target_ids == ITEMS[0]["target_ids"]
    batch = collate_pairs(mixed)
    assert batch["pseudo_len"].tolist() == [len(p) for p in pseudo]
    out = build_mist_objective("mist", nat_model, PRESET, {"mixing": "static"})(**batch)
    assert torch.isfinite(out["loss"]) and out["loss_mist"] > 0


def test_static_mist_finetunes_with_a_dev_set_from_the_command_line(nat_model, tmp_path, capsys):
    """The dev loss runs the training objective, so the dev features need their static pseudo targets too
    (a 56-minute campaign run died at its first evaluation without them)."""
    import json

    from erniegen.cli import main
    nat_model.settings.method = "nat"
    nat_model.save_pretrained(tmp_path / "nat")
    rows = [{"source": "the city river", "target": "what city"}, {"source": "the king war", "target": "who was"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows) * 2)
    main(["finetune", "--model", str(tmp_path / "nat"), "--train", str(pairs), "--dev", str(pairs), "--task",
          "default", "--output", str(tmp_path / "run"), "--method", "mist", "--method-option", "mixing=static",
          "--method-option", f"pseudo_from={tmp_path / 'nat'}", "--max-steps", "2", "--eval-every", "1",
          "--batch-size", "2", "--max-source-len", "16", "--max-target-len", "8", "--precision", "fp32",
          "--eval-samples", "2"])
    evals = [json.loads(x)["eval"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 2 and all(e["dev_loss"] > 0 for e in evals)
    # a NAT checkpoint fine-tuned again at another target length: the flag to change, not a state-dict error
    with pytest.raises(SystemExit):
        main(["finetune", "--model", str(tmp_path / "nat"), "--train", str(pairs), "--output", str(tmp_path / "r2"),
              "--method", "nat", "--max-steps", "1", "--max-target-len", "5", "--precision", "fp32"])
    assert "length head covers target lengths 0..8: fine-tune it with --max-target-len 8" in capsys.readouterr().err


def test_partial_masking_draws_a_uniform_count(nat_model):
    obj = build_mist_objective("nat", nat_model, PRESET, {"mask_mode": "partial"}).train()
    valid = slot_valid(torch.tensor([4, 2] * 2000), 4)
    torch.manual_seed(0)
    masked = obj._masked(valid)
    assert not (masked & ~valid).any()
    counts = masked.sum(1).view(-1, 2)
    for col, n in ((0, 4), (1, 2)):
        freq = torch.bincount(counts[:, col], minlength=n + 1)[1:].float() / 2000
        assert counts[:, col].min() >= 1 and torch.allclose(freq, torch.full((n,), 1 / n), atol=0.04)
    assert torch.equal(obj.eval()._masked(valid), valid)  # evaluation predicts every slot


def test_untrained_model_has_no_length_head(tiny_model):
    tiny_model.settings.extra = {"max_target_len": 8}  # finetune records it for every method
    with pytest.raises(ValueError, match="nat or mist"):
        generate_ids(tiny_model, SOURCES[:1], "nar")


# ---- decoders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mist-iter", "mask-predict"])
def test_one_iteration_equals_single_pass(nat_model, name):
    opts = DecodeOptions(max_length=8, iterations=1, length_beam=2)
    assert generate_ids(nat_model, SOURCES, name, opts=opts) == generate_ids(nat_model, SOURCES, "nar", opts=opts)


def test_mist_iter_feeds_previous_output_before_source(nat_model):
    force_length(nat_model, 4)
    src = SOURCES[1]
    first = generate_ids(nat_model, [src], "nar", opts=DecodeOptions(max_length=8))[0]
    calls = []
    hook = nat_model.register_forward_hook(lambda m, args, out: calls.append(args[0].tolist()))
    try:
        generate_ids(nat_model, [src], "mist-iter", opts=DecodeOptions(max_length=8, iterations=2))
    finally:
        hook.remove()
    assert len(first) == 3 and len(calls) == 4  # source, slots, mixed source, slots
    assert calls[2] == [[CLS, *first, SEP, *src[1:]]]


def test_mask_predict_schedule(tiny_model, monkeypatch):
    assert [remask_count(10, t, 4) for t in range(4)] == [10, 7, 5, 2]
    import erniegen.mist as mist
    masks_fed = []
    real = mist.slot_pass

    def counting(model, source, slot_ids, slot_len):
        masks_fed.append(int((slot_ids == MASK).sum()))
        return real(model, source, slot_ids, slot_len)

    monkeypatch.setattr(mist, "slot_pass", counting)
    length_head(tiny_model, 12)
    force_length(tiny_model, 11)  # 10 tokens + the end [SEP]
    out = generate_ids(tiny_model, [SOURCES[0]], "mask-predict", opts=DecodeOptions(max_length=12, iterations=4))
    assert len(out[0]) == 10
    assert masks_fed == [11, 7, 5, 2]  # iteration 0: the 10 tokens and the end slot


def test_batched_equals_one_by_one(nat_model):
    for name in ("nar", "mist-iter", "mask-predict"):
        opts = DecodeOptions(max_length=8, iterations=3, length_beam=2)
        batched = generate_ids(nat_model, SOURCES, name, batch_size=3, opts=opts)
        single = [generate_ids(nat_model, [s], name, opts=opts)[0] for s in SOURCES]
        assert batched == single, name
        assert all(len(x) > 0 for x in batched)


def test_dedup_is_post_processing(nat_model):
    assert dedup_consecutive([7, 7, 8, 8, 8, 9, 7]) == [7, 8, 9, 7]
    plain = generate_ids(nat_model, SOURCES, "nar", opts=DecodeOptions(max_length=8))
    dedup = generate_ids(nat_model, SOURCES, "nar", opts=DecodeOptions(max_length=8, dedup=True))
    assert dedup == [dedup_consecutive(x) for x in plain]



def test_block_repeated_words_drops_a_word_said_twice_by_hand():
    """Words (2, 3) said again right away are dropped; punctuation (4) may repeat; dedup drops every repeat."""
    words = torch.tensor([False, False, True, True, False, False])
    assert drop_repeated_words([2, 2, 2, 4, 4, 3, 3, 2, 5], words) == [2, 4, 4, 3, 2, 5]
    assert drop_repeated_words([], words) == []
    ids = [2, 2, 4, 4, 3]
    rule = DecodeOptions(block_repeated_words=True, word_tokens=words)
    assert finish_row(ids, rule) == [2, 4, 4, 3]
    assert finish_row(ids, DecodeOptions()) == ids
    assert finish_row(ids, dataclasses.replace(rule, dedup=True)) == [2, 4, 3]
    with pytest.raises(ValueError, match="block_repeated_words needs word_tokens"):
        finish_row(ids, DecodeOptions(block_repeated_words=True))


@pytest.mark.parametrize("name", ["nar", "mist-iter", "mask-predict"])
def test_block_repeated_words_holds_in_every_nar_decoder(nat_model, name):
    steam = nat_model.tokenizer.convert_tokens_to_ids("steam")
    force_length(nat_model, 8)
    with torch.no_grad():
        nat_model.head.bias[steam] = 50.0  # unblocked, every slot says "steam"
    opts = DecodeOptions(max_length=8, iterations=3, word_tokens=word_token_mask(nat_model))
    assert generate_ids(nat_model, SOURCES, name, opts=opts) == [[steam] * 7] * len(SOURCES)
    out = generate_ids(nat_model, SOURCES, name, opts=dataclasses.replace(opts, block_repeated_words=True))
    assert out == [[steam]] * len(SOURCES)


# ---- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method,options", [("nat", {"mask_mode": "all"}), ("mist", {"mask_mode": "all"}),
                                            ("nat", {"mask_mode": "partial"})])  # glat (the default): test_glat.py
def test_training_steps_reduce_the_loss(tiny_model, method, options):
    obj = build_mist_objective(method, tiny_model, PRESET, options).train()
    batch = collate_pairs(ITEMS)
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(8):
        out = obj(**batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    with torch.no_grad():
        final = obj.eval()(**batch)["loss"].item()
    assert final < 0.6 * losses[0], (losses, final)
    # sources 5+3, slots 4+2, then (MIST) pseudo slots 4+2, [CLS] Y_p [SEP] X [SEP] 9+5, slots 4+2
    assert out["num_tokens"].item() == (40 if method == "mist" else 14)
