#!/usr/bin/env bash
# Trains and measures the demo target's draft heads in one go, on one GPU:
#   self-distilled data (greedy, then optionally sampled answers to the same prompts) -> EAGLE-3
#   and EAGLE-1 heads (trained side by side) -> the tau report (MT-bench and HumanEval, T=0 and
#   T=1, chain vs dynamic tree) -> a short `aerie bench`.
#
#   scripts/train_demo_heads.sh RUN_DIR DATA_DIR
#
# DATA_DIR holds gsm8k_train.jsonl, mt_bench_questions.jsonl and HumanEval.jsonl.gz. Every
# step resumes or skips when its output exists, so a rerun after an interruption continues.
# The sizes come from the environment, so that the same script runs a tiny smoke test on a CPU:
#   DEVICE (cuda)  DATAGEN_SECONDS (240)  DATAGEN_BATCH (512)  ANSWER_TOKENS (512)  DATAGEN_ENGINE (generate)
#   DATAGEN_PARTS (1): the greedy datagen as that many processes on the one GPU (`--part K/N`)
#   SAMPLED_SECONDS (0: none) and SAMPLED_TEMPERATURE (0.8): a second datagen, sampled, trained on too
#   (RUN_DIR/data_sampled, also when an earlier run made it)
#   HEADS ("eagle3 eagle1")  TRAIN_MINUTES (5)  TRAIN_STEPS, or per head EAGLE3_STEPS and EAGLE1_STEPS
#   EAGLE3_INIT, EAGLE1_INIT: a trained head of that kind to continue from (`--init`), e.g. the shipped one
#   REPORT_HEADS (more NAME=DIR heads to report beside the trained ones, e.g. the shipped ones)
#   REPORT_MINUTES (7)  REPORT_WORKERS (12)  LIMIT (all prompts)  REPORT_LIMIT (LIMIT)  EVAL_TOKENS (256)
#   STOP_AFTER (datagen, train or report): end there, so that the steps can run in separate calls
# A datagen that ran out its seconds counts as done (a rerun goes on to training); a training
# interrupted midway continues from its last checkpoint.
set -euo pipefail

run=${1:?usage: train_demo_heads.sh RUN_DIR DATA_DIR}
data=${2:?usage: train_demo_heads.sh RUN_DIR DATA_DIR}
device=${DEVICE:-cuda}
heads=${HEADS:-eagle3 eagle1}
limit=()
[ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")
report_limit=()
[ -n "${REPORT_LIMIT:-${LIMIT:-}}" ] && report_limit=(--limit "${REPORT_LIMIT:-$LIMIT}")
aerie() { python3 -m aerie.cli "$@"; }
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
mkdir -p "$run"

# datagen OUT SECONDS [ARGS...]: unless OUT is marked done, answer the prompts for SECONDS.
datagen() {
    local out=$1 seconds=$2
    shift 2
    [ -f "$out/DONE" ] && return
    aerie train datagen --device "$device" --out "$out" --gsm8k "$data/gsm8k_train.jsonl" "${limit[@]}" \
        --batch-size "${DATAGEN_BATCH:-512}" --max-new-tokens "${ANSWER_TOKENS:-512}" --engine "${DATAGEN_ENGINE:-generate}" \
        --max-seconds "$seconds" "$@"
    touch "$out/DONE"
}

stamp datagen
parts=${DATAGEN_PARTS:-1}
if [ "$parts" = 1 ]; then
    datagen "$run/data" "${DATAGEN_SECONDS:-240}"
    datasets=("$run/data")
else
    # Every process answers every parts-th shard into its own directory; they train together.
    datasets=()
    for k in $(seq 0 $((parts - 1))); do
        datagen "$run/data_part$k" "${DATAGEN_SECONDS:-240}" --part "$k/$parts" > "$run/datagen_part$k.log" 2>&1 &
        datasets+=("$run/data_part$k")
    done
    for job in $(jobs -p); do
        wait "$job" || { tail -n 20 "$run"/datagen_part*.log; exit 1; }
    done
    tail -q -n 2 "$run"/datagen_part*.log
fi
if [ "${SAMPLED_SECONDS:-0}" != 0 ]; then
    stamp "datagen, sampled"
    datagen "$run/data_sampled" "$SAMPLED_SECONDS" --temperature "${SAMPLED_TEMPERATURE:-0.8}" --seed 1
fi
# Sampled answers made by an earlier run of this script train too.
[ -f "$run/data_sampled/manifest.json" ] && datasets+=("$run/data_sampled")
[ "${STOP_AFTER:-}" = datagen ] && { stamp done; exit 0; }

stamp train
train_args=(--device "$device" --data "${datasets[@]}" --max-minutes "${TRAIN_MINUTES:-5}" --epochs 20 --lr "${TRAIN_LR:-6e-4}"
            --eval-every 250 --save-every 250)
# The heads train side by side: one small head leaves most of the GPU idle.
report_heads=()
for kind in $heads; do
    report_heads+=(--head "$kind=$run/$kind")
    [ -f "$run/$kind/train_summary.json" ] && continue
    steps_var=${kind^^}_STEPS
    steps=${!steps_var:-${TRAIN_STEPS:-}}
    init_var=${kind^^}_INIT
    resume=()
    [ -n "${!init_var:-}" ] && resume=(--init "${!init_var}")
    [ -f "$run/$kind/checkpoint.pt" ] && resume=(--resume)
    aerie train "$kind" "${train_args[@]}" ${steps:+--steps "$steps"} "${resume[@]}" --out "$run/$kind" >> "$run/train_$kind.log" 2>&1 &
done
for job in $(jobs -p); do
    wait "$job" || { tail -n 20 "$run"/train_*.log; exit 1; }
done
tail -n 2 "$run"/train_*.log
[ "${STOP_AFTER:-}" = train ] && { stamp done; exit 0; }

stamp report
for extra in ${REPORT_HEADS:-}; do report_heads+=(--head "$extra"); done
aerie train report --device "$device" "${report_heads[@]}" \
    --prompts "mt_bench=$data/mt_bench_questions.jsonl" --prompts "humaneval=$data/HumanEval.jsonl.gz" \
    "${report_limit[@]}" --max-new-tokens "${EVAL_TOKENS:-256}" --workers "${REPORT_WORKERS:-12}" \
    --minutes "${REPORT_MINUTES:-7}" --out "$run/report"
[ "${STOP_AFTER:-}" = report ] && { stamp done; exit 0; }

[ "${BENCH_LIMIT:-10}" = 0 ] && { stamp done; exit 0; }
stamp bench
dtype=bfloat16
[ "$device" = cpu ] && dtype=float32
aerie bench --prompts "$data/mt_bench_questions.jsonl" --limit "${BENCH_LIMIT:-10}" --device "$device" \
    --dtype "$dtype" --head "$run/${heads%% *}" --max-new-tokens "${EVAL_TOKENS:-256}" --out "$run/bench.json"
stamp done
