"""The ERNIE-GEN objective: noise touches inputs only, flows and losses combine as the paper says."""
import pytest
import torch
import torch.nn.functional as F

from conftest import copying
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


# ---- copying (pointer-generator over the source) ------------------------------------------------


def test_copy_mixture_by_hand(tiny_model):
    """p(w) = g·softmax(logits)_w + (1-g)·Σ_{i: x_i=w} a_i, with a = softmax(W_q h · k_i / √H) over the
    source's words (special tokens and padding never copied); a repeated word gets both its attention
    weights; the gate's extremes give the plain distribution and the pure copy distribution; a source
    with nothing to copy keeps the plain distribution, and its gradients stay finite."""
    from erniegen.ernie_gen import copy_source, next_token_log_probs
    head = copying(tiny_model)
    src_ids, src_len = torch.tensor([[4, 10, 11, 10, 5], [4, 30, 5, 0, 0], [4, 5, 0, 0, 0]]), torch.tensor([5, 3, 2])
    _, kv, _ = encode_context(tiny_model, src_ids, src_len)
    source = copy_source(tiny_model, kv, src_ids, src_len)
    assert source.valid.tolist() == [[False, True, True, True, False], [False, True, False, False, False],
                                     [False] * 5]
    h = torch.randn(3, 3, 32, requires_grad=True)
    got = next_token_log_probs(tiny_model, h, source).exp()
    words = {0: [1, 2, 3], 1: [1]}
    for b, positions in words.items():
        keys = kv[-1][0][b].transpose(0, 1).reshape(5, 32)[positions]
        for t in range(3):
            a = torch.softmax(head.query(h[b, t]) @ keys.T / 32 ** 0.5, -1)
            g = torch.sigmoid(head.gate(h[b, t]))
            expected = g * torch.softmax(tiny_model.logits(h[b, t]), -1)
            for i, pos in enumerate(positions):
                expected[src_ids[b, pos]] += (1 - g[0]) * a[i]
            assert torch.allclose(got[b, t], expected, atol=1e-6)
    assert torch.allclose(got[2], torch.softmax(tiny_model.logits(h[2]), -1), atol=1e-6)   # nothing to copy
    assert torch.allclose(got.sum(-1), torch.ones(3, 3), atol=1e-5)
    got.log()[:, :, 10:12].sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(head.query.weight.grad).all()
    valid = torch.tensor([[True, False, True], [False, True, True], [True, False, False]])
    assert torch.allclose(next_token_log_probs(tiny_model, h, source, valid), got.log()[valid], atol=1e-5)

    copying(tiny_model, gate_bias=60.0, constant_gate=True)   # g = 1: the vocabulary distribution
    assert torch.allclose(next_token_log_probs(tiny_model, h, source),
                          torch.log_softmax(tiny_model.logits(h), -1), atol=1e-5)
    copying(tiny_model, gate_bias=-60.0, constant_gate=True)  # g = 0: the source's words only
    p = next_token_log_probs(tiny_model, h, source).exp()
    assert set((p[0].sum(0) > 1e-6).nonzero().flatten().tolist()) == {10, 11}
    assert set((p[1].sum(0) > 1e-6).nonzero().flatten().tolist()) == {30}


def test_the_sparse_mixture_loss_equals_the_dense_one_in_value_and_gradient(tiny_model):
    """Training reads the target's log-probability and the vocabulary mean off the mixture's parts
    (copy_loss_terms); both, and their gradients, equal those of the whole (N, V) distribution the decoders
    read, a repeated source word counted once."""
    from erniegen.ernie_gen import copy_loss_terms, copy_mixture, copy_source
    copying(tiny_model)
    src_ids, src_len = torch.tensor([[4, 10, 11, 10, 10, 5], [4, 30, 5, 0, 0, 0], [4, 5, 0, 0, 0, 0]]), \
        torch.tensor([6, 3, 2])
    with torch.no_grad():
        _, kv, _ = encode_context(tiny_model, src_ids, src_len)
    source = copy_source(tiny_model, kv, src_ids, src_len)
    select = torch.tensor([[True, True, False], [True, False, True], [True, True, True]])
    target = torch.tensor([10, 11, 7, 30, 10, 5, 12])  # in the source three times or once, and not
    h = torch.randn(3, 3, 32)
    grads = []
    for sparse in (True, False):
        x = h.clone().requires_grad_(True)
        tiny_model.zero_grad()
        if sparse:
            at, mean = copy_loss_terms(tiny_model, x, source, select, target)
        else:
            full = copy_mixture(tiny_model, x, source, select).full()
            at, mean = full.gather(-1, target[:, None])[:, 0], full.mean(-1)
        (0.9 * -at - 0.1 * mean).mean().backward()
        grads.append((at.detach(), mean.detach(), x.grad, tiny_model.extras["copy"].query.weight.grad.clone(),
                      tiny_model.embeddings.word.weight.grad.clone()))
    for sparse, dense in zip(*grads):
        assert torch.allclose(sparse, dense, atol=1e-5)
    assert grads[0][0][0] > grads[0][0][2]  # the copied word gains over a word the source lacks


def test_copy_objective_is_the_smoothed_loss_of_the_mixture_and_trains_the_head(tiny_model):
    from erniegen.ernie_gen import COPY, copy_source, next_token_log_probs
    obj = _objective(tiny_model.train(), noise_rate=0.0, copy=True, label_smoothing=0.1)
    assert tiny_model.settings.extra[COPY] is True and COPY in tiny_model.extras
    batch = collate_pairs(ITEMS, 0)
    out = obj(**batch)
    src_ids, src_len, tgt, tgt_len = batch["src_ids"], batch["src_len"], batch["tgt_ids"], batch["tgt_len"]
    _, kv, roles = encode_context(tiny_model, src_ids, src_len, tgt, tgt_len)
    lt = tgt.shape[1]
    valid = torch.arange(lt)[None, :] < tgt_len[:, None]
    h = placeholder_pass(tiny_model, tiny_model.attn_id, src_len, target_roles(WORD, tgt_len, lt), kv, roles)
    logp = next_token_log_probs(tiny_model, h, copy_source(tiny_model, kv, src_ids, src_len), valid)
    expected = (0.9 * -logp.gather(1, tgt[valid][:, None]).squeeze(1) - 0.1 * logp.mean(-1)).mean()
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    out["loss"].backward()
    head = tiny_model.extras[COPY]
    assert head.query.weight.grad.abs().sum() > 0 and head.gate.weight.grad.abs().sum() > 0
    assert torch.isfinite(torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])).all()


def test_without_copy_the_objective_records_it_and_adds_no_head(tiny_model):
    from erniegen.ernie_gen import COPY, build_objective
    from erniegen.data import get_task
    build_objective("ernie-gen", tiny_model, get_task("default"), {})
    assert tiny_model.settings.extra[COPY] is False and COPY not in tiny_model.extras


def test_a_copying_model_saves_loads_and_decodes_alike_in_every_precision(tiny_model, tmp_path):
    """The head and the switch travel with the checkpoint; bf16 and int8 decode it too, ONNX Runtime alike."""
    import erniegen
    from erniegen.decoding import DecodeOptions, generate_ids
    from erniegen.model import Transformer
    copying(tiny_model, gate_bias=0.0, constant_gate=True)
    sources, opts = [[4, 10, 11, 12, 5], [4, 20, 21, 5]], DecodeOptions(max_length=8, min_length=8, num_beams=2)
    before = generate_ids(tiny_model, sources, "infilling", opts=opts)
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = Transformer.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.settings.extra["copy"] is True
    assert generate_ids(loaded, sources, "infilling", opts=opts) == before
    assert torch.equal(loaded.extras["copy"].query.weight, tiny_model.extras["copy"].query.weight)
    for precision in ("bf16", "int8"):
        other = erniegen.load(str(tmp_path / "m"), precision=precision)
        out = generate_ids(other, sources, "infilling", opts=opts)
        assert [len(x) for x in out] == [len(x) for x in before]
    pytest.importorskip("onnxruntime")
    from erniegen.onnx_runtime import use_onnx_runtime
    assert generate_ids(use_onnx_runtime(loaded), sources, "infilling", opts=opts) == before


def test_copy_trains_under_bf16_autocast_and_its_switch_is_a_boolean(tiny_model):
    """CPU autocast keeps softmax in bf16: the mixture runs in fp32 so the scatter and the loss do not depend
    on it; the loss stays within bf16's rounding of the fp32 loss."""
    obj = _objective(tiny_model.train(), noise_rate=0.0, copy=True)
    batch = collate_pairs(ITEMS, 0)
    fp32 = obj(**batch)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = obj(**batch)["loss"]
    bf16.backward()
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.05 * fp32.item()
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.extras["copy"].parameters())
    with pytest.raises(ValueError, match="copy must be true or false"):
        ErnieGenConfig(copy="false")
