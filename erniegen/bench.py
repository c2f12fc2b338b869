"""Latency and throughput of decoders, measured the same way for every method and for a baseline.

Each measurement warms up first, then times every batch separately; medians and p90 come from those
per-batch timings. A Hugging Face GPT-2 of the same depth and width (random weights, ``generate()``
with its key/value cache) can be timed in the same run on the same input and output lengths.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .decoding import generate_ids
from .search import DecodeOptions


def cpu_model() -> str:
    """``lscpu``'s model name (the CPU varies between these machines, so every figure is a ratio within one)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "unknown (no lscpu)"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def write_results(path: str, rows: list[dict], **meta) -> None:
    """Benchmark rows with the date, machine, CPU model and torch version beside them, written atomically."""
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "cpu": cpu_model(), "torch": torch.__version__} | meta
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, path)


def _summary(batch_ms: list[float], batch_size: int, n_samples: int, n_tokens: int) -> dict:
    if not batch_ms:
        raise ValueError(f"nothing was timed: give more than the warm-up's samples (batch size {batch_size})")
    total_s = sum(batch_ms) / 1000
    per_sample = sorted(ms / batch_size for ms in batch_ms)
    p90 = per_sample[min(len(per_sample) - 1, int(round(0.9 * (len(per_sample) - 1))))]
    return {"batch_size": batch_size, "num_samples": n_samples,
            "median_ms_per_sample": round(statistics.median(per_sample), 3), "p90_ms_per_sample": round(p90, 3),
            "samples_per_s": round(n_samples / total_s, 3), "generated_tokens_per_s": round(n_tokens / total_s, 1)}


def _batches(items: Sequence, size: int) -> list[Sequence]:
    """Full batches only, so every timing is of the same batch size."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items) - size + 1, size)]


@torch.inference_mode()
def bench_decoder(model, sources: Sequence[Sequence[int]], decoder: str, opts: DecodeOptions,
                  batch_size: int = 1, warmup: int = 2) -> dict:
    """Time ``decoder`` in batches of ``batch_size``; the first ``warmup`` batches only warm up."""
    batches = _batches(list(sources), batch_size)
    for b in batches[:warmup]:
        generate_ids(model, b, decoder, batch_size=batch_size, opts=opts)
    times, tokens, n = [], 0, 0
    for b in batches[warmup:]:
        t0 = time.perf_counter()
        out = generate_ids(model, b, decoder, batch_size=batch_size, opts=opts)
        times.append((time.perf_counter() - t0) * 1000)
        tokens += sum(len(x) + 1 for x in out)  # +1: the end token is generated too
        n += len(b)
    return {"decoder": decoder, "num_beams": opts.num_beams} | _summary(times, len(batches[0]), n, tokens)


def hf_gpt2_like(model, seed: int = 0):
    """A GPT-2 with our model's depth, width, heads and vocabulary, random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_position_embeddings, n_embd=c.hidden_size,
                     n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_inner=c.intermediate_size,
                     pad_token_id=0, eos_token_id=c.vocab_size - 1, bos_token_id=c.vocab_size - 1)
    return GPT2LMHeadModel(cfg).eval()


@torch.inference_mode()
def bench_hf_baseline(hf_model, sources: Sequence[Sequence[int]], opts: DecodeOptions, batch_size: int = 1,
                      warmup: int = 2) -> dict:
    """HF ``generate()`` with the same prompts and exactly ``opts.max_length`` new tokens."""
    batches = _batches(list(sources), batch_size)

    def run(batch):
        width = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, s in enumerate(batch):  # left padding, as decoder-only generation needs
            ids[i, width - len(s):] = torch.tensor(s)
            att[i, width - len(s):] = 1
        return hf_model.generate(input_ids=ids, attention_mask=att, max_new_tokens=opts.max_length,
                                 min_new_tokens=opts.max_length, num_beams=opts.num_beams, do_sample=False,
                                 use_cache=True, pad_token_id=0, length_penalty=opts.length_penalty)

    for b in batches[:warmup]:
        run(b)
    times, n = [], 0
    for b in batches[warmup:]:
        t0 = time.perf_counter()
        run(b)
        times.append((time.perf_counter() - t0) * 1000)
        n += len(b)
    return ({"decoder": "hf-gpt2-generate", "num_beams": opts.num_beams}
            | _summary(times, len(batches[0]), n, n * opts.max_length))
