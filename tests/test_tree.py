"""Draft trees against brute-force references: EAGLE-2 expansion and rerank, masks,
positions, paths, and the drafter's own tree attention."""

from __future__ import annotations

import itertools

import pytest
import torch

from aerie.drafter import DraftSession
from aerie.tree import (
    EAGLE1_STATIC_TREE,
    TreeConfig,
    ancestor_mask,
    node_depths,
    retrieve_paths,
    top_k_in_chunks,
    validate_tree,
)
from tests.tiny import tiny_head, tiny_target

VOCAB = 12


def path_logprobs(path: tuple[int, ...]) -> torch.Tensor:
    """A synthetic draft model: next-token log-probs that depend on the whole path."""
    gen = torch.Generator().manual_seed(hash(path) % (2**31))
    return torch.log_softmax(torch.randn(VOCAB, generator=gen) * 2.0, dim=-1)


class PathHead:
    """A stand-in head whose hidden state is the path itself, so that the real DraftSession
    loop can be checked against a brute-force tree builder."""

    def __init__(self):
        self.paths: dict[int, tuple[int, ...]] = {}
        self.fc = torch.nn.Linear(1, 1)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    def _id(self, path):
        key = len(self.paths)
        self.paths[key] = path
        return float(key)

    def __call__(self, features, input_ids, positions, mask, cache):
        out = []
        for f, t in zip(features[0, :, 0].tolist(), input_ids[0].tolist()):
            parent = self.paths.get(int(f), ()) if f >= 0 else ()
            out.append(self._id(parent + (t,)))
        return torch.tensor(out)[None, :, None]

    def draft_logprobs(self, hidden):
        # The root's own path is excluded: draft paths are relative to the root.
        return torch.stack([path_logprobs(self.paths[int(h)][1:]) for h in hidden[:, 0].tolist()])

    def to_target_ids(self, ids):
        return ids


def brute_force_eagle2(depth: int, top_k: int, total: int) -> set[tuple[int, ...]]:
    frontier: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    pool: list[tuple[tuple[int, ...], float]] = []
    for _ in range(depth):
        cands = []
        for path, score in frontier:
            lp = path_logprobs(path)
            for tok in torch.topk(lp, top_k).indices.tolist():
                cands.append((path + (tok,), score + float(lp[tok])))
        pool += cands
        frontier = sorted(cands, key=lambda c: -c[1])[:top_k]
    return {p for p, _ in sorted(pool, key=lambda c: -c[1])[:total]}


def tree_paths(tree) -> set[tuple[int, ...]]:
    paths = set()
    for i in range(1, len(tree)):
        node, path = i, []
        while node > 0:
            path.append(int(tree.tokens[node]))
            node = int(tree.parents[node])
        paths.add(tuple(reversed(path)))
    return paths


@pytest.mark.parametrize("depth,top_k,total", [(1, 3, 3), (3, 2, 5), (4, 3, 10), (5, 4, 30), (3, 3, 27)])
def test_dynamic_tree_matches_brute_force(depth, top_k, total):
    session = DraftSession(PathHead(), TreeConfig(kind="dynamic", depth=depth, top_k=top_k, total_tokens=total))
    tree = session.draft(torch.tensor([[-1.0]]), [7])
    assert int(tree.tokens[0]) == 7 and int(tree.parents[0]) == -1
    assert tree_paths(tree) == brute_force_eagle2(depth, top_k, total)
    # Scores are the true cumulative draft log-probs of each path.
    for i in range(1, len(tree)):
        node, path = i, []
        while node > 0:
            path.append(int(tree.tokens[node]))
            node = int(tree.parents[node])
        path = tuple(reversed(path))
        expected = sum(float(path_logprobs(path[:j])[path[j]]) for j in range(len(path)))
        assert tree.logprobs[i].item() == pytest.approx(expected, abs=1e-4)


def test_chain_is_greedy_path():
    session = DraftSession(PathHead(), TreeConfig.chain(5))
    tree = session.draft(torch.tensor([[-1.0]]), [3])
    path: tuple[int, ...] = ()
    for _ in range(5):
        path += (int(path_logprobs(path).argmax()),)
    assert tree.parents.tolist() == [-1, 0, 1, 2, 3, 4]
    assert tuple(tree.tokens[1:].tolist()) == path


def test_static_tree_follows_eagle1_choices():
    session = DraftSession(PathHead(), TreeConfig.eagle1_static())
    tree = session.draft(torch.tensor([[-1.0]]), [3])
    assert len(tree) == len(EAGLE1_STATIC_TREE) + 1
    expected = set()
    for ranks in EAGLE1_STATIC_TREE:
        path: tuple[int, ...] = ()
        for r in ranks:
            path += (int(torch.sort(path_logprobs(path), descending=True, stable=True).indices[r]),)
        expected.add(path)
    assert tree_paths(tree) == expected


def test_masks_positions_and_paths_against_definitions():
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 6])
    mask = ancestor_mask(parents)
    depths = node_depths(parents)
    for i, j in itertools.product(range(8), range(8)):
        node, ancestors = i, set()
        while node >= 0:
            ancestors.add(node)
            node = int(parents[node])
        assert bool(mask[i, j]) == (j in ancestors)
        assert int(depths[i]) == len(ancestors) - 1
    paths = retrieve_paths(parents)
    leaves = {4, 5, 7}
    assert {int(row[row >= 0][-1]) for row in paths} == leaves
    for row in paths:
        nodes = row[row >= 0].tolist()
        assert nodes[0] == 0 and all(int(parents[b]) == a for a, b in zip(nodes, nodes[1:]))


@pytest.mark.parametrize(
    "tokens,parents,message",
    [
        ([1, 2], [-1, 1], "earlier node"),  # self-parent: a cycle
        ([1, 2, 3], [-1, 2, 1], "earlier node"),  # 1 -> 2 -> 1
        ([1, 2], [-1, 5], "earlier node"),  # out of range
        ([1, 2], [-1], "parents"),  # lengths
        ([1, 99], [-1, 0], "tokens must be in"),
        ([1, 2], [0, 0], "root"),
    ],
)
def test_validate_tree_rejects_malformed(tokens, parents, message):
    with pytest.raises(ValueError, match=message):
        validate_tree(torch.tensor(tokens), torch.tensor(parents), vocab_size=10, max_nodes=16)


def test_validate_tree_limits_size():
    with pytest.raises(ValueError, match="limit"):
        validate_tree(torch.zeros(20, dtype=torch.long), torch.arange(-1, 19), vocab_size=10, max_nodes=16)


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_drafter_tree_attention_matches_fresh_head_runs(kind):
    """Each drafted node's score equals the head run from scratch (causal, no cache) on the
    committed pairs followed by that node's own path: the drafter's masks and positions are
    exactly those of a plain sequence."""
    target = tiny_target(kind)
    head = tiny_head(target, kind, draft_vocab=48 if kind == "eagle3" else None)
    prompt = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    out = target.forward(target.new_cache(), torch.tensor(prompt))
    session = DraftSession(head, TreeConfig(kind="dynamic", depth=4, top_k=3, total_tokens=12))
    next_tokens = prompt[1:] + [5]
    tree = session.draft(out.features, next_tokens)
    assert session.length == len(prompt)  # the drafted entries were dropped again
    assert len(tree) == 13
    for i in range(1, len(tree)):
        node, path = i, []
        while node > 0:
            path.append(int(tree.tokens[node]))
            node = int(tree.parents[node])
        expected = reference_path_logprob(head, out.features, next_tokens, list(reversed(path)))
        assert tree.logprobs[i].item() == pytest.approx(expected, abs=1e-3)


@torch.no_grad()
def reference_path_logprob(head, target_features, next_tokens, path_tokens) -> float:
    # EAGLE-3 applies fc only to target-width features; applying it up front lets target
    # pairs and the head's own outputs share one sequence.
    feats = head.fc(target_features) if head.kind == "eagle3" else target_features
    ids = list(next_tokens)
    draft_to_target = head.to_target_ids(torch.arange(head.draft_logprobs(feats[:1]).shape[-1]))
    total = 0.0
    for tok in path_tokens:
        hidden = head(feats[None], torch.tensor(ids)[None], torch.arange(len(ids))[None])[0]
        logprobs = head.draft_logprobs(hidden[-1])
        total += float(logprobs[int(torch.nonzero(draft_to_target == tok)[0])])
        feats = torch.cat([feats, hidden[-1:]])
        ids.append(tok)
    return total


@pytest.mark.parametrize("rows,width,k,chunk", [(1, 8192, 10, 1024), (10, 8192, 10, 1024), (7, 3000, 4, 1000),
                                                (3, 64, 8, 16), (2, 100, 5, 30), (4, 32, 20, 16)])
def test_top_k_in_chunks_is_torch_topk(rows, width, k, chunk):
    """Two stages (chunks, then the chunks' best) where the row splits evenly, torch.topk
    where it does not: the same values and, for distinct scores, the same indices."""
    torch.manual_seed(rows * width + k)
    scores = torch.randn(rows, width)
    want = torch.topk(scores, k, dim=-1)
    got = top_k_in_chunks(scores, k, chunk)
    torch.testing.assert_close(got[0], want.values, rtol=0, atol=0)
    torch.testing.assert_close(got[1], want.indices, rtol=0, atol=0)
    # the best of a row in one chunk only: every winner from the same chunk
    scores[:, :k] += 100
    assert top_k_in_chunks(scores, k, chunk)[1].sort(dim=-1).values.tolist() == [list(range(k))] * rows
