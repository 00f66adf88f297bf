"""Continuous batching: many generations, up to `concurrency` at a time, each round one draft
pass and one verify forward for every session in flight (or one plain forward, vanilla).

Sessions join between rounds (prefilled together, in one forward) as soon as a row is free,
and leave as soon as they finish; every session's output is the one it would have had alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from aerie.batch.cache import BatchKVCache
from aerie.batch.draft import BatchDrafter
from aerie.batch.verify import BatchVerifier, NewSession
from aerie.engine import Mode
from aerie.errors import InputError
from aerie.graphs import bucket_for
from aerie.heads import DraftHead
from aerie.sampling import SamplingParams
from aerie.target import Target
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria


@dataclass(frozen=True)
class BatchConfig:
    largest_graph: int = 128  # widest forward replayed as a CUDA graph; wider ones run eagerly
    cuda_graphs: bool = True
    max_tree_nodes: int = 128
    capacity_multiple: int = 64  # KV rows are sized to the longest generation, rounded up to this
    prefill_tokens: int = 8192  # sessions joining together are prefilled in forwards of about this many (padded) tokens
    prefill_graph_tokens: int = 512  # prefills up to this many padded tokens replay CUDA graphs
    # Sessions join once this many rows are free (or the rest of the queue fits): each join
    # is a prefill forward (eager past prefill_graph_tokens), which can cost more than a few
    # rows left idle for a few graphed steps.
    join_rows: int = 1


@dataclass
class SessionResult:
    token_ids: list[int]
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted, per round
    seconds: float = 0.0  # from joining the batch to leaving it

    @property
    def tau(self) -> float:
        """Tokens committed per target forward after prefill (bonus included), as
        GenerationResult.tau."""
        return sum(a + 1 for a in self.accepted) / len(self.accepted) if self.accepted else 1.0


@dataclass
class BatchRun:
    results: list[SessionResult | None]  # in prompt order; None for a prompt never admitted (see generate_many)
    seconds: float
    forwards: int  # target forwards after prefill (rounds)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def new_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.results if r is not None)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tau(self) -> float:
        rounds = [a for r in self.results if r is not None for a in r.accepted]
        return sum(a + 1 for a in rounds) / len(rounds) if rounds else 1.0


@dataclass
class _Live:
    index: int  # the prompt's position
    result: SessionResult
    started: float
    features: torch.Tensor | None = None  # pairs for the drafter to commit next round
    next_tokens: list[int] = field(default_factory=list)


class BatchEngine:
    """A target and (for eagle) a draft head, generating for many prompts at once."""

    def __init__(self, target: Target, head: DraftHead | None, tree: TreeConfig, config: BatchConfig = BatchConfig()):
        if head is not None and head.feature_spec != target.features:
            raise ValueError(f"target exposes {target.features} but the head reads {head.feature_spec}")
        self.target, self.head, self.tree, self.config = target, head, tree, config
        self._caches: dict[str, BatchKVCache] = {}  # kept across calls, with their graphs

    def _cache(self, name: str, layers: int, rows: int, capacity: int) -> BatchKVCache:
        cache = self._caches.get(name)
        if cache is None or cache.rows < rows:
            device = self.target.device
            cache = BatchKVCache(layers, rows, capacity, device, self.config.cuda_graphs)
            self._caches[name] = cache
        cache.reserve(capacity)
        while cache.in_use:
            cache.remove_row(cache.in_use - 1)
        return cache

    @property
    def graph_captures(self) -> int:
        """CUDA graphs captured so far by the caches in use (each recapture counted)."""
        return sum(cache.graphs.captures for cache in self._caches.values())

    def reserve(self, max_prompt_tokens: int, max_new_tokens: int, concurrency: int, mode: Mode = "eagle") -> None:
        """Size the KV caches for `concurrency` sessions of up to these lengths before the
        first generation, and capture the graph of every prefill that sessions joining such a
        run can make: a cache that grows later (a longer prompt, more new tokens) drops every
        graph captured over it, and a graph captured mid-run costs that run its capture."""
        target_cache, head_cache = self._caches_for(max_prompt_tokens, max_new_tokens, concurrency, mode)
        if not target_cache.graphs.enabled:
            return
        cfg = self.config
        model = self.target.batch_model(target_cache, cfg.largest_graph, cfg.prefill_graph_tokens)
        drafter = None
        if head_cache is not None:
            drafter = BatchDrafter(self.head, self.tree, head_cache, cfg.largest_graph, cfg.prefill_graph_tokens)
            feature_dim = self.target.features.dim(self.target.hidden_size)
        shapes = {model.prefill_shape(batch, width)
                  for batch in _powers_of_two(concurrency) for width in _powers_of_two(max_prompt_tokens)}
        for batch, width, graphed in sorted(shapes):
            if not graphed:
                continue
            model.prefill([[0] * width] * batch)
            if drafter is not None:  # the head's join of the same sessions has the same shape
                features = torch.zeros(width, feature_dim, dtype=drafter.dtype, device=drafter.device)
                drafter.join([features] * batch, [[0] * width] * batch)
            for row in range(batch - 1, -1, -1):
                model.remove_row(row)
                if drafter is not None:
                    drafter.leave(row)

    def _caches_for(
        self, max_prompt_tokens: int, max_new_tokens: int, concurrency: int, mode: Mode
    ) -> tuple[BatchKVCache, BatchKVCache | None]:
        """The target's and (eagle) the head's caches, with room for every row's prompt, its
        new tokens and a drafted tree beyond them."""
        rows = bucket_for(concurrency, 1 << 30)
        tree_width = max(self.tree.total_tokens + 1, self.tree.depth * max(self.tree.top_k, self.tree.total_tokens))
        m = self.config.capacity_multiple
        capacity = -(-(max_prompt_tokens + max_new_tokens + tree_width + 1) // m) * m
        target = self._cache("target", self.target.config.num_hidden_layers, rows, capacity)
        head = self._cache("head", 1, rows, capacity) if mode == "eagle" else None
        return target, head

    def generate_many(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        stop: StopCriteria,
        mode: Mode = "eagle",
        concurrency: int = 16,
        on_tokens: Callable[[int], None] | None = None,
        on_result: Callable[[int, SessionResult], None] | None = None,
        admit: Callable[[], bool] | None = None,
    ) -> BatchRun:
        """Generate for every prompt, `concurrency` sessions at a time. `params` is one
        setting for all or one per prompt; `on_tokens(n)` is told of each round's new tokens
        (progress bars), and `on_result(i, result)` of prompt i's result as soon as its
        session leaves. `admit()` is asked before sessions join: while it is false none do,
        and once the batch is empty the prompts never admitted are left out (None results)."""
        if mode not in ("eagle", "vanilla"):
            raise InputError(f"unknown mode {mode!r}: use eagle or vanilla")
        if mode == "eagle" and self.head is None:
            raise InputError("eagle mode needs a draft head")
        if concurrency < 1:
            raise InputError(f"concurrency must be >= 1, got {concurrency}")
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise InputError(f"got {len(per_prompt)} sampling settings for {len(prompts)} prompts")
        if not prompts:
            return BatchRun([], 0.0, 0)
        cfg = self.config
        target_cache, head_cache = self._caches_for(max(len(p) for p in prompts), stop.max_new_tokens, concurrency, mode)
        verifier = BatchVerifier(self.target, target_cache, cfg.largest_graph, cfg.max_tree_nodes,
                                 cfg.prefill_graph_tokens)
        drafter = None
        if mode == "eagle":
            drafter = BatchDrafter(self.head, self.tree, head_cache, cfg.largest_graph, cfg.prefill_graph_tokens)

        results: list[SessionResult | None] = [None] * len(prompts)
        queue = deque(range(len(prompts)))
        live: list[_Live] = []
        run = BatchRun([], 0.0, 0)
        sync = _syncer(self.target.device)
        t_start = time.perf_counter()
        while queue or live:
            joins = bool(queue) and concurrency - len(live) >= min(cfg.join_rows, len(queue), concurrency)
            if joins and (admit is None or admit()):
                t0 = time.perf_counter()
                self._join(verifier, drafter, prompts, per_prompt, stop, queue, live, concurrency, on_tokens,
                           cfg.prefill_tokens)
                sync()
                run.prefill_s += time.perf_counter() - t0
            elif not live:
                break  # nothing runs and nothing may join
            else:
                t0 = time.perf_counter()
                if drafter is None:
                    verifier.step_plain()
                    new = [1] * len(live)
                    run.verify_s += time.perf_counter() - t0
                else:
                    trees = drafter.draft([s.features for s in live], [s.next_tokens for s in live])
                    t1 = time.perf_counter()
                    outcome = verifier.verify(trees)
                    run.draft_s += t1 - t0
                    run.verify_s += time.perf_counter() - t1
                    new = []
                    for s, res in zip(live, outcome):
                        s.result.accepted.append(res.accepted_draft)
                        s.features, s.next_tokens = res.features, list(res.new_tokens)
                        new.append(len(res.new_tokens))
                run.forwards += 1
                if on_tokens is not None:
                    on_tokens(sum(new))
            self._leave(verifier, drafter, live, results, on_result)
        sync()
        run.seconds = time.perf_counter() - t_start
        run.results = results
        return run

    @staticmethod
    def _join(verifier, drafter, prompts, per_prompt, stop, queue, live, concurrency, on_tokens, budget) -> None:
        """Sessions from the queue join while rows are free, as many per prefill forward as fit
        `budget` padded tokens (the forward keeps every layer's hidden states: its memory
        grows with sessions x longest prompt)."""
        joining: list[int] = []
        longest = 0
        while queue and len(live) + len(joining) < concurrency:
            n = len(prompts[queue[0]])
            if joining and (len(joining) + 1) * max(longest, n) > budget:
                break
            longest = max(longest, n)
            joining.append(queue.popleft())
        new = [NewSession(i, tuple(prompts[i]), per_prompt[i], stop) for i in joining]
        prefilled = verifier.join(new)
        now = time.perf_counter()
        for i, p in zip(joining, prefilled):
            live.append(_Live(i, SessionResult([]), now))
        if drafter is not None:
            # The prompt's pairs (feature_i, token_{i+1}), the first generated token last.
            drafter.join([p.features for p in prefilled], [list(prompts[i][1:]) + [p.token] for i, p in zip(joining, prefilled)])
        if on_tokens is not None:
            on_tokens(len(joining))

    @staticmethod
    def _leave(verifier, drafter, live, results, on_result) -> None:
        """Finished sessions leave, from the last row down: each leaving row takes the last
        row's session, which (rows above having left first) is still running."""
        now = time.perf_counter()
        for row in range(len(live) - 1, -1, -1):
            if not verifier.rows[row].done:
                continue
            s = live[row]
            s.result.token_ids = list(verifier.rows[row].generated)
            s.result.seconds = now - s.started
            results[s.index] = s.result
            verifier.leave(row)
            if drafter is not None:
                drafter.leave(row)
            last = live.pop()
            if row < len(live):
                live[row] = last
            if on_result is not None:
                on_result(s.index, s.result)


def _powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= n."""
    out = [1]
    while out[-1] < n:
        out.append(out[-1] * 2)
    return out


def _syncer(device: torch.device) -> Callable[[], None]:
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None
