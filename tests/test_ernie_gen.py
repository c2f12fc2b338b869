"""The ERNIE-GEN objective: noise touches inputs only, flows and losses combine as the paper says."""
import pytest
import torch
import torch.nn.functional as F

from erniegen.batch import collate_pairs, span_start_per_token
from erniegen.ernie_gen import (ErnieGenConfig, ErnieGenObjective, encode_context, noise_ids, placeholder_pass,
                                replacement_vocab)
from erniegen.masks import SPAN, WORD, target_roles

ITEMS = [{"source_ids": [4, 10, 11, 12, 5], "target_ids": [20, 21, 22, 5], "span_starts": [0, 2]},
         {"source_ids": [4, 30, 5], "target_ids": [40, 5], "span_starts": [0]}]


def _objective(model, **cfg):
    repl = replacement_vocab(model.tokenizer, model.config.vocab_size, [model.attn_id])
    return ErnieGenObjective(model, ErnieGenConfig(**cfg), model.attn_id, repl)


def test_noise_replaces_only_valid_tokens_with_ordinary_words(tiny_model):
    repl = replacement_vocab(tiny_model.tokenizer, tiny_model.config.vocab_size, [tiny_model.attn_id])
    assert not set(repl.tolist()) & {0, 1, 2, 3, 4, 5, 6}
    ids = torch.full((64, 50), 7)
    valid = torch.arange(50)[None, :] < 40
    out = noise_ids(ids, valid, 0.7, repl, torch.Generator().manual_seed(0))
    changed = out != ids
    assert not changed[:, 40:].any()
    assert abs(changed[:, :40].float().mean().item() - 0.7 * (1 - 1 / len(repl))) < 0.02
    assert set(out[changed].tolist()) <= set(repl.tolist())


def test_noise_leaves_labels_alone(tiny_model):
    """The noised loss equals a hand-run of the flows on noised inputs scored against clean labels."""
    obj = _objective(tiny_model, noise_rate=0.5, label_smoothing=0.0).train()
    batch = collate_pairs(ITEMS)
    torch.manual_seed(3)
    got = obj(**batch)["loss"]
    torch.manual_seed(3)
    valid = torch.arange(4)[None] < batch["tgt_len"][:, None]
    noised = noise_ids(batch["tgt_ids"], valid, 0.5, obj.replacements)
    assert not torch.equal(noised, batch["tgt_ids"])
    _, kv, roles = encode_context(tiny_model, batch["src_ids"], batch["src_len"], noised, batch["tgt_len"])
    h = placeholder_pass(tiny_model, tiny_model.attn_id, batch["src_len"],
                         target_roles(WORD, batch["tgt_len"], 4), kv, roles)
    expected = F.cross_entropy(tiny_model.logits(h[valid]), batch["tgt_ids"][valid])
    assert torch.allclose(got, expected, atol=1e-6)
    # and it differs from the clean loss, so the noise really reached the inputs
    assert (got - obj.eval()(**batch)["loss"]).abs() > 1e-6


def test_span_flow_and_lambda(tiny_model):
    batch = collate_pairs(ITEMS)
    assert batch["span_start"].tolist() == [[0, 0, 2, 2], [0, 0, 0, 0]]
    out = _objective(tiny_model, noise_rate=0.0, word_weight=0.5).eval()(**batch)
    assert torch.allclose(out["loss"], 0.5 * out["loss_word"] + 0.5 * out["loss_span"])
    # word loss is the same whether or not the span flow rides along in the same call
    only_word = _objective(tiny_model, noise_rate=0.0).eval()(**batch)
    assert torch.allclose(only_word["loss"], out["loss_word"], atol=1e-6)
    # the span placeholder of t3 (span [t3 t4] starts at 2) sees t1, t2 but not t3
    _, kv, roles = encode_context(tiny_model, batch["src_ids"], batch["src_len"], batch["tgt_ids"], batch["tgt_len"])
    span = target_roles(SPAN, batch["tgt_len"], 4, span_start=batch["span_start"])
    word = target_roles(WORD, batch["tgt_len"], 4)
    hs = placeholder_pass(tiny_model, tiny_model.attn_id, batch["src_len"], span, kv, roles)
    hw = placeholder_pass(tiny_model, tiny_model.attn_id, batch["src_len"], word, kv, roles)
    assert torch.allclose(hs[0, 2], hw[0, 2], atol=1e-6)  # start of a span: same context as the word flow
    assert not torch.allclose(hs[0, 3], hw[0, 3])  # inside a span: less context
    with pytest.raises(ValueError, match="span"):
        _objective(tiny_model, word_weight=0.5)(**{k: v for k, v in batch.items() if k != "span_start"})


def test_typical_baseline_predicts_from_previous_token(tiny_model):
    obj = _objective(tiny_model, method="typical", noise_rate=0.0, label_smoothing=0.0).eval()
    batch = collate_pairs(ITEMS[:1])
    hidden, _, _ = encode_context(tiny_model, batch["src_ids"], batch["src_len"], batch["tgt_ids"], batch["tgt_len"])
    # t1 from the source's [SEP] (position 4), t2..t4 from t1..t3 (positions 5..7)
    h = hidden[0, [4, 5, 6, 7]]
    expected = F.cross_entropy(tiny_model.logits(h), batch["tgt_ids"][0])
    assert torch.allclose(obj(**batch)["loss"], expected, atol=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="noise_rate"):
        ErnieGenConfig(noise_rate=1.5)
    with pytest.raises(ValueError, match="typical"):
        ErnieGenConfig(method="typical", word_weight=0.5)
    assert span_start_per_token([[0, 1, 3]], 5).tolist() == [[0, 1, 1, 3, 3]]
