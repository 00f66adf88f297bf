"""The target model: prefill, one forward over a whole draft tree, features, KV compaction.

Wraps any transformers causal LM (Llama, Qwen2, Mistral families) without copying its code:
tree attention is a 4-D boolean mask handed to the model and node positions are explicit
position ids. The KV cache is either transformers' own DynamicCache, or (with `StaticKV`) a
preallocated `SlotCache` whose forwards run as CUDA graphs; both are compacted in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from transformers import DynamicCache, PreTrainedModel

from aerie.fused import Compiled, Fusion, fused, fusion_for, install_grouped_attention
from aerie.kvcache import SLOT_ALIGNMENT, Attend, CachePool, SlotCache, StaticLayer, additive_mask, static_forward
from aerie.tree import ancestor_mask, node_depths

if TYPE_CHECKING:
    from aerie.batch.cache import BatchKVCache
    from aerie.batch.model import LocalBatchModel

FeatureKind = Literal["eagle1", "eagle3"]


def eagle3_default_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, mid, high layers as the official EAGLE-3 checkpoints use them: the residual stream
    entering decoder layers 2, L//2 and L-3 (`hidden_states[i]` in transformers' output)."""
    return (2, num_layers // 2, num_layers - 3)


@dataclass(frozen=True)
class FeatureSpec:
    """Which hidden states the draft head reads.

    eagle1: the last hidden state after the final norm (dim h).
    eagle3: the concatenation, low to high, of `hidden_states[i]` for i in `layers` (dim 3h).
    """

    kind: FeatureKind
    layers: tuple[int, ...] = ()

    def dim(self, hidden_size: int) -> int:
        return hidden_size * (len(self.layers) if self.kind == "eagle3" else 1)


@dataclass(frozen=True)
class StaticKV:
    """Run on preallocated KV caches, with every forward of up to `largest_graph` tokens
    captured as a CUDA graph (on CUDA, when `cuda_graphs`); longer ones (prefill) run eagerly."""

    cuda_graphs: bool = True
    largest_graph: int = 128
    initial_capacity: int = 1024
    pooled: int = 4  # released caches kept, with their graphs, for the next sessions
    fused_norms: bool = True  # RMSNorm as one kernel on CUDA (aerie.fused)
    compiled_rotary: bool = True  # the rotary embedding compiled into one or two kernels on CUDA
    # The decoder layers compiled (`layer_aligned`, aerie.fused.Compiled): on CUDA only ("cuda"),
    # also on the CPU ("always": the tested path of the compiled one), or not at all ("never").
    compiled_forward: Literal["cuda", "always", "never"] = "cuda"
    # Grouped-query attention reads each KV head once (aerie.fused.grouped_query_attention);
    # off, transformers' SDPA path repeats the cache for every query head under a mask.
    grouped_attention: bool = True
    # ... and, on a GPU with Triton, a few rows' attention spreads the cache's keys over the
    # whole GPU (aerie.split_kv) instead of SDPA's one program per block of rows.
    split_kv_attention: bool = True
    # The q/k/v and gate/up projections each one matrix multiply (aerie.projections).
    stacked_projections: bool = True

    @staticmethod
    def default_for(device: str | torch.device, compiled_forward: str = "cuda") -> StaticKV | None:
        """Static caches and CUDA graphs on a GPU, where launches dominate; dynamic caches on
        the CPU, where there is no launch overhead to save and a padded cache only costs."""
        return StaticKV(compiled_forward=compiled_forward) if torch.device(device).type == "cuda" else None

    def attention_options(self) -> dict[str, bool]:
        """The keywords a static forward passes to every attention call (aerie.fused)."""
        return {"fold_query_groups": self.grouped_attention,
                "split_kv": self.grouped_attention and self.split_kv_attention}

    def fusion(self, model: torch.nn.Module, device: torch.device) -> Fusion:
        return fusion_for(model, device, self.fused_norms, self.compiled_rotary, self.stacked_projections)

    def compile(self, forward: Callable, device: torch.device) -> Compiled | None:
        """`forward` compiled where `compiled_forward` asks for it on `device`, else None."""
        wanted = self.compiled_forward == "always" or (self.compiled_forward == "cuda" and device.type == "cuda")
        return Compiled(forward, getattr(forward, "__qualname__", type(forward).__name__)) if wanted else None

    def pool(self, num_layers: int, device: torch.device) -> CachePool:
        return CachePool(lambda: SlotCache(num_layers, self.initial_capacity, device, self.cuda_graphs), self.pooled)


@dataclass
class TargetOutput:
    logits: torch.Tensor  # [n, V] float32
    features: torch.Tensor  # [n, F]


class Target:
    """A causal LM with the operations speculative decoding needs. Stateless: the caller
    owns each sequence's cache, so one Target serves many sessions."""

    def __init__(self, model: PreTrainedModel, features: FeatureSpec, static: StaticKV | None = None):
        self.model = model
        self.config = model.config
        self.features = features
        self.static = static
        self._caches = None if static is None else static.pool(self.config.num_hidden_layers, self.device)
        # The kernels the static path fuses (aerie.fused): it serves plain and speculative
        # decoding alike, with the decoder layers compiled where it can be (the batched path
        # fuses the norms and the rotary embedding only). One layer is compiled, and every
        # layer runs it (`compiled_layers`): a trace of one layer, not of the whole forward,
        # whose compile time grew with the depth of the model (minutes for SmolLM2's 30).
        self.fused = Fusion() if static is None else static.fusion(model, self.device)
        self.compiled = None if static is None else static.compile(layer_aligned, self.device)
        self._layers = decoder_layers(model) if self.compiled is not None else []
        install_grouped_attention()  # the static forwards' attention reads each KV head once
        n_layers = self.config.num_hidden_layers
        if features.kind == "eagle3" and not all(0 <= i <= n_layers for i in features.layers):
            raise ValueError(f"EAGLE-3 feature layers {features.layers} out of range for {n_layers} layers")

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 1 << 30))

    def new_cache(self) -> DynamicCache | SlotCache:
        return DynamicCache(config=self.config) if self._caches is None else self._caches.take()

    def batch_model(self, cache: BatchKVCache, largest_graph: int = 128,
                    prefill_graph_tokens: int = 512) -> LocalBatchModel:
        """The forwards of a batch of sessions over `cache` (what `BatchVerifier` runs)."""
        from aerie.batch.model import LocalBatchModel  # aerie.batch imports this module

        return LocalBatchModel(self, cache, largest_graph, prefill_graph_tokens=prefill_graph_tokens)

    @torch.inference_mode()
    def precompile(self) -> None:
        """Compile the static forward's shape families (several rows, one row) now, on a
        scratch cache, rather than inside the first requests. Nothing to do uncompiled. The
        scratch cache is dropped, not pooled: a caller that precompiles on a throwaway target
        (the verify service) would otherwise keep its storage and graphs for good."""
        if self.compiled is None:
            return
        cache = self._caches.make()  # a new cache, kept out of the pool
        ids = torch.zeros(2, dtype=torch.long)
        for rows in (2, 2, 1):  # a fresh cache's first forward runs uncompiled (it allocates)
            self.forward(cache, ids[:rows])

    def release_cache(self, cache: DynamicCache | SlotCache) -> None:
        """Hand a finished sequence's cache back, so that the next one reuses its storage
        and its captured graphs."""
        if self._caches is not None and isinstance(cache, SlotCache):
            self._caches.give(cache)

    @torch.inference_mode()
    def forward(
        self,
        cache: DynamicCache,
        input_ids: torch.Tensor,
        tree_parents: torch.Tensor | None = None,
    ) -> TargetOutput:
        """Run `input_ids` ([n]) on top of `cache`, appending their keys and values.

        Without `tree_parents` the tokens form a causal chain (prefill, plain decoding). With
        it they form a tree: each node sees the cache and its own ancestors, at position
        cache length + its depth.
        """
        past = cache.get_seq_length()
        n = input_ids.shape[0]
        if tree_parents is None:
            positions = torch.arange(past, past + n)
            attend = Attend(past)
        else:
            positions = past + node_depths(tree_parents.cpu())
            attend = Attend(past, ancestor_mask(tree_parents.cpu()))
        if isinstance(cache, SlotCache):
            rows = {"ids": input_ids.cpu()[None], "pos": positions[None]}
            logits, feats = static_forward(
                cache, "target", rows, attend, lambda b: self.run_static(cache, b["ids"], b["pos"], b["mask"]),
                self.static.largest_graph,
            )
            return TargetOutput(logits=logits, features=feats)
        device = self.device
        # Prefill needs no mask: causal with nothing before it is SDPA's own is_causal.
        mask = None if past == 0 and tree_parents is None else attend.dense(n, past).to(device)
        logits, feats = self._run(cache, input_ids.to(device)[None], positions.to(device)[None], mask)
        return TargetOutput(logits=logits, features=feats)

    def run_static(self, cache: SlotCache, input_ids: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward on a static cache whose write slots are set, under a boolean mask over
        its whole width ([1, 1, n, capacity]): logits [n, V] (float32) and features [n, F].
        What a captured graph runs (`static_forward`, `aerie.device_round`)."""
        return self._run(cache, input_ids, positions, mask)

    def _run(self, cache, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None):
        static = isinstance(cache, SlotCache)
        if static:
            mask = additive_mask(mask, self.model.dtype)
        # A new cache's first forward allocates its storage: run uncompiled, it costs the
        # compiled layers no graph of their own.
        compiled = static and self.compiled is not None and cache.storage is not None
        with fused(self.fused if static else Fusion()), \
                compiled_layers(self._layers, self.compiled) if compiled else nullcontext():
            last, feats = forward_features(self.model, self.features, input_ids=input_ids, position_ids=positions,
                                           attention_mask=mask, past_key_values=cache, use_cache=True,
                                           **self.static.attention_options() if static else {})
        return self.model.get_output_embeddings()(last)[0].float(), feats[0]

    @staticmethod
    def compact(cache: DynamicCache | SlotCache, committed: int, keep: list[int]) -> None:
        """Drop the cache entries of rejected tree nodes: keep positions [0, committed) and
        the tree nodes `keep` (indices relative to `committed`, in order)."""
        if isinstance(cache, SlotCache):
            cache.compact(committed, keep)
            return
        index = torch.arange(committed + len(keep))
        index[committed:] = torch.tensor(keep, dtype=torch.long) + committed
        reindex_cache(cache, index)


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The repeated decoder layers of a transformers causal LM (`model.model.layers` in the
    Llama, Qwen2 and Mistral families)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers to compile")
    return list(layers)


def forward_features(model: PreTrainedModel, spec: FeatureSpec, **args) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of `model`'s base (`args` as it takes them): its last hidden state, after
    the final norm (what the output head reads), and the features `spec` names.

    The inputs of the layers `spec` reads are recorded by hooks of our own, not through
    transformers' `output_hidden_states`, whose hooks on every layer and attention module read
    a ContextVar: the compiler cannot trace that inside a compiled decoder layer. Feature
    layer i is the input of decoder layer i, or for i = the number of layers, the last hidden
    state (as in transformers' `hidden_states`)."""
    layers = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    recording = set(spec.layers) & set(range(len(layers))) if spec.kind == "eagle3" else set()
    hooks = [layers[i].register_forward_pre_hook(functools.partial(_record_input, seen, i), with_kwargs=True)
             for i in sorted(recording)]
    try:
        last = model.get_decoder()(**args).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    if spec.kind != "eagle3":
        return last, last
    return last, torch.cat([seen.get(i, last) for i in spec.layers], dim=-1)


def _record_input(seen: dict[int, torch.Tensor], index: int, module, args, kwargs) -> None:
    seen[index] = args[0] if args else kwargs["hidden_states"]


def layer_aligned(layer: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                  past_key_values: StaticLayer, **kwargs) -> torch.Tensor:
    """One decoder layer's forward as the static path compiles it.

    Its cache is the layer's own slice of the static cache (a `StaticLayer` takes the
    attention's `update(keys, values, layer_idx)` and ignores the index), so that nothing in
    the trace tells the layers apart: the parameters and the cache slice are inputs, and every
    layer of the model replays the one compiled graph. The mask is declared as wide as a
    multiple of `SLOT_ALIGNMENT` (the static cache's capacity): with that width a symbol, the
    compiler cannot tell, and copies the mask for every head into rows it can prove aligned,
    as SDPA's fused kernels require. Module-level: every Target of one model class shares it."""
    torch._check(attention_mask.shape[-1] % SLOT_ALIGNMENT == 0)
    return type(layer).forward(layer, hidden_states, attention_mask=attention_mask,
                               past_key_values=past_key_values, **kwargs)


@contextmanager
def compiled_layers(layers: list[torch.nn.Module], compiled: Callable) -> Iterator[None]:
    """Within the block, each of `layers` runs `compiled` (`layer_aligned`) over its slice of
    the static cache it is called with; the rest of the forward (embedding, rotary tables,
    final norm, output head) stays eager: a handful of kernels, against a whole-forward trace
    whose compile time grows with the depth of the model. The layers are the model's own, so
    forwards of one model are serialised by the caller (the verify service's compute lock)."""
    for index, layer in enumerate(layers):
        layer.forward = functools.partial(_run_layer, compiled, layer, index)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _run_layer(compiled: Callable, layer: torch.nn.Module, index: int, hidden_states: torch.Tensor,
               past_key_values: SlotCache, **kwargs) -> torch.Tensor:
    return compiled(layer, hidden_states, past_key_values=past_key_values.layers[index], **kwargs)


def reindex_cache(cache: DynamicCache, index: torch.Tensor) -> None:
    """Keep only the cache entries at `index` (along the sequence), in that order."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        idx = index.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)


def truncate_cache(cache: DynamicCache | SlotCache, length: int) -> None:
    """Drop every entry from `length` on (the same on every transformers release)."""
    if isinstance(cache, SlotCache):
        cache.truncate(length)
        return
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]
