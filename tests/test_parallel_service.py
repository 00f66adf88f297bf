"""`aerie serve verify --tensor-parallel 2 --device cpu` as a real process (two gloo ranks)
answers Prefill and Verify exactly as the single-process verify service does, over rounds
that accept drafts and reject decoys; on SIGTERM it exits 0 and its worker rank with it.
Started torchrun-style instead (one process per rank, rendezvous from the environment), it
answers the same, and a SIGTERM to every rank at once stops both cleanly. With
`--batch-sessions 4` as well, concurrent sessions of different prompts are verified in
batches over the sharded target and still answer as the single-process service does."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch

from aerie.engine import Engine
from aerie.sampling import SamplingParams
from aerie.target import FeatureSpec, Target, eagle3_default_layers
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria
from aerie_rpc import wire
from aerie_rpc.server import channel
from aerie_rpc.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from tests.services_support import free_port, process_log, spawn, start_verifier, wait_all
from tests.tiny import build_tiny_model

LAYERS = 6
FEATURES = common_pb2.FeatureSpec(kind="eagle3", layers=list(eagle3_default_layers(LAYERS)))
PROMPT = [3, 14, 15, 9, 26, 5]
MAX_NEW = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-tp"))[0]


@pytest.fixture(scope="module")
def verifiers(model_dir, tmp_path_factory):
    """(single-process address, tensor-parallel address, the tensor-parallel process)."""
    host, _ = start_verifier(model_dir)
    address = f"127.0.0.1:{free_port()}"
    aerie = str(Path(sys.executable).with_name("aerie"))
    proc = spawn("verify_service", ["serve", "verify", "--tensor-parallel", "2", "--device", "cpu", "--listen", address,
                                    "--model", str(model_dir)], command=[aerie],
                 log=tmp_path_factory.mktemp("tp-log") / "verify.log")
    try:
        wait_all([address], [proc], timeout_s=120)
        yield host.address, address, proc
    finally:
        host.stop(0.5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def reference_tokens(model_dir: Path, prompt: list[int] = PROMPT) -> list[int]:
    from aerie_rpc.models import load_target_model

    model, _, _ = load_target_model(str(model_dir), "cpu", "float32")
    engine = Engine(Target(model, FeatureSpec("eagle3", eagle3_default_layers(LAYERS))), None, TreeConfig())
    return engine.generate(prompt, SamplingParams(), StopCriteria(MAX_NEW), "vanilla").token_ids


def prefill(stub, sid: str, prompt: list[int] = PROMPT) -> list:
    header = verifier_pb2.PrefillHeader(
        session_id=sid, params=common_pb2.SamplingParams(), features=FEATURES,
        stop=common_pb2.StopCriteria(max_new_tokens=MAX_NEW, ignore_eos=True), prompt_tokens=len(prompt))
    msgs = [verifier_pb2.PrefillRequest(header=header),
            verifier_pb2.PrefillRequest(chunk=verifier_pb2.TokenChunk(prompt_ids=prompt))]
    return list(stub.Prefill(iter(msgs), timeout=60))


def tree_for(reference: list[int], k: int, depth: int = 4) -> verifier_pb2.VerifyRequest:
    """Root reference[k]; a decoy child; then the true continuation with its 3rd token wrong."""
    root = reference[k]
    chain = list(reference[k + 1 : k + 1 + depth])
    if len(chain) >= 3:
        chain[2] = (chain[2] + 1) % 64
    tokens = [root, (root + 7) % 64, *chain]
    parents = [-1, 0, 0, *range(2, 2 + len(chain) - 1)][: len(tokens)]
    return verifier_pb2.VerifyRequest(
        tokens=wire.encode(torch.tensor(tokens)), parents=wire.encode(torch.tensor(parents)),
        logprobs=wire.encode(torch.zeros(len(tokens))))


def drive(address: str, reference: list[int], prompt: list[int] = PROMPT) -> tuple[list, list[verifier_pb2.VerifyResponse]]:
    sid = f"tp-{uuid.uuid4().hex[:8]}"
    with channel(address) as ch:
        stub = verifier_pb2_grpc.VerifierStub(ch)
        prefilled = prefill(stub, sid, prompt)
        rounds = []
        generated = len(prefilled[0].result.generated_ids)
        while True:
            req = tree_for(reference, generated - 1)
            req.session_id, req.round = sid, len(rounds) + 1
            (resp,) = stub.Verify(iter([req]), timeout=60)
            rounds.append(resp)
            generated = resp.generated
            if resp.done:
                break
        assert stub.Release(verifier_pb2.ReleaseRequest(session_id=sid), timeout=10).released
    return prefilled, rounds


def test_tensor_parallel_service_answers_like_the_single_process_one(verifiers, model_dir):
    single, sharded, proc = verifiers
    reference = reference_tokens(model_dir)
    want_prefill, want_rounds = drive(single, reference)
    got_prefill, got_rounds = drive(sharded, reference)
    assert got_prefill[0].result.pending_token == want_prefill[0].result.pending_token == reference[0]
    for got, want in zip(got_prefill[1:], want_prefill[1:], strict=True):
        torch.testing.assert_close(wire.decode(got.features.features, "f"), wire.decode(want.features.features, "f"),
                                   atol=1e-5, rtol=1e-5)
    assert len(got_rounds) == len(want_rounds)
    tokens = [want_prefill[0].result.pending_token]
    for got, want in zip(got_rounds, want_rounds):
        assert (got.new_tokens, got.accepted_draft, got.done) == (want.new_tokens, want.accepted_draft, want.done)
        torch.testing.assert_close(wire.decode(got.features, "f"), wire.decode(want.features, "f"), atol=1e-5, rtol=1e-5)
        tokens += list(got.new_tokens)
    assert tokens == reference  # greedy through the sharded verifier is the target's own output
    assert max(r.accepted_draft for r in got_rounds) >= 2  # drafts accepted: caches were compacted
    assert proc.poll() is None, process_log(proc)
    assert "rank 0 of 2 holds 2 of 4 query heads, 1 of 2 key/value heads" in process_log(proc)


def test_sigterm_stops_rank0_and_its_worker(verifiers):
    _, sharded, proc = verifiers
    workers = children_of(proc.pid)
    assert workers, "the tensor-parallel process spawned no worker rank"
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 0, process_log(proc)
    except Exception:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        raise
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)
    assert "shutdown received" in process_log(proc)
    with channel(sharded) as ch, pytest.raises(grpc.RpcError):
        verifier_pb2_grpc.VerifierStub(ch).Info(verifier_pb2.VerifierInfoRequest(), timeout=2)


def children_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc), except the spawn resource tracker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if ppid == pid and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def test_torchrun_style_ranks_answer_alike_and_stop_on_sigterm(verifiers, model_dir, tmp_path):
    single, _, _ = verifiers
    address = f"127.0.0.1:{free_port()}"
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [spawn("verify_service", ["--tensor-parallel", "2", "--listen", address, "--model", str(model_dir)],
                   env={**rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)}, log=tmp_path / f"rank{rank}.log")
             for rank in range(2)]
    try:
        wait_all([address], ranks[:1], timeout_s=120)
        reference = reference_tokens(model_dir)
        got_prefill, got_rounds = drive(address, reference)
        want_prefill, want_rounds = drive(single, reference)
        assert got_prefill[0].result.pending_token == want_prefill[0].result.pending_token
        assert [r.new_tokens for r in got_rounds] == [r.new_tokens for r in want_rounds]
        torch.testing.assert_close(wire.decode(got_rounds[-1].features, "f"), wire.decode(want_rounds[-1].features, "f"),
                                   atol=1e-5, rtol=1e-5)
        for proc in ranks:  # as torchrun does on shutdown: every rank at once
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(60) for proc in ranks] == [0, 0], [process_log(p) for p in ranks]
        assert "shutdown received" in process_log(ranks[1])
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# --- batched sessions over the sharded target -----------------------------------------------

BATCH_PROMPTS = [PROMPT, [7, 8, 9], [12, 40, 2, 2, 50, 61, 3, 3, 9, 10, 11]]


def test_tensor_parallel_batched_service_answers_like_the_single_process_one(verifiers, model_dir, tmp_path):
    """`--tensor-parallel 2 --batch-sessions 4`: three sessions driven at once (their rounds
    share forwards, rows of different lengths), each answered as the single-process service
    answers it alone; the row count caps the sessions; SIGTERM stops both ranks cleanly."""
    single, _, _ = verifiers
    address = f"127.0.0.1:{free_port()}"
    aerie = str(Path(sys.executable).with_name("aerie"))
    proc = spawn("verify_service", ["serve", "verify", "--tensor-parallel", "2", "--batch-sessions", "4",
                                    "--batch-window-ms", "20", "--device", "cpu", "--listen", address,
                                    "--model", str(model_dir)], command=[aerie], log=tmp_path / "verify.log")
    try:
        wait_all([address], [proc], timeout_s=120)
        references = [reference_tokens(model_dir, p) for p in BATCH_PROMPTS]
        got: list = [None] * len(BATCH_PROMPTS)

        def run(i: int) -> None:
            got[i] = drive(address, references[i], BATCH_PROMPTS[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(BATCH_PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(g is not None for g in got), process_log(proc)
        for (got_prefill, got_rounds), prompt, reference in zip(got, BATCH_PROMPTS, references):
            want_prefill, want_rounds = drive(single, reference, prompt)
            assert got_prefill[0].result.pending_token == want_prefill[0].result.pending_token == reference[0]
            torch.testing.assert_close(wire.decode(got_prefill[1].features.features, "f"),
                                       wire.decode(want_prefill[1].features.features, "f"), atol=1e-5, rtol=1e-5)
            assert [(r.new_tokens, r.accepted_draft, r.done) for r in got_rounds] == \
                [(r.new_tokens, r.accepted_draft, r.done) for r in want_rounds]
            for g, w in zip(got_rounds, want_rounds):
                torch.testing.assert_close(wire.decode(g.features, "f"), wire.decode(w.features, "f"), atol=1e-5,
                                           rtol=1e-5)
            tokens = [got_prefill[0].result.pending_token] + [t for r in got_rounds for t in r.new_tokens]
            assert tokens == reference
            assert max(r.accepted_draft for r in got_rounds) >= 2  # compaction moved entries
        # The batch's rows are the sessions: a fifth one is refused, naming the flag.
        with channel(address) as ch:
            stub = verifier_pb2_grpc.VerifierStub(ch)
            sids = [f"hold-{i}" for i in range(4)]
            for sid in sids:
                prefill(stub, sid)
            with pytest.raises(grpc.RpcError) as err:
                prefill(stub, "one-too-many")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--batch-sessions" in err.value.details()
            for sid in sids:
                assert stub.Release(verifier_pb2.ReleaseRequest(session_id=sid), timeout=10).released
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, process_log(proc)
        assert "shutdown received" in process_log(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
