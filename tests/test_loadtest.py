"""The load test (gateway/loadtest.py), short: a handful of sessions for a few seconds against
real service processes, one verifier SIGKILLed midway. Every request completes, with the
in-process engine's output, and no client sees an error: the gateway's resume hides the loss."""

from __future__ import annotations

import pytest

from gateway.loadtest import LoadSettings, format_markdown, percentiles, run_loadtest

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_short_load_with_a_verifier_killed():
    # Six sessions alternate over the two verifiers, so some are on the killed one mid-stream.
    settings = LoadSettings(sessions=6, duration_s=6.0, kill_verifier_at=3.0, drafters=1, max_new_tokens=24,
                            prompts=2, progress_s=2.0, redis=REDIS_URL)
    lines: list[str] = []
    report = run_loadtest(settings, log=lines.append)
    r = report["requests"]
    assert r["errors"] == {} and r["unfinished"] == 0 and r["wrong_output"] == 0, r
    assert r["completed"] == r["started"] >= settings.sessions
    assert r["resumed"] >= 1, "the kill hit no session in flight: this run tested no resume"
    assert report["kill"]["node"] == "verify0" and report["kill"]["exit_status"] == -9
    assert report["exit_codes"]["verify0"] == -9
    assert all(report["exit_codes"][name] == 0 for name in ("verify1", "draft0", "gateway"))
    assert report["tokens"] == r["completed"] * settings.max_new_tokens and report["tokens_per_s"] > 0
    assert 0 < report["first_token_s"]["p50"] <= report["latency_s"]["p50"] <= report["latency_s"]["p99"]
    memory = report["memory_mb"]
    assert set(memory) == {"verify0", "verify1", "draft0", "gateway"}
    assert all(0 < m["start"] <= m["peak"] and m["end"] <= m["peak"] for m in memory.values())
    assert any("SIGKILL verify0" in line for line in lines)
    assert sum("in flight" in line for line in lines) >= 2  # progress while it ran
    table = format_markdown(report)
    assert "| client errors | 0 |" in table and "| verify1 |" in table


def test_percentiles():
    values = [float(i) for i in range(1, 101)]
    got = percentiles(values)
    assert got["p50"] == pytest.approx(50.5) and got["p99"] == pytest.approx(99.01)
    assert got["max"] == 100.0 and got["mean"] == pytest.approx(50.5)
    assert percentiles([2.0]) == {"p50": 2.0, "p99": 2.0, "mean": 2.0, "max": 2.0}
    assert percentiles([])["p50"] is None
