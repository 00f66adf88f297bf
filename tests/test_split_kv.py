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


def test_kernels_that_fail_give_way_to_sdpa(monkeypatch, capsys):
    """A Triton that cannot build the kernels: the call that meets it says why and answers by
    SDPA, and the kernels are not tried again in this process."""
    tries = []

    def broken(*args):
        tries.append(1)
        raise RuntimeError("no compiler for this card")

    monkeypatch.setattr(aerie.split_kv, "_launch", broken)
    monkeypatch.setattr(aerie.split_kv._failure, "reason", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that `available` says yes on the CPU
    torch.manual_seed(0)
    rows, key, value = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    mask = torch.zeros(1, 1, 3, 10)
    mask[0, 0, 0, 4:] = float("-inf")
    if aerie.split_kv.triton is not None:
        assert aerie.split_kv.available(rows)
    got = aerie.split_kv.split_kv_attention(rows, key, value, mask, 0.25)
    per_row = mask[:, :, [0, 1, 2, 0, 1, 2]]
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(
        rows, key, value, attn_mask=per_row, scale=0.25))
    assert "no compiler for this card" in capsys.readouterr().err
    assert not aerie.split_kv.available(rows)
    aerie.split_kv.split_kv_attention(rows, key, value, mask, 0.25)
    assert tries == [1]


def _shared_memory_on_sm90(dtype: str, d: int, block_rows: int, block_keys: int) -> int:
    """Bytes of shared memory Triton's build of `partial_attention` for an H100 (sm_90) asks
    for: compiled here, with no GPU (Triton ships the CUDA compiler)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = ["Q", "K", "V", "Mask", "Partial", "Lse", "stride_qb", "stride_qh", "stride_qm", "stride_kb",
             "stride_kh", "stride_kn", "stride_vb", "stride_vh", "stride_vn", "stride_mb", "stride_mq",
             "kv_heads", "rows", "n", "length", "per_slice", "scale"]
    types = [f"*{dtype}"] * 4 + ["*fp32"] * 2 + ["i32"] * 16 + ["fp32"]
    signature = dict(zip(names, types)) | {name: "constexpr" for name in ("D", "BLOCK_M", "BLOCK_N", "PRECISION")}
    constants = {"D": d, "BLOCK_M": block_rows, "BLOCK_N": block_keys, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    source = ASTSource(fn=aerie.split_kv._kernels()[0], signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).metadata.shared


@pytest.mark.parametrize("dtype,element_size", [("fp32", 4), ("bf16", 2)])
def test_the_chosen_tiles_fit_an_h100s_shared_memory(dtype, element_size):
    """Every block of keys `_launch` chooses, for the head dims and query-row blocks it meets,
    fits the shared memory of an H100 as Triton counts it; in float32 the kernels once asked
    for more and fell back to SDPA on the card."""
    pytest.importorskip("triton.backends.nvidia")
    for d in (64, 128):
        for block_rows in (16, 32, 64):
            keys = aerie.split_kv._block_keys(d, block_rows, element_size)
            assert _shared_memory_on_sm90(dtype, d, block_rows, keys) <= aerie.split_kv.SHARED_MEMORY, (d, block_rows)
    if dtype == "fp32":  # what the H100 refused (2026-12-07): the count is the card's
        assert _shared_memory_on_sm90("fp32", 64, 64, 128) == 246_016
