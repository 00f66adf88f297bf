"""The training pipeline on tiny random-weight targets: the TTT unroll and the losses against
brute-force references, the draft vocabulary maps, training that lowers the loss and gives
heads the engine accepts (lossless, and with tau well above 1 on the training prompts),
datagen and training that resume after an interruption, and the `aerie train` commands end
to end with one-line errors for bad input."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import aerie.train.datagen as datagen_module
import aerie.train.trainer as trainer_module
from aerie.batch.engine import BatchEngine
from aerie.cli import main
from aerie.engine import Engine
from aerie.errors import InputError
from aerie.heads import build_draft_vocab, load_head, new_head
from aerie.sampling import SamplingParams
from aerie.target import FeatureSpec, Target
from aerie.train.cli import DEFAULT_GSM8K
from aerie.train.data import Sample, answer_token_counts, collate, load_datasets, load_samples, split_holdout
from aerie.train.datagen import DatagenConfig, generate_batch, run_datagen, shard_name
from aerie.train.prompts import TrainPrompt
from aerie.train.trainer import TrainConfig, compute_stats, init_eagle3_head, plot_history, read_history, train
from aerie.train.ttt import (
    eagle1_loss,
    eagle3_loss,
    eagle3_targets,
    prediction_mask,
    target_forward,
    ttt_attention_mask,
    unroll,
)
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria
from tests.tiny import tiny_head, tiny_llama, tiny_target

VOCAB = 64
KINDS = ["eagle3", "eagle1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run fastest on one thread, and OpenMP spin-waiting on a busy machine can
    # otherwise slow them down a hundredfold.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def self_distilled(target: Target, prompts: list[list[int]], answer_len: int = 32) -> list[Sample]:
    answers = generate_batch(target.model, prompts, answer_len, frozenset(), pad_id=0)
    return [Sample(np.array(p + a, dtype=np.int64), len(p)) for p, (a, _) in zip(prompts, answers)]


# --- the training-time test against a step-by-step reference ---------------------------------


def test_ttt_attention_mask_pattern():
    """Step k, query i sees step-0 keys j <= i and the step-1..k keys at i only."""
    n = 5
    for step in range(4):
        mask = ttt_attention_mask(n, step)[0, 0]
        assert mask.shape == (n, (step + 1) * n)
        for i in range(n):
            for s in range(step + 1):
                for j in range(n):
                    expected = j <= i if s == 0 else j == i
                    assert bool(mask[i, s * n + j]) == expected, (step, i, s, j)


def chain_reference(head, features, ids, length, i, steps):
    """The head drafting a chain after committing the pairs 0..i of one sequence, one step at
    a time on its own outputs, with data tokens and an explicit causal pattern over the
    entries it has so far: [real pairs 0..i] + [chain entries 1..k]."""

    def token(j: int) -> int:
        return int(ids[j]) if j < length else 0  # padding past the end

    entries = [head.fc(features[j]) for j in range(i + 1)]
    tokens = [token(j + 1) for j in range(i + 1)]
    positions = list(range(i + 1))
    outputs = []
    for k in range(steps):
        if k > 0:
            entries.append(outputs[-1])
            tokens.append(token(i + k + 1))
            positions.append(i + k)
        size = len(entries)
        pattern = torch.zeros(size, size, dtype=torch.bool)
        for q in range(size):
            pattern[q, : q + 1] = True  # every entry sees the real pairs and the chain before it
        out = head(torch.stack(entries)[None], torch.tensor([tokens]), torch.tensor([positions]), pattern[None, None])
        outputs.append(out[0, -1])
    return outputs


@torch.no_grad()
def test_unroll_matches_step_by_step_drafting():
    target = tiny_target("eagle3")
    head = tiny_head(target, "eagle3", draft_vocab=48).float()
    steps, n = 4, 11
    lengths = [11, 7]  # the second row is right-padded
    ids = torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(3))
    ids[1, lengths[1]:] = 0
    tb = target_forward(target.model, target.features, ids)
    outputs = unroll(head, tb.features, ids, steps)
    assert len(outputs) == steps
    for row, length in enumerate(lengths):
        for i in range(length):
            reference = chain_reference(head, tb.features[row], ids[row], length, i, steps)
            for k in range(steps):
                torch.testing.assert_close(outputs[k][row, i], reference[k], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(
                    head.draft_logprobs(outputs[k][row, i]), head.draft_logprobs(reference[k]), atol=5e-5, rtol=1e-4
                )


def test_eagle3_loss_is_decayed_soft_cross_entropy_on_the_draft_vocabulary():
    torch.manual_seed(0)
    target = tiny_target("eagle3")
    head = tiny_head(target, "eagle3", draft_vocab=40).float()
    b, n, steps, decay = 2, 9, 3, 0.8
    logits = torch.randn(b, n, VOCAB) * 3
    logits[0, 4, ~head.t2d] += 50  # a target top token outside the draft vocabulary
    outputs = [torch.randn(b, n, head.hidden_size) for _ in range(steps)]
    lengths, prompt_lens = torch.tensor([9, 6]), torch.tensor([3, 2])
    pred = prediction_mask(lengths, prompt_lens, n)
    probs, in_vocab = eagle3_targets(logits, head.t2d)
    with torch.no_grad():
        stats = eagle3_loss(head, outputs, probs, in_vocab, pred, decay)

    total, per_step = 0.0, []
    for k in range(steps):
        terms = []
        for r in range(b):
            for i in range(n):
                j = i + k + 1  # step k at position i predicts token j + 1 from the target's logits at j
                if j >= n or not (prompt_lens[r] - 1 <= j <= lengths[r] - 2):
                    continue
                if not head.t2d[logits[r, j].argmax()]:
                    continue
                p = torch.softmax(logits[r, j][head.t2d], -1)  # renormalised over the draft vocabulary
                logq = torch.log_softmax(head.lm_head(head.norm(outputs[k][r, i])), -1)
                terms.append(-(p * logq).sum())
        loss_k = torch.stack(terms).mean().detach()
        per_step.append(float(loss_k))
        total += decay**k * loss_k
    assert stats.step_losses == pytest.approx(per_step, rel=1e-5)
    assert float(stats.loss) == pytest.approx(float(total), rel=1e-5)


def test_eagle1_loss_is_feature_regression_plus_cross_entropy():
    torch.manual_seed(0)
    target = tiny_target("eagle1")
    head = tiny_head(target, "eagle1").float()
    ids = torch.tensor([random_prompts(1, seed=5)[0] * 2])
    n = ids.shape[1]
    tb = target_forward(target.model, target.features, ids)
    pred_mask = prediction_mask(torch.tensor([n]), torch.tensor([2]), n)
    with torch.no_grad():
        stats = eagle1_loss(head, tb.features, ids, tb.logits, pred_mask)
        hidden = head(tb.features, torch.cat([ids[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1), torch.arange(n)[None])
        v, c = [], []
        for i in range(n - 1):
            if pred_mask[0, i + 1]:
                v.append(F.smooth_l1_loss(hidden[0, i], tb.features[0, i + 1]))
                p = torch.softmax(tb.logits[0, i + 1], -1)
                c.append(-(p * torch.log_softmax(target.model.lm_head(hidden[0, i]), -1)).sum())
    expected = torch.stack(v).mean() + 0.1 * torch.stack(c).mean()
    assert float(stats.loss) == pytest.approx(float(expected), rel=1e-5)


# --- the draft vocabulary --------------------------------------------------------------------


def test_draft_vocabulary_maps_round_trip():
    vocab, size = 200, 37
    counts = torch.randperm(vocab) * 1000 + torch.randint(0, 1000, (vocab,))  # distinct counts
    d2t, t2d = build_draft_vocab(counts, size)
    assert d2t.dtype == torch.long and d2t.shape == (size,)
    assert t2d.dtype == torch.bool and t2d.shape == (vocab,) and int(t2d.sum()) == size
    targets = torch.arange(size) + d2t
    assert bool((targets[1:] > targets[:-1]).all())  # draft ids follow ascending target ids
    assert bool(t2d[targets].all())
    assert torch.equal(targets, t2d.nonzero().flatten())
    assert int(counts[t2d].min()) > int(counts[~t2d].max())  # exactly the most frequent tokens

    target = tiny_target("eagle3")
    head = new_head(target, "eagle3", draft_vocab_size=40).float()
    samples = self_distilled(target, random_prompts(6, seed=1), answer_len=16)
    counts = answer_token_counts(samples, VOCAB)
    init_eagle3_head(head, target, counts)
    mapped = head.to_target_ids(torch.arange(40))
    assert bool(head.t2d[mapped].all()) and len(set(mapped.tolist())) == 40
    assert int(counts[head.t2d].min()) >= int(counts[~head.t2d].max())
    assert torch.equal(head.lm_head.weight, target.model.lm_head.weight[mapped])  # the target's own rows


# --- training ------------------------------------------------------------------------------------


def train_config(kind: str, **overrides) -> TrainConfig:
    base = dict(kind=kind, steps=80, lr=3e-3, warmup_steps=4, batch_tokens=320, ttt_steps=3, draft_vocab=48,
                log_every=5, eval_every=20, save_every=20)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module", params=KINDS)
def trained(request, tmp_path_factory):
    """A head trained on the tiny target's own answers, and the loss of its initial state."""
    kind = request.param
    target = tiny_target(kind)
    samples = self_distilled(target, random_prompts(16, seed=0))
    config = train_config(kind)
    torch.manual_seed(config.seed)  # the initial head, as `train` makes it
    initial = new_head(target, kind, config.draft_vocab if kind == "eagle3" else None).float()
    if kind == "eagle3":
        init_eagle3_head(initial, target, answer_token_counts(samples, VOCAB))
    out = tmp_path_factory.mktemp(f"head-{kind}")
    summary = train(target, samples, samples[:4], config, out, progress=False)
    return target, samples, initial, out, summary


@torch.no_grad()
def test_training_lowers_the_loss(trained):
    target, samples, initial, out, summary = trained
    kind = summary["kind"]
    config = train_config(kind)
    batch = collate(samples, list(range(len(samples))))
    before = compute_stats(initial.eval(), target, batch, config)
    head = new_head(target, kind, config.draft_vocab if kind == "eagle3" else None).float()
    head.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["head"])
    after = compute_stats(head.eval(), target, batch, config)
    assert float(after.loss) < 0.9 * float(before.loss), (float(before.loss), float(after.loss))
    assert sum(after.step_correct) > sum(before.step_correct) + sum(after.step_count) // 4
    assert summary["steps"] == 80
    log = read_history(out / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(5, 81, 5))
    assert "heldout" in log[3] and "heldout" in log[-1]


def test_trained_head_reloads_into_the_engine_lossless(trained):
    target, samples, _, out, summary = trained
    config = json.loads((out / "config.json").read_text())
    if summary["kind"] == "eagle3":
        assert config["draft_vocab_size"] == 48 and config["architectures"] == ["LlamaForCausalLMEagle3"]
    head = load_head(out, target)
    assert head.kind == summary["kind"]
    if head.kind == "eagle3":  # the draft vocabulary maps survive saving
        saved = torch.load(out / "checkpoint.pt", weights_only=False)["head"]
        assert torch.equal(head.d2t, saved["d2t"]) and torch.equal(head.t2d, saved["t2d"])
    chain = Engine(Target(target.model, head.feature_spec), head, TreeConfig.chain(4))
    dynamic = Engine(Target(target.model, head.feature_spec), head, TreeConfig(depth=4, top_k=4, total_tokens=12))
    for prompt in [s.tokens[: s.prompt_len].tolist() for s in samples[:3]] + random_prompts(2, seed=9):
        vanilla = chain.generate(prompt, SamplingParams(), StopCriteria(24), "vanilla").token_ids
        for engine in (chain, dynamic):
            assert engine.generate(prompt, SamplingParams(), StopCriteria(24), "eagle").token_ids == vanilla
    # On its own training prompts the head must draft what the target says, which needs
    # training and drafting to agree on features, tokens and positions (an untrained head
    # gets about 1.1 here).
    taus = [chain.generate(s.tokens[: s.prompt_len].tolist(), SamplingParams(), StopCriteria(24), "eagle").tau
            for s in samples[:8]]
    assert sum(taus) / len(taus) > 1.6, taus


def test_training_continues_from_a_trained_head(trained, tmp_path):
    """--init: the first steps already show the trained head's loss, not a new head's, and an
    EAGLE-3 head keeps its draft vocabulary."""
    target, samples, initial, out, summary = trained
    kind = summary["kind"]
    config = train_config(kind, steps=5, log_every=1, eval_every=0, warmup_steps=0)
    fresh = train(target, samples, samples[:4], config, tmp_path / "fresh", progress=False)
    more = train(target, samples, samples[:4], config, tmp_path / "more", progress=False, init=out)
    first_fresh = read_history(tmp_path / "fresh" / "train_log.jsonl")[0]["loss"]
    first_more = read_history(tmp_path / "more" / "train_log.jsonl")[0]["loss"]
    assert first_more < 0.8 * first_fresh, (first_fresh, first_more)
    assert more["heldout"]["loss"] < fresh["heldout"]["loss"]
    if kind == "eagle3":
        saved, continued = load_head(out, target), load_head(tmp_path / "more", target)
        assert torch.equal(saved.d2t, continued.d2t) and torch.equal(saved.t2d, continued.t2d)
        with pytest.raises(InputError, match="--draft-vocab 48"):
            train(target, samples, samples[:4], train_config(kind, steps=1, draft_vocab=32), tmp_path / "x",
                  progress=False, init=out)
    other = "eagle1" if kind == "eagle3" else "eagle3"
    with pytest.raises(InputError, match=f"is an {kind} head, not {other}"):
        train(tiny_target(other), samples, samples[:4], train_config(other, steps=1), tmp_path / "y",
              progress=False, init=out)


def test_missing_matplotlib_only_skips_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    history = [{"step": 1, "loss": 2.0, "acc": [0.1, 0.2]}, {"step": 2, "loss": 1.0, "acc": [0.3, 0.2]}]
    assert plot_history(history, tmp_path / "p.png") is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "p.png").exists()
    target = tiny_target("eagle1")
    samples = self_distilled(target, random_prompts(4, seed=2), answer_len=8)
    summary = train(target, samples, [], train_config("eagle1", steps=2, log_every=1), tmp_path / "h", progress=False)
    assert summary["steps"] == 2 and (tmp_path / "h" / "model.safetensors").is_file()


def test_config_rejects_bad_values():
    for bad in (dict(log_every=0), dict(save_every=0), dict(eval_every=-1), dict(steps=0), dict(ttt_steps=0),
                dict(max_minutes=0), dict(warmup_steps=-1)):
        with pytest.raises(InputError):
            train_config("eagle3", **bad)
    with pytest.raises(InputError):
        TrainConfig(kind="eagle2")


# --- datagen resumes ----------------------------------------------------------------------------


PROMPTS = [TrainPrompt(id=f"p{i}", kind="test", text=f"q{i} " + "what is it? " * (1 + i % 3)) for i in range(7)]


def encode(text: str) -> list[int]:
    return [1 + (ord(c) * 7 + i) % (VOCAB - 1) for i, c in enumerate(text[:20])]


def shards_of(out: Path) -> dict[str, dict[str, np.ndarray]]:
    manifest = json.loads((out / "manifest.json").read_text())
    result = {}
    for shard in manifest["shards"]:
        with np.load(out / shard["file"]) as z:
            result[shard["file"]] = {k: z[k] for k in z.files}
    return result


def answers_of(shard: dict[str, np.ndarray]) -> list[list[int]]:
    ends = shard["offsets"][1:]
    return [shard["tokens"][start + p : end].tolist() for start, end, p in zip(shard["offsets"], ends, shard["prompt_lens"])]


def spy_on_writes(monkeypatch, die_at: int | None = None, after=None) -> list[str]:
    """Shard writes that record the names written, in order (the list returned), raise
    KeyboardInterrupt instead of the `die_at`-th (from 1), and call `after()` after each."""
    written, write = [], datagen_module.write_shard

    def write_shard(path, samples, dtype):
        if len(written) + 1 == die_at:
            raise KeyboardInterrupt
        tokens = write(path, samples, dtype)
        written.append(path.name)
        if after is not None:
            after()
        return tokens

    monkeypatch.setattr(datagen_module, "write_shard", write_shard)
    return written


@pytest.mark.parametrize("engine", ["generate", "batch"])
def test_datagen_resumes_without_duplicates(tmp_path, monkeypatch, engine):
    model = tiny_llama(vocab=VOCAB)
    # Sampled: a resumed run must reseed to sample what the uninterrupted one did.
    config = DatagenConfig(max_new_tokens=10, batch_size=2, temperature=1.0, seed=3, engine=engine)

    def run(out, enc=encode, **kwargs):
        return run_datagen(model, enc, PROMPTS, out, config, frozenset(), 0, progress=False, **kwargs)

    reference = run(tmp_path / "ref")
    assert reference["complete"] and [s["file"] for s in reference["shards"]] == [f"shard-0000{i}.npz" for i in range(4)]

    # Killed while making shard 2 of 4 (after a crash that left a shard the manifest lacks).
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        spy_on_writes(m, die_at=3)
        with pytest.raises(KeyboardInterrupt):
            run(out)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and [s["file"] for s in partial["shards"]] == ["shard-00000.npz", "shard-00001.npz"]
    (out / "shard-00002.npz").write_bytes(b"half written")

    # Stopped by the time limit after one more shard: its writing outlasts the limit.
    with monkeypatch.context() as m:
        spy_on_writes(m, after=lambda: time.sleep(1.2))
        stopped = run(out, max_seconds=1.0)
    assert stopped["stopped_early"] and not stopped["complete"] and len(stopped["shards"]) == 3
    assert stopped["new_tokens"] == stopped["shards"][2]["answer_tokens"] == 20

    done = run(out)
    assert done["complete"] and not done["stopped_early"]
    assert [s["file"] for s in done["shards"]] == [s["file"] for s in reference["shards"]]
    assert done["samples"] == len(PROMPTS) and done["tokens"] == reference["tokens"]
    got, want = shards_of(out), shards_of(tmp_path / "ref")
    assert got.keys() == want.keys()
    for name in want:
        for key in want[name]:
            assert np.array_equal(got[name][key], want[name][key]), (name, key)
    samples, _ = load_samples(out, min_answer=1)
    assert len(samples) == len(PROMPTS)
    assert [s.tokens[: s.prompt_len].tolist() for s in samples] == [encode(p.text) for p in PROMPTS]

    # A complete directory generates nothing, but a lost shard is made again.
    assert run(out, lambda text: pytest.fail("regenerated a finished shard"))["complete"]
    (out / "shard-00001.npz").unlink()
    assert run(out)["complete"]
    assert np.array_equal(shards_of(out)["shard-00001.npz"]["tokens"], want["shard-00001.npz"]["tokens"])
    # Other settings are refused, another engine too.
    with pytest.raises(InputError, match="other settings"):
        run_datagen(model, encode, PROMPTS, out, DatagenConfig(max_new_tokens=11, batch_size=2, engine=engine),
                    frozenset(), 0, progress=False)
    other = "generate" if engine == "batch" else "batch"
    with pytest.raises(InputError, match="engine"):
        run_datagen(model, encode, PROMPTS, out, DatagenConfig(max_new_tokens=10, batch_size=2, temperature=1.0, seed=3,
                                                               engine=other), frozenset(), 0, progress=False)


def test_datagen_parts_together_write_the_shards_of_one_run(tmp_path):
    model = tiny_llama(vocab=VOCAB)
    config = DatagenConfig(max_new_tokens=10, batch_size=3, temperature=1.0, seed=5, engine="batch")

    def run(out, part=(0, 1)):
        return run_datagen(model, encode, PROMPTS, out, replace(config, part=part), frozenset(), 0, progress=False)

    whole = run(tmp_path / "whole")
    parts = [run(tmp_path / f"part{k}", (k, 2)) for k in range(2)]
    assert all(p["complete"] for p in parts)
    assert [[s["file"] for s in p["shards"]] for p in parts] == [["shard-00000.npz", "shard-00002.npz"], ["shard-00001.npz"]]
    want = shards_of(tmp_path / "whole")
    for k in range(2):
        for name, arrays in shards_of(tmp_path / f"part{k}").items():
            assert all(np.array_equal(arrays[key], want[name][key]) for key in want[name]), name
    assert sum(p["samples"] for p in parts) == whole["samples"] == len(PROMPTS)
    with pytest.raises(InputError, match="part"):
        run(tmp_path / "part0", (1, 2))
    with pytest.raises(InputError, match="0 <= K < N"):
        run(tmp_path / "bad", (2, 2))


@pytest.mark.parametrize("temperature, stop", [(0.0, {8}), (1.0, {8, 6})], ids=["greedy", "sampled"])
def test_streamed_datagen_writes_the_shards_of_answering_each_shard_alone(tmp_path, monkeypatch, temperature, stop):
    """The batched engine answers every shard in one stream, rows going on to the next
    shard's prompts while a long answer finishes (the stop tokens make shard 1 end before
    shard 0), and writes each shard as the batch of that shard alone answers it, seeded per
    prompt. Interrupted after that first write, a rerun completes the same shards."""
    model = tiny_llama(vocab=VOCAB)
    config = DatagenConfig(max_new_tokens=12, batch_size=3, temperature=temperature, seed=3, engine="batch")

    def run(out):
        return run_datagen(model, encode, PROMPTS, out, config, frozenset(stop), 0, progress=False)

    with monkeypatch.context() as m:
        order = spy_on_writes(m)
        streamed = run(tmp_path / "streamed")
    assert order.index("shard-00001.npz") < order.index("shard-00000.npz"), order
    assert streamed["complete"] and [s["file"] for s in streamed["shards"]] == [shard_name(i) for i in range(3)]
    assert streamed["new_tokens"] == sum(s["answer_tokens"] for s in streamed["shards"])
    shards = shards_of(tmp_path / "streamed")
    engine = BatchEngine(Target(model, FeatureSpec("eagle1")), None, TreeConfig.chain(1))
    for index in range(3):
        prompts = [encode(p.text) for p in PROMPTS[3 * index : 3 * index + 3]]
        params = [SamplingParams(temperature, seed=(3 * 1_000_003 + index) * 65_536 + i) for i in range(len(prompts))]
        alone = engine.generate_many(prompts, params, StopCriteria(12, frozenset(stop)), "vanilla", len(prompts))
        shard = shards[shard_name(index)]
        assert answers_of(shard) == [r.token_ids for r in alone.results], index
        assert shard["finished"].tolist() == [r.token_ids[-1] in stop for r in alone.results]

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        spy_on_writes(m, die_at=2)
        with pytest.raises(KeyboardInterrupt):
            run(out)
    assert [s["file"] for s in json.loads((out / "manifest.json").read_text())["shards"]] == [order[0]]
    assert run(out)["complete"]
    resumed = shards_of(out)
    assert resumed.keys() == shards.keys()
    for name in shards:
        for key in shards[name]:
            assert np.array_equal(resumed[name][key], shards[name][key]), (name, key)


def test_batched_datagen_answers_as_plain_decoding(tmp_path):
    """Greedy answers from the batched engine (rows of different prompt lengths, stopping at
    different steps) are each prompt's plain decoding, cut at its first stop token, and the
    same as transformers' generate gives."""
    model = tiny_llama(vocab=VOCAB)
    target = Target(model, FeatureSpec("eagle1"))
    encoded = [encode(p.text) for p in PROMPTS]
    plain = [Engine(target, None, TreeConfig()).generate(ids, SamplingParams(), StopCriteria(12), "vanilla").token_ids
             for ids in encoded]
    stop = frozenset({plain[0][4], plain[3][7]})  # two prompts stop early, on tokens that occur
    want = []
    for answer in plain:
        cut = next((i for i, t in enumerate(answer) if t in stop), None)
        want.append((answer[: cut + 1], True) if cut is not None else (answer, False))
    for engine in ("batch", "generate"):
        config = DatagenConfig(max_new_tokens=12, batch_size=4, engine=engine)
        run_datagen(model, encode, PROMPTS, tmp_path / engine, config, stop, 0, progress=False)
        samples, _ = load_samples(tmp_path / engine, min_answer=1)
        got = [(s.tokens[s.prompt_len :].tolist(), False) for s in samples]
        finished = [f for shard in sorted((tmp_path / engine).glob("shard-*.npz")) for f in np.load(shard)["finished"]]
        assert [(a, bool(f)) for (a, _), f in zip(got, finished)] == want, engine


# --- the command line, end to end ---------------------------------------------------------------


COMMON_WORDS = (
    "the a of to and in is how many much does did he she it his her they for each if what was are with has have "
    "more than at per on that total be will cost day week hours minutes money dollars year old times twice half "
    ". , ? $ 1 2 3 4 5 6 7 8 9 0"
).split()


@pytest.fixture(scope="module")
def cli_dirs(tmp_path_factory):
    """A tiny HF model directory (word-level tokenizer) and datagen output made by the CLI."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    tiny_llama(vocab=VOCAB).save_pretrained(model_dir)
    words = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(COMMON_WORDS[: VOCAB - 1])}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(model_dir)

    gsm8k = []  # the default, ../shared/benchmarks beside the repository, when there
    if not DEFAULT_GSM8K.is_file():
        path = root / "gsm8k.jsonl"
        path.write_text("".join(json.dumps({"question": f"How many {w} does he have?"}) + "\n" for w in "abcdefgh"))
        gsm8k = ["--gsm8k", path]
    data = root / "data"
    datagen = ["train", "datagen", "--model", model_dir, "--device", "cpu", "--out", data, "--limit", 10,
               "--batch-size", 4, "--max-new-tokens", 24, "--made-scale", 0.01, *gsm8k]
    assert cli(*datagen) == 0
    return model_dir, data, datagen, gsm8k


def cli(*args: str) -> int:
    return main([str(a) for a in args])


def train_args(kind: str, model_dir: Path, data: Path, out: Path, *extra) -> list:
    args = ["train", kind, "--model", model_dir, "--device", "cpu", "--data", data, "--out", out, "--steps", 8,
            "--lr", "3e-3", "--warmup-steps", 2, "--batch-tokens", 400, "--log-every", 2, "--save-every", 4,
            "--eval-every", 0, "--holdout", 0, *extra]
    if kind == "eagle3":
        args += ["--ttt-steps", 3, "--draft-vocab", 32]
    return args


def test_cli_datagen_train_eval_end_to_end(cli_dirs, tmp_path, capsys):
    model_dir, data, datagen, _ = cli_dirs
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples"] == 10 and len(manifest["shards"]) == 3
    capsys.readouterr()
    assert cli(*datagen) == 0
    rerun = capsys.readouterr().out
    assert "10 samples" in rerun and "tokens/s" not in rerun  # the rerun only reads the manifest back

    # Sampled answers to the same prompts, in a second directory, train beside the greedy ones.
    sampled = tmp_path / "sampled"
    assert cli(*[sampled if a == data else a for a in datagen], "--temperature", "1", "--engine", "batch") == 0
    assert "tokens/s" in capsys.readouterr().out
    both, _ = load_datasets([data, sampled])
    assert len(both) == 20 and len({s.prompt_key for s in both}) == 10

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How many hours does he have?"}\n{"turns": ["What is the total cost of it?"]}\n')
    for kind in KINDS:
        out = tmp_path / kind
        assert cli(*train_args(kind, model_dir, data, out, "--holdout", "0.2"), "--data", data, sampled) == 0
        assert "head written to" in capsys.readouterr().out
        assert {"config.json", "model.safetensors", "checkpoint.pt", "train_log.jsonl", "train_summary.json"} <= {
            p.name for p in out.iterdir()}
        result = tmp_path / f"eval-{kind}.json"
        assert cli("train", "eval", "--model", model_dir, "--device", "cpu", "--head", out, "--prompts", prompts,
                   "--max-new-tokens", 16, "--depth", 3, "--top-k", 3, "--total-tokens", 8, "--check-vanilla", 2,
                   "--out", result) == 0
        summary = json.loads(result.read_text())
        assert summary["n_prompts"] == 2 and summary["new_tokens"] == 32
        assert summary["vanilla_checked"] == 2 and summary["vanilla_mismatches"] == 0
        assert summary["tau"] >= 1.0


def test_holdout_keeps_every_answer_to_a_prompt_on_one_side():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50, size=int(rng.integers(2, 6))) for _ in range(40)]
    samples = [Sample(np.concatenate([p, rng.integers(0, 50, size=4)]), len(p)) for p in prompts for _ in range(3)]
    train_part, held = split_holdout(samples, 0.1, seed=3)
    train_keys, held_keys = {s.prompt_key for s in train_part}, {s.prompt_key for s in held}
    assert len(held_keys) == 4 and len(held) == 12 and not train_keys & held_keys
    assert len(train_part) + len(held) == len(samples)
    assert split_holdout(samples, 0.1, seed=3) == (train_part, held)
    assert {s.prompt_key for s in split_holdout(samples, 0.1, seed=4)[1]} != held_keys
    assert split_holdout(samples, 0.0) == (samples, [])


def test_data_of_two_vocabularies_is_refused(tmp_path):
    for name, vocab in (("a", VOCAB), ("b", VOCAB + 8)):
        run_datagen(tiny_llama(vocab=vocab), encode, PROMPTS[:2], tmp_path / name,
                    DatagenConfig(max_new_tokens=4, batch_size=2), frozenset(), 0, progress=False)
    with pytest.raises(InputError, match="different vocabularies"):
        load_datasets([tmp_path / "a", tmp_path / "b"])


def test_cli_train_resumes_after_an_interruption(cli_dirs, tmp_path, monkeypatch):
    model_dir, data, _, _ = cli_dirs
    reference = tmp_path / "reference"
    assert cli(*train_args("eagle3", model_dir, data, reference)) == 0

    # Interrupted (Ctrl-C) while fetching the batch of step 7: the checkpoint holds step 4.
    out = tmp_path / "run"
    real_collate, calls = trainer_module.collate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "collate", interrupted)
    assert cli(*train_args("eagle3", model_dir, data, out)) == 130
    monkeypatch.setattr(trainer_module, "collate", real_collate)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4
    assert [r["step"] for r in read_history(out / "train_log.jsonl")] == [2, 4, 6]

    assert cli(*train_args("eagle3", model_dir, data, out, "--resume")) == 0
    log, ref_log = read_history(out / "train_log.jsonl"), read_history(reference / "train_log.jsonl")
    assert [r["step"] for r in log] == [2, 4, 6, 8]  # step 6 written again, once
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], rel=1e-5)
    state, ref_state = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (out, reference))
    assert state["step"] == 8
    for key, value in ref_state["head"].items():
        torch.testing.assert_close(state["head"][key], value, rtol=1e-5, atol=1e-6)

    # A larger --steps continues the finished run.
    assert cli(*train_args("eagle3", model_dir, data, out, "--resume", "--steps", 12)) == 0
    assert [r["step"] for r in read_history(out / "train_log.jsonl")] == [2, 4, 6, 8, 10, 12]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 12


def one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("aerie: error:")]
    assert len(lines) == 1 and needle in lines[0], err


def test_cli_bad_input_is_one_line_and_exit_2(cli_dirs, tmp_path, capsys):
    model_dir, data, _, gsm8k = cli_dirs
    m = ["--model", model_dir, "--device", "cpu"]
    eagle3 = tmp_path / "eagle3"
    assert cli(*train_args("eagle3", model_dir, data, eagle3, "--steps", 2)) == 0
    capsys.readouterr()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How many?"}\n')
    other_vocab = tmp_path / "other-vocab"
    other_vocab.mkdir()
    for f in data.iterdir():
        (other_vocab / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((data / "manifest.json").read_text())
    (other_vocab / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 2 * VOCAB}))

    cases = [
        (train_args("eagle3", model_dir, tmp_path / "no-data", tmp_path / "x"), "has no manifest.json"),
        (train_args("eagle3", model_dir, data, tmp_path / "fresh", "--resume"), "checkpoint.pt' does not exist"),
        (train_args("eagle1", model_dir, data, eagle3, "--resume"), "kind=eagle3"),
        (train_args("eagle3", model_dir, data, tmp_path / "x", "--log-every", 0), "--log-every must be >= 1"),
        (train_args("eagle3", model_dir, other_vocab, tmp_path / "x"), "vocabulary of 128 tokens"),
        (["train", "datagen", *m, "--out", tmp_path / "d", "--temperature", "-1", "--limit", 2], "--temperature must be >= 0"),
        (["train", "datagen", *m, "--out", tmp_path / "d", "--part", "2/2", "--limit", 2], "--part must be K/N"),
        (["train", "datagen", *m, "--out", tmp_path / "d", "--gsm8k", tmp_path / "none.jsonl"], "none.jsonl' does not exist"),
        (["train", "datagen", "--model", tmp_path / "no-model", "--out", tmp_path / "d", "--limit", 2, *gsm8k], "no-model"),
        (["train", "eval", *m, "--head", eagle3, "--prompts", prompts, "--out", tmp_path / "e.json",
          "--temperature", "-0.5"], "--temperature must be >= 0"),
        (["train", "eval", *m, "--head", tmp_path / "no-head", "--prompts", prompts, "--out", tmp_path / "e.json"],
         "no-head"),
    ]
    for args, needle in cases:
        assert cli(*args) == 2, args
        one_line_error(capsys, needle)


def test_report_grid_puts_every_prompt_sets_headline_cells_first():
    from aerie.train.report import report_cells
    from aerie.tree import TreeConfig

    cells = report_cells({"e3": "h3", "e1": "h1"}, ["mt", "he"], TreeConfig(depth=4), 16)
    names = [c.name for c in cells]
    assert names[:4] == ["e3/mt/T0/dynamic", "e3/he/T0/dynamic", "e1/mt/T0/dynamic", "e1/he/T0/dynamic"]
    assert names[4:6] == ["e3/mt/T0/chain", "e3/he/T0/chain"]
    assert len(names) == len(set(names)) == 10
