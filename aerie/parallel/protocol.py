"""The mirrored calls: what rank 0 tells the other ranks before it runs a call itself.

A call is an op, the id of the KV cache it acts on (a session's, or a batch's), a few 1-D
int64 tensors (token ids, tree parents, kept indices, row numbers, shapes) and the ids of
caches rank 0 has dropped since the previous call.
It travels as two int64 broadcasts: a fixed-size header that gives every length, then one
payload holding the released ids and the tensors back to back. Only integers ever travel:
every rank computes the activations itself from the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import torch
import torch.distributed as dist

MAX_TENSORS = 4
_FIXED = 4  # op, cache id, released count, tensor count
HEADER_LEN = _FIXED + MAX_TENSORS


class Op(IntEnum):
    FORWARD = 1  # tensors: input_ids, and tree_parents for a tree
    COMPACT = 2  # tensors: [committed], keep (node indices relative to committed)
    SHUTDOWN = 3  # leave the worker loop
    # A batch of sessions (aerie.batch.model.BatchModel): one batched KV cache, many rows.
    BATCH_OPEN = 4  # tensors: [rows, capacity, cuda graphs (0/1)]
    BATCH_PREFILL = 5  # tensors: the prompts back to back, their lengths
    BATCH_FORWARD = 6  # tensors: tokens and parents back to back, tokens per row, [batch, width, graphed, argmax]
    BATCH_COMPACT = 7  # tensors: rows, their committed lengths, kept counts, kept indices back to back
    BATCH_REMOVE_ROW = 8  # tensors: [row]


@dataclass(frozen=True)
class Call:
    op: Op
    cache_id: int = -1
    tensors: tuple[torch.Tensor, ...] = ()
    released: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.tensors) > MAX_TENSORS:
            raise ValueError(f"a call carries at most {MAX_TENSORS} tensors, got {len(self.tensors)}")
        for t in self.tensors:
            if t.dim() != 1 or t.dtype != torch.int64:
                raise ValueError(f"call tensors must be 1-D int64, got {t.dtype} of shape {tuple(t.shape)}")


def encode(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [HEADER_LEN], payload) as CPU int64 tensors."""
    lengths = [t.numel() for t in call.tensors] + [0] * (MAX_TENSORS - len(call.tensors))
    header = torch.tensor([int(call.op), call.cache_id, len(call.released), len(call.tensors), *lengths])
    parts = [torch.tensor(call.released, dtype=torch.int64), *(t.cpu() for t in call.tensors)]
    return header, torch.cat(parts)


def payload_len(header: torch.Tensor) -> int:
    n_released, n_tensors = int(header[2]), int(header[3])
    return n_released + int(header[_FIXED : _FIXED + n_tensors].sum())


def decode(header: torch.Tensor, payload: torch.Tensor) -> Call:
    op, cache_id, n_released, n_tensors = (int(v) for v in header[:_FIXED])
    lengths = [int(v) for v in header[_FIXED : _FIXED + n_tensors]]
    released, *tensors = payload.split([n_released, *lengths])
    return Call(Op(op), cache_id, tuple(t.clone() for t in tensors), tuple(released.tolist()))


class Channel(Protocol):
    """One sender (rank 0), every other rank receiving each call in the order it was sent."""

    def send(self, call: Call) -> None: ...

    def receive(self) -> Call: ...


class BroadcastChannel:
    """A `Channel` over a torch.distributed group of CPU tensors (gloo).

    The calls go over gloo even when the model's all-reduces go over NCCL: a rank waiting for
    the next call then blocks on a socket rather than on a GPU stream, and it notices at once
    when rank 0 is gone (a closed connection) instead of waiting for an NCCL timeout.
    """

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def send(self, call: Call) -> None:
        header, payload = encode(call)
        dist.broadcast(header, group=self.group, group_src=0)
        if payload.numel():
            dist.broadcast(payload, group=self.group, group_src=0)

    def receive(self) -> Call:
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        dist.broadcast(header, group=self.group, group_src=0)
        payload = torch.empty(payload_len(header), dtype=torch.int64)
        if payload.numel():
            dist.broadcast(payload, group=self.group, group_src=0)
        return decode(header, payload)
