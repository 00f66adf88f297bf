"""Speculative rounds run whole on the device: one CUDA graph, one read.

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

The host then reads the accepted length and tokens, the round's one sync. A sampled round's
random numbers depend on the committed length and the tree's shape only
(`aerie.verifier.TreeDraws`), so the host draws every one the round could use before the
launch (`aerie.verifier.round_uniforms`) and the graph picks each node's: the same numbers,
hence the same tokens, as the split round, from the same seed.
"""

from __future__ import annotations

import torch

from aerie.accept import accept_greedy_rows, accept_point_mass_rows
from aerie.budget import ExploredRound
from aerie.drafter import DraftSession, grow_candidates
from aerie.fused import fused
from aerie.kvcache import SlotCache, pad_rows, pinned_tensor, seen_on_device
from aerie.sampling import SamplingParams, warp_probs
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
        self._last: tuple[torch.Tensor, ...] | None = None

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

    @torch.inference_mode()
    def step(self, features: torch.Tensor, next_tokens: list[int]) -> RoundResult:
        """Commit the pairs (features[i], next_tokens[i]) (as many as a round accepts at
        most), draft, verify and accept."""
        verifier, tree, params = self.verifier, self.drafter.tree, self.verifier.params
        target_cache, head_cache = verifier.cache, self.drafter.cache
        committed, head_length, count = verifier.committed, self.drafter.length, len(next_tokens)
        if not 1 <= count <= self.commit_rows:
            raise ValueError(f"a round commits 1 to {self.commit_rows} pairs, got {count}")
        head_cache.reserve(head_length + self.commit_rows + (tree.depth - 1) * tree.top_k)
        target_cache.reserve(committed + self.nodes(tree))
        device = head_cache.device
        ids = next_tokens + [next_tokens[-1]] * (self.commit_rows - count)
        inputs = {
            "ints": pinned_tensor([committed, head_length, count] + ids),
            "features": pad_rows(features[None].to(device, self.drafter.head.fc.weight.dtype), self.commit_rows)[0],
        }
        if not params.greedy:
            uniforms = round_uniforms(params.seed, committed, tree.depth, tree.top_k)
            inputs["uniforms"] = pinned_tensor(uniforms, torch.float64)
        # Kept with the head cache's graphs, named by the target storage the graph writes: a
        # pooled head cache meets other target caches, and a grown one is new storage. One
        # pairing per tree is kept: engines reuse the caches they released last, so it is
        # the one met again, and the graphs over storage since dropped are let go. The warp
        # settings are constants of the captured graph (the seed is only in its inputs).
        key = ("round", tree, warp_key(params), target_cache.storage_id)
        head_cache.drop_graphs(lambda k: k[:3] == key[:3] and k != key)
        self._last = head_cache.run(key, inputs, lambda b: self._round(b, tree, params),
                                    graphed=head_cache.graphs.enabled)
        values = self._last[0].tolist()  # the round's one read
        accepted = values[0]
        target_cache.length = committed + accepted
        head_cache.length = head_length + count  # the drafted entries are dropped
        kept = verifier.emit(values[1 : 1 + accepted])
        return RoundResult(new_tokens=kept, features=self._last[1][:accepted], accepted_draft=accepted - 1,
                           done=verifier.done)

    def explored(self, accepted_draft: int) -> ExploredRound:
        """What `--tree-budget auto` learns from the last round: every candidate's path score
        and depth, and those of its first `accepted_draft` accepted nodes. A second read,
        made for the rounds that explore only."""
        _, _, pool_scores, pool_parents, path_scores, path_depths = self._last
        m = pool_scores.shape[0]
        flat = torch.cat([pool_scores.double(), pool_parents.double(), path_scores.double(),
                          path_depths.double()]).tolist()
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
            slots = head_length + torch.arange(self.commit_rows, device=device)
            head_cache.write_at[: self.commit_rows] = slots
            seen = torch.arange(head_cache.capacity, device=device)[None, :] <= slots[:, None]
            hidden = head.static_step(features[None], ids[None], slots[None], seen[None, None], head_cache)[0]
            candidates = grow_candidates(head, head_cache, tree, hidden.index_select(0, last), head_length + count)
        tokens, parents, scores = select_tree(ids.index_select(0, last), *candidates, tree.total_tokens)

        n = tokens.shape[0]
        reach = ancestor_closure(parents[None])[0]  # [n, n]: each node's ancestors and itself
        slots = committed + torch.arange(n, device=device)
        target_cache.write_at[:n] = slots
        mask = seen_on_device(target_cache.capacity, committed, slots, reach)
        depths = reach.sum(-1) - 1
        logits, node_features = target.run_static(target_cache, tokens[None], (committed + depths)[None],
                                                  mask[None, None])

        if params.greedy:
            path, length, bonus = accept_greedy_rows(tokens[None], parents[None], logits.argmax(-1)[None], reach[None])
        else:
            # Warped as the split round warps its [1, n, V] logits, so every probability is
            # the same double; the numbers as `round_uniforms` lays them out.
            uniforms = inputs["uniforms"]
            path, length, bonus = accept_point_mass_rows(tokens[None], parents[None], warp_probs(logits[None], params),
                                                         uniforms[None, : tree.depth, 1:], uniforms[None, :, 0],
                                                         reach[None])
        rows = min(tree.depth, n - 1) + 1  # the most nodes a path holds
        path = path[0, :rows].clamp_min(0)  # past the path's end: the root, read by nobody
        length = length[0]
        steps = torch.arange(rows, device=device)
        storage = target_cache.storage
        storage.index_copy_(4, committed + steps, storage.index_select(4, committed + path))
        after = torch.cat([path[1:], path[:1]])  # the node of each committed token but the bonus
        emitted = torch.where(steps == length - 1, bonus[0], tokens[after])
        return (torch.cat([length.reshape(1), emitted]), node_features.index_select(0, path),
                candidates[2], candidates[1], scores[after], depths[after])


def warp_key(params: SamplingParams) -> tuple[float, int, float] | None:
    """What of `params` a captured round bakes in: None for greedy rounds, else the warp's
    settings (a new temperature, top-k or top-p is a new graph; a new seed is not)."""
    return None if params.greedy else (params.temperature, params.top_k, params.top_p)
