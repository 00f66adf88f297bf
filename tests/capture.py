"""CUDA graph capture, simulated on the CPU, for the code around the graphs.

A captured function must not read the device from the host (`.tolist()`, `.item()`, `if
tensor:`, a boolean mask index, `nonzero`) nor bring host data in (`torch.tensor(list)`):
under real capture the first raises and the second is baked into the graph as the values of
capture time. And what a replay returns are the tensors of capture time, overwritten in place,
so a caller that keeps an output across replays reads the next round's values.

`SimulatedGraphCache` stands in for `aerie.graphs.GraphCache` on the CPU with both rules:
capture runs the function under modes that raise `HostTrafficInCapture` at any of those
calls, and each replay runs the function again and copies its results into the outputs
captured the first time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from aerie.graphs import GraphCache

# Tensor methods and functions that move values between host and device.
HOST_FUNCTIONS = frozenset(
    {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "tensor", "as_tensor"}
)
# Operators whose output size depends on the data: the host waits for the device to learn it.
DATA_DEPENDENT_OPS = frozenset({"nonzero", "_local_scalar_dense", "masked_select", "unique", "_unique2",
                                "unique_consecutive", "unique_dim"})


class HostTrafficInCapture(AssertionError):
    pass


class _NoHostFunctions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_FUNCTIONS:
            raise HostTrafficInCapture(f"{name} inside a captured function")
        return func(*args, **(kwargs or {}))


class _NoDataDependentOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in DATA_DEPENDENT_OPS or (name == "repeat_interleave" and isinstance(args[0], torch.Tensor)
                                          and len(args) == 1):
            raise HostTrafficInCapture(f"aten.{name} inside a captured function")
        if name in ("index", "index_put", "index_put_"):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise HostTrafficInCapture(f"aten.{name} with a boolean mask inside a captured function")
        return func(*args, **(kwargs or {}))


class _Replay:
    def __init__(self, fn: Callable[[], tuple[torch.Tensor, ...]], outputs: tuple[torch.Tensor, ...]):
        self.fn, self.outputs = fn, outputs

    def replay(self) -> None:
        for out, new in zip(self.outputs, self.fn()):
            out.copy_(new)


class SimulatedGraphCache(GraphCache):
    total_captures = 0  # over every instance: caches are pooled and made deep inside the engines

    def __init__(self, enabled: bool = True):
        super().__init__(enabled)
        self.enabled = True  # GraphCache turns itself off without CUDA

    def _capture(self, fn: Callable[[], tuple[torch.Tensor, ...]]):
        for _ in range(2):  # the warm-ups, as GraphCache runs them: lazy set-up happens here
            fn()
        with _NoHostFunctions(), _NoDataDependentOps():
            outputs = fn()
        self.captures += 1
        SimulatedGraphCache.total_captures += 1
        return _Replay(fn, outputs), outputs


def simulate_graphs(monkeypatch) -> None:
    """Every static cache made from now on (in this test) captures with `SimulatedGraphCache`."""
    monkeypatch.setattr("aerie.kvcache.GraphCache", SimulatedGraphCache)


def captured(fn: Callable[[], object]) -> object:
    """Run `fn` under the capture checks (for a function tested on its own)."""
    with _NoHostFunctions(), _NoDataDependentOps():
        return fn()
