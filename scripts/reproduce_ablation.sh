#!/usr/bin/env bash
# The paper's comparison at embedded scale: sft, standard_kd, curriculum_only, teacher_schedule_only
# and clpd on arith (+experiment=arith: the 0.11M micro student, the arith_plateau ladder), 5 paired
# seeds each, as one `clpd train -m` sweep on Hydra's joblib launcher, then `clpd report`. A thin
# wrapper: it prints the three commands it runs, which are the whole recipe (docs/results.md, "The method
# comparison").
#
#   bash scripts/reproduce_ablation.sh                 # SEEDS=0,1,2,3,4; JOBS=1; OUT=multirun/ablation/arith
#   JOBS=2 bash scripts/reproduce_ablation.sh          # two runs at once, each on cores / 2 threads
#   ARMS=standard_kd,clpd bash scripts/reproduce_ablation.sh   # some of the arms
#   OUT=multirun/ablation/arith-tokens bash scripts/reproduce_ablation.sh trainer.max_tokens=9000000
#                                      # extra overrides go to every run: here, equal tokens, not steps
#
# Needs the sweep extra (pip install -e '.[sweep]'). JOBS is hydra.launcher.n_jobs: joblib starts
# that many worker processes and sets OMP_NUM_THREADS=(cores / JOBS) in each, unless it is set in
# the environment already. The thread count is part of the result: the same run on 1 and on 2
# threads reaches different weights, so rerun a table's runs with its JOBS to reproduce it bit for bit.
#
# Resumable: every run has trainer.resume=auto, so launching the script again with the same OUT
# skips the runs that finished, continues a stopped one from its newest checkpoint and runs the
# rest. Each run goes to $OUT/runs/seed<S>/<method>, seeds outer and arms inner, so a partial launch
# holds complete pairs and a later launch with more ARMS or SEEDS adds to the same OUT.
#
# The teachers are trained first, once (the sweep's runs then share them; one built by a run would
# make the runs that need it wait for it).
set -uo pipefail
SEEDS="${SEEDS:-0,1,2,3,4}"
OUT="${OUT:-multirun/ablation/arith}"
JOBS="${JOBS:-1}"
ARMS="${ARMS:-sft,standard_kd,curriculum_only,teacher_schedule_only,clpd}"
START=$SECONDS

run() { echo "+ $*"; "$@"; }

run clpd train +experiment=arith_teachers "hydra.run.dir=$OUT/teachers" trainer.resume=auto "$@" || exit 1
# trainer.eval_every=150: a learning curve (200 test problems every 150 steps) in each run's
# metrics.jsonl, to see whether the students end on a plateau or in the middle of a jump.
run clpd train -m hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" +experiment=arith "seed=$SEEDS" "method=$ARMS" \
    trainer.eval_every=150 trainer.save_every=500 trainer.resume=auto \
    "hydra.sweep.dir=$OUT/runs" 'hydra.sweep.subdir=seed${seed}/${hydra:runtime.choices.method}' "$@" \
    || echo "some runs failed or were stopped: see the report"
run clpd report "$OUT/runs" --out "$OUT"
echo "ablation: $((SECONDS - START)) s in all; report in $OUT"
