"""Training losses over the vocabulary that never hold its (N, V) log-probabilities.

A label-smoothed cross-entropy reads log_softmax(logits) at a few ids per row (the target; with copying, the
source's words too) and its mean over the vocabulary. Autograd's path (``log_softmax`` of the logits cast to
fp32, ``gather``, ``mean``) made about ten passes over (N, V) fp32 tensors forward and back: the zeros under each
gather's gradient, the expanded mean's division, the log-softmax's own backward, the casts. On a CPU with AMX,
where the model's bf16 products are cheap, those passes took a quarter of the operators' CPU time in an ERNIE-GEN
training step (BENCHMARKS.md section 2). :func:`log_softmax_at` computes the same values and gradient in row
blocks that stay in cache: one log-sum-exp forward, and one softmax, scaled and scattered, back.
"""
from __future__ import annotations

import torch

# Rows per block: 16 x 30,522 fp32 scores are ~2 MB, a block that stays in a core's cache between passes.
BLOCK_ROWS = 16


class _LogSoftmaxAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, v = logits.shape
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.empty(n, dtype=torch.float32, device=logits.device)
        for start in range(0, n, BLOCK_ROWS):
            block = logits[start:start + BLOCK_ROWS].float()
            lse[start:start + BLOCK_ROWS] = torch.logsumexp(block, -1)
            total[start:start + BLOCK_ROWS] = block.sum(-1)
        ctx.save_for_backward(logits, ids, lse)
        return logits.gather(-1, ids).float() - lse[:, None], total / v - lse

    @staticmethod
    def backward(ctx, grad_at: torch.Tensor | None, grad_mean: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, None]:
        logits, ids, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        n, v = logits.shape
        grad_at = torch.zeros(ids.shape, dtype=torch.float32, device=logits.device) if grad_at is None else grad_at
        grad_mean = torch.zeros(n, dtype=torch.float32, device=logits.device) if grad_mean is None else grad_mean
        # d logp_i / d x_j = [i = j] - p_j: every output takes its gradient times p away from every column, the
        # mean adds its gradient / V to every column, each picked id its own gradient to its column
        taken = -(grad_at.sum(-1) + grad_mean)[:, None]
        spread = (grad_mean / v)[:, None]
        grad = torch.empty_like(logits)
        for start in range(0, n, BLOCK_ROWS):
            rows = slice(start, start + BLOCK_ROWS)
            p = (logits[rows].float() - lse[rows, None]).exp_()
            p.mul_(taken[rows]).add_(spread[rows]).scatter_add_(-1, ids[rows], grad_at[rows])
            grad[rows] = p
        return grad, None


def log_softmax_at(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(logits)`` at ``ids`` (N, K) and its mean over the vocabulary (N,), both fp32, for (N, V)
    ``logits`` of any float dtype; their gradient reaches the logits in the logits' dtype."""
    if logits.dim() != 2 or ids.shape[0] != logits.shape[0]:
        raise ValueError(f"logits must be (N, V) and ids (N, K); got {tuple(logits.shape)} and {tuple(ids.shape)}")
    return _LogSoftmaxAt.apply(logits.contiguous(), ids)


def smoothed_nll(at: torch.Tensor, mean: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The label-smoothed loss, mean over rows, from log p(target) ``at`` and the mean of log p over the
    vocabulary ``mean``: (1 - ε)·NLL plus ε times the mean of -log p, as ``F.cross_entropy`` smooths."""
    return ((1 - smoothing) * -at - smoothing * mean).mean()


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), target, label_smoothing=smoothing)`` by :func:`log_softmax_at`."""
    at, mean = log_softmax_at(logits, target[:, None])
    return smoothed_nll(at[:, 0], mean, smoothing)
