"""GLAT (glancing training) as a NAR mask mode: how many reference tokens it reveals, where the loss
falls, and its first pass (no gradients, the model's current mode)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from erniegen.batch import collate_pairs
from erniegen.data import get_task
from erniegen.mist import MistConfig, build_mist_objective
from erniegen.nar import glancing_reveal, predict_slots, slot_valid

CLS, SEP, MASK = 4, 5, 6
PRESET = dataclasses.replace(get_task("squad_qg"), max_target_len=8, label_smoothing=0.0)
ITEMS = [{"source_ids": [CLS, 10, 11, 12, SEP], "target_ids": [20, 21, 22, 23, 24, 25, SEP]},
         {"source_ids": [CLS, 30, SEP], "target_ids": [40, 41, 42, SEP]}]


@pytest.mark.parametrize("f_ratio", [0.5, 0.3, 1.0])
def test_revealed_count_is_floor_of_hamming_distance_times_f_ratio(f_ratio):
    target = torch.tensor([[20, 21, 22, 23, 24, 25, SEP], [40, 41, 42, SEP, 0, 0, 0]])
    valid = slot_valid(torch.tensor([7, 4]), 7)
    torch.manual_seed(0)
    for _ in range(50):
        wrong = (torch.rand(target.shape) < 0.6) & valid  # padding never counts, whatever it holds
        predicted = torch.where(wrong, 99, target)
        predicted[~valid] = 77
        distance = wrong.sum(1)
        revealed = glancing_reveal(predicted, target, valid, f_ratio)
        assert not (revealed & ~valid).any()
        assert revealed.sum(1).tolist() == [int(d * f_ratio) for d in distance.tolist()]


def test_revealed_slots_are_drawn_uniformly():
    valid = slot_valid(torch.tensor([4] * 4000), 4)
    target = torch.full(valid.shape, 20)
    predicted = torch.full(valid.shape, 99)  # all 4 wrong: 2 revealed at f_ratio 0.5
    torch.manual_seed(0)
    freq = glancing_reveal(predicted, target, valid, 0.5).float().mean(0)
    assert torch.allclose(freq, torch.full((4,), 0.5), atol=0.03)


def _nat_glat(model, **options):
    return build_mist_objective("nat", model, PRESET, {"mask_mode": "glat", **options}).train()


def _record_calls(model):
    """Each call of the model: its token ids, whether its output (last keys) needs gradients, the mode it ran in
    and its hidden states (None for a pass that returns only keys/values)."""
    calls = []
    hook = model.register_forward_hook(
        lambda m, args, out: calls.append((args[0].clone(), out[1][-1][0].requires_grad, m.training, out[0])))
    return calls, hook


def test_glat_reveals_reference_tokens_in_proportion_to_the_first_pass_distance(tiny_model, monkeypatch):
    obj = _nat_glat(tiny_model)
    batch = collate_pairs(ITEMS)
    # a scripted first pass: row 0 gets 5 of its 7 slots wrong, row 1 gets 3 of its 4 wrong
    scripted = batch["tgt_ids"].clone()
    scripted[0, :5] = 99
    scripted[1, :3] = 99
    monkeypatch.setattr(obj, "first_pass", lambda source, tgt_len: scripted)
    calls, hook = _record_calls(tiny_model)
    try:
        for seed in range(10):
            calls.clear()
            torch.manual_seed(seed)
            obj(**batch)
            slots = calls[1][0]  # the call after the source: the trained slot pass
            valid = slot_valid(batch["tgt_len"], slots.shape[1])
            shown = (slots != MASK) & valid
            assert shown.sum(1).tolist() == [5 // 2, 3 // 2]
            assert torch.equal(slots[shown], batch["tgt_ids"][shown])  # what is shown is the reference
    finally:
        hook.remove()


def test_revealed_slots_carry_no_loss(tiny_model):
    obj = _nat_glat(tiny_model, f_ratio=1.0)  # reveal as many as the first pass got wrong
    batch = collate_pairs(ITEMS)
    calls, hook = _record_calls(tiny_model)
    torch.manual_seed(0)
    try:
        out = obj(**batch)
    finally:
        hook.remove()
    slots, hidden = calls[2][0], calls[2][3]  # source, first pass, trained slot pass
    valid = slot_valid(batch["tgt_len"], slots.shape[1])
    masked = (slots == MASK) & valid
    assert ((slots != MASK) & valid).any() and masked.any()
    expected = F.cross_entropy(tiny_model.logits(hidden[masked]).float(), batch["tgt_ids"][masked])
    assert torch.allclose(out["loss_nat"], expected, atol=1e-6)
    # a loss over every slot, revealed ones included, is another number
    everywhere = F.cross_entropy(tiny_model.logits(hidden[valid]).float(), batch["tgt_ids"][valid], reduction="none")
    assert not torch.allclose(everywhere.mean(), expected)


def test_glancing_first_pass_has_no_gradients_and_keeps_the_models_mode(tiny_model):
    obj = _nat_glat(tiny_model)
    batch = collate_pairs(ITEMS)
    calls, hook = _record_calls(tiny_model)
    try:
        obj.train()(**batch)
        assert [(c[1], c[2]) for c in calls] == [(True, True), (False, True), (True, True)]
        first = calls[1][0]
        assert bool((first[slot_valid(batch["tgt_len"], first.shape[1])] == MASK).all())  # it sees no reference
        calls.clear()
        obj.eval()(**batch)  # evaluation predicts every slot: no glancing, no first pass
        assert [(c[1], c[2]) for c in calls] == [(True, False), (True, False)]
        assert bool((calls[1][0][slot_valid(batch["tgt_len"], calls[1][0].shape[1])] == MASK).all())
    finally:
        hook.remove()


def test_mist_uses_its_glancing_first_pass_as_the_pseudo_target(tiny_model):
    obj = build_mist_objective("mist", tiny_model, PRESET, {"mask_mode": "glat"}).train()
    batch = collate_pairs(ITEMS[1:])
    calls, hook = _record_calls(tiny_model)
    try:
        out = obj(**batch)
    finally:
        hook.remove()
    # source, first pass (no grad), NAT slots, [CLS] Y_p [SEP] X [SEP], MIST slots: one no-grad pass serves both
    assert [c[1] for c in calls] == [True, False, True, True, True]
    tgt_len = batch["tgt_len"]
    predicted, _ = predict_slots(tiny_model, calls[1][3], tgt_len, slot_valid(tgt_len), SEP, obj.banned)
    assert calls[3][0][0, 1:4].tolist() == predicted[0, :3].tolist()  # Y_p = the first pass minus its end [SEP]
    assert set(out) == {"loss", "loss_nat", "loss_mist", "loss_length", "num_tokens"}


def test_glat_options_are_checked():
    assert MistConfig(mask_mode="glat").f_ratio == 0.5
    assert MistConfig(mask_mode="glat", f_ratio=0.3).f_ratio == 0.3
    assert MistConfig().mask_mode == "glat" and MistConfig().f_ratio == 0.5  # nat and mist train with GLAT
    with pytest.raises(ValueError, match="f_ratio is only used with mask_mode: glat"):
        MistConfig(mask_mode="all", f_ratio=0.5)
    with pytest.raises(ValueError, match="f_ratio must be in"):
        MistConfig(mask_mode="glat", f_ratio=1.5)


@pytest.mark.parametrize("method", ["nat", "mist"])
def test_glat_training_steps_reduce_the_loss(tiny_model, method):
    obj = build_mist_objective(method, tiny_model, PRESET, {"mask_mode": "glat"}).train()
    batch = collate_pairs(ITEMS)
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    torch.manual_seed(0)
    with torch.no_grad():
        first = obj.eval()(**batch)["loss"].item()
    obj.train()
    for _ in range(8):
        out = obj(**batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        final = obj.eval()(**batch)["loss"].item()
    assert final < 0.6 * first, (first, final)
