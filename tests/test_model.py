"""The shared Transformer: Hugging Face parity, checkpoint round trips, the K/V primitive, masks."""
import json

import pytest
import torch
import transformers

from erniegen.masks import CONTEXT, attention_mask, source_roles, target_roles
from erniegen.model import Transformer
from erniegen.network import Attention, PastSlot

from conftest import VOCAB, tiny_config


def _hf_tiny(kind: str):
    common = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    if kind == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(**common))
    if kind == "roberta":
        return transformers.RobertaForMaskedLM(transformers.RobertaConfig(**common, pad_token_id=0, type_vocab_size=1))
    return transformers.ErnieForMaskedLM(transformers.ErnieConfig(**common))


def _full(model, ids):
    t = ids.shape[1]
    pos = torch.arange(t)[None]
    h, _ = model(ids, pos, torch.zeros_like(ids), torch.ones(1, t, t, dtype=torch.bool))
    return model.logits(h)


@pytest.mark.parametrize("kind", ["bert", "roberta", "ernie"])
def test_loads_hf_checkpoints_with_identical_outputs(kind, tmp_path, tiny_tokenizer):
    hf = _hf_tiny(kind).eval()
    hf.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(str(tmp_path)).eval()
    ids = torch.tensor([[4, 10, 11, 12, 13, 5]])
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        if kind == "roberta":  # RoBERTa numbers positions from pad+1; ours adds that offset itself
            assert ours.config.position_offset == 1
        got = _full(ours, ids)
    assert torch.allclose(got, expected, atol=1e-5)


def test_saved_checkpoint_loads_in_transformers_and_back(tmp_path, tiny_model):
    tiny_model.settings.task = "squad_qg"
    tiny_model.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert {"config.json", "model.safetensors", "erniegen_config.json", "tokenizer_config.json"} <= set(files)
    assert not list(tmp_path.glob("*.tmp-*"))
    ids = torch.tensor([[4, 10, 11, 12, 13, 5]])
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ckpt").eval()
    again = Transformer.from_pretrained(str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        ours = _full(tiny_model, ids)
        assert torch.allclose(hf(input_ids=ids).logits, ours, atol=1e-5)
        assert torch.equal(_full(again, ids), ours)
    assert again.settings.task == "squad_qg"
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]


def test_sentence_encoder_gets_a_tied_lm_head(tmp_path, tiny_tokenizer):
    torch.manual_seed(2)
    enc = transformers.BertModel(transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4, intermediate_size=64))
    enc.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no masked-LM head"):
        m = Transformer.from_pretrained(str(tmp_path))
    assert m.head.word.weight.data_ptr() == m.embeddings.word.weight.data_ptr()
    assert torch.equal(m.embeddings.word.weight, enc.embeddings.word_embeddings.weight)


def test_wrong_shape_is_reported(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        Transformer.from_pretrained(str(tmp_path))


def test_missing_folder_and_unknown_name_are_clear():
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        Transformer.from_pretrained("./does-not-exist")


def test_past_keys_values_equal_one_full_pass(tiny_model):
    """Source then target against the source's K/V == source and target in one call."""
    src = torch.tensor([[4, 10, 11, 5]])
    tgt = torch.tensor([[12, 13, 5]])
    sr = source_roles(torch.tensor([4]), 4)
    tr = target_roles(CONTEXT, torch.tensor([3]), 3)
    allr = sr.cat(tr)
    ids = torch.cat([src, tgt], 1)
    pos = torch.arange(7)[None]
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    full, full_kv = tiny_model(ids, pos, types, attention_mask(allr, allr))
    h_src, kv = tiny_model(src, pos[:, :4], types[:, :4], attention_mask(sr, sr))
    h_tgt, kv_t = tiny_model(tgt, pos[:, 4:], types[:, 4:], attention_mask(tr, allr), past=kv)
    assert torch.allclose(torch.cat([h_src, h_tgt], 1), full, atol=1e-6)
    assert torch.allclose(kv_t[1][0], full_kv[1][0][:, :, 4:], atol=1e-6)  # only the new tokens' keys


def test_a_keys_values_only_pass_equals_the_full_pass_and_its_gradients(tiny_model):
    """hidden=False (ERNIE-GEN's contextual flow in training) skips the last layer's attention and
    feed-forward: every layer's keys/values and every gradient through them stay bit-identical."""
    tiny_model.train()  # with gradients: the training path (tiny_config has no dropout)
    b, t = 2, 6
    ids = torch.tensor([[4, 10, 11, 12, 5, 0], [4, 13, 14, 15, 16, 5]])
    roles = source_roles(torch.tensor([5, 6]), t)
    args = (ids, torch.arange(t).expand(b, t), torch.zeros_like(ids), attention_mask(roles, roles))
    weights = [(torch.randn(b, 4, t, 8), torch.randn(b, 4, t, 8)) for _ in tiny_model.layers]

    def run(hidden: bool):
        tiny_model.zero_grad(set_to_none=True)
        out, kv = tiny_model(*args, hidden=hidden)
        sum(((k * wk).sum() + (v * wv).sum()) for (k, v), (wk, wv) in zip(kv, weights)).backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in tiny_model.named_parameters()}
        return out, [(k.detach(), v.detach()) for k, v in kv], grads

    full_out, full_kv, full_grads = run(True)
    out, kv, grads = run(False)
    assert out is None and full_out.shape == (b, t, 32)
    assert all(torch.equal(a, c) and torch.equal(b_, d) for (a, b_), (c, d) in zip(kv, full_kv))
    for name, g in full_grads.items():
        assert (g is None) == (grads[name] is None), name
        assert g is None or torch.equal(g, grads[name]), name
    last = len(tiny_model.layers) - 1
    assert grads[f"layers.{last}.attn.key.weight"] is not None and grads[f"layers.{last}.ffn_in.weight"] is None
    with pytest.raises(ValueError, match="without past"):
        tiny_model(*args, past=kv, hidden=False)


def test_mask_really_blocks_attention(tiny_model):
    """Changing a later target token leaves the source and earlier target states unchanged."""
    r = source_roles(torch.tensor([3]), 3).cat(target_roles(CONTEXT, torch.tensor([3]), 3))
    pos = torch.arange(6)[None]
    types = torch.tensor([[0, 0, 0, 1, 1, 1]])
    a, _ = tiny_model(torch.tensor([[4, 10, 5, 12, 13, 14]]), pos, types, attention_mask(r, r))
    b, _ = tiny_model(torch.tensor([[4, 10, 5, 12, 13, 30]]), pos, types, attention_mask(r, r))
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5], b[:, 5])
    c, _ = tiny_model(torch.tensor([[4, 10, 5, 12, 20, 14]]), pos, types, attention_mask(r, r))
    assert torch.allclose(a[:, :4], c[:, :4], atol=1e-6) and not torch.allclose(a[:, 4:], c[:, 4:])


def test_method_heads_survive_a_round_trip(tmp_path, tiny_model):
    head = tiny_model.add_extra("length", torch.nn.Linear(32, 8))
    tiny_model.save_pretrained(tmp_path)
    again = Transformer.from_pretrained(str(tmp_path))
    restored = again.add_extra("length", torch.nn.Linear(32, 8))
    assert torch.equal(restored.weight, head.weight) and torch.equal(restored.bias, head.bias)
    transformers.BertForMaskedLM.from_pretrained(tmp_path)  # extras do not break HF loading


def test_a_method_head_joins_in_the_models_mode(tiny_model):
    """A decoder attaches its head to a model in eval mode; the head must not stay in train mode (dropout, and
    the fp32 packed products, which only eval mode takes)."""
    assert not tiny_model.eval().add_extra("late", torch.nn.Sequential(torch.nn.Dropout(0.5))).training
    assert tiny_model.train().add_extra("early", torch.nn.Linear(32, 8)).training


def test_attention_dropout_setting_reaches_every_layer(tiny_model):
    from erniegen.finetune import resolve_attention_dropout
    resolve_attention_dropout(tiny_model, 0.25)
    assert tiny_model.config.attention_probs_dropout_prob == 0.25
    assert all(layer.attn.dropout == 0.25 for layer in tiny_model.layers)
    if not torch.cuda.is_available():
        resolve_attention_dropout(tiny_model, None)
        assert all(layer.attn.dropout == 0.0 for layer in tiny_model.layers)
    with pytest.raises(ValueError, match="attention dropout"):
        resolve_attention_dropout(tiny_model, 1.5)


def test_attn_id_is_the_configured_slot_or_mask_with_a_warning(tiny_model, tiny_tokenizer):
    assert tiny_model.attn_id == VOCAB.index("[unused0]")
    tiny_model.settings.attn_token = "[unused1]"
    assert tiny_model.attn_id == VOCAB.index("[unused1]")
    tiny_model.settings.attn_token = "[ATTN]"  # not in this vocabulary
    with pytest.warns(UserWarning, match="not in the vocabulary"):
        assert tiny_model.attn_id == tiny_tokenizer.mask_token_id


def test_inference_projection_equals_the_tied_one_and_follows_weight_updates(tiny_model):
    h = torch.randn(2, 3, tiny_model.config.hidden_size)
    with torch.no_grad():
        fast = tiny_model.logits(h)
    want = tiny_model.logits(h)  # with gradients: the plain tied product
    assert torch.allclose(fast, want.detach(), atol=1e-5)
    with torch.no_grad():
        tiny_model.embeddings.word.weight.mul_(2)  # an in-place update (what an optimizer step does)
        again = tiny_model.logits(h)
    assert torch.allclose(again, tiny_model.logits(h).detach(), atol=1e-5) and not torch.allclose(again, fast)


def _attention_case(past_len: int):
    """An Attention with weights far from zero, a batch of 2 x 3 new tokens over ``past_len`` past ones, and a
    mask that blocks some past and some new keys (every row keeps one)."""
    torch.manual_seed(3)
    attn = Attention(tiny_config()).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 3, 32)
    past = (torch.randn(2, 4, past_len, 8), torch.randn(2, 4, past_len, 8))
    mask = torch.rand(2, 3, past_len + 3) < 0.6
    mask[..., -1] = True
    return attn, x, mask, past


def _past(kind: str, past) -> tuple | PastSlot | None:
    """``past`` as the given kind, in fresh storage (a PastSlot is written into)."""
    k, v = past
    if kind == "none":
        return None
    if kind == "tuple":
        return k.clone(), v.clone()
    grow = torch.zeros(k.shape[0], k.shape[1], 3, k.shape[3])  # room for the 3 new tokens
    return PastSlot(torch.cat([k, grow], 2), torch.cat([v, grow], 2), k.shape[2])


@pytest.mark.parametrize("kind", ["none", "tuple", "slot"])
def test_inference_attention_equals_the_three_projections(kind):
    """Without gradients, one product with the pre-scaled fused weight (and, for a tuple past, the past and the
    new keys scored apart) gives what the three projections give with gradients (training)."""
    attn, x, mask, past = _attention_case(0 if kind == "none" else 4)
    want, want_kv = attn(x, mask, _past(kind, past))
    calls = []
    attn.query.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        got, got_kv = attn(x, mask, _past(kind, past))
    assert not calls  # the fused weight ran, not the query projection
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-5)
    for a, b in zip(got_kv, want_kv):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("change", ["query.weight", "key.bias", "value.weight", "load_state_dict", "double"])
def test_fused_projection_follows_weight_changes(change):
    """The fused weight is a copy: it is rebuilt after an in-place update, a load or a cast."""
    attn, x, mask, past = _attention_case(4)
    with torch.no_grad():
        before, _ = attn(x, mask, past)
        if change == "load_state_dict":
            attn.load_state_dict({k: torch.randn_like(v) * 0.3 for k, v in attn.state_dict().items()})
        elif change == "double":
            attn.double()
            x, past = x.double(), (past[0].double(), past[1].double())
        else:  # an in-place update, as an optimizer step makes
            attn.get_parameter(change).add_(0.5)
        after, _ = attn(x, mask, past)
    want, _ = attn(x, mask, past)  # with gradients: the three projections of the weights now in place
    torch.testing.assert_close(after, want.detach(), rtol=0, atol=1e-5)
    if change == "double":  # same values, rebuilt in the new dtype (a stale fp32 copy would not even multiply)
        assert after.dtype == torch.float64
    else:
        assert not torch.allclose(after, before, atol=1e-3)


def test_the_fused_projection_is_never_saved(tiny_model, tmp_path):
    keys = list(tiny_model.state_dict())
    ids = torch.tensor([[4, 10, 11, 5]])
    with torch.no_grad():
        tiny_model(ids, torch.arange(4)[None], torch.zeros_like(ids), torch.ones(1, 4, 4, dtype=torch.bool))
    assert tiny_model.layers[0].attn.fused_qkv() is not None
    assert list(tiny_model.state_dict()) == keys
    assert [k for k in keys if ".attn." in k and k.startswith("layers.0.")] == [
        f"layers.0.attn.{m}.{p}" for m in ("query", "key", "value", "out") for p in ("weight", "bias")]
    tiny_model.save_pretrained(tmp_path)
    transformers.BertForMaskedLM.from_pretrained(tmp_path)  # still a plain BERT checkpoint
    assert list(Transformer.from_pretrained(str(tmp_path)).state_dict()) == keys


# ---- dropout: four elements to a random 64-bit word ----------------------------------------------------------

def test_dropout_drops_its_rate_at_every_position_of_a_word_and_keeps_the_expectation():
    """15 bits per element: the rate is round(p * 2^15) / 2^15 at each of a word's four quarters (the word's top
    bit is always 0: reading 16 bits would drop the fourth quarter at another rate), the kept values scaled by
    the inverse of the kept share."""
    from erniegen.network import DROPOUT_LEVELS, dropout
    torch.manual_seed(0)
    x = torch.rand(400, 1000) + 0.5
    y = dropout(x, 0.1)
    dropped = round(0.1 * DROPOUT_LEVELS) / DROPOUT_LEVELS
    kept = y != 0
    for quarter in range(4):
        share = kept.flatten()[quarter::4].float().mean().item()
        assert abs(share - (1 - dropped)) < 4 * (dropped * (1 - dropped) / 100_000) ** 0.5  # 4 sigma of 100k draws
    torch.testing.assert_close(y[kept], x[kept] / (1 - dropped), rtol=1e-6, atol=0)
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.005
    rows_differ = (kept[0] != kept[1]).any() and (kept[:, 0] != kept[:, 1]).any()
    assert rows_differ


def test_dropout_is_seeded_passes_its_gradient_through_the_mask_and_is_off_in_eval():
    from erniegen.network import Dropout, dropout
    x = torch.randn(7, 13, 5, requires_grad=True)
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    b = dropout(x, 0.3)
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    scale = (a / x).detach()  # the mask times the scale, element by element
    torch.testing.assert_close(x.grad, g * scale)
    assert dropout(x, 0.0) is x and torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module = Dropout(0.5)
    assert isinstance(module, torch.nn.Dropout) and module.eval()(x) is x
    assert (module.train()(x) == 0).any()
    low = dropout(torch.ones(64, 64, dtype=torch.bfloat16), 0.1)
    assert low.dtype == torch.bfloat16 and set(low.unique().tolist()) <= {0.0, 1.109375}  # 1 / 0.9, in bf16
