"""The in-process speculative loop (single-node mode) and plain decoding beside it.

One round: the drafter commits the features the verifier returned and drafts a tree; the
verifier runs the target once over the tree, accepts a path plus a bonus token, and returns
the features of what it accepted. The services run exactly these two sessions, split over
the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch.profiler import record_function

from aerie.budget import TreeBudget, explored_round
from aerie.device_round import DeviceRounds, PlainSteps
from aerie.drafter import DraftSession, precompile_head
from aerie.graphs import GraphCache
from aerie.heads import DraftHead
from aerie.sampling import SamplingParams
from aerie.target import Target
from aerie.tree import DraftTree, TreeConfig
from aerie.verifier import StopCriteria, VerifySession

Mode = Literal["eagle", "vanilla"]


class Drafter(Protocol):
    """Anything that, given the pairs the verifier just committed, proposes the next tree."""

    def draft(self, features: torch.Tensor, next_tokens: list[int]) -> DraftTree: ...


@dataclass
class RoundStats:
    tree_size: int  # draft nodes, root excluded
    accepted: int  # draft tokens accepted
    committed: int  # tokens emitted this round (bonus included, after stop cuts)
    draft_s: float
    verify_s: float  # a device round is one graph: all its time is here, and draft_s is 0


@dataclass
class GenerationResult:
    token_ids: list[int]
    seconds: float
    rounds: list[RoundStats] = field(default_factory=list)
    prefill_s: float = 0.0

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward after prefill (bonus token included)."""
        if not self.rounds:
            return 1.0
        return sum(r.accepted + 1 for r in self.rounds) / len(self.rounds)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def acceptance_histogram(self) -> dict[int, int]:
        hist: dict[int, int] = {}
        for r in self.rounds:
            hist[r.accepted] = hist.get(r.accepted, 0) + 1
        return dict(sorted(hist.items()))


class Engine:
    """A target and (optionally) a draft head in one process."""

    def __init__(
        self,
        target: Target,
        head: DraftHead | None,
        tree: TreeConfig,
        max_tree_nodes: int = 128,
        make_drafter: Callable[[], Drafter] | None = None,
        budget: TreeBudget | None = None,
        device_rounds: bool = True,
    ):
        """`budget` (for `--tree-budget auto`) picks each round's tree instead of `tree`,
        learning across generations; it needs a drafter with `candidates()`. `device_rounds`
        runs the rounds of a dynamic tree on static caches, greedy or sampled, whole on the
        device and one ahead of the host (aerie.device_round), from the second round of each
        generation on; and plain decoding on a static cache likewise."""
        if head is not None and head.feature_spec != target.features:
            raise ValueError(f"target exposes {target.features} but the head reads {head.feature_spec}")
        self.target = target
        self.head = head
        self.tree = tree
        self.max_tree_nodes = max_tree_nodes
        self.budget = budget
        self.device_rounds = device_rounds
        self.make_drafter = make_drafter or (lambda: DraftSession(self._require_head(), self.tree))

    def precompile(self) -> None:
        """Compile every shape family of the compiled forwards (aerie.fused.Compiled) now,
        the target's and the head's: minutes on a GPU that the first requests, or a
        benchmark's timed runs, would pay otherwise."""
        self.target.precompile()
        if self.head is not None:
            precompile_head(self.head, self.tree)
            if self.device_rounds and self.target.static is not None and self.target.compiled is not None:
                # A device round's compiled pieces (aerie.device_round), through short
                # generations, greedy and sampled (their acceptances are pieces of their own):
                # a first round to commit the prompt, then rounds on the device. Without the
                # budget, which would learn from them.
                scratch = Engine(self.target, self.head, self.tree, max_tree_nodes=self.max_tree_nodes)
                for params in (SamplingParams(), SamplingParams(temperature=1.0)):
                    scratch.generate([0, 0], params, StopCriteria(3 * (self.tree.depth + 1)))

    def _require_head(self) -> DraftHead:
        if self.head is None:
            raise ValueError("eagle mode needs a draft head")
        return self.head

    def session(
        self, prompt_ids: list[int], params: SamplingParams, stop: StopCriteria, resume_tokens: list[int] = ()
    ) -> VerifySession:
        return VerifySession(
            self.target, params, stop, list(prompt_ids), max_tree_nodes=self.max_tree_nodes,
            resume_tokens=list(resume_tokens),
        )

    def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stop: StopCriteria,
        mode: Mode = "eagle",
        resume_tokens: list[int] = (),
    ) -> Iterator[tuple[list[int], RoundStats | None]]:
        """Yield the tokens committed by each target forward, with the round's statistics.

        `resume_tokens` continues an earlier run from the round boundary after them: only
        the tokens that follow are yielded, and they are the ones the earlier run produced.
        """
        verifier = self.session(prompt_ids, params, stop, resume_tokens)
        try:
            yield from self._rounds(verifier, prompt_ids, mode, resume_tokens)
        finally:
            verifier.close()

    def _rounds(
        self, verifier: VerifySession, prompt_ids: list[int], mode: Mode, resume_tokens: list[int]
    ) -> Iterator[tuple[list[int], RoundStats | None]]:
        features, first = verifier.prefill()
        yield ([] if resume_tokens else [first]), None
        if mode == "vanilla" and self.device_rounds and PlainSteps.supports(verifier) and not verifier.done:
            yield from self._plain_on_device(PlainSteps(verifier))
            return
        if mode == "vanilla":
            while not verifier.done:
                before = len(verifier.generated)
                t0 = time.perf_counter()
                verifier.step_plain()
                yield verifier.generated[before:], RoundStats(0, 0, len(verifier.generated) - before, 0.0, time.perf_counter() - t0)
            return
        drafter = self.make_drafter()
        try:
            yield from self._speculate(verifier, drafter, features, (list(prompt_ids) + verifier.generated)[1:])
        finally:
            if hasattr(drafter, "close"):
                drafter.close()

    def _speculate(
        self, verifier: VerifySession, drafter: Drafter, features: torch.Tensor, next_tokens: list[int],
    ) -> Iterator[tuple[list[int], RoundStats]]:
        """Split rounds (the drafter's tree, then the verifier), until the rounds can run on
        the device: from the second on (the first commits the whole prompt)."""
        budget = self.budget
        last_end = None  # when the previous round's verify returned
        while not verifier.done:
            forced = self.device_rounds and last_end is None
            if budget is not None:
                # A generation's first round runs split (device rounds start at the second):
                # at the largest tree, whose split graphs the first generation captured,
                # rather than at a choice whose graphs might be captured in the middle of serving.
                drafter.tree = budget.largest if forced else budget.next_tree()
            explored = budget is not None and drafter.tree == budget.largest
            captures = GraphCache.total_captures
            t0 = time.perf_counter()
            with record_function("aerie.draft"):  # named spans for `aerie profile`
                tree = drafter.draft(features, next_tokens)
            t1 = time.perf_counter()
            with record_function("aerie.verify"):
                result = verifier.verify(tree)
            t2 = time.perf_counter()
            if budget is not None:
                # A round that captured a graph (a tree shape new to a grown cache, say) took
                # hundreds of ms: no measure of what the shape costs.
                if GraphCache.total_captures == captures:
                    budget.observe(drafter.tree, len(tree), draft_ms=1e3 * (t1 - t0), verify_ms=1e3 * (t2 - t1),
                                   host_ms=None if last_end is None else 1e3 * (t0 - last_end))
                if explored:
                    # A forced first round was not drawn by exploring: it stands for itself.
                    budget.add_explored(explored_round(tree, drafter.candidates(),
                                                       result.new_tokens[: result.accepted_draft]),
                                        weight=1 if forced else None)
            last_end = t2
            # The tokens paired with the returned features: the accepted path (any branch of
            # the tree, not its first nodes) and the bonus token. Only a round that ends
            # generation is cut short, and nothing is drafted after it.
            features, next_tokens = result.features, list(result.new_tokens)
            yield result.new_tokens, RoundStats(len(tree) - 1, result.accepted_draft, len(result.new_tokens),
                                                t1 - t0, t2 - t1)
            if self.device_rounds and not verifier.done and DeviceRounds.supports(verifier, drafter):
                deepest = budget.largest.depth if budget else None
                yield from self._on_device(DeviceRounds(verifier, drafter, deepest=deepest), features, next_tokens)
                return

    def _on_device(
        self, rounds: DeviceRounds, features: torch.Tensor, next_tokens: list[int],
    ) -> Iterator[tuple[list[int], RoundStats]]:
        """Rounds whole on the device, one ahead of the host: round n + 1 is queued, chained
        to round n's outputs on the device, before the host reads round n. The GPU then never
        waits while the host reads, emits and chooses the next tree; a round launched past
        the end of generation (a stop token) is dropped unread."""
        budget, verifier, drafter = self.budget, rounds.verifier, rounds.drafter
        rounds.reserve(len(verifier.prompt_ids), verifier.stop.max_new_tokens, budget.largest if budget else None)

        def launch(*pairs) -> None:
            if budget is not None:
                drafter.tree = budget.next_tree()
            with record_function("aerie.round"):
                rounds.launch(*pairs, explore=budget is not None and drafter.tree == budget.largest)

        captures, last = GraphCache.total_captures, time.perf_counter()
        try:
            while True:
                if not rounds.in_flight:
                    launch(features, next_tokens)
                if verifier.stop.max_new_tokens - len(verifier.generated) > 1:  # the round in flight may not end it
                    launch()
                result, tree = rounds.collect()
                now = time.perf_counter()
                nodes = rounds.nodes(tree)
                if budget is not None:
                    # From one collect to the next: with the GPU kept busy, the round's own time.
                    if GraphCache.total_captures == captures:
                        budget.observe_whole(tree, nodes, 1e3 * (now - last))
                    if rounds.collected_explored:  # what was accepted and kept, as after a split round
                        budget.add_explored(rounds.explored(len(result.new_tokens[: result.accepted_draft])))
                yield result.new_tokens, RoundStats(nodes - 1, result.accepted_draft, len(result.new_tokens), 0.0,
                                                    now - last)
                if verifier.done:
                    return
                captures, last = GraphCache.total_captures, now
                features, next_tokens = result.features, list(result.new_tokens)
        finally:
            rounds.discard()

    @staticmethod
    def _plain_on_device(steps: PlainSteps) -> Iterator[tuple[list[int], RoundStats]]:
        """Plain decoding one step ahead of the host, as `_on_device` runs the rounds."""
        verifier = steps.verifier
        steps.reserve(len(verifier.prompt_ids), verifier.stop.max_new_tokens)
        last = time.perf_counter()
        try:
            while True:
                if not steps.in_flight:
                    steps.launch()
                if verifier.stop.max_new_tokens - len(verifier.generated) > 1:  # the step in flight may not end it
                    steps.launch()
                tokens = steps.collect()
                now = time.perf_counter()
                yield tokens, RoundStats(0, 0, len(tokens), 0.0, now - last)
                if verifier.done:
                    return
                last = now
        finally:
            steps.discard()

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stop: StopCriteria,
        mode: Mode = "eagle",
        resume_tokens: list[int] = (),
    ) -> GenerationResult:
        t0 = time.perf_counter()
        tokens: list[int] = []
        rounds: list[RoundStats] = []
        prefill_s = 0.0
        for new, stats in self.stream(prompt_ids, params, stop, mode, resume_tokens):
            tokens += new
            if stats is None:
                prefill_s = time.perf_counter() - t0
            else:
                rounds.append(stats)
        return GenerationResult(token_ids=tokens, seconds=time.perf_counter() - t0, rounds=rounds, prefill_s=prefill_s)
