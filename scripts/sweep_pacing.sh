#!/usr/bin/env bash
# CLPD on arith under four pacing functions, 2 seeds each, then `clpd report`.
#
#   bash scripts/sweep_pacing.sh                   # SEEDS=0,1; OUT=multirun/pacing/<time>
#   bash scripts/sweep_pacing.sh trainer.max_steps=700 teachers=arith_plateau   # extra overrides: every run
#                                                  # (this one is the setting of docs/results.md's table)
set -uo pipefail
SEEDS="${SEEDS:-0,1}"
OUT="${OUT:-multirun/pacing/$(date +%Y-%m-%d_%H-%M-%S)}"
START=$SECONDS

clpd train +experiment=arith_teachers "hydra.run.dir=$OUT/teachers" trainer.resume=auto "$@" || exit 1
clpd train -m +experiment=arith method=clpd curriculum.pacing=linear,root,step,exponential "seed=$SEEDS" \
    "hydra.sweep.dir=$OUT/runs" "$@" || echo "some runs failed: see the report"
clpd report "$OUT/runs" --out "$OUT"
echo "pacing sweep: $((SECONDS - START)) s in all; report in $OUT"
