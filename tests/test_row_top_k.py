"""The top-k kernels (aerie.row_top_k) outside the interpreter: they build for an H100, and
where they cannot run the tree's top-k is PyTorch's. (Their results: tests/interpreted.)"""

import pytest
import torch

import aerie.row_top_k
from aerie.tree import _stable_top, top_k


@pytest.mark.parametrize("given_indices,block", [(True, 128), (False, 16), (True, 512)])
def test_the_kernels_build_for_an_h100(given_indices, block):
    """Compiled here for sm_90, with no GPU (Triton ships the CUDA compiler): the chunk kernel
    and the merging kernel, over chunks' picks (8,192 and 49,152 scores a row) or a row."""
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    chunk_top_k, merge_top_k = aerie.row_top_k._kernels()
    target = GPUTarget("cuda", 90, 32)
    chunk = triton.compile(ASTSource(
        fn=chunk_top_k, signature={"Scores": "*fp32", "Picked": "*fp32", "PickedAt": "*i64", "width": "i32",
                                   "stride_row": "i32", "K": "constexpr", "CHUNK": "constexpr"},
        constexprs={"K": 10, "CHUNK": aerie.row_top_k.CHUNK}), target=target)
    merge = triton.compile(ASTSource(
        fn=merge_top_k, signature={"Scores": "*fp32", "Indices": "*i64" if given_indices else "*fp32",
                                   "Values": "*fp32", "Out": "*i64", "width": "i32", "stride_row": "i32",
                                   "K": "constexpr", "BLOCK": "constexpr", "GIVEN_INDICES": "constexpr"},
        constexprs={"K": 10, "BLOCK": block, "GIVEN_INDICES": given_indices}), target=target)
    for kernel in (chunk, merge):
        assert "ld.global" in kernel.asm["ptx"] and kernel.metadata.shared < 4096


def test_without_the_kernels_top_k_is_pytorchs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aerie.row_top_k, "_launch", lambda *a: pytest.fail("launched on the CPU"))
    torch.manual_seed(0)
    scores = torch.randn(3, 8192)
    assert not aerie.row_top_k.available(scores, 10)
    values, indices = top_k(scores, 10)
    want = torch.topk(scores, 10)
    torch.testing.assert_close(values, want.values, rtol=0, atol=0)
    torch.testing.assert_close(indices, want.indices, rtol=0, atol=0)
    assert _stable_top(torch.tensor([0.0, -1.0, 0.0, -0.5]), 3).tolist() == [0, 2, 3]


def test_kernels_that_fail_give_way_to_a_stable_sort(monkeypatch, capsys):
    tries = []

    def broken(*args):
        tries.append(1)
        raise RuntimeError("no compiler for this card")

    monkeypatch.setattr(aerie.row_top_k, "_launch", broken)
    monkeypatch.setattr(aerie.row_top_k._failure, "reason", None)
    scores = torch.tensor([[0.5, 2.0, 2.0, -1.0, 3.0]])
    values, indices = aerie.row_top_k.row_top_k(scores, 3)
    assert values.tolist() == [[3.0, 2.0, 2.0]] and indices.tolist() == [[4, 1, 2]]
    assert "no compiler for this card" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not aerie.row_top_k.available(scores, 3)
    aerie.row_top_k.row_top_k(scores, 3)
    assert tries == [1]
