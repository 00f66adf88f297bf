"""Self-distillation data: the target answers the training prompts, and the prompt and answer
token ids are stored in shards with a manifest.

Each shard holds one batch of prompts, written atomically as soon as all of them are
answered; a rerun with the same settings skips the shards already on disk, so an interrupted
run resumes where it stopped. Two engines answer: transformers' `generate` (one left-padded
batch per shard, a dynamic cache: launch-bound on a GPU), or our batched engine (`aerie.batch`:
static caches, CUDA graphs, and continuous batching over every pending shard at once, so that
short answers free their rows for the next prompts, of this shard or the next).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from aerie.errors import InputError
from aerie.train.prompts import TrainPrompt

FORMAT = "aerie-train-data/1"
ENGINES = ("generate", "batch")
# A prompt's answer: its ids up to and including the first stop token, and whether a stop
# token ended it.
Answer = tuple[list[int], bool]
# Told of each answer as it comes: (shard index, the prompt's index in its shard, answer).
OnAnswer = Callable[[int, int, Answer], None]


@dataclass(frozen=True)
class PendingShard:
    index: int
    prompts: list[list[int]]  # token ids


# Answers the prompts of the pending shards, telling `on_answer` of each answer as it comes,
# and starts no prompt once `admit()` is false (a shard is then left incomplete).
Answerer = Callable[[list[PendingShard], Callable[[], bool], OnAnswer], None]


@dataclass(frozen=True)
class DatagenConfig:
    max_new_tokens: int = 512
    batch_size: int = 64
    temperature: float = 0.0  # 0: greedy, the best data for T=0 acceptance
    max_prompt_tokens: int = 1024
    seed: int = 0
    engine: Literal["generate", "batch"] = "generate"
    # (k, n): answer only the shards i with i % n == k, so that n processes, each writing its
    # own directory, share one prompt list (a launch-bound engine leaves the GPU room for more).
    part: tuple[int, int] = (0, 1)


def prompts_digest(prompts: Sequence[TrainPrompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.id.encode() + b"\0" + p.text.encode() + b"\0")
    return h.hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


@torch.inference_mode()
def generate_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: frozenset[int],
    pad_id: int,
    temperature: float = 0.0,
) -> list[tuple[list[int], bool]]:
    """Answer a batch of tokenised prompts with transformers `generate` (left padding).
    Returns, per prompt, the answer ids (up to and including the first stop token) and
    whether a stop token ended it. Halves the batch and retries on running out of memory."""
    try:
        return _generate(model, prompts, max_new_tokens, stop_ids, pad_id, temperature)
    except torch.OutOfMemoryError:
        if len(prompts) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(prompts) // 2
        return (generate_batch(model, prompts[:half], max_new_tokens, stop_ids, pad_id, temperature)
                + generate_batch(model, prompts[half:], max_new_tokens, stop_ids, pad_id, temperature))


def _generate(model, prompts, max_new_tokens, stop_ids, pad_id, temperature):
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    kwargs = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
        eos_token_id=sorted(stop_ids) or None, pad_token_id=pad_id, **kwargs,
    )
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
        answers.append((row[: cut + 1], True) if cut is not None else (row, False))
    return answers


def generate_answerer(model, config: DatagenConfig, stop_ids: frozenset[int], pad_id: int) -> Answerer:
    """Shards answered one after the other by transformers' `generate`, seeded per shard (a
    resumed run samples the same)."""
    def answer_shard(prompts: list[list[int]], shard: int) -> list[Answer]:
        torch.manual_seed(config.seed * 1_000_003 + shard)
        # Similar lengths together: less padding inside the one generate call.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers = generate_batch(model, [prompts[i] for i in order], config.max_new_tokens, stop_ids, pad_id,
                                 config.temperature)
        by_index = dict(zip(order, answers))
        return [by_index[i] for i in range(len(prompts))]

    def answer(shards: list[PendingShard], admit: Callable[[], bool], on_answer: OnAnswer) -> None:
        for shard in shards:
            if not admit():
                return
            for i, a in enumerate(answer_shard(shard.prompts, shard.index)):
                on_answer(shard.index, i, a)

    return answer


def batch_answerer(model, config: DatagenConfig, stop_ids: frozenset[int]) -> Answerer:
    """Every pending shard's prompts answered by plain batched decoding in `aerie.batch`, as
    one stream of sessions, `batch_size` at a time. Sampled answers are seeded per prompt
    (shard and place in it), not by what else is in the batch, so a resumed run samples the
    same."""
    from aerie.batch.engine import BatchConfig, BatchEngine, SessionResult
    from aerie.sampling import SamplingParams
    from aerie.target import FeatureSpec, Target
    from aerie.tree import TreeConfig
    from aerie.verifier import StopCriteria

    # Prompts join once a sixteenth of the rows is free: the batch stays about 97% full, and
    # a join (an eager prefill, worth several decoding steps) comes once per batch_size / 16
    # finished answers rather than after nearly every step of a wide batch.
    batch = BatchConfig(join_rows=max(1, config.batch_size // 16))
    engine = BatchEngine(Target(model, FeatureSpec("eagle1")), None, TreeConfig.chain(1), batch)
    stop = StopCriteria(config.max_new_tokens, stop_ids)

    def answer(shards: list[PendingShard], admit: Callable[[], bool], on_answer: OnAnswer) -> None:
        places = [(s.index, i) for s in shards for i in range(len(s.prompts))]
        if not places:
            return
        params = [SamplingParams(temperature=config.temperature, seed=(config.seed * 1_000_003 + shard) * 65_536 + i)
                  for shard, i in places]

        def on_result(k: int, result: SessionResult) -> None:
            ids = result.token_ids
            on_answer(*places[k], (ids, bool(ids) and ids[-1] in stop_ids))

        engine.generate_many([p for s in shards for p in s.prompts], params, stop, "vanilla",
                             concurrency=min(config.batch_size, len(places)), on_result=on_result, admit=admit)

    return answer


def write_shard(path: Path, samples: list[tuple[str, list[int], list[int], bool]], dtype: np.dtype) -> int:
    """samples: (prompt id, prompt ids, answer ids, finished). Returns the token count."""
    seqs = [p + a for _, p, a, _ in samples]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    tokens = np.fromiter((t for s in seqs for t in s), dtype=dtype, count=int(offsets[-1]))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp, tokens=tokens, offsets=offsets,
        prompt_lens=np.array([len(p) for _, p, _, _ in samples], dtype=np.int64),
        finished=np.array([f for *_, f in samples], dtype=bool),
        ids=np.array([i for i, *_ in samples], dtype=np.str_),
    )
    os.replace(tmp, path)
    return int(offsets[-1])


def run_datagen(
    model,
    encode: Callable[[str], list[int]],
    prompts: Sequence[TrainPrompt],
    out_dir: str | Path,
    config: DatagenConfig,
    stop_ids: frozenset[int],
    pad_id: int,
    model_name: str = "",
    max_seconds: float | None = None,
    progress: bool = True,
) -> dict:
    """Generate answers for `prompts` into shards under `out_dir` with `config.engine`.

    Shard i holds prompts [i * batch_size, (i + 1) * batch_size) and is written as soon as
    they are all answered; `config.part` (k, n) keeps the shards i with i % n == k. With
    `max_seconds`, no new prompt is started once that much time has passed; the shards that
    the prompts under way complete are written, and a rerun continues. Returns the manifest,
    and beside it what this run did: `stopped_early`, `new_tokens` (the answer tokens of the
    shards it wrote) and `seconds` (spent answering)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not prompts:
        raise InputError("no training prompts to generate from")
    vocab = int(model.get_input_embeddings().weight.shape[0])
    settings = {
        "format": FORMAT, "model": model_name, "vocab_size": vocab, "token_dtype": token_dtype(vocab).name,
        "prompts_digest": prompts_digest(prompts), "shard_size": config.batch_size,
        "max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
        "max_prompt_tokens": config.max_prompt_tokens, "engine": config.engine,
        "part": f"{config.part[0]}/{config.part[1]}",
    }
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        # Defaults for manifests made before engines and parts had a name.
        old = {"engine": "generate", "part": "0/1", **json.loads(manifest_path.read_text())}
        differing = [k for k, v in settings.items() if old.get(k) != v and k != "model"]
        if differing:
            raise InputError(f"'{out}' holds data made with other settings ({', '.join(differing)}): use another --out")
    part, parts = config.part
    if not 0 <= part < parts:
        raise InputError(f"part {part}/{parts} does not exist: use K/N with 0 <= K < N")
    own_shards = range(part, (len(prompts) + config.batch_size - 1) // config.batch_size, parts)
    n_shards = len(own_shards)
    done_shards = {s["file"]: s for s in (json.loads(manifest_path.read_text()).get("shards", []) if manifest_path.is_file() else [])}
    if config.engine not in ENGINES:
        raise InputError(f"unknown datagen engine {config.engine!r}: use one of {', '.join(ENGINES)}")
    answerer = (batch_answerer(model, config, stop_ids) if config.engine == "batch"
                else generate_answerer(model, config, stop_ids, pad_id))
    start = time.perf_counter()
    dtype = token_dtype(vocab)
    written = {i: done_shards[shard_name(i)] for i in own_shards
               if (out / shard_name(i)).is_file() and shard_name(i) in done_shards}
    own = {i: prompts[i * config.batch_size : (i + 1) * config.batch_size] for i in own_shards}
    batches = {i: batch for i, batch in own.items() if i not in written}
    encoded = {i: [encode(p.text)[-config.max_prompt_tokens :] for p in batch] for i, batch in batches.items()}
    answers: dict[int, dict[int, Answer]] = {i: {} for i in batches}
    own_prompts = sum(map(len, own.values()))
    bar = tqdm(total=own_prompts, initial=own_prompts - sum(map(len, batches.values())), desc="datagen",
               unit="prompt", disable=not progress, dynamic_ncols=True)
    new_tokens = 0
    answering = last_written = time.perf_counter()

    def on_answer(index: int, i: int, answer: Answer) -> None:
        nonlocal new_tokens, last_written
        bar.update(1)
        got = answers[index]
        got[i] = answer
        if len(got) < len(batches[index]):
            return
        samples = [(p.id, ids, *got[k]) for k, (p, ids) in enumerate(zip(batches[index], encoded[index]))]
        name = shard_name(index)
        tokens = write_shard(out / name, samples, dtype)
        new = sum(len(a) for _, _, a, _ in samples)
        new_tokens += new
        now = time.perf_counter()
        # Since the last shard was written: streamed shards overlap, and their seconds add
        # up to the run's.
        written[index] = {
            "file": name, "samples": len(samples), "tokens": tokens, "answer_tokens": new,
            "finished": sum(f for *_, f in samples), "seconds": round(now - last_written, 2),
        }
        last_written = now
        _write_manifest(manifest_path, settings, [written[k] for k in sorted(written)], n_shards)
        bar.set_postfix(tok_s=f"{new_tokens / (now - answering):.0f}", refresh=False)

    def admit() -> bool:
        return max_seconds is None or time.perf_counter() - start <= max_seconds

    answerer([PendingShard(i, encoded[i]) for i in batches], admit, on_answer)
    bar.close()
    manifest = _write_manifest(manifest_path, settings, [written[k] for k in sorted(written)], n_shards)
    manifest["stopped_early"] = not manifest["complete"]
    manifest["new_tokens"] = new_tokens
    manifest["seconds"] = time.perf_counter() - answering
    return manifest


def _write_manifest(path: Path, settings: dict, shards: list[dict], n_shards: int) -> dict:
    manifest = dict(settings)
    manifest["shards"] = shards
    manifest["samples"] = sum(s["samples"] for s in shards)
    manifest["tokens"] = sum(s["tokens"] for s in shards)
    manifest["complete"] = len(shards) == n_shards
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return manifest
