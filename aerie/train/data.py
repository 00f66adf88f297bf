"""Reading the datagen shards back: samples, token frequencies, and length-bucketed batches
under a token budget, in a deterministic order per epoch."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aerie.errors import InputError
from aerie.train.datagen import FORMAT


@dataclass(frozen=True)
class Sample:
    tokens: np.ndarray  # prompt then answer
    prompt_len: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def prompt_key(self) -> str:
        """Equal for every answer to the same prompt, in whichever data directory."""
        return hashlib.sha1(self.tokens[: self.prompt_len].tobytes()).hexdigest()


@dataclass
class Batch:
    input_ids: torch.Tensor  # [b, n] right-padded
    lengths: torch.Tensor  # [b]
    prompt_lens: torch.Tensor  # [b]

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.lengths.to(device), self.prompt_lens.to(device))

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def load_samples(data_dir: str | Path, max_len: int = 2048, min_answer: int = 2) -> tuple[list[Sample], dict]:
    """All samples from a datagen directory (sequences cut to `max_len` tokens; samples
    whose answer is shorter than `min_answer` tokens are dropped)."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"'{data_dir}' has no manifest.json: make it with `aerie train datagen --out {data_dir}`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise InputError(f"'{manifest_path}' is not an aerie training-data manifest")
    samples: list[Sample] = []
    for shard in manifest.get("shards", []):
        path = data_dir / shard["file"]
        if not path.is_file():
            raise InputError(f"shard '{path}' named in the manifest is missing")
        with np.load(path) as z:
            tokens, offsets, prompt_lens = z["tokens"], z["offsets"], z["prompt_lens"]
            for i in range(len(prompt_lens)):
                seq = tokens[offsets[i] : offsets[i + 1]][:max_len].astype(np.int64)
                p = int(prompt_lens[i])
                if len(seq) - p >= min_answer:
                    samples.append(Sample(seq, p))
    if not samples:
        raise InputError(f"'{data_dir}' holds no usable samples")
    return samples, manifest


def load_datasets(data_dirs: Sequence[str | Path], max_len: int = 2048) -> tuple[list[Sample], int]:
    """The samples of several datagen directories (greedy and sampled answers, say), which
    must come from one vocabulary; returns them and that vocabulary's size."""
    samples: list[Sample] = []
    vocab_sizes: dict[str, int | None] = {}
    for data_dir in data_dirs:
        found, manifest = load_samples(data_dir, max_len=max_len)
        samples += found
        vocab_sizes[str(data_dir)] = manifest.get("vocab_size")
    if len(set(vocab_sizes.values())) != 1:
        listed = ", ".join(f"'{d}': {v}" for d, v in vocab_sizes.items())
        raise InputError(f"the data directories were made with different vocabularies ({listed}): use one target's data")
    return samples, next(iter(vocab_sizes.values()))


def split_holdout(samples: list[Sample], fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train / held-out split by prompt: every answer to a held-out prompt is
    held out, so that a second answer to it (sampled, from another directory) cannot leak
    into training."""
    keys = sorted({s.prompt_key for s in samples})
    random.Random(seed).shuffle(keys)
    n_hold = int(len(keys) * fraction) if fraction > 0 else 0
    if fraction > 0 and len(keys) > 1:
        n_hold = max(1, n_hold)
    held = set(keys[:n_hold])
    train = [s for s in samples if s.prompt_key not in held]
    return train, [s for s in samples if s.prompt_key in held]


def answer_token_counts(samples: list[Sample], vocab_size: int) -> torch.Tensor:
    """How often each target token appears in the answers (what the head must predict)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in samples:
        counts += np.bincount(s.tokens[s.prompt_len :], minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(counts)


def make_batches(samples: list[Sample], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Index lists, each padded batch (rows x longest) within `batch_tokens`; samples of
    similar length go together, and the order is shuffled per (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(samples)))
    rng.shuffle(order)
    # Sort by length in buckets of 32 tokens; ties keep the shuffled order, so the batches
    # differ between epochs.
    order.sort(key=lambda i: len(samples[i]) // 32)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = len(samples[i])
        if current and max(longest, n) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(samples: list[Sample], indices: list[int], pad_id: int = 0) -> Batch:
    rows = [samples[i] for i in indices]
    width = max(len(s) for s in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for r, s in enumerate(rows):
        ids[r, : len(s)] = torch.from_numpy(s.tokens)
    return Batch(
        input_ids=ids,
        lengths=torch.tensor([len(s) for s in rows]),
        prompt_lens=torch.tensor([s.prompt_len for s in rows]),
    )
