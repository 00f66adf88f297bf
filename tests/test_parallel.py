"""Tensor parallelism against the unsharded target.

- Two gloo processes (rank 0 driving, rank 1 mirroring) run the tiny Llama sharded in two:
  prefill, a tree forward, compaction to an accepted path and another forward give the
  unsharded logits and features, each rank's KV cache holds its half of the heads, and
  greedy and sampled generation through the sharded verifier are the unsharded ones.
- The wire format of the mirrored calls, the cache bookkeeping of `MirrorGroup`, the
  torchrun environment and the `--tensor-parallel` setting.
(Sharding itself, in one process: tests/test_parallel_shard.py.)
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
import torch.distributed as dist

from aerie.engine import Engine
from aerie.errors import InputError
from aerie.parallel.launch import Rendezvous, rendezvous_from_env
from aerie.parallel.mirror import MirrorGroup, OutOfStep, TensorParallelTarget
from aerie.parallel.protocol import HEADER_LEN, Call, Op, decode, encode, payload_len
from aerie.sampling import SamplingParams
from aerie.target import FeatureSpec, StaticKV, Target, eagle3_default_layers
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria
from tests.ranks import run_ranks
from tests.tiny import tiny_head, tiny_llama

WORLD = 2
LAYERS = 6
SPEC = FeatureSpec("eagle3", eagle3_default_layers(LAYERS))
PROMPTS = ([5, 9, 1, 33, 7, 2], [60, 61, 7, 8, 9, 10, 11, 12])
TREE_TOKENS = [4, 10, 11, 12, 13, 14, 15]
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, 4]
ACCEPTED = [0, 1, 4, 6]  # root -> 1 -> 4 -> 6
AFTER = [21, 22, 23]
GEN_PROMPT = [3, 14, 15, 9, 26, 5]
GEN_TOKENS = 30
SAMPLED = SamplingParams(temperature=1.0, seed=5)
ATOL = 1e-5


# --- the scripted calls, run on any target ---------------------------------------------------


def verify_script(target) -> tuple[dict[str, torch.Tensor], list]:
    """Two interleaved sequences, each: prefill, a tree, compaction to an accepted path, one
    more forward. A third sequence is dropped half way. Returns the outputs and the live caches."""
    caches = [target.new_cache() for _ in PROMPTS]
    out: dict[str, torch.Tensor] = {}
    committed = []
    for i, (cache, prompt) in enumerate(zip(caches, PROMPTS)):
        res = target.forward(cache, torch.tensor(prompt))
        out[f"prefill{i}.logits"], out[f"prefill{i}.features"] = res.logits, res.features
        committed.append(cache.get_seq_length())
    dropped = target.new_cache()
    target.forward(dropped, torch.tensor(PROMPTS[0]))
    del dropped  # its id rides on the next call, which must still find the live caches right
    for i, cache in enumerate(caches):
        res = target.forward(cache, torch.tensor(TREE_TOKENS), tree_parents=torch.tensor(TREE_PARENTS))
        out[f"tree{i}.logits"], out[f"tree{i}.features"] = res.logits, res.features
    for i, cache in enumerate(caches):
        target.compact(cache, committed[i], ACCEPTED)
        res = target.forward(cache, torch.tensor(AFTER))
        out[f"after{i}.logits"], out[f"after{i}.features"] = res.logits, res.features
    return out, caches


def generations(target) -> dict[str, list[int]]:
    head = tiny_head(tiny_target_unsharded(), "eagle3", draft_vocab=48)
    head.attach(target)
    engine = Engine(target, head, TreeConfig(depth=4, top_k=3, total_tokens=8))
    greedy = engine.generate(GEN_PROMPT, SamplingParams(), StopCriteria(GEN_TOKENS), "eagle")
    return {
        "greedy": greedy.token_ids,
        "greedy_accepted": [r.accepted for r in greedy.rounds],
        "vanilla": engine.generate(GEN_PROMPT, SamplingParams(), StopCriteria(GEN_TOKENS), "vanilla").token_ids,
        "sampled": engine.generate(GEN_PROMPT, SAMPLED, StopCriteria(GEN_TOKENS), "eagle").token_ids,
    }


def tiny_target_unsharded() -> Target:
    return Target(tiny_llama(layers=LAYERS, seed=0), SPEC)


def kv_of(caches) -> dict[str, torch.Tensor]:
    return {f"cache{i}.layer{j}.{kind}": getattr(layer, kind).clone()
            for i, cache in enumerate(caches) for j, layer in enumerate(cache.layers) for kind in ("keys", "values")}


# --- the two ranks ----------------------------------------------------------------------------


def rank_main(rank: int, port: int, out_dir: str, static: bool = False) -> None:
    """One rank of the two-process run; rank 0 saves what it saw, rank 1 its caches. With
    `static`, every rank runs static caches (the GPU path, without graphs on the CPU)."""
    from aerie.parallel.launch import join_group, prepare_shard_
    from aerie.parallel.mirror import serve_mirror

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False)
    group = join_group(rank, WORLD, "cpu", rank, store)
    model = tiny_llama(layers=LAYERS, seed=0)  # the same weights on every rank
    plan = prepare_shard_(model, group)
    kv = StaticKV(cuda_graphs=False, initial_capacity=8, pooled=1) if static else None  # small: it must grow
    if rank > 0:
        held = serve_mirror(Target(model, FeatureSpec("eagle1"), static=kv), group.channel())
        if not static:
            torch.save({"heads": plan.kv_heads, **kv_of(held.caches.values())}, Path(out_dir) / "rank1.pt")
        group.leave()
        return
    mirror = MirrorGroup(group.channel())
    target = TensorParallelTarget(Target(model, SPEC, static=kv), mirror)
    out, caches = verify_script(target)
    gens = generations(target)
    kv = kv_of(caches)
    mirror.shutdown()  # while `caches` is alive, so rank 1 still holds its halves
    torch.save({"out": out, "gens": gens, "kv": kv, "heads": plan.kv_heads}, Path(out_dir) / "rank0.pt")
    group.leave()


def run_two_ranks(out_dir: Path, static: bool) -> None:
    run_ranks(rank_main, WORLD, str(out_dir), static)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, dict]:
    out_dir = tmp_path_factory.mktemp("tp")
    run_two_ranks(out_dir, static=False)
    return torch.load(out_dir / "rank0.pt"), torch.load(out_dir / "rank1.pt")


def test_sharded_tree_verify_equals_unsharded(two_ranks):
    rank0, _ = two_ranks
    ref, _ = verify_script(tiny_target_unsharded())
    assert rank0["out"].keys() == ref.keys()
    for name, want in ref.items():
        torch.testing.assert_close(rank0["out"][name], want, atol=ATOL, rtol=ATOL, msg=name)


def test_each_rank_caches_its_half_of_the_heads_after_compaction(two_ranks):
    rank0, rank1 = two_ranks
    _, ref_caches = verify_script(tiny_target_unsharded())
    ref = kv_of(ref_caches)
    assert rank0["heads"] == rank1["heads"] == 1  # of the tiny Llama's 2 key/value heads
    # Rank 1 holds exactly the live caches: the dropped one was released on its side too.
    assert rank1.keys() - {"heads"} == ref.keys()
    for name, want in ref.items():
        assert rank0["kv"][name].shape[1] == rank1[name].shape[1] == want.shape[1] // 2
        sequence = int(name.split(".")[0].removeprefix("cache"))
        assert want.shape[2] == len(PROMPTS[sequence]) + len(ACCEPTED) + len(AFTER)
        torch.testing.assert_close(torch.cat([rank0["kv"][name], rank1[name]], dim=1), want, atol=ATOL,
                                   rtol=ATOL, msg=name)


def test_sharded_generation_equals_unsharded_token_for_token(two_ranks):
    rank0, _ = two_ranks
    ref = generations(tiny_target_unsharded())
    assert len(ref["greedy"]) == GEN_TOKENS
    assert rank0["gens"]["greedy"] == ref["greedy"] == ref["vanilla"] == rank0["gens"]["vanilla"]
    assert rank0["gens"]["greedy_accepted"] == ref["greedy_accepted"]
    assert sum(ref["greedy_accepted"]) > 0  # compaction kept accepted drafts, not only roots
    assert rank0["gens"]["sampled"] == ref["sampled"]


def test_sharded_static_caches_equal_unsharded(tmp_path):
    """Every rank on static caches (preallocated, grown by doubling, pooled and handed back
    on release): the outputs and generations are the unsharded model's."""
    run_two_ranks(tmp_path, static=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    ref, _ = verify_script(tiny_target_unsharded())
    for name, want in ref.items():
        torch.testing.assert_close(rank0["out"][name], want, atol=ATOL, rtol=ATOL, msg=name)
    gens = generations(tiny_target_unsharded())
    assert rank0["gens"]["greedy"] == gens["greedy"] and rank0["gens"]["sampled"] == gens["sampled"]


# --- the mirrored calls -----------------------------------------------------------------------


def test_calls_round_trip_through_the_wire_format():
    call = Call(Op.FORWARD, 7, (torch.tensor([4, 10, 11]), torch.tensor([-1, 0, 0])), released=(2, 5))
    header, payload = encode(call)
    assert header.shape == (HEADER_LEN,) and payload_len(header) == payload.numel() == 8
    back = decode(header, payload)
    assert (back.op, back.cache_id, back.released) == (Op.FORWARD, 7, (2, 5))
    assert [t.tolist() for t in back.tensors] == [[4, 10, 11], [-1, 0, 0]]
    empty = decode(*encode(Call(Op.SHUTDOWN)))
    assert (empty.op, empty.tensors, empty.released) == (Op.SHUTDOWN, (), ())
    with pytest.raises(ValueError, match="1-D int64"):
        Call(Op.FORWARD, 0, (torch.tensor([1.0]),))


class RecordingChannel:
    def __init__(self):
        self.sent: list[Call] = []

    def send(self, call: Call) -> None:
        self.sent.append(call)

    def receive(self) -> Call:
        raise AssertionError("rank 0 never receives")


def test_mirror_numbers_caches_and_reports_dropped_ones_on_the_next_call():
    channel = RecordingChannel()
    group = MirrorGroup(channel)
    target = TensorParallelTarget(Target(tiny_llama(layers=1), FeatureSpec("eagle1")), group)
    a, b = target.new_cache(), target.new_cache()
    target.forward(a, torch.tensor([1, 2, 3]))
    target.forward(b, torch.tensor([4]))
    del a
    target.compact(b, 0, [0])
    c = target.new_cache()
    target.release_cache(c)  # released at once, though `c` is still referenced
    target.forward(b, torch.tensor([5]))
    del c  # and not a second time when it is collected
    group.shutdown()
    group.shutdown()
    assert [(c.op, c.cache_id, c.released) for c in channel.sent] == [
        (Op.FORWARD, 0, ()), (Op.FORWARD, 1, ()), (Op.COMPACT, 1, (0,)), (Op.FORWARD, 1, (2,)),
        (Op.SHUTDOWN, -1, ()),
    ]
    assert [t.tolist() for t in channel.sent[2].tensors] == [[0], [0]]
    with pytest.raises(OutOfStep, match="shut down"):
        target.forward(b, torch.tensor([6]))


def test_a_failed_local_call_breaks_the_group():
    from aerie_rpc.status import status_of

    channel, reports = RecordingChannel(), []
    group = MirrorGroup(channel, on_broken=reports.append)
    target = TensorParallelTarget(Target(tiny_llama(layers=1), FeatureSpec("eagle1")), group)
    cache = target.new_cache()
    with pytest.raises(IndexError):
        target.forward(cache, torch.tensor([1000]))  # past the vocabulary: fails mid-forward
    assert len(channel.sent) == 1  # the other ranks were told, and are now out of step
    assert len(reports) == 1 and "out of step after a failed forward (IndexError" in reports[0]
    with pytest.raises(OutOfStep, match="restart the verify service") as err:
        target.forward(cache, torch.tensor([1]))
    assert len(channel.sent) == 1
    # Answered as the server's failure, not as a bad request.
    assert status_of(err.value)[0] == grpc.StatusCode.INTERNAL
    with pytest.raises(ValueError, match="not made by a TensorParallelTarget"):
        TensorParallelTarget(Target(tiny_llama(layers=1), FeatureSpec("eagle1")), MirrorGroup(channel)).forward(
            Target(tiny_llama(layers=1), FeatureSpec("eagle1")).new_cache(), torch.tensor([1]))


# --- launching ----------------------------------------------------------------------------------

TORCHRUN = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}


def test_rendezvous_comes_from_torchrun_variables_or_is_spawned():
    assert rendezvous_from_env({}, 2) is None
    assert rendezvous_from_env(TORCHRUN, 2) == Rendezvous(1, 2, 1, "10.0.0.1", 29500)
    with pytest.raises(InputError, match="WORLD_SIZE is 2 but --tensor-parallel is 4"):
        rendezvous_from_env(TORCHRUN, 4)
    with pytest.raises(InputError, match="MASTER_PORT is not set"):
        rendezvous_from_env({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, 2)


def test_tensor_parallel_setting_reads_flag_and_environment():
    from aerie_rpc.config import from_args, parser_for
    from verify_service.config import VerifyConfig

    parser = parser_for(VerifyConfig, "verify", "")
    assert from_args(VerifyConfig, parser.parse_args([]), environ={}).tensor_parallel == 1
    assert from_args(VerifyConfig, parser.parse_args(["--tensor-parallel", "2"]), environ={}).tensor_parallel == 2
    assert from_args(VerifyConfig, parser.parse_args([]), environ={"AERIE_TENSOR_PARALLEL": "4"}).tensor_parallel == 4
    with pytest.raises(InputError, match="--tensor-parallel must be >= 1"):
        from_args(VerifyConfig, parser.parse_args(["--tensor-parallel", "0"]), environ={})


# --- the sharded verify cost (the 70B measurement's tool, on a tiny shape) ---------------------


def test_sharded_verify_cost_runs_every_rank_and_reports_the_shard(capsys):
    from transformers import LlamaConfig

    from aerie.bench.verify_cost_tp import run_sharded_verify_cost
    from aerie.cli import main

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    result = run_sharded_verify_cost("tiny", config, WORLD, "cpu", torch.float32, sizes=(1, 4), prefix=16, repeats=2)
    assert [p["tree_size"] for p in result["curve"]] == [1, 4]
    assert all(p["ms_median"] > 0 and p["device_ms"] is None for p in result["curve"])
    # Rank 0's shard: half of every layer's projections, the whole embedding and LM head, the norms.
    h, inter, v, layers = 64, 128, 96, 3
    per_layer = h * h // 2 + 2 * (h * h // 4) + h * h // 2 + 3 * h * inter // 2 + 2 * h
    assert result["weights_gb"] * 1e9 == 4 * (layers * per_layer + 2 * v * h + h)
    assert result["tensor_parallel"] == WORLD and result["one_token_vs_floor"] is None
    # The CLI measures only the random-weight shapes sharded.
    assert main(["verify-cost", "--shapes", "demo", "--tensor-parallel", "2", "--device", "cpu", "--out", "x.json"]) == 2
    assert "random-weight shapes" in capsys.readouterr().err
