#!/usr/bin/env bash
# Does distilling from stored top-k teacher outputs teach the student what the live teacher does?
# standard_kd and clpd, paired seeds, three ways of getting the teacher's logits: live (its forward
# at every step), stored with k = 8 (the top 8 rows and one tail bucket), stored with every row
# (distill.top_k=null: the same loss as live, up to float rounding). Three `clpd train -m` sweeps
# on Hydra's joblib launcher, then `clpd report` over all of them (docs/results.md, "Stored against live teacher outputs").
#
#   bash scripts/stored_vs_live.sh                                   # +experiment=arith as it is (3000 steps)
#   JOBS=2 bash scripts/stored_vs_live.sh teachers=arith_plateau teachers.build.max_steps=800 '~teachers.build_overrides.medium' trainer.max_steps=700   # docs/results.md
#
# Each run goes to $OUT/runs/seed<S>/<method>/<live|stored-k8|stored-all>. Resumable like
# reproduce_ablation.sh: a finished run is skipped, a stopped one continues from its checkpoint.
# The stores are built by the first run that needs them; with JOBS=2 the other job waits for it on
# the store's file lock. Extra arguments go to every run (e.g. teachers.cache_dir=PATH).
set -uo pipefail
SEEDS="${SEEDS:-0,1,2}"
OUT="${OUT:-multirun/stored/arith}"
JOBS="${JOBS:-1}"
ARMS="${ARMS:-standard_kd,clpd}"
START=$SECONDS

run() { echo "+ $*"; "$@"; }

sweep() {  # sweep NAME OVERRIDES...: the seeds x arms of one way of getting teacher logits
    local name=$1; shift
    run clpd train -m hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" +experiment=arith "seed=$SEEDS" "method=$ARMS" \
        trainer.eval_every=100 trainer.save_every=500 trainer.resume=auto "$@" \
        "hydra.sweep.dir=$OUT/runs" "hydra.sweep.subdir=seed\${seed}/\${hydra:runtime.choices.method}/$name" \
        || echo "some runs of $name failed or were stopped: see the report"
}

sweep live distill.teacher_outputs=live "$@"
sweep stored-k8 distill.teacher_outputs=stored distill.top_k=8 "$@"
sweep stored-all distill.teacher_outputs=stored distill.top_k=null "$@"
run clpd report "$OUT/runs" --out "$OUT" --baseline distill.teacher_outputs=live   # stored minus live, per method
echo "stored_vs_live: $((SECONDS - START)) s in all; report in $OUT"
