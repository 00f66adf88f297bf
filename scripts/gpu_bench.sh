#!/usr/bin/env bash
# The GPU benchmark, in one go on one GPU, most important first (each step writes its own
# JSON under RUN_DIR, so an interrupted run keeps what it finished):
#   1. MT-bench, T=0, bf16: eagle (rounds on the device), eagle-split and vanilla (ours: static
#      cache + CUDA graphs); then, in a process of its own, hf-static beside vanilla uncompiled
#   2. a torch profiler trace of one generation per mode, with kernels per round
#   3. the tau report of the shipped heads (EAGLE-1 vs EAGLE-3, T=0 and T=1, chain vs tree)
#   4. a draft level's top-k timed alone (scripts/gpu_kernel_check.py); the verify cost curve
#      (SmolLM2 and a Llama-3-8B shape) and the bandwidth floor
#   5. a short run with hf-dynamic beside eagle and vanilla (hf-dynamic is slow)
#   6. the tree-budget sweep: fixed trees against eagle-auto, side by side, and our vanilla
#   7. batched verification: 1 to 64 concurrent sessions, eagle against plain batched decoding
#   8. the networked split against in-process
#   9. HumanEval and MT-bench at T=1; a float32 losslessness check
#
#   scripts/gpu_bench.sh RUN_DIR DATA_DIR
#
# DATA_DIR holds mt_bench_questions.jsonl and HumanEval.jsonl.gz. Sizes from the environment:
#   LIMIT (all MT-bench prompts)  SIDE_LIMIT (10)  HUMANEVAL_LIMIT (40)  T1_LIMIT (40)
#   TOKENS (256)  REPORT_MINUTES (3; 0 skips the tau report)  REPORT_LIMIT (40)
#   HEAD (a head directory to draft with on the demo target instead of the shipped default)
#   COMPILED_FORWARD (cuda, the default, or never: the bench's decoder layers compiled or eager;
#   each bench process compiles in its untimed warm-up)
#   MT_MODES (the modes of step 1's first process, default eagle,eagle-split,vanilla)
#   T1_MODES (the modes of the T=1 step, default eagle,vanilla)
#   STEPS (comma-separated step names, default all: mtbench profile report kernels verify-cost
#   side sweep batch networked humaneval t1 fp32), e.g. STEPS=batch for the batched run alone
# If the compiled forward fails in step 1, step 1 runs again and the rest runs uncompiled; if
# the static-cache/CUDA-graph path fails, the rest runs with dynamic caches.
set -uo pipefail

run=${1:?usage: gpu_bench.sh RUN_DIR DATA_DIR}
data=${2:?usage: gpu_bench.sh RUN_DIR DATA_DIR}
tokens=${TOKENS:-256}
# Everything each step prints also goes to RUN_DIR/log.txt, which comes back with the JSON even
# when a step dies (a crash's message is in no JSON).
aerie() { python3 -m aerie.cli "$@" 2>&1 | tee -a "$run/log.txt"; }
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
step() { [ -z "${STEPS:-}" ] || [[ ",$STEPS," == *",$1,"* ]]; }
mkdir -p "$run"
mt="$data/mt_bench_questions.jsonl"
he="$data/HumanEval.jsonl.gz"
gpu=(--device cuda --dtype bfloat16 --max-new-tokens "$tokens")
limit=()
[ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")
head=()
[ -n "${HEAD:-}" ] && head=(--head "$HEAD")
[ -n "${COMPILED_FORWARD:-}" ] && gpu+=(--compiled-forward "$COMPILED_FORWARD")
gpu+=("${head[@]}")

if step mtbench; then
stamp "mt-bench T=0"
mt_modes=(--modes "${MT_MODES:-eagle,eagle-split,vanilla}")
if ! aerie bench --prompts "$mt" "${limit[@]}" "${gpu[@]}" "${mt_modes[@]}" --out "$run/mtbench_t0.json"; then
    if [ "${COMPILED_FORWARD:-cuda}" != never ]; then
        echo "the compiled forward failed (see log.txt): continuing with --compiled-forward never"
        gpu+=(--compiled-forward never)
        aerie bench --prompts "$mt" "${limit[@]}" "${gpu[@]}" "${mt_modes[@]}" --out "$run/mtbench_t0_uncompiled.json" \
            || { echo "static caches failed: continuing with --kv-cache dynamic"; gpu+=(--kv-cache dynamic); }
    else
        echo "static caches failed: continuing with --kv-cache dynamic"
        gpu+=(--kv-cache dynamic)
    fi
fi
# transformers' static generate compiles its own decode step into CUDA graphs: a process of its
# own, so that whatever it meets cannot take the rest down (a compiled MT-bench run beside it
# ended in a C++ abort on 2026-12-06, cause not yet known). Our vanilla again, as the link.
stamp "mt-bench T=0, hf-static"
aerie bench --prompts "$mt" "${limit[@]}" "${gpu[@]}" --compiled-forward never --modes vanilla,hf-static \
    --out "$run/mtbench_t0_hf_static.json"
fi

if step profile; then
stamp "profile"
aerie profile --prompts "$mt" "${head[@]}" --device cuda --dtype bfloat16 --max-new-tokens 128 --out "$run/profile"
fi

if step report && [ "${REPORT_MINUTES:-3}" != 0 ]; then
stamp "tau report"
aerie train report --device cuda --head eagle3=heads/smollm2-135m-eagle3 --head eagle1=heads/smollm2-135m-eagle1 \
    --prompts "mt_bench=$mt" --prompts "humaneval=$he" --limit "${REPORT_LIMIT:-40}" --max-new-tokens "$tokens" \
    --workers 4 --minutes "${REPORT_MINUTES:-3}" --out "$run/report"
fi
if step kernels; then
stamp "kernels alone"
KERNELS=top_k python3 scripts/gpu_kernel_check.py "$run/kernels.json" 2>&1 | tee -a "$run/log.txt"
fi

if step verify-cost; then
stamp "verify cost"
aerie verify-cost --device cuda --shapes demo,llama-8b --out "$run/verify_cost.json"
fi

if step side; then
stamp "hf-dynamic beside eagle and vanilla"
aerie bench --prompts "$mt" --limit "${SIDE_LIMIT:-10}" "${gpu[@]}" --modes eagle,vanilla,hf-dynamic \
    --out "$run/side_by_side.json"
fi

if step sweep; then
stamp "tree budget sweep"
sweep=eagle-auto
for depth in 4 5 6 8; do
    for nodes in 15 31 63 127; do sweep+=",eagle-d$depth-k10-n$nodes"; done
done
sweep+=",vanilla"  # each tree's speedup, read off the same run
aerie bench --prompts "$mt" --limit "${SIDE_LIMIT:-10}" "${gpu[@]}" --modes "$sweep" --out "$run/budget_sweep.json"
fi

if step batch; then
stamp "batched verification"
aerie bench-batch --prompts "$mt" --limit 64 --concurrency 1,4,16,64 --modes eagle,vanilla,eagle-d4-k8-n15 \
    "${head[@]}" --device cuda --dtype bfloat16 --max-new-tokens 128 --out "$run/batch_demo.json"
aerie bench-batch --prompts "$mt" --limit 16 --concurrency 1,4,16 --modes eagle,vanilla --shape llama-8b \
    --device cuda --dtype bfloat16 --max-new-tokens 64 --out "$run/batch_8b.json"
fi

if step networked; then
stamp "networked"
aerie bench --prompts "$mt" --limit "${SIDE_LIMIT:-10}" "${gpu[@]}" --modes eagle,networked --out "$run/networked.json"
fi

if step humaneval; then
stamp "humaneval T=0"
aerie bench --prompts "$he" --limit "${HUMANEVAL_LIMIT:-40}" "${gpu[@]}" --modes eagle,vanilla \
    --out "$run/humaneval_t0.json"
fi

if step t1; then
stamp "mt-bench T=1"
aerie bench --prompts "$mt" --limit "${T1_LIMIT:-40}" "${gpu[@]}" --temperature 1 --seed 0 --modes "${T1_MODES:-eagle,vanilla}" \
    --out "$run/mtbench_t1.json"
fi

if step fp32; then
stamp "float32 losslessness"
aerie bench --prompts "$mt" --limit 10 --device cuda --dtype float32 --max-new-tokens "$tokens" --modes eagle,vanilla \
    "${head[@]}" --out "$run/mtbench_t0_fp32.json"
fi

stamp done
