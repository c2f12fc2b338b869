"""The vocabulary losses that never hold (N, V) log-probabilities: the same values and gradients as autograd's
log_softmax / gather / mean and as F.cross_entropy with label smoothing."""
import pytest
import torch
import torch.nn.functional as F

from erniegen.losses import BLOCK_ROWS, log_softmax_at, smoothed_cross_entropy


def _reference(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, ids), logp.mean(-1)


@pytest.mark.parametrize("rows", [1, BLOCK_ROWS, 2 * BLOCK_ROWS + 5])
def test_log_softmax_at_equals_autograd_in_value_and_gradient(rows):
    """Rows in several blocks (and a partial one); an id picked twice in a row gets both gradients."""
    torch.manual_seed(0)
    logits = torch.randn(rows, 50, dtype=torch.float64) * 3
    ids = torch.randint(0, 50, (rows, 4))
    ids[:, 3] = ids[:, 0]
    weights = torch.randn(rows, 4, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
    grads, values = [], []
    for fn in (log_softmax_at, _reference):
        x = logits.clone().requires_grad_(True)
        at, mean = fn(x, ids)
        ((at * weights[0]).sum() + (mean * weights[1]).sum()).backward()
        values.append((at.detach(), mean.detach()))
        grads.append(x.grad)
    assert values[0][0].dtype == torch.float32 and values[0][1].dtype == torch.float32
    for got, expected in zip(values[0], values[1]):
        assert torch.allclose(got, expected.float(), atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_log_softmax_at_gradient_by_hand():
    """d/dx_j of logp_i = [i = j] - p_j; of the mean = 1/V - p_j: checked on one row of three."""
    x = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    at, mean = log_softmax_at(x, torch.tensor([[2]]))
    p = torch.softmax(x.detach(), -1)[0]
    assert torch.allclose(at, torch.log(p[2]).reshape(1, 1))
    assert torch.allclose(mean, torch.log(p).mean().reshape(1))
    (at.sum() + 2 * mean.sum()).backward()
    expected = torch.tensor([0.0, 0.0, 1.0]) - p + 2 * (1 / 3 - p)
    assert torch.allclose(x.grad[0], expected, atol=1e-6)


def test_only_one_output_used_and_no_gradient_wanted():
    torch.manual_seed(1)
    x = torch.randn(5, 11, requires_grad=True)
    _, mean = log_softmax_at(x, torch.zeros(5, 1, dtype=torch.long))
    mean.sum().backward()
    assert torch.allclose(x.grad, 1 / 11 - torch.softmax(x.detach(), -1), atol=1e-6)
    at, _ = log_softmax_at(torch.randn(5, 11), torch.zeros(5, 1, dtype=torch.long))
    assert not at.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smoothed_cross_entropy_equals_torch(dtype):
    """The loss and its gradient equal F.cross_entropy(logits.float(), label_smoothing=ε); the gradient
    reaches bf16 logits in bf16."""
    torch.manual_seed(2)
    logits = (torch.randn(37, 300) * 4).to(dtype)
    target = torch.randint(0, 300, (37,))
    got_x, ref_x = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got = smoothed_cross_entropy(got_x, target, 0.1)
    expected = F.cross_entropy(ref_x.float(), target, label_smoothing=0.1)
    got.backward()
    expected.backward()
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)
    assert got_x.grad.dtype == dtype
    tolerance = 1e-7 if dtype == torch.float32 else 2e-5  # bf16's rounding of gradients ~1e-3 in size
    assert torch.allclose(got_x.grad.float(), ref_x.grad.float(), atol=tolerance)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"logits must be \(N, V\)"):
        log_softmax_at(torch.randn(2, 3, 4), torch.zeros(2, 3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(4, 1\)"):
        log_softmax_at(torch.randn(3, 4), torch.zeros(4, 1, dtype=torch.long))
