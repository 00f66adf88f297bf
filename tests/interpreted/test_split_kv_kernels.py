"""The split-KV attention kernels (aerie.split_kv), run on the CPU in Triton's interpreter,
against SDPA with every KV head repeated; and the static path with them against without."""

import pytest
import torch
import torch.nn.functional as F

import aerie.split_kv
from aerie.batch.cache import BatchKVCache
from aerie.batch.trees import TreeBatch
from aerie.batch.verify import BatchVerifier, NewSession
from aerie.engine import Engine
from aerie.heads import DraftHead
from aerie.kvcache import additive_mask
from aerie.sampling import SamplingParams
from aerie.target import FeatureSpec, StaticKV, Target
from aerie.tree import DraftTree, TreeConfig
from aerie.verifier import StopCriteria
from tests.test_engine import PROMPTS
from tests.tiny import VOCAB, tiny_head, tiny_llama, tiny_target


def _reference(rows, key, value, mask, scale):
    """SDPA over the rows with row r under mask row r % n."""
    n = mask.shape[-2]
    per_row = mask[:, :, torch.arange(rows.shape[2]) % n]
    return F.scaled_dot_product_attention(rows.float(), key.float(), value.float(), attn_mask=per_row.float(),
                                          scale=scale)


# (batch, kv heads, query heads per KV head, query rows, cache length, head dim, dtype). The
# interpreter's dot product is wrong for bfloat16 (Triton 3.9), so half precision is float16.
CASES = [
    (1, 2, 4, 1, 200, 64, torch.float32),     # one decode token, two slices, the last one ragged
    (1, 3, 3, 60, 300, 64, torch.float16),    # a tree: 180 rows, three blocks of rows, three slices
    (2, 2, 2, 7, 70, 128, torch.float32),     # a batch, one mask per sequence
    (1, 1, 1, 5, 64, 32, torch.float32),      # one KV head, one slice
]


@pytest.mark.parametrize("batch,kv_heads,groups,n,length,d,dtype", CASES)
def test_split_kv_attention_is_attention(batch, kv_heads, groups, n, length, d, dtype):
    torch.manual_seed(0)
    rows = torch.randn(batch, kv_heads, groups * n, d, dtype=dtype)
    key, value = (torch.randn(batch, kv_heads, length, d, dtype=dtype) for _ in range(2))
    seen = torch.rand(batch, 1, n, length) < 0.3
    seen[..., 3] = True  # no empty row
    for mask in (seen, seen[:1]):
        additive = additive_mask(mask, dtype)
        got = aerie.split_kv.split_kv_attention(rows, key, value, additive, d**-0.5)
        assert got.shape == rows.shape and got.dtype == dtype
        want = _reference(rows, key, value, additive, d**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_slices_that_see_nothing_drop_out_of_the_merge():
    """A short sequence in a long cache: most slices see no key of a row. They must weigh
    nothing (their log-sum-exp is -inf), not turn the row into NaN."""
    torch.manual_seed(1)
    rows, key, value = torch.randn(1, 2, 4, 64), torch.randn(1, 2, 1024, 64), torch.randn(1, 2, 1024, 64)
    seen = torch.zeros(1, 1, 2, 1024, dtype=torch.bool)
    seen[..., :10] = True
    seen[0, 0, 1, 700] = True  # a key far from the others, alone in its slice
    mask = additive_mask(seen, torch.float32)
    got = aerie.split_kv.split_kv_attention(rows, key, value, mask, 0.125)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(rows, key, value, mask, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiled", ["never", "always"])
def test_the_static_path_runs_split_kv_and_agrees(monkeypatch, compiled):
    """With the kernels available, every attention call of a static forward (decode and tree
    verify) goes through them, compiled layers or not, and the logits are those of the same
    path with SDPA."""
    launches = []
    launch = aerie.split_kv._launch
    monkeypatch.setattr(aerie.split_kv, "_launch", lambda *a: launches.append(1) or launch(*a))
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (12,))
    parents = torch.tensor([-1, 0, 0, 1, 2])
    outputs = []
    for split in (True, False):
        target = Target(model, FeatureSpec("eagle1"),
                        StaticKV(cuda_graphs=False, compiled_forward=compiled, split_kv_attention=split))
        cache = target.new_cache()
        target.forward(cache, ids[:6])
        target.forward(cache, ids[6:7])
        outputs.append(target.forward(cache, ids[7:], tree_parents=parents))
        if split:
            assert len(launches) == 3 * model.config.num_hidden_layers
    assert len(launches) == 3 * model.config.num_hidden_layers  # none with split_kv_attention off
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs[0].features, outputs[1].features, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=5)], ids=["greedy", "T1"])
def test_speculative_decoding_with_split_kv_is_the_dynamic_paths(monkeypatch, params):
    """Target and head on static caches with the kernels (through cache growth and past the
    largest graph): the tokens and acceptances of the dynamic-cache path, and the head's
    attention runs the kernels too."""
    launches, in_head = [], []
    launch, head_step = aerie.split_kv._launch, DraftHead.step

    def step(self, *args, **kwargs):
        in_head.append(True)
        try:
            return head_step(self, *args, **kwargs)
        finally:
            in_head.pop()

    monkeypatch.setattr(aerie.split_kv, "_launch", lambda *a: launches.append(bool(in_head)) or launch(*a))
    monkeypatch.setattr(DraftHead, "step", step)
    dynamic = tiny_target("eagle3")
    static = Target(dynamic.model, dynamic.features,
                    StaticKV(cuda_graphs=True, largest_graph=16, initial_capacity=16, pooled=2))
    tree = TreeConfig(depth=3, top_k=3, total_tokens=8)
    stop = StopCriteria(24)
    want = Engine(dynamic, tiny_head(dynamic, "eagle3", 48), tree).generate(PROMPTS[0], params, stop)
    got = Engine(static, tiny_head(static, "eagle3", 48), tree).generate(PROMPTS[0], params, stop)
    assert got.token_ids == want.token_ids
    assert [r.accepted for r in got.rounds] == [r.accepted for r in want.rounds]
    assert True in launches and False in launches  # the head's attention and the target's


def test_batched_tree_forward_with_split_kv_equals_each_session_alone(monkeypatch):
    """Batched verification on a static-cache target: ragged trees over rows of different
    lengths (one mask per row) go through the kernels, and every real node's logits equal
    the single-session forward's without them."""
    launches = []
    launch = aerie.split_kv._launch
    monkeypatch.setattr(aerie.split_kv, "_launch", lambda rows, *a: launches.append(rows.shape[0]) or launch(rows, *a))
    dynamic = tiny_target("eagle3")
    static = Target(dynamic.model, dynamic.features, StaticKV(cuda_graphs=False, compiled_forward="never"))
    prompts = [PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    trees = [([7, 4, 5, 6], [-1, 0, 0, 1]), ([9], [-1]), ([3, 2, 2], [-1, 0, 1])]
    verifier = BatchVerifier(static, BatchKVCache(6, 4, 32, torch.device("cpu")))
    verifier.join([NewSession(i, tuple(p), SamplingParams(), StopCriteria(8)) for i, p in enumerate(prompts)])
    with torch.inference_mode():
        batch = TreeBatch.from_trees([DraftTree(torch.tensor(t), torch.tensor(p), torch.zeros(len(t)))
                                      for t, p in trees])
        logits, _ = verifier.batch_model.forward(batch, argmax=False)
    assert launches and max(launches) > 1  # rows of several sessions in one call
    for r, (prompt, (tokens, parents)) in enumerate(zip(prompts, trees)):
        cache = dynamic.new_cache()
        dynamic.forward(cache, torch.tensor(prompt))
        want = dynamic.forward(cache, torch.tensor(tokens), tree_parents=torch.tensor(parents))
        torch.testing.assert_close(logits[r, : len(tokens)], want.logits, rtol=1e-4, atol=1e-4)
