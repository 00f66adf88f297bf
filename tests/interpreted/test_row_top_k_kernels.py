"""The top-k kernels (aerie.row_top_k), run on the CPU in Triton's interpreter, against a
stable descending sort: the same values and indices, ties in index order."""

import pytest
import torch

import aerie.row_top_k
from aerie.tree import _stable_top, top_k


def _stable_reference(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


# (rows, width, k): one chunk (the merging kernel alone), a draft vocabulary of 8 chunks, a
# ragged last chunk, a last chunk with fewer than k scores, k as wide as the row.
CASES = [(1, 100, 10), (10, 8192, 10), (3, 3000, 7), (2, 2050, 16), (4, 12, 12), (1, 1, 1)]


@pytest.mark.parametrize("rows,width,k", CASES)
def test_the_kernels_pick_what_a_stable_sort_puts_first(rows, width, k):
    assert aerie.row_top_k.available(torch.zeros(rows, width), k)
    torch.manual_seed(rows * width + k)
    scores = torch.randn(rows, width)
    got = aerie.row_top_k.row_top_k(scores, k)
    want = _stable_reference(scores, k)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    # Ties, -inf scores and a view with a row stride of its own: still the stable sort's.
    tied = torch.randint(0, 3, (rows, width + 5)).float()
    tied[:, ::4] = float("-inf")
    view = tied[:, 5:]
    got = aerie.row_top_k.row_top_k(view, k)
    want = _stable_reference(view, k)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_a_row_mostly_minus_infinity_picks_each_score_once():
    scores = torch.full((2, 2100), float("-inf"))
    scores[0, 2099] = 1.0
    scores[1, 5] = 0.5
    values, indices = aerie.row_top_k.row_top_k(scores, 4)
    assert values[:, 0].tolist() == [1.0, 0.5] and torch.isinf(values[:, 1:]).all()
    assert indices.tolist() == [[2099, 0, 1, 2], [5, 0, 1, 2]]


def test_the_tree_takes_the_kernels_where_they_run():
    """`top_k` and the frontier's choice (`_stable_top`) go through the kernels here, compiled
    functions and all: the values torch.topk gives, the indices a stable sort gives."""
    calls = []
    launch = aerie.row_top_k._launch

    def counting(scores, k):
        calls.append((tuple(scores.shape), k))
        return launch(scores, k)

    aerie.row_top_k._launch = counting
    try:
        torch.manual_seed(0)
        scores = torch.randn(3, 8192)
        values, indices = top_k(scores, 10)
        torch.testing.assert_close(values, torch.topk(scores, 10).values, rtol=0, atol=0)
        cumulative = torch.tensor([0.0, -1.0, 0.0, -0.5, -1.0])
        assert _stable_top(cumulative, 3).tolist() == [0, 2, 3]
        compiled = torch.compile(lambda s: top_k(s, 10), backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(scores)[1], indices, rtol=0, atol=0)
    finally:
        aerie.row_top_k._launch = launch
    assert calls[:2] == [((3, 8192), 10), ((1, 5), 3)] and len(calls) == 3
