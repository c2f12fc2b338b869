"""The matrix products of a batch-1 decode step at one and two rows, in the stored (out, in) layout
(``F.linear``) and in a transposed contiguous copy (``addmm``), fp32 (issue 13; BENCHMARKS.md section 3).

    .venv/bin/python benchmarks/matvec_layouts.py

Shapes are all-MiniLM-L6-v2's: the attention and feed-forward matrices and the 384 x 30,522 vocabulary
projection. Median of 200 calls after 50 warm-up calls; prints microseconds and the GB/s of weights read.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(384, 384), (384, 1536), (1536, 384), (384, 30522)]  # (in, out)


def median_us(fn, repeats: int = 200, warmup: int = 50) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    torch.manual_seed(0)
    for n_in, n_out in SHAPES:
        w, b = torch.randn(n_out, n_in), torch.randn(n_out)
        wt = w.t().contiguous()
        mb = w.numel() * 4 / 1e6
        for rows in (1, 2):
            x = torch.randn(rows, n_in)
            stored = median_us(lambda: F.linear(x, w, b))
            transposed = median_us(lambda: torch.addmm(b, x, wt))
            print(f"{n_in} x {n_out}, {rows} row(s): stored {stored:.0f} us ({mb / stored * 1e3:.1f} GB/s), "
                  f"transposed {transposed:.0f} us ({mb / transposed * 1e3:.1f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
