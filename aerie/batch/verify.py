"""The verifier side of a batch of sessions: one target forward over every session's tree.

Each session owns a row of a `BatchKVCache`. A round takes one tree per session (ragged:
any size and shape), pads them into one [batch, width] forward (both dimensions rounded up to
a power of two, so that a few CUDA graphs cover every round), and then, per session, accepts a
path exactly as `VerifySession.verify` does: greedy with `accept_greedy`, sampled with the same
per-position random numbers. Accepted nodes of every row are compacted in one gather.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from aerie.accept import accept_greedy
from aerie.batch.cache import BatchKVCache, RowCompaction
from aerie.batch.inputs import ForwardInputs, batch_inputs
from aerie.errors import InputError
from aerie.fused import fused_norms, norms_to_fuse
from aerie.graphs import bucket_for
from aerie.sampling import SamplingParams
from aerie.target import Target
from aerie.tree import DraftTree, validate_tree
from aerie.verifier import RoundResult, StopCriteria, accept_sampled, sample_token


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

    def __init__(self, target: Target, cache: BatchKVCache, largest_graph: int = 128, max_tree_nodes: int = 128):
        self.target = target
        self.cache = cache
        self.largest_graph = largest_graph
        self.max_tree_nodes = max_tree_nodes
        self.rows: list[VerifyRow] = []
        self.base = target.model.base_model
        self.lm_head = target.model.get_output_embeddings()
        self.fused = norms_to_fuse(target.model, target.device)  # as the single-session static path

    # --- the model -------------------------------------------------------------------------

    def _model(self, b: dict[str, torch.Tensor], argmax: bool, logits_at: torch.Tensor | None = None):
        with fused_norms(self.fused):
            out = self.base(
                input_ids=b["ids"], position_ids=b["pos"], attention_mask=b["mask"],
                past_key_values=self.cache, use_cache=True, output_hidden_states=True,
            )
        hidden = out.hidden_states
        spec = self.target.features
        feats = torch.cat([hidden[i] for i in spec.layers], dim=-1) if spec.kind == "eagle3" else hidden[-1]
        last = out.last_hidden_state
        if logits_at is not None:  # one position per row (prefill): skip the others' LM head
            last = last[torch.arange(last.shape[0], device=last.device), logits_at]
        logits = self.lm_head(last)
        return (logits.argmax(-1) if argmax else logits.float()), feats

    def _forward(self, tokens: list[list[int]], parents: list[list[int]], argmax: bool):
        """One graphed forward of rows [0, len(tokens)): row r's new tokens `tokens[r]` (a
        tree; empty for a row that sits the round out)."""
        cache = self.cache
        n = len(tokens)
        widest = max(len(t) for t in tokens)
        width = bucket_for(widest, self.largest_graph) or widest
        batch = bucket_for(n, cache.rows) or n
        cache.reserve(max(cache.lengths[:batch]) + width)
        inputs = batch_inputs(tokens, parents, cache.lengths, width, batch, cache.capacity)
        graphed = widest <= self.largest_graph
        key = ("tree", batch, width, argmax) if graphed else None
        out, feats = cache.run(key, (0, batch), _pinned(inputs), lambda b: self._model(b, argmax))
        return out, feats

    # --- sessions join and leave -----------------------------------------------------------

    # no_grad, not inference_mode: the storage may be allocated here, and rows leaving move
    # its entries in place outside any inference block.
    @torch.no_grad()
    def join(self, sessions: Sequence[NewSession]) -> list[Prefilled]:
        """Prefill new sessions in one eager forward (ragged prompts, padded), each into a
        fresh row after the rows in use, and sample their first tokens. Checks every
        session before touching the cache, so a bad one leaves the batch as it was.

        A resumed session runs its prompt and every resumed token but the last, which is
        pending again, as VerifySession.prefill does: its rounds then draw the same random
        numbers, hence the same tokens, as the run it resumes."""
        context = self.target.max_positions
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
            if any(t < 0 or t >= self.target.vocab_size for t in s.prompt_ids + s.resume):
                raise InputError(f"session {s.key}: prompt tokens must be in [0, {self.target.vocab_size})")
        if not sessions:
            return []
        cache = self.cache
        rows = cache.add_rows(len(sessions))
        prompts = [list(s.prompt_ids + s.resume[:-1]) for s in sessions]
        width = max(len(p) for p in prompts)
        cache.reserve(width)
        inputs = batch_inputs(prompts, None, [0] * len(prompts), width, len(prompts), cache.capacity, rows.start)
        last = torch.tensor([len(p) - 1 for p in prompts], device=cache.device)
        logits, feats = cache.run(None, (rows.start, rows.stop), _pinned(inputs),
                                  lambda b: self._model(b, argmax=False, logits_at=last))
        out = []
        for i, (s, row) in enumerate(zip(sessions, rows)):
            cache.lengths[row] = len(prompts[i])
            if s.resume:
                kept, token = list(s.resume), s.resume[-1]
                done = bool(set(s.resume) & s.stop.stop_token_ids)
            else:
                token = sample_token(logits[i], len(prompts[i]), s.params)
                kept, done = s.stop.cut(0, [token])
            self.rows.append(VerifyRow(s, kept, done))
            out.append(Prefilled(feats[i, : len(prompts[i])], token, done))
        return out

    def leave(self, row: int) -> None:
        """Drop session `row`; the last row's session takes its place (as in the cache)."""
        moved = self.cache.remove_row(row)
        last = self.rows.pop()
        if moved is not None:
            self.rows[row] = last

    # --- rounds ----------------------------------------------------------------------------

    def check(self, trees: Sequence[DraftTree | None]) -> None:
        """Raise InputError naming the first session whose tree is unfit; nothing changes.
        trees[i] is row i's tree, or None for a row that sits the round out."""
        if len(trees) != len(self.rows):
            raise InputError(f"got {len(trees)} trees for {len(self.rows)} sessions")
        for i, tree in enumerate(trees):
            if tree is not None:
                self.check_row(i, tree)

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
    def verify(self, trees: Sequence[DraftTree | None]) -> list[RoundResult | None]:
        """One target forward over every session's tree (trees[i] for row i), then per
        session acceptance, compaction and stopping, as VerifySession.verify does.

        A row whose tree is None sits the round out (its result is None): it is padding in
        the forward, which writes only scratch slots past its committed entries, and its
        cache and state stay as they were. Rows after the last tree are left out of the
        forward altogether."""
        self.check(trees)
        live = [i for i, t in enumerate(trees) if t is not None]
        if not live:
            return [None] * len(trees)
        n = live[-1] + 1
        greedy = all(self.rows[i].session.params.greedy for i in live)
        committed = list(self.cache.lengths[:n])
        tokens = [t.tokens.tolist() if t is not None else [] for t in trees[:n]]
        parents = [t.parents.tolist() if t is not None else [] for t in trees[:n]]
        out, feats = self._forward(tokens, parents, greedy)
        best = out.cpu() if greedy else None  # the round's one sync
        moves, paths, bonuses = [], [], []
        for i in live:
            tree, params = trees[i], self.rows[i].session.params
            if params.greedy:
                argmax = best[i, : len(tree)] if best is not None else out[i, : len(tree)].argmax(-1).cpu()
                acc = accept_greedy(tree.tokens, tree.parents, argmax)
                path, bonus = acc.path, acc.bonus_token
            else:
                path, bonus = accept_sampled(tree, out[i, : len(tree)], committed[i], params)
            bonuses.append(bonus)
            moves.append(RowCompaction(i, committed[i], tuple(path)))
            paths.append(path)
        # Every row's accepted features in one gather (copied out of the graph's output).
        width = feats.shape[1]
        flat = torch.tensor([i * width + p for i, path in zip(live, paths) for p in path], device=feats.device)
        accepted = feats.reshape(-1, feats.shape[-1]).index_select(0, flat).split([len(p) for p in paths])
        results: list[RoundResult | None] = [None] * len(trees)
        for i, path, bonus, features in zip(live, paths, bonuses, accepted):
            row, tree = self.rows[i], trees[i]
            proposed = tree.tokens[path[1:]].tolist() + [bonus]
            kept, row.done = row.session.stop.cut(len(row.generated), proposed)
            row.generated += kept
            results[i] = RoundResult(kept, features, len(path) - 1, row.done)
        self.cache.compact(moves)
        return results

    @torch.inference_mode()
    def step_plain(self) -> list[int]:
        """Plain batched decoding: every session feeds its pending token and samples the next
        one (one forward for all). Returns the sampled tokens, row by row."""
        rows = self.rows
        if any(r.done for r in rows):
            raise InputError("a session in the batch has already finished")
        greedy = all(r.session.params.greedy for r in rows)
        out, _ = self._forward([[r.generated[-1]] for r in rows], [[-1]] * len(rows), greedy)
        best = out[:, 0].cpu() if greedy else None
        tokens = []
        for i, row in enumerate(rows):
            self.cache.lengths[i] += 1
            position = self.cache.lengths[i]
            token = int(best[i]) if best is not None else sample_token(out[i, 0], position, row.session.params)
            kept, row.done = row.session.stop.cut(len(row.generated), [token])
            row.generated += kept
            tokens.append(token)
        return tokens


def _pinned(inputs: ForwardInputs) -> dict[str, torch.Tensor]:
    """The inputs as a dict, in pinned host memory where CUDA is there (async copies)."""
    d = inputs.as_dict()
    if torch.cuda.is_available():
        d = {k: v.pin_memory() for k, v in d.items()}
    return d
