"""The training prompts: deterministic, varied, and apart from the benchmark prompts."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from aerie.train import synthetic
from aerie.train.prompts import READING_TASKS, reading_prompts, training_prompts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.fixture(scope="module")
def prompts():
    gsm8k = SHARED / "gsm8k_train.jsonl"
    if not gsm8k.is_file():
        pytest.skip(f"{gsm8k} is not here")
    return training_prompts(gsm8k)


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_prompts_are_deterministic_unique_and_mixed(prompts):
    again = training_prompts(SHARED / "gsm8k_train.jsonl")
    assert [p.text for p in again] == [p.text for p in prompts]
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({p.text for p in prompts}) == len(prompts)
    kinds = Counter(p.kind for p in prompts)
    assert {"math", "reading", "field", "task", "code", "snippet"} <= set(kinds)
    # GSM8K is the largest single source but must not be most of the data any more.
    assert kinds["math"] < 0.45 * len(prompts)
    # The shuffle spreads the kinds: a prefix (what a time-limited datagen answers) is a mix.
    assert len({p.kind for p in prompts[:500]}) >= 10


def test_no_training_prompt_shares_a_phrase_with_mt_bench(prompts):
    """The benchmark only measures: no seven-word run of any MT-bench turn appears in a
    training prompt (a paraphrase of a benchmark question would inflate tau)."""
    mt_bench = SHARED / "mt_bench_questions.jsonl"
    benchmark = set()
    for line in mt_bench.read_text().splitlines():
        for turn in json.loads(line)["turns"]:
            benchmark |= word_ngrams(turn, 7)
    shared = {g for p in prompts for g in word_ngrams(p.text, 7) & benchmark}
    assert not shared, sorted(shared)[:5]


def test_reading_prompts_carry_their_passage():
    rng = random.Random(0)
    texts = reading_prompts(rng, 50)
    assert len(texts) == 50
    # Every kind of passage is used, each request followed by a passage of its own.
    assert all("\n\n" in t and len(t.split("\n\n", 1)[1]) > 40 for t in texts)
    for kind, tasks in READING_TASKS.items():
        heads = {t.split("{text}")[0] for t in tasks}
        assert any(any(t.startswith(h) for h in heads) for t in texts), kind


def test_synthetic_passages_hold_the_facts_they_are_asked_about():
    rng = random.Random(1)
    table = synthetic.sales_table(rng, 4).splitlines()
    assert table[0] == "Month,Region,Product,Units,Revenue" and len(table) == 1 + 4 * 2
    assert all(len(row.split(",")) == 5 for row in table)
    companies = synthetic.company_passage(random.Random(2), 3).splitlines()
    assert len(companies) == 3 and all("$" in line and "billion" in line for line in companies)
    same = synthetic.people_passage(random.Random(3), 4), synthetic.people_passage(random.Random(3), 4)
    assert same[0] == same[1]
