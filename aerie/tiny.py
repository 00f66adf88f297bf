"""Tiny random-weight targets and heads: for fast tests and the load test, never for claims
about speed or quality (those use the real SmolLM2 target)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aerie.heads import DraftHead, build_draft_vocab, new_head, save_head
from aerie.target import FeatureSpec, Target, eagle3_default_layers

VOCAB = 64


def tiny_llama(vocab: int = VOCAB, layers: int = 6, hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None,
        bos_token_id=None, pad_token_id=None,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    # Sharpen the output so that the target has clear preferences (more like a trained model).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def tiny_target(kind: str = "eagle3", vocab: int = VOCAB, layers: int = 6, seed: int = 0) -> Target:
    model = tiny_llama(vocab=vocab, layers=layers, seed=seed)
    spec = FeatureSpec("eagle3", eagle3_default_layers(layers)) if kind == "eagle3" else FeatureSpec("eagle1")
    return Target(model, spec)


def tiny_head(target: Target, kind: str = "eagle3", draft_vocab: int | None = None, seed: int = 1) -> DraftHead:
    torch.manual_seed(seed)
    head = new_head(target, kind, draft_vocab)
    if kind == "eagle3" and draft_vocab:
        d2t, t2d = build_draft_vocab(torch.rand(target.vocab_size), draft_vocab)
        head.d2t.copy_(d2t)
        head.t2d.copy_(t2d)
    return head.eval()


def build_tiny_model(where: Path) -> tuple[Path, Path]:
    """Write <where>/model (a Hugging Face directory with a word-level tokenizer: "w0".."w63")
    and <where>/head (a random EAGLE-3 head in the official layout); return both."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir, head_dir = where / "model", where / "head"
    model = tiny_llama(vocab=VOCAB, layers=6, hidden=64, seed=0)
    model.save_pretrained(model_dir)
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(model_dir)
    target = Target(model, FeatureSpec("eagle3", eagle3_default_layers(6)))
    save_head(tiny_head(target, "eagle3", draft_vocab=48, seed=1), head_dir)
    return model_dir, head_dir
