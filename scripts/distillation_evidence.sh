#!/usr/bin/env bash
# Does distillation help on the built-in data? The whole measurement behind the README's evaluation table:
#   1. feature distillation from the shipped teacher, and the same run from an untrained teacher of the same
#      architecture (the control), side by side: two single-threaded runs use 2 cores better than one 2-thread run;
#   2. the label interpreter (20 labelled images) and a mixed-distillation run;
#   3. one `dtengine eval` of all three students beside random init, the supervised positive control and the
#      teacher's own features, over SEEDS seeds, with margins over random init in standard deviations.
# Usage: scripts/distillation_evidence.sh [OUT_DIR]   (env: STEPS=1000 SEEDS=3 DTENGINE=.venv/bin/dtengine)
set -euo pipefail

out=${1:-runs/evidence-$(date +%Y%m%d-%H%M%S)}
steps=${STEPS:-1000}
seeds=${SEEDS:-3}
dtengine=${DTENGINE:-.venv/bin/dtengine}
common=(train.steps="$steps" checkpoint.every=250 train.tensorboard=false train.progress=false)

echo "evidence: $out (steps=$steps seeds=$seeds)"
OMP_NUM_THREADS=1 "$dtengine" distill --config configs/demo.yaml "${common[@]}" out_dir="$out/feature" \
    > "$out.feature.log" 2>&1 &
feature=$!
OMP_NUM_THREADS=1 "$dtengine" distill --config configs/demo.yaml "${common[@]}" out_dir="$out/untrained-teacher" \
    teacher.weights=untrained > "$out.untrained.log" 2>&1 &
untrained=$!
wait "$feature" || { echo "feature distillation failed, see $out.feature.log"; exit 1; }
wait "$untrained" || { echo "control distillation failed, see $out.untrained.log"; exit 1; }

"$dtengine" train-interpreter --out "$out/interpreter" progress=false
"$dtengine" distill --config configs/demo_mixed.yaml "${common[@]}" out_dir="$out/mixed" \
    distill.interpreter="$out/interpreter"

"$dtengine" eval --checkpoint "$out/feature" --compare untrained-teacher="$out/untrained-teacher" \
    --compare mixed="$out/mixed" --baseline random --baseline supervised --baseline teacher --seeds "$seeds" \
    --out "$out/eval" progress=false
