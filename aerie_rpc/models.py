"""Loading what each service needs, and no more.

The verify service loads the whole target (and its tokenizer, when the directory has one, for
the end-of-sequence ids). The draft service needs only the target's config, its input
embedding (and for EAGLE-1 its LM head): those tensors are read straight from the
safetensors files, so a small drafter GPU never holds the target's layers. The gateway needs
only the tokenizer. Token ids work everywhere without a tokenizer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from aerie.errors import HeadError, InputError, ModelError
from aerie.heads import DraftHead, load_head
from aerie.models import load_causal_lm, parse_dtype, resolve_model
from aerie.target import FeatureSpec, StaticKV, Target, eagle3_default_layers

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def load_target_model(spec: str | None, device: str, dtype: str) -> tuple[nn.Module, object | None, Path]:
    """(model, tokenizer or None, directory). Same loader as in-process generation."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    path = resolve_model(spec)
    if has_tokenizer(path):
        model, tokenizer = load_causal_lm(path, device, parse_dtype(dtype))
        return model, tokenizer, path
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model in '{path}': {e}") from e
    return model.to(device).eval(), None, path


def load_tokenizer(spec: str | None) -> tuple[object, Path]:
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    if not has_tokenizer(path):
        raise ModelError(f"model directory '{path}' has no tokenizer: send token ids instead of text")
    return AutoTokenizer.from_pretrained(path), path


class _Shape(nn.Module):
    """Stands in for an LM head the drafter never calls: it only reports the vocabulary."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = torch.empty(vocab, hidden, device="meta")


class EmbeddingOnlyLM(nn.Module):
    """Just enough of a causal LM for a draft head: config, embedding, (LM head)."""

    def __init__(self, config, embed: nn.Embedding, lm_head: nn.Module):
        super().__init__()
        self.config = config
        self.embed_tokens = embed
        self.lm_head = lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device


def _read_tensors(path: Path, suffixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read the tensors whose names end with the given suffixes from safetensors files."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    found: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                for want, suffix in suffixes.items():
                    if want not in found and (key == suffix or key.endswith("." + suffix)):
                        found[want] = st.get_tensor(key)
    return found


def draft_target(spec: str | None, device: str, dtype: str, need_lm_head: bool) -> tuple[Target, Path]:
    """A `Target` holding only what a draft head borrows from the target."""
    from transformers import AutoConfig

    path = resolve_model(spec)
    config = AutoConfig.from_pretrained(path)
    torch_dtype = parse_dtype(dtype)
    wanted = {"embed": "embed_tokens.weight", "lm_head": "lm_head.weight"}
    tensors = _read_tensors(path, wanted)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if "embed" not in tensors or (need_lm_head and "lm_head" not in tensors and not tied):
        # Not a plain safetensors layout: load the whole model once and keep its embedding.
        print(f"aerie: reading the embedding of '{path}' needs a full model load", file=sys.stderr)
        model, _, _ = load_target_model(str(path), device, dtype)
        return Target(model, FeatureSpec("eagle3", eagle3_default_layers(config.num_hidden_layers)),
                      static=StaticKV.default_for(device)), path
    embed = nn.Embedding.from_pretrained(tensors["embed"].to(device, torch_dtype), freeze=True)
    if need_lm_head:
        weight = tensors.get("lm_head", tensors["embed"]).to(device, torch_dtype)
        lm_head: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device, dtype=torch_dtype)
        lm_head.weight = nn.Parameter(weight, requires_grad=False)
    else:
        lm_head = _Shape(int(tensors["embed"].shape[0]), int(tensors["embed"].shape[1]))
    stub = EmbeddingOnlyLM(config, embed, lm_head).eval()
    return Target(stub, FeatureSpec("eagle3", eagle3_default_layers(config.num_hidden_layers)),
                  static=StaticKV.default_for(device)), path


def head_kind(head_dir: str) -> str:
    """eagle1 or eagle3, from a head directory's config (without reading the weights)."""
    cfg_path = Path(head_dir) / "config.json"
    if not cfg_path.is_file():
        raise HeadError(f"head '{head_dir}' is not a directory with a config.json")
    raw = json.loads(cfg_path.read_text())
    archs = " ".join(raw.get("architectures") or [])
    return "eagle3" if "draft_vocab_size" in raw or "Eagle3" in archs else "eagle1"


def load_draft_head(model: str | None, head: str | None, device: str, dtype: str) -> tuple[DraftHead, Target, Path]:
    """The draft head for `model`, chosen exactly as in-process generation chooses it."""
    from aerie.stack import default_head

    head = head if head is not None else default_head(resolve_model(model))
    target, path = draft_target(model, device, dtype, need_lm_head=head_kind(head) == "eagle1")
    draft = load_head(head, target)
    target.features = draft.feature_spec
    return draft.eval(), target, path
