"""Batched verification over a tensor-parallel target against the unsharded BatchVerifier.

Two gloo processes (rank 0 driving a `BatchVerifier` over a `TensorParallelTarget`, rank 1
mirroring in `serve_mirror`) run the tiny Llama sharded in two through one scripted run:
sessions of ragged prompts join (greedy and sampled, one of them resumed, one joining half
way), ragged trees are verified with rows sitting rounds out, a plain batched step, rows
leave (the last row moving into the freed one), the cache grows past its first capacity,
and a second batch is opened and dropped. Every prefill, round and step gives the unsharded
tokens and features, and the two ranks' caches hold the unsharded cache's halves.
(The wire format of the batch calls is tested here too, in one process.)
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from aerie.batch.cache import BatchKVCache, RowCompaction
from aerie.batch.model import ForwardShape
from aerie.batch.trees import TreeBatch
from aerie.batch.verify import BatchVerifier, NewSession
from aerie.engine import Engine
from aerie.parallel.mirror import (
    apply_batch_call,
    batch_compact_call,
    batch_forward_call,
    batch_open_call,
    batch_prefill_call,
    batch_remove_row_call,
)
from aerie.parallel.protocol import Op, decode, encode
from tests.ranks import run_ranks
from aerie.sampling import SamplingParams
from aerie.target import FeatureSpec, Target, eagle3_default_layers
from aerie.tree import DraftTree, TreeConfig
from aerie.verifier import StopCriteria
from tests.tiny import tiny_llama

WORLD = 2
LAYERS = 6
SPEC = FeatureSpec("eagle3", eagle3_default_layers(LAYERS))
MAX_NEW = 24
ROWS = 4
FIRST_CAPACITY = 16  # small: the batch must grow (on every rank alike) during the run
ATOL = 1e-5
GREEDY = SamplingParams()
# key: (prompt, sampling, resumed tokens)
FIRST = {
    "a": ([5, 9, 1, 33, 7, 2], GREEDY, ()),
    "b": ([60, 61, 7], SamplingParams(temperature=1.0, seed=5), ()),
    "c": ([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9], GREEDY, ()),
}
LATE = {"d": ([11, 12, 13, 14], SamplingParams(0.8, 0.9, 20, 7), (40, 41, 42))}
DEPTHS = (5, 2, 0, 3, 6, 1)  # draft depths, cycled over rows and rounds: ragged trees


# --- the scripted run, on any target ----------------------------------------------------------


def unsharded_target() -> Target:
    return Target(tiny_llama(layers=LAYERS, seed=0), SPEC)


def references() -> dict[str, list[int]]:
    """Each session's greedy continuation (drafts that the greedy sessions accept in part)."""
    engine = Engine(unsharded_target(), None, TreeConfig())
    return {k: engine.generate(p + list(r), GREEDY, StopCriteria(MAX_NEW + 8), "vanilla").token_ids
            for k, (p, _, r) in {**FIRST, **LATE}.items()}


def draft_tree(root: int, continuation: list[int], depth: int) -> DraftTree:
    """root, a decoy child, then `depth` tokens of the continuation with the 4th one wrong."""
    chain = list(continuation[:depth])
    if len(chain) >= 4:
        chain[3] = (chain[3] + 1) % 64
    tokens = [root, (root + 7) % 64, *chain]
    parents = [-1, 0, *([0] + list(range(2, 1 + len(chain))))[: len(chain)]]
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.zeros(len(tokens)))


def new_sessions(sessions: dict) -> list[NewSession]:
    return [NewSession(k, tuple(p), params, StopCriteria(MAX_NEW), tuple(r)) for k, (p, params, r) in sessions.items()]


def batch_script(target) -> tuple[dict, BatchVerifier]:
    """Returns every output (by name) and the verifier (its cache holds the rows left)."""
    refs = references()
    out: dict = {}
    verifier = BatchVerifier(target, BatchKVCache(LAYERS, ROWS, FIRST_CAPACITY, torch.device("cpu")),
                             max_tree_nodes=16)
    rounds = [0]

    def record_prefill(sessions: dict) -> None:
        for s, p in zip(sessions, verifier.join(new_sessions(sessions))):
            out[f"prefill.{s}.token"], out[f"prefill.{s}.features"], out[f"prefill.{s}.done"] = p.token, p.features, p.done

    def verify_round(sitting_out: frozenset = frozenset()) -> None:
        n = rounds[0] = rounds[0] + 1
        trees = []
        for i, row in enumerate(verifier.rows):
            key = row.session.key
            if row.done or key in sitting_out:
                trees.append(None)
                continue
            ref, g = refs[key], len(row.generated) - len(row.session.resume)
            trees.append(draft_tree(row.generated[-1], ref[g:], DEPTHS[(n + i) % len(DEPTHS)]))
        for row, result in zip(verifier.rows, verifier.verify(trees)):
            if result is not None:
                name = f"round{n}.{row.session.key}"
                out[f"{name}.tokens"], out[f"{name}.accepted"] = result.new_tokens, result.accepted_draft
                out[f"{name}.features"], out[f"{name}.done"] = result.features.clone(), result.done

    def leave(key: str) -> None:
        row = next(i for i, r in enumerate(verifier.rows) if r.session.key == key)
        out.setdefault("left", []).append((key, row, len(verifier.rows)))
        verifier.leave(row)

    record_prefill(FIRST)
    # A second batch, dropped: its rows go on the other ranks too, and the first batch is untouched.
    other = BatchVerifier(target, BatchKVCache(LAYERS, 2, FIRST_CAPACITY, torch.device("cpu")))
    other.join(new_sessions({"x": FIRST["a"]}))
    del other
    gc.collect()  # the cache's layers point back at it: only the cycle collector frees it
    verify_round()
    out["plain"] = verifier.step_plain()
    verify_round(frozenset({"b"}))  # greedy rows only: the argmax forward
    record_prefill(LATE)  # joins half way, resumed
    verify_round(frozenset({"c"}))
    leave("a")  # row 0 leaves: the last row moves into it
    for _ in range(5):
        verify_round()
        for row in list(verifier.rows):
            if row.done and len(verifier.rows) > 1:
                leave(row.session.key)
    out["generated"] = {r.session.key: list(r.generated) for r in verifier.rows}
    out["lengths"] = list(verifier.cache.lengths[: verifier.cache.in_use])
    return out, verifier


def kv_rows(cache: BatchKVCache) -> dict[str, torch.Tensor]:
    """Each row's entries in use: [layers, 2, kv heads, length, head dim]."""
    return {f"row{r}": cache.storage[:, :, r, :, : cache.lengths[r]].clone() for r in range(cache.in_use)}


# --- the two ranks ----------------------------------------------------------------------------


def rank_main(rank: int, port: int, out_dir: str) -> None:
    from aerie.parallel.launch import join_group, prepare_shard_
    from aerie.parallel.mirror import MirrorGroup, TensorParallelTarget, serve_mirror

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False)
    group = join_group(rank, WORLD, "cpu", rank, store)
    model = tiny_llama(layers=LAYERS, seed=0)
    prepare_shard_(model, group)
    if rank > 0:
        held = serve_mirror(Target(model, FeatureSpec("eagle1")), group.channel())
        batches = {i: kv_rows(b.cache) for i, b in held.batches.items()}
        torch.save({"batches": batches, "capacity": [b.cache.capacity for b in held.batches.values()]},
                   Path(out_dir) / "rank1.pt")
        group.leave()
        return
    mirror = MirrorGroup(group.channel())
    out, verifier = batch_script(TensorParallelTarget(Target(model, SPEC), mirror))
    mirror.shutdown()  # while `verifier` is alive, so that rank 1 still holds its batch
    torch.save({"out": out, "kv": kv_rows(verifier.cache), "capacity": verifier.cache.capacity},
               Path(out_dir) / "rank0.pt")
    group.leave()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, dict]:
    out_dir = tmp_path_factory.mktemp("tp-batch")
    run_ranks(rank_main, WORLD, str(out_dir))
    return torch.load(out_dir / "rank0.pt"), torch.load(out_dir / "rank1.pt")


@pytest.fixture(scope="module")
def unsharded() -> tuple[dict, BatchVerifier]:
    return batch_script(unsharded_target())


def test_sharded_batch_verification_equals_unsharded(two_ranks, unsharded):
    rank0, _ = two_ranks
    want, _ = unsharded
    got = rank0["out"]
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[name], value, atol=ATOL, rtol=ATOL, msg=name)
        else:
            assert got[name] == value, name
    # The run exercised what it means to: drafts accepted (compaction moved entries) in
    # greedy and sampled rows, rows sitting out, leaves that moved the last row, growth.
    accepted = {k: v for k, v in want.items() if k.endswith(".accepted")}
    assert any(v >= 2 for k, v in accepted.items() if ".a." in k or ".c." in k)
    assert any(v >= 1 for k, v in accepted.items() if ".b." in k or ".d." in k)
    assert "round2.b.tokens" not in want and "round3.c.tokens" not in want and "round3.d.tokens" in want
    assert any(row < count - 1 for _, row, count in want["left"])
    assert rank0["capacity"] > FIRST_CAPACITY


def test_sharded_batch_equals_plain_decoding_for_greedy_sessions(two_ranks):
    rank0, _ = two_ranks
    refs = references()
    out = rank0["out"]
    for key in ("a", "c"):
        tokens = [out[f"prefill.{key}.token"]]
        for n in range(1, 20):
            tokens += out.get(f"round{n}.{key}.tokens", [])
            if n == 1:
                tokens.append(out["plain"][list(FIRST).index(key)])
        assert tokens == refs[key][: len(tokens)] and len(tokens) >= 10, key


def test_each_rank_holds_its_half_of_the_batch_cache(two_ranks, unsharded):
    rank0, rank1 = two_ranks
    _, verifier = unsharded
    want = kv_rows(verifier.cache)
    # Rank 1 holds exactly the live batch: the dropped one was released on its side too.
    assert len(rank1["batches"]) == 1
    (halves,) = rank1["batches"].values()
    assert halves.keys() == want.keys() == rank0["kv"].keys() and len(want) >= 2
    assert rank1["capacity"] == [rank0["capacity"]]
    for name, full in want.items():
        assert rank0["kv"][name].shape[2] == halves[name].shape[2] == full.shape[2] // 2
        torch.testing.assert_close(torch.cat([rank0["kv"][name], halves[name]], dim=2), full, atol=ATOL, rtol=ATOL,
                                   msg=name)


# --- the batch calls --------------------------------------------------------------------------


class RecordingBatchModel:
    """Records the arguments `apply_batch_call` decodes for each operation."""

    def __init__(self):
        self.calls: list[tuple] = []

    def prefill(self, prompts):
        self.calls.append(("prefill", prompts))

    def run_forward(self, trees, shape):
        self.calls.append(("forward", trees.tokens.tolist(), trees.parents.tolist(), trees.sizes, shape))

    def compact(self, moves):
        self.calls.append(("compact", moves))

    def remove_row(self, row):
        self.calls.append(("remove_row", row))


def test_batch_calls_round_trip_through_the_wire_format():
    cache = BatchKVCache(2, 4, 32, torch.device("cpu"))
    opened = decode(*encode(batch_open_call(3, cache)))
    assert (opened.op, opened.cache_id, opened.tensors[0].tolist()) == (Op.BATCH_OPEN, 3, [4, 32, 0])
    shape = ForwardShape(4, 4, True, False)
    moves = [RowCompaction(2, 10, (0, 3, 5)), RowCompaction(0, 4, ()), RowCompaction(1, 7, (0,))]
    calls = [
        batch_prefill_call(3, [[1, 2, 3], [4]]),
        batch_forward_call(3, TreeBatch(torch.tensor([[7, 8, 9], [0, 0, 0], [5, 0, 0]]),
                                        torch.tensor([[-1, 0, 0], [-1, -1, -1], [-1, -1, -1]]),
                                        torch.zeros(3, 3), (3, 0, 1)), shape),
        batch_compact_call(3, moves),
        batch_remove_row_call(3, 2),
    ]
    model = RecordingBatchModel()
    for call in calls:
        back = decode(*encode(call))
        assert (back.op, back.cache_id) == (call.op, 3)
        apply_batch_call(model, back)
    assert model.calls == [
        ("prefill", [[1, 2, 3], [4]]),
        ("forward", [[7, 8, 9], [0, 0, 0], [5, 0, 0]], [[-1, 0, 0], [-1, -1, -1], [-1, -1, -1]], (3, 0, 1), shape),
        ("compact", moves),
        ("remove_row", 2),
    ]
    with pytest.raises(ValueError, match="not an operation on a batch"):
        apply_batch_call(model, opened)
