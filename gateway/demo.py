"""`aerie demo`: verify, draft and gateway as three processes on loopback, one streamed answer,
then tokens/s, tau and a per-round timing summary read back from the services' spans."""

from __future__ import annotations

import sys

from gateway.cluster import LocalCluster, round_summary


def run_networked_demo(model_spec: str | None, head_path: str | None, prompt: str, max_new_tokens: int,
                       device: str = "cpu", dtype: str = "float32") -> dict:
    from aerie.models import resolve_model
    from gateway import client

    # Prepare the model once here, so the three services do not all wait on its first build.
    model_dir = resolve_model(model_spec)
    print(f"starting verify, draft and gateway services on loopback ({model_dir.name}, {device}, {dtype})...",
          file=sys.stderr, flush=True)
    with LocalCluster(model_spec, head_path, device, dtype, model_dir=str(model_dir)) as cluster:
        print(f"gateway {cluster.gateway_address} -> draft {cluster.draft_address} -> verify "
              f"{cluster.verify_address}\n", file=sys.stderr, flush=True)
        print(f"> {prompt}\n", flush=True)
        req = client.request(prompt=prompt, chat=True, max_new_tokens=max_new_tokens)
        result = client.collect(client.stream(cluster.gateway_address, req),
                                on_text=lambda t: print(t, end="", flush=True))
        print("\n", flush=True)
        codes = cluster.stop()
        timing = round_summary(cluster.spans(result.get("trace_id")))
    print(f"{result['new_tokens']} tokens in {result['seconds']:.2f} s: {result['tokens_per_s']:.1f} tokens/s, "
          f"tau {result['tau']:.2f} over {result['rounds']} rounds")
    if timing.get("rounds"):
        print(
            f"per round (from {timing['rounds']} drafter and {timing['verifier_spans']} verifier spans): "
            f"{timing['round_ms']:.1f} ms = draft {timing['draft_ms']:.1f} + verify {timing['verify_ms']:.1f} "
            f"+ wire {timing['wire_ms']:.1f} ms; tree {timing['tree_size']:.1f} nodes, "
            f"{timing['accepted']:.2f} accepted; {timing['request_bytes']:.0f} B up, "
            f"{timing['response_bytes']:.0f} B down"
        )
    if any(code not in (0, None) for code in codes.values()):
        print(f"note: service exit codes {codes}", file=sys.stderr)
    return {**{k: result[k] for k in ("text", "token_ids", "new_tokens", "tau", "tokens_per_s", "rounds",
                                      "session_id", "trace_id")}, "timing": timing, "exit_codes": codes}
