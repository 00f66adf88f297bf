"""`--tree-budget auto`: the draft tree's size and depth that maximise tokens per second.

A round commits (accepted + 1) tokens and costs draft(depth) + verify(tree tokens) + round
trip. A bigger tree accepts more but costs more, and where the balance lies depends on the
machine (a GPU verifies 64 tokens for about the price of one, a CPU does not) and on the
prompts (code is easier to guess than prose). So both sides are measured while serving:

- acceptance: every `explore_every`-th round drafts the largest tree (every
  `settled_explore_every`-th once `settle_after` such rounds are logged: an explored round
  costs more than the chosen one, and the estimate needs fewer new samples once it has many;
  every other round during warm-up). Each explored round stands for the rounds between
  explorations, so it is weighted by that interval: otherwise the warm-up's dense
  exploration of its first few answers would outweigh everything served after it.
  Explored rounds start where the tree in use (the frame) starts its rounds, and a deeper
  tree would start fewer rounds in easy text, which it crosses in longer strides. The plain
  mean of what each tree would commit per round therefore overrates deep trees (by 4 to 12%
  on MT-bench, H100, 2026-12-07). Weighting each explored round by the tokens the frame's
  round commits there samples text positions instead of round starts: a tree's tokens per
  round is then the tokens those rounds cover over the rounds it would take to cover them
  (`TreeBudget.expected_tokens`).
  Because a dynamic tree of N nodes and depth d is exactly the N best-scoring candidates of
  depth <= d among what the drafter expanded (the expansion of each level does not depend on
  N or on deeper levels), such a round tells what every smaller tree would have accepted:
  the accepted path's nodes that make that cut (`accepted_if`, `acceptance_table`). Under
  greedy acceptance this is exact; under sampling it is the same estimate, with the path the
  sampler chose.
- cost: the measured verify time of each tree-size bucket (the verifier runs padded buckets,
  so cost is a step function of size) and the measured draft time per depth, plus the round
  trip for a networked verifier and the round's host work outside both (the decoding loop,
  this module's own bookkeeping, the caller's handling of each round's tokens). Warm-up runs
  every candidate (N, d) (`TreeBudget.pairs`); the first round of each captures its CUDA graphs
  and is not taken as a measurement.

The choice is then the candidate (N, d) with the most expected tokens per round over its cost.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from aerie.graphs import bucket_for
from aerie.tree import DraftTree, TreeConfig


@dataclass(frozen=True)
class ExploredRound:
    """One round drafted with the largest tree: every candidate's path score and depth, and
    the accepted path's (root excluded) scores and depths, root to leaf."""

    scores: torch.Tensor  # float64 [m]
    depths: torch.Tensor  # int64 [m]
    path_scores: tuple[float, ...]
    path_depths: tuple[int, ...]


def accepted_if(round_: ExploredRound, total_tokens: int, depth: int) -> int:
    """Draft tokens the round would have accepted with a tree of the `total_tokens` best
    candidates of depth <= `depth`: the leading accepted nodes that make that cut."""
    eligible = round_.scores[round_.depths <= depth]
    cutoff = -math.inf
    if eligible.numel() > total_tokens:
        cutoff = float(torch.topk(eligible, total_tokens).values[-1])
    accepted = 0
    for score, d in zip(round_.path_scores, round_.path_depths):
        if d > depth or score < cutoff:
            break
        accepted += 1
    return accepted


def acceptance_table(round_: ExploredRound, sizes: list[int], max_depth: int) -> torch.Tensor:
    """`accepted_if` of the round for every size in `sizes` and every depth 1..max_depth at
    once: [len(sizes), max_depth] float64. A path node makes the cut of (n, d) when its depth
    is at most d and fewer than n candidates of depth <= d score above it."""
    table = torch.zeros(len(sizes), max_depth, dtype=torch.float64)
    if not round_.path_scores:
        return table
    path_scores = torch.tensor(round_.path_scores, dtype=torch.float64)
    path_depths = torch.tensor(round_.path_depths)
    above = (round_.scores[None, :] > path_scores[:, None]).double()  # [path, candidates]
    by_depth = torch.nn.functional.one_hot(round_.depths - 1, max_depth).double()  # [candidates, depth]
    rank = (above @ by_depth).cumsum(dim=1)  # [path, depth]: candidates of depth <= d above each node
    n = torch.tensor(sizes, dtype=torch.float64)
    depth = torch.arange(1, max_depth + 1)
    in_cut = (rank[:, None, :] < n[None, :, None]) & (path_depths[:, None, None] <= depth[None, None, :])
    return in_cut.long().cumprod(dim=0).sum(dim=0).double()


def explored_round(tree: DraftTree, candidates: tuple[torch.Tensor, torch.Tensor],
                   accepted_tokens: list[int]) -> ExploredRound:
    """The `ExploredRound` of a split round: the drafter's candidates (scores, depths), and
    the tree nodes that the accepted draft tokens followed."""
    path = path_nodes(tree, accepted_tokens)
    depths = tree.depths
    return ExploredRound(scores=candidates[0].double(), depths=candidates[1],
                         path_scores=tuple(float(tree.logprobs[i]) for i in path),
                         path_depths=tuple(int(depths[i]) for i in path))


def path_nodes(tree: DraftTree, accepted_tokens: list[int]) -> list[int]:
    """The tree nodes (root excluded) that the verifier accepted, found by following the
    accepted tokens down from the root (siblings never repeat a token)."""
    parents = tree.parents.tolist()
    tokens = tree.tokens.tolist()
    node, path = 0, []
    for token in accepted_tokens:
        child = next((c for c in range(1, len(tokens)) if parents[c] == node and tokens[c] == token), None)
        if child is None:
            break
        path.append(child)
        node = child
    return path


@dataclass
class CostModel:
    """Measured costs in ms: verify per bucket of tree tokens, draft per depth, round trip.

    Rounds run whole on the device (aerie.device_round) are timed as one: `whole_ms` holds
    their time per (bucket, depth), and a pair not measured is estimated as additive in the
    two, from `reference_depth` (where every bucket is measured) and any bucket measured at
    both depths."""

    verify_ms: dict[int, float] = field(default_factory=dict)
    draft_ms: dict[int, float] = field(default_factory=dict)
    whole_ms: dict[tuple[int, int], float] = field(default_factory=dict)
    reference_depth: int | None = None
    rtt_ms: float = 0.0
    host_ms: float = 0.0  # the round's work outside drafting, verifying and the round trip
    smoothing: float = 0.2  # weight of a new measurement in the running means
    # Buckets and depths run once: their first round captured CUDA graphs (tens of ms), so
    # it is not a measurement. Recorded, a size would look too dear ever to be tried again.
    _seen: set = field(default_factory=set)
    _samples: dict = field(default_factory=dict)  # measurements taken of each cost
    _bucket_at_depth: dict[int, int] = field(default_factory=dict)  # a bucket measured whole at each depth

    def observe(self, bucket: int, depth: int, verify_ms: float, draft_ms: float, rtt_ms: float = 0.0,
                host_ms: float | None = None) -> None:
        if ("verify", bucket) in self._seen:
            self.verify_ms[bucket] = self._mean(("verify", bucket), self.verify_ms.get(bucket), verify_ms)
        if ("draft", depth) in self._seen:
            self.draft_ms[depth] = self._mean(("draft", depth), self.draft_ms.get(depth), draft_ms)
        self._seen |= {("verify", bucket), ("draft", depth)}
        self.rtt_ms = self._mean("rtt", self.rtt_ms, rtt_ms)
        if host_ms is not None:
            self.host_ms = self._mean("host", self.host_ms, host_ms)

    def _mean(self, key, old: float | None, new: float) -> float:
        """The running mean of `key`'s measurements: plain over the first 1 / smoothing of
        them, exponential after. A cost measured in warm-up only (a tree the choice never
        runs) rests on those first few: one round's jitter alone could price it out for good."""
        n = self._samples[key] = self._samples.get(key, 0) + 1
        return new if old is None or n == 1 else old + max(self.smoothing, 1 / n) * (new - old)

    def observe_whole(self, bucket: int, depth: int, round_ms: float, host_ms: float | None = None) -> None:
        """A round drafted and verified as one (its first at each shape captured graphs and
        does not count)."""
        key = ("whole", bucket, depth)
        if key in self._seen:
            self.whole_ms[(bucket, depth)] = self._mean(key, self.whole_ms.get((bucket, depth)), round_ms)
            self._bucket_at_depth[depth] = bucket
        self._seen.add(key)
        if host_ms is not None:
            self.host_ms = self._mean("host", self.host_ms, host_ms)

    def measured(self, bucket: int) -> bool:
        return bucket in self.verify_ms or (bucket, self.reference_depth) in self.whole_ms

    def whole(self, bucket: int, depth: int) -> float:
        """A whole round's time at (bucket, depth): measured, or the reference depth's at this
        bucket plus the difference the depth makes at a bucket measured at both; infinite
        where neither is known."""
        if (bucket, depth) in self.whole_ms:
            return self.whole_ms[(bucket, depth)]
        reference, other = self.reference_depth, self._bucket_at_depth.get(depth)
        known = (bucket, reference), (other, depth), (other, reference)
        if other is None or not all(k in self.whole_ms for k in known):
            return math.inf
        return self.whole_ms[known[0]] + self.whole_ms[known[1]] - self.whole_ms[known[2]]

    def draft(self, depth: int) -> float:
        """Measured, or scaled from the nearest measured depth (0 before any): a round runs
        one head forward to commit and one per level below the first."""
        if depth in self.draft_ms:
            return self.draft_ms[depth]
        if not self.draft_ms:
            return 0.0
        near = min(self.draft_ms, key=lambda d: abs(d - depth))
        return self.draft_ms[near] * depth / near

    def round_ms(self, bucket: int, depth: int) -> float:
        if self.whole_ms:
            return self.whole(bucket, depth) + self.rtt_ms + self.host_ms
        return self.draft(depth) + self.verify_ms[bucket] + self.rtt_ms + self.host_ms


class TreeBudget:
    """Chooses the next round's tree. `largest` is the explored tree (its depth, top-k and
    size bound the choice); `largest_graph` is the verifier's largest graphed forward."""

    def __init__(self, largest: TreeConfig, largest_graph: int = 128, explore_every: int = 8, window: int = 512,
                 settle_after: int = 64, settled_explore_every: int = 32, warmup_measurements: int = 4):
        if largest.kind != "dynamic":
            raise ValueError("--tree-budget auto needs the dynamic tree")
        self.largest = largest
        self.largest_graph = largest_graph
        self.explore_every = explore_every
        self.settle_after = settle_after
        self.settled_explore_every = settled_explore_every
        self.log: deque[ExploredRound] = deque(maxlen=window)
        # For each logged round, computed once when it is logged (the choice then costs a
        # division, not a replay of the log): its weight (rounds it stands for) times the
        # tokens its frame's round commits, and that over the tokens each (size, depth)
        # candidate's round would commit ([sizes, depths]).
        self._terms: deque[tuple[float, torch.Tensor]] = deque(maxlen=window)
        self._covered = 0.0  # sum of the first: tokens the logged rounds stand for
        self._rounds_for: torch.Tensor | None = None  # sum of the second: rounds each candidate takes for them
        self._frame: tuple[int, int] | None = None  # (size, depth) of the last tree chosen
        self.costs = CostModel(reference_depth=largest.depth)
        self.rounds = 0
        # Tree sizes that fill a verify bucket exactly (root included), up to the largest.
        self.sizes = sorted({min(b, largest.total_tokens + 1) - 1 for b in _powers(2, largest_graph)} - {0})
        # Warm-up visits every (size, depth) the choice can pick: the first round of each
        # captures its graphs (a round whole on the device is one graph per pair) and does not
        # count (CostModel); the next `warmup_measurements` measure it. A pair left out would
        # capture in the middle of serving whenever the choice first moved there (0.5 to 0.7 s
        # on an H100 or H200, 2026-12-07), and be priced by an estimate, not measured.
        pairs = [(n, d) for n, d in self.pairs() if (n, d) != (largest.total_tokens, largest.depth)]
        self._warmup = pairs * (1 + warmup_measurements)

    def pairs(self) -> list[tuple[int, int]]:
        """Every (total_tokens, depth) the choice weighs: each size with each depth up to the
        largest at which a tree of that size exists. A tree of n nodes is at most n deep, and
        d levels draft at most top_k + (d - 1) top_k^2 candidates (top_k children for each of
        top_k frontier nodes below the first level)."""
        k = self.largest.top_k
        return [(n, d) for n in self.sizes for d in range(1, self.largest.depth + 1)
                if d <= n <= k + (d - 1) * k * k]

    @property
    def warmup_rounds(self) -> int:
        """Rounds until every size and depth is measured (explored rounds come between)."""
        return 2 * len(self._warmup)

    def next_tree(self) -> TreeConfig:
        self.rounds += 1
        if self._warmup and self.rounds % 2 == 0:  # measure each size's cost once, between explorations
            return self._tree(*self._warmup.pop())
        if not self.log or self.rounds % self.explore_interval == 1 or self._warmup:
            return self.largest
        n, d = self._frame = self.choice()
        return self._tree(n, d)

    @property
    def explore_interval(self) -> int:
        """Rounds from one explored round to the next, as of now."""
        if self._warmup:
            return 2
        return self.settled_explore_every if len(self.log) >= self.settle_after else self.explore_every

    def observe(self, tree_config: TreeConfig, nodes: int, draft_ms: float, verify_ms: float, rtt_ms: float = 0.0,
                host_ms: float | None = None) -> None:
        """Record a finished round's costs: a tree of `nodes` nodes (root included) drafted
        and verified apart; `host_ms` the time from the previous round's end to this one's
        start (None for a generation's first round). Rounds drafted with the largest tree
        also give their `add_explored`."""
        self.costs.observe(self._bucket(nodes), tree_config.depth, verify_ms, draft_ms, rtt_ms, host_ms)

    def observe_whole(self, tree_config: TreeConfig, nodes: int, round_ms: float, host_ms: float | None = None) -> None:
        """`observe` for a round drafted and verified as one (aerie.device_round)."""
        self.costs.observe_whole(self._bucket(nodes), tree_config.depth, round_ms, host_ms)

    def _bucket(self, nodes: int) -> int:
        return bucket_for(nodes, self.largest_graph) or nodes

    def add_explored(self, round_: ExploredRound, weight: float | None = None,
                     frame: tuple[int, int] | None = None) -> None:
        """Log an explored round. `weight`: the rounds it stands for, by default the
        exploration interval; 1 for a round drafted at the largest tree for another reason
        (a generation's first round), which stands for itself only. `frame`: the (size,
        depth) of the tree whose rounds it stands for, by default the last one chosen (the
        largest before any)."""
        weight = float(self.explore_interval if weight is None else weight)
        frame = frame or self._frame or (self.largest.total_tokens, self.largest.depth)
        covered = weight * (accepted_if(round_, *frame) + 1)
        rounds_for = covered / (acceptance_table(round_, self.sizes, self.largest.depth) + 1)
        if len(self._terms) == self._terms.maxlen:
            oldest = self._terms[0]
            self._covered -= oldest[0]
            self._rounds_for -= oldest[1]
        self.log.append(round_)
        self._terms.append((covered, rounds_for))
        self._covered += covered
        self._rounds_for = rounds_for if self._rounds_for is None else self._rounds_for + rounds_for

    def expected_tokens(self, total_tokens: int, depth: int) -> float:
        """The tokens a round of this tree would commit, on average over the text the logged
        rounds stand for: those tokens over the rounds this tree would take for them."""
        if not self.log:
            return 1.0
        if total_tokens in self.sizes and 1 <= depth <= self.largest.depth:
            return self._covered / float(self._rounds_for[self.sizes.index(total_tokens), depth - 1])
        rounds_for = 0.0
        for round_, (covered, _) in zip(self.log, self._terms):
            rounds_for += covered / (accepted_if(round_, total_tokens, depth) + 1)
        return self._covered / rounds_for

    def expected_accepted(self, total_tokens: int, depth: int) -> float:
        """`expected_tokens` less the bonus token: the draft tokens a round accepts."""
        return self.expected_tokens(total_tokens, depth) - 1

    def choice(self) -> tuple[int, int]:
        """The (total_tokens, depth) with the most expected tokens per ms, among measured sizes."""
        best, best_rate = (self.largest.total_tokens, self.largest.depth), -1.0
        for n, d, tokens, ms in self._candidates():
            if tokens / ms > best_rate:
                best, best_rate = (n, d), tokens / ms
        return best

    def _candidates(self) -> Iterator[tuple[int, int, float, float]]:
        """(total_tokens, depth, expected tokens per round, round ms) of every measured size."""
        if not self._terms:
            return
        # Plain floats: this runs every round, and 50-odd tensor reads cost more than the rest.
        tokens = dict(zip(self.sizes, (self._covered / self._rounds_for).tolist()))
        for n, d in self.pairs():
            bucket = self._bucket(n + 1)
            if self.costs.measured(bucket):
                yield n, d, tokens[n][d - 1], self.costs.round_ms(bucket, d)

    def report(self, top: int = 8) -> dict:
        """What the choice rests on now: the choice, the rounds explored, and the `top`
        candidates by expected tokens per ms (expected tokens per round, round ms)."""
        rows = [{"total_tokens": n, "depth": d, "expected_tokens": tokens, "round_ms": ms, "tokens_per_ms": tokens / ms}
                for n, d, tokens, ms in self._candidates() if math.isfinite(ms)]
        rows.sort(key=lambda r: -r["tokens_per_ms"])
        n, d = self.choice()
        return {"choice": {"total_tokens": n, "depth": d}, "explored_rounds": len(self.log), "candidates": rows[:top]}

    def _tree(self, total_tokens: int, depth: int) -> TreeConfig:
        return TreeConfig("dynamic", depth, self.largest.top_k, total_tokens)


def _powers(start: int, end: int) -> list[int]:
    out, b = [], start
    while b <= end:
        out.append(b)
        b *= 2
    return out


def auto_engine(stack):
    """An engine whose tree is chosen by a `TreeBudget`, exploring up to the depth and top-k
    of the stack's tree or the device's default, whichever is larger (a head's own tree is
    the best fixed one where it was measured; the budget measures for itself), and up to
    the verifier's largest graphed forward."""
    from aerie.engine import Engine  # the engine takes a TreeBudget: import here, not at the top
    from aerie.stack import default_tree

    largest_graph = stack.target.static.largest_graph if stack.target.static else 128
    bound = default_tree(stack.target.device.type)
    largest = TreeConfig("dynamic", max(stack.tree.depth, bound.depth), max(stack.tree.top_k, bound.top_k),
                         largest_graph - 1)
    budget = TreeBudget(largest, largest_graph=largest_graph)
    return Engine(stack.target, stack.head, largest, max_tree_nodes=largest_graph, budget=budget)
