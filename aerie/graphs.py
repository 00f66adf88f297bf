"""CUDA graphs over static buffers, one per shape bucket, with an eager fallback.

A small model at batch 1 spends most of a forward launching kernels (SmolLM2-135M: ~30 ms
eager against ~3 ms as one graph on an H100). A forward whose inputs sit in fixed buffers and
whose KV cache is a `SlotCache` can be captured once per padded size and replayed. Off CUDA,
or with graphs turned off, the same function simply runs: that is the tested CPU path.
"""

from __future__ import annotations

import collections
import gc
from collections.abc import Callable, Hashable

import torch

# Graphs per cache before the least recently used is dropped: a handful of buckets per
# forward kind is the steady state (a batched target cache holds up to ten batch buckets of
# rounds and fifteen of prefills; `--tree-budget auto` keeps a round graph for each of the 40-odd
# tree shapes it weighs), so this only bounds shape churn.
MAX_GRAPHS_PER_CACHE = 96


def capture_stream(device: torch.device | None = None) -> torch.cuda.Stream:
    """The one side stream every capture on `device` warms up and records on. PyTorch keeps
    a cuBLAS workspace per stream that is used, for the life of the process: a new stream per
    capture would leak one (tens of MB) at every capture."""
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    stream = _CAPTURE_STREAMS.get(index)
    if stream is None:
        stream = _CAPTURE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def bucket_for(n: int, largest: int) -> int | None:
    """The padded row count a forward of n rows runs at: the next power of two, or None
    (run eagerly at its own size) beyond `largest`."""
    if n > largest:
        return None
    b = 1
    while b < n:
        b *= 2
    return min(b, largest)


class GraphCache:
    """Captured graphs keyed by the caller (a forward kind and its bucket). `run(key, fn)`
    replays the graph of `key`, capturing `fn` first if needed, and returns the outputs
    `fn` produced during capture: static tensors that each replay overwrites."""

    # Captures by every cache of the process: caches are pooled and made deep inside the
    # engines, and a benchmark reports the captures that fell inside its timed runs.
    total_captures = 0
    # The keys of the latest captures (of any cache), to tell which graph a slow run captured.
    recent_keys: collections.deque = collections.deque(maxlen=64)

    def __init__(self, enabled: bool):
        self.enabled = enabled and torch.cuda.is_available()
        # Each graph keeps its own memory pool: a shared pool could place one graph's
        # outputs in another's scratch memory, and replaying that one would clobber them.
        self.graphs: dict = {}
        self.captures = 0  # graphs captured so far (each replaced one is captured again)

    def clear(self) -> None:
        self.graphs.clear()

    def run(self, key: Hashable, fn: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        if not self.enabled:
            return fn()
        entry = self.graphs.pop(key, None)  # re-inserted last: the dict's order is recency
        if entry is None:
            entry = self._capture(fn)
            GraphCache.recent_keys.append(key)
            if len(self.graphs) >= MAX_GRAPHS_PER_CACHE:
                self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = entry
        graph, outputs = entry
        graph.replay()
        return outputs

    def _capture(self, fn: Callable[[], tuple[torch.Tensor, ...]]):
        # Warm-up runs on a side stream (as PyTorch requires before capture) let lazy
        # initialisations (cuBLAS handles, allocator pools) happen outside the graph. The
        # runs rewrite the same KV slots with the same values, so they change nothing.
        stream = capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # No garbage collection inside the capture (PyTorch no longer collects before one):
        # a collected cycle holding CUDA objects (a dropped cache's graphs and their memory
        # pool, pinned buffers) would free them with calls that invalidate the capture.
        collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            with torch.cuda.graph(graph, stream=stream):
                outputs = fn()
        finally:
            if collecting:
                gc.enable()
        self.captures += 1
        GraphCache.total_captures += 1
        return graph, outputs
