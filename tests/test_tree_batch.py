"""TreeBatch: packing trees into rows and checking every row at once."""

from __future__ import annotations

import pytest
import torch

from aerie.batch.cache import BatchKVCache
from aerie.batch.inputs import batch_inputs, padded_inputs
from aerie.batch.trees import TreeBatch
from aerie.batch.verify import BatchVerifier, NewSession
from aerie.errors import InputError
from aerie.sampling import SamplingParams
from aerie.tree import DraftTree, validate_tree
from aerie.verifier import StopCriteria, accept_sampled, accept_sampled_rows
from tests.tiny import VOCAB, tiny_target


def _random_tree(gen: torch.Generator, n: int) -> DraftTree:
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    return DraftTree(torch.randint(0, VOCAB, (n,), generator=gen), torch.tensor(parents), torch.rand(n, generator=gen))


def test_trees_round_trip_through_rows():
    gen = torch.Generator().manual_seed(0)
    trees = [_random_tree(gen, 5), None, _random_tree(gen, 1), _random_tree(gen, 9)]
    batch = TreeBatch.from_trees(trees)
    assert batch.sizes == (5, 0, 1, 9) and batch.width == 9 and len(batch) == 4
    assert batch.tree(1) is None
    for r in (0, 2, 3):
        got, want = batch.tree(r), trees[r]
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.parents, want.parents)
        assert torch.equal(got.logprobs, want.logprobs)
    assert batch.parents[2, 1:].eq(-1).all() and batch.tokens[2, 1:].eq(0).all()  # padding


def test_packed_inputs_equal_the_inputs_of_the_same_trees_as_lists():
    gen = torch.Generator().manual_seed(2)
    trees = [_random_tree(gen, 5), None, _random_tree(gen, 3)]
    batch = TreeBatch.from_trees(trees)
    lists = [(t.tokens.tolist(), t.parents.tolist()) if t is not None else ([], []) for t in trees]
    for width, rows in ((5, 3), (8, 4)):
        want = batch_inputs([t for t, _ in lists], [p for _, p in lists], [4, 0, 9, 2], width, rows, 32)
        got = padded_inputs(batch.tokens, batch.parents, batch.sizes, [4, 0, 9, 2], width, rows, 32)
        for name, tensor in want.as_dict().items():
            assert torch.equal(got.as_dict()[name], tensor), name
        assert got.sizes == want.sizes
    with pytest.raises(ValueError, match="more than the width"):
        padded_inputs(batch.tokens, batch.parents, batch.sizes, [0, 0, 0], 4, 3, 32)


def test_invalid_rows_agree_with_validate_tree():
    """Against the per-tree reference, on trees broken in every way validate_tree knows."""
    gen = torch.Generator().manual_seed(1)
    max_nodes = 8
    for _ in range(40):
        trees = []
        for _ in range(6):
            n = int(torch.randint(1, 11, (1,), generator=gen))
            tree = _random_tree(gen, n)
            kind = int(torch.randint(0, 5, (1,), generator=gen))
            i = int(torch.randint(0, n, (1,), generator=gen))
            if kind == 1:  # a parent at or after its node, or out of range
                tree.parents[i] = i + int(torch.randint(0, 3, (1,), generator=gen)) if i else 0
            elif kind == 2:
                tree.tokens[i] = VOCAB + 3
            elif kind == 3:
                tree.tokens[i] = -1
            trees.append(tree)
        want = []
        for t in trees:
            try:
                validate_tree(t.tokens, t.parents, VOCAB, max_nodes)
                want.append(False)
            except ValueError:
                want.append(True)
        assert TreeBatch.from_trees(trees).invalid_rows(VOCAB, max_nodes).tolist() == want


def test_a_bad_row_in_a_tree_batch_is_named_and_nothing_changes():
    target = tiny_target("eagle3")
    verifier = BatchVerifier(target, BatchKVCache(target.config.num_hidden_layers, 4, 64, torch.device("cpu")))
    verifier.join([NewSession(f"s{i}", (1 + i, 2, 3), SamplingParams(), StopCriteria(8)) for i in range(3)])
    last = [r.generated[-1] for r in verifier.rows]

    def batch(bad_row=None, parent=1):
        trees = [DraftTree(torch.tensor([t, 5, 6]), torch.tensor([-1, 0, parent if i == bad_row else 1]),
                           torch.zeros(3)) for i, t in enumerate(last)]
        return TreeBatch.from_trees(trees)

    before = ([list(r.generated) for r in verifier.rows], list(verifier.cache.lengths))
    with pytest.raises(InputError, match="session s1: node 2 has parent 2"):
        verifier.verify(batch(bad_row=1, parent=2))
    wrong_root = batch()
    wrong_root.tokens[2, 0] = (last[2] + 1) % VOCAB
    with pytest.raises(InputError, match="session s2: tree root"):
        verifier.verify(wrong_root)
    assert ([list(r.generated) for r in verifier.rows], list(verifier.cache.lengths)) == before
    results = verifier.verify(batch())
    assert all(r is not None and r.new_tokens for r in results)


def test_sampled_rows_equal_sampled_acceptance_row_by_row():
    """Against `accept_sampled` on each tree alone: mixed settings (warped in groups), ragged
    trees, different committed lengths, logits peaked enough that paths go deep."""
    gen = torch.Generator().manual_seed(3)
    settings = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.7, top_k=5, seed=2),
                SamplingParams(temperature=1.3, top_p=0.8, seed=3), SamplingParams(temperature=1.0, seed=4)]
    deep = 0
    for trial in range(12):
        trees = [_random_tree(gen, int(torch.randint(1, 10, (1,), generator=gen))) for _ in range(5)]
        batch = TreeBatch.from_trees(trees)
        logits = torch.randn(5, batch.width + 2, VOCAB, generator=gen) * 3
        for r, t in enumerate(trees):  # most children's tokens likely under their parent, some not
            for c in range(1, len(t)):
                if float(torch.rand((), generator=gen)) < 0.7:
                    logits[r, t.parents[c], t.tokens[c]] += 12
        params = [settings[(r + trial) % 4] for r in range(5)]
        committed = [int(torch.randint(0, 50, (1,), generator=gen)) for _ in range(5)]
        rows = [r for r in range(5) if r != trial % 5]  # one row sits out
        got = accept_sampled_rows(batch.tokens, batch.parents, batch.sizes, logits, rows, committed, params)
        for (path, bonus), r in zip(got, rows):
            want = accept_sampled(trees[r], logits[r, : len(trees[r])], committed[r], params[r])
            assert (path, bonus) == want
            deep = max(deep, len(path))
    assert deep >= 3
