"""Self-distillation data: the target answers the training prompts, and the prompt and answer
token ids are stored in shards with a manifest.

Each shard holds one batch of prompts, answered together and written atomically; a rerun
with the same settings skips the shards already on disk, so an interrupted run resumes where
it stopped. Two engines answer: transformers' `generate` (one left-padded batch per shard, a
dynamic cache: launch-bound on a GPU), or our batched engine (`aerie.batch`: static caches,
CUDA graphs, and continuous batching, so that short answers free their rows for the rest).
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
# Answers a shard: (prompts' token ids, shard index) -> per prompt (answer ids up to and
# including the first stop token, whether a stop token ended it).
Answerer = Callable[[list[list[int]], int], list[tuple[list[int], bool]]]


@dataclass(frozen=True)
class DatagenConfig:
    max_new_tokens: int = 512
    batch_size: int = 64
    temperature: float = 0.0  # 0: greedy, the best data for T=0 acceptance
    max_prompt_tokens: int = 1024
    seed: int = 0
    engine: Literal["generate", "batch"] = "generate"


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
    """Shards answered by transformers' `generate`, seeded per shard (a resumed run samples
    the same)."""
    def answer(prompts: list[list[int]], shard: int) -> list[tuple[list[int], bool]]:
        torch.manual_seed(config.seed * 1_000_003 + shard)
        # Similar lengths together: less padding inside the one generate call.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers = generate_batch(model, [prompts[i] for i in order], config.max_new_tokens, stop_ids, pad_id,
                                 config.temperature)
        by_index = dict(zip(order, answers))
        return [by_index[i] for i in range(len(prompts))]

    return answer


def batch_answerer(model, config: DatagenConfig, stop_ids: frozenset[int]) -> Answerer:
    """Shards answered by plain batched decoding in `aerie.batch`, every prompt of a shard a
    session of one batch; sampled answers are seeded per prompt (shard and position), so a
    resumed run samples the same."""
    from aerie.batch.engine import BatchEngine
    from aerie.sampling import SamplingParams
    from aerie.target import FeatureSpec, Target
    from aerie.tree import TreeConfig
    from aerie.verifier import StopCriteria

    engine = BatchEngine(Target(model, FeatureSpec("eagle1")), None, TreeConfig.chain(1))
    stop = StopCriteria(config.max_new_tokens, stop_ids)

    def answer(prompts: list[list[int]], shard: int) -> list[tuple[list[int], bool]]:
        params = [SamplingParams(temperature=config.temperature, seed=(config.seed * 1_000_003 + shard) * 65_536 + i)
                  for i in range(len(prompts))]
        run = engine.generate_many(prompts, params, stop, "vanilla", concurrency=len(prompts))
        return [(r.token_ids, bool(r.token_ids) and r.token_ids[-1] in stop_ids) for r in run.results]

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
    """Generate answers for `prompts` into shards under `out_dir` with `config.engine`;
    returns the manifest.

    Shard i holds prompts [i * batch_size, (i + 1) * batch_size). With `max_seconds`, no new
    shard is started once that much time has passed (rerun to continue)."""
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
    }
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        old = {"engine": "generate", **json.loads(manifest_path.read_text())}  # made before engines had a name
        differing = [k for k, v in settings.items() if old.get(k) != v and k != "model"]
        if differing:
            raise InputError(f"'{out}' holds data made with other settings ({', '.join(differing)}): use another --out")
    n_shards = (len(prompts) + config.batch_size - 1) // config.batch_size
    shards: list[dict] = []
    done_shards = {s["file"]: s for s in (json.loads(manifest_path.read_text()).get("shards", []) if manifest_path.is_file() else [])}
    if config.engine not in ENGINES:
        raise InputError(f"unknown datagen engine {config.engine!r}: use one of {', '.join(ENGINES)}")
    answer = (batch_answerer(model, config, stop_ids) if config.engine == "batch"
              else generate_answerer(model, config, stop_ids, pad_id))
    start = time.perf_counter()
    dtype = token_dtype(vocab)
    bar = tqdm(total=len(prompts), desc="datagen", unit="prompt", disable=not progress, dynamic_ncols=True)
    generated_tokens = 0
    stopped_early = False
    for index in range(n_shards):
        batch = prompts[index * config.batch_size : (index + 1) * config.batch_size]
        name = shard_name(index)
        if (out / name).is_file() and name in done_shards:
            shards.append(done_shards[name])
            bar.update(len(batch))
            continue
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            stopped_early = True
            break
        t0 = time.perf_counter()
        encoded = [encode(p.text)[-config.max_prompt_tokens :] for p in batch]
        answers = answer(encoded, index)
        samples = [(p.id, ids, *a) for p, ids, a in zip(batch, encoded, answers)]
        tokens = write_shard(out / name, samples, dtype)
        new = sum(len(a) for _, _, a, _ in samples)
        generated_tokens += new
        shards.append({
            "file": name, "samples": len(samples), "tokens": tokens, "answer_tokens": new,
            "finished": sum(f for *_, f in samples), "seconds": round(time.perf_counter() - t0, 2),
        })
        _write_manifest(manifest_path, settings, shards, n_shards)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{generated_tokens / (time.perf_counter() - start):.0f}")
    bar.close()
    manifest = _write_manifest(manifest_path, settings, shards, n_shards)
    manifest["stopped_early"] = stopped_early
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
