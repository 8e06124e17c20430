#!/usr/bin/env bash
# The paper's comparison at embedded scale: sft, standard_kd, curriculum_only, teacher_schedule_only
# and clpd on arith (the 0.11M micro student, the arith_tiny ladder), 5 paired seeds each, then
# `clpd report` (per-arm mean +- std, tokens seen, paired difference to standard_kd with a 95% CI).
#
#   bash scripts/reproduce_ablation.sh            # SEEDS=0,1,2,3,4 by default; OUT=multirun/ablation/<time>
#   bash scripts/reproduce_ablation.sh trainer.max_tokens=1500000   # extra overrides go to every arm:
#                                                 # here, equal tokens instead of equal steps
#
# Seeds are paired: seed s gives every arm the same initial student weights and, in the random-order
# arms, the same batches. The teachers are trained once (first) and shared by all runs.
set -uo pipefail
SEEDS="${SEEDS:-0,1,2,3,4}"
OUT="${OUT:-multirun/ablation/$(date +%Y-%m-%d_%H-%M-%S)}"
START=$SECONDS

clpd train +experiment=arith_teachers "hydra.run.dir=$OUT/teachers" || exit 1
# A failed job does not stop the others; the report lists it as failed.
# trainer.eval_every=100: a learning curve (200 test problems every 100 steps) in each run's
# metrics.jsonl, to see whether the students end on a plateau or in the middle of a jump.
clpd train -m +experiment=arith method=sft,standard_kd,curriculum_only,teacher_schedule_only,clpd "seed=$SEEDS" \
    trainer.eval_every=100 "hydra.sweep.dir=$OUT/runs" "$@" || echo "some runs failed: see the report"
clpd report "$OUT/runs" --out "$OUT"
echo "ablation: $((SECONDS - START)) s in all; report in $OUT"
