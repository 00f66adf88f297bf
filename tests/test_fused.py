"""The fused RMSNorm of the graphed GPU path (aerie.fused), checked on the CPU against
transformers' own norm."""

import pytest
import torch

from aerie.fused import fused_norms, norms_to_fuse, rms_norms
from tests.tiny import VOCAB, tiny_llama


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_fused_norms_match_the_reference_and_are_undone(monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama()
    for norm in rms_norms(model):  # non-trivial scales, so that a dropped weight would show
        norm.weight.data.uniform_(0.5, 1.5)
    norms = rms_norms(model)
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    ids = torch.randint(0, VOCAB, (2, 9))
    reference = logits(model, ids)

    with fused_norms(norms):
        assert all("forward" in m.__dict__ for m in norms)
        fused = logits(model, ids)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in norms)

    # An error inside the block still puts the reference norms back.
    with pytest.raises(RuntimeError), fused_norms(norms):
        raise RuntimeError("inside")
    assert not any("forward" in m.__dict__ for m in norms)

    # Inside the block every norm ran as F.rms_norm (so the comparison above compared it).
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    real = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", counting)
    with fused_norms(norms):
        logits(model, ids)
    assert len(calls) == len(norms)


def test_only_cuda_fuses():
    model = tiny_llama()
    assert norms_to_fuse(model, torch.device("cpu")) == []
    assert norms_to_fuse(model, torch.device("cuda")) == rms_norms(model)
