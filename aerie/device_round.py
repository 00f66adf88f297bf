"""Speculative rounds run whole on the device: one CUDA graph, one read, one round ahead.

The split round (aerie.drafter, then aerie.verifier) hands its tree from the drafter to the
verifier through the host: the drafter reads its candidates and reranks them there; the
verifier validates the tree, builds its mask and walks the acceptance there. The network
split needs that shape, but in one process it costs two syncs a round and host work while
the GPU waits. Here the same round is device work only, captured as one graph per tree shape
over the target's and the head's static caches:

1. commit the pairs the last round accepted to the head (padded to the most a round accepts);
2. grow the candidates (`aerie.drafter.grow_candidates`) and keep the best `total_tokens`
   of them (`select_tree`: the nodes `aerie.tree.rerank` keeps);
3. run the target over the tree under its ancestor mask;
4. accept: greedily (`aerie.accept.accept_greedy_rows`), or sampled (`warp_probs`, then
   `aerie.accept.accept_point_mass_rows`: the split round's `walk_point_mass` and bonus draw
   as tensor ops), move the accepted entries of the target's cache into place and gather
   the features of the accepted path.

The host then reads the accepted length and tokens, the round's one sync. It reads them one
round late: the round also leaves what the next one commits (its tokens and features, its
lengths) on the device, so round n + 1 is launched, chained to round n there, before the
host waits for round n. The GPU then runs rounds back to back while the host reads, emits
and picks the next tree; a round launched past a stop token is dropped, its writes past
both caches' lengths. The caches are sized for the whole generation up front, because a
chained round may not move them.

A sampled round's random numbers depend on the committed length and the tree's shape only
(`aerie.verifier.TreeDraws`), so the host draws every one the round could use before the
launch (`aerie.verifier.round_uniforms`): for a chained round, from every length the round
before it can leave (a round fed from the host draws a window as wide, so that both run one
graph). The graph picks each node's: the same numbers, hence the same tokens, as the split
round, from the same seed.

`PlainSteps` runs plain decoding the same way, one step ahead of the host: the baseline
with the same caches, graphs and overlap.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from aerie.accept import accept_greedy_rows, accept_point_mass_rows
from aerie.budget import ExploredRound
from aerie.drafter import DraftSession, grow_candidates
from aerie.fused import fused
from aerie.kvcache import SlotCache, pad_rows, pinned_tensor, seen_on_device
from aerie.sampling import SamplingParams, position_uniform, sample_from, warp_probs
from aerie.target import Target
from aerie.tree import TreeConfig, ancestor_closure, node_depths
from aerie.verifier import RoundResult, VerifySession, round_uniforms


def candidate_count(tree: TreeConfig) -> int:
    """Candidates a dynamic tree's expansion drafts: top_k at the first level, top_k for each
    of the top_k frontier nodes at every level below it."""
    return tree.top_k + (tree.depth - 1) * tree.top_k * tree.top_k


def select_tree(root_token: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor,
                total_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dynamic tree of the `total_tokens` best candidates by path score, on the device:
    (tokens, parents, path scores), each [n], with the root first (score 0) and the rest in
    drafting order.

    `tokens`, `parents`, `scores` are `grow_candidates`' output (parents index candidates
    from 1, the root is 0). The kept nodes are those of `aerie.tree.rerank`: a stable sort
    puts a parent before a child of equal score, and a child's score never exceeds its
    parent's (adding a log-probability <= 0 rounds monotonically), so every kept node's
    ancestors are kept. Were one not, its child would hang from the root: a worse tree, but
    one that verifies exactly all the same."""
    m, device = scores.shape[0], scores.device
    n = min(total_tokens, m)
    kept = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:n]).values
    tree_index = torch.zeros(m + 1, dtype=torch.long, device=device)  # candidate -> tree node, dropped -> root
    tree_index[kept + 1] = torch.arange(1, n + 1, device=device)
    tree_tokens = torch.cat([root_token.reshape(1), tokens[kept]])
    tree_parents = torch.cat([torch.full((1,), -1, dtype=torch.long, device=device), tree_index[parents[kept]]])
    return tree_tokens, tree_parents, torch.cat([scores.new_zeros(1), scores[kept]])


class HostCopy:
    """A device tensor's values on their way to the host: the copy is queued now, behind the
    work that makes them, and `tolist` waits for it alone (not for work queued since)."""

    def __init__(self, values: torch.Tensor):
        self.ready = None
        if values.is_cuda:
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.values = values.clone()

    def tolist(self) -> list:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


@dataclass
class LaunchedRound:
    """A round queued on the device: where its result will be read, and the outputs (on the
    device, overwritten by the next replay of its graph) that a chained round commits."""

    tree: TreeConfig
    count: int | None  # pairs it commits, None when chained (the last round's path length)
    result: HostCopy  # [1 + rows]: the accepted path's length, then the tokens it commits
    features: torch.Tensor  # [rows, F]: the features of the path's nodes
    next_ints: torch.Tensor  # what a chained round's "ints" input takes
    next_features: torch.Tensor  # what its "features" input takes
    explored: HostCopy | None  # what `explored` reads, if asked: scores, parents, path scores, depths


class DeviceRounds:
    """The rounds of one generation on the device, greedy or sampled, over the static caches of a
    `VerifySession` and a `DraftSession`. Each `step` returns what
    `verifier.verify(drafter.draft(features, next_tokens))` would, with the same tokens, and
    leaves both sessions as that would. The round drafts `drafter.tree`, which may change
    from round to round (`--tree-budget auto`): each tree shape is a graph of its own."""

    def __init__(self, verifier: VerifySession, drafter: DraftSession, deepest: int | None = None):
        """`deepest`: the largest depth of any tree the rounds will draft (the drafter's by
        default), which bounds the pairs a round commits."""
        if not self.supports(verifier, drafter):
            raise ValueError("device rounds need a dynamic tree, static caches on both sides and an unsharded target")
        self.verifier = verifier
        self.drafter = drafter
        self.commit_rows = (deepest or drafter.tree.depth) + 1  # the most pairs a round commits
        self._launched: collections.deque[LaunchedRound] = collections.deque()
        self._collected: LaunchedRound | None = None  # the last round collected
        self._last_accepted = 0  # its path's length: the pairs the round after it commits

    @staticmethod
    def supports(verifier: VerifySession, drafter: object) -> bool:
        """A dynamic tree (its siblings are distinct top-k tokens: point-mass proposals), with
        static caches on both sides and the target in this process (a sharded one mirrors
        each call to its other ranks instead)."""
        return (isinstance(drafter, DraftSession) and drafter.tree.kind == "dynamic"
                and type(verifier.target) is Target
                and isinstance(verifier.cache, SlotCache) and isinstance(drafter.cache, SlotCache))

    @staticmethod
    def nodes(tree: TreeConfig) -> int:
        """The tree a round of `tree` verifies, root included."""
        return min(tree.total_tokens, candidate_count(tree)) + 1

    @torch.inference_mode()  # grown storage is an inference tensor, as the forwards made it
    def reserve(self, prompt_tokens: int, max_new_tokens: int, largest: TreeConfig | None = None) -> None:
        """Size both caches for a whole generation of `max_new_tokens` after `prompt_tokens`,
        drafting trees up to `largest`: a chained round is launched before the host knows how
        far the last one got, so the room must be there before it is needed (growing a
        cache mid-round would move the storage a launched graph writes)."""
        tree = largest or self.drafter.tree
        # The furthest a round can start: the last token of the limit pending, plus one round
        # launched past it before the host read that the limit was reached.
        start = prompt_tokens + max_new_tokens + self.commit_rows
        self.verifier.cache.reserve(start + self.nodes(tree))
        self.drafter.cache.reserve(start + self._head_slots(tree))

    def _head_slots(self, tree: TreeConfig) -> int:
        """Head cache slots a round of `tree` writes past the head's length: the pairs it
        commits (padded), then the frontiers it feeds below the first level."""
        return self.commit_rows + (tree.depth - 1) * tree.top_k

    @property
    def in_flight(self) -> int:
        """Rounds launched and not yet collected."""
        return len(self._launched)

    @torch.inference_mode()
    def step(self, features: torch.Tensor, next_tokens: list[int], explore: bool = False) -> RoundResult:
        """Commit the pairs (features[i], next_tokens[i]) (as many as a round accepts at
        most), draft, verify and accept: one round, launched and collected."""
        self.launch(features, next_tokens, explore)
        return self.collect()[0]

    @torch.inference_mode()
    def launch(self, features: torch.Tensor | None = None, next_tokens: list[int] | None = None,
               explore: bool = False) -> None:
        """Queue a round of `drafter.tree` on the device without waiting for it.

        With `features` and `next_tokens`, the round commits those pairs and nothing may be
        in flight. Without them it is chained: it commits what the last launched round
        accepts, taken from that round's outputs on the device, so the host need not read
        them first (`collect` reads them later, while this round runs). `explore` keeps
        what `explored` reads of the round."""
        verifier, tree, params = self.verifier, self.drafter.tree, self.verifier.params
        target_cache, head_cache = verifier.cache, self.drafter.cache
        committed, head_length = target_cache.length, head_cache.length  # as of the last round collected
        if features is not None:
            if self._launched:
                raise ValueError("a round that commits pairs from the host needs nothing in flight")
            count = len(next_tokens)
            if not 1 <= count <= self.commit_rows:
                raise ValueError(f"a round commits 1 to {self.commit_rows} pairs, got {count}")
            head_cache.reserve(head_length + self._head_slots(tree))
            target_cache.reserve(committed + self.nodes(tree))
            ids = next_tokens + [next_tokens[-1]] * (self.commit_rows - count)
            inputs = {
                "ints": pinned_tensor([committed, head_length, count] + ids),
                "features": pad_rows(features[None].to(head_cache.device, self.drafter.head.fc.weight.dtype),
                                     self.commit_rows)[0],
            }
        else:
            if len(self._launched) != 1:
                raise ValueError("a chained round follows exactly one round in flight")
            last = self._launched[-1]
            # The last round commits at most commit_rows tokens, on top of what the host knows.
            start = committed + self.commit_rows
            if (target_cache.capacity < start + self.nodes(tree)
                    or head_cache.capacity < head_length + self.commit_rows + self._head_slots(tree)):
                raise ValueError("the caches lack room for a chained round: reserve() them for the generation")
            inputs = {"ints": last.next_ints, "features": last.next_features}
        if not params.greedy:
            # Every number the round could use: rows from the last known committed length on,
            # as many as a chained round's start can be ahead of it, plus its own. A round fed
            # from the host starts at that length and draws the same window, so that it runs
            # the chained rounds' graph: a window of its own would be a graph of its own,
            # captured mid-serving whenever a generation's first device round drew a tree
            # that no first round had drawn before.
            window = self.commit_rows + tree.depth + 1
            uniforms = round_uniforms(params.seed, committed, window - 1, tree.top_k)
            inputs["uniforms"] = pinned_tensor(uniforms, torch.float64)
            inputs["window_start"] = pinned_tensor([committed])
        # Kept with the head cache's graphs, named by the target storage the graph writes: a
        # pooled head cache meets other target caches, and a grown one is new storage. One
        # pairing per tree is kept: engines reuse the caches they released last, so it is
        # the one met again, and the graphs over storage since dropped are let go. The warp
        # settings are constants of the captured graph (the seed is only in its inputs), and
        # so is the number of pairs a round commits: engines of other deepest trees share the
        # pooled caches, and under one key their inputs' shapes would evict each other's graph.
        key = ("round", tree, warp_key(params), self.commit_rows, target_cache.storage_id)
        head_cache.drop_graphs(lambda k: k[:4] == key[:4] and k != key)
        outputs = head_cache.run(key, inputs, lambda b: self._round(b, tree, params),
                                 graphed=head_cache.graphs.enabled)
        self._launched.append(LaunchedRound(
            tree=tree, count=len(next_tokens) if features is not None else None,
            result=HostCopy(outputs[0]), features=outputs[1], next_ints=outputs[2], next_features=outputs[3],
            explored=HostCopy(torch.cat([t.double() for t in outputs[4:]])) if explore else None,
        ))

    @torch.inference_mode()
    def collect(self) -> tuple[RoundResult, TreeConfig]:
        """Wait for the oldest round in flight and apply it: the host's lengths, the tokens it
        emits. Returns its result and tree. Its features come back only when no round was
        launched after it (a chained round has taken them on the device)."""
        launched = self._launched.popleft()
        verifier, target_cache, head_cache = self.verifier, self.verifier.cache, self.drafter.cache
        values = launched.result.tolist()  # the round's one read
        accepted = values[0]
        count = self._last_accepted if launched.count is None else launched.count
        target_cache.length += accepted
        head_cache.length += count  # the drafted entries are dropped
        self._last_accepted = accepted
        self._collected = launched
        kept = verifier.emit(values[1 : 1 + accepted])
        features = None if self._launched else launched.features[:accepted]
        return RoundResult(new_tokens=kept, features=features, accepted_draft=accepted - 1,
                           done=verifier.done), launched.tree

    @property
    def collected_explored(self) -> bool:
        """Whether `explored` can read the last round collected."""
        return self._collected is not None and self._collected.explored is not None

    def discard(self) -> None:
        """Forget the rounds in flight: generation ended before them. What they write lies
        past both caches' lengths."""
        self._launched.clear()

    def explored(self, accepted_draft: int) -> ExploredRound:
        """What `--tree-budget auto` learns from the last round: every candidate's path score
        and depth, and those of its first `accepted_draft` accepted nodes: a second read,
        for the rounds launched to explore."""
        collected = self._collected
        if collected is None or collected.explored is None:
            raise ValueError("the last round collected was not launched with explore=True")
        m = candidate_count(collected.tree)
        flat = collected.explored.tolist()
        depths = node_depths(torch.tensor([-1] + [int(p) for p in flat[m : 2 * m]]))[1:]
        tail = flat[2 * m :]
        rows = len(tail) // 2
        return ExploredRound(scores=torch.tensor(flat[:m], dtype=torch.float64), depths=depths,
                             path_scores=tuple(tail[:accepted_draft]),
                             path_depths=tuple(int(d) for d in tail[rows : rows + accepted_draft]))

    def _round(self, inputs: dict[str, torch.Tensor], tree: TreeConfig,
               params: SamplingParams) -> tuple[torch.Tensor, ...]:
        """The round as device work over static shapes: what a graph captures. Returns
        [1 + rows] (the accepted path's length, root included, then the tokens it commits:
        the accepted drafts and the bonus token), the features of the path's nodes, and for
        `explored`: every candidate's score and parent, and the score and depth of each
        accepted node."""
        target, head = self.verifier.target, self.drafter.head
        target_cache, head_cache = self.verifier.cache, self.drafter.cache
        ints, features = inputs["ints"], inputs["features"]
        committed, head_length, count, ids = ints[0], ints[1], ints[2], ints[3:]
        device = features.device
        last = (count - 1).reshape(1)

        # The pending pairs, causal; padding rows land where drafting writes next.
        with fused(head.fused):
            pending = head_length + torch.arange(self.commit_rows, device=device)
            head_cache.write_at[: self.commit_rows] = pending
            seen = torch.arange(head_cache.capacity, device=device)[None, :] <= pending[:, None]
            hidden = head.static_step(features[None], ids[None], pending[None], seen[None, None], head_cache)[0]
            candidates = grow_candidates(head, head_cache, tree, hidden.index_select(0, last), head_length + count)
        compiled = head.compiled_part
        tokens, parents, scores, reach, depths, slots, positions, mask = compiled(tree_to_verify)(
            ids.index_select(0, last), *candidates, tree.total_tokens, committed, target_cache.capacity)
        target_cache.write_at[: slots.shape[0]] = slots
        logits, node_features = target.run_static(target_cache, tokens[None], positions[None], mask[None, None])

        if params.greedy:
            path, length, bonus = compiled(greedy_path)(tokens, parents, logits, reach)
        else:
            # Warped as the split round warps its [1, n, V] logits, so every probability is
            # the same double. The warp stays eager: its settings are constants a compiled
            # function would recompile for, and it is a few kernels at most.
            path, length, bonus = compiled(sampled_path)(tokens, parents, warp_probs(logits[None], params)[0], reach,
                                                         inputs["uniforms"], committed - inputs["window_start"],
                                                         tree.depth)
        rows = min(tree.depth, tokens.shape[0] - 1) + 1  # the most nodes a path holds
        moved_to, moved_from, after, result, path_features, next_ints, next_features = compiled(commit_path)(
            path[0, :rows], length[0], bonus[0], tokens, node_features, committed, head_length, count,
            self.commit_rows, features.dtype)
        storage = target_cache.storage
        storage.index_copy_(4, moved_to, storage.index_select(4, moved_from))
        return (result, path_features, next_ints, next_features,
                candidates[2], candidates[1], scores[after], depths[after])


def tree_to_verify(root_token: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor,
                   total_tokens: int, committed: torch.Tensor, capacity: int) -> tuple[torch.Tensor, ...]:
    """The round's tree (`select_tree`: tokens, parents, path scores) and what the target's
    forward over it needs: each node's ancestors and itself ([n, n]), its depth, its cache
    slot and position, and the mask of the cache's entries it sees ([n, capacity]). One
    function, so that the static path compiles it into a few kernels."""
    tokens, parents, scores = select_tree(root_token, tokens, parents, scores, total_tokens)
    reach = ancestor_closure(parents[None])[0]
    depths = reach.sum(-1) - 1
    slots = committed + torch.arange(tokens.shape[0], device=tokens.device)
    mask = seen_on_device(capacity, committed, slots, reach)
    return tokens, parents, scores, reach, depths, slots, committed + depths, mask


def greedy_path(tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor,
                reach: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`accept_greedy_rows` of the one tree against the target's logits over it."""
    return accept_greedy_rows(tokens[None], parents[None], logits.argmax(-1)[None], reach[None])


def sampled_path(tokens: torch.Tensor, parents: torch.Tensor, probs: torch.Tensor, reach: torch.Tensor,
                 uniforms: torch.Tensor, first_row: torch.Tensor, depth: int) -> tuple[torch.Tensor, ...]:
    """`accept_point_mass_rows` of the one tree against the target's warped probabilities
    over it ([n, V] float64), with the numbers as `round_uniforms` lays them out: the rows
    of the window the host drew from `first_row` (this round's committed length) on."""
    rows = uniforms.index_select(0, first_row + torch.arange(depth + 1, device=first_row.device))
    return accept_point_mass_rows(tokens[None], parents[None], probs[None], rows[None, :depth, 1:], rows[None, :, 0],
                                  reach[None])


def commit_path(path: torch.Tensor, length: torch.Tensor, bonus: torch.Tensor, tokens: torch.Tensor,
                node_features: torch.Tensor, committed: torch.Tensor, head_length: torch.Tensor,
                count: torch.Tensor, commit_rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """What an accepted path (its first `rows` entries, -1 past its `length`) leaves: the
    target cache's slots to move its entries to and from, the node of each committed token
    but the bonus, the round's result ([1 + rows]: the length, then the tokens it commits),
    the path's features, and what a chained round commits (its "ints" and "features"
    inputs: these tokens with their features, padded as the host pads them, the last pair
    repeated)."""
    rows = path.shape[0]
    path = path.clamp_min(0)  # past the path's end: the root, read by nobody
    steps = torch.arange(rows, device=path.device)
    after = torch.cat([path[1:], path[:1]])  # the node of each committed token but the bonus
    emitted = torch.where(steps == length - 1, bonus, tokens[after])
    path_features = node_features.index_select(0, path)
    pairs = torch.arange(commit_rows, device=path.device).clamp_max(length - 1)
    next_ints = torch.cat([(committed + length).reshape(1), (head_length + count).reshape(1), length.reshape(1),
                           emitted.index_select(0, pairs)])
    return (committed + steps, committed + path, after, torch.cat([length.reshape(1), emitted]), path_features,
            next_ints, path_features.index_select(0, pairs).to(dtype))


def warp_key(params: SamplingParams) -> tuple[float, int, float] | None:
    """What of `params` a captured round bakes in: None for greedy rounds, else the warp's
    settings (a new temperature, top-k or top-p is a new graph; a new seed is not)."""
    return None if params.greedy else (params.temperature, params.top_k, params.top_p)


class PlainSteps:
    """Plain decoding on the target's static cache, one step ahead of the host: what
    `VerifySession.step_plain` does, token for token, as one graph a step whose input token
    is the last step's output on the device. Step n + 1 is queued before the host reads step
    n, so the GPU does not wait while the host reads and emits; a step launched past a stop
    token is dropped unread. The fair baseline for the device rounds: the same cache, graphs
    and overlap."""

    def __init__(self, verifier: VerifySession):
        if not self.supports(verifier):
            raise ValueError("plain steps on the device need a static cache and an unsharded target")
        self.verifier = verifier
        self._launched: collections.deque[tuple[HostCopy, torch.Tensor]] = collections.deque()

    @staticmethod
    def supports(verifier: VerifySession) -> bool:
        return type(verifier.target) is Target and isinstance(verifier.cache, SlotCache)

    @property
    def in_flight(self) -> int:
        return len(self._launched)

    @torch.inference_mode()
    def reserve(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Room for the whole generation and a step launched past its end."""
        self.verifier.cache.reserve(prompt_tokens + max_new_tokens + 1)

    @torch.inference_mode()
    def launch(self) -> None:
        """Queue the next step: it feeds the last generated token (the last step's output on
        the device, when one is in flight) and draws the next."""
        verifier, cache, params = self.verifier, self.verifier.cache, self.verifier.params
        committed = cache.length + len(self._launched)  # each step commits exactly one token
        if cache.capacity < committed + 1:
            raise ValueError("the cache lacks room for the step: reserve() it for the generation")
        inputs = {"committed": pinned_tensor([committed]),
                  "token": self._launched[-1][1] if self._launched else pinned_tensor(verifier.generated[-1:])}
        if not params.greedy:
            # The number `sample_token` draws the token at position committed + 1 with.
            inputs["uniform"] = pinned_tensor([position_uniform(params.seed, committed + 1, 0)], torch.float64)
        # The graph stays with the (pooled) cache: it depends on the cache and the target only,
        # not on this session.
        target = verifier.target
        (token,) = cache.run(("plain", warp_key(params)), inputs, lambda b: plain_step(target, cache, b, params),
                             graphed=cache.graphs.enabled)
        self._launched.append((HostCopy(token), token))

    @torch.inference_mode()
    def collect(self) -> list[int]:
        """Wait for the oldest step in flight and emit its token: the tokens kept (none
        past a stop)."""
        result, _ = self._launched.popleft()
        self.verifier.cache.length += 1
        return self.verifier.emit(result.tolist())

    def discard(self) -> None:
        """Forget the steps in flight: generation ended before them."""
        self._launched.clear()


def plain_step(target: Target, cache: SlotCache, inputs: dict[str, torch.Tensor],
               params: SamplingParams) -> tuple[torch.Tensor]:
    """One plain step as device work: feed inputs["token"] at position inputs["committed"],
    draw the next token (greedily, or with inputs["uniform"] as `sample_token` draws it)."""
    committed, token = inputs["committed"], inputs["token"]
    cache.write_at[:1] = committed
    seen = torch.arange(cache.capacity, device=committed.device) <= committed
    logits, _ = target.run_static(cache, token[None], committed[None], seen[None, None, None])
    if params.greedy:
        return (logits[-1].argmax().reshape(1),)
    return (sample_from(warp_probs(logits[-1], params), inputs["uniform"][0]).reshape(1),)
