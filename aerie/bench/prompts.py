"""Benchmark prompt files: JSONL (optionally gzipped), one prompt per line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aerie.errors import InputError


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (gzipped if it ends in
    .gz); a line that is not a JSON object is an InputError naming the file and the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: each line must be a JSON object")
            yield lineno, row


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """JSONL (optionally .gz) lines of {"prompt": str} or {"turns": [str, ...]} (the first
    turn is used), with an optional "id" ("question_id" and "task_id" also name one)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file '{path}' does not exist")
    if limit is not None and limit <= 0:
        raise InputError(f"--limit must be > 0, got {limit}")
    prompts: list[Prompt] = []
    for lineno, row in jsonl_objects(path):
        text = row.get("prompt")
        if text is None and isinstance(row.get("turns"), list) and row["turns"]:
            text = row["turns"][0]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{lineno}: needs a non-empty string 'prompt' or a non-empty list 'turns'")
        pid = row.get("id", row.get("question_id", row.get("task_id", lineno)))
        prompts.append(Prompt(id=str(pid), text=text))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise InputError(f"{path}: holds no prompts")
    return prompts
