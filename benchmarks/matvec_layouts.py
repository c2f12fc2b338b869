"""The matrix products of a batch-1 decode step at one and two rows, in the stored (out, in) layout
(``F.linear``) and in a transposed contiguous copy (``addmm``), fp32 (issue 13; BENCHMARKS.md section 3);
and, if onnxruntime is installed (``pip install "erniegen[onnx]"``), the same product as one ONNX ``Gemm``
node run by ONNX Runtime on the same threads, the kernel an ONNX export of the step would use. With
``--packed``: at two rows, erniegen's oneDNN-packed product (``precision.packed_linear``) against the plain
``F.linear``, in fp32 and bf16, which ``precision.packed_dtypes`` chooses between per CPU.

    .venv/bin/python benchmarks/matvec_layouts.py [--packed]

Shapes are all-MiniLM-L6-v2's: the attention and feed-forward matrices and the 384 x 30,522 vocabulary
projection. Median of 200 calls after 50 warm-up calls; prints microseconds and the GB/s of weights read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from inference_precision import median_ms, onnx_runtime_gemm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen.precision import packed_linear  # noqa: E402

SHAPES = [(384, 384), (384, 1152), (384, 1536), (1536, 384), (384, 30522)]  # (in, out)


def median_us(fn) -> float:
    """Median of 200 calls after 50 warm-up calls, in microseconds."""
    return median_ms(fn, 200, warmup=50) * 1000


def packed_against_plain() -> None:
    """Two rows (a decode step's word and its [ATTN]), packed and plain, fp32 and bf16, under no_grad."""
    holder = torch.nn.Module()  # what the packed copies are cached under
    with torch.no_grad():
        for n_in, n_out in SHAPES:
            cells = []
            for dtype in (torch.float32, torch.bfloat16):
                w, b, x = (t.to(dtype) for t in (torch.randn(n_out, n_in), torch.randn(n_out), torch.randn(2, n_in)))
                slot = str(dtype)
                packed = median_us(lambda: packed_linear(x, w, b, holder, slot))
                plain = median_us(lambda: F.linear(x, w, b))
                cells.append(f"{str(dtype)[6:]} packed {packed:.1f} us, plain {plain:.1f} us")
            print(f"{n_in} x {n_out}, 2 rows: " + "; ".join(cells), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packed", action="store_true")
    torch.manual_seed(0)
    if p.parse_args().packed:
        packed_against_plain()
        return
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
