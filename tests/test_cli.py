"""The `aerie` command: bad input gives one clear line on stderr and exit status 2; the real
demo target generates and benchmarks end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from aerie.cli import main
from aerie.heads import new_head, save_head
from tests.tiny import tiny_target


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aerie.cli", *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aerie: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--max-new-tokens", "0"], "max_new_tokens must be > 0"),
        (["--max-new-tokens", "-3"], "max_new_tokens must be > 0"),
        (["--temperature", "-0.5"], "temperature must be >= 0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--seed", str(2**62)], "seed must be between 0 and"),
        (["--model", "/no/such/model"], "/no/such/model"),
    ],
)
def test_generate_rejects_bad_arguments(args, needle):
    assert_one_line_error(run_cli("generate", "--prompt", "hi", *args), needle)


def test_gguf_without_the_gguf_package(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    assert main(["generate", "--prompt", "hi", "--model", str(fake)]) == 2
    assert "pip install gguf" in capsys.readouterr().err


def test_malformed_prompts_file_names_the_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n\n{"turns": ["also fine"]}\n{"prompt": 3}\n')
    assert_one_line_error(run_cli("bench", "--prompts", str(prompts), "--out", str(tmp_path / "r.json")), "p.jsonl:4")
    prompts.write_text('{"prompt": "fine"}\nnot json\n')
    assert_one_line_error(run_cli("bench", "--prompts", str(prompts), "--out", str(tmp_path / "r.json")), "p.jsonl:2")
    assert_one_line_error(
        run_cli("bench", "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r.json")), "does not exist"
    )


def test_head_that_does_not_fit_the_target(demo_model_dir, tmp_path, capsys):
    torch.manual_seed(0)
    tiny = tiny_target("eagle3")
    save_head(new_head(tiny, "eagle3"), tmp_path / "head")
    code = main(["generate", "--prompt", "hi", "--model", str(demo_model_dir), "--head", str(tmp_path / "head")])
    err = capsys.readouterr().err
    assert code == 2 and "hidden size is 576" in err and "Traceback" not in err


def test_prompt_longer_than_the_context(demo_model_dir, capsys):
    long_prompt = "word " * 9000
    code = main(["generate", "--prompt", long_prompt, "--model", str(demo_model_dir), "--mode", "vanilla"])
    err = capsys.readouterr().err
    assert code == 2 and "exceeds the model's context" in err


def test_generate_json_on_the_demo_target(demo_model_dir, capsys):
    assert main(["generate", "--prompt", "Name three colors.", "--model", str(demo_model_dir),
                 "--mode", "vanilla", "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "new_tokens", "tau", "tokens_per_s", "rounds"}
    assert out["new_tokens"] == len(out["token_ids"]) <= 12 and out["text"].strip()


def test_bench_reports_identical_output(demo_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(
        ["Write a haiku about rain.", "What is 17 times 3?"])) + "\n")
    out = tmp_path / "r.json"
    assert main(["bench", "--prompts", str(prompts), "--model", str(demo_model_dir), "--max-new-tokens", "16",
                 "--modes", "eagle,vanilla,hf", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["all_identical"] is True
    assert {r["mode"] for r in result["rows"]} == {"eagle", "vanilla", "hf"}
    assert all(r["identical_to_vanilla"] for r in result["rows"] if r["mode"] == "hf")
    assert {"speedup_vs_vanilla", "speedup_vs_hf", "tau_mean", "tau_pooled", "tokens_per_s"} <= set(result["summary"])
    eagle = [r for r in result["rows"] if r["mode"] == "eagle"]
    rounds = [a for r in eagle for a in r["accepted_per_round"]]
    assert result["summary"]["tau_pooled"]["eagle"] == pytest.approx(sum(a + 1 for a in rounds) / len(rounds))
    assert result["summary"]["tau_pooled"]["vanilla"] == 1.0
    assert "torch" in result["machine"]
    assert "| eagle |" in capsys.readouterr().out


def test_bench_static_cache_modes_are_identical(demo_model_dir, tmp_path):
    """The static-cache path (what CUDA graphs capture) on the real target, beside
    transformers' generate with its own static cache."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "List two prime numbers.", "id": 0}) + "\n")
    out = tmp_path / "r.json"
    assert main(["bench", "--prompts", str(prompts), "--model", str(demo_model_dir), "--max-new-tokens", "12",
                 "--kv-cache", "static", "--modes", "eagle,eagle-split,vanilla,hf-static,eagle-auto,eagle-d3-k4-n7",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["all_identical"] is True
    assert all(r["identical_to_vanilla"] for r in result["rows"] if r["mode"] != "vanilla")
    assert {"speedup_vs_hf_static", "auto_vs_best_fixed"} <= set(result["summary"])
    # The auto budget's warm-up finished before timing, and its choice is reported.
    report = result["auto_budget"]
    assert report["explored_rounds"] >= 1 and report["candidates"]
    best = report["candidates"][0]
    assert (best["total_tokens"], best["depth"]) == (report["choice"]["total_tokens"], report["choice"]["depth"])


def test_profile_writes_traces_and_per_round_counts(demo_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a color.", "id": 0}) + "\n")
    out = tmp_path / "prof"
    assert main(["profile", "--prompts", str(prompts), "--model", str(demo_model_dir), "--max-new-tokens", "8",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "profile.json").read_text())
    eagle, vanilla = summary["modes"]["eagle"], summary["modes"]["vanilla"]
    assert eagle["rounds"] >= 1 and eagle["tau"] >= 1.0
    assert vanilla["rounds"] == vanilla["new_tokens"] - 1  # the first token comes from prefill
    # The named phases were recorded: drafting and verifying each took host time every round.
    assert eagle["phases"]["draft"]["host_ms_per_round"] > 0 and eagle["phases"]["verify"]["host_ms_per_round"] > 0
    assert (out / "trace_eagle.json.gz").stat().st_size > 0 and (out / "trace_vanilla.json.gz").is_file()
    assert "| eagle |" in capsys.readouterr().out


def test_gateway_generation_refuses_settings_only_the_services_decide(capsys):
    code = main(["generate", "--prompt", "hi", "--gateway", "127.0.0.1:1", "--mode", "vanilla", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "--mode, --device cannot apply with --gateway" in err


def test_bench_summary_says_where_answers_leave_plain_decoding():
    from aerie.bench.harness import common_prefix, format_table, summarize

    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([7, 8], [7, 8]) == 2

    def row(pid, mode, tokens, vanilla):
        return {"id": pid, "mode": mode, "new_tokens": len(tokens), "seconds": 1.0, "tau": 1.0,
                "accepted_per_round": None, "per_round": None,
                "identical_to_vanilla": None if vanilla is None else tokens == vanilla,
                "tokens_matching_vanilla": None if vanilla is None else common_prefix(tokens, vanilla)}

    plain = {0: [5, 6, 7, 8], 1: [1, 2, 3, 4, 5, 6]}
    eagle = {0: [5, 6, 7, 8], 1: [1, 2, 9, 9, 9, 9]}  # leaves plain decoding after 2 of 6 tokens
    rows = [r for pid in plain for r in (row(pid, "vanilla", plain[pid], None), row(pid, "eagle", eagle[pid], plain[pid]))]
    summary = summarize(rows, ["vanilla", "eagle"], greedy=True)
    assert summary["all_identical"] is False
    assert summary["identical_share"] == {"eagle": 0.5}
    assert summary["matching_token_share"] == {"eagle": (4 + 2) / (4 + 6)}
    table = format_table({"machine": {"cpu": "x", "torch": "t"}, "rows": rows, "summary": summary})
    assert "eagle: 50% of answers identical to vanilla, 60.0% of vanilla's tokens" in table


def test_pooled_tau_weighs_every_round_alike():
    from aerie.bench.harness import pooled_tau

    # A short answer (one round accepting 4) and a long one (three rounds accepting 0): the
    # mean of per-prompt tau is (5 + 1) / 2 = 3, pooled it is (5 + 1 + 1 + 1) / 4 = 2.
    rows = [{"accepted_per_round": [4]}, {"accepted_per_round": [0, 0, 0]}, {"accepted_per_round": None}]
    assert pooled_tau(rows) == 2.0
    assert pooled_tau([]) == 1.0
