"""Tensors on the wire: raw little-endian bytes plus dtype and shape, chunked by rows under
the gRPC message limit. Decoding checks everything a malformed message could get wrong."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from aerie.errors import InputError
from aerie_rpc.v1 import common_pb2

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}

# Features and token lists are chunked to stay well under gRPC's 4 MiB default.
CHUNK_BYTES = 1 << 20


class WireError(InputError):
    """A message whose tensors or fields are malformed (maps to INVALID_ARGUMENT)."""


def encode(t: torch.Tensor) -> common_pb2.Tensor:
    if t.dtype not in NAMES:
        raise ValueError(f"cannot send tensors of dtype {t.dtype}")
    flat = t.detach().contiguous().reshape(-1).cpu()
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return common_pb2.Tensor(data=data, dtype=NAMES[t.dtype], shape=list(t.shape))


def decode(
    msg: common_pb2.Tensor,
    name: str,
    dtypes: Sequence[str] | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Decode and check a tensor. `shape` may hold None for a free dimension."""
    if msg.dtype not in DTYPES:
        raise WireError(f"{name}: unknown dtype {msg.dtype!r} (expected one of {', '.join(dtypes or DTYPES)})")
    if dtypes is not None and msg.dtype not in dtypes:
        raise WireError(f"{name}: dtype {msg.dtype} is not allowed here (expected {' or '.join(dtypes)})")
    dims = list(msg.shape)
    if any(d < 0 for d in dims):
        raise WireError(f"{name}: negative dimension in shape {dims}")
    if shape is not None:
        if len(dims) != len(shape) or any(want is not None and want != got for want, got in zip(shape, dims)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise WireError(f"{name}: shape {dims} does not match {want}")
    dtype = DTYPES[msg.dtype]
    count = math.prod(dims)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != count * itemsize:
        raise WireError(
            f"{name}: {len(msg.data)} bytes do not hold shape {dims} of {msg.dtype} "
            f"({count * itemsize} bytes expected)"
        )
    if count == 0:
        return torch.empty(dims, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(dims)


def row_chunks(t: torch.Tensor, max_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
    """Split a [n, ...] tensor into (row offset, rows) pieces of at most max_bytes each."""
    row_bytes = max(1, t[0].numel() * t.element_size()) if t.shape[0] else 1
    rows = max(1, max_bytes // row_bytes)
    for start in range(0, t.shape[0], rows):
        yield start, t[start : start + rows]


def id_chunks(ids: Sequence[int], max_items: int = 65536) -> Iterator[list[int]]:
    """Token ids in pieces: a varint int64 takes at most 10 bytes, so 64 Ki ids stay < 1 MiB."""
    for start in range(0, len(ids), max_items):
        yield list(ids[start : start + max_items])


def check_ids(ids: Sequence[int], name: str, vocab_size: int) -> list[int]:
    out = [int(i) for i in ids]
    bad = [i for i in out if i < 0 or i >= vocab_size]
    if bad:
        raise WireError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return out
