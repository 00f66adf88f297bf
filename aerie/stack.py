"""Putting a target, its tokenizer and a draft head together, as the CLI and services need."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from aerie.errors import InputError
from aerie.heads import DraftHead, load_head
from aerie.models import eos_token_ids, is_demo_model, load_causal_lm, parse_dtype, resolve_model
from aerie.target import FeatureSpec, StaticKV, Target, eagle3_default_layers
from aerie.tree import TreeConfig


def shipped_heads() -> Path:
    """The shipped draft heads: `heads/` beside the package in a checkout or an editable
    install, else where a wheel installs them (<prefix>/share/aerie/heads)."""
    beside = Path(__file__).resolve().parent.parent / "heads"
    installed = Path(sys.prefix) / "share" / "aerie" / "heads"
    return installed if not beside.is_dir() and installed.is_dir() else beside


SHIPPED_HEADS = shipped_heads()
# The shipped head with the higher measured tau on the demo target (heads/README.md).
DEMO_HEAD = SHIPPED_HEADS / "smollm2-135m-eagle3"

# CPU: one target forward grows slowly up to ~16 tree nodes (DESIGN measurements), so a
# small tree; GPU: a 60-node tree costs about as much as one token (official EAGLE-2 defaults).
# A head measured on its target may name a better GPU tree (DraftHead.gpu_tree).
CPU_TREE = TreeConfig(kind="dynamic", depth=6, top_k=8, total_tokens=16)
GPU_TREE = TreeConfig(kind="dynamic", depth=8, top_k=10, total_tokens=60)
KV_CACHES = ("auto", "static", "dynamic")
COMPILED_FORWARDS = ("cuda", "always", "never")


@dataclass
class Stack:
    target: Target
    tokenizer: object
    head: DraftHead | None
    tree: TreeConfig
    model_dir: Path

    def encode_prompt(self, text: str, chat: bool = True) -> list[int]:
        if chat and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(text).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stop_token_ids(self) -> frozenset[int]:
        return eos_token_ids(self.tokenizer, getattr(self.target.model, "generation_config", None))


def default_tree(device: str, head: DraftHead | None = None) -> TreeConfig:
    """The tree drafted where none is named: on a GPU the head's own (`DraftHead.gpu_tree`)
    or else GPU_TREE; on a CPU, CPU_TREE."""
    if device != "cuda":
        return CPU_TREE
    return (head.gpu_tree if head is not None else None) or GPU_TREE


def default_head(model_dir: Path) -> Path:
    """The head to draft with when none is named: the shipped one, for the demo target only."""
    if not is_demo_model(model_dir):
        raise InputError("eagle mode needs a draft head for this model: pass --head DIR (or use --mode vanilla)")
    if not DEMO_HEAD.is_dir():
        raise InputError(f"the shipped draft head is missing ('{DEMO_HEAD}'): pass --head DIR")
    return DEMO_HEAD


def load_stack(
    model: str | None,
    head: str | None,
    device: str = "cpu",
    dtype: str = "float32",
    need_head: bool = True,
    tree: TreeConfig | None = None,
    kv_cache: str = "auto",
    compiled_forward: str = "cuda",
) -> Stack:
    """Load the target (the demo model when `model` is None) and its draft head.

    Without `head`, the demo model gets its shipped head; any other model needs one
    (unless only plain decoding is wanted). `kv_cache` is static (preallocated caches, CUDA
    graphs on a GPU), dynamic, or auto (`StaticKV.default_for`: static on CUDA only);
    `compiled_forward` is `StaticKV.compiled_forward` for static caches.
    """
    if kv_cache not in KV_CACHES:
        raise InputError(f"unknown KV cache {kv_cache!r}: use one of {', '.join(KV_CACHES)}")
    if compiled_forward not in COMPILED_FORWARDS:
        raise InputError(f"unknown compiled forward {compiled_forward!r}: use one of {', '.join(COMPILED_FORWARDS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    model_dir = resolve_model(model)
    lm, tokenizer = load_causal_lm(model_dir, device, parse_dtype(dtype))
    target = Target(
        lm, FeatureSpec(kind="eagle3", layers=eagle3_default_layers(lm.config.num_hidden_layers)),
        static={"static": StaticKV(compiled_forward=compiled_forward), "dynamic": None,
                "auto": StaticKV.default_for(device, compiled_forward)}[kv_cache],
    )
    draft: DraftHead | None = None
    if head is not None:
        draft = load_head(head, target)
    elif need_head:
        draft = load_head(default_head(model_dir), target)
    if draft is not None:
        # The head decides which hidden states the target must expose.
        target.features = draft.feature_spec
    tree = tree or default_tree(device, draft)
    return Stack(target=target, tokenizer=tokenizer, head=draft, tree=tree, model_dir=model_dir)

