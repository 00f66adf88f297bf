"""Loading the target for training and evaluation, and encoding prompts the way the engine's
users do (the model's chat template with one user turn)."""

from __future__ import annotations

from pathlib import Path

import torch

from aerie.errors import InputError
from aerie.models import eos_token_ids
from aerie.target import FeatureSpec, Target, eagle3_default_layers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu, cuda or auto, got {name!r}")
    return name


def pick_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)} or auto, got {name!r}")
    return DTYPES[name]


def load_model(spec: str | None, device: str, dtype: torch.dtype):
    """(model, tokenizer, model_dir) for a Hugging Face directory, a .gguf file or the demo
    model (spec None)."""
    path = Path(spec).expanduser() if spec else None
    if path is not None and path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot load the model in '{path}': {str(e).splitlines()[0]}") from e
        model_dir = path
    else:
        from aerie.models import load_causal_lm, resolve_model

        model_dir = resolve_model(spec)
        model, tokenizer = load_causal_lm(model_dir, device, dtype)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer, model_dir


def feature_spec(model, kind: str) -> FeatureSpec:
    if kind == "eagle3":
        return FeatureSpec("eagle3", eagle3_default_layers(model.config.num_hidden_layers))
    return FeatureSpec("eagle1")


def load_target(spec: str | None, kind: str, device: str, dtype: torch.dtype) -> tuple[Target, object, Path]:
    model, tokenizer, model_dir = load_model(spec, device, dtype)
    return Target(model, feature_spec(model, kind)), tokenizer, model_dir


def encode_chat(tokenizer, text: str) -> list[int]:
    """Token ids of one user turn under the chat template, ready for the assistant's answer
    (the same encoding as `aerie generate`)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(text).input_ids


def stop_token_ids(tokenizer, model) -> frozenset[int]:
    """Every id that ends an answer, as generation decides it (`aerie.models.eos_token_ids`)."""
    return eos_token_ids(tokenizer, getattr(model, "generation_config", None))
