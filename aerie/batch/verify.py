"""The verifier side of a batch of sessions: one target forward over every session's tree.

Each session owns a row of a `BatchKVCache`. A round takes one tree per session (ragged:
any size and shape; a `TreeBatch` from the batched drafter, or one `DraftTree` per session
from a service's streams), pads them into one [batch, width] forward (both dimensions
rounded up to a power of two, so that a few CUDA graphs cover every round), and then, per
session, accepts a path exactly as `VerifySession.verify` does: greedy as `accept_greedy`
(every row at once, with `accept_greedy_rows`, inside the forward's graph when every row is
greedy), sampled with the same per-position random numbers (every row at once,
`accept_sampled_rows`). Accepted nodes of every row are compacted in one gather.

The acceptance logic lives here only; the forwards and the cache's moves go through a
`BatchModel` (aerie.batch.model), which a sharded target mirrors on every rank.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from aerie.accept import accept_greedy_rows
from aerie.batch.cache import BatchKVCache, RowCompaction
from aerie.batch.model import BatchModel, greedy_acceptance
from aerie.batch.trees import TreeBatch
from aerie.errors import InputError
from aerie.sampling import SamplingParams
from aerie.target import Target
from aerie.tree import DraftTree, validate_tree
from aerie.verifier import RoundResult, StopCriteria, accept_sampled_rows, sample_tokens


@dataclass(frozen=True)
class NewSession:
    """A session joining the batch."""

    key: Hashable  # the caller's name for it (errors name it)
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stop: StopCriteria
    # Tokens generated before a resume; the last is pending again (see VerifySession.prefill).
    resume: tuple[int, ...] = ()


@dataclass
class VerifyRow:
    session: NewSession
    generated: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class Prefilled:
    features: torch.Tensor  # [prompt length, F]: the target's features of the prompt (and resumed tokens)
    token: int  # the first generated token, or the last resumed one (pending: not yet in the cache)
    done: bool


class BatchVerifier:
    """The target over a batch of sessions; row i of the cache is session `rows[i]`."""

    def __init__(self, target: Target, cache: BatchKVCache, largest_graph: int = 128, max_tree_nodes: int = 128,
                 prefill_graph_tokens: int = 512):
        self.target = target
        self.cache = cache
        self.largest_graph = largest_graph
        self.max_tree_nodes = max_tree_nodes
        self.rows: list[VerifyRow] = []
        # What runs the forwards and moves the cache's entries: on this process, or mirrored
        # on every rank of a sharded target (which hands out its own).
        self.batch_model: BatchModel = target.batch_model(cache, largest_graph, prefill_graph_tokens)

    # --- sessions join and leave -----------------------------------------------------------

    # no_grad, not inference_mode: the storage may be allocated here, and rows leaving move
    # its entries in place outside any inference block.
    @torch.no_grad()
    def join(self, sessions: Sequence[NewSession]) -> list[Prefilled]:
        """Prefill new sessions in one forward (ragged prompts, padded), each into a
        fresh row after the rows in use, and sample their first tokens. Checks every
        session before touching the cache, so a bad one leaves the batch as it was.

        A resumed session runs its prompt and every resumed token but the last, which is
        pending again, as VerifySession.prefill does: its rounds then draw the same random
        numbers, hence the same tokens, as the run it resumes."""
        context, vocab = self.target.max_positions, self.target.vocab_size
        if self.cache.in_use + len(sessions) > self.cache.rows:
            raise InputError(
                f"{len(sessions)} sessions cannot join: {self.cache.in_use} of {self.cache.rows} rows are in use"
            )
        for s in sessions:
            if not s.prompt_ids:
                raise InputError(f"session {s.key}: prompt is empty")
            if len(s.resume) >= s.stop.max_new_tokens:
                raise InputError(
                    f"session {s.key}: cannot resume after {len(s.resume)} tokens: "
                    f"max_new_tokens is {s.stop.max_new_tokens}"
                )
            if len(s.prompt_ids) + s.stop.max_new_tokens > context:
                raise InputError(
                    f"session {s.key}: prompt of {len(s.prompt_ids)} tokens plus max_new_tokens "
                    f"{s.stop.max_new_tokens} exceeds the model's context of {context} tokens"
                )
            ids = s.prompt_ids + s.resume
            if min(ids) < 0 or max(ids) >= vocab:
                raise InputError(f"session {s.key}: prompt tokens must be in [0, {vocab})")
        if not sessions:
            return []
        prompts = [list(s.prompt_ids + s.resume[:-1]) for s in sessions]
        logits, feats = self.batch_model.prefill(prompts)
        # Drawn for every row in one go; a resumed session's pending token is its last resumed one.
        first = sample_tokens(logits, [len(p) for p in prompts], [s.params for s in sessions])
        out = []
        for i, s in enumerate(sessions):
            if s.resume:
                kept, token = list(s.resume), s.resume[-1]
                done = bool(set(s.resume) & s.stop.stop_token_ids)
            else:
                token = first[i]
                kept, done = s.stop.cut(0, [token])
            self.rows.append(VerifyRow(s, kept, done))
            out.append(Prefilled(feats[i, : len(prompts[i])], token, done))
        return out

    def leave(self, row: int) -> None:
        """Drop session `row`; the last row's session takes its place (as in the cache)."""
        moved = self.batch_model.remove_row(row)
        last = self.rows.pop()
        if moved is not None:
            self.rows[row] = last

    # --- rounds ----------------------------------------------------------------------------

    def check(self, trees: TreeBatch | Sequence[DraftTree | None]) -> None:
        """Raise InputError naming the first session whose tree is unfit; nothing changes.
        Row i's tree is trees[i], or none for a row that sits the round out. A `TreeBatch` is
        checked for every row at once; a row it refuses is checked alone for the message."""
        if len(trees) != len(self.rows):
            raise InputError(f"got {len(trees)} trees for {len(self.rows)} sessions")
        if not isinstance(trees, TreeBatch):
            for i, tree in enumerate(trees):
                if tree is not None:
                    self.check_row(i, tree)
            return
        bad = trees.invalid_rows(self.target.vocab_size, self.max_tree_nodes)
        live = torch.tensor(trees.sizes) > 0
        done = torch.tensor([r.done for r in self.rows], dtype=torch.bool)
        last = torch.tensor([r.generated[-1] for r in self.rows])
        bad |= live & (done | (trees.tokens[:, 0] != last))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            self.check_row(row, trees.tree(row))
            raise InputError(f"session {self.rows[row].session.key}: the tree is malformed")

    def check_row(self, row: int, tree: DraftTree) -> None:
        """Raise InputError unless `tree` can be row `row`'s next round; nothing changes.
        Callers batching trees from several clients check each alone first, so that one
        bad tree is refused to its sender only."""
        state = self.rows[row]
        key = state.session.key
        try:
            validate_tree(tree.tokens, tree.parents, self.target.vocab_size, self.max_tree_nodes)
        except ValueError as e:
            raise InputError(f"session {key}: {e}") from None
        if state.done:
            raise InputError(f"session {key}: generation is already finished")
        if int(tree.tokens[0]) != state.generated[-1]:
            raise InputError(
                f"session {key}: tree root {int(tree.tokens[0])} is not the last generated token {state.generated[-1]}"
            )

    @torch.inference_mode()
    def verify(self, trees: TreeBatch | Sequence[DraftTree | None]) -> list[RoundResult | None]:
        """One target forward over every session's tree (row i's is trees[i]), then per
        session acceptance, compaction and stopping, as VerifySession.verify does.

        A row without a tree sits the round out (its result is None): it is padding in the
        forward, which writes only scratch slots past its committed entries, and its cache
        and state stay as they were. Rows after the last tree are left out of the forward
        altogether."""
        self.check(trees)
        batch = trees if isinstance(trees, TreeBatch) else TreeBatch.from_trees(trees)
        live = [i for i, size in enumerate(batch.sizes) if size]
        if not live:
            return [None] * len(batch)
        n = live[-1] + 1
        greedy = all(self.rows[i].session.params.greedy for i in live)
        committed = list(self.cache.lengths[:n])
        out, feats = self.batch_model.forward(batch.first_rows(n), greedy)
        paths, bonuses = self._accept(batch, out, live, committed, greedy)
        moves = [RowCompaction(i, committed[i], tuple(path)) for i, path in zip(live, paths)]
        # Every row's accepted features in one gather (copied out of the graph's output).
        width = feats.shape[1]
        flat = torch.tensor([i * width + p for i, path in zip(live, paths) for p in path], device=feats.device)
        accepted = feats.reshape(-1, feats.shape[-1]).index_select(0, flat).split([len(p) for p in paths])
        tokens = batch.tokens[:n].tolist()
        results: list[RoundResult | None] = [None] * len(batch)
        for i, path, bonus, features in zip(live, paths, bonuses, accepted):
            row = self.rows[i]
            proposed = [tokens[i][p] for p in path[1:]] + [bonus]
            kept, row.done = row.session.stop.cut(len(row.generated), proposed)
            row.generated += kept
            results[i] = RoundResult(kept, features, len(path) - 1, row.done)
        self.batch_model.compact(moves)
        return results

    def _accept(self, batch: TreeBatch, out: torch.Tensor, live: list[int], committed: list[int],
                greedy: bool) -> tuple[list[list[int]], list[int]]:
        """Each live row's accepted path and bonus token, from the forward's `out`: the greedy
        acceptance made inside it when every row is greedy, else its logits."""
        n = live[-1] + 1
        if greedy:  # one read of every row's path: the round's one sync
            path, length, bonus = (t.tolist() for t in greedy_acceptance(out[:n].cpu()))
            return [path[i][: length[i]] for i in live], [bonus[i] for i in live]
        params = [row.session.params for row in self.rows[:n]]
        sampled = [i for i in live if not params[i].greedy]
        accepted = dict(zip(sampled, accept_sampled_rows(batch.tokens, batch.parents, batch.sizes, out, sampled,
                                                         committed, params)))
        if len(sampled) < len(live):
            w = max(batch.sizes)
            best = out[:n, :w].argmax(-1).cpu()
            rows = accept_greedy_rows(batch.tokens[:n, :w], batch.parents[:n, :w], best)
            path, length, bonus = (t.tolist() for t in rows)
            accepted.update((i, (path[i][: length[i]], bonus[i])) for i in live if params[i].greedy)
        return [accepted[i][0] for i in live], [accepted[i][1] for i in live]

    @torch.inference_mode()
    def step_plain(self) -> list[int]:
        """Plain batched decoding: every session feeds its pending token and samples the next
        one (one forward for all). Returns the sampled tokens, row by row."""
        rows = self.rows
        if any(r.done for r in rows):
            raise InputError("a session in the batch has already finished")
        greedy = all(r.session.params.greedy for r in rows)
        out, _ = self.batch_model.forward(TreeBatch.of_tokens([r.generated[-1] for r in rows]), greedy)
        # Each row keeps the one entry it fed: a compaction that moves nothing, only lengths
        # (through the batch model, so that a sharded target's ranks count alike).
        self.batch_model.compact([RowCompaction(i, self.cache.lengths[i], (0,)) for i in range(len(rows))])
        # The forward's batch is padded: only its first len(rows) rows are sessions.
        tokens = (greedy_acceptance(out[: len(rows)])[2].tolist() if greedy else
                  sample_tokens(out[: len(rows), 0], self.cache.lengths[: len(rows)], [r.session.params for r in rows]))
        for row, token in zip(rows, tokens):
            kept, row.done = row.session.stop.cut(len(row.generated), [token])
            row.generated += kept
        return tokens
