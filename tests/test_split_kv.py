"""The split-KV attention kernels on the CPU: tests/interpreted/ in a process of its own under
Triton's interpreter (Triton reads TRITON_INTERPRET when it is imported)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aerie.split_kv
from aerie.fused import grouped_query_attention

ROOT = Path(__file__).resolve().parent.parent


def test_split_kv_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/interpreted"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_without_the_kernels_grouped_attention_is_sdpa(monkeypatch):
    """Where the kernels cannot run (here: the CPU, no interpreter), asking for them runs
    SDPA: the same result, and no launch."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aerie.split_kv, "_launch", lambda *a: pytest.fail("launched on the CPU"))
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    mask = torch.zeros(1, 1, 3, 8)
    mask[..., 5:] = float("-inf")
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask, 0.25, split_kv=True),
                               grouped_query_attention(q, k, v, mask, 0.25))
