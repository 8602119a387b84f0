#!/usr/bin/env bash
# Does distillation help on the built-in data? The whole measurement behind the README's evaluation table:
#   1. feature distillation from the shipped teacher, and the same run from an untrained teacher of the same
#      architecture (the control), side by side: two single-threaded runs use 2 cores better than one 2-thread run;
#   2. the label interpreter (20 labelled images) and a mixed-distillation run, and the same two from the untrained
#      teacher;
#   3. one `dtengine eval` of all four students beside random init, the supervised positive control and the
#      teacher's own features, over SEEDS seeds, with margins over random init in standard deviations.
# Usage: scripts/distillation_evidence.sh [OUT_DIR]
#   env: STEPS=2500 (feature runs) MIXED_STEPS=1000 (mixed runs) SEEDS=3 DTENGINE=.venv/bin/dtengine
set -euo pipefail

out=${1:-runs/evidence-$(date +%Y%m%d-%H%M%S)}
steps=${STEPS:-2500}
mixed_steps=${MIXED_STEPS:-1000}
seeds=${SEEDS:-3}
dtengine=${DTENGINE:-.venv/bin/dtengine}
common=(checkpoint.every=500 train.tensorboard=false train.progress=false)

mkdir -p "$out/logs"
echo "evidence: $out (steps=$steps, mixed $mixed_steps, seeds=$seeds; logs in $out/logs)"
OMP_NUM_THREADS=1 "$dtengine" distill --config configs/demo.yaml train.steps="$steps" "${common[@]}" \
    out_dir="$out/feature" > "$out/logs/feature.log" 2>&1 &
feature=$!
OMP_NUM_THREADS=1 "$dtengine" distill --config configs/demo.yaml train.steps="$steps" "${common[@]}" \
    out_dir="$out/untrained-teacher" teacher.weights=untrained > "$out/logs/untrained-teacher.log" 2>&1 &
untrained=$!
wait "$feature" || { echo "feature distillation failed, see $out/logs/feature.log"; exit 1; }
wait "$untrained" || { echo "control distillation failed, see $out/logs/untrained-teacher.log"; exit 1; }

# Mixed distillation from the shipped teacher and, as its control, from the untrained one (interpreter and
# distillation both on the untrained teacher), again side by side.
mixed_run() {  # $1 = run name, then extra overrides for both commands
    local name=$1
    shift
    OMP_NUM_THREADS=1 "$dtengine" train-interpreter --out "$out/interpreter-$name" progress=false "$@" &&
        OMP_NUM_THREADS=1 "$dtengine" distill --config configs/demo_mixed.yaml "${common[@]}" \
            train.steps="$mixed_steps" out_dir="$out/$name" distill.interpreter="$out/interpreter-$name" "$@"
}
mixed_run mixed > "$out/logs/mixed.log" 2>&1 &
mixed=$!
mixed_run mixed-untrained-teacher teacher.weights=untrained > "$out/logs/mixed-untrained-teacher.log" 2>&1 &
mixed_untrained=$!
wait "$mixed" || { echo "mixed distillation failed, see $out/logs/mixed.log"; exit 1; }
wait "$mixed_untrained" || { echo "mixed control failed, see $out/logs/mixed-untrained-teacher.log"; exit 1; }

"$dtengine" eval --checkpoint "$out/feature" --compare untrained-teacher="$out/untrained-teacher" \
    --compare mixed="$out/mixed" --compare mixed-untrained-teacher="$out/mixed-untrained-teacher" \
    --baseline random --baseline supervised --baseline teacher --seeds "$seeds" --out "$out/eval" progress=false
