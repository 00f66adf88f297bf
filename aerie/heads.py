"""EAGLE-1 and EAGLE-3 draft heads, in the official checkpoint layouts.

EAGLE-1 (SafeAILab `cnets1.py`): `fc` [h, 2h] over cat(embedding(token_{t+1}), feature_t),
then one Llama decoder layer without `input_layernorm`; it borrows the target's embedding
and LM head, and its output is the predicted next feature.

EAGLE-3 (SafeAILab `cnets.py`, SpecForge, vLLM `llama_eagle3.py`): `fc` [h, 3h] fuses the
target's low, mid and high features; `midlayer` attends over cat(input_layernorm(embedding),
hidden_norm(feature)) (2h wide) with the feature as residual; its own `norm` and `lm_head`
score a reduced draft vocabulary, mapped to target ids by `d2t` (target = draft + d2t[draft]).
Later draft steps feed the head's own h-wide output back in place of the fused feature.

The building blocks are transformers' own Llama modules; only the wiring is ours.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from aerie.errors import HeadError
from aerie.fused import Fusion, fused
from aerie.kvcache import Attend, SlotCache, additive_mask, static_forward
from aerie.target import FeatureSpec, StaticKV, Target, eagle3_default_layers
from aerie.tree import TreeConfig

HeadKind = Literal["eagle1", "eagle3"]

# Config fields copied from the target into a new head's config.
_SHARED_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "vocab_size", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id",
)


class DraftHead(nn.Module):
    """Common interface. `forward` maps (features, next tokens) to the head's hidden states;
    `draft_logprobs` scores the draft vocabulary; `to_target_ids` maps draft ids back."""

    kind: HeadKind

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        config._attn_implementation = "sdpa"
        self.rotary_emb = LlamaRotaryEmbedding(config)
        # The target's embedding (and, for EAGLE-1, LM head) are borrowed, not owned: kept
        # outside the module tree so they are neither trained nor saved.
        self._borrowed: dict[str, nn.Module] = {}
        self.static: StaticKV | None = None
        self._caches = None
        self.fused = Fusion()  # the kernels the static path fuses (aerie.fused)
        self.compiled = None  # `step` compiled whole, where the static path compiles it
        self._compiled_parts: dict[Callable, Callable] = {}

    def attach(self, target: Target) -> DraftHead:
        """Borrow the target's embedding and LM head, and run the way it runs (static
        caches and CUDA graphs, or not)."""
        self._borrowed["embed"] = target.model.get_input_embeddings()
        self._borrowed["lm_head"] = target.model.get_output_embeddings()
        self.static = target.static
        self._caches = None
        self.compiled = None
        self._compiled_parts = {}
        return self

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def target_hidden_size(self) -> int:
        """The hidden size of the target whose features the head reads (its own by default)."""
        return int(getattr(self.config, "target_hidden_size", None) or self.hidden_size)

    @property
    def gpu_tree(self) -> TreeConfig | None:
        """The dynamic tree this head drafts best on a GPU, as measured on its target and named
        by its config (`gpu_tree`: depth, top_k, total_tokens), if it names one."""
        shape = getattr(self.config, "gpu_tree", None)
        return None if shape is None else TreeConfig("dynamic", **shape)

    @property
    def feature_spec(self) -> FeatureSpec:
        raise NotImplementedError

    def new_cache(self) -> DynamicCache | SlotCache:
        if self.static is None:
            return DynamicCache(config=self.config)
        if self._caches is None:  # made on first use: the head may move device after attach
            device = self.fc.weight.device
            self._caches = self.static.pool(1, device)
            self.fused = self.static.fusion(self, device)
            self.compiled = self.static.compile(self.step, device)
        return self._caches.take()

    def compiled_part(self, fn: Callable) -> Callable:
        """`fn`, a piece of device work around the head's static step (a drafting level's
        bookkeeping, a device round's), compiled where the static path compiles, else `fn`
        itself: one `Compiled` per piece, kept with the head, as its compiled step is."""
        part = self._compiled_parts.get(fn)
        if part is None:
            part = self._compiled_parts[fn] = self.static.compile(fn, self.fc.weight.device) or fn
        return part

    @property
    def compiled_parts(self) -> dict[Callable, Callable]:
        """Each piece `compiled_part` has been asked for, with what runs for it."""
        return dict(self._compiled_parts)

    def release_cache(self, cache: DynamicCache | SlotCache) -> None:
        if self._caches is not None and isinstance(cache, SlotCache):
            self._caches.give(cache)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._borrowed["embed"](input_ids)

    def draft_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids

    def layer(self, x: torch.Tensor, emb: torch.Tensor, position_ids, attention_mask, cache,
              **attention) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | Attend | None = None,
        cache: DynamicCache | SlotCache | None = None,
    ) -> torch.Tensor:
        """features [b, n, F] (target features, or the head's own h-wide output),
        input_ids [b, n] (the token that follows each feature), position_ids [b, n],
        attention_mask what the new entries see: an `Attend`, a 4-D boolean mask over the
        cache's entries and the new ones (dynamic caches only), or None for causal.
        Returns hidden [b, n, h]."""
        if isinstance(cache, SlotCache):
            if isinstance(attention_mask, torch.Tensor):
                raise TypeError("a static cache takes its mask as an Attend")
            rows = {"x": features, "ids": input_ids, "pos": position_ids}
            with fused(self.fused):
                (hidden,) = static_forward(
                    cache, ("head", features.shape[-1]), rows, attention_mask,
                    lambda b: (self.static_step(b["x"], b["ids"], b["pos"], b["mask"], cache)[0],),
                    self.static.largest_graph,
                )
            return hidden[None]
        if isinstance(attention_mask, Attend):
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = attention_mask.dense(input_ids.shape[1], past)
        if attention_mask is not None:
            attention_mask = attention_mask.to(features.device)
        return self.step(features, input_ids, position_ids, attention_mask, cache)

    def step(self, features, input_ids, position_ids, attention_mask, cache, **attention) -> torch.Tensor:
        """The forward itself, with a ready 4-D mask and the cache's write slots already set:
        what a CUDA graph captures. `attention`: keywords for the attention function (the
        static path's `StaticKV.attention_options`, aerie.fused)."""
        emb = self.embed(input_ids).to(features.dtype)
        return self.layer(features, emb, position_ids, attention_mask, cache, **attention)

    def static_step(self, features, input_ids, position_ids, attention_mask, cache: SlotCache) -> torch.Tensor:
        """`step` on a static cache: compiled where the static path compiles it, once the
        cache has allocated its storage (in its first, uncompiled, forward)."""
        step = self.compiled if self.compiled is not None and cache.storage is not None else self.step
        if not attention_mask.is_floating_point():  # as the target's: what the split-KV kernels take
            attention_mask = additive_mask(attention_mask, features.dtype)
        return step(features, input_ids, position_ids, attention_mask, cache, **self.static.attention_options())


class Eagle1Head(DraftHead):
    kind: HeadKind = "eagle1"

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        h = config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=bool(getattr(config, "bias", True)))
        decoder = LlamaDecoderLayer(config, layer_idx=0)
        decoder.input_layernorm = nn.Identity()  # layer 0 of EAGLE-1 has none
        self.layers = nn.ModuleList([decoder])

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(kind="eagle1")

    def layer(self, x, emb, position_ids, attention_mask, cache, **attention):
        x = self.fc(torch.cat([emb, x], dim=-1))
        pos = self.rotary_emb(x, position_ids)
        return self.layers[0](
            x, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=cache is not None, position_embeddings=pos, **attention,
        )

    def draft_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self._borrowed["lm_head"](hidden).float(), dim=-1)


class _Eagle3Layer(nn.Module):
    """`midlayer`: a Llama decoder layer whose attention reads [embedding, feature] (2h)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h = config.hidden_size
        eps = config.rms_norm_eps
        self.self_attn = LlamaAttention(config, layer_idx=0)
        head_dim = self.self_attn.head_dim
        self.self_attn.q_proj = nn.Linear(2 * h, config.num_attention_heads * head_dim, bias=False)
        self.self_attn.k_proj = nn.Linear(2 * h, config.num_key_value_heads * head_dim, bias=False)
        self.self_attn.v_proj = nn.Linear(2 * h, config.num_key_value_heads * head_dim, bias=False)
        self.mlp = LlamaMLP(config)
        self.hidden_norm = LlamaRMSNorm(h, eps=eps)
        self.input_layernorm = LlamaRMSNorm(h, eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=eps)

    def forward(self, x, emb, position_embeddings, attention_mask, cache, **attention):
        residual = x
        attn_in = torch.cat([self.input_layernorm(emb), self.hidden_norm(x)], dim=-1)
        attn_out, _ = self.self_attn(
            attn_in, position_embeddings=position_embeddings,
            attention_mask=attention_mask, past_key_values=cache, **attention,
        )
        x = residual + attn_out
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Head(DraftHead):
    kind: HeadKind = "eagle3"

    def __init__(self, config: LlamaConfig, feature_layers: tuple[int, ...]):
        super().__init__(config)
        h = config.hidden_size
        target_h = self.target_hidden_size
        self.feature_layers = tuple(feature_layers)
        self.fc = nn.Linear(3 * target_h, h, bias=False)
        self.midlayer = _Eagle3Layer(config)
        self.norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(kind="eagle3", layers=self.feature_layers)

    def layer(self, x, emb, position_ids, attention_mask, cache, **attention):
        if x.shape[-1] != self.hidden_size:  # fused target features; own outputs skip fc
            x = self.fc(x)
        pos = self.rotary_emb(x, position_ids)
        return self.midlayer(x, emb, pos, attention_mask, cache, **attention)

    def draft_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lm_head(self.norm(hidden)).float(), dim=-1)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]


# --- draft vocabulary ------------------------------------------------------------------


def build_draft_vocab(token_counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `draft_vocab_size` most frequent target tokens as (d2t, t2d), in the official
    encoding: draft ids are the chosen target ids in ascending order, d2t[i] = target - i."""
    chosen = torch.topk(token_counts.float(), draft_vocab_size, sorted=False).indices.sort().values
    d2t = chosen - torch.arange(draft_vocab_size)
    t2d = torch.zeros(token_counts.shape[0], dtype=torch.bool)
    t2d[chosen] = True
    return d2t, t2d


# --- creation, loading and saving --------------------------------------------------------


def head_config_from_target(target: Target, kind: HeadKind, draft_vocab_size: int | None = None) -> LlamaConfig:
    src = target.config.to_dict()
    fields = {k: src[k] for k in _SHARED_FIELDS if k in src and src[k] is not None}
    fields["num_hidden_layers"] = 1
    if kind == "eagle3":
        fields["architectures"] = ["LlamaForCausalLMEagle3"]
        fields["draft_vocab_size"] = draft_vocab_size or target.vocab_size
        fields["target_hidden_size"] = target.hidden_size
        fields["eagle_config"] = {
            # Layer-output convention (SpecForge, vLLM configs): hidden_states[i] is layer i-1's output.
            "eagle_aux_hidden_state_layer_ids": [i - 1 for i in eagle3_default_layers(target.config.num_hidden_layers)],
        }
    else:
        fields["architectures"] = ["LlamaForCausalLM"]
        fields["bias"] = False
    fields["tie_word_embeddings"] = False
    return LlamaConfig(**fields)


def new_head(target: Target, kind: HeadKind, draft_vocab_size: int | None = None) -> DraftHead:
    """A randomly initialised head that fits `target`, in the target's dtype and device."""
    config = head_config_from_target(target, kind, draft_vocab_size)
    head = _construct(config, kind, target)
    if kind == "eagle3" and config.draft_vocab_size == target.vocab_size:
        head.t2d.fill_(True)
    return head.to(device=target.device, dtype=target.model.dtype).attach(target)


def _construct(config: LlamaConfig, kind: HeadKind, target: Target) -> DraftHead:
    if kind == "eagle1":
        return Eagle1Head(config)
    ids = (getattr(config, "eagle_config", None) or {}).get("eagle_aux_hidden_state_layer_ids")
    layers = tuple(i + 1 for i in ids) if ids else eagle3_default_layers(target.config.num_hidden_layers)
    return Eagle3Head(config, layers)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise HeadError(f"head directory '{path}' holds no *.safetensors or pytorch_model.bin")
    state = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def detect_kind(config: dict, state: dict[str, torch.Tensor]) -> HeadKind:
    archs = " ".join(config.get("architectures") or [])
    if "draft_vocab_size" in config or "Eagle3" in archs or any(k.startswith("midlayer.") for k in state):
        return "eagle3"
    return "eagle1"


def load_head(path: str | Path, target: Target) -> DraftHead:
    """Load an EAGLE-1 or EAGLE-3 head directory (config.json + weights) onto `target`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HeadError(f"head '{path}' is not a directory with a config.json")
    raw = json.loads((path / "config.json").read_text())
    state = _read_state_dict(path)
    kind = detect_kind(raw, state)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    state.pop("embed_tokens.weight", None)  # the target's embedding is used
    _check_fits(raw, state, kind, target)
    _check_tree(raw)
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
    config.num_hidden_layers = 1
    head = _construct(config, kind, target)
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise HeadError(f"head '{path}' does not match the {kind} layout: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if kind == "eagle3" and "t2d" not in state and config.draft_vocab_size == config.vocab_size:
        head.t2d.fill_(True)
    return head.to(device=target.device, dtype=target.model.dtype).eval().attach(target)


def _check_tree(raw: dict) -> None:
    shape = raw.get("gpu_tree")
    if shape is None:
        return
    if (not isinstance(shape, dict) or set(shape) != {"depth", "top_k", "total_tokens"}
            or not all(type(v) is int for v in shape.values())):
        raise HeadError(f"head config's gpu_tree must map depth, top_k and total_tokens to integers, got {shape!r}")
    try:
        TreeConfig("dynamic", **shape)
    except (TypeError, ValueError) as e:
        raise HeadError(f"head config's gpu_tree: {e}") from None


def _check_fits(raw: dict, state: dict[str, torch.Tensor], kind: HeadKind, target: Target) -> None:
    h = target.hidden_size
    fc = state.get("fc.weight")
    if fc is None:
        raise HeadError("head has no fc.weight: not an EAGLE checkpoint")
    width = 3 if kind == "eagle3" else 2
    if fc.shape[1] != width * h:
        raise HeadError(
            f"{kind} head expects target features of width {fc.shape[1] // width}, "
            f"but the target's hidden size is {h}"
        )
    if int(raw.get("vocab_size", -1)) != target.vocab_size:
        raise HeadError(f"head vocabulary is {raw.get('vocab_size')} tokens, but the target's is {target.vocab_size}")


def save_head(head: DraftHead, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write config.json and model.safetensors in the official layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
        for k, v in head.state_dict().items()
        if "rotary_emb" not in k
    }
    save_file(state, str(path / "model.safetensors"))
    config = head.config.to_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.pop("_attn_implementation_autoset", None)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
