#!/usr/bin/env bash
# The paper's comparison at embedded scale: sft, standard_kd, curriculum_only, teacher_schedule_only
# and clpd on arith (+experiment=arith: the 0.11M micro student, 1500 steps, the arith_plateau
# ladder), 5 paired seeds each, then `clpd report` (per-arm mean +- std, tokens seen, paired
# difference to standard_kd with a 95% CI, learning curves).
#
#   bash scripts/reproduce_ablation.sh                 # SEEDS=0,1,2,3,4; OUT=multirun/ablation/arith
#   OUT=multirun/ablation/arith-tokens bash scripts/reproduce_ablation.sh trainer.max_tokens=9000000
#                                      # extra overrides go to every run: here, equal tokens, not steps
#
# Resumable: every job runs with trainer.resume=auto, so launching the script again with the same
# OUT skips the jobs that finished, continues a stopped one from its checkpoint (Ctrl-C or SIGTERM
# saves one) and runs the rest. Seeds are the outer loop, so a partial sweep holds complete pairs.
#
# Seeds are paired: seed s gives every arm the same initial student weights and, in the random-order
# arms, the same batches. The teachers are trained once (first) and shared by all runs. On 2 CPU
# cores one seed of the five arms takes about half an hour.
set -uo pipefail
SEEDS="${SEEDS:-0,1,2,3,4}"
OUT="${OUT:-multirun/ablation/arith}"
START=$SECONDS

clpd train +experiment=arith_teachers "hydra.run.dir=$OUT/teachers" trainer.resume=auto "$@" || exit 1
# A failed job does not stop the others; the report lists it as failed.
# trainer.eval_every=150: a learning curve (200 test problems every 150 steps) in each run's
# metrics.jsonl, to see whether the students end on a plateau or in the middle of a jump.
clpd train -m +experiment=arith "seed=$SEEDS" method=sft,standard_kd,curriculum_only,teacher_schedule_only,clpd \
    trainer.eval_every=150 trainer.save_every=500 trainer.resume=auto "hydra.sweep.dir=$OUT/runs" "$@" \
    || echo "some runs failed or stopped: see the report"
clpd report "$OUT/runs" --out "$OUT"
echo "ablation: $((SECONDS - START)) s in all; report in $OUT"
