"""The `networked` mode of `aerie bench`: the speculative loop split over verify, draft and
gateway processes on loopback, timed end to end at the client, with each round's draft,
verify and wire time and its bytes as the services report them."""

from __future__ import annotations

import statistics

from aerie.bench.harness import ModeRun
from aerie.sampling import SamplingParams
from aerie.verifier import StopCriteria
from gateway import client
from gateway.cluster import LocalCluster

ROUND_COSTS = ("draft_ms", "verify_ms", "wire_ms", "request_bytes", "response_bytes")


class NetworkedMode:
    """`with NetworkedMode(...) as run:` starts the three services; `run(ids, params, stop)`
    streams one generation through the gateway."""

    def __init__(self, model: str | None, head: str | None, device: str, dtype: str, model_dir: str):
        self.cluster = LocalCluster(model, head, device, dtype, model_dir=model_dir)

    def __enter__(self) -> NetworkedMode:
        self.cluster.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.stop()

    def __call__(self, prompt_ids: list[int], params: SamplingParams, stop: StopCriteria) -> ModeRun:
        req = client.request(
            prompt_ids=prompt_ids, max_new_tokens=stop.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, top_k=params.top_k, seed=params.seed,
        )
        req.stop_token_ids.extend(sorted(stop.stop_token_ids))
        out = client.collect(client.stream(self.cluster.gateway_address, req))
        rounds = [r for r in out["rounds_detail"] if r["round"] > 0]  # round 0 is the prefill
        per_round = {k: statistics.fmean(r[k] for r in rounds) for k in ROUND_COSTS} if rounds else None
        return ModeRun(out["token_ids"], out["tau"], [r["accepted"] for r in rounds], per_round)
