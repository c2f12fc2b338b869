"""erniegen.allocator: after keep_freed_memory, a tensor freed and allocated again reuses its pages instead of
faulting them in anew (glibc only; the command line calls it first)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

FAULTS = """
import json, resource, sys, torch
from erniegen.allocator import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, allocated, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults()
kept = keep_freed_memory()
faults()  # the heap grows to the block once
print(json.dumps({"plain": plain, "kept": kept, "after": faults()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_reuse_their_pages():
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    if not got["kept"]:
        pytest.skip("not glibc: keep_freed_memory does nothing here")
    assert got["plain"] >= 10 * 16 * 2**20 * 4 // 4096 * 0.9  # every 4 KiB page of every block faulted in
    assert got["after"] < got["plain"] / 100


def test_the_command_line_keeps_freed_memory(monkeypatch):
    from erniegen import allocator, cli

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert calls == [1]
