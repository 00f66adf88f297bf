"""The verifier side of one sequence: the target's KV cache, acceptance and stopping.

A `VerifySession` owns everything the target needs for one sequence. It is driven either by
the in-process engine or by the verify service, one `verify` call per speculative round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from aerie.accept import accept_greedy, walk_point_mass
from aerie.errors import InputError
from aerie.kvcache import pinned_tensor
from aerie.sampling import SamplingParams, position_uniform, position_uniforms, sample_from, warp_probs
from aerie.target import Target
from aerie.tree import DraftTree, validate_tree


@dataclass(frozen=True)
class StopCriteria:
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")

    def cut(self, generated_before: int, tokens: list[int]) -> tuple[list[int], bool]:
        """Tokens that may still be emitted, and whether generation ends with them."""
        room = self.max_new_tokens - generated_before
        for i, tok in enumerate(tokens[:room]):
            if tok in self.stop_token_ids:
                return tokens[: i + 1], True
        kept = tokens[:room]
        return kept, generated_before + len(kept) >= self.max_new_tokens


@dataclass
class RoundResult:
    new_tokens: list[int]  # accepted draft tokens, then the bonus token (after stop cuts)
    # [len(path), F]: target features of the root and accepted nodes; None from a device round
    # that a later round, launched before it was read, has already taken them from
    features: torch.Tensor | None
    accepted_draft: int  # draft tokens accepted (before stop cuts)
    done: bool


@dataclass
class VerifySession:
    target: Target
    params: SamplingParams
    stop: StopCriteria
    prompt_ids: list[int]
    max_tree_nodes: int = 128
    # Tokens already generated before a resume; the last one is still pending (see prefill).
    resume_tokens: list[int] = field(default_factory=list)
    cache: object = None
    generated: list[int] = field(default_factory=list)
    done: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InputError("prompt is empty")
        context = self.target.max_positions
        if len(self.resume_tokens) >= self.stop.max_new_tokens:
            raise InputError(
                f"cannot resume after {len(self.resume_tokens)} tokens: max_new_tokens is {self.stop.max_new_tokens}"
            )
        if len(self.prompt_ids) + self.stop.max_new_tokens > context:
            raise InputError(
                f"prompt of {len(self.prompt_ids)} tokens plus max_new_tokens {self.stop.max_new_tokens} "
                f"exceeds the model's context of {context} tokens"
            )
        self.cache = self.target.new_cache()

    def close(self) -> None:
        """Give the KV cache back to the target for the next sequence."""
        if self.cache is not None:
            self.target.release_cache(self.cache)
            self.cache = None

    @property
    def committed(self) -> int:
        """Tokens whose keys and values are in the cache (the pending last token is not)."""
        return self.cache.get_seq_length()

    def prefill(self) -> tuple[torch.Tensor, int]:
        """Run the prompt; return its features [n, F] and the pending token.

        Fresh, the pending token is the first generated one, sampled here. Resumed, the
        prompt and every resumed token but the last are run, and the last is pending again,
        exactly as it was at the round boundary where the earlier run stopped: the rounds
        then continue with the same random numbers, hence the same tokens.
        """
        if self.resume_tokens:
            out = self.target.forward(self.cache, torch.tensor(self.prompt_ids + self.resume_tokens[:-1]))
            self.generated = list(self.resume_tokens)
            self.done = bool(set(self.resume_tokens) & self.stop.stop_token_ids)
            return out.features, self.generated[-1]
        out = self.target.forward(self.cache, torch.tensor(self.prompt_ids))
        token = sample_token(out.logits[-1], len(self.prompt_ids), self.params)
        self.generated, self.done = self.stop.cut(0, [token])
        return out.features, token

    def step_plain(self) -> int:
        """Plain decoding: feed the pending token, sample the next one."""
        out = self.target.forward(self.cache, torch.tensor(self.generated[-1:]))
        token = sample_token(out.logits[-1], self.committed, self.params)
        self.emit([token])
        return token

    def emit(self, proposed: list[int]) -> list[int]:
        """Append a round's tokens up to a stop token or the length limit; the ones kept."""
        kept, self.done = self.stop.cut(len(self.generated), proposed)
        self.generated += kept
        return kept

    def verify(self, tree: DraftTree) -> RoundResult:
        validate_tree(tree.tokens, tree.parents, self.target.vocab_size, self.max_tree_nodes)
        if self.done:
            raise InputError("generation is already finished")
        if int(tree.tokens[0]) != self.generated[-1]:
            raise InputError(f"tree root {int(tree.tokens[0])} is not the last generated token {self.generated[-1]}")
        committed = self.committed
        out = self.target.forward(self.cache, tree.tokens, tree_parents=tree.parents)
        if self.params.greedy:
            acc = accept_greedy(tree.tokens, tree.parents, out.logits.argmax(-1))
            path, bonus = acc.path, acc.bonus_token
        else:
            path, bonus = accept_sampled(tree, out.logits, committed, self.params)
        self.target.compact(self.cache, committed, path)
        kept = self.emit(tree.tokens[path[1:]].tolist() + [bonus])
        features = out.features[pinned_tensor(path).to(out.features.device, non_blocking=True)]
        return RoundResult(new_tokens=kept, features=features, accepted_draft=len(path) - 1, done=self.done)


def sample_token(logits: torch.Tensor, position: int, params: SamplingParams) -> int:
    """The token at `position`, drawn from `logits` with that position's random number."""
    if params.greedy:
        return int(logits.argmax())
    token_u = position_uniform(params.seed, position, 0)
    return int(sample_from(warp_probs(logits, params), torch.tensor(token_u)))


def warp_rows(logits: torch.Tensor, params: Sequence[SamplingParams], rows: Sequence[int]) -> torch.Tensor:
    """`warp_probs(logits[r], params[r])` for each r in `rows` (sampled settings only),
    stacked in that order: rows that share (temperature, top_k, top_p) are warped together."""
    groups: dict[tuple[float, int, float], list[int]] = {}
    for row in rows:
        p = params[row]
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
    order = [row for members in groups.values() for row in members]
    probs = torch.cat([warp_probs(logits[members], params[members[0]]) for members in groups.values()])
    if order == list(rows):
        return probs
    back = {row: i for i, row in enumerate(order)}
    return probs[torch.tensor([back[r] for r in rows], device=probs.device)]


def sample_tokens(logits: torch.Tensor, positions: Sequence[int], params: Sequence[SamplingParams]) -> list[int]:
    """`sample_token` for every row of `logits` [rows, vocab], row r at positions[r] with
    params[r], in a few tensor operations and one sync: every sampled row is drawn in one
    inverse-CDF pass, each with its own position's random number."""
    tokens = logits.argmax(-1)
    rows = [row for row, p in enumerate(params) if not p.greedy]
    if rows:
        probs = warp_rows(logits, params, rows)
        u = torch.tensor([position_uniform(params[r].seed, positions[r], 0) for r in rows], dtype=torch.float64)
        tokens[torch.tensor(rows, device=tokens.device)] = sample_from(probs, u.to(probs.device))
    return tokens.tolist()


@dataclass(frozen=True)
class TreeDraws:
    """The random numbers of a tree verified after `committed` tokens, drawn on demand. Node c
    at depth d is the rank-th candidate for position committed + d, whose (rank + 1)-th number
    decides its test; the bonus token after a path of k nodes is drawn with the first number of
    position committed + k (see sampling.position_uniform). So the same tree gets the same
    decisions wherever it is verified, alone or in a batch."""

    seed: int
    committed: int
    depth: list[int]
    rank: list[int]

    @classmethod
    def of(cls, parents: Sequence[int], committed: int, seed: int) -> TreeDraws:
        depth, rank, width = [0] * len(parents), [0] * len(parents), [0] * len(parents)
        for c in range(1, len(parents)):
            depth[c] = depth[parents[c]] + 1
            rank[c] = width[parents[c]]
            width[parents[c]] += 1
        return cls(seed, committed, depth, rank)

    def sibling(self, node: int) -> float:
        return position_uniform(self.seed, self.committed + self.depth[node], self.rank[node] + 1)

    def bonus(self, path_length: int) -> float:
        return position_uniform(self.seed, self.committed + path_length, 0)


def round_uniforms(seed: int, committed: int, depth: int, width: int) -> np.ndarray:
    """Every random number `TreeDraws` can hand a tree verified after `committed` tokens that
    is at most `depth` deep with at most `width` children a node, drawn at once: [depth + 1,
    width + 1], row i holding the numbers of position committed + 1 + i. So [i, 0] draws the
    bonus token after a path of i + 1 nodes, and [i, r + 1] tests a node at depth i + 1 that
    is its parent's r-th child (r from 0): what a device round takes before it knows its tree."""
    positions = committed + 1 + np.arange(depth + 1)
    return position_uniforms(seed, positions[:, None], np.arange(width + 1)[None, :])


def accept_sampled(tree: DraftTree, logits: torch.Tensor, committed: int,
                   params: SamplingParams) -> tuple[list[int], int]:
    """Sampled acceptance of a tree verified after `committed` tokens: (path, bonus token)."""
    n = len(tree)
    return accept_sampled_rows(tree.tokens[None], tree.parents[None], (n,), logits[None], [0], [committed], [params])[0]


def accept_sampled_rows(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    sizes: Sequence[int],
    logits: torch.Tensor,
    rows: Sequence[int],
    committed: Sequence[int],
    params: Sequence[SamplingParams],
) -> list[tuple[list[int], int]]:
    """Sampled acceptance (`aerie.accept.accept_sampled_path`, with `TreeDraws`) of rows of a
    batch at once: row r's tree is tokens[r], parents[r] (host tensors [b, w], its first
    sizes[r] nodes), verified after committed[r] tokens into logits[r] ([b, w', vocab],
    w' >= its size), with params[r] (sampled). Two reads from the device for all rows: each
    node's probability under its parent, then the bonus tokens; the walks run on the host and
    draw the random numbers of the nodes they test only. Returns (path, bonus) per row of
    `rows`."""
    device = logits.device
    index = torch.tensor(list(rows))
    w = max(sizes[r] for r in rows)
    probs = warp_rows(logits[:, :w], params, rows)  # [k, w, vocab] float64
    tok, par = tokens[index, :w], parents[index, :w]
    picked = torch.arange(len(rows))[:, None].expand(-1, w)
    p_token = probs[picked.to(device), par.clamp_min(0).to(device), tok.to(device)].tolist()
    tok, par = tok.tolist(), par.tolist()
    walks, ends, bonus_u = [], [], []
    for i, r in enumerate(rows):
        n = sizes[r]
        draws = TreeDraws.of(par[i][:n], committed[r], params[r].seed)
        path, rejected = walk_point_mass(tok[i][:n], par[i][:n], p_token[i][:n], draws.sibling)
        walks.append((path, rejected))
        ends.append(path[-1])
        bonus_u.append(draws.bonus(len(path)))
    last = probs[torch.arange(len(rows), device=device), torch.tensor(ends, device=device)]  # [k, vocab]
    dropped = [(i, t) for i, (_, rejected) in enumerate(walks) for t in rejected]
    if dropped:
        at_row, at_token = zip(*dropped)
        last[torch.tensor(at_row, device=device), torch.tensor(at_token, device=device)] = 0.0
    bonus = sample_from(last, torch.tensor(bonus_u, dtype=torch.float64, device=device)).tolist()
    return [(path, b) for (path, _), b in zip(walks, bonus)]
