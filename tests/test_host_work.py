"""The host-work census: what a batched round dispatches outside its graphs."""

from __future__ import annotations

import json

import pytest

from aerie.bench.host_work import run_host_work
from aerie.cli import main
from aerie.sampling import SamplingParams
from aerie.tree import TreeConfig

TREE = TreeConfig("dynamic", depth=3, top_k=4, total_tokens=8)


@pytest.fixture(scope="module")
def census():
    return run_host_work(["eagle", "vanilla"], [1, 8], TREE, max_new_tokens=6, prompt_tokens=8)


@pytest.fixture(scope="module")
def sampled_census():
    return run_host_work(["eagle", "vanilla"], [1, 8], TREE, 6, SamplingParams(temperature=1.0, seed=3), 8)


def _run(census, mode, sessions):
    return next(r for r in census["runs"] if r["mode"] == mode and r["sessions"] == sessions)


@pytest.mark.parametrize("which", ["census", "sampled_census"])
def test_eager_ops_per_round_do_not_grow_with_sessions(which, request):
    """Per-session tensor work on the host (one object, one copy or one acceptance walk on
    the device per session) would add ops with every session; the batched round's are the
    same at 1 and 8 sessions, greedy or sampled."""
    census = request.getfixturevalue(which)
    for mode in ("eagle", "vanilla"):
        one, eight = _run(census, mode, 1), _run(census, mode, 8)
        assert eight["eager_ops_per_round"] <= one["eager_ops_per_round"] + 4, mode
        assert one["eager_ops_per_round"] > 10  # the counter sees the eager work at all


def test_graph_replays_per_round(census):
    assert _run(census, "vanilla", 8)["phases"]["verify"]["graph_replays_per_round"] == 1
    eagle = _run(census, "eagle", 8)["phases"]
    assert eagle["verify"]["graph_replays_per_round"] == 1
    # The whole expansion (three levels) is one graph, and the head's commit of the accepted
    # pairs another, every round but the first (the prompt's pairs were committed on joining).
    assert 1 < eagle["draft"]["graph_replays_per_round"] < 2
    assert set(eagle) == {"draft", "verify"} and eagle["draft"]["host_ms_per_round"] > 0


def test_cli_writes_the_census_and_refuses_bad_sessions(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert main(["host-work", "--sessions", "2", "--modes", "vanilla", "--max-new-tokens", "3",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][0]["sessions"] == 2
    assert "| vanilla | 2 |" in capsys.readouterr().out
    assert main(["host-work", "--sessions", "0", "--out", str(out)]) == 2
    assert "--sessions needs numbers >= 1" in capsys.readouterr().err
