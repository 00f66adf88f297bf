"""Split-KV attention: a few query rows over a whole static cache, with the keys spread across
the GPU (flash-decoding).

A decode or tree-verify forward asks attention for a handful of rows per KV head (one token
of the 8B shape: 4 query heads over each of 8 KV heads) over a cache of a thousand slots or
more. A flash kernel gives each block of 64 query rows one program that walks every key in
turn, so such a call runs 8 programs on a GPU of 132 multiprocessors: 25 µs a layer on an
H100, 0.8 ms of the 8B shape's 7 ms token. Here every program takes one slice of the keys
(`partial_attention`) and a second kernel merges the slices by their log-sum-exp
(`merge_attention_slices`): enough programs to fill the GPU, at two launches instead of one.

The mask is the static path's additive one over the whole cache ([b or 1, 1, n, capacity]);
the query rows are those of `aerie.fused.grouped_query_attention`, the query heads of a group
stacked (row r is query r % n), so one mask row serves a whole group.

The kernels are Triton's. Without Triton (the CPU wheels of PyTorch) `available()` is False and
the caller uses SDPA; the tests run the kernels on the CPU in Triton's interpreter.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn.functional as F

# Keys per slice, at least: below that a program's fixed cost outweighs the keys it reads, and
# more slices mean more partial results to merge (one program per multiprocessor is as fast
# as two with half the keys each; H100, scripts/gpu_kernel_check.py).
MIN_SLICE_KEYS = 128
# Programs wanted per multiprocessor, where the keys are many enough to give them slices.
PROGRAMS_PER_SM = 1
# Query rows of one program (fewer when there are fewer rows: a dot product needs 16).
MAX_BLOCK_ROWS = 64
# Rows of one merging program: the merge has no dot product, and a tree's 200 rows over three
# KV heads would otherwise be merged by 9 programs (15 µs a call on an H100).
MERGE_ROWS = 4
# ... fewer where many slices would make one load larger than this (registers, not memory).
MERGE_ELEMENTS = 4096
# Above this many rows per KV head (a prefill) the work is the matrix multiplies, which a
# flash kernel's one walk over the keys does with fewer reads: SDPA takes it.
MAX_ROWS = 512

try:
    import triton
    import triton.language as tl
except ImportError:  # PyTorch's CPU wheels come without it
    triton = None


class _Failure:
    """Why the kernels failed on this machine (a Triton that cannot compile them), if they did:
    from then on every call runs SDPA, slower and never wrong, as `aerie.fused.Compiled` does."""

    reason: str | None = None


_failure = _Failure()


def available(query: torch.Tensor) -> bool:
    """Whether `split_kv_attention` can run on `query`'s device here: a GPU, or the CPU under
    Triton's interpreter (TRITON_INTERPRET=1, slow: for tests); and its head dim, a power of
    two from 16 to 128 (a program's key and value tiles of a wider head would not fit in
    shared memory)."""
    d = query.shape[-1]
    device_ok = query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (triton is not None and _failure.reason is None and device_ok and 16 <= d <= 128
            and d & (d - 1) == 0)


def split_kv_attention(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """softmax(rows · keyᵀ · scale + mask) · value, for rows [b, kv_heads, g·n, d] (row r asks as
    query r % n), key and value [b, kv_heads, length, d], an additive mask [b or 1, 1, n, length]
    that leaves every row at least one key. Returns [b, kv_heads, g·n, d] in rows' dtype."""
    return torch.ops.aerie.split_kv_attention(rows, key, value, mask, scale)


def _launch(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    b, kv_heads, m, d = rows.shape
    n, length = mask.shape[-2], mask.shape[-1]
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    key, value, mask = (t if t.stride(-1) == 1 else t.contiguous() for t in (key, value, mask))
    block_rows = min(MAX_BLOCK_ROWS, max(16, triton.next_power_of_2(m)))
    row_blocks = triton.cdiv(m, block_rows)
    block_keys = _block_keys(d, block_rows, rows.element_size())
    wanted = max(1, triton.cdiv(PROGRAMS_PER_SM * _multiprocessors(rows.device), b * kv_heads * row_blocks))
    slices = min(triton.cdiv(length, MIN_SLICE_KEYS), wanted)
    per_slice = triton.cdiv(triton.cdiv(length, slices), block_keys) * block_keys
    slices = triton.cdiv(length, per_slice)
    partial = torch.empty(b, kv_heads, slices, m, d, dtype=torch.float32, device=rows.device)
    lse = torch.empty(b, kv_heads, slices, m, dtype=torch.float32, device=rows.device)
    mask_batch_stride = 0 if mask.shape[0] == 1 else mask.stride(0)
    _kernels()[0][(b * kv_heads, row_blocks, slices)](
        rows, key, value, mask, partial, lse,
        rows.stride(0), rows.stride(1), rows.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        mask_batch_stride, mask.stride(-2),
        kv_heads, m, n, length, per_slice, scale,
        D=d, BLOCK_M=block_rows, BLOCK_N=block_keys, PRECISION="ieee" if rows.dtype == torch.float32 else "tf32",
    )
    out = torch.empty(b, kv_heads, m, d, dtype=rows.dtype, device=rows.device)
    loaded = triton.next_power_of_2(slices)
    merge_rows = max(1, min(MERGE_ROWS, MERGE_ELEMENTS // (loaded * d)))
    _kernels()[1][(b * kv_heads, triton.cdiv(m, merge_rows))](
        partial, lse, out, slices, m, D=d, BLOCK_M=merge_rows, SLICES=loaded,
    )
    return out


# Shared memory a block may take on an H100 (227 KB); the H200 has as much.
SHARED_MEMORY = 232_448


def _block_keys(d: int, block_rows: int, element_size: int) -> int:
    """Keys a program takes a step: 128 where the tiles fit in shared memory with Triton's
    pipelining, else 64. Half precision keeps the choice the GPU runs were timed with (64
    keys for 128 dims over more than 16 rows, where an earlier build of the kernel asked for
    240 KB; Triton 3.9's sm_90 build of this one asks for 49,152 bytes at most). In float32
    (full-precision products) the sm_90 build asks for far more (Triton 3.6 on the H100 and
    3.9 agree): 246,016 bytes for 64 dims over 64 rows with 128 keys, 131,072 with 64;
    294,912 for 128 dims over 16 rows with 128 keys, 151,616 with 64."""
    if element_size >= 4:
        return 128 if d <= 32 or (d <= 64 and block_rows <= 32) else 64
    return 128 if d <= 64 or block_rows <= 16 else 64


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # Triton's interpreter on the CPU: a few slices, so that the merge is tested
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _kernels():
    """The two kernels, defined at first use (importing this module costs nothing where they
    never run). PRECISION is "ieee" for float32 inputs: full float32 products, not TF32,
    which a float32 model's losslessness check would see."""

    @triton.jit
    def partial_attention(Q, K, V, Mask, Partial, Lse,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_mb, stride_mq,
                          kv_heads, rows, n, length, per_slice, scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          PRECISION: tl.constexpr):
        bh, row_block, piece = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // kv_heads, bh % kv_heads
        offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < rows
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        mask_rows = Mask + b * stride_mb + (offs_m % n)[:, None] * stride_mq
        keys = K + b * stride_kb + h * stride_kh + offs_d[None, :]
        values = V + b * stride_vb + h * stride_vh + offs_d[None, :]
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        start = piece * per_slice
        end = tl.minimum(start + per_slice, length)
        for first in range(start, end, BLOCK_N):
            offs_n = first + tl.arange(0, BLOCK_N)
            key_ok = offs_n < end
            bias = tl.load(mask_rows + offs_n[None, :], mask=row_ok[:, None] & key_ok[None, :],
                           other=float("-inf")).to(tl.float32)
            k = tl.load(keys + offs_n[:, None] * stride_kn, mask=key_ok[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias
            new_best = tl.maximum(best, tl.max(scores, 1))
            # A row that has seen no key yet keeps -inf; exp(-inf - 0) = 0 keeps it empty.
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)
            p = tl.exp(scores - shift[:, None])
            fade = tl.exp(best - shift)
            total = total * fade + tl.sum(p, 1)
            v = tl.load(values + offs_n[:, None] * stride_vn, mask=key_ok[:, None], other=0.0)
            acc = acc * fade[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            best = new_best
        seen = total > 0
        out = acc / tl.where(seen, total, 1.0)[:, None]
        at = (bh * tl.num_programs(2) + piece) * rows + offs_m
        tl.store(Partial + at[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(Lse + at, tl.where(seen, best + tl.log(tl.where(seen, total, 1.0)), float("-inf")), mask=row_ok)

    @triton.jit
    def merge_attention_slices(Partial, Lse, Out, slices, rows, D: tl.constexpr, BLOCK_M: tl.constexpr,
                               SLICES: tl.constexpr):
        # Every slice's result for a few rows in one load ([SLICES, BLOCK_M, D]): a loop over
        # the slices would wait on one load after another.
        bh, row_block = tl.program_id(0), tl.program_id(1)
        offs_s = tl.arange(0, SLICES)
        offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        ok = (offs_s < slices)[:, None] & (offs_m < rows)[None, :]
        at = (bh * slices + offs_s[:, None]) * rows + offs_m[None, :]
        lse = tl.load(Lse + at, mask=ok, other=float("-inf"))
        best = tl.max(lse, 0)
        weight = tl.exp(lse - tl.where(best == float("-inf"), 0.0, best)[None, :])
        part = tl.load(Partial + at[:, :, None] * D + offs_d[None, None, :], mask=ok[:, :, None], other=0.0)
        total = tl.sum(weight, 0)  # 0 only in rows past the last, which are not stored
        out = tl.sum(weight[:, :, None] * part, 0) / tl.where(total > 0, total, 1.0)[:, None]
        at = bh * rows + offs_m
        tl.store(Out + at[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty), mask=(offs_m < rows)[:, None])

    return partial_attention, merge_attention_slices


def sdpa_attention(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                   scale: float | None) -> torch.Tensor:
    """What `split_kv_attention` computes, by SDPA: the mask repeated for each group of n rows
    (its n rows, not the cache), boolean or additive."""
    groups = rows.shape[2] // mask.shape[-2]
    per_row = mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, rows.shape[2], mask.shape[-1])
    return F.scaled_dot_product_attention(rows, key, value, attn_mask=per_row, scale=scale)


@torch.library.custom_op("aerie::split_kv_attention", mutates_args=())
def _split_kv_attention_op(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
    # An operator of its own, so that a compiled layer calls it as it is (the slice count is
    # worked out from concrete sizes at each call) and a CUDA graph captures its launches.
    if _failure.reason is None:
        try:
            return _launch(rows, key, value, mask, scale)
        except Exception as e:  # noqa: BLE001 - any Triton failure; SDPA gives the same result
            if rows.is_cuda and torch.cuda.is_current_stream_capturing():
                raise  # the calls before a capture compile the kernels: a failure there is new
            _failure.reason = f"{type(e).__name__}: {e}"
            print(f"aerie: the split-KV attention kernels failed ({_failure.reason}); attention runs SDPA",
                  file=sys.stderr)
    return sdpa_attention(rows, key, value, mask, scale).contiguous()  # the layout its fake promises


@_split_kv_attention_op.register_fake
def _(rows, key, value, mask, scale):
    return torch.empty_like(rows, memory_format=torch.contiguous_format)
