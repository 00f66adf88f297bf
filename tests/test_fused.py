"""The fused kernels of the graphed GPU path (aerie.fused), checked on the CPU against
transformers' own norm, rotary embedding and attention."""

import threading

import pytest
import torch
from transformers.integrations import sdpa_attention
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama import modeling_llama

import aerie.fused
from aerie.fused import (Fusion, compiled_rotate, fused, fusion_for, grouped_query_attention, install_grouped_attention,
                         install_rotary_dispatch, rms_norms, rotate)
from aerie.kvcache import additive_mask
from aerie.projections import stackable
from aerie.target import FeatureSpec, StaticKV, Target
from tests.tiny import VOCAB, tiny_llama


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_fused_norms_match_the_reference_and_are_undone(monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama()
    for norm in rms_norms(model):  # non-trivial scales, so that a dropped weight would show
        norm.weight.data.uniform_(0.5, 1.5)
    norms = tuple(rms_norms(model))
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    ids = torch.randint(0, VOCAB, (2, 9))
    reference = logits(model, ids)

    with fused(Fusion(norms)):
        assert all("forward" in m.__dict__ for m in norms)
        fused_logits = logits(model, ids)
    torch.testing.assert_close(fused_logits, reference, rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in norms)

    # An error inside the block still puts the reference norms back.
    with pytest.raises(RuntimeError), fused(Fusion(norms)):
        raise RuntimeError("inside")
    assert not any("forward" in m.__dict__ for m in norms)

    # Inside the block every norm ran as F.rms_norm (so the comparison above compared it).
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    real = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", counting)
    with fused(Fusion(norms)):
        logits(model, ids)
    assert len(calls) == len(norms)


def test_only_cuda_fuses_norms_and_rotary():
    model = tiny_llama()
    stacked = tuple(stackable(model))
    assert fusion_for(model, torch.device("cpu")) == Fusion(projections=stacked)
    assert fusion_for(model, torch.device("cpu"), projections=False) == Fusion()
    assert fusion_for(model, torch.device("cuda")) == Fusion(tuple(rms_norms(model)), rotary=True, projections=stacked)
    assert fusion_for(model, torch.device("cuda"), rotary=False, projections=False) == Fusion(tuple(rms_norms(model)))
    assert fusion_for(model, torch.device("cuda"), norms=False, projections=False) == Fusion(rotary=True)


def test_rotate_is_the_reference_rotary_embedding():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    cos, sin = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    # The reference itself, whether or not another test has installed the dispatcher.
    reference = getattr(modeling_llama.apply_rotary_pos_emb, "reference", modeling_llama.apply_rotary_pos_emb)
    for got, want in zip(rotate(q, k, cos, sin), reference(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_rotate_matches_the_reference_for_every_shape():
    """Compiled once with dynamic shapes, it serves one token, a tree and a batch alike."""
    torch.manual_seed(0)
    for batch, tokens in ((1, 1), (1, 13), (3, 5)):
        q, k = torch.randn(batch, 4, tokens, 16), torch.randn(batch, 2, tokens, 16)
        cos, sin = torch.randn(batch, tokens, 16), torch.randn(batch, tokens, 16)
        for got, want in zip(compiled_rotate()(q, k, cos, sin), rotate(q, k, cos, sin)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_rotary_dispatch_runs_the_fused_kernel_inside_the_block_on_its_thread_only(monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama()
    assert install_rotary_dispatch(model)
    assert install_rotary_dispatch(model)  # idempotent: one dispatcher, not a chain of them
    dispatcher = modeling_llama.apply_rotary_pos_emb
    assert not hasattr(dispatcher.reference, "reference")

    calls = []

    def counting(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return rotate(*args, **kwargs)

    monkeypatch.setattr(aerie.fused, "compiled_rotate", lambda: counting)
    ids = torch.randint(0, VOCAB, (2, 9))
    reference = logits(model, ids)
    assert calls == []  # outside a block: the reference

    with fused(Fusion(rotary=True)):
        torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)
        assert calls == ["MainThread"] * model.config.num_hidden_layers
        # Another thread, meanwhile, runs the reference.
        other = threading.Thread(target=logits, args=(model, ids), name="other")
        other.start()
        other.join()
    assert "other" not in calls
    calls.clear()
    with pytest.raises(RuntimeError), fused(Fusion(rotary=True)):
        raise RuntimeError("inside")
    logits(model, ids)
    assert calls == []  # left on an error: the reference again


def _sdpa_reference():
    return getattr(sdpa_attention.sdpa_attention_forward, "reference", sdpa_attention.sdpa_attention_forward)


@pytest.mark.parametrize("batch,heads,kv_heads,rows,length", [(1, 4, 2, 1, 16), (1, 9, 3, 7, 24), (3, 8, 2, 5, 8),
                                                               (2, 6, 6, 3, 16)])
def test_grouped_query_attention_is_the_repeated_heads_attention(batch, heads, kv_heads, rows, length):
    """Query heads stacked as rows of their KV head: the same attention as transformers'
    SDPA with every KV head repeated, for a tree-shaped mask, boolean or additive, one mask
    for the batch or one per row."""
    torch.manual_seed(0)
    q = torch.randn(batch, heads, rows, 16)
    k, v = torch.randn(batch, kv_heads, length, 16), torch.randn(batch, kv_heads, length, 16)
    allowed = torch.rand(batch, 1, rows, length) < 0.6
    allowed[..., 0] = True  # no empty row
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    for mask in (allowed, allowed[:1], additive_mask(allowed, torch.float32)):
        if mask.shape[0] != batch and mask.shape[0] != 1:
            continue
        want, _ = _sdpa_reference()(module, q, k, v, mask, scaling=0.3)
        got = grouped_query_attention(q, k, v, mask, scaling=0.3)
        assert got.shape == (batch, rows, heads, 16)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_grouped_attention_runs_only_for_forwards_that_ask(monkeypatch):
    """The dispatcher: `fold_query_groups=True` in the model's call reaches every layer's
    attention and runs the grouped kernel; any other call (transformers' `generate`) runs the
    reference; the logits agree."""
    install_grouped_attention()
    install_grouped_attention()  # idempotent: one dispatcher, not a chain of them
    dispatcher = AttentionInterface._global_mapping["sdpa"]
    assert not hasattr(dispatcher.reference, "reference")
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return grouped_query_attention(*args, **kwargs)

    monkeypatch.setattr(aerie.fused, "grouped_query_attention", counting)
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 9))
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    with torch.inference_mode():
        reference = model(input_ids=ids, attention_mask=mask).logits
        assert calls == []
        folded = model(input_ids=ids, attention_mask=mask, fold_query_groups=True).logits
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)


def test_the_static_path_folds_query_groups(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return grouped_query_attention(*args, **kwargs)

    monkeypatch.setattr(aerie.fused, "grouped_query_attention", counting)
    torch.manual_seed(0)
    model = tiny_llama()
    static = Target(model, FeatureSpec("eagle1"), StaticKV(cuda_graphs=False, compiled_forward="never"))
    dynamic = Target(model, FeatureSpec("eagle1"))
    ids = torch.randint(0, VOCAB, (12,))
    parents = torch.tensor([-1, 0, 0, 1, 2])
    outputs = []
    for target in (static, dynamic):
        cache = target.new_cache()
        target.forward(cache, ids[:7])
        outputs.append(target.forward(cache, ids[7:], tree_parents=parents))
    assert len(calls) >= model.config.num_hidden_layers  # the static forwards (the dynamic ones: none)
    n = len(calls)
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=1e-4, atol=1e-4)
    for target in (dynamic, Target(model, FeatureSpec("eagle1"),
                                   StaticKV(cuda_graphs=False, compiled_forward="never", grouped_attention=False))):
        cache = target.new_cache()
        target.forward(cache, ids[:7])
        target.forward(cache, ids[7:], tree_parents=parents)
    assert len(calls) == n  # neither the dynamic path nor a static one with the KV heads repeated
