#!/usr/bin/env bash
# The sharded-verifier measurement on one host of N GPUs (an nvidia-h200-x2, say): the verify
# cost of a Llama-3-70B shape with random bf16 weights, built in place as each GPU's shard,
# against tree size and the bandwidth floor, with CUDA graphs (the all-reduces captured) and
# without; then the 8B shape sharded the same way, for scale.
#
#   scripts/gpu_tp_bench.sh RUN_DIR [N]
set -uo pipefail

run=${1:?usage: gpu_tp_bench.sh RUN_DIR [N]}
world=${2:-2}
aerie() { python3 -m aerie.cli "$@"; }
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
mkdir -p "$run"
nvidia-smi --query-gpu=name,memory.total --format=csv

stamp "70B shape, TP $world, graphs"
aerie verify-cost --shapes llama-70b --tensor-parallel "$world" --device cuda --dtype bfloat16 \
    --out "$run/verify_cost_70b_tp$world.json"
stamp "70B shape, TP $world, eager"
aerie verify-cost --shapes llama-70b --tensor-parallel "$world" --device cuda --dtype bfloat16 --no-graphs \
    --out "$run/verify_cost_70b_tp${world}_eager.json"
stamp "8B shape, TP $world, graphs"
aerie verify-cost --shapes llama-8b --tensor-parallel "$world" --device cuda --dtype bfloat16 \
    --out "$run/verify_cost_8b_tp$world.json"
stamp done
