"""Loading only this rank's shard of a checkpoint.

The model is laid out on the meta device and sharded there (`shard_llama_`), then each weight
is read from the safetensors files as exactly the slice this rank keeps, straight into its
place on the rank's device. Host memory holds one tensor slice at a time, where loading the
whole model and sharding it afterwards would hold one full copy per rank (N x 140 GB for a
70B target on one host).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from aerie.errors import ModelError
from aerie.models import SUPPORTED_MODEL_TYPES
from aerie.parallel.launch import ParallelGroup
from aerie.parallel.shard import ShardPlan, drop_lm_head_, shard_llama_


def shard_index(local: Sequence[int], full: Sequence[int], rank: int) -> tuple[slice, ...]:
    """The slice of a full checkpoint tensor that this rank's parameter holds: the rank's
    block along every dimension the sharding shrank (rows of a column-parallel weight,
    columns of a row-parallel one), everything along the others."""
    if len(local) != len(full) or any(n > m or m % n for n, m in zip(local, full)):
        raise ModelError(f"a shard of shape {tuple(local)} cannot come from a checkpoint tensor of shape {tuple(full)}")
    return tuple(slice(rank * n, (rank + 1) * n) if n != m else slice(None) for n, m in zip(local, full))


def empty_shard(config, group: ParallelGroup, dtype: torch.dtype) -> tuple[nn.Module, ShardPlan]:
    """This rank's shard of a causal LM of `config`: laid out on the meta device, sharded
    there, then given storage on the rank's device, so that only its own weights are ever
    allocated. The weights are left for the caller to fill; the rotary frequencies (a buffer
    `to_empty` leaves uninitialised) are made again."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    plan = shard_llama_(model, group.rank, group.world, group.all_reduce)
    if group.rank > 0:
        drop_lm_head_(model)
    model.to_empty(device=group.device)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(group.device)
    return model, plan


def load_shard(path: Path, group: ParallelGroup, dtype: torch.dtype) -> tuple[nn.Module, ShardPlan]:
    """This rank's shard of the causal LM in the Hugging Face directory `path`, on the
    rank's device, in eval mode."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"model type '{config.model_type}' in '{path}' is not supported: "
                         f"use a {', '.join(SUPPORTED_MODEL_TYPES)} family model")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"'{path}' has no safetensors weights to read a shard from")
    model, plan = empty_shard(config, group, dtype)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and isinstance(getattr(model, "lm_head", None), nn.Linear)
    wanted = {name: p for name, p in model.named_parameters() if not (tied and name == "lm_head.weight")}
    loaded: set[str] = set()
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    param = wanted.get(key)
                    if param is None:
                        continue
                    part = st.get_slice(key)
                    param.copy_(part[shard_index(param.shape, part.get_shape(), group.rank)])
                    loaded.add(key)
    missing = sorted(wanted.keys() - loaded)
    if missing:
        raise ModelError(f"the checkpoint in '{path}' lacks {len(missing)} weights, e.g. {', '.join(missing[:3])}")
    if tied:  # to_empty gave the two their own storage
        model.lm_head.weight = model.get_input_embeddings().weight
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), plan
