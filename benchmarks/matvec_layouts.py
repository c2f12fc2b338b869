"""The matrix products of a batch-1 decode step at one and two rows, in the stored (out, in) layout
(``F.linear``) and in a transposed contiguous copy (``addmm``), fp32 (issue 13; BENCHMARKS.md section 3);
and, if onnxruntime is installed (``pip install "erniegen[onnx]"``), the same product as one ONNX ``Gemm``
node run by ONNX Runtime on the same threads, the kernel an ONNX export of the step would use.

    .venv/bin/python benchmarks/matvec_layouts.py

Shapes are all-MiniLM-L6-v2's: the attention and feed-forward matrices and the 384 x 30,522 vocabulary
projection. Median of 200 calls after 50 warm-up calls; prints microseconds and the GB/s of weights read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from inference_precision import median_ms, onnx_runtime_gemm

SHAPES = [(384, 384), (384, 1536), (1536, 384), (384, 30522)]  # (in, out)


def median_us(fn) -> float:
    """Median of 200 calls after 50 warm-up calls, in microseconds."""
    return median_ms(fn, 200, warmup=50) * 1000


def main() -> None:
    torch.manual_seed(0)
    for n_in, n_out in SHAPES:
        w, b = torch.randn(n_out, n_in), torch.randn(n_out)
        wt = w.t().contiguous()
        mb = w.numel() * 4 / 1e6
        ort = onnx_runtime_gemm(wt, b)
        for rows in (1, 2):
            x = torch.randn(rows, n_in)
            stored = median_us(lambda: F.linear(x, w, b))
            transposed = median_us(lambda: torch.addmm(b, x, wt))
            line = (f"{n_in} x {n_out}, {rows} row(s): stored {stored:.0f} us ({mb / stored * 1e3:.1f} GB/s), "
                    f"transposed {transposed:.0f} us ({mb / transposed * 1e3:.1f} GB/s)")
            if ort is not None:
                torch.testing.assert_close(ort(x), F.linear(x, w, b), rtol=1e-4, atol=1e-3)
                runtime = median_us(lambda: ort(x))
                line += f", ONNX Runtime {runtime:.0f} us ({mb / runtime * 1e3:.1f} GB/s)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
