"""Every flow's mask against a hand-written matrix (3-token source, 3-token target)."""
import torch

from erniegen.masks import CONTEXT, NAR, SPAN, WORD, attention_mask, source_roles, target_roles


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)[None]


def _ctx(src_len=3, tgt_len=3):
    return source_roles(torch.tensor([src_len]), 3).cat(target_roles(CONTEXT, torch.tensor([tgt_len]), 3))


def test_contextual_flow():
    r = _ctx()
    #            s1 s2 s3 t1 t2 t3
    expected = _m([[1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0],
                   [1, 1, 1, 1, 1, 0],
                   [1, 1, 1, 1, 1, 1]])
    assert torch.equal(attention_mask(r, r), expected)


def test_word_by_word_flow():
    ctx = _ctx()
    q = target_roles(WORD, torch.tensor([3]), 3)
    #            s1 s2 s3 t1 t2 t3 A1 A2 A3
    expected = _m([[1, 1, 1, 0, 0, 0, 1, 0, 0],
                   [1, 1, 1, 1, 0, 0, 0, 1, 0],
                   [1, 1, 1, 1, 1, 0, 0, 0, 1]])
    assert torch.equal(attention_mask(q, ctx.cat(q)), expected)


def test_span_by_span_flow():
    ctx = _ctx()
    # spans [t1] [t2 t3]: each position's span start is 0, 1, 1
    q = target_roles(SPAN, torch.tensor([3]), 3, span_start=torch.tensor([[0, 1, 1]]))
    #            s1 s2 s3 t1 t2 t3 S1 S2 S3
    expected = _m([[1, 1, 1, 0, 0, 0, 1, 0, 0],
                   [1, 1, 1, 1, 0, 0, 0, 1, 0],
                   [1, 1, 1, 1, 0, 0, 0, 0, 1]])
    assert torch.equal(attention_mask(q, ctx.cat(q)), expected)


def test_word_and_span_flows_in_one_call_do_not_see_each_other():
    ctx = _ctx()
    w = target_roles(WORD, torch.tensor([3]), 3)
    s = target_roles(SPAN, torch.tensor([3]), 3, span_start=torch.tensor([[0, 0, 0]]))
    q = w.cat(s)
    m = attention_mask(q, ctx.cat(q))[0]
    assert torch.equal(m[:, 6:], torch.eye(6, dtype=torch.bool))
    # one span over the whole target: every span placeholder sees only the source
    assert torch.equal(m[3:, :6], torch.tensor([[1, 1, 1, 0, 0, 0]] * 3, dtype=torch.bool))


def test_padding_is_never_visible():
    # row 0: source of 2 (+1 pad), target of 2 (+1 pad)
    r = source_roles(torch.tensor([2]), 3).cat(target_roles(CONTEXT, torch.tensor([2]), 3))
    #            s1 s2 p  t1 t2 p
    expected = _m([[1, 1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],  # a pad query sees the source only (never used)
                   [1, 1, 0, 1, 0, 0],
                   [1, 1, 0, 1, 1, 0],
                   [1, 1, 0, 0, 0, 0]])
    assert torch.equal(attention_mask(r, r), expected)


def test_nar_flow():
    r = source_roles(torch.tensor([3]), 3).cat(target_roles(NAR, torch.tensor([2]), 3))
    #            s1 s2 s3 y1 y2 p
    expected = _m([[1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 1, 0],
                   [1, 1, 1, 1, 1, 0],
                   [1, 1, 1, 0, 0, 0]])
    assert torch.equal(attention_mask(r, r), expected)


def test_decoding_step_mask_matches_training_rows():
    """Step i of infilling decoding feeds [t_{i-1}, A_i] against the cache: same rows as training."""
    cache = source_roles(torch.tensor([3]), 3).cat(target_roles(CONTEXT, torch.tensor([1]), 1))  # s1 s2 s3 t1
    new = target_roles(CONTEXT, torch.tensor([1]), 1, offset=1).cat(target_roles(WORD, torch.tensor([1]), 1, offset=2))
    #            s1 s2 s3 t1 | t2 A3
    expected = _m([[1, 1, 1, 1, 1, 0],
                   [1, 1, 1, 1, 1, 1]])
    assert torch.equal(attention_mask(new, cache.cat(new)), expected)
