"""The best k of each of a few wide rows, best first, ties to the lower index: in at most two
Triton kernels.

Each draft level takes the best 10 children of each of up to 10 frontier nodes over the head's
vocabulary (8,192 to 49,152 scores a row), then the best 10 of those 100 candidates. PyTorch's
top-k gives each row one thread block that walks the row in radix passes, and its stable sort
for the second choice is a bitonic sort of its own: on a launch-bound target these few calls
took about 30 µs of every draft level's 125 (H100, 2026-12-07), more than the head's matrix
multiplies. Here a row is cut into chunks; one program a chunk takes its best k by k rounds of
max-and-remove in registers (`chunk_top_k`), and one program a row takes the best k of the
chunks' picks (`merge_top_k`). A row of one chunk takes the second kernel alone.

Ties go to the lower index, so the result is also `torch.sort(stable=True)`'s first k: what
the frontier's choice needs (a parent before a child of the same score).

Without Triton (the CPU wheels of PyTorch) `available()` is False and the caller uses
PyTorch's top-k; the tests run the kernels on the CPU in Triton's interpreter.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

# Scores a stage-1 program takes: enough programs to spread a row over the GPU, few enough
# picks (k a chunk) for one merging program.
CHUNK = 1024
# The largest k: each pick is a round of two reductions, unrolled in the kernel.
MAX_K = 32

try:
    import triton
    import triton.language as tl
except ImportError:  # PyTorch's CPU wheels come without it
    triton = None


class _Failure:
    """Why the kernels failed on this machine, if they did: from then on every call takes
    PyTorch's top-k, as `aerie.split_kv` falls back to SDPA."""

    reason: str | None = None


_failure = _Failure()


def available(scores: torch.Tensor, k: int) -> bool:
    """Whether `row_top_k` can run on `scores` here: float32 rows [rows, width] on a GPU (or
    the CPU under Triton's interpreter, TRITON_INTERPRET=1: for tests), 1 <= k <= MAX_K."""
    device_ok = scores.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (triton is not None and _failure.reason is None and device_ok and scores.dim() == 2
            and scores.dtype == torch.float32 and 1 <= k <= min(MAX_K, scores.shape[1]))


def row_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k scores of each row of [rows, width] float32, best first, and their indices
    (int64), equal scores in index order: torch.topk's values, and the first k of a stable
    descending sort's indices."""
    return torch.ops.aerie.row_top_k(scores, k)


def _launch(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, width = scores.shape
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    chunk_top_k, merge_top_k = _kernels()
    values = torch.empty(rows, k, dtype=torch.float32, device=scores.device)
    indices = torch.empty(rows, k, dtype=torch.int64, device=scores.device)
    if width <= CHUNK:
        merge_top_k[(rows,)](scores, scores, values, indices, width, scores.stride(0),
                             K=k, BLOCK=triton.next_power_of_2(width), GIVEN_INDICES=False)
        return values, indices
    chunks = triton.cdiv(width, CHUNK)
    picked = torch.empty(rows, chunks * k, dtype=torch.float32, device=scores.device)
    picked_at = torch.empty(rows, chunks * k, dtype=torch.int64, device=scores.device)
    chunk_top_k[(rows, chunks)](scores, picked, picked_at, width, scores.stride(0), K=k, CHUNK=CHUNK)
    merge_top_k[(rows,)](picked, picked_at, values, indices, chunks * k, chunks * k,
                         K=k, BLOCK=triton.next_power_of_2(chunks * k), GIVEN_INDICES=True)
    return values, indices


@functools.cache
def _kernels():
    """The two kernels, defined at first use (importing this module costs nothing where they
    never run). A pick is the best live score and, among equal ones, the lowest index: two
    reductions. A picked entry is no longer live; so that an entry of -inf is never picked
    twice, liveness is a mask of its own, not a score overwritten with -inf."""

    @triton.jit
    def chunk_top_k(Scores, Picked, PickedAt, width, stride_row, K: tl.constexpr, CHUNK: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        live = offs < width
        x = tl.load(Scores + row * stride_row + offs, mask=live, other=float("-inf"))
        out = row * tl.num_programs(1) * K + chunk * K
        for i in tl.static_range(K):
            best = tl.max(tl.where(live, x, float("-inf")), 0)
            # width marks "none left": the chunk's last may hold fewer than K scores.
            at = tl.min(tl.where(live & (x == best), offs, width), 0)
            tl.store(Picked + out + i, best)
            tl.store(PickedAt + out + i, tl.where(at < width, at, -1).to(tl.int64))
            live = live & (offs != at)

    @triton.jit
    def merge_top_k(Scores, Indices, Values, Out, width, stride_row, K: tl.constexpr, BLOCK: tl.constexpr,
                    GIVEN_INDICES: tl.constexpr):
        # The chunks' picks with their row indices (-1: none), or a whole row by position.
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        live = offs < width
        x = tl.load(Scores + row * stride_row + offs, mask=live, other=float("-inf"))
        if GIVEN_INDICES:
            at = tl.load(Indices + row * stride_row + offs, mask=live, other=-1)
            live = live & (at >= 0)
        else:
            at = offs.to(tl.int64)
        none = 2**62
        for i in tl.static_range(K):
            best = tl.max(tl.where(live, x, float("-inf")), 0)
            pick = tl.min(tl.where(live & (x == best), at, none), 0)
            tl.store(Values + row * K + i, best)
            tl.store(Out + row * K + i, pick)
            live = live & (at != pick)

    return chunk_top_k, merge_top_k


@torch.library.custom_op("aerie::row_top_k", mutates_args=())
def _row_top_k_op(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # An operator of its own, so that a compiled drafting level calls it as it is and a CUDA
    # graph captures its launches.
    if _failure.reason is None:
        try:
            return _launch(scores, k)
        except Exception as e:  # noqa: BLE001 - any Triton failure; PyTorch gives the same values
            if scores.is_cuda and torch.cuda.is_current_stream_capturing():
                raise  # the calls before a capture compile the kernels: a failure there is new
            _failure.reason = f"{type(e).__name__}: {e}"
            print(f"aerie: the top-k kernels failed ({_failure.reason}); top-k runs PyTorch's", file=sys.stderr)
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    return order.values[:, :k].contiguous(), order.indices[:, :k].contiguous()


@_row_top_k_op.register_fake
def _(scores, k):
    rows = scores.shape[0]
    return scores.new_empty(rows, k), scores.new_empty(rows, k, dtype=torch.int64)
