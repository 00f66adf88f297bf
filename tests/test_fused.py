"""The fused kernels of the graphed GPU path (aerie.fused), checked on the CPU against
transformers' own norm and rotary embedding."""

import threading

import pytest
import torch
from transformers.models.llama import modeling_llama

import aerie.fused
from aerie.fused import Fusion, compiled_rotate, fused, fusion_for, install_rotary_dispatch, rms_norms, rotate
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


def test_only_cuda_fuses():
    model = tiny_llama()
    assert fusion_for(model, torch.device("cpu")) == Fusion()
    assert fusion_for(model, torch.device("cuda")) == Fusion(tuple(rms_norms(model)), rotary=True)
    assert fusion_for(model, torch.device("cuda"), rotary=False) == Fusion(tuple(rms_norms(model)))
    assert fusion_for(model, torch.device("cuda"), norms=False) == Fusion(rotary=True)


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
