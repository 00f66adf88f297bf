"""`aerie bench --modes ...,networked`: the split over three local processes produces the
in-process output and reports each round's draft, verify and wire time and bytes."""

from __future__ import annotations

import json

from aerie.cli import main
from tests.tiny import build_tiny_model


def test_networked_mode_matches_in_process(tmp_path, capsys):
    model_dir, head_dir = build_tiny_model(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["w1 w2 w3", "w9 w8 w7 w6"]) + "\n")
    out = tmp_path / "r.json"
    assert main(["bench", "--prompts", str(prompts), "--model", str(model_dir), "--head", str(head_dir),
                 "--max-new-tokens", "24", "--modes", "eagle,vanilla,networked", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["id"], r["mode"]): r for r in result["rows"]}
    for pid in ("1", "2"):
        assert rows[pid, "networked"]["identical_to_vanilla"] is True
        assert rows[pid, "networked"]["new_tokens"] == 24
        # Same head, same tree, same target: the rounds accept exactly what they accept in process.
        assert rows[pid, "networked"]["accepted_per_round"] == rows[pid, "eagle"]["accepted_per_round"]
    summary = result["summary"]
    assert summary["all_identical"] is True
    net = summary["per_round"]["networked"]
    assert net["verify_ms"] > 0 and net["draft_ms"] > 0 and net["wire_ms"] >= 0
    assert net["request_bytes"] > 0 and net["response_bytes"] > 0
    assert set(summary["per_round"]["eagle"]) == {"draft_ms", "verify_ms"}
    assert summary["networked_vs_in_process"] > 0
    assert "| networked |" in capsys.readouterr().out
